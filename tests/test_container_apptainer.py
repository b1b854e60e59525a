"""The singularity/apptainer machine models.

Apptainer is not packaged for Debian 12 and cannot be fetched on the test hosts (only the PyPI,
Debian and npm registries are reachable), so:

* the exact apptainer argv is golden-tested (pure);
* vac's own part of the life cycle (the launcher running as singularity_user inside the
  machine's cgroup, CPU time, SIGTERM/SIGKILL, adoption, release) runs for real in the
  ``container`` tier with a stand-in for the apptainer binary that skips apptainer's options
  and runs the command on the host — it proves nothing about apptainer itself;
* one scenario runs the real thing wherever ``apptainer`` or ``singularity`` is on PATH, and is
  skipped, saying so, elsewhere.
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import tarfile
import tempfile
import time
import uuid as uuidmod
from pathlib import Path

import pytest

from tests.containerimage import BUSYBOX, BackendHarness, _rootfs_tar
from tests.test_container_podman import count_scratch_releases
from tests.tiers import CONTAINER, require
from vac.backends.base import BackendError
from vac.backends.container.apptainer import (
    ApptainerBackend,
    account,
    apptainer_argv,
    find_binary,
    resolve_image,
)
from vac.backends.container.cgroups import Cgroups
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine, slot_name

DIRECTORY = Path("/var/lib/vac/machines/1700000000_cms_wn001-04.example.org")
USER = "nobody"
WAIT_SECONDS = 60.0

# Skips apptainer's options as apptainer_argv writes them, then runs the command on the host.
STAND_IN = """#!/bin/sh
[ "$1" = exec ] || exit 99
shift
while [ $# -gt 0 ]; do
    case $1 in
        --contain|--cleanenv) shift ;;
        --workdir|--bind|--env) shift 2 ;;
        *) break ;;
    esac
done
shift  # the image
exec "$@"
"""


def test_apptainer_argv_golden(golden):
    argv = apptainer_argv("apptainer", "/cvmfs/unpacked.cern.ch/cms/el9", ["/user_data"],
                          DIRECTORY, ["/cvmfs/cms.cern.ch"])
    golden("containers/apptainer-exec.argv", "\n".join(argv) + "\n")


def test_images_resolve_like_classic_vac(tmp_path):
    files = tmp_path / "machinetypes" / "cms" / "files"
    files.mkdir(parents=True)
    (files / "cms.sif").write_text("")
    machinetype = Machinetype(name="cms", root_image="cms.sif", machine_model="apptainer",
                              machinetype_path=str(tmp_path / "machinetypes" / "cms"))
    assert resolve_image(machinetype) == str(files / "cms.sif")
    assert resolve_image(Machinetype(name="cms", root_image=str(tmp_path))) == str(tmp_path)
    for image, message in (("https://x.example.org/cms.sif", "needs a local image"),
                           ("docker://cms", "needs a local image"), ("absent.sif", "does not exist")):
        with pytest.raises(BackendError, match=message):
            resolve_image(Machinetype(name="cms", root_image=image, machine_model="apptainer",
                                      machinetype_path=str(tmp_path)))


def test_singularity_user_must_exist_and_not_be_root():
    with pytest.raises(BackendError, match="is root"):
        account("root")
    with pytest.raises(BackendError, match="does not exist"):
        account("no-such-vac-account")
    with pytest.raises(BackendError, match="not set"):
        account(None)
    assert account(USER).pw_name == USER


# -- the life cycle -------------------------------------------------------------------------------


class Factory(BackendHarness):
    """A state directory the singularity_user can traverse, and backends sharing a cgroup root."""

    def __init__(self, binary: str, root: Path):
        self.root = root
        self.binary = binary
        super().__init__(root / "state", Settings(
            vac_space="space.test.invalid", factory_name="ap.test.invalid", mb_per_processor=128,
            singularity_user=USER, state_dir=str(root / "state")))
        os.chmod(root / "state", 0o755)
        os.chmod(root / "state" / "machines", 0o755)
        self.slots = 0

    def backend(self) -> ApptainerBackend:
        return self.track(ApptainerBackend(self.stopped.put, singularity_user=USER, binary=self.binary,
                                           cgroup_root=self.cgroup_root, cvmfs_root=str(self.root)))

    def start(self, backend: ApptainerBackend, script: str, image: str, command: str):
        machinetype = Machinetype(name="ap", root_image=image, machine_model="apptainer",
                                  user_data="user_data", container_command=command)
        now = time.time()
        # A slot of its own per machine: machines started in the same second in one slot would
        # share a directory, and a test would see the previous machine's files.
        slot = self.slots
        self.slots += 1
        machine = Machine(uuid=str(uuidmod.uuid4()), name=slot_name("ap.test.invalid", slot),
                          slot=slot, machinetype="ap", machine_model="apptainer", processors=1,
                          created=now, deadline=now + 3600)
        directory = self.prepare(machine, machinetype, script)
        os.chmod(directory, 0o755)
        backend.create(machine, machinetype, self.settings, directory)
        return machine, directory


def open_temporary_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="vac-apptainer-test-"))
    os.chmod(root, 0o755)
    return root


@pytest.fixture
def stand_in():
    require(CONTAINER, "needs root and cgroups" if os.geteuid() != 0 or Cgroups.detect() is None else None)
    root = open_temporary_root()
    binary = root / "apptainer"
    binary.write_text(STAND_IN)
    binary.chmod(0o755)
    factory = Factory(str(binary), root)
    yield factory
    factory.close()
    shutil.rmtree(root)


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), path


@pytest.mark.container
def test_user_data_runs_as_singularity_user_with_cpu_time(stand_in, monkeypatch):
    backend = stand_in.backend()
    # Written then renamed: the test must never read a file the shell has only just opened.
    script = """\
