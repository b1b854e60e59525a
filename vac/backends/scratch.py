"""A container machine's scratch disk: an ext4 file system of a bounded size on its ``mnt/``.

With ``disk_gb_per_processor`` set (the smaller of the machinetype's and the settings' value, as
for VMs), ``create_scratch`` makes a file system of that × processors GB and mounts it on the
machine's scratch directory, so the payload's /tmp, /var/tmp and tmp_binds share that limit:

* ``volume_group`` set: a logical volume ``vac-scratch-<uuid>`` in it (vac.backends.vm.disks);
* otherwise a sparse file ``disks/vac-scratch-<uuid>.ext4`` in the machine directory, mounted
  through a loop device (``mount -o loop``).

Nothing is remembered in memory: ``release_scratch`` finds everything from the machine's UUID,
the names above and the kernel's own tables (``/proc/self/mountinfo``, the loop devices'
``backing_file`` in sysfs), so a restarted vacd, or one cleaning up a zombie whose directory it
does not know, releases it the same way. A mount that stays busy is left mounted and reported
(the daemon retries the finish); nothing below a mount point is ever deleted. Unset or 0 keeps
the plain, unlimited directory.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

from vac.backends.base import BackendError
from vac.backends.commands import CommandError, CommandRunner, run_command
from vac.backends.vm import disks
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

log = logging.getLogger(__name__)

NAME_PREFIX = disks.SCRATCH_VOLUME_PREFIX
FILE_SUFFIX = ".ext4"
FILE_DIR = "disks"
MOUNTINFO = "/proc/self/mountinfo"
SYS_BLOCK = "/sys/block"
# Options of every scratch mount: no device files or set-uid programs from the payload's disk.
MOUNT_OPTIONS = "nodev,nosuid"
UMOUNT_ATTEMPTS = 3
UMOUNT_DELAY_SECONDS = 1.0
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def scratch_name(uuid: str) -> str:
    """The LV name and file stem of a machine's scratch disk (unique per machine, so a zombie's
    disk never collides with the next machine in its slot). A UUID that could name anything
    else (a zombie's label is not vac's to trust) is refused."""
    if not disks.is_machine_uuid(uuid):
        raise BackendError(f"{uuid!r} is not a machine UUID")
    return NAME_PREFIX + uuid


def scratch_file(directory: Path, uuid: str) -> Path:
    return directory / FILE_DIR / (scratch_name(uuid) + FILE_SUFFIX)


def mkfs_argv(device: str) -> list[str]:
    """ext4 on the whole device or file; ``-m 0`` because the payload (not root, for apptainer)
    should get all of the size it was given; ``nodiscard`` because the blocks are new."""
    return ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", device]


def mount_argv(source: str, mount_point: Path, loop: bool) -> list[str]:
    options = ("loop," if loop else "") + MOUNT_OPTIONS
    return ["mount", "-t", "ext4", "-o", options, source, str(mount_point)]


# -- the kernel's tables -----------------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(major:minor, mount point) of every line of a mountinfo file (proc(5))."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) >= 5:
            mounts.append((fields[2], _unescape(fields[4])))
    return mounts


def mounts(mountinfo: str = MOUNTINFO) -> list[tuple[str, str]]:
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            return parse_mountinfo(handle.read())
    except OSError as error:
        raise BackendError(f"cannot read {mountinfo}: {error}") from error


def mounted_under(path: Path, mountinfo: str = MOUNTINFO) -> list[str]:
    """Mount points at or below ``path`` (before anything there is deleted)."""
    top = os.path.realpath(path)
    return [point for _, point in mounts(mountinfo)
            if point == top or point.startswith(top.rstrip("/") + "/")]


def loop_devices(name: str, sys_block: str = SYS_BLOCK) -> dict[str, tuple[str, str]]:
    """Loop devices whose backing file is called ``name``: {device: (major:minor, file)}."""
    found = {}
    try:
        entries = sorted(os.listdir(sys_block))
    except OSError as error:
        raise BackendError(f"cannot list {sys_block}: {error}") from error
    for entry in entries:
        if not entry.startswith("loop"):
            continue
        base = os.path.join(sys_block, entry)
        try:
            with open(os.path.join(base, "loop", "backing_file"), encoding="utf-8") as handle:
                backing = handle.read().rstrip("\n")
            with open(os.path.join(base, "dev"), encoding="ascii") as handle:
                number = handle.read().strip()
        except OSError:
            continue  # not attached, or detached meanwhile
        path = backing[:-len(" (deleted)")] if backing.endswith(" (deleted)") else backing
        if os.path.basename(path) == name:
            found["/dev/" + entry] = (number, path)
    return found


def _device_number(path: str) -> Optional[str]:
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return None
    return f"{os.major(rdev)}:{os.minor(rdev)}"


# -- creating ----------------------------------------------------------------------------------


def create_scratch(settings: Settings, machinetype: Machinetype, machine: Machine,
                   directory: Path, mount_point: Path,
                   runner: CommandRunner = run_command) -> bool:
    """Make and mount ``machine``'s scratch disk on ``mount_point`` (made if missing; its root
    0755, owned by root: a backend chowns it for its user). False, doing nothing, without a
    size. On failure whatever was made is released again and BackendError raised."""
    gb = disks.disk_gb_per_processor(settings, machinetype)
    if not gb:
        return False
    processors = machine.processors
    try:
        mount_point.mkdir(mode=0o755, exist_ok=True)
        if settings.volume_group:
            vg_size, extent = disks.volume_group_size(settings.volume_group, runner)
            size = disks.sized_volume_bytes(gb, processors, vg_size, extent)
            source = disks.create_logical_volume(settings.volume_group,
                                                 scratch_name(machine.uuid), size, runner)
        else:
            path = scratch_file(directory, machine.uuid)
            path.parent.mkdir(exist_ok=True)
            disks.create_sparse_file(str(path), int(gb * processors * disks.GB))
            source = str(path)
        runner(mkfs_argv(source))
        runner(mount_argv(source, mount_point, loop=not settings.volume_group))
        os.chmod(mount_point, 0o755)
    except (disks.DiskError, CommandError, OSError) as error:
        try:
            release_scratch(machine.uuid, settings.volume_group, directory, mount_point, runner)
        except BackendError as cleanup:
            log.error("cannot clean up the failed scratch disk of %s: %s", machine.name, cleanup)
        raise BackendError(f"{machine.name}: cannot make its scratch disk: {error}") from error
    return True


# -- releasing ---------------------------------------------------------------------------------


def _unmount(points: list[str], runner: CommandRunner, attempts: int, delay: float,
             still_mounted: Callable[[str], bool]) -> None:
    for point in sorted(set(points), key=len, reverse=True):  # deepest first
        problem = ""
        for attempt in range(attempts):
            try:
                runner(["umount", point])
            except CommandError as error:
                problem = str(error)
            if not still_mounted(point):
                break
            if attempt + 1 < attempts:
                time.sleep(delay)
        else:
            raise BackendError(f"scratch disk still mounted on {point} after {attempts} "
                               f"attempts ({problem or 'unknown reason'}); left for the next try")


def release_scratch(uuid: str, volume_group: Optional[str], directory: Optional[Path] = None,
                    mount_point: Optional[Path] = None, runner: CommandRunner = run_command,
                    attempts: int = UMOUNT_ATTEMPTS, delay: float = UMOUNT_DELAY_SECONDS,
                    mountinfo: str = MOUNTINFO, sys_block: str = SYS_BLOCK) -> None:
    """Unmount, detach and remove the scratch disk of machine ``uuid``. Idempotent.

    Found by name alone (a zombie's: its loop device's backing file, its LV); with the machine's
    ``directory`` and ``mount_point`` also a file no longer attached (after a reboot) and any
    mount left on the mount point. BackendError if anything stays (a busy mount: retried
    ``attempts`` times first); the file and LV are removed only once nothing mounts them.
    """
    name = scratch_name(uuid)
    loops = loop_devices(name + FILE_SUFFIX, sys_block)
    lv_path = f"/dev/{volume_group}/{name}" if volume_group else None
    numbers = {number for number, _ in loops.values()}
    lv_number = _device_number(lv_path) if lv_path else None
    if lv_number:
        numbers.add(lv_number)

    def ours() -> list[str]:
        points = [point for number, point in mounts(mountinfo) if number in numbers]
        if mount_point is not None:
            points += mounted_under(mount_point, mountinfo)
        return points

    _unmount(ours(), runner, attempts, delay, lambda point: point in ours())
    for device in loops:
        # ``mount -o loop`` sets autoclear: the kernel usually detached it at the unmount.
        if device in loop_devices(name + FILE_SUFFIX, sys_block):
            try:
                runner(["losetup", "--detach", device])
            except CommandError as error:
                if device in loop_devices(name + FILE_SUFFIX, sys_block):
                    raise BackendError(f"cannot detach {device} of {uuid}: {error}") from error
    files = {path for _, path in loops.values()}
    if directory is not None:
        files.add(str(scratch_file(directory, uuid)))
    for path in files:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise BackendError(f"cannot remove the scratch file {path}: {error}") from error
    if volume_group:
        try:
            disks.remove_logical_volume(volume_group, name, runner)
        except disks.DiskError as error:
            raise BackendError(f"cannot remove the scratch volume of {uuid}: {error}") from error
