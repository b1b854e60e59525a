"""The ``docker`` and ``podman`` machine models, run by podman (default) or docker.

Two layers, as for VMs:

* ``ContainerSpec`` and ``container_spec``: the policy of what a vac container is (binds at the
  classic Vac 03 paths, labels, limits, hardening), and ``run_argv``, its exact engine argv.
  Pure; golden-tested.
* ``EngineBackend``: the ``MachineBackend`` over the engine's CLI. Every command is an argv,
  never a shell line, so nothing from a machinetype or a vacuum pipe is ever interpreted.

Life cycle. Containers are started detached and *without* ``--rm``: an exited container stays
listed (inactive) until ``release`` removes it, so its end is never missed and its exit code can
still be inspected. Each machine runs under a parent cgroup of its own (``--cgroup-parent
/vac/<engine>-<uuid>``), which outlives the container and keeps its total CPU time for
accounting until ``release`` (vac.backends.container.cgroups). Every container carries
``vac.machine_uuid`` and ``vac.factory`` labels: ``list_machines`` finds this factory's containers
by label after a vacd restart (adoption), and any labelled container vac has no record of is a
zombie the daemon destroys.

"It ended" comes from the engine's event stream (``podman events``/``docker events``, died/die
events of this factory's label), read by one thread that calls ``on_stopped`` at once; polling
``ps`` would cost an engine process per poll and delay the slot's next machine by the poll
interval. Events emitted while the stream is (re)started are not lost: each time the stream
starts, containers already exited are reported too, and the daemon's periodic reconciliation
through ``list_machines`` remains the safety net.

Engine specifics: podman runs with ``--cgroup-manager cgroupfs`` so that the parent cgroup is a
plain path on systemd hosts too; docker must be configured with the cgroupfs cgroup driver
(``native.cgroupdriver=cgroupfs``) for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

from vac.backends.base import BackendError, BackendMachine, StoppedCallback
from vac.backends.container import common
from vac.backends.container.cgroups import CgroupError, Cgroups, Limits, parse_proc_cgroup
from vac.core.config import ENGINE_MODELS, Machinetype, Settings
from vac.core.model import Machine

log = logging.getLogger(__name__)

MIB = 1 << 20
# Where the classic docker model put Machine/Job Features, joboutputs and user_data.
MACHINEFEATURES_PATH = "/etc/machinefeatures"
JOBFEATURES_PATH = "/etc/jobfeatures"
JOBOUTPUTS_PATH = "/var/spool/joboutputs"
USER_DATA_PATH = "/user_data"
# Scratch subdirectories bound as the container's writable temporary directories.
SCRATCH_BINDS = (("tmp", "/tmp"), ("var_tmp", "/var/tmp"))  # noqa: S108 (container paths)
TMP_BINDS_DIR = "tmp_binds"
NAME_LABEL = "vac.machine_name"
MACHINETYPE_LABEL = "vac.machinetype"
CREATE_TIMEOUT_SECONDS = 600.0  # a first run may pull the image
EVENTS_RESTART_MAX_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Engine:
    """How one engine's CLI spells what vac needs."""

    name: str
    global_args: tuple[str, ...]
    remove_args: tuple[str, ...]  # after "rm": remove at once, killing with SIGKILL
    died_event: str
    list_format: str

    def argv(self, binary: str, *args: str) -> list[str]:
        return [binary, *self.global_args, *args]


ENGINES = {
    "podman": Engine("podman", ("--cgroup-manager", "cgroupfs"), ("--force", "--time", "0"),
                     "died", "json"),
    "docker": Engine("docker", (), ("--force",), "die", "{{json .}}"),
}


@dataclasses.dataclass(frozen=True)
class Bind:
    source: str
    target: str
    read_only: bool

    def volume(self) -> str:
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """Everything ``run`` is told about one container; no decisions are made from it."""

    name: str
    hostname: str
    image: str
    command: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    environment: tuple[tuple[str, str], ...]
    binds: tuple[Bind, ...]
    cpus: int
    memory_bytes: int
    nofile: int
    nproc: int
    cgroup_parent: str
    network: str
    runtime: Optional[str] = None
    read_only: bool = True


def container_name(uuid: str) -> str:
    """The engine's name of a machine's container (unique even while the slot's previous
    container is still listed, unlike the classic machine name)."""
    return f"vac-{uuid}"


def cgroup_parent(root: str, engine: str, uuid: str) -> str:
    return f"{root.rstrip('/')}/{engine}-{uuid}"