id -u > started.tmp && mv started.tmp started
end=$(( $(date +%s) + 3 ))
while [ $(date +%s) -lt $end ]; do :; done
echo "300 No more work" > ../joboutputs/shutdown_message
"""
    machine, directory = stand_in.start(backend, script, str(stand_in.root), "../user_data")
    wait_for(directory / "mnt" / "started")
    assert (directory / "mnt" / "started").read_text() == f"{pwd.getpwnam(USER).pw_uid}\n"
    active = {m.uuid: m.active for m in backend.list_machines()}
    assert active[machine.uuid] is True
    stand_in.wait_stopped(machine.uuid)
    assert stand_in.store.vm_shutdown_message(machine) == "300 No more work"
    assert backend.cpu_seconds(machine.uuid) >= 1.0
    assert {m.uuid: m.active for m in backend.list_machines()}[machine.uuid] is False
    released = count_scratch_releases(monkeypatch)
    backend.release(machine, stand_in.settings, directory)
    assert released == [machine.uuid]  # the kernel's tables are read once, not twice
    assert machine.uuid not in {m.uuid for m in backend.list_machines()}
    assert not (directory / "mnt").exists()


@pytest.mark.container
def test_stop_destroy_and_adoption(stand_in):
    first = stand_in.backend()
    script = "trap 'echo term > stopped; exit 0' TERM\ntouch started\nwhile :; do sleep 1; done\n"
    machine, directory = stand_in.start(first, script, str(stand_in.root), "../user_data")
    wait_for(directory / "mnt" / "started")
    first.close()  # vacd goes away; the machine keeps running

    second = stand_in.backend()
    assert {m.uuid: m.active for m in second.list_machines()}[machine.uuid] is True
    second.stop(machine.uuid)
    stand_in.wait_stopped(machine.uuid)
    assert (directory / "mnt" / "stopped").read_text() == "term\n"

    stubborn, directory = stand_in.start(second, "trap '' TERM\ntouch started\n"
                                         "while :; do sleep 1; done\n", str(stand_in.root),
                                         "../user_data")
    wait_for(directory / "mnt" / "started")
    second.stop(stubborn.uuid)
    time.sleep(1.0)
    assert {m.uuid: m.active for m in second.list_machines()}[stubborn.uuid] is True
    second.destroy(stubborn.uuid)
    assert {m.uuid: m.active for m in second.list_machines()}[stubborn.uuid] is False


# -- the real apptainer ---------------------------------------------------------------------------


@pytest.mark.container
def test_real_apptainer_runs_user_data_with_mjf():
    binary = find_binary()
    if binary is None:
        pytest.skip("apptainer scenario: neither apptainer nor singularity is on PATH "
                    "(not packaged for Debian 12)")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = open_temporary_root()
    factory = Factory(binary, root)
    try:
        image = root / "busybox"
        image.mkdir()
        rootfs = _rootfs_tar(Path(BUSYBOX).read_bytes(), ["sh", "cat", "date", "echo", "id"])
        with tarfile.open(fileobj=io.BytesIO(rootfs), mode="r") as tar:
            tar.extractall(image)  # noqa: S202 (our own tar)
        backend = factory.backend()
        script = """\
cat $JOBFEATURES/allocated_cpu > $JOBOUTPUTS/allocated_cpu
date > $JOBOUTPUTS/heartbeat
echo "300 No more work" > $JOBOUTPUTS/shutdown_message
"""
        machine, directory = factory.start(backend, script, str(image), "/user_data")
        factory.wait_stopped(machine.uuid)
        assert (directory / "joboutputs" / "allocated_cpu").read_text() == "1\n"
        assert factory.store.vm_shutdown_message(machine) == "300 No more work"
        backend.release(machine, factory.settings, directory)
    finally:
        factory.close()
        shutil.rmtree(root)
