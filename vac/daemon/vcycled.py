"""vcycled: the vacuum model on cloud tenancies (issue 16, VCYCLE.md §4).

One asyncio process: the HTTPS MJF service (vac.services.cloudmjf) on the loop, and every
``cycle_seconds`` one cycle per space, spaces side by side so that a cloud that fails or hangs
delays no other. A space's cycle: list its machines (``Executor.reconcile``) and quota through its
backend (vac.backends.cloud), plan purely (vac.core.vcycleplan), and have vac's executor
(vac.daemon.executor) apply the plan: the very code that runs vacd's machines, with a quota as
its capacity rule, cloud names, and this space's cloud backend as its only backend. A listing
that fails (the cloud down, throttling past the client's retries, an answer that is not what the
API says) skips that space with one log line and backs it off: one cycle, then doubling up to
``MAX_SPACE_BACKOFF_SECONDS``; nothing is decided on a partial view.

State: ``<state_dir>/spaces/<space>/`` is a vac.records.store.Store (machine directories with
``machine.json``, MJF files, joboutputs, the machine's ``mjf_token``, APEL queues, finishes)
written through vac.daemon.machines.MachineWorks. A vcycled killed at any moment finds its
machines again from their records (and takes over listed machines it has no record of).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from vac import __version__
from vac.backends.base import MachineBackend
from vac.core import cloud, heartbeatlists, lifecycle, scheduler, vcycleplan
from vac.core.config import Config, ConfigPaths, Machinetype, Settings
from vac.core.model import Finish, Machine, MachineState
from vac.core.vcycleconfig import (
    API_EC2,
    DEFAULT_CONF_DIR,
    DEFAULT_MAIN_CONF,
    STATE_DIR,
    STATUS_FILE,
    Space,
    VcycleConfig,
    load_vcycle_config,
    space_settings,
)
from vac.daemon.cloudworks import CloudWorks
from vac.daemon.executor import Executor, Hooks
from vac.daemon.runtime import LoopRuntime
from vac.ops.logsetup import LOG_FORMATS
from vac.records.store import Store, atomic_write
from vac.services import cloudmjf, vacquery

log = logging.getLogger("vcycled")

MAX_SPACE_BACKOFF_SECONDS = 600.0
DEFAULT_CYCLE_SECONDS = 60.0
DEFAULT_CERT = "/etc/grid-security/hostcert.pem"
DEFAULT_KEY = "/etc/grid-security/hostkey.pem"

ImageResolver = Callable[[Machinetype], Optional[Path]]
BackendFactory = Callable[[Space, ImageResolver], MachineBackend]
PIPE_MACHINE_MODELS = ("cernvm3", "vm-raw")  # what a cloud can boot from a vacuum pipe's entries


def cloud_backend(space: Space, image_path: ImageResolver) -> MachineBackend:
    """The space's backend; the client libraries are imported only for the clouds in use.
    ``image_path`` gives a root_image as a local file (URLs through the image cache) for an
    upload to Glance; EC2 boots only registered images (``image:ID``)."""
    if space.api == API_EC2:
        from vac.backends.cloud.ec2 import EC2Backend

        return EC2Backend(space)
    from vac.backends.cloud.openstack import OpenStackBackend

    return OpenStackBackend(space, image_path=image_path)


def expand_space_pipes(space: Space, state_dir: str, fetcher: Optional[Callable[[str], bytes]] = None) -> Space:
    """``space`` with the machinetypes of its vacuum pipes added, fetched or from the pipes
    cache under ``state_dir`` as vacd does (vac.content.pipes, which logs every problem). A
    pipe's machinetype gets the space's flavor names; entries a cloud cannot boot (machine
    models other than cernvm3 and vm-raw) are left out, as in classic Vcycle."""
    if not space.vacuum_pipes:
        return space
    from vac.content import pipes
    from vac.core.vcycleconfig import CloudMachinetype

    config = Config(settings=Settings(vac_space=space.name, factory_name="", state_dir=state_dir),
                    machinetypes={name: ct.machinetype for name, ct in space.machinetypes.items()},
                    vacuum_pipes=space.vacuum_pipes)
    expanded, _ = pipes.expand_pipes(config, fetcher)
    added = {}
    for name, machinetype in expanded.machinetypes.items():
        if name in space.machinetypes:
            continue
        if machinetype.machine_model not in PIPE_MACHINE_MODELS:
            log.warning("space %s: vacuum pipe machinetype %s left out: machine_model %s cannot run on a cloud",
                        space.name, name, machinetype.machine_model)
            continue
        added[name] = CloudMachinetype(machinetype, flavor_names=space.flavor_names)
    return dataclasses.replace(space, machinetypes={**space.machinetypes, **added})


def listed_of(machine: Any) -> vcycleplan.Listed:
    """The planner's view of a backend's CloudMachine."""
    return vcycleplan.Listed(uuid=machine.uuid, name=machine.name, state=machine.state,
                             machinetype=machine.machinetype, processors=machine.processors,
                             created=machine.created, started=machine.started, updated=machine.updated,
                             address=machine.address, manager=machine.manager)


class SpaceBackends:
    """The executor's BackendSet for one space: its cloud backend, once connected."""

    def __init__(self, key: str, backend: MachineBackend):
        self.key = key
        self.backend = backend
        self.connected = False

    def for_model(self, model: str) -> Optional[MachineBackend]:
        return self.backend if self.connected and model == vcycleplan.MACHINE_MODEL else None

    def listable(self) -> dict[str, MachineBackend]:
        return {self.key: self.backend} if self.connected else {}

    def key_of_model(self, model: str) -> Optional[str]:
        return self.key if model == vcycleplan.MACHINE_MODEL else None


