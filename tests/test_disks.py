"""Tests of vac.backends.vm.disks: real sparse files and qcow2 overlays (qemu-img), LVM through a recording
runner whose argv lists are asserted."""

from __future__ import annotations

import json
import os
import stat

import pytest

from vac.backends.commands import CommandError, run_command
from vac.backends.vm import disks
from vac.backends.vm.disks import DiskError
from vac.backends.vm.domain import DiskSpec
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

GB = 10**9
MACHINE = Machine(uuid="0b9c2a1e-3f4d-4c5b-8a6e-7f8091a2b3c4", name="factory-03.example.org",
                  slot=3, machinetype="cms", machine_model="cernvm3", processors=2,
                  created=1_800_000_000.0, deadline=1_800_086_400.0)


def settings(**changes) -> Settings:
    values = {"vac_space": "space.example.org", "factory_name": "factory.example.org",
              "total_processors": 8}
    return Settings(**{**values, **changes})


class FakeLvm:
    """Records argv lists; answers lvs/vgs like LVM does for a 100 GB group with 4 MiB extents."""

    def __init__(self, volumes=None, vg_size=100 * GB, extent=4 << 20):
        self.calls: list = []
        self.volumes = dict(volumes or {})
        self.vg_size = vg_size
        self.extent = extent

    def __call__(self, argv):
        argv = list(argv)
        self.calls.append(argv)
        if argv[0] == "lvs":
            return "".join(f"  {name},{size}\n" for name, size in self.volumes.items())
        if argv[0] == "vgs":
            return f"  {self.vg_size},{self.extent}\n"
        if argv[0] == "lvcreate":
            self.volumes[argv[argv.index("--name") + 1]] = int(argv[argv.index("-L") + 1][:-1])
        elif argv[0] == "lvremove":
            self.volumes.pop(argv[-1].split("/", 1)[1])
        return ""

    def commands(self):
        return [call for call in self.calls if call[0] in ("lvcreate", "lvremove")]


def block_devices(path):
    return path.startswith("/dev/")


# -- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings_gb, machinetype_gb, expected", [
    (None, None, None), (0, None, None), (50, None, 50), (None, 30, 30), (50, 30, 30),
    (20, 30, 20)])
def test_disk_size_per_processor_is_the_smaller_of_the_two(settings_gb, machinetype_gb, expected):
    machinetype = Machinetype(name="cms", disk_gb_per_processor=machinetype_gb)
    assert disks.disk_gb_per_processor(settings(disk_gb_per_processor=settings_gb),
                                       machinetype) == expected


def test_file_root_disk_defaults_to_40_gb_per_processor():
    assert disks.file_disk_bytes(settings(), Machinetype(name="cms"), 2) == 80 * GB
    assert disks.file_disk_bytes(settings(disk_gb_per_processor=1.5), Machinetype(name="cms"),
                                 2) == 3 * GB


def test_volume_size_with_a_per_processor_size_is_whole_extents():
    size = disks.logical_volume_bytes(2.5, 3, 8, 100 * GB, 4 << 20, {}, "factory.example.org")
    assert size == 7_499_415_552 and size % (4 << 20) == 0 and size <= 7.5 * GB


