"""What the container backends share: model names, commands, the scratch area, running tools.

A container machine's directory is prepared by the daemon exactly as for a VM (machinefeatures/,
jobfeatures/, joboutputs/, user_data); the backends add ``mnt/``, the machine's scratch space
(a size-limited disk mounted there with disk_gb_per_processor, vac.backends.scratch), which holds
the writable directories bound into the container and is removed by ``release``.
``ReleasedWithScratch`` is how both backends end a machine and read its CPU time.
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import shutil
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from vac.backends import scratch as scratch_disk
from vac.backends.base import BackendError
from vac.backends.commands import CommandError, run_command
from vac.backends.container.cgroups import CgroupError
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

log = logging.getLogger(__name__)

DEFAULT_CONTAINER_COMMAND = "/user_data"
DOCKER_IMAGE_PREFIX = "docker://"
SCRATCH_DIR = "mnt"
UUID_LABEL = "vac.machine_uuid"
FACTORY_LABEL = "vac.factory"
# Ceilings for the container's RLIMIT_NOFILE/NPROC when vacd's hard limit is unlimited:
# the kernel's default nr_open, and the largest pid_max.
MAX_NOFILE = 1 << 20
MAX_NPROC = 1 << 22
PID_MAX_PATH = "/proc/sys/kernel/pid_max"


def command_argv(text: Optional[str]) -> list[str]:
    """``container_command`` as an argv: split into words like a shell would (quotes allowed),
    never run through one. Classic Vac gave it to a shell, unquoted (CONTAINERS.md §7 #1)."""
    try:
        words = shlex.split(text if text is not None else DEFAULT_CONTAINER_COMMAND)
    except ValueError as error:
        raise BackendError(f"container_command {text!r}: {error}") from None
    if not words:
        raise BackendError("container_command is empty")
    return words


def engine_image(root_image: Optional[str]) -> str:
    """The engine's image name from ``root_image = docker://NAME`` (the classic spelling)."""
    if not root_image or not root_image.startswith(DOCKER_IMAGE_PREFIX):
        raise BackendError(f"root_image {root_image!r} must be docker://IMAGE for this model")
    name = root_image[len(DOCKER_IMAGE_PREFIX):]
    if not name or name.startswith("-") or any(c.isspace() for c in name):
        raise BackendError(f"root_image {root_image!r} does not name an image")
    return name


def bind_directory_name(container_path: str) -> str:
    """A unique, flat host directory name for one ``tmp_binds`` path (``/a/b`` -> ``%2Fa%2Fb``)."""
    return urllib.parse.quote(container_path, safe="")


def clamp_limit(hard: int, ceiling: int) -> int:
    """A resource limit no higher than ``hard`` (engines and sandboxes refuse to raise it)."""
    if hard == resource.RLIM_INFINITY or hard < 0:
        return ceiling
    return min(hard, ceiling)


def process_ulimits(pid_max_path: str = PID_MAX_PATH) -> tuple[int, int]:
    """(nofile, nproc) for containers: this process's hard limits, within sane ceilings.

    nproc is also kept within ``kernel.pid_max``: more processes cannot exist, and podman's
    runtime on a sandboxed host was refused any RLIMIT_NPROC above it although vacd's hard
    limit was higher.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    try:
        pid_max = int(Path(pid_max_path).read_text(encoding="ascii"))
    except (OSError, ValueError):
        pid_max = MAX_NPROC
    return clamp_limit(nofile, MAX_NOFILE), clamp_limit(nproc, min(MAX_NPROC, pid_max))


def prepare_scratch(directory: Path, subdirectories: Sequence[str], machine: Machine,
                    machinetype: Machinetype, settings: Settings) -> Path:
    """Make ``directory/mnt``, with the machine's scratch disk mounted on it when
    disk_gb_per_processor is set (vac.backends.scratch), and the given subdirectories in it
    (fresh, 0755); return ``mnt``. What a later failure leaves is for ``remove_scratch``."""
    scratch = directory / SCRATCH_DIR
    scratch_disk.create_scratch(settings, machinetype, machine, directory, scratch)
    try:
        scratch.mkdir(mode=0o755, exist_ok=True)
        for name in subdirectories:
            path = scratch / name
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(path, 0o755)
    except OSError as error:
        raise BackendError(f"cannot make scratch directories in {scratch}: {error}") from error
    return scratch


def remove_scratch(directory: Path, uuid: str, volume_group: Optional[str]) -> None:
    """Release the machine's scratch disk, then remove ``directory/mnt`` and everything the
    machine left there; never while anything is still mounted there. Idempotent."""
    scratch_disk.release_scratch(uuid, volume_group, directory, directory / SCRATCH_DIR)
    still = scratch_disk.mounted_under(directory / SCRATCH_DIR)
    if still:
        raise BackendError(f"{directory / SCRATCH_DIR} is still mounted on {still[0]}: "
                           "not removed")
    try:
        shutil.rmtree(directory / SCRATCH_DIR)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise BackendError(f"cannot remove {directory / SCRATCH_DIR}: {error}") from error


class ReleasedWithScratch:
    """What the container backends do with a machine vacd is done with: ``_discard`` removes
    the container or processes and the cgroup (with it the CPU total); then ``release`` removes
    the scratch space from the machine's directory, while ``forget`` (a zombie, whose directory
    is not known) finds its scratch disk by the UUID alone. Each releases the disk once."""

    volume_group: Optional[str]  # where a zombie's scratch volume is (a restart option)

    def _discard(self, uuid: str) -> None:
        raise NotImplementedError

    def _cgroup_cpu_seconds(self, uuid: str) -> Optional[float]:
        """The machine's CPU time from its cgroup; CgroupError if it cannot be read."""
        raise NotImplementedError

    def cpu_seconds(self, uuid: str) -> Optional[float]:
        try:
            return self._cgroup_cpu_seconds(uuid)
        except CgroupError as error:
            log.warning("CPU time of %s unknown: %s", uuid, error)
            return None

    def release(self, machine: Machine, settings: Settings, directory: Path) -> None:
        """Remove the container or processes, the cgroup and the scratch space. Idempotent;
        the daemon reads ``cpu_seconds`` for accounting before it calls this."""
        self._discard(machine.uuid)
        remove_scratch(directory, machine.uuid, settings.volume_group)

    def forget(self, uuid: str) -> None:
        """Remove the container or processes, the cgroup and the scratch disk of a zombie."""
        self._discard(uuid)
        scratch_disk.release_scratch(uuid, self.volume_group)


def executable_user_data(directory: Path) -> Path:
    """Make ``user_data`` executable by its owner only, so the default command can run it
    without showing a proxy key it may hold to anyone else (classic: 0755, §7 #9)."""
    path = directory / "user_data"
    try:
        os.chmod(path, 0o700)
    except OSError as error:
        raise BackendError(f"user_data of the machine is not usable: {error}") from error
    return path


def cvmfs_paths(cvmfs_root: str, repositories: Sequence[str]) -> list[str]:
    """The host paths of ``cvmfs_repositories``; listing each one mounts it if autofs manages
    /cvmfs. A repository that is not there is an error: the payload cannot run without it."""
    paths = []
    for repository in repositories:
        path = os.path.join(cvmfs_root, repository)
        try:
            os.listdir(path)
        except OSError as error:
            raise BackendError(f"CernVM-FS repository {repository} is not available at {path}: "
                               f"{error.strerror or error}") from error
        paths.append(path)
    return paths


def run(argv: Sequence[str], timeout: float = 60.0) -> str:
    """``vac.backends.commands.run_command`` with its failure as the seam's BackendError."""
    try:
        return run_command(argv, timeout)
    except CommandError as error:
        raise BackendError(str(error)) from error
