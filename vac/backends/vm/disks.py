"""A machine's disks: sparse files, qcow2 overlays and LVM logical volumes (REFERENCE.md §6.4-6.5).

``prepare_disks`` makes the disks of one machine and returns them as ``DiskSpec`` objects for its
domain; ``release_disks`` removes them again and is idempotent, so it may run after a partial
``prepare_disks``, after a crash, or twice. Host tools run from argv lists, never a shell, through
an injectable runner (tests record the LVM commands instead of running them).

Files live in the machine's disk directory; QEMU runs as an unprivileged user and opens them by
path, so every directory above them must be searchable by that user (the disk directory itself
is made 0711).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from typing import Callable, Optional

from vac.backends.commands import CommandError, CommandRunner, run_command
from vac.backends.vm.domain import DiskSpec
from vac.core.config import MACHINE_MODELS, Machinetype, Settings
from vac.core.model import Machine

GB = 10**9  # disk sizes are decimal GB, as in classic Vac
DEFAULT_FILE_GB_PER_PROCESSOR = 40.0
CDROM_TARGET = "hdc"
ROOT_FILE = "root.raw"
OVERLAY_FILE = "root.qcow2"
IMAGE_FORMATS = ("raw", "qcow2")
# LVM's own rule for VG and LV names (lvm(8) "VALID NAMES"), minus a leading hyphen.
_LVM_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")


class DiskError(Exception):
    """A disk could not be made or removed; the message says which and why."""


def bus_for_target(target: str) -> str:
    """virtio for ``vd*`` targets, IDE otherwise (the classic rule)."""
    return "virtio" if "vd" in target else "ide"


def disk_gb_per_processor(settings: Settings, machinetype: Machinetype) -> Optional[float]:
    """The machinetype's value unless the settings' is smaller; None if neither is set (or 0)."""
    values = [value for value in (machinetype.disk_gb_per_processor,
                                  settings.disk_gb_per_processor) if value]
    return min(values) if values else None


def file_disk_bytes(settings: Settings, machinetype: Machinetype, processors: int) -> int:
    """Size of a sparse root disk file: GB per processor (default 40) × processors."""
    gb = disk_gb_per_processor(settings, machinetype) or DEFAULT_FILE_GB_PER_PROCESSOR
    return int(gb * processors * GB)


# -- files ---------------------------------------------------------------------------------------


def create_sparse_file(path: str, size_bytes: int) -> None:
    """A sparse file of ``size_bytes`` (no blocks allocated); replaces a leftover one."""
    if size_bytes <= 0:
        raise DiskError(f"cannot create {path}: size {size_bytes} is not positive")
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(descriptor, 0o600)  # also when replacing a leftover
            os.ftruncate(descriptor, size_bytes)
        finally:
            os.close(descriptor)
    except OSError as error:
        raise DiskError(f"cannot create sparse file {path}: {error}") from error


def image_format(image: str, runner: CommandRunner = run_command) -> str:
    """The format of ``image`` (raw or qcow2), as qemu-img sees it.

    An image that itself has a backing file is refused: it could point the machine at any file
    on the host.
    """
    try:
        info = json.loads(runner(["qemu-img", "info", "--output=json", image]))
    except CommandError as error:
        raise DiskError(f"cannot read image {image}: {error}") from error
    except ValueError as error:
        raise DiskError(f"qemu-img gave unreadable information on {image}: {error}") from error
    found = info.get("format")
    if found not in IMAGE_FORMATS:
        raise DiskError(f"image {image} has format {found!r}; "
                        f"supported: {', '.join(IMAGE_FORMATS)}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise DiskError(f"image {image} has a backing file; refusing it")
    return found


def create_overlay(path: str, image: str, backing_format: str,
                   runner: CommandRunner = run_command) -> None:
    """A qcow2 copy-on-write overlay at ``path`` over ``image`` (which is never written)."""
    try:
        runner(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", image,
                path])
    except CommandError as error:
        raise DiskError(f"cannot create overlay {path} over {image}: {error}") from error


# -- logical volumes -----------------------------------------------------------------------------


def _check_lvm_name(kind: str, name: str) -> None:
    if not _LVM_NAME.match(name) or name in (".", ".."):
        raise DiskError(f"{name!r} is not a valid LVM {kind} name")


def _lvm(runner: CommandRunner, argv: list) -> str:
    try:
        return runner(argv)
    except CommandError as error:
        raise DiskError(str(error)) from error


def logical_volumes(volume_group: str, runner: CommandRunner = run_command) -> dict:
    """Names and sizes in bytes of the logical volumes in ``volume_group``."""
    _check_lvm_name("volume group", volume_group)
    output = _lvm(runner, ["lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ",",
                           "-o", "lv_name,lv_size", volume_group])
    volumes = {}
    for line in output.splitlines():
        if line.strip():
            name, _, size = line.strip().partition(",")
            volumes[name] = int(size)
    return volumes


def volume_group_size(volume_group: str, runner: CommandRunner = run_command) -> tuple:
    """(size, extent size) of ``volume_group`` in bytes."""
    _check_lvm_name("volume group", volume_group)
    output = _lvm(runner, ["vgs", "--noheadings", "--units", "b", "--nosuffix", "--separator", ",",
                           "-o", "vg_size,vg_extent_size", volume_group])
    try:
        size, extent = output.strip().split(",")
        return int(size), int(extent)
    except ValueError as error:
        raise DiskError(f"vgs gave unreadable sizes for {volume_group}: {output!r}") from error


# Container scratch volumes (vac.backends.scratch) are named by their machine's UUID.
SCRATCH_VOLUME_PREFIX = "vac-scratch-"
_MACHINE_UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def is_machine_uuid(text: str) -> bool:
    """Whether ``text`` is a machine UUID as vac makes them (canonical, lower case): the one
    rule for scratch volume names, so that each one vac makes is recognised as vac's and no
    zombie's label can name anything else."""
    return _MACHINE_UUID.fullmatch(text) is not None


