"""Container scratch disks (vac.backends.scratch): pure tests of the commands and the kernel-table
parsing, and real loop devices, ext4 and podman as root (``container`` tier).

Every real test cleans up by the exact mount point, loop devices (found by the machine's
scratch file name) and files it made, even when it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid as uuidmod
from pathlib import Path

import pytest

from tests.containerimage import require_container_tier
from tests.test_container_podman import Factory, image  # noqa: F401 (the image fixture)
from tests.tiers import CONTAINER, require
from vac.backends import scratch
from vac.backends.base import BackendError
from vac.backends.commands import CommandError, run_command
from vac.backends.container import common
from vac.backends.vm import disks
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

MB64 = 0.064  # GB per processor: 64 MB scratch disks


def settings(**options) -> Settings:
    return Settings(vac_space="space.test.invalid", factory_name="host.test.invalid", **options)


def make_machine(processors: int = 1) -> Machine:
    now = time.time()
    return Machine(uuid=str(uuidmod.uuid4()), name="host-00.test.invalid", slot=0,
                   machinetype="ct", machine_model="podman", processors=processors,
                   created=now, deadline=now + 3600)


def machinetype(gb) -> Machinetype:
    return Machinetype(name="ct", root_image="docker://x", machine_model="podman",
                       user_data="user_data", disk_gb_per_processor=gb)


class Recorder:
    """Records argv; answers LVM queries like an empty 1 GB volume group."""

    def __init__(self, fail: str = "", volumes: str = ""):
        self.calls: list[list[str]] = []
        self.fail = fail
        self.volumes = volumes

    def __call__(self, argv) -> str:
        self.calls.append(list(argv))
        if argv[0] == self.fail:
            raise CommandError(f"{argv[0]} failed")
        if argv[0] == "vgs":
            return "  1000000000,4194304\n"
        if argv[0] == "lvs":
            return self.volumes
        return ""


# -- pure --------------------------------------------------------------------------------------


def test_the_commands():
    assert scratch.mkfs_argv("/d/f.ext4") == ["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                                              "nodiscard", "/d/f.ext4"]
    assert scratch.mount_argv("/d/f.ext4", Path("/d/mnt"), loop=True) == [
        "mount", "-t", "ext4", "-o", "loop,nodev,nosuid", "/d/f.ext4", "/d/mnt"]
    assert scratch.mount_argv("/dev/vg/lv", Path("/d/mnt"), loop=False) == [
        "mount", "-t", "ext4", "-o", "nodev,nosuid", "/dev/vg/lv", "/d/mnt"]


def test_names_come_from_the_uuid_only():
    uuid = "0b7e4a52-2c36-4f4e-9d0e-3f1e5e1c2a10"
    assert scratch.scratch_name(uuid) == f"vac-scratch-{uuid}"
    assert scratch.scratch_file(Path("/m"), uuid) == Path(f"/m/disks/vac-scratch-{uuid}.ext4")
    # Never counted as a foreign volume when a VM's share of the volume group is sized.
    assert disks.is_vac_volume(scratch.scratch_name(uuid), "host.test.invalid")
    # Only a UUID as vac makes it: anything else would not be recognised as vac's volume.
    for bad in ("../etc", "a/b", "", "-x", "x y", "abc", uuid.upper(), uuid.replace("-", "")):
        with pytest.raises(BackendError, match="not a machine UUID"):
            scratch.scratch_name(bad)


def test_mountinfo_lines_and_escapes(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("22 27 0:21 / /proc rw - proc proc rw\n"
                    "90 27 7:3 / /s/with\\040space/mnt rw,nosuid,nodev - ext4 /dev/loop3 rw\n"
                    "91 27 7:4 / /s/other rw - ext4 /dev/loop4 rw\n")
    assert scratch.parse_mountinfo(info.read_text())[1] == ("7:3", "/s/with space/mnt")
    assert scratch.mounted_under(Path("/s/with space"), str(info)) == ["/s/with space/mnt"]
    assert scratch.mounted_under(Path("/s/with"), str(info)) == []


def fake_loop(sys_block: Path, index: int, backing: str) -> None:
    loop = sys_block / f"loop{index}" / "loop"
    loop.mkdir(parents=True)
    (loop / "backing_file").write_text(backing + "\n")
    (sys_block / f"loop{index}" / "dev").write_text(f"7:{index}\n")


def test_loop_devices_by_backing_file_name(tmp_path):
    sys_block = tmp_path / "block"
    fake_loop(sys_block, 0, "/a/disks/vac-scratch-1.ext4")
    fake_loop(sys_block, 1, "/b/disks/vac-scratch-2.ext4 (deleted)")
    (sys_block / "loop2").mkdir()  # not attached
    (sys_block / "vda").mkdir()
    assert scratch.loop_devices("vac-scratch-2.ext4", str(sys_block)) == {
        "/dev/loop1": ("7:1", "/b/disks/vac-scratch-2.ext4")}


def test_no_size_keeps_the_plain_directory(tmp_path):
    recorder = Recorder()
    for gb in (None, 0.0):
        assert not scratch.create_scratch(settings(), machinetype(gb), make_machine(), tmp_path,
                                          tmp_path / "mnt", recorder)
    assert recorder.calls == []
    assert not (tmp_path / "mnt").exists()


def test_a_logical_volume_when_a_volume_group_is_set(tmp_path, monkeypatch):
    # Device-mapper nodes cannot be made where this runs; the LV tier below makes real ones.
    monkeypatch.setattr(disks, "_is_block_device", lambda path: True)
    machine = make_machine(processors=2)
    name = f"vac-scratch-{machine.uuid}"
    recorder = Recorder()
    assert scratch.create_scratch(settings(volume_group="vg0", disk_gb_per_processor=1.0),
                                  machinetype(MB64), machine, tmp_path,
                                  tmp_path / "mnt", recorder)
    commands = [call for call in recorder.calls if call[0] not in ("vgs", "lvs")]
    # 2 x 64 MB, rounded down to 4 MiB extents
    assert commands == [
        ["lvcreate", "--yes", "--name", name, "-L", f"{125829120}B", "vg0"],
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", f"/dev/vg0/{name}"],
        ["mount", "-t", "ext4", "-o", "nodev,nosuid", f"/dev/vg0/{name}", str(tmp_path / "mnt")]]
    assert not (tmp_path / "disks").exists()

    release = Recorder(volumes=f"  {name},125829120\n")
    empty = tmp_path / "mountinfo"
    empty.write_text("")
    (tmp_path / "none-block").mkdir()
    scratch.release_scratch(machine.uuid, "vg0", tmp_path, tmp_path / "mnt", release,
                            mountinfo=str(empty), sys_block=str(tmp_path / "none-block"))
    assert release.calls[-1] == ["lvremove", "-f", f"vg0/{name}"]


def test_a_failed_mkfs_removes_the_volume_and_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(disks, "_is_block_device", lambda path: True)
    machine = make_machine()
    recorder = Recorder(fail="mkfs.ext4")
    created = f"  vac-scratch-{machine.uuid},64000000\n"
    original = recorder.__call__

    def runner(argv):  # the volume exists once lvcreate has run
        if argv[0] == "lvcreate":
            recorder.volumes = created
        return original(argv)

    with pytest.raises(BackendError, match="cannot make its scratch disk: mkfs.ext4 failed"):
        scratch.create_scratch(settings(volume_group="vg0"), machinetype(MB64), machine,
                               tmp_path, tmp_path / "mnt", runner)
    assert recorder.calls[-1] == ["lvremove", "-f", f"vg0/vac-scratch-{machine.uuid}"]


def test_a_mount_that_stays_busy_is_left_and_reported(tmp_path):
    mount_point = tmp_path / "m" / "mnt"
    mount_point.mkdir(parents=True)
    info = tmp_path / "mountinfo"
    info.write_text(f"90 27 7:3 / {mount_point} rw - ext4 /dev/loop3 rw\n")
    uuid = str(uuidmod.uuid4())
    file = scratch.scratch_file(tmp_path / "m", uuid)
    file.parent.mkdir()
    file.write_bytes(b"x")
    recorder = Recorder(fail="umount")
    (tmp_path / "block").mkdir()
    with pytest.raises(BackendError, match="still mounted .* after 3 attempts"):
        scratch.release_scratch(uuid, None, tmp_path / "m", mount_point, recorder, delay=0.0,
                                mountinfo=str(info), sys_block=str(tmp_path / "block"))
    assert recorder.calls == [["umount", str(mount_point)]] * 3
    assert file.exists()


# -- real loop devices, ext4 and podman (root) ----------------------------------------------


def needs_root() -> None:
    reason = "needs root" if os.geteuid() != 0 else (
        "no loop devices" if not Path("/dev/loop-control").exists() else "")
    require_container_tier(reason)


def force_cleanup(uuid: str, directory: Path) -> None:
    """Whatever a failed test left, by the exact names this test made."""
    try:
        scratch.release_scratch(uuid, None, directory, directory / common.SCRATCH_DIR, delay=0.2)
    except Exception:  # noqa: BLE001 (the fallback must run whatever went wrong)
        subprocess.run(["umount", "-l", str(directory / common.SCRATCH_DIR)],
                       capture_output=True, timeout=60, check=False)
        for device in scratch.loop_devices(scratch.scratch_name(uuid) + scratch.FILE_SUFFIX):
            subprocess.run(["losetup", "--detach", device], capture_output=True, timeout=60,
                           check=False)


def attached(uuid: str) -> dict:
    return scratch.loop_devices(scratch.scratch_name(uuid) + scratch.FILE_SUFFIX)


@pytest.fixture
def machine_dir(tmp_path):
    needs_root()
    machine = make_machine()
    directory = tmp_path / "machine"
    (directory / "disks").mkdir(parents=True)
    yield machine, directory
    force_cleanup(machine.uuid, directory)


@pytest.mark.container
def test_file_scratch_mounted_busy_released_idempotent(machine_dir):
    machine, directory = machine_dir
    mount_point = directory / common.SCRATCH_DIR
    assert scratch.create_scratch(settings(), machinetype(MB64), machine, directory, mount_point)
    assert scratch.mounted_under(mount_point) == [str(mount_point)]
    assert len(attached(machine.uuid)) == 1
    stat = os.statvfs(mount_point)
    assert 50 * 10**6 < stat.f_blocks * stat.f_frsize <= 64 * 10**6
    file = scratch.scratch_file(directory, machine.uuid)
    assert file.stat().st_blocks * 512 < 64 * 10**6  # sparse

    with open(mount_point / "held", "w"):  # busy: left mounted, nothing removed
        with pytest.raises(BackendError, match="still mounted"):
            common.remove_scratch(directory, machine.uuid, None)
        assert scratch.mounted_under(mount_point) and file.exists()

    common.remove_scratch(directory, machine.uuid, None)
    assert scratch.mounted_under(directory) == []
    assert attached(machine.uuid) == {}
    assert not file.exists() and not mount_point.exists()
    common.remove_scratch(directory, machine.uuid, None)  # idempotent


@pytest.mark.container
def test_missing_mkfs_cleans_up(machine_dir, monkeypatch, tmp_path):
    machine, directory = machine_dir
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(BackendError, match="mkfs.ext4"):
        scratch.create_scratch(settings(), machinetype(MB64), machine, directory,
                               directory / common.SCRATCH_DIR)
    assert not scratch.scratch_file(directory, machine.uuid).exists()
    assert scratch.mounted_under(directory) == []


@pytest.mark.container
def test_a_failed_loop_mount_cleans_up(machine_dir):
    machine, directory = machine_dir

    def runner(argv):
        if argv[0] == "mount":
            raise CommandError("mount: failed to set up loop device")
        return run_command(argv)

    with pytest.raises(BackendError, match="loop device"):
        scratch.create_scratch(settings(), machinetype(MB64), machine, directory,
                               directory / common.SCRATCH_DIR, runner)
    assert not scratch.scratch_file(directory, machine.uuid).exists()
    assert attached(machine.uuid) == {}


def dm_available() -> bool:
    try:
        with open("/dev/mapper/control", "rb"):
            return True
    except OSError:
        return False


@pytest.mark.container
def test_logical_volume_scratch_in_a_loop_backed_volume_group(tmp_path):
    needs_root()
    require(CONTAINER, None if all(shutil.which(tool) for tool in ("pvcreate", "vgcreate", "lvcreate"))
            else "lvm2 is not installed")
    if not dm_available():  # the kernel's, not ours to install: a skip wherever it is missing
        pytest.skip("the kernel's device-mapper is not available here")
    backing = tmp_path / "pv.img"
    disks.create_sparse_file(str(backing), 200 * 2**20)
    device = run_command(["losetup", "--find", "--show", str(backing)]).strip()
    volume_group = f"vactest{uuidmod.uuid4().hex[:12]}"
    machine = make_machine()
    directory = tmp_path / "machine"
    try:
        run_command(["pvcreate", "-q", device])
        run_command(["vgcreate", "-q", volume_group, device])
        assert scratch.create_scratch(settings(volume_group=volume_group), machinetype(MB64),
                                      machine, directory, directory / common.SCRATCH_DIR)
        assert scratch.mounted_under(directory) == [str(directory / common.SCRATCH_DIR)]
        scratch.release_scratch(machine.uuid, volume_group)  # as for a zombie: no directory
        assert scratch.mounted_under(directory) == []
        assert scratch.scratch_name(machine.uuid) not in disks.logical_volumes(volume_group)
    finally:
        subprocess.run(["umount", str(directory / common.SCRATCH_DIR)], capture_output=True,
                       timeout=60, check=False)
        for argv in (["vgremove", "-f", volume_group], ["pvremove", "-q", device],
                     ["losetup", "--detach", device]):
            subprocess.run(argv, capture_output=True, timeout=60, check=False)


# -- in a real podman container ----------------------------------------------------------------


@pytest.fixture
def factory(tmp_path, image):  # noqa: F811 (image is the imported fixture)
    factory = Factory(tmp_path, image)
    made: list = []
    factory.made = made
    yield factory
    try:
        factory.close()
    finally:
        for uuid, directory in made:
            force_cleanup(uuid, directory)


@pytest.mark.container
def test_podman_tmp_is_the_limited_scratch_disk_and_a_restarted_backend_releases_it(factory):
    backend = factory.backend()
    script = ("df -k /tmp > /var/spool/joboutputs/df\n"
              "dd if=/dev/zero of=/tmp/fill bs=1M count=100 2> /var/spool/joboutputs/dd\n"
              "echo $? > /var/spool/joboutputs/status\n")
    machinetype = factory.machinetype(disk_gb_per_processor=MB64)
    machine = factory.machine()
    directory = factory.prepare(machine, machinetype, script)
    factory.made.append((machine.uuid, directory))
    backend.create(machine, machinetype, factory.settings, directory)
    assert scratch.mounted_under(directory) == [str(directory / common.SCRATCH_DIR)]
    factory.wait_stopped(machine.uuid)
    outputs = directory / "joboutputs"
    assert (outputs / "status").read_text().strip() != "0"
    assert "No space left on device" in (outputs / "dd").read_text()
    size_kb = int((outputs / "df").read_text().splitlines()[1].split()[1])
    assert size_kb <= 64 * 10**6 // 1024

    restarted = factory.backend()  # a new vacd: no memory of the machine
    restarted.release(machine, factory.settings, directory)
    assert scratch.mounted_under(directory) == []
    assert attached(machine.uuid) == {}
    assert not scratch.scratch_file(directory, machine.uuid).exists()
    assert not (directory / common.SCRATCH_DIR).exists()
    restarted.release(machine, factory.settings, directory)  # idempotent


@pytest.mark.container
def test_a_zombie_scratch_disk_is_released_by_forget(factory):
    backend = factory.backend()
    machinetype = factory.machinetype(disk_gb_per_processor=MB64)
    machine = factory.machine()
    directory = factory.prepare(machine, machinetype, "sleep 600\n")
    factory.made.append((machine.uuid, directory))
    backend.create(machine, machinetype, factory.settings, directory)
    backend.destroy(machine.uuid)
    backend.forget(machine.uuid)  # knows only the UUID
    assert scratch.mounted_under(directory) == []
    assert attached(machine.uuid) == {}
    assert not scratch.scratch_file(directory, machine.uuid).exists()