class VcycleMetrics:
    """The families vcycled exports (``--metrics-port``), by space."""

    def __init__(self, registry: Any):
        from vac.ops.metrics import Counter, Gauge

        self.machines = Gauge(registry, "vcycle_machines", "Machines by space, machinetype and state.",
                              ("space", "machinetype", "state"))
        self.processors_limit = Gauge(registry, "vcycle_processors_limit",
                                      "The space's processor quota (-1: none).", ("space",))
        self.creations = Counter(registry, "vcycle_creations_total", "Machine creations started.",
                                 ("space", "machinetype"))
        self.creation_failures = Counter(registry, "vcycle_creation_failures_total",
                                         "Machine creations that failed.", ("space", "machinetype"))
        self.cloud_failures = Counter(registry, "vcycle_cloud_failures_total",
                                      "Cycles of a space skipped because its cloud failed.", ("space",))
        self.cycle_seconds = Gauge(registry, "vcycle_cycle_seconds",
                                   "Duration of the space's last cycle (listing, planning, applying).", ("space",))

    def publish(self, workers: list[SpaceWorker]) -> None:
        counts: dict[tuple, float] = {}
        for worker in workers:
            for machine in worker.executor.machines.values():
                key = (worker.space.name, machine.machinetype, machine.state.value)
                counts[key] = counts.get(key, 0) + 1
            limit = worker.limit
            self.processors_limit.set(-1 if limit is None else limit, space=worker.space.name)
        self.machines.replace(counts)


class _SpaceHooks(Hooks):
    def __init__(self, worker: SpaceWorker):
        self.worker = worker

    def created(self, machine: Machine) -> None:
        if self.worker.metrics is not None:
            self.worker.metrics.creations.inc(space=self.worker.space.name, machinetype=machine.machinetype)

    def creation_failed(self, machine: Machine, error: str) -> None:
        if self.worker.metrics is not None:
            self.worker.metrics.creation_failures.inc(space=self.worker.space.name, machinetype=machine.machinetype)

    def finished(self, machine: Machine) -> None:
        self.worker.on_finished(machine)