def is_vac_volume(volume: str, factory_name: str) -> bool:
    """Whether ``volume`` is one of this factory's: named like a machine (``host-NN.domain``)
    or a container's scratch volume."""
    if volume.startswith(SCRATCH_VOLUME_PREFIX) and is_machine_uuid(volume[len(SCRATCH_VOLUME_PREFIX):]):
        return True
    host, dot, domain = factory_name.partition(".")
    pattern = re.escape(host) + r"-[0-9]{2,}" + (r"\." + re.escape(domain) if dot else "")
    return re.fullmatch(pattern, volume) is not None


def logical_volume_bytes(gb_per_processor: Optional[float], processors: int,
                         total_processors: int, vg_size: int, extent_size: int,
                         volumes: dict, factory_name: str) -> int:
    """Size of a machine's logical volume (REFERENCE.md §6.5), a whole number of extents.

    With a per-processor size: that × processors. Otherwise the machine's processor share of the
    volume group minus the space other (non-vac) volumes take.
    """
    if gb_per_processor:
        return sized_volume_bytes(gb_per_processor, processors, vg_size, extent_size)
    foreign = sum(size for name, size in volumes.items() if not is_vac_volume(name, factory_name))
    return _whole_extents(processors * (vg_size - foreign) // max(total_processors, 1),
                          processors, vg_size, extent_size)


def sized_volume_bytes(gb_per_processor: float, processors: int, vg_size: int,
                       extent_size: int) -> int:
    """``gb_per_processor`` × processors GB, a whole number of extents."""
    return _whole_extents(int(gb_per_processor * processors * GB), processors, vg_size,
                          extent_size)


def _whole_extents(size: int, processors: int, vg_size: int, extent_size: int) -> int:
    size -= size % extent_size
    if size <= 0:
        raise DiskError(f"no room for a logical volume of {processors} processors "
                        f"(volume group {vg_size} B, extent {extent_size} B)")
    return size


def create_logical_volume(volume_group: str, name: str, size_bytes: int,
                          runner: CommandRunner = run_command,
                          is_block_device: Optional[Callable[[str], bool]] = None) -> str:
    """Create ``volume_group/name`` (removing a leftover of that name) and return its device."""
    _check_lvm_name("logical volume", name)
    remove_logical_volume(volume_group, name, runner)
    _lvm(runner, ["lvcreate", "--yes", "--name", name, "-L", f"{size_bytes}B", volume_group])
    device = f"/dev/{volume_group}/{name}"
    if not (is_block_device or _is_block_device)(device):
        raise DiskError(f"lvcreate succeeded but {device} is not a block device")
    return device


