"""The ``singularity`` and ``apptainer`` machine models, run by apptainer (or singularity).

``apptainer_argv`` is the exact command (pure, golden-tested): ``exec --contain --cleanenv``
with the machine's scratch space as ``--workdir`` (the container's /tmp and /var/tmp), Machine/Job
Features read-only at /tmp/machinefeatures and /tmp/jobfeatures, joboutputs writable at
/tmp/joboutputs (the classic Vac 03 paths, CONTAINERS.md §2.3), user_data read-only at
/user_data, each ``cvmfs_repositories`` entry read-only, and the three MJF variables.

``ApptainerBackend`` runs it as ``singularity_user`` in a cgroup of its own,
``/vac/apptainer-<uuid>``, which is the machine's identity: its processes are the machine (stop
sends them SIGTERM, destroy SIGKILL), it is empty once the machine has ended, it keeps the CPU
total for accounting until ``release``, and after a vacd restart the cgroups found are the
machines to adopt. The child is started by a tiny shell that waits on a pipe until vacd has
moved it into the cgroup, so not even its first fork escapes accounting, and only then execs
the container (classic Vac did the move in a forked Python child; CONTAINERS.md §7 #2, #4).

There is no event stream for plain processes: one thread polls the cgroups' ``cgroup.procs``
files (cheap file reads, no process started) and calls ``on_stopped`` once for each machine
whose cgroup has emptied. Apptainer containers share the host's network, as classic Vac's did.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

from vac.backends.base import BackendError, BackendMachine, StoppedCallback
from vac.backends.container import common
from vac.backends.container.cgroups import CgroupError, Cgroups
from vac.core.config import APPTAINER_MODELS, Machinetype, Settings
from vac.core.model import Machine

log = logging.getLogger(__name__)

MIB = 1 << 20
MACHINEFEATURES_PATH = "/tmp/machinefeatures"  # noqa: S108 (container paths, classic)
JOBFEATURES_PATH = "/tmp/jobfeatures"  # noqa: S108
JOBOUTPUTS_PATH = "/tmp/joboutputs"  # noqa: S108
USER_DATA_PATH = "/user_data"
CGROUP_PREFIX = "apptainer-"
POLL_SECONDS = 0.5
KILL_ROUNDS = 20  # SIGKILL rounds while processes still fork


def find_binary() -> Optional[str]:
    """apptainer, or singularity where only that is installed (same CLI for what vac uses)."""
    return shutil.which("apptainer") or shutil.which("singularity")


def resolve_image(machinetype: Machinetype) -> str:
    """An absolute path (image file or directory tree, e.g. in /cvmfs) or a file name in the
    machinetype's files directory."""
    image = machinetype.root_image or ""
    if image.startswith(("http://", "https://", common.DOCKER_IMAGE_PREFIX)):
        raise BackendError(f"root_image {image!r}: machine model {machinetype.machine_model} "
                           "needs a local image file or directory")
    if not image.startswith("/"):
        image = os.path.join(machinetype.machinetype_path, "files", image)
    if not os.path.exists(image):
        raise BackendError(f"root_image {image} does not exist")
    return image


def apptainer_argv(binary: str, image: str, command: list[str], directory: Path,
                   cvmfs: list[str]) -> list[str]:
    """The exact argv that runs one machine's container."""
    argv = [binary, "exec", "--contain", "--cleanenv",
            "--workdir", str(directory / common.SCRATCH_DIR)]
    binds = [(directory / "machinefeatures", MACHINEFEATURES_PATH, "ro"),
             (directory / "jobfeatures", JOBFEATURES_PATH, "ro"),
             (directory / "joboutputs", JOBOUTPUTS_PATH, "rw"),
             (directory / "user_data", USER_DATA_PATH, "ro"),
             *((path, "/cvmfs/" + Path(path).name, "ro") for path in cvmfs)]
    for source, target, mode in binds:
        argv += ["--bind", f"{source}:{target}:{mode}"]
    for key, value in (("MACHINEFEATURES", MACHINEFEATURES_PATH), ("JOBFEATURES", JOBFEATURES_PATH),
                       ("JOBOUTPUTS", JOBOUTPUTS_PATH)):
        argv += ["--env", f"{key}={value}"]
    return argv + [image, *command]