class SpaceLog(logging.LoggerAdapter):
    """vcycled's logger with the space at the start of each line (for the shared executor)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"space {self.extra['space']}: {msg}", kwargs


class SpaceWorker:
    """One space: its backend, records and executor."""

    def __init__(self, space: Space, factory: str, state_root: Path, https: tuple[str, int],
                 backend_factory: BackendFactory, started: float, rng: random.Random,
                 runtime: LoopRuntime, metrics: Optional[VcycleMetrics] = None,
                 min_backoff: float = DEFAULT_CYCLE_SECONDS):
        self.space = space
        self.min_backoff = min_backoff
        self.metrics = metrics
        self.factory = factory
        self.started = started
        self.rng = rng
        self.runtime = runtime
        store = Store(state_root / "spaces" / space.name)
        store.prepare()
        self.settings = dataclasses.replace(space_settings(space, factory), state_dir=str(store.root))
        self.works = CloudWorks(store, self.settings, https, space.name)
        # The executor hands backends its own copy of a machinetype (machine model "cloud"):
        # images are resolved (and signatures checked) from the configured one.
        self.backends = SpaceBackends(space.name, backend_factory(
            space, lambda machinetype: self.works.vm_root_image(space.machinetypes[machinetype.name].machinetype)))
        # Every machinetype of a space runs on its cloud backend, whatever machine_model says
        # (classic files and vacuum pipes say cernvm3 or vm-raw: what the image is).
        config = Config(settings=self.settings, machinetypes={
            name: dataclasses.replace(ct.machinetype, machine_model=vcycleplan.MACHINE_MODEL)
            for name, ct in space.machinetypes.items()})
        self.executor = Executor(config, self.backends, self.works, runtime, _SpaceHooks(self),
                                 naming=lambda _settings, action: cloud.machine_name(action.machinetype, rng),
                                 capacity=self.capacity, lifecycle_rule=None, settings_for=self.settings_for,
                                 logger=SpaceLog(log, {"space": space.name}))
        self.finished: dict[str, Machine] = {}  # finished machines the cloud may still list
        self.aborts: dict[str, Finish] = store.load_finishes()
        self.last_seen: dict[str, float] = {}
        self.listed: set[str] = set()  # uuids of the last listing
        self.address_keys: set[int] = set()  # the last listing's addresses, for the MJF service
        self.heartbeat_lists: dict[str, tuple[heartbeatlists.Beating, ...]] = {}
        self.written_lists: dict[str, str] = {}  # machinetype -> the list text last written
        self.limit: Optional[int] = space.processors_limit
        self.backoff_until = 0.0
        self.backoff = min_backoff
        self.last_plan: Optional[vcycleplan.Plan] = None
        self.last_error: Optional[str] = None
        self.task: Optional[asyncio.Future] = None  # the cycle under way (vcycled runs it)
        for machine in store.live_machines():
            self.executor.machines[machine.uuid] = machine
            self.works.index(machine)
        log.info("space %s: machine records read, %d not finished", space.name, len(self.executor.machines))

    @property
    def store(self) -> Store:
        return self.works.store

    def carry_over(self, old: SpaceWorker) -> None:
        """Take over what a worker of the same space knew before its configuration changed:
        the finished machines the cloud still lists (else they would be taken over as new),
        when machines were last seen, the backoff, and a cycle still under way."""
        self.finished = dict(old.finished)
        self.last_seen = dict(old.last_seen)
        self.backoff_until, self.backoff = old.backoff_until, old.backoff
        self.task = old.task

    def settings_for(self, name: str) -> Settings:
        """MJF and APEL see the machinetype's HS06 and memory per processor."""
        cloud_type = self.space.machinetypes.get(name)
        if cloud_type is None:
            return self.settings
        return dataclasses.replace(self.settings, hs06_per_processor=cloud_type.hs06_per_processor,
                                   mb_per_processor=cloud_type.mb_per_processor)

    def capacity(self, executor: Executor, action: scheduler.Create) -> Optional[str]:
        """vcycled's capacity rule: the space's quota (the planner's, checked again against
        the machines the executor has now)."""
        if self.limit is None:
            return None
        # A machine being finished holds quota only while the cloud still lists it.
        used = sum(machine.processors for machine in executor.machines.values()
                   if machine.state is not MachineState.FINISHING or machine.uuid in self.listed)
        if used + action.processors > self.limit:
            return f"{used} of the limit {self.limit} processors in use"
        return None

    def on_finished(self, machine: Machine) -> None:
        self.finished[machine.uuid] = machine
        self.works.forget(machine)
        if vcycleplan.is_abort(machine.shutdown_message):
            self.aborts[machine.machinetype] = Finish(machine.machinetype, machine.name, machine.shutdown_message,
                                                      machine.finished or self.runtime.now())
        if self.settings.vacmon_hostport:
            status = vacquery.MachineStatus.from_machine(self.factory, machine)
            message = vacquery.vacmon_finish_message(self.settings, status, len(self.executor.machines))
            self.executor.spawn(vacquery.send_vacmon(self.settings, [message]), None)

    def vacmon_messages(self, now: float) -> list[bytes]:
        """The space's ``factory_status`` and ``machinetype_status`` datagrams (VCYCLE.md §6.4:
        the limit is the space's maximum; Vcycle's defects, such as running HS06 never summed,
        are not copied)."""
        machines = tuple(self.executor.machines.values())
        reports = scheduler.local_machinetype_reports(self.executor.config, machines, self.aborts,
                                                      self.factory, now)
        running = [m for m in machines if m.state in lifecycle.RUNNING_STATES]
        limit = self.limit or 0
        factory = vacquery.FactoryStatus(
            factory=self.factory, running_processors=sum(m.processors for m in running),
            running_machines=len(running), running_hs06=sum(r.running_hs06 for r in reports),
            max_processors=limit, max_machines=limit, max_hs06=float(limit), factory_heartbeat_time=int(now))
        return vacquery.vacmon_cycle_messages(
            self.settings, vacquery.StatusSnapshot(machines=(), machinetypes=reports, factory=factory))

    # --- the cycle ----------------------------------------------------------------------

    def _fail(self, now: float, error: str) -> None:
        if self.metrics is not None:
            self.metrics.cloud_failures.inc(space=self.space.name)
        self.backends.connected = False
        self.backoff_until = now + self.backoff
        self.last_error = error
        log.error("space %s: %s; next attempt in %.0f s", self.space.name, error, self.backoff)
        self.backoff = min(2 * self.backoff, MAX_SPACE_BACKOFF_SECONDS)

    async def cycle(self, now: float) -> Optional[vcycleplan.Plan]:
        """List, plan, apply; None if the space is backed off or its cloud failed."""
        if now < self.backoff_until:
            return None
        backend = self.backends.backend
        try:
            if not self.backends.connected:
                await self.runtime.call(backend.connect)
                self.backends.connected = True
            listing = await self.executor.reconcile()
            if self.executor.unanswered:
                raise ValueError("the listing failed (logged above)")
            quota = await self.runtime.call(backend.quota)
        except Exception as error:  # noqa: BLE001 - any cloud failure backs this space off
            self._fail(now, str(error))
            return None
        self.backoff = self.min_backoff
        self.last_error = None
        plan = self.plan(tuple(listed_of(machine) for _, machine in listing), quota, now)
        self._write_heartbeat_lists()
        for action in plan.actions:
            self.apply(action, now)
        self.executor.start_finishes(now)
        self.last_plan = plan
        if self.settings.vacmon_hostport:
            self.executor.spawn(vacquery.send_vacmon(self.settings, self.vacmon_messages(now)), None)
        if self.metrics is not None:
            self.metrics.cycle_seconds.set(self.runtime.now() - now, space=self.space.name)
        return plan

    def plan(self, listed: tuple[vcycleplan.Listed, ...], quota: Any, now: float) -> vcycleplan.Plan:
        executor = self.executor
        listed_uuids = self.listed = {machine.uuid for machine in listed}
        addresses = {machine.uuid: machine.address for machine in listed if machine.address}
        self.address_keys = {key for key in map(cloudmjf.address_key, addresses.values()) if key is not None}
        for machine in listed:
            if machine.state.active:
                self.last_seen[machine.uuid] = now
        for uuid in list(self.finished):
            if uuid not in listed_uuids:  # done with: only its directory remains
                del self.finished[uuid]
                self.last_seen.pop(uuid, None)
        for uuid in list(self.last_seen):  # machines left to another vcycled, or not configured here
            if uuid not in listed_uuids and uuid not in executor.machines and uuid not in self.finished:
                del self.last_seen[uuid]
        for uuid, record in executor.machines.items():
            if uuid not in listed_uuids and uuid not in self.last_seen:
                activity = self.store.last_activity(record)  # vcycled was down when it went
                if activity is not None:
                    self.last_seen[uuid] = activity
        self.limit = self.space.processors_limit if self.space.processors_limit is not None else quota.max_processors
        heartbeats = self._heartbeats()
        # Before any creation, so that new machines get the proxies listed now.
        self.heartbeat_lists = heartbeatlists.heartbeat_lists(self.space, executor.machines.values(), heartbeats,
                                                              addresses, now)
        self.works.cvmfs_proxies = heartbeatlists.cvmfs_proxies(self.space, self.heartbeat_lists)
        snapshot = vcycleplan.SpaceSnapshot(
            space=self.space, factory=self.factory, listed=listed,
            records={**self.finished, **executor.machines}, finishes=dict(self.aborts),
            heartbeats=heartbeats, last_seen=dict(self.last_seen),
            cloud_limit=quota.max_processors, cloud_used=quota.used_processors, now=now,
            daemon_started=self.started)
        plan = vcycleplan.plan(snapshot, self.rng)
        for note in plan.notes:
            log.debug("space %s: %s", self.space.name, note)
        return plan

    def _write_heartbeat_lists(self) -> None:
        """The lists as files (VCYCLE.md §5), rewritten when they change; a machinetype no
        longer configured loses its file. A failure is logged: the cycle goes on."""
        directory = self.works.heartbeat_lists
        try:
            directory.mkdir(mode=0o755, exist_ok=True)
            for name, entries in self.heartbeat_lists.items():
                text = heartbeatlists.list_text(entries)
                if self.written_lists.get(name) != text:
                    atomic_write(directory / name, text, 0o644)
                    self.written_lists[name] = text
            for path in directory.iterdir():
                if path.name not in self.heartbeat_lists:
                    path.unlink()
                    self.written_lists.pop(path.name, None)
        except OSError as error:
            self.written_lists.clear()  # written again in full next cycle
            log.error("space %s: heartbeat lists in %s: %s", self.space.name, directory, error)

    def _heartbeats(self) -> dict[str, Optional[float]]:
        found: dict[str, Optional[float]] = {}
        for uuid, record in self.executor.machines.items():
            cloud_type = self.space.machinetypes.get(record.machinetype)
            if record.state != MachineState.RUNNING or cloud_type is None or not cloud_type.machinetype.heartbeat_file:
                continue
            found[uuid] = self.store.joboutput_mtime(record, cloud_type.machinetype.heartbeat_file)
        return found

    def apply(self, action: vcycleplan.Action, now: float) -> None:
        """One planned action, through the executor."""
        executor = self.executor
        if isinstance(action, scheduler.Create):
            executor.apply(action, now)
            return
        if isinstance(action, vcycleplan.Adopt):
            log.warning("space %s: %s", self.space.name, action.reason)
            self.store.create_machine_dir(action.machine)
            executor.add(action.machine)
            return
        if isinstance(action, lifecycle.DestroyZombie):  # finished, still listed: delete again
            self.finished[action.uuid] = self.finished[action.uuid].replace(stop_requested=now)
            executor.apply_lifecycle(action, now)
            return
        machine = executor.machines.get(action.uuid)
        if machine is None or action.uuid in executor.busy:
            return  # a step of the executor is already at it
        if isinstance(action, vcycleplan.Started):
            if executor.transition(machine, MachineState.RUNNING, started=action.started,
                                   processors=action.processors):
                log.info("space %s: %s is running", self.space.name, machine.name)
        elif isinstance(action, vcycleplan.Delete):
            # Classic Vcycle deletes at once: the 700 message (unless the machine wrote its
            # own), then the finish, whose release deletes the machine from the cloud.
            log.info("space %s: deleting %s: %s", self.space.name, action.name, action.reason)
            self._end(machine, action.message, now, action.reason, now)
        elif isinstance(action, vcycleplan.Reclaimed):
            log.info("space %s: %s", self.space.name, action.reason)
            self._end(machine, vcycleplan.PREEMPTED, action.end, action.reason, now)
        elif isinstance(action, lifecycle.MarkGone):
            executor.apply_lifecycle(action, now)
        elif isinstance(action, scheduler.LowerDeadline):
            executor.apply(action, now)

    def _end(self, machine: Machine, message: Optional[str], end: float, reason: str, now: float) -> None:
        """Finish a machine that ended (or is to end) at ``end`` with ``message``, unless it wrote
        its own; its finish's release deletes it from the cloud."""
        if message and self.works.vm_shutdown_message(machine) is None:
            self.works.write_shutdown_message(machine, message)
        self.executor.apply_lifecycle(lifecycle.MarkGone(machine.uuid, end, reason), now)

    def status(self) -> dict:
        machines = sorted(self.executor.machines.values(), key=lambda m: m.name)
        plan = self.last_plan
        return {
            "space": self.space.name, "api": self.space.api, "manager": self.factory,
            "backed_off_until": self.backoff_until or None, "error": self.last_error,
            "processors_limit": self.limit,
            "machines": [{"name": m.name, "machinetype": m.machinetype, "state": m.state.value,
                          "processors": m.processors, "created": m.created, "started": m.started,
                          "hs06": m.hs06, "shutdown_message": m.shutdown_message} for m in machines],
            "machinetypes": {name: {"target_share": ct.machinetype.target_share,
                                    "score": plan.standings[name].score if plan and name in plan.standings else None,
                                    "blocked_by": (plan.standings[name].blocked_by
                                                   if plan and name in plan.standings else None),
                                    "last_abort": _abort_of(self.aborts.get(name)),
                                    "heartbeat_machines": len(self.heartbeat_lists.get(name, ()))}
                             for name, ct in self.space.machinetypes.items()},
        }