def container_spec(machine: Machine, machinetype: Machinetype, settings: Settings,
                   directory: Path, *, engine: str, network: str, runtime: Optional[str],
                   cgroup_root: str, ulimits: tuple[int, int], cvmfs: list[str]) -> ContainerSpec:
    """The container of ``machine``: the classic Vac 03 docker model, hardened.

    Binds (CONTAINERS.md §2.2): joboutputs rw at /var/spool/joboutputs, Machine/Job Features ro
    at /etc/machinefeatures and /etc/jobfeatures (directories, so that rewritten shutdowntime
    files are seen inside), user_data ro at /user_data, each ``cvmfs_repositories`` entry ro at
    its own path, the scratch space at /tmp and /var/tmp and one fresh scratch directory per
    ``tmp_binds`` path. The root file system is read-only; limits are hard (``--cpus``,
    ``--memory``) where classic Vac set only shares.
    """
    scratch = directory / common.SCRATCH_DIR
    binds = [
        Bind(str(directory / "machinefeatures"), MACHINEFEATURES_PATH, True),
        Bind(str(directory / "jobfeatures"), JOBFEATURES_PATH, True),
        Bind(str(directory / "joboutputs"), JOBOUTPUTS_PATH, False),
        Bind(str(directory / "user_data"), USER_DATA_PATH, True),
        *(Bind(path, "/cvmfs/" + Path(path).name, True) for path in cvmfs),
        *(Bind(str(scratch / name), target, False) for name, target in SCRATCH_BINDS),
        *(Bind(str(scratch / TMP_BINDS_DIR / common.bind_directory_name(target)), target, False)
          for target in machinetype.tmp_binds),
    ]
    labels = ((common.UUID_LABEL, machine.uuid), (common.FACTORY_LABEL, settings.factory_name),
              (NAME_LABEL, machine.name), (MACHINETYPE_LABEL, machine.machinetype))
    environment = (("MACHINEFEATURES", MACHINEFEATURES_PATH), ("JOBFEATURES", JOBFEATURES_PATH),
                   ("JOBOUTPUTS", JOBOUTPUTS_PATH))
    return ContainerSpec(
        name=container_name(machine.uuid), hostname=machine.name,
        image=common.engine_image(machinetype.root_image),
        command=tuple(common.command_argv(machinetype.container_command)),
        labels=labels, environment=environment, binds=tuple(binds),
        cpus=machine.processors, memory_bytes=machine.processors * settings.mb_per_processor * MIB,
        nofile=ulimits[0], nproc=ulimits[1],
        cgroup_parent=cgroup_parent(cgroup_root, engine, machine.uuid),
        network=network, runtime=runtime)


def run_argv(engine: Engine, binary: str, spec: ContainerSpec) -> list[str]:
    """The exact ``run`` argv for ``spec``.

    ``--init`` puts a minimal init (catatonit, docker-init) at PID 1 so that the SIGTERM of a
    stop reaches user_data: PID 1 of a namespace ignores signals it installed no handler for.
    ``--ulimit`` is explicit because engines default to limits above what unprivileged
    sandboxes allow, and runc then refuses to start the container.
    """
    argv = engine.argv(binary, "run", "--detach", "--init", "--name", spec.name,
                       "--hostname", spec.hostname)
    if spec.runtime:
        argv += ["--runtime", spec.runtime]
    for key, value in spec.labels:
        argv += ["--label", f"{key}={value}"]
    for key, value in spec.environment:
        argv += ["--env", f"{key}={value}"]
    argv += ["--cgroup-parent", spec.cgroup_parent,
             "--cpus", str(spec.cpus), "--cpu-shares", str(spec.cpus * 1024),
             "--memory", str(spec.memory_bytes),
             "--ulimit", f"nofile={spec.nofile}:{spec.nofile}",
             "--ulimit", f"nproc={spec.nproc}:{spec.nproc}",
             "--security-opt", "no-new-privileges", "--network", spec.network]
    if spec.read_only:
        argv.append("--read-only")
    for bind in spec.binds:
        argv += ["--volume", bind.volume()]
    # "--" keeps an image name from a vacuum pipe from being read as an option.
    return argv + ["--", spec.image, *spec.command]


# -- parsing the engine's answers -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    uuid: str
    name: str
    running: bool
    exit_code: Optional[int]


def parse_ps(text: str) -> list[ContainerInfo]:
    """Labelled containers from ``podman ps --format json`` (one JSON array, labels a mapping)
    or ``docker ps --format '{{json .}}'`` (one object per line, labels ``k=v,k=v``)."""
    text = text.strip()
    if not text:
        return []
    try:
        if text.startswith("["):
            entries = json.loads(text)
        else:
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as error:
        raise BackendError(f"cannot parse the engine's container list: {error}") from None
    containers = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        labels = entry.get("Labels") or {}
        if isinstance(labels, str):
            labels = dict(item.partition("=")[::2] for item in labels.split(",") if item)
        uuid = labels.get(common.UUID_LABEL) if isinstance(labels, dict) else None
        if not uuid:
            continue
        names = entry.get("Names") or ""
        name = names[0] if isinstance(names, list) and names else str(names)
        exit_code = entry.get("ExitCode")
        containers.append(ContainerInfo(
            uuid=str(uuid), name=name, running=str(entry.get("State", "")).lower() == "running",
            exit_code=exit_code if isinstance(exit_code, int) else None))
    return containers