def account(name: Optional[str]) -> pwd.struct_passwd:
    """``singularity_user``: it must exist and not be root (classic rule)."""
    if not name:
        raise BackendError("singularity_user is not set")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise BackendError(f"singularity_user {name!r} does not exist") from None
    if entry.pw_uid == 0:
        raise BackendError(f"singularity_user {name!r} is root")
    return entry


# The container is exec'd only once vacd has moved this shell into the machine's cgroup and
# written a line to its stdin; if vacd fails to, it closes the pipe unwritten and the shell exits.
_LAUNCHER = 'read -r go && [ "$go" = go ] && exec "$@"; exit 125'


class ApptainerBackend(common.ReleasedWithScratch):
    """Machines of the singularity/apptainer models as process trees in cgroups."""

    kind = "container"

    def __init__(self, on_stopped: StoppedCallback, *, singularity_user: Optional[str],
                 binary: Optional[str] = None, cgroup_root: str = "/vac",
                 cvmfs_root: str = "/cvmfs", cgroups: Optional[Cgroups] = None,
                 volume_group: Optional[str] = None):
        self.on_stopped = on_stopped
        self.singularity_user = singularity_user
        self.binary = binary
        self.cgroup_root = cgroup_root.rstrip("/")
        self.cvmfs_root = cvmfs_root
        self.cgroups = cgroups
        self.volume_group = volume_group
        self._children: dict[str, subprocess.Popen] = {}
        self._reported: set[str] = set()
        self._starting: set[str] = set()  # cgroup made, process not yet in it: not "ended"
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._monitor: Optional[threading.Thread] = None

    @classmethod
    def from_settings(cls, settings: Settings, on_stopped: StoppedCallback) -> ApptainerBackend:
        return cls(on_stopped, singularity_user=settings.singularity_user,
                   volume_group=settings.volume_group)

    def _path(self, uuid: str) -> str:
        return f"{self.cgroup_root}/{CGROUP_PREFIX}{uuid}"

    def connect(self) -> None:
        self.binary = self.binary or find_binary()
        if self.binary is None:
            raise BackendError("neither apptainer nor singularity is installed")
        account(self.singularity_user)
        self.cgroups = self.cgroups or Cgroups.detect()
        if self.cgroups is None:
            raise BackendError("no cgroup file system is mounted: apptainer machines cannot be "
                               "tracked")
        if self._monitor is None:
            self._closing.clear()
            self._monitor = threading.Thread(target=self._watch, name="apptainer-monitor",
                                             daemon=True)
            self._monitor.start()

    def close(self) -> None:
        self._closing.set()
        if self._monitor is not None:
            self._monitor.join(timeout=10.0)
            self._monitor = None

    def _cgroups(self) -> Cgroups:
        if self.cgroups is None:
            raise BackendError("the apptainer backend is not connected")
        return self.cgroups

    # -- watching --------------------------------------------------------------------------------

    def _uuids(self) -> list[str]:
        base = Path(self._cgroups().layout.cpu_root, self.cgroup_root.strip("/"))
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        except OSError as error:
            raise BackendError(f"cannot list {base}: {error}") from error
        return sorted(name[len(CGROUP_PREFIX):] for name in names if name.startswith(CGROUP_PREFIX))

    def _active(self, uuid: str) -> bool:
        with self._lock:
            child = self._children.get(uuid)
        if child is not None and child.poll() is not None:
            with self._lock:
                self._children.pop(uuid, None)  # reaped
        return bool(self._cgroups().procs(self._path(uuid)))

    def _watch(self) -> None:
        while not self._closing.is_set():
            try:
                for uuid in self._uuids():
                    with self._lock:
                        skip = uuid in self._reported or uuid in self._starting
                    if not skip and not self._active(uuid):
                        with self._lock:
                            self._reported.add(uuid)
                        self.on_stopped(uuid)
            except (BackendError, CgroupError) as error:
                log.warning("cannot check apptainer machines: %s", error)
            self._closing.wait(POLL_SECONDS)

    # -- machines --------------------------------------------------------------------------------

    def create(self, machine: Machine, machinetype: Machinetype, settings: Settings,
               directory: Path) -> None:
        if machinetype.machine_model not in APPTAINER_MODELS:
            raise BackendError(f"{machine.name}: machine model {machinetype.machine_model!r} is "
                               "not run by apptainer")
        cgroups = self._cgroups()
        user = account(self.singularity_user)
        image = resolve_image(machinetype)
        command = common.command_argv(machinetype.container_command)
        cvmfs = common.cvmfs_paths(self.cvmfs_root, machinetype.cvmfs_repositories)
        workdir = common.prepare_scratch(directory, [], machine, machinetype, settings)
        user_data = common.executable_user_data(directory)
        try:
            for path in (workdir, directory / "joboutputs", user_data):
                os.chown(path, user.pw_uid, user.pw_gid)
        except OSError as error:
            raise BackendError(f"{machine.name}: cannot give the machine to "
                               f"{user.pw_name}: {error}") from error
        argv = apptainer_argv(self.binary or "apptainer", image, command, directory, cvmfs)
        path = self._path(machine.uuid)
        with self._lock:
            self._starting.add(machine.uuid)
        try:
            cgroups.create(path)
            cgroups.set_limits(path, machine.processors,
                               machine.processors * settings.mb_per_processor * MIB)
            self._launch(machine, argv, user, directory, path)
        except CgroupError as error:
            raise BackendError(f"{machine.name}: {error}") from error
        finally:
            with self._lock:
                self._starting.discard(machine.uuid)

    def _launch(self, machine: Machine, argv: list[str], user: pwd.struct_passwd,
                directory: Path, path: str) -> None:
        environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C",
                       "HOME": str(directory / common.SCRATCH_DIR), "USER": user.pw_name}
        try:
            with open(directory / "console.log", "ab") as console:
                child = subprocess.Popen(["/bin/sh", "-c", _LAUNCHER, "vac-apptainer", *argv],
                                         stdin=subprocess.PIPE, stdout=console,
                                         stderr=subprocess.STDOUT, cwd=directory / common.SCRATCH_DIR,
                                         env=environment, user=user.pw_uid, group=user.pw_gid,
                                         extra_groups=[], start_new_session=True)
        except OSError as error:
            raise BackendError(f"{machine.name}: cannot start {argv[0]}: {error}") from error
        with self._lock:
            self._children[machine.uuid] = child
        try:
            self._cgroups().add_process(path, child.pid)
        except CgroupError as error:
            assert child.stdin is not None
            child.stdin.close()  # the launcher exits without running anything
            child.wait(timeout=30)
            raise BackendError(f"{machine.name}: {error}") from error
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.close()

    def _signal(self, uuid: str, signum: int) -> int:
        """Send ``signum`` to every process of the machine; return how many there were."""
        pids = self._cgroups().procs(self._path(uuid))
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            except OSError as error:
                raise BackendError(f"cannot signal process {pid} of {uuid}: {error}") from error
        return len(pids)

    def stop(self, uuid: str) -> None:
        self._signal(uuid, signal.SIGTERM)

    def destroy(self, uuid: str) -> None:
        for _ in range(KILL_ROUNDS):
            if not self._signal(uuid, signal.SIGKILL):
                break
            time.sleep(0.05)
        else:
            raise BackendError(f"processes of {uuid} survive SIGKILL")
        self._active(uuid)  # reap our own child, if it was one

    def list_machines(self) -> list[BackendMachine]:
        return [BackendMachine(uuid=uuid, name=f"{CGROUP_PREFIX}{uuid}", active=self._active(uuid),
                               cpu_seconds=self.cpu_seconds(uuid)) for uuid in self._uuids()]

    def _cgroup_cpu_seconds(self, uuid: str) -> Optional[float]:
        return self._cgroups().cpu_seconds(self._path(uuid))

    def _discard(self, uuid: str) -> None:
        """Kill what is left and remove the cgroup."""
        self.destroy(uuid)
        try:
            self._cgroups().remove(self._path(uuid))
        except CgroupError as error:
            raise BackendError(f"{uuid}: {error}") from error
        with self._lock:
            self._reported.discard(uuid)