def _abort_of(finish: Optional[Finish]) -> Optional[dict]:
    if finish is None:
        return None
    return {"time": finish.finished_time, "message": finish.shutdown_message, "machine": finish.machine_name}


class Vcycled:
    """The daemon: configuration, workers per space, the HTTPS MJF service and the loop."""

    def __init__(self, args: argparse.Namespace, backend_factory: BackendFactory = cloud_backend):
        self.args = args
        self.paths = ConfigPaths(args.conf_dir, args.conf, ())
        self.factory = args.hostname or socket.getfqdn()
        self.state_root = Path(args.state_dir)
        self.backend_factory = backend_factory
        self.workers: dict[str, SpaceWorker] = {}
        self.config: Optional[VcycleConfig] = None
        self.started = time.time()
        self.rng = random.SystemRandom()
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()
        self.runtime = LoopRuntime(time.time)
        self.metrics: Optional[VcycleMetrics] = None
        self.notifier: Any = None
        self.last_cycle = time.time()

    def read_config(self) -> Optional[dict[str, SpaceWorker]]:
        """The workers for the configuration as it is now (blocking: files, vacuum pipes over
        HTTP, the records of a new space): those of unchanged spaces as they are, a new one
        for a space added or changed. None: the configuration has errors, keep the current."""
        config, problems = load_vcycle_config(self.paths, hostname=self.factory)
        for problem in problems:
            log.log(logging.ERROR if problem.is_error else logging.WARNING, "%s", problem)
        if config is None:
            if self.config is None:
                raise SystemExit("vcycled: the configuration has errors (vcycle conf --check)")
            log.error("configuration has errors: keeping the previous one")
            return None
        self.config = config
        workers = {}
        for name, space in config.spaces.items():
            space = expand_space_pipes(space, str(self.state_root / "spaces" / name))
            worker = self.workers.get(name)
            if worker is None or worker.space != space:
                https = (space.https_host or self.factory, space.https_port)
                new = SpaceWorker(space, self.factory, self.state_root, https, self.backend_factory,
                                  self.started, self.rng, self.runtime, self.metrics, self.args.cycle_seconds)
                if worker is not None:
                    new.carry_over(worker)
                worker = new
            workers[name] = worker
        for name in set(self.workers) - set(workers):
            log.warning("space %s is no longer configured: its machines are left alone", name)
        return workers

    def resolve(self, space: str, name: str) -> Optional[cloudmjf.CloudMachineFiles]:
        worker = self.workers.get(space)
        return worker.works.mjf_files(name) if worker else None

    def is_machine_address(self, key: int) -> bool:
        """Whether a source address (as an integer) is one the clouds list for a machine."""
        return any(key in worker.address_keys for worker in self.workers.values())

    def request_stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def request_reload(self) -> None:
        """SIGHUP: a cycle now, which re-reads the configuration first (as every cycle does)."""
        log.info("reloading the configuration (SIGHUP)")
        if self.notifier is not None:
            self.notifier.reloading()
        self.wake.set()

    async def feed_watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog while cycles keep completing (a hung loop stops the pings)."""
        while not self.stopping.is_set():
            if time.time() - self.last_cycle < 3 * self.args.cycle_seconds + interval:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def run(self) -> None:
        from vac.ops.sdnotify import SystemdNotifier

        loop = asyncio.get_running_loop()
        self.notifier = SystemdNotifier(unset_environment=True)
        interval = self.notifier.watchdog_seconds
        metrics_runner = None
        if self.args.metrics_port:
            from vac.ops import metrics

            registry = metrics.Metrics()
            self.metrics = VcycleMetrics(registry)
            metrics_runner = await metrics.start_metrics_server(registry, self.args.metrics_port)
        await self.reload()
        for signum, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                                (signal.SIGHUP, self.request_reload)):
            loop.add_signal_handler(signum, handler)
        machines = sum(s.processors_limit or 1000 for s in self.config.spaces.values())
        listener = await cloudmjf.start_cloud_mjf(
            self.resolve, address=self.args.https_address, port=self.args.https_port,
            cert_file=self.args.https_cert, key_file=self.args.https_key, machines=machines,
            is_machine_address=self.is_machine_address)
        log.info("vcycled %s started on %s: spaces %s", __version__, self.factory, ", ".join(self.workers))
        watchdog = loop.create_task(self.feed_watchdog(interval)) if interval else None
        try:
            while not self.stopping.is_set():
                started = time.time()
                self.wake.clear()
                await self.cycle()
                self.last_cycle = time.time()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(),
                                           max(0.0, self.args.cycle_seconds - (time.time() - started)))
        finally:
            self.notifier.stopping()
            if watchdog is not None:
                watchdog.cancel()
            for worker in self.workers.values():
                if worker.task is not None:
                    worker.task.cancel()
            await listener.close()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            await self.runtime.cancel()
            log.info("vcycled stopping; machines keep running")

    async def reload(self) -> None:
        workers = await self.runtime.call(self.read_config)
        if workers is not None:
            self.workers = workers  # swapped on the loop, where the MJF service reads it

    async def cycle(self) -> None:
        """Reload, then a cycle of each space as a task of its own, waited for at most a cycle:
        a cloud that hangs holds back only its own space, whose next cycle waits for it."""
        try:
            await self.reload()
        except SystemExit as error:
            log.error("%s", error)
        now = time.time()
        workers = list(self.workers.values())
        for worker in workers:
            if worker.task is not None and not worker.task.done():
                log.warning("space %s: its previous cycle is still running: this one is skipped",
                            worker.space.name)
            else:
                worker.task = asyncio.ensure_future(self._space_cycle(worker, now))
        await asyncio.wait([worker.task for worker in workers], timeout=self.args.cycle_seconds)
        if self.metrics is not None:
            self.metrics.publish(workers)
        machines = sum(len(worker.executor.machines) for worker in workers)
        failing = [worker.space.name for worker in workers if worker.last_error]
        text = f"{len(workers)} spaces, {machines} machines" + (f"; failing: {', '.join(failing)}" if failing else "")
        # READY=1 after every cycle: harmless once ready, and it ends a reload (RELOADING=1).
        self.notifier.ready(text)

    async def _space_cycle(self, worker: SpaceWorker, now: float) -> None:
        try:
            await worker.cycle(now)
        except Exception as error:  # noqa: BLE001 - one space's bug must not stop the others
            log.error("space %s: cycle failed: %s: %s", worker.space.name, type(error).__name__, error)
        else:
            self._write_status(worker)

    def _write_status(self, worker: SpaceWorker) -> None:
        import json

        try:
            atomic_write(worker.store.root / STATUS_FILE, json.dumps(
                {**worker.status(), "updated": time.time()}, sort_keys=True))
        except OSError as error:
            log.error("space %s: cannot write status: %s", worker.space.name, error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcycled", description="vcycle daemon: the vacuum model on clouds")
    parser.add_argument("--version", action="version", version=f"vcycled {__version__}")
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="fragment directory (default %(default)s)")
    parser.add_argument("--conf", default=DEFAULT_MAIN_CONF, help="main file (default %(default)s)")
    parser.add_argument("--state-dir", default=STATE_DIR, help="state directory (default %(default)s)")
    parser.add_argument("--hostname", default=None, help="this host's name (default: its FQDN)")
    parser.add_argument("--https-address", default="", help="address of the HTTPS MJF service (default: all)")
    parser.add_argument("--https-port", type=int, default=443, help="its port (default %(default)s)")
    parser.add_argument("--https-cert", default=DEFAULT_CERT, help="its certificate (default %(default)s)")
    parser.add_argument("--https-key", default=DEFAULT_KEY, help="its key (default %(default)s)")
    parser.add_argument("--cycle-seconds", type=float, default=DEFAULT_CYCLE_SECONDS,
                        help="seconds between cycles (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (default: none)")
    parser.add_argument("--log-file", default=None, help="log here instead of stderr")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text")
    parser.add_argument("--debug", action="store_true", help="log planner notes")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration, print its problems and exit (1 on errors)")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_config:
        from vac.ops.configcli import print_problems

        config, problems = load_vcycle_config(ConfigPaths(args.conf_dir, args.conf, ()),
                                              hostname=args.hostname or socket.getfqdn())
        print_problems(problems)
        return 1 if config is None else 0
    from vac.ops.logsetup import start_daemon_logging

    if not start_daemon_logging("vcycled", args.log_file, args.debug, args.log_format):
        return 1
    try:
        asyncio.run(Vcycled(args).run())
    except SystemExit as error:
        log.error("%s", error)
        return 1
    except (OSError, ValueError) as error:  # the HTTPS service: address in use, unusable certificate
        log.error("vcycled cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
