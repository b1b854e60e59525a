"""vacd: the factory daemon. One asyncio process wiring the pure planner to the adapters.

The loop: every relevant event (a domain stopped, a creation finished, SIGHUP), the moment
the last plan said a decision falls due (``Plan.wake_at``: a deadline, a heartbeat, the end of a
backoff) and every ``reconcile_seconds`` run one *cycle*: reload the configuration if a file
changed, reconcile the model with libvirt (on the reconcile tick), finish machines that ended,
plan, apply the plan. Between cycles, the CPU time of running machines is read every
``CPU_SAMPLE_SECONDS`` (and once more at their end), so accounting loses at most that much.
Blocking work (libvirt, disks, template and image downloads) runs in a small thread pool so the
responder and HTTP services never stall.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import time
import uuid as uuidlib
from typing import Callable, Optional

from vac import __version__
from vac.backends.vm.disks import DiskError
from vac.backends.vm.hypervisor import DomainState, HypervisorError, NotConnectedError
from vac.cli.main import add_config_arguments
from vac.core import config as configmod
from vac.core import scheduler
from vac.core.model import Finish, Machine, MachineState, slot_name
from vac.core.reload import RestartNotices
from vac.daemon.machines import MachineWorks
from vac.ops.hostinfo import factory_facts, read_host_facts
from vac.records.store import Store, StoreError
from vac.services import vacquery

log = logging.getLogger("vacd")

EXECUTOR_THREADS = 8
DEFAULT_PIDFILE = "/run/vacd.pid"
DEFAULT_DAEMON_LOG = "/var/log/vacd.log"
MAX_CONNECT_DELAY_SECONDS = 60.0
# A vac domain nobody knows in one of these states is a zombie; one shutting down is left alone.
ZOMBIE_STATES = (DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED,
                 DomainState.PMSUSPENDED, DomainState.NOSTATE)
LV_RELEASE_WAIT_SECONDS = 120.0
FINISH_RETRY_SECONDS = 30.0
# CPU time is read this often between the readings at a machine's start and end: what a machine
# vacd cannot read at its end (vacd down, libvirtd restarting) loses from its accounting.
CPU_SAMPLE_SECONDS = 5.0
# Planning decisions compare with ">": wake this long after the moment a decision falls due.
WAKE_SLACK_SECONDS = 0.01
EXPIRY_INTERVAL_SECONDS = 3600.0
DEFAULT_MACHINES_DIR_DAYS = 3.0  # for machinetypes no longer configured (classic)
# VMs may talk to the services while they exist: from creation (user_data is written before the
# domain starts) until they are finished.
SERVED_STATES = (MachineState.CREATING, MachineState.RUNNING, MachineState.STOPPING)
SAMPLED_STATES = (MachineState.RUNNING, MachineState.STOPPING)  # their CPU time grows


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


@dataclasses.dataclass
class DaemonStatus:
    """Liveness and outcome facts published in status.json for check-vacd."""

    loop_time: float = 0.0
    responder_time: float = 0.0
    metadata_time: float = 0.0
    mjf_time: float = 0.0
    last_creation_error: Optional[str] = None
    last_creation_error_time: Optional[float] = None


class Factory:
    """The running factory: the in-memory model, the cycle, and the executors of actions."""

    def __init__(self, paths: configmod.ConfigPaths, *, clock: Callable[[], float] = time.time,
                 works_factory: Callable[..., MachineWorks] = MachineWorks,
                 host_facts: Callable[[str], scheduler.HostFacts] = read_host_facts,
                 processor_count: Optional[int] = None,
                 rng: Optional[random.Random] = None):
        self.paths = paths
        self.clock = clock
        self.rng = rng or random.Random()
        self.works_factory = works_factory
        self.host_facts = host_facts
        self.processor_count = processor_count or os.cpu_count() or 1
        self.config: Optional[configmod.Config] = None
        self.store: Optional[Store] = None
        self.works: Optional[MachineWorks] = None
        self.machines: dict[str, Machine] = {}
        self.finishes: dict[str, Finish] = {}
        self.status = DaemonStatus()
        self.started = clock()
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.reload_requested = False
        self.config_stamp: Optional[tuple] = None  # config_stamp() of the files last loaded
        self.wake_timer: Optional[asyncio.TimerHandle] = None
        self.reconcile_requested = False
        self.last_notes: set[str] = set()
        self.finish_retry_at: dict[str, float] = {}
        self.next_expiry = 0.0
        self.busy: set[str] = set()  # uuids with a create/stop/finish step in flight
        self.tasks: set[asyncio.Task] = set()
        self.services: list = []
        self.http_services = None
        self.metrics = None
        self.backed_off: set[str] = set()  # machinetypes in backoff at the last plan (metrics)
        self.queries_counted: dict[str, int] = {}  # responder answers already in the metrics
        self.notifier = None
        self.responder = None
        self.status_snapshot: Optional[vacquery.StatusSnapshot] = None
        self.last_in_slot: dict[int, Machine] = {}  # finished machines, for VacQuery
        self.host_status: dict = {}
        self.peer_cache = None
        self.restart_notices = RestartNotices()  # reloaded settings that wait for a restart
        self.executor = concurrent.futures.ThreadPoolExecutor(EXECUTOR_THREADS, "vacd-io")

    # -- configuration -------------------------------------------------------------------------

    def load_config(self) -> bool:
        """(Re)load configuration; on errors keep the previous one. True if a config is usable."""
        self.config_stamp = config_stamp(self.paths)  # before reading: a change during it counts
        config, problems = configmod.load_config(self.paths, processor_count=self.processor_count)
        for problem in problems:
            (log.error if problem.level == "error" else log.warning)("%s", problem)
        if config is None:
            if self.config is None:
                return False
            log.error("configuration has errors: keeping the previous configuration")
            return True
        if self.config is not None:
            config, lines = self.restart_notices.review(self.config.settings, config)
            for line in lines:
                log.warning("%s", line)
        config = self.expand_pipes(config)
        self.config = config
        self.apply_settings(config.settings)
        return True

    def apply_settings(self, settings: configmod.Settings) -> None:
        """Hand reloaded settings to the parts that keep their own copy."""
        if self.works is not None:
            self.works.settings = settings
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

    # -- the model -----------------------------------------------------------------------------

    def live(self) -> list[Machine]:
        return sorted(self.machines.values(), key=lambda machine: machine.slot)

    def update(self, machine: Machine, **changes) -> Machine:
        """Change a machine in the model and on disk (the record is the source of truth)."""
        machine = machine.replace(**changes)
        self.machines[machine.uuid] = machine
        self.store.save(machine)
        return machine

    def store_reading(self, machine: Machine, cpu_seconds: float, now: float) -> None:
        """Record a CPU reading of a running machine (and that it was seen running now)."""
        self.update(machine.with_cpu_reading(cpu_seconds, now))

    def machine_in_slot(self, slot: int) -> Optional[Machine]:
        for machine in self.machines.values():
            if machine.slot == slot:
                return machine
        return None

    # -- the cycle ---------------------------------------------------------------------------

    async def run_blocking(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def cycle(self, reconcile: bool) -> None:
        if self.reload_requested or reconcile or config_stamp(self.paths) != self.config_stamp:
            self.reload_requested = False
            self.load_config()
        now = self.clock()
        if reconcile:
            await self.reconcile(now)
            self.host_status = await self.run_blocking(factory_facts, self.config.settings.state_dir)
            if now >= self.next_expiry:
                self.next_expiry = now + EXPIRY_INTERVAL_SECONDS
                self.spawn(self.run_blocking(self.expire_machine_dirs, now), None)
        for machine in self.live():
            if (machine.state is MachineState.FINISHING and machine.uuid not in self.busy
                    and self.finish_retry_at.get(machine.uuid, 0.0) <= now):
                self.spawn(self.finish_or_retry(machine), machine.uuid)
        await self.plan_and_apply(now)
        self.publish_status(now)
        if reconcile and self.config.settings.vacmon_hostport:
            self.spawn(vacquery.send_vacmon(self.config.settings, vacquery.vacmon_cycle_messages(
                self.config.settings, self.status_snapshot)), None)

    async def reconcile(self, now: float) -> None:
        """Compare the model with libvirt: adopt, finish vanished machines, kill zombies."""
        try:
            domains = await self.run_blocking(self.works.list_domains)
        except Exception as error:  # libvirtd down: keep the model, try again next cycle
            log.error("cannot list libvirt domains: %s", error)
            return
        by_uuid = {domain.uuid: domain for domain in domains}
        for machine in self.live():
            if machine.uuid in self.busy:
                continue
            domain = by_uuid.get(machine.uuid)
            if machine.state in (MachineState.RUNNING, MachineState.STOPPING):
                if domain is None or not domain.active:
                    log.info("%s (%s) is no longer running", machine.name, machine.machinetype)
                    self.update(machine, state=MachineState.FINISHING,
                                finished=self.estimated_end(machine, now))
                else:
                    self.store_reading(machine, domain.cpu_seconds, now)
            elif machine.state is MachineState.CREATING:
                # Only reached after a restart: creation is never in flight across one.
                if domain is not None and domain.active:
                    log.info("adopting %s (%s) created before a restart", machine.name, machine.uuid)
                    self.update(machine, state=MachineState.RUNNING, started=machine.started or now,
                                heartbeat=now)
                else:
                    log.info("%s was never started: finishing it", machine.name)
                    self.update(machine, state=MachineState.FINISHING, finished=now)
        known = set(self.machines) | {machine.uuid for machine in self.last_in_slot.values()}
        for domain in domains:
            if domain.is_vac and domain.uuid not in known and domain.state in ZOMBIE_STATES:
                log.warning("destroying zombie domain %s (%s): no live machine has this UUID",
                            domain.name, domain.uuid)
                self.spawn(self.run_blocking(self.works.destroy, domain.uuid), None)

    def expire_machine_dirs(self, now: float) -> None:
        """Delete finished machines' directories after their machinetype's machines_dir_days."""
        days = {name: mt.machines_dir_days for name, mt in self.config.machinetypes.items()}
        removed = self.store.expire_machine_dirs(list(self.machines), days,
                                                 DEFAULT_MACHINES_DIR_DAYS, now)
        if removed:
            log.info("removed %d expired machine directories", len(removed))

    def estimated_end(self, machine: Machine, now: float) -> float:
        """When a machine found gone by reconcile ended: its last sign of life, never after now."""
        seen = [machine.heartbeat or machine.started or machine.created]
        activity = self.store.last_activity(machine)
        if activity is not None:
            seen.append(activity)
        return min(now, max(seen))

    async def plan_and_apply(self, now: float) -> None:
        if self.stopping.is_set():
            return
        config = self.config
        host = await self.run_blocking(self.host_facts, config.settings.state_dir)
        settings = config.settings
        reports = self.local_reports(now)
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
            config=config, machines=tuple(self.live()), num_slots=self.num_slots(),
            host=host, reports=reports, heartbeat_mtimes=heartbeat_mtimes, now=now,
            daemon_started=self.started)
        plan = scheduler.plan(snapshot, self.rng)
        retries = [when for when in self.finish_retry_at.values() if when >= now]
        self.wake_at(min([*retries, plan.wake_at or math.inf]), now)
        # Notes repeat every cycle while a condition lasts: log each when it starts to hold.
        notes = set(plan.notes)
        for note in plan.notes:
            if note not in self.last_notes:
                log.info("plan: %s", note)
        self.last_notes = notes
        if self.metrics is not None:
            self.count_backoffs(config, reports, now)
        for action in plan.actions:
            self.apply(action, now)

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

    def count_backoffs(self, config: configmod.Config, reports: tuple, now: float) -> None:
        """Count each machinetype's entries into backoff (for metrics only: it costs a second
        look at the space's standings)."""
        in_backoff = {name for name, standing in scheduler.standings(config, reports, now).items()
                      if scheduler.in_backoff(standing)}
        for name in in_backoff - self.backed_off:
            self.metrics.backoffs.inc(machinetype=name)
        self.backed_off = in_backoff

    def num_slots(self) -> int:
        """One slot per processor vac may use (each machine has at least one)."""
        return self.config.settings.total_processors or self.processor_count

    def local_reports(self, now: float):
        return scheduler.local_machinetype_reports(
            self.config, tuple(self.live()), self.finishes, self.config.settings.factory_name, now)

    def apply(self, action, now: float) -> None:
        if isinstance(action, scheduler.Create):
            self.start_creation(action, now)
        elif isinstance(action, scheduler.Shutdown):
            machine = self.machines.get(action.uuid)
            if machine is not None and machine.state is MachineState.RUNNING:
                log.info("shutting down %s: %s", machine.name, action.reason)
                self.spawn(self.stop(machine, action.shutdown_message), machine.uuid)
        elif isinstance(action, scheduler.LowerDeadline):
            machine = self.machines.get(action.uuid)
            if machine is not None:
                log.info("lowering deadline of %s: %s", machine.name, action.reason)
                machine = self.update(machine, deadline=action.deadline)
                self.spawn(self.run_blocking(self.works.lower_deadline, machine), None)

    # -- actions -------------------------------------------------------------------------------

    def spawn(self, coroutine, uuid: Optional[str]) -> None:
        """Run an action in the background; log its failure; wake the cycle when it ends."""
        if uuid is not None:
            self.busy.add(uuid)

        async def guarded():
            try:
                await coroutine
            except Exception:
                log.exception("internal error in a background step")
            finally:
                if uuid is not None:
                    self.busy.discard(uuid)
                self.wake.set()

        task = asyncio.get_running_loop().create_task(guarded())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def run_service(self, coroutine) -> None:
        """Run a long-lived task (peer cache, watchdog) until vacd stops."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.services.append(_TaskService(task))

    def start_creation(self, action, now: float) -> None:
        settings = self.config.settings
        machinetype = self.config.machinetypes[action.machinetype]
        if self.machine_in_slot(action.slot) is not None:
            log.error("planner chose occupied slot %d: ignored", action.slot)
            return
        machine = Machine(
            uuid=str(uuidlib.uuid4()), name=slot_name(settings.factory_name, action.slot),
            slot=action.slot, machinetype=machinetype.name,
            machine_model=machinetype.machine_model, processors=action.processors,
            created=now, deadline=action.deadline, fqan=machinetype.accounting_fqan,
            hs06=(settings.hs06_per_processor * action.processors
                  if settings.hs06_per_processor else None))
        log.info("creating %s (%s, %d processors, deadline %s): %s", machine.name,
                 machinetype.name, machine.processors,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(machine.deadline)), action.reason)
        self.machines[machine.uuid] = machine
        if self.metrics is not None:
            self.metrics.creations.inc(machinetype=machine.machinetype)
        self.spawn(self.create(machine, machinetype), machine.uuid)

    async def create(self, machine: Machine, machinetype) -> None:
        settings = self.config.settings
        try:
            await self.run_blocking(self.works.create, machine, machinetype, settings)
        except Exception as error:
            message = f"500 Vac could not create the machine: {error}"[:200]
            log.error("creating %s failed: %s", machine.name, error)
            if self.metrics is not None:
                self.metrics.creation_failures.inc(machinetype=machine.machinetype)
            self.status.last_creation_error = f"{machine.name}: {error}"
            self.status.last_creation_error_time = self.clock()
            with contextlib.suppress(Exception):
                self.store.write_file(machine, "joboutputs/shutdown_message", message)
            self.update(machine, state=MachineState.FINISHING, finished=self.clock())
            return
        now = self.clock()
        self.status.last_creation_error = None
        self.update(machine, state=MachineState.RUNNING, started=now, heartbeat=now)
        log.info("%s (%s) is running", machine.name, machine.uuid)

    async def stop(self, machine: Machine, factory_message: Optional[str]) -> None:
        """ACPI shutdown, then destroy after the grace period, never blocking anything else."""
        if factory_message and self.store.vm_shutdown_message(machine) is None:
            self.store.write_file(machine, "joboutputs/shutdown_message", factory_message)
        machine = self.update(machine, state=MachineState.STOPPING, stop_requested=self.clock())
        try:
            await self.run_blocking(self.works.shutdown, machine.uuid)
        except Exception as error:
            log.warning("ACPI shutdown of %s failed (%s): destroying it", machine.name, error)
        else:
            grace = self.config.settings.stop_grace_seconds
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.gone(machine.uuid), grace)
        await self.run_blocking(self.works.destroy, machine.uuid)
        current = self.machines.get(machine.uuid)
        if current is not None and current.state is MachineState.STOPPING:
            self.update(current, state=MachineState.FINISHING, finished=self.clock())

    async def gone(self, uuid: str) -> None:
        """Wait until a machine's domain has disappeared (polled: events may be missed)."""
        for _ in range(100000):
            if not await self.run_blocking(self.works.is_active, uuid):
                return
            await asyncio.sleep(0.5)

    async def finish_or_retry(self, machine: Machine) -> None:
        """Finish a machine; if a step fails (disk full, LVM busy), retry it a little later:
        every step is idempotent, so nothing is done twice."""
        try:
            await self.finish(machine)
        except Exception as error:
            log.error("finishing %s failed (%s): retrying in %.0f s", machine.name, error,
                      FINISH_RETRY_SECONDS)
            self.finish_retry_at[machine.uuid] = self.clock() + FINISH_RETRY_SECONDS
        else:
            self.finish_retry_at.pop(machine.uuid, None)

    async def finish(self, machine: Machine) -> None:
        """Account, record the finish, release disks and the slot. Every step idempotent."""
        if machine.started is not None and not machine.accounted:
            machine = await self.read_final_cpu(machine)
        settings = self.config.settings
        machinetype = self.config.machinetypes.get(machine.machinetype)
        now = self.clock()
        end = machine.finished or now
        vm_message = self.store.vm_shutdown_message(machine)
        message = scheduler.finish_message(machine, machinetype, vm_message, end)
        if message and vm_message is None:
            self.store.write_file(machine, "joboutputs/shutdown_message", message)
        if (not machine.accounted and machinetype is not None
                and scheduler.should_account(machine, machinetype, end)):
            await self.run_blocking(self.works.account, settings, machinetype, machine, end)
            machine = self.update(machine, accounted=True)
        finish = Finish(machine.machinetype, machine.name, message, end)
        self.store.save_finish(finish)
        previous = self.finishes.get(machine.machinetype)
        if previous is None or previous.finished_time <= finish.finished_time:
            self.finishes[machine.machinetype] = finish
        if settings.volume_group:
            # lvremove fails while QEMU still holds the volume; disk files need no such wait.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.gone(machine.uuid), LV_RELEASE_WAIT_SECONDS)
        await self.run_blocking(self.works.release, machine, settings)
        self.store.release_slot(machine)
        finished = machine.replace(state=MachineState.FINISHED, finished=end,
                                   shutdown_message=message, shutdown_message_time=end)
        self.store.save(finished)
        self.machines.pop(machine.uuid, None)
        self.last_in_slot[finished.slot] = finished
        ran = (end - machine.started) if machine.started else 0
        log.info("%s (%s) finished after %ds: %s", machine.name, machine.machinetype, ran,
                 message or "no shutdown message")
        if settings.vacmon_hostport:
            status = vacquery.MachineStatus.from_machine(settings.factory_name, finished)
            message = vacquery.vacmon_finish_message(settings, status, self.num_slots())
            self.spawn(vacquery.send_vacmon(settings, [message]), None)

    async def read_final_cpu(self, machine: Machine) -> Machine:
        """The machine with its CPU time up to its end: the reading taken at the guest's poweroff
        or before a destroy (or now, while libvirt still shows the domain). A machine that ended
        unseen (vacd down, libvirtd restarting) keeps its last periodic reading; the log says so."""
        try:
            reading = await self.run_blocking(self.works.cpu_seconds, machine.uuid)
        except HypervisorError as error:
            reading, why = None, f"libvirt cannot tell: {error}"
        else:
            why = "its domain was gone before it could be read"
        if reading is not None and reading >= machine.cpu_seconds:
            if reading > machine.cpu_seconds:
                machine = self.update(machine, cpu_seconds=reading)
            return machine
        if reading is not None:  # e.g. libvirt's 0 for a QEMU that has already exited
            why = f"the reading came back short, {reading:.0f} s"
        end = machine.finished or self.clock()
        last = machine.heartbeat or machine.started
        log.warning("%s (%s): no CPU reading at its end (%s): CPU time %.0f s is its last reading, "
                    "at %s, %.0f s before its end at %s", machine.name, machine.machinetype, why,
                    machine.cpu_seconds, scheduler.clock(last), max(0.0, end - last),
                    scheduler.clock(end))
        return machine

    async def sample_cpu(self) -> None:
        """Read the CPU time of every running machine every CPU_SAMPLE_SECONDS, all in one job
        of the thread pool (a few microseconds per domain for libvirtd)."""
        while True:
            await asyncio.sleep(CPU_SAMPLE_SECONDS)
            sampled = [machine.uuid for machine in self.live() if machine.state in SAMPLED_STATES]
            if not sampled:
                continue
            try:
                readings = await self.run_blocking(read_cpu, self.works, sampled)
            except Exception:
                log.exception("internal error reading CPU times")
                continue
            now = self.clock()
            for uuid, seconds in readings.items():
                machine = self.machines.get(uuid)
                if machine is not None and machine.state in SAMPLED_STATES:  # not ended meanwhile
                    self.store_reading(machine, seconds, now)

    # -- events --------------------------------------------------------------------------------

    def on_domain_stopped(self, uuid: str) -> None:
        """Called on the loop when libvirt reports a domain stopped (or the guest powered off)."""
        machine = self.machines.get(uuid)
        # Only a running machine finishes here: stop() handles a STOPPING one itself, and
        # libvirt's later STOPPED event finds the machine already finishing or gone.
        if machine is None or machine.state is not MachineState.RUNNING:
            return
        log.info("%s (%s) powered off", machine.name, machine.machinetype)
        self.update(machine, state=MachineState.FINISHING, finished=self.clock())
        self.wake.set()

    def on_reconnected(self) -> None:
        """libvirtd came back: events may have been missed, so reconcile at once."""
        log.info("reconnected to libvirt: reconciling")
        self.reconcile_requested = True
        self.wake.set()

    # -- status ------------------------------------------------------------------------------

    def publish_status(self, now: float) -> None:
        self.status.loop_time = now
        if self.http_services is not None:
            # The services run on this loop: a cycle that completes proves they are served.
            self.status.metadata_time = self.status.mjf_time = now
        if self.responder is not None:
            self.status.responder_time = now
        live = self.live()
        running = [m for m in live if m.state in (MachineState.RUNNING, MachineState.STOPPING)]
        total = self.num_slots()
        status = {
            "format": 1, "pid": os.getpid(), "time": now, "version": __version__,
            "loop_time": self.status.loop_time, "responder_time": self.status.responder_time,
            "metadata_time": self.status.metadata_time, "mjf_time": self.status.mjf_time,
            "running_machines": len(running), "slots": total,
            "running_processors": sum(m.processors for m in running),
            "total_processors": total,
            "last_creation_error": self.status.last_creation_error,
            "last_creation_error_time": self.status.last_creation_error_time,
        }
        try:
            self.store.write_status(status)
        except OSError as error:
            log.error("cannot write status file: %s", error)
        if self.notifier is not None:
            self.notifier.status(f"{len(running)}/{total} machines running, "
                                 f"{status['running_processors']}/{total} processors")
        self.status_snapshot = self.build_status_snapshot(now, total, running)
        if self.metrics is not None:
            self.metrics.slots.set(total)
            self.metrics.total_processors.set(total)
            self.metrics.running_processors.set(status["running_processors"])
            counts: dict = {}
            for machine in live:
                key = (machine.machinetype, machine.state.value)
                counts[key] = counts.get(key, 0) + 1
            self.metrics.machines.replace(counts)
            if self.responder is not None:
                for kind, answered in self.responder.answered.items():
                    new = answered - self.queries_counted.get(kind, 0)
                    if new:
                        self.metrics.vacquery_queries.inc(new, query=kind)
                    self.queries_counted[kind] = answered

    def build_status_snapshot(self, now: float, slots: int, running: list) -> vacquery.StatusSnapshot:
        """What the VacQuery responder reports until the next cycle."""
        settings = self.config.settings
        factory = settings.factory_name
        by_slot = {machine.slot: machine for machine in self.live()}
        machines = []
        for slot in range(slots):
            machine = by_slot.get(slot) or self.last_in_slot.get(slot)
            if machine is None:
                machines.append(vacquery.MachineStatus.empty_slot(factory, slot_name(factory, slot)))
            else:
                machines.append(vacquery.MachineStatus.from_machine(factory, machine))
        reports = self.local_reports(now)
        hs06_per_processor = settings.hs06_per_processor or 1.0
        factory_status = vacquery.FactoryStatus(
            factory=factory, running_processors=sum(m.processors for m in running),
            running_machines=len(running),
            running_hs06=sum(report.running_hs06 for report in reports),
            max_processors=slots, max_machines=slots, max_hs06=slots * hs06_per_processor,
            factory_heartbeat_time=int(self.status.loop_time),
            responder_heartbeat_time=int(self.status.responder_time) or None,
            mjf_heartbeat_time=int(self.status.mjf_time) or None,
            metadata_heartbeat_time=int(self.status.metadata_time) or None,
            **self.host_status)
        return vacquery.StatusSnapshot(machines=machines, machinetypes=reports,
                                       factory=factory_status)

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.load_config():
            raise StartupError("configuration has errors (see above); not starting")
        settings = self.config.settings
        self.store = Store(settings.state_dir)
        try:
            self.store.prepare()
            self.store.upgrade()
        except StoreError as error:
            raise StartupError(str(error)) from error
        loop = asyncio.get_running_loop()
        self.works = self.works_factory(
            self.store, settings,
            on_stopped=lambda uuid: loop.call_soon_threadsafe(self.on_domain_stopped, uuid),
            on_reconnected=lambda: loop.call_soon_threadsafe(self.on_reconnected))
        await self.connect_hypervisor()
        if self.stopping.is_set():
            return
        try:
            await self.run_blocking(self.works.check_storage)
        except DiskError as error:
            raise StartupError(f"volume_group {settings.volume_group}: {error}") from error
        await self.run_blocking(self.works.complete_accounting)
        self.finishes = self.store.load_finishes()
        for machine in self.store.live_machines():
            self.machines[machine.uuid] = machine
        log.info("recovered %d live machines from %s", len(self.machines), settings.state_dir)
        await self.reconcile(self.clock())
        try:
            await self.start_services()
        except (OSError, vacquery.SecretError) as error:
            raise StartupError(f"cannot start the services for the VMs and peers: {error}") from error

    async def connect_hypervisor(self) -> None:
        """Connect to libvirt and set up the network, retrying (with backoff) while it fails:
        libvirtd may start after vacd, or be restarting."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                await self.run_blocking(self.works.connect)
                return
            except HypervisorError as error:
                log.error("cannot use libvirt: %s; retrying in %.0f s", error, delay)
                if self.notifier is not None:
                    self.notifier.status(f"waiting for libvirt: {error}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, MAX_CONNECT_DELAY_SECONDS)

    async def start_services(self) -> None:
        """Bind the metadata/MJF services, the VacQuery responder and the optional metrics."""
        from vac.services import metadata

        settings = self.config.settings
        self.http_services = await metadata.start_services(settings, self.resolve_slot,
                                                           limits=service_limits(settings))
        self.services.append(self.http_services)
        secret = vacquery.load_secret(settings)
        self.responder = await vacquery.start_responder(settings, lambda: self.status_snapshot,
                                                        secret)
        self.services.append(_ClosingService(self.responder))
        self.peer_cache = vacquery.PeerReportCache(settings, secret=secret)
        self.run_service(self.peer_cache.run())
        if settings.metrics_port:
            from vac.ops import metrics

            registry = metrics.Metrics()
            self.metrics = metrics.VacMetrics(registry)
            runner = await metrics.start_metrics_server(registry, settings.metrics_port)
            self.services.append(_RunnerService(runner))

    def resolve_slot(self, slot: int):
        """The machine a VM in ``slot`` may see through the metadata and MJF services."""
        from vac.services.metadata import MachineContext

        machine = self.machine_in_slot(slot)
        if machine is None or machine.state not in SERVED_STATES:
            return None
        return MachineContext(machine, self.store.machine_dir(machine))

    async def run(self) -> None:
        from vac.ops.sdnotify import SystemdNotifier, watchdog_interval

        interval = watchdog_interval()
        self.notifier = SystemdNotifier(unset_environment=True)
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
                self.notifier.ready()
                log.info("vacd %s ready: factory %s in space %s", __version__,
                         self.config.settings.factory_name, self.config.settings.vac_space)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.05, next_reconcile - loop.time()))
        await self.shutdown()

    async def feed_watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog while the cycle keeps running (a hung cycle stops the pings)."""
        while not self.stopping.is_set():
            if self.clock() - self.status.loop_time < 3 * self.config.settings.reconcile_seconds:
                self.notifier.watchdog()
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
        if self.notifier is not None:
            self.notifier.stopping()
        if self.wake_timer is not None:
            self.wake_timer.cancel()
        for service in self.services:
            with contextlib.suppress(Exception):
                await service.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.works is not None:
            with contextlib.suppress(Exception):
                await self.run_blocking(self.works.close)
        self.executor.shutdown(wait=False)


def read_cpu(works: MachineWorks, uuids: list) -> dict:
    """uuid -> CPU seconds of these machines (run in the thread pool). Machines that are gone are
    left out: events and the reconcile handle their end."""
    readings = {}
    for uuid in uuids:
        try:
            seconds = works.cpu_seconds(uuid)
        except NotConnectedError:
            break  # libvirtd is away: the others cannot be read either
        except HypervisorError as error:
            log.debug("cannot read the CPU time of %s: %s", uuid, error)
            continue
        if seconds is not None:
            readings[uuid] = seconds
    return readings


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
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--debug", action="store_true", help="log planner notes and more")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    paths = configmod.ConfigPaths.from_args(args)
    if args.check_config:
        from vac.cli.main import cmd_conf

        args.check = True
        return cmd_conf(args)
    from vac.ops.logsetup import setup_logging

    if args.daemon and not args.log_file:
        args.log_file = DEFAULT_DAEMON_LOG  # a detached daemon has no stderr to write to
    try:
        setup_logging(args.log_file, logging.DEBUG if args.debug else logging.INFO, args.log_format)
    except OSError as error:
        print(f"vacd: cannot open log file: {error}", file=sys.stderr)
        return 1
    os.umask(0o022)
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
