"""vacd: the factory daemon. One asyncio process wiring the pure planner to the adapters.

The loop: every relevant event (a machine ended, a creation finished, SIGHUP), the moment the
last plan said a decision falls due (``Plan.wake_at``: a deadline, a heartbeat, the end of a
backoff) and every ``reconcile_seconds`` run one *cycle*: reload the configuration if a file
changed, reconcile the model with the backends (on the reconcile tick), finish machines that
ended, plan, apply the plan, publish the status. Between cycles, the CPU time of running
machines is read every ``CPU_SAMPLE_SECONDS`` (and once more at their end), so accounting loses
at most that much.

What a plan says is done by vac.daemon.executor (the same code ``vac simulate`` drives) through
the machine backends of vac.daemon.backends; vac.daemon.machines prepares and records machines,
vac.daemon.status publishes. This module is the loop, the configuration, the services and the
process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import time
from typing import Callable, Optional

from vac import __version__
from vac.backends.vm.disks import DiskError
from vac.backends.vm.hypervisor import HypervisorError
from vac.core import config as configmod
from vac.core import scheduler
from vac.core.model import Machine
from vac.core.reload import RestartNotices
from vac.daemon import backends as backendsmod
from vac.daemon.executor import Executor, Hooks
from vac.daemon.machines import MachineWorks
from vac.daemon.runtime import LoopRuntime
from vac.daemon.status import StatusPublisher
from vac.ops.configcli import add_config_arguments, report_config
from vac.ops.hostinfo import factory_facts, read_host_facts
from vac.ops.logsetup import LOG_FORMATS
from vac.records.store import Store, StoreError
from vac.services import vacquery

log = logging.getLogger("vacd")

DEFAULT_PIDFILE = "/run/vacd.pid"
DEFAULT_DAEMON_LOG = "/var/log/vacd.log"
MAX_CONNECT_DELAY_SECONDS = 60.0
# CPU time is read this often between the readings at a machine's start and end: what a machine
# vacd cannot read at its end (vacd down, libvirtd restarting) loses from its accounting.
CPU_SAMPLE_SECONDS = 5.0
# Planning decisions compare with ">": wake this long after the moment a decision falls due.
WAKE_SLACK_SECONDS = 0.01
EXPIRY_INTERVAL_SECONDS = 3600.0
DEFAULT_MACHINES_DIR_DAYS = 3.0  # for machinetypes no longer configured (classic)


class _ClosingService:
    """A service whose ``close()`` is synchronous, with the async ``close()`` of the others."""

    def __init__(self, service):
        self.service = service

    async def close(self) -> None:
        self.service.close()


class _TaskService:
    """A long-lived task, cancelled when vacd stops."""

    def __init__(self, task: asyncio.Task):
        self.task = task

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class _RunnerService:
    """An aiohttp AppRunner with the ``close()`` the daemon calls on every service."""

    def __init__(self, runner):
        self.runner = runner

    async def close(self) -> None:
        await self.runner.cleanup()


class _FactoryHooks(Hooks):
    """What the executor tells the daemon: wake the cycle, count, publish, tell VacMon."""

    def __init__(self, factory: Factory):
        self.factory = factory

    def wake(self) -> None:
        self.factory.wake.set()

    def created(self, machine: Machine) -> None:
        if self.factory.publisher.metrics is not None:
            self.factory.publisher.metrics.creations.inc(machinetype=machine.machinetype)

    def started(self, machine: Machine) -> None:
        self.factory.publisher.creation_succeeded()

    def creation_failed(self, machine: Machine, error: str) -> None:
        publisher = self.factory.publisher
        if publisher.metrics is not None:
            publisher.metrics.creation_failures.inc(machinetype=machine.machinetype)
        publisher.creation_failed(error, self.factory.clock())

    def finished(self, machine: Machine) -> None:
        settings = self.factory.config.settings
        if settings.vacmon_hostport:
            status = vacquery.MachineStatus.from_machine(settings.factory_name, machine)
            message = vacquery.vacmon_finish_message(settings, status, self.factory.num_slots())
            self.factory.spawn(vacquery.send_vacmon(settings, [message]))


class Factory:
    """The running factory: configuration, the cycle, services and signals around an Executor."""

    def __init__(self, paths: configmod.ConfigPaths, *, clock: Callable[[], float] = time.time,
                 works_factory: Callable[..., MachineWorks] = MachineWorks,
                 backend_makers: Optional[dict] = None,
                 host_facts: Callable[[str], scheduler.HostFacts] = read_host_facts,
                 processor_count: Optional[int] = None,
                 rng: Optional[random.Random] = None):
        self.paths = paths
        self.clock = clock
        self.rng = rng or random.Random()
        self.works_factory = works_factory
        self.backend_makers = backend_makers or backendsmod.DEFAULT_MAKERS
        self.host_facts = host_facts
        self.processor_count = processor_count or os.cpu_count() or 1
        self.config: Optional[configmod.Config] = None
        self.store: Optional[Store] = None
        self.works: Optional[MachineWorks] = None
        self.backends: Optional[backendsmod.Backends] = None
        self.executor: Optional[Executor] = None
        self.runtime = LoopRuntime(clock)
        self.publisher = StatusPublisher()
        self.started = clock()
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.reload_requested = False
        self.config_stamp: Optional[tuple] = None  # config_stamp() of the files last loaded
        self.wake_timer: Optional[asyncio.TimerHandle] = None
        self.reconcile_requested = False
        self.last_notes: set[str] = set()
        self.next_expiry = 0.0
        self.services: list = []
        self.http_services = None
        self.responder = None
        self.host_status: dict = {}
        self.peer_cache = None
        self.restart_notices = RestartNotices()  # reloaded settings that wait for a restart

    # -- the model, as the executor keeps it ----------------------------------------------------

    @property
    def machines(self) -> dict:
        return self.executor.machines if self.executor is not None else {}

    @property
    def finishes(self) -> dict:
        return self.executor.finishes if self.executor is not None else {}

    @property
    def tasks(self) -> set:
        return self.runtime.tasks

    @property
    def metrics(self):
        return self.publisher.metrics

    @property
    def status_snapshot(self) -> Optional[vacquery.StatusSnapshot]:
        return self.publisher.snapshot

    def live(self) -> list[Machine]:
        return self.executor.live()

    def spawn(self, coroutine) -> None:
        """A background step that belongs to no machine (VacMon, expiry, deadline files)."""
        self.executor.spawn(coroutine, None)

    # -- configuration -------------------------------------------------------------------------

    async def load_config(self) -> bool:
        """(Re)load configuration; on errors keep the previous one. True if a config is usable.
        Reading runs in the thread pool: vacuum pipes may be fetched over HTTP, and the loop
        serves the machines and peers meanwhile."""
        config = await self.run_blocking(self.read_config)
        if config is None:
            return self.config is not None
        self.config = config
        self.apply_settings(config.settings)
        return True

    def read_config(self) -> Optional[configmod.Config]:
        """The configuration files (and vacuum pipes) as they are now, problems logged; None
        if they have errors (blocking: files, and pipes over HTTP)."""
        self.config_stamp = config_stamp(self.paths)  # before reading: a change during it counts
        config, problems = configmod.load_config(self.paths, processor_count=self.processor_count)
        for problem in problems:
            (log.error if problem.level == "error" else log.warning)("%s", problem)
        if config is None:
            if self.config is not None:
                log.error("configuration has errors: keeping the previous configuration")
            return None
        if self.config is not None:
            config, lines = self.restart_notices.review(self.config.settings, config)
            for line in lines:
                log.warning("%s", line)
        return self.expand_pipes(config)

    def apply_settings(self, settings: configmod.Settings) -> None:
        """Hand reloaded settings (and machinetypes) to the parts that keep their own copy."""
        if self.works is not None:
            self.works.settings = settings
        if self.executor is not None:
            self.executor.config = self.config
        if self.responder is not None:
            secret = vacquery.reload_secret(settings, self.responder.authenticator.secret)
            self.responder.reconfigure(settings, secret)
            self.peer_cache.reconfigure(settings, secret)

    def expand_pipes(self, config: configmod.Config) -> configmod.Config:
        if not config.vacuum_pipes:
            return config
        from vac.content import pipes

        expanded, problems = pipes.expand_pipes(config)
        for problem in problems:
            log.warning("vacuum pipe: %s", problem)
        return expanded

    # -- the cycle ---------------------------------------------------------------------------

    async def run_blocking(self, function, *args):
        return await self.runtime.call(function, *args)

    async def cycle(self, reconcile: bool) -> None:
        if self.reload_requested or reconcile or config_stamp(self.paths) != self.config_stamp:
            self.reload_requested = False
            await self.load_config()
        now = self.clock()
        if reconcile:
            await self.connect_backends()
            await self.executor.reconcile()
            self.host_status = await self.run_blocking(factory_facts, self.config.settings.state_dir)
            if now >= self.next_expiry:
                self.next_expiry = now + EXPIRY_INTERVAL_SECONDS
                self.spawn(self.run_blocking(self.expire_machine_dirs, now))
        self.executor.start_finishes(now)
        await self.plan_and_apply(now)
        self.publisher.publish(now, self.config, self.live(), self.executor.last_in_slot,
                               self.executor.finishes, self.num_slots(), self.host_status)
        if reconcile and self.config.settings.vacmon_hostport:
            self.spawn(vacquery.send_vacmon(self.config.settings, vacquery.vacmon_cycle_messages(
                self.config.settings, self.status_snapshot)))

    def expire_machine_dirs(self, now: float) -> None:
        """Delete finished machines' directories after their machinetype's machines_dir_days."""
        days = {name: mt.machines_dir_days for name, mt in self.config.machinetypes.items()}
        removed = self.store.expire_machine_dirs(list(self.machines), days,
                                                 DEFAULT_MACHINES_DIR_DAYS, now)
        if removed:
            log.info("removed %d expired machine directories", len(removed))

    async def plan_and_apply(self, now: float) -> None:
        if self.stopping.is_set():
            return
        config = self.config
        host = await self.run_blocking(self.host_facts, config.settings.state_dir)
        settings = config.settings
        reports = scheduler.local_machinetype_reports(
            config, tuple(self.live()), self.finishes, settings.factory_name, now)
        if self.peer_cache is not None:
            reports = tuple(report for report in self.peer_cache.reports()
                            if report.factory != settings.factory_name) + reports
        heartbeat_mtimes = {}
        for machine in self.live():
            machinetype = config.machinetypes.get(machine.machinetype)
            if machinetype is not None and machinetype.heartbeat_file:
                heartbeat_mtimes[machine.uuid] = self.store.joboutput_mtime(
                    machine, machinetype.heartbeat_file)
        snapshot = scheduler.Snapshot(
            config=self.backends.refused(config), machines=tuple(self.live()),
            num_slots=self.num_slots(), host=host, reports=reports,
            heartbeat_mtimes=heartbeat_mtimes, now=now, daemon_started=self.started)
        plan = scheduler.plan(snapshot, self.rng)
        retries = [when for when in self.executor.retry_at.values() if when >= now]
        self.wake_at(min([*retries, plan.wake_at or math.inf]), now)
        # Notes repeat every cycle while a condition lasts: log each when it starts to hold
        # (and at every plan with --debug).
        notes = set(plan.notes)
        for note in plan.notes:
            log.log(logging.DEBUG if note in self.last_notes else logging.INFO, "plan: %s", note)
        self.last_notes = notes
        self.publisher.count_backoffs(config, reports, now)
        for action in plan.actions:
            self.executor.apply(action, now)

    def wake_at(self, when: float, now: float) -> None:
        """Run a cycle just after ``when`` (wall clock; infinite: no timer). One timer, re-armed
        by every plan, so nothing runs while nothing is due."""
        if self.wake_timer is not None:
            self.wake_timer.cancel()
            self.wake_timer = None
        if when < math.inf:
            loop = asyncio.get_running_loop()
            delay = max(0.0, when - now) + WAKE_SLACK_SECONDS
            self.wake_timer = loop.call_at(loop.time() + delay, self.wake.set)

    def num_slots(self) -> int:
        """One slot per processor vac may use (each machine has at least one)."""
        return self.config.settings.total_processors or self.processor_count

    async def sample_cpu(self) -> None:
        """Read the CPU time of every running machine every CPU_SAMPLE_SECONDS (the readings in
        one job of the thread pool, their records saved in another)."""
        while True:
            await asyncio.sleep(CPU_SAMPLE_SECONDS)
            try:
                await self.executor.sample_cpu()
            except Exception:
                log.exception("internal error reading CPU times")

    # -- events --------------------------------------------------------------------------------

    def on_reconnected(self) -> None:
        """libvirtd came back: events may have been missed, so reconcile at once."""
        log.info("reconnected to libvirt: reconciling")
        self.reconcile_requested = True
        self.wake.set()

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        if not await self.load_config():
            raise StartupError("configuration has errors (see above); not starting")
        settings = self.config.settings
        self.store = Store(settings.state_dir)
        self.publisher.store = self.store
        try:
            self.store.prepare()
            self.store.upgrade()
        except StoreError as error:
            raise StartupError(str(error)) from error
        loop = asyncio.get_running_loop()
        self.works = self.works_factory(self.store, settings)
        self.backends = backendsmod.Backends(
            self.backend_makers, settings,
            on_stopped=lambda uuid: loop.call_soon_threadsafe(self.on_stopped, uuid),
            on_reconnected=lambda: loop.call_soon_threadsafe(self.on_reconnected),
            works=self.works)
        self.executor = Executor(self.config, self.backends, self.works, self.runtime,
                                 _FactoryHooks(self))
        recovered = self.store.live_machines()
        if self.needed_backends(recovered) & {backendsmod.LIBVIRT}:
            await self.connect_libvirt()
            if self.stopping.is_set():
                return
        try:
            await self.run_blocking(self.works.check_storage)
        except DiskError as error:
            raise StartupError(f"volume_group {settings.volume_group}: {error}") from error
        await self.connect_backends(recovered)
        await self.run_blocking(self.works.complete_accounting)
        self.executor.finishes.update(self.store.load_finishes())
        for machine in recovered:
            self.executor.machines[machine.uuid] = machine
        log.info("recovered %d live machines from %s", len(recovered), settings.state_dir)
        await self.executor.reconcile()
        try:
            await self.start_services()
        except (OSError, vacquery.SecretError) as error:
            raise StartupError(f"cannot start the services for the VMs and peers: {error}") from error

    def needed_backends(self, machines: list[Machine]) -> set[str]:
        return self.backends.needed(self.config, (machine.machine_model for machine in machines))

    def on_stopped(self, uuid: str) -> None:
        if self.executor is not None:
            self.executor.on_stopped(uuid)

    async def connect_libvirt(self) -> None:
        """Connect to libvirt and set up the network, retrying (with backoff) while it fails:
        libvirtd may start after vacd, or be restarting."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                await self.run_blocking(self.backends.connect, backendsmod.LIBVIRT)
                return
            except HypervisorError as error:
                log.error("cannot use libvirt: %s; retrying in %.0f s", error, delay)
                if self.publisher.notifier is not None:
                    self.publisher.notifier.status(f"waiting for libvirt: {error}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, MAX_CONNECT_DELAY_SECONDS)

    async def connect_backends(self, machines: Optional[list] = None) -> None:
        """Connect the backends the configuration (or recovered machines) need and are not
        connected; one that fails is logged and its machinetypes refused until a later reconcile
        connects it. libvirt is waited for at start; here it is new only when a reload added the
        first VM machinetype, whose metadata/MJF services then start too."""
        wanted = self.needed_backends(machines or self.live())
        if wanted - set(self.backends.connected):
            await self.run_blocking(self.backends.try_connect, wanted)
        if self.responder is not None and self.http_services is None:
            try:
                await self.start_vm_services()
            except OSError as error:
                log.error("cannot start the metadata/MJF services for VMs: %s; trying again at "
                          "the next reconcile", error)

    async def start_vm_services(self) -> None:
        """Bind the metadata and MJF services, only while libvirt (its network, whose bridge
        holds their addresses) is connected: containers read MJF and write joboutputs through
        bind mounts, so a node without VM machinetypes binds neither address."""
        if backendsmod.LIBVIRT not in self.backends.connected:
            return
        from vac.services import metadata

        settings = self.config.settings
        self.http_services = await metadata.start_services(settings, self.resolve_slot,
                                                           limits=service_limits(settings))
        self.services.append(self.http_services)
        self.publisher.services_up = True

    async def start_services(self) -> None:
        """Bind the metadata/MJF services (VMs only), the VacQuery responder and the optional
        metrics."""
        settings = self.config.settings
        await self.start_vm_services()
        if self.http_services is None:
            log.info("no VM machinetype: the metadata and MJF services are not started "
                     "(containers read Machine/Job Features through bind mounts)")
        secret = vacquery.load_secret(settings)
        self.responder = await vacquery.start_responder(settings, lambda: self.status_snapshot,
                                                        secret)
        self.publisher.responder = self.responder
        self.services.append(_ClosingService(self.responder))
        self.peer_cache = vacquery.PeerReportCache(settings, secret=secret)
        self.run_service(self.peer_cache.run())
        if settings.metrics_port:
            from vac.ops import metrics

            registry = metrics.Metrics()
            self.publisher.metrics = metrics.VacMetrics(registry)
            runner = await metrics.start_metrics_server(registry, settings.metrics_port)
            self.services.append(_RunnerService(runner))

    def resolve_slot(self, slot: int):
        """The machine a VM in ``slot`` may see through the metadata and MJF services: from
        creation (user_data is written before the domain starts) until it is finished."""
        from vac.services.metadata import MachineContext

        machine = self.executor.machine_in_slot(slot)
        if machine is None or machine.state not in scheduler.ACTIVE_STATES:
            return None
        return MachineContext(machine, self.store.machine_dir(machine))

    def run_service(self, coroutine) -> None:
        """Run a long-lived task (peer cache, watchdog) until vacd stops."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.services.append(_TaskService(task))

    async def run(self) -> None:
        from vac.ops.sdnotify import SystemdNotifier

        self.publisher.notifier = SystemdNotifier(unset_environment=True)
        interval = self.publisher.notifier.watchdog_seconds
        loop = asyncio.get_running_loop()
        for signum, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                                (signal.SIGHUP, self.request_reload)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, handler)
        await self.start()
        if self.stopping.is_set():
            await self.shutdown()
            return
        if interval:
            self.run_service(self.feed_watchdog(interval))
        self.run_service(self.sample_cpu())
        next_reconcile = 0.0
        ready = False
        while not self.stopping.is_set():
            monotonic = loop.time()
            reconcile = monotonic >= next_reconcile or self.reconcile_requested
            self.reconcile_requested = False
            if reconcile:
                next_reconcile = monotonic + self.config.settings.reconcile_seconds
            self.wake.clear()  # before the cycle: what happens during it wakes the next one
            try:
                await self.cycle(reconcile)
            except Exception:
                log.exception("internal error in the factory cycle")
            if not ready:
                ready = True
                self.publisher.notifier.ready()
                log.info("vacd %s ready: factory %s in space %s", __version__,
                         self.config.settings.factory_name, self.config.settings.vac_space)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.05, next_reconcile - loop.time()))
        await self.shutdown()

    async def feed_watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog while the cycle keeps running (a hung cycle stops the pings)."""
        while not self.stopping.is_set():
            if self.clock() - self.publisher.status.loop_time < 3 * self.config.settings.reconcile_seconds:
                self.publisher.notifier.watchdog()
            await asyncio.sleep(interval)

    def request_stop(self) -> None:
        log.info("stopping vacd; running machines keep running")
        self.stopping.set()
        self.wake.set()

    def request_reload(self) -> None:
        log.info("reloading configuration (SIGHUP)")
        self.reload_requested = True
        self.wake.set()

    async def shutdown(self) -> None:
        if self.publisher.notifier is not None:
            self.publisher.notifier.stopping()
        if self.wake_timer is not None:
            self.wake_timer.cancel()
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.close()
        await self.runtime.cancel()
        if self.backends is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(None, self.backends.close)


def config_stamp(paths: configmod.ConfigPaths) -> tuple:
    """The configuration's files as they are now: device, inode, size, modification and change
    time of the fragment directory, of every entry in it, and of the main and run-time files
    (None where absent). An edit, a replacement, a new or a removed file changes it; a few
    stat() calls cost microseconds, so vacd compares it before every plan."""
    def stat(path: str) -> Optional[tuple]:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns

    try:
        entries = sorted(os.listdir(paths.conf_dir))
    except OSError:
        entries = []
    files = [paths.conf_dir, *(os.path.join(paths.conf_dir, entry) for entry in entries),
             paths.main_conf, *paths.run_confs]
    return tuple((path, stat(path)) for path in files)


def service_limits(settings: configmod.Settings):
    """The metadata/MJF services' limits, with the upload caps a site may configure."""
    from vac.services import metadata

    return dataclasses.replace(
        metadata.DEFAULT_LIMITS, joboutput_file_bytes=settings.joboutputs_file_max_bytes,
        joboutputs_total_bytes=settings.joboutputs_total_max_bytes,
        joboutputs_max_files=settings.joboutputs_max_files)


class StartupError(Exception):
    """vacd cannot start; the message says why."""


async def serve(paths: configmod.ConfigPaths) -> None:
    """Run a factory until it is stopped. The Factory is made inside the running loop: on
    Python 3.9 (EL9) asyncio objects bind to the loop current when they are created."""
    await Factory(paths).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vacd", description="Vac factory daemon.")
    parser.add_argument("--version", action="version", version=f"vacd {__version__}")
    add_config_arguments(parser)
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration (as vac conf --check) and exit")
    parser.add_argument("--daemon", action="store_true",
                        help="detach into the background (hosts without systemd)")
    parser.add_argument("--foreground", dest="daemon", action="store_false",
                        help="stay in the foreground (the default)")
    parser.add_argument("--pidfile", default=DEFAULT_PIDFILE,
                        help="pid file written with --daemon (default %(default)s)")
    parser.add_argument("--log-file", default=None,
                        help="log to this file (reopened after logrotate) instead of stderr")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text")
    parser.add_argument("--debug", action="store_true", help="log planner notes and more")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    paths = configmod.ConfigPaths.from_args(args)
    if args.check_config:
        return report_config(paths, problems_only=True)
    from vac.ops.logsetup import start_daemon_logging

    if args.daemon and not args.log_file:
        args.log_file = DEFAULT_DAEMON_LOG  # a detached daemon has no stderr to write to
    if not start_daemon_logging("vacd", args.log_file, args.debug, args.log_format):
        return 1
    if args.daemon:
        from vac.ops.daemonize import DaemonizeError, daemonize

        try:
            daemonize(args.pidfile)
        except DaemonizeError as error:
            print(f"vacd: {error}", file=sys.stderr)
            return 1
    from vac.ops.limits import raise_descriptor_limit

    nofile = raise_descriptor_limit()  # every VM connection is a descriptor (vacd(8) FAIRNESS)
    log.log(logging.WARNING if nofile.error else logging.INFO, "%s", nofile.describe())
    try:
        asyncio.run(serve(paths))
    except StartupError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