def parse_event(line: str) -> Optional[str]:
    """The machine UUID of a died (podman) / die (docker) event line, else None."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    status = event.get("Status") or event.get("status") or event.get("Action")
    if status not in ("died", "die"):
        return None
    attributes = event.get("Attributes") or (event.get("Actor") or {}).get("Attributes") or {}
    uuid = attributes.get(common.UUID_LABEL) if isinstance(attributes, dict) else None
    return str(uuid) if uuid else None


def _is_gone(error: BackendError) -> bool:
    """The engine said the container does not exist (podman and docker spell it alike)."""
    return "no such container" in str(error).lower()


class EngineBackend(common.ReleasedWithScratch):
    """Machines of the docker/podman models as containers of one engine (``MachineBackend``)."""

    kind = "container"

    def __init__(self, factory_name: str, on_stopped: StoppedCallback, *,
                 engine: str = "podman", binary: Optional[str] = None,
                 runtime: Optional[str] = None, network: str = "bridge",
                 cgroup_root: str = "/vac", cvmfs_root: str = "/cvmfs",
                 volume_group: Optional[str] = None):
        if engine not in ENGINES:
            raise BackendError(f"unknown container engine {engine!r} (use podman or docker)")
        self.engine = ENGINES[engine]
        self.binary = binary or engine
        self.factory_name = factory_name
        self.on_stopped = on_stopped
        self.runtime = runtime
        self.network = network
        self.cgroup_root = cgroup_root
        self.cvmfs_root = cvmfs_root
        self.volume_group = volume_group
        self.cgroups: Optional[Cgroups] = None
        self._closing = threading.Event()
        self._events: Optional[subprocess.Popen] = None
        self._watcher: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, on_stopped: StoppedCallback) -> EngineBackend:
        return cls(settings.factory_name, on_stopped, engine=settings.container_engine,
                   runtime=settings.container_runtime, network=settings.container_network,
                   volume_group=settings.volume_group)

    def _argv(self, *args: str) -> list[str]:
        return self.engine.argv(self.binary, *args)

    # -- connection and the event stream ---------------------------------------------------------

    def connect(self) -> None:
        """Check the engine answers, find the cgroups and start watching for ended containers."""
        common.run(self._argv("version"), timeout=60.0)
        self.cgroups = Cgroups.detect()
        if self.cgroups is None:
            log.warning("no cgroup file system is mounted: container CPU times are unknown")
        if self._watcher is None:
            self._closing.clear()
            self._watcher = threading.Thread(target=self._watch, name=f"{self.engine.name}-events",
                                             daemon=True)
            self._watcher.start()

    def close(self) -> None:
        """Stop watching; containers keep running."""
        self._closing.set()
        with self._lock:
            events = self._events
        if events is not None and events.poll() is None:
            events.terminate()
        if self._watcher is not None:
            self._watcher.join(timeout=10.0)
            self._watcher = None

    def _watch(self) -> None:
        delay = 1.0
        argv = self._argv("events", "--filter", f"label={common.FACTORY_LABEL}={self.factory_name}",
                          "--filter", f"event={self.engine.died_event}",
                          "--format", "{{json .}}")
        while not self._closing.is_set():
            started = time.monotonic()
            try:
                process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           stdin=subprocess.DEVNULL, text=True)
            except OSError as error:
                log.error("cannot watch %s events: %s", self.engine.name, error)
            else:
                with self._lock:
                    self._events = process
                self._report_exited()
                for line in process.stdout or ():
                    uuid = parse_event(line)
                    if uuid:
                        self.on_stopped(uuid)
                process.wait()
                if self._closing.is_set():
                    return
                log.warning("%s events ended with status %s: watching again in %.0f s",
                            self.engine.name, process.returncode, delay)
            if time.monotonic() - started > 60.0:
                delay = 1.0
            self._closing.wait(delay)
            delay = min(delay * 2, EVENTS_RESTART_MAX_SECONDS)

    def _report_exited(self) -> None:
        """Report containers that exited while no stream was read (vacd down, stream restart)."""
        try:
            machines = self.list_machines()
        except BackendError as error:
            log.warning("cannot list containers after (re)starting the event stream: %s", error)
            return
        for machine in machines:
            if not machine.active:
                self.on_stopped(machine.uuid)

    # -- machines --------------------------------------------------------------------------------

    def create(self, machine: Machine, machinetype: Machinetype, settings: Settings,
               directory: Path) -> None:
        if machinetype.machine_model not in ENGINE_MODELS:
            raise BackendError(f"{machine.name}: machine model {machinetype.machine_model!r} is "
                               f"not run by {self.engine.name}")
        common.executable_user_data(directory)
        cvmfs = common.cvmfs_paths(self.cvmfs_root, machinetype.cvmfs_repositories)
        common.prepare_scratch(directory, [name for name, _ in SCRATCH_BINDS]
                               + [f"{TMP_BINDS_DIR}/{common.bind_directory_name(path)}"
                                  for path in machinetype.tmp_binds],
                               machine, machinetype, settings)
        spec = container_spec(machine, machinetype, settings, directory, engine=self.engine.name,
                              network=self.network, runtime=self.runtime,
                              cgroup_root=self.cgroup_root, ulimits=common.process_ulimits(),
                              cvmfs=cvmfs)
        try:
            common.run(run_argv(self.engine, self.binary, spec), timeout=CREATE_TIMEOUT_SECONDS)
        except BackendError as error:
            # A failed start can leave a created-but-not-running container behind.
            try:
                self._remove(machine.uuid)
            except BackendError as cleanup:
                log.warning("cannot remove the failed container of %s: %s", machine.name, cleanup)
            raise BackendError(f"{machine.name}: {error}") from error

    def stop(self, uuid: str) -> None:
        """SIGTERM to the container's init, which hands it to user_data. Idempotent."""
        try:
            common.run(self._argv("kill", "--signal", "TERM", container_name(uuid)))
        except BackendError as error:
            if _is_gone(error) or not self._is_running(uuid):
                return
            raise

    def destroy(self, uuid: str) -> None:
        """SIGKILL and remove the container; its cgroup (and CPU total) stays until release."""
        self._remove(uuid)

    def _remove(self, uuid: str) -> None:
        try:
            common.run(self._argv("rm", *self.engine.remove_args, container_name(uuid)))
        except BackendError as error:
            if not _is_gone(error):
                raise

    def _inspect(self, uuid: str) -> Optional[dict]:
        try:
            text = common.run(self._argv("inspect", "--type", "container", container_name(uuid)))
        except BackendError as error:
            if _is_gone(error):
                return None
            raise
        try:
            entries = json.loads(text)
        except ValueError as error:
            raise BackendError(f"cannot parse inspect output for {uuid}: {error}") from None
        return entries[0] if isinstance(entries, list) and entries and isinstance(entries[0], dict) else None

    def _is_running(self, uuid: str) -> bool:
        info = self._inspect(uuid)
        return bool(info and (info.get("State") or {}).get("Running"))

    def list_machines(self) -> list[BackendMachine]:
        text = common.run(self._argv("ps", "--all", "--no-trunc", "--format", self.engine.list_format,
                                     "--filter", f"label={common.FACTORY_LABEL}={self.factory_name}"))
        return [BackendMachine(uuid=info.uuid, name=info.name, active=info.running,
                               cpu_seconds=self.cpu_seconds(info.uuid))
                for info in parse_ps(text)]

    def _cgroup_cpu_seconds(self, uuid: str) -> Optional[float]:
        """CPU time of the container's processes from its parent cgroup, running or exited, until
        ``release``; the engine's monitor (conmon), which lives beside it, is not counted."""
        if self.cgroups is None:
            return None
        parent = cgroup_parent(self.cgroup_root, self.engine.name, uuid)
        total = self.cgroups.cpu_seconds(parent)
        monitor = self.cgroups.cpu_seconds(f"{parent}/conmon") or 0.0
        return None if total is None else max(0.0, total - monitor)

    def limits(self, uuid: str) -> Optional[Limits]:
        """The CPU and memory limits in force on the running container's own cgroup."""
        info = self._inspect(uuid)
        pid = (info or {}).get("State", {}).get("Pid") or 0
        if not pid or self.cgroups is None:
            return None
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text(encoding="ascii")
        except OSError:
            return None
        path = parse_proc_cgroup(text, self.cgroups.layout.version)
        return self.cgroups.limits(path) if path else None

    def exit_code(self, uuid: str) -> Optional[int]:
        """The exit status of an exited container (None while running or once removed)."""
        info = self._inspect(uuid)
        state = (info or {}).get("State") or {}
        if not info or state.get("Running"):
            return None
        code = state.get("ExitCode")
        return code if isinstance(code, int) else None

    def _discard(self, uuid: str) -> None:
        """Remove the container and its parent cgroup."""
        self._remove(uuid)
        if self.cgroups is not None:
            try:
                self.cgroups.remove(cgroup_parent(self.cgroup_root, self.engine.name, uuid))
            except CgroupError as error:
                raise BackendError(f"{uuid}: {error}") from error