def test_volume_size_is_a_share_of_what_other_volumes_leave():
    volumes = {"factory-00.example.org": 10 * GB, "factory-123.example.org": 10 * GB,
               "root": 20 * GB, "factory-1.example.org": 4 * GB}
    size = disks.logical_volume_bytes(None, 2, 8, 100 * GB, 1 << 20, volumes,
                                      "factory.example.org")
    # vac's own volumes (two or more digits) are part of the share; others are subtracted
    assert size == (2 * (100 - 24) * GB // 8) // (1 << 20) * (1 << 20)


def test_volume_too_small_for_an_extent_is_refused():
    with pytest.raises(DiskError, match="no room"):
        disks.logical_volume_bytes(None, 1, 8, 4 << 20, 4 << 20, {}, "f.example.org")


@pytest.mark.parametrize("name, ours", [
    ("factory-00.example.org", True), ("factory-7000.example.org", True),
    ("factory-0.example.org", False), ("factory-00.example.com", False),
    ("factoryX00.example.org", False), ("other-00.example.org", False),
    ("vac-scratch-0b3c9a4e-2f1d-4c6e-9a8b-7d6e5f4a3b2c", True),
    ("vac-scratch-home", False)])
def test_vac_volumes_are_recognised_by_name(name, ours):
    assert disks.is_vac_volume(name, "factory.example.org") is ours


# -- files ---------------------------------------------------------------------------------------


def test_sparse_file_allocates_nothing(tmp_path):
    path = tmp_path / "root.raw"
    path.write_bytes(b"leftover")
    disks.create_sparse_file(str(path), 5 * GB)
    info = path.stat()
    assert info.st_size == 5 * GB and info.st_blocks == 0
    assert stat.S_IMODE(info.st_mode) == 0o600


def test_sparse_file_errors_are_disk_errors(tmp_path):
    with pytest.raises(DiskError, match="not positive"):
        disks.create_sparse_file(str(tmp_path / "x"), 0)
    with pytest.raises(DiskError, match="cannot create sparse file"):
        disks.create_sparse_file(str(tmp_path / "missing" / "x"), GB)


@pytest.fixture
def raw_image(tmp_path):
    path = tmp_path / "image.raw"
    path.write_bytes(b"\0" * 65536)
    return str(path)


def qemu_img_info(path):
    return json.loads(run_command(["qemu-img", "info", "--output=json", path]))


def test_overlay_is_a_qcow2_over_the_image(tmp_path, raw_image):
    overlay = str(tmp_path / "root.qcow2")
    assert disks.image_format(raw_image) == "raw"
    disks.create_overlay(overlay, raw_image, "raw")
    info = qemu_img_info(overlay)
    assert (info["format"], info["backing-filename"], info["backing-filename-format"]) == \
        ("qcow2", raw_image, "raw")


def test_images_with_their_own_backing_file_are_refused(tmp_path, raw_image):
    chained = str(tmp_path / "chained.qcow2")
    disks.create_overlay(chained, raw_image, "raw")
    with pytest.raises(DiskError, match="has a backing file"):
        disks.image_format(chained)


def test_unsupported_or_unreadable_images_are_refused(tmp_path):
    vmdk = str(tmp_path / "image.vmdk")
    run_command(["qemu-img", "create", "-q", "-f", "vmdk", vmdk, "1M"])
    with pytest.raises(DiskError, match="format 'vmdk'"):
        disks.image_format(vmdk)
    with pytest.raises(DiskError, match="cannot read image"):
        disks.image_format(str(tmp_path / "missing.img"))


# -- logical volumes -----------------------------------------------------------------------------


def test_logical_volume_replaces_a_leftover(tmp_path):
    lvm = FakeLvm({"factory-03.example.org": GB})
    device = disks.create_logical_volume("vg0", "factory-03.example.org", 2 * GB, lvm,
                                         block_devices)
    assert device == "/dev/vg0/factory-03.example.org"
    assert lvm.commands() == [
        ["lvremove", "-f", "vg0/factory-03.example.org"],
        ["lvcreate", "--yes", "--name", "factory-03.example.org", "-L", f"{2 * GB}B", "vg0"]]


def test_logical_volume_must_appear_as_a_block_device():
    with pytest.raises(DiskError, match="not a block device"):
        disks.create_logical_volume("vg0", "factory-03.example.org", GB, FakeLvm(),
                                    lambda path: False)


def test_removing_a_missing_volume_does_nothing():
    lvm = FakeLvm({"root": GB})
    disks.remove_logical_volume("vg0", "factory-03.example.org", lvm)
    assert lvm.commands() == []
    assert lvm.calls == [["lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator",
                          ",", "-o", "lv_name,lv_size", "vg0"]]


@pytest.mark.parametrize("group, name", [("vg0", "-rf"), ("vg 0", "a"), ("vg0", "a/b"),
                                         ("--yes", "a"), ("vg0", "..")])
def test_names_lvm_would_misread_are_refused(group, name):
    lvm = FakeLvm()
    with pytest.raises(DiskError, match="not a valid LVM"):
        disks.remove_logical_volume(group, name, lvm)
    assert lvm.calls == []


def test_lvm_failures_become_disk_errors():
    def failing(argv):
        raise CommandError("lvs: Volume group \"vg0\" not found")

    with pytest.raises(DiskError, match="not found"):
        disks.logical_volumes("vg0", failing)


# -- a machine's disks ---------------------------------------------------------------------------


def test_cernvm_gets_a_sparse_root_file_and_the_iso(tmp_path):
    iso = tmp_path / "cernvm.iso"
    iso.write_bytes(b"iso")
    disk_dir = tmp_path / "machine" / "disks"
    result = disks.prepare_disks(settings(disk_gb_per_processor=3), Machinetype(name="cms"),
                                 MACHINE, str(disk_dir), str(iso))
    root_file = str(disk_dir / "root.raw")
    assert result == (DiskSpec("vda", root_file),
                      DiskSpec("hdc", str(iso), device="cdrom", bus="ide", readonly=True))
    assert os.stat(root_file).st_size == 6 * GB
    assert stat.S_IMODE(disk_dir.stat().st_mode) == 0o711
    disks.release_disks(settings(), MACHINE, str(disk_dir))
    assert not disk_dir.exists()
    disks.release_disks(settings(), MACHINE, str(disk_dir))  # idempotent


def test_cernvm4_with_a_volume_group_uses_the_volume_as_root(tmp_path):
    iso = tmp_path / "cernvm.iso"
    iso.write_bytes(b"iso")
    lvm = FakeLvm()
    machinetype = Machinetype(name="cms", machine_model="cernvm4", root_device="sda")
    result = disks.prepare_disks(settings(volume_group="vg0"), machinetype, MACHINE,
                                 str(tmp_path / "disks"), str(iso), lvm, block_devices)
    assert result[0] == DiskSpec("sda", "/dev/vg0/factory-03.example.org", source_type="block",
                                 bus="ide")
    assert lvm.commands() == [["lvcreate", "--yes", "--name", "factory-03.example.org", "-L",
                               f"{25 * GB // (4 << 20) * (4 << 20)}B", "vg0"]]  # 2/8 of 100 GB
    assert not (tmp_path / "disks" / "root.raw").exists()
    disks.release_disks(settings(volume_group="vg0"), MACHINE, str(tmp_path / "disks"), lvm)
    disks.release_disks(settings(volume_group="vg0"), MACHINE, str(tmp_path / "disks"), lvm)
    assert lvm.commands()[1:] == [["lvremove", "-f", "vg0/factory-03.example.org"]]


def test_vm_raw_gets_an_overlay_and_the_volume_as_scratch(tmp_path, raw_image):
    lvm = FakeLvm()

    def runner(argv):  # qemu-img for real, LVM recorded
        return run_command(argv) if argv[0] == "qemu-img" else lvm(argv)

    machinetype = Machinetype(name="cms", machine_model="vm-raw", disk_gb_per_processor=10)
    result = disks.prepare_disks(settings(volume_group="vg0"), machinetype, MACHINE,
                                 str(tmp_path / "disks"), raw_image, runner, block_devices)
    overlay = str(tmp_path / "disks" / "root.qcow2")
    assert result == (DiskSpec("vda", overlay, format="qcow2"),
                      DiskSpec("vdb", "/dev/vg0/factory-03.example.org", source_type="block"))
    assert qemu_img_info(overlay)["backing-filename"] == raw_image
    assert lvm.commands()[0][-2:] == [f"{20 * GB // (4 << 20) * (4 << 20)}B", "vg0"]


def test_direct_kernel_boot_needs_no_iso(tmp_path):
    result = disks.prepare_disks(settings(kernel="/guest/vmlinuz"), Machinetype(name="cms"),
                                 MACHINE, str(tmp_path / "disks"), None)
    assert [disk.target for disk in result] == ["vda"]


@pytest.mark.parametrize("model, image, message", [
    ("vm-raw", None, "needs a root_image"),
    ("cernvm3", None, "needs a root_image"),
    ("vm-raw", "relative.img", "not an absolute path"),
    ("vm-raw", "json:{\"file.filename\":\"/etc/shadow\"}", "not an absolute path"),
    ("cernvm3", "/nonexistent/cernvm.iso", "not an absolute path to a file"),
    ("docker", "/x", "unknown machine model"),
])
def test_bad_images_and_models_are_refused(tmp_path, model, image, message):
    with pytest.raises(DiskError, match=message):
        disks.prepare_disks(settings(), Machinetype(name="cms", machine_model=model), MACHINE,
                            str(tmp_path / "disks"), image)