def remove_logical_volume(volume_group: str, name: str,
                          runner: CommandRunner = run_command) -> None:
    """Remove ``volume_group/name`` if it exists."""
    _check_lvm_name("logical volume", name)
    if name in logical_volumes(volume_group, runner):
        _lvm(runner, ["lvremove", "-f", f"{volume_group}/{name}"])


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


# -- a machine's disks ---------------------------------------------------------------------------


def _check_image(image: Optional[str], model: str) -> str:
    # Absolute paths only: qemu-img and QEMU read "protocol:" names (json:, nbd: ...) as
    # instructions, and a name from a remote pipe must never be one.
    if image is None:
        raise DiskError(f"machine model {model} needs a root_image")
    if not os.path.isabs(image) or not os.path.isfile(image):
        raise DiskError(f"root image {image!r} is not an absolute path to a file")
    return image


def prepare_disks(settings: Settings, machinetype: Machinetype, machine: Machine,
                  disk_dir: str, image: Optional[str], runner: CommandRunner = run_command,
                  is_block_device: Optional[Callable[[str], bool]] = None) -> tuple:
    """Make ``machine``'s disks and return their ``DiskSpec`` objects, root disk first.

    * cernvm3/cernvm4: ``image`` (an ISO) as a read-only CD-ROM on hdc, and a blank root disk on
      ``root_device``: the machine's logical volume if ``volume_group`` is set, else a sparse
      file. ``image`` may be None only for direct kernel boot (``Settings.kernel``).
    * vm-raw: a qcow2 overlay over ``image`` on ``root_device``, and the logical volume (if
      any) as a scratch disk on ``scratch_device``.

    On failure, whatever was made is left for ``release_disks``.
    """
    model = machinetype.machine_model
    if model not in MACHINE_MODELS:
        raise DiskError(f"unknown machine model {model!r}")
    os.makedirs(disk_dir, exist_ok=True)
    os.chmod(disk_dir, 0o711)  # QEMU's user opens the files by path
    volume = None
    if settings.volume_group:
        size = logical_volume_size(settings, machinetype, machine, runner)
        volume = create_logical_volume(settings.volume_group, machine.name, size, runner,
                                       is_block_device)
    root_target = machinetype.root_device
    if model == "vm-raw":
        image = _check_image(image, model)
        overlay = os.path.join(disk_dir, OVERLAY_FILE)
        create_overlay(overlay, image, image_format(image, runner), runner)
        disks = [DiskSpec(root_target, overlay, format="qcow2", bus=bus_for_target(root_target))]
        if volume:
            scratch = machinetype.scratch_device
            disks.append(DiskSpec(scratch, volume, source_type="block",
                                  bus=bus_for_target(scratch)))
        return tuple(disks)
    if volume:
        root = DiskSpec(root_target, volume, source_type="block", bus=bus_for_target(root_target))
    else:
        path = os.path.join(disk_dir, ROOT_FILE)
        create_sparse_file(path, file_disk_bytes(settings, machinetype, machine.processors))
        root = DiskSpec(root_target, path, bus=bus_for_target(root_target))
    if image is None and settings.kernel:
        return (root,)
    cdrom = DiskSpec(CDROM_TARGET, _check_image(image, model), device="cdrom",
                     bus=bus_for_target(CDROM_TARGET), readonly=True)
    return (root, cdrom)


def logical_volume_size(settings: Settings, machinetype: Machinetype, machine: Machine,
                        runner: CommandRunner = run_command) -> int:
    """The size ``machine``'s logical volume gets in ``settings.volume_group``."""
    volume_group = settings.volume_group or ""
    gb = disk_gb_per_processor(settings, machinetype)
    vg_size, extent = volume_group_size(volume_group, runner)
    volumes = {} if gb else logical_volumes(volume_group, runner)
    total = settings.total_processors or os.cpu_count() or 1
    return logical_volume_bytes(gb, machine.processors, total, vg_size, extent, volumes,
                                settings.factory_name)


def release_disks(settings: Settings, machine: Machine, disk_dir: str,
                  runner: CommandRunner = run_command) -> None:
    """Remove ``machine``'s logical volume (if any) and disk files. Idempotent."""
    if settings.volume_group:
        remove_logical_volume(settings.volume_group, machine.name, runner)
    try:
        shutil.rmtree(disk_dir)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise DiskError(f"cannot remove disk directory {disk_dir}: {error}") from error
