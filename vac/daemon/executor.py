"""The executor: applies the planner's and the life cycle's actions to machines.

One ``Executor`` holds a factory's model (live machines, the last finished machine of each
slot, the latest finish of each machinetype) and changes it only through ``transition`` (the
table of legal state changes is vac.core.model.TRANSITIONS; an illegal change is logged and
refused). It applies

* the planner's actions (vac.core.scheduler: ``Create``, ``Shutdown``, ``LowerDeadline``),
* the life cycle's actions (vac.core.lifecycle: ``Adopt``, ``MarkGone``, ``RecordCpu``,
  ``DestroyZombie``, ``Finish``), which ``reconcile`` and ``start_finishes`` decide,
* and a backend's news that a machine ended (``on_stopped``),

through three seams: the machine backends (vac.backends.base.MachineBackend, by machine model),
``Records`` (what is kept on disk, and a machine's preparation before its backend starts it) and
``Runtime`` (the clock, blocking calls, background steps, events). vacd gives it its thread pool
and asyncio loop; ``vac simulate`` gives it simulated backends, in-memory records and a
virtual clock, so both run this very code.

Whoever plans (slots on a node for vacd, a quota in a tenancy for vcycled) hands ``apply`` its
actions; three rules given at construction differ between the two: ``capacity`` refuses a
creation the planner should not have made (an occupied slot for vacd, a quota exceeded for
vcycled), ``naming`` says how a created machine is called, and ``lifecycle_rule`` decides from
the backends' listings (vac.core.lifecycle.reconcile for vacd; None for vcycled, whose quota
planner reads the listing ``reconcile`` returns and decides the cloud's life cycle itself).
``settings_for`` gives a machinetype's settings (vcycle's HS06 and memory are per machinetype).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

from vac.backends.base import BackendError, BackendMachine, BackendUnavailableError, MachineBackend
from vac.core import lifecycle, scheduler
from vac.core.config import Config, Machinetype, Settings
from vac.core.model import Finish, IllegalTransition, Machine, MachineState, slot_name

log = logging.getLogger("vacd")

MAX_MESSAGE_CHARS = 200
SAMPLED_STATES = (MachineState.RUNNING, MachineState.STOPPING)  # their CPU time grows


class Event(Protocol):
    def set(self) -> None: ...

    async def wait(self, timeout: float) -> bool:
        """True once set, False if ``timeout`` seconds passed first."""


class Runtime(Protocol):
    """Time and concurrency for the executor (vacd: asyncio and a thread pool)."""

    def now(self) -> float: ...

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)``, which may block, off the loop."""

    def spawn(self, coroutine: Coroutine, done: Callable[[], None]) -> None:
        """Run ``coroutine`` in the background, then ``done()``."""

    def event(self) -> Event: ...


class Records(Protocol):
    """What the executor keeps outside memory (vac.daemon.machines.MachineWorks for vacd).
    Methods marked blocking are called through ``Runtime.call``."""

    def prepare(self, machine: Machine, machinetype: Machinetype, settings: Settings) -> Path:
        """Blocking: write the machine's directory (MJF, user_data, keys); return it."""

    def machine_dir(self, machine: Machine) -> Path: ...

    def save(self, machine: Machine) -> None: ...

    def vm_shutdown_message(self, machine: Machine) -> Optional[str]: ...

    def write_shutdown_message(self, machine: Machine, message: str) -> None: ...

    def last_activity(self, machine: Machine) -> Optional[float]: ...

    def lower_deadline(self, machine: Machine) -> None:
        """Blocking: rewrite the machine's MJF deadline files."""

    def account(self, settings: Settings, machinetype: Machinetype, machine: Machine,
                end: float) -> None:
        """Blocking: write the machine's APEL record."""

    def save_finish(self, finish: Finish) -> None: ...

    def release_slot(self, machine: Machine) -> None: ...


class BackendSet(Protocol):
    """The backends by machine model (vac.daemon.backends.Backends for vacd)."""

    def for_model(self, model: str) -> Optional[MachineBackend]: ...

    def listable(self) -> dict[str, MachineBackend]:
        """Connected backends by key: the ones whose machines ``reconcile`` compares."""

    def key_of_model(self, model: str) -> Optional[str]: ...


class Hooks:
    """What the executor tells its host; vacd and the simulation override what they use."""

    def wake(self) -> None:
        """Something changed: plan again soon."""

    def changed(self, before: Optional[Machine], after: Optional[Machine]) -> None:
        """A machine was added (``before`` None), changed, or finished and left the model
        (``after`` FINISHED)."""

    def created(self, machine: Machine) -> None:
        """A machine was planned and its creation begins."""

    def started(self, machine: Machine) -> None:
        """Its backend started it."""

    def creation_failed(self, machine: Machine, error: str) -> None: ...

    def finished(self, machine: Machine) -> None: ...


def slot_naming(settings: Settings, action: scheduler.Create) -> str:
    return slot_name(settings.factory_name, action.slot)


def slot_capacity(executor: Executor, action: scheduler.Create) -> Optional[str]:
    """vacd's capacity rule: one live machine per slot."""
    if executor.machine_in_slot(action.slot) is not None:
        return f"the planner chose occupied slot {action.slot}"
    return None


CapacityRule = Callable[["Executor", scheduler.Create], Optional[str]]
LifecycleRule = Callable[..., list]  # the signature of vac.core.lifecycle.reconcile


def read_cpu(groups: list[tuple[MachineBackend, list[str]]]) -> dict[str, float]:
    """uuid -> CPU seconds of these machines (one job of the thread pool). Machines whose time
    cannot be read are left out: events and the reconcile handle their end."""
    readings = {}
    for backend, uuids in groups:
        for uuid in uuids:
            try:
                seconds = backend.cpu_seconds(uuid)
            except BackendUnavailableError:
                break  # the engine is away: the others cannot be read either
            except BackendError as error:
                log.debug("cannot read the CPU time of %s: %s", uuid, error)
                continue
            if seconds is not None:
                readings[uuid] = seconds
    return readings


class Executor:
    """A factory's machines and the steps of their lives."""

    def __init__(self, config: Config, backends: BackendSet, records: Records,
                 runtime: Runtime, hooks: Optional[Hooks] = None, *,
                 naming: Callable[[Settings, scheduler.Create], str] = slot_naming,
                 capacity: CapacityRule = slot_capacity,
                 lifecycle_rule: Optional[LifecycleRule] = lifecycle.reconcile,
                 settings_for: Optional[Callable[[str], Settings]] = None,
                 new_uuid: Callable[[], str] = lambda: str(uuidlib.uuid4()),
                 logger: Union[logging.Logger, logging.LoggerAdapter] = log):
        # vcycled passes its own (with the space in each line): the lines are its, not vacd's.
        self.log = logger
        self.config = config
        self.backends = backends
        self.records = records
        self.runtime = runtime
        self.hooks = hooks or Hooks()
        self.naming = naming
        self.capacity = capacity
        self.lifecycle_rule = lifecycle_rule
        self._settings_for = settings_for
        self.new_uuid = new_uuid
        self.machines: dict[str, Machine] = {}
        self.finishes: dict[str, Finish] = {}
        self.last_in_slot: dict[int, Machine] = {}  # finished machines, for VacQuery
        self.busy: set[str] = set()  # uuids with a create/stop/finish step in flight
        self.retry_at: dict[str, float] = {}  # failed finishes: when to try again
        self._ended: dict[str, Event] = {}  # machines being stopped: set when they end
        self.unanswered: set[str] = set()  # backend keys whose listing failed in the last reconcile
        # Records of one machine are written from the loop and (CPU samples) the thread pool:
        # one at a time, and a sample only while it is still the machine's current record.
        self._save_lock = threading.Lock()

    # -- the model -------------------------------------------------------------------------------

    def live(self) -> list[Machine]:
        return sorted(self.machines.values(), key=lambda machine: machine.slot)

    def machine_in_slot(self, slot: int) -> Optional[Machine]:
        for machine in self.machines.values():
            if machine.slot == slot:
                return machine
        return None

    def settings_for(self, machinetype: str) -> Settings:
        return self._settings_for(machinetype) if self._settings_for else self.config.settings

    def add(self, machine: Machine) -> Machine:
        """Take a machine over that this executor did not create (vcycled: one listed in its
        cloud with no record here), in the state it is found in."""
        return self._put(None, machine)

    def _put(self, before: Optional[Machine], after: Machine) -> Machine:
        self.machines[after.uuid] = after
        with self._save_lock:
            self.records.save(after)
        self.hooks.changed(before, after)
        return after

    def update(self, machine: Machine, **changes: Any) -> Machine:
        """Change fields other than the state, in the model and on disk."""
        return self._put(machine, machine.replace(**changes))

    def transition(self, machine: Machine, state: MachineState, **changes: Any) -> Optional[Machine]:
        """The one way a machine's state changes; an illegal change is logged and refused."""
        try:
            after = machine.transition(state, **changes)
        except IllegalTransition as error:
            self.log.error("refused: %s", error)
            return None
        return self._put(machine, after)

    def _persist_samples(self, machines: list[Machine]) -> None:
        """Save CPU readings (in the thread pool); a record replaced meanwhile is newer."""
        for machine in machines:
            with self._save_lock:
                if self.machines.get(machine.uuid) is machine:
                    self.records.save(machine)

    async def record_cpu(self, readings: dict[str, float]) -> None:
        """Apply CPU readings of running machines in memory, then save them off the loop."""
        now = self.runtime.now()
        changed = []
        for uuid, seconds in readings.items():
            machine = self.machines.get(uuid)
            if machine is not None and machine.state in SAMPLED_STATES:  # not ended meanwhile
                changed.append(machine.with_cpu_reading(seconds, now))
                self.machines[uuid] = changed[-1]
        if changed:
            await self.runtime.call(self._persist_samples, changed)

    async def sample_cpu(self) -> None:
        """Read the CPU time of every running machine, all in one job of the thread pool."""
        groups: dict[int, tuple[MachineBackend, list[str]]] = {}
        for machine in self.live():
            backend = self.backends.for_model(machine.machine_model)
            if machine.state in SAMPLED_STATES and backend is not None:
                groups.setdefault(id(backend), (backend, []))[1].append(machine.uuid)
        if groups:
            await self.record_cpu(await self.runtime.call(read_cpu, list(groups.values())))

    # -- background steps ------------------------------------------------------------------------

    def spawn(self, coroutine: Awaitable, uuid: Optional[str]) -> None:
        """Run a step in the background; log its failure; wake the host when it ends."""
        if uuid is not None:
            self.busy.add(uuid)

        async def guarded() -> None:
            try:
                await coroutine
            except Exception:
                self.log.exception("internal error in a background step")

        def done() -> None:
            if uuid is not None:
                self.busy.discard(uuid)
            self.hooks.wake()

        self.runtime.spawn(guarded(), done)

    # -- the planner's actions -------------------------------------------------------------------

    def apply(self, action: scheduler.Action, now: float) -> None:
        if isinstance(action, scheduler.Create):
            self.start_creation(action, now)
        elif isinstance(action, scheduler.Shutdown):
            machine = self.machines.get(action.uuid)
            if machine is not None and machine.state is MachineState.RUNNING:
                self.log.info("shutting down %s: %s", machine.name, action.reason)
                self.spawn(self.stop(machine, action.shutdown_message), machine.uuid)
        elif isinstance(action, scheduler.LowerDeadline):
            machine = self.machines.get(action.uuid)
            if machine is not None:
                self.log.info("lowering deadline of %s: %s", machine.name, action.reason)
                machine = self.update(machine, deadline=action.deadline)
                self.spawn(self.runtime.call(self.records.lower_deadline, machine), None)

    def start_creation(self, action: scheduler.Create, now: float) -> None:
        machinetype = self.config.machinetypes[action.machinetype]
        settings = self.settings_for(machinetype.name)
        refused = self.capacity(self, action)
        if refused is not None:
            self.log.error("creation of a %s machine refused: %s", machinetype.name, refused)
            return
        machine = Machine(
            uuid=self.new_uuid(), name=self.naming(settings, action), slot=action.slot,
            machinetype=machinetype.name, machine_model=machinetype.machine_model,
            processors=action.processors, created=now, deadline=action.deadline,
            fqan=machinetype.accounting_fqan,
            hs06=(settings.hs06_per_processor * action.processors
                  if settings.hs06_per_processor else None))
        if log.isEnabledFor(logging.INFO):
            self.log.info("creating %s (%s, %d processors, deadline %s): %s", machine.name,
                     machinetype.name, machine.processors,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(machine.deadline)),
                     action.reason)
        self.machines[machine.uuid] = machine
        self.hooks.changed(None, machine)
        self.hooks.created(machine)
        self.spawn(self.create(machine, machinetype), machine.uuid)

    async def create(self, machine: Machine, machinetype: Machinetype) -> None:
        """Prepare the machine's directory (the same for every backend), then start it."""
        settings = self.settings_for(machinetype.name)
        backend = self.backends.for_model(machinetype.machine_model)
        try:
            if backend is None:
                raise BackendError(f"no backend runs machine model {machinetype.machine_model} "
                                   "on this factory (see the log at start)")
            directory = await self.runtime.call(self.records.prepare, machine, machinetype,
                                                settings)
            await self.runtime.call(backend.create, machine, machinetype, settings, directory)
        except Exception as error:
            self.log.error("creating %s failed: %s", machine.name, error)
            self.hooks.creation_failed(machine, f"{machine.name}: {error}")
            try:
                self.records.write_shutdown_message(
                    machine, f"500 Vac could not create the machine: {error}"[:MAX_MESSAGE_CHARS])
            except OSError as write_error:
                self.log.error("cannot record why %s failed: %s", machine.name, write_error)
            self.transition(self.machines.get(machine.uuid, machine), MachineState.FINISHING,
                            finished=self.runtime.now())
            return
        now = self.runtime.now()
        if self.transition(self.machines.get(machine.uuid, machine), MachineState.RUNNING,
                           started=now, heartbeat=now):
            self.log.info("%s (%s) is running", machine.name, machine.uuid)
            self.hooks.started(machine)

    async def stop(self, machine: Machine, factory_message: Optional[str]) -> None:
        """Graceful stop, then destroy after the grace period, never blocking anything else."""
        machine = self.machines.get(machine.uuid)
        if machine is None or machine.state is not MachineState.RUNNING:
            return  # it ended while the step was being started
        if factory_message and self.records.vm_shutdown_message(machine) is None:
            self.records.write_shutdown_message(machine, factory_message)
        ended = self._ended[machine.uuid] = self.runtime.event()
        try:
            stopping = self.transition(machine, MachineState.STOPPING,
                                       stop_requested=self.runtime.now())
            if stopping is None:
                return
            backend = self.backends.for_model(machine.machine_model)
            try:
                if backend is None:
                    raise BackendError("its backend is not available")
                await self.runtime.call(backend.stop, machine.uuid)
            except Exception as error:
                self.log.warning("graceful stop of %s failed (%s): destroying it", machine.name, error)
            else:
                await ended.wait(self.config.settings.stop_grace_seconds)
            if backend is not None:
                await self.runtime.call(backend.destroy, machine.uuid)
        finally:
            self._ended.pop(machine.uuid, None)
        current = self.machines.get(machine.uuid)
        if current is not None and current.state is MachineState.STOPPING:
            self.transition(current, MachineState.FINISHING, finished=self.runtime.now())

    # -- ends, finishes and the reconcile --------------------------------------------------------

    def on_stopped(self, uuid: str) -> None:
        """A backend says a machine ended (on the loop; may repeat, may be a stranger's)."""
        ended = self._ended.get(uuid)
        if ended is not None:
            ended.set()  # stop() finishes it
            return
        machine = self.machines.get(uuid)
        if machine is None or machine.state is not MachineState.RUNNING:
            return
        backend = self.backends.for_model(machine.machine_model)
        self.log.info("%s (%s) %s", machine.name, machine.machinetype,
                 "powered off" if backend is None or backend.kind == "vm" else "ended")
        self.transition(machine, MachineState.FINISHING, finished=self.runtime.now())
        self.hooks.wake()

    def start_finishes(self, now: float) -> None:
        for action in lifecycle.due_finishes(list(self.machines.values()), self.busy,
                                             self.retry_at, now):
            self.apply_lifecycle(action, now)

    async def reconcile(self) -> list[tuple[str, BackendMachine]]:
        """Compare the model with every connected backend's listing and apply the result.
        Returns the listing (by backend key), for a planner that needs it (a quota planner
        reads the cloud's states and processors from it)."""
        listed, answered, self.unanswered = [], set(), set()
        for key, backend in self.backends.listable().items():
            try:
                machines = await self.runtime.call(backend.list_machines)
            except Exception as error:  # the engine is down: keep its machines as they are
                self.log.error("cannot list the %s machines: %s", key, error)
                self.unanswered.add(key)
                continue
            answered.add(key)
            listed += [(key, machine) for machine in machines]
        if self.lifecycle_rule is None:
            return listed
        live = [machine for machine in self.live()
                if self.backends.key_of_model(machine.machine_model) in answered]
        # Only a machine found gone needs its newest file time (its estimated end): reading it
        # for every running machine would stat each one's files at every reconcile.
        running = {machine.uuid for _, machine in listed if machine.active}
        watched = [m for m in live if m.state in lifecycle.RUNNING_STATES and m.uuid not in self.busy
                   and m.uuid not in running]
        activity = dict(zip((m.uuid for m in watched), await self.runtime.call(
            lambda: [self.records.last_activity(m) for m in watched])))
        known = set(self.machines) | {m.uuid for m in self.last_in_slot.values()}
        readings = {}
        now = self.runtime.now()
        for action in self.lifecycle_rule(live, self.busy, listed, known, activity, now):
            if isinstance(action, lifecycle.RecordCpu):
                readings[action.uuid] = action.seconds
            else:
                self.apply_lifecycle(action, now)
        await self.record_cpu(readings)
        return listed

    def apply_lifecycle(self, action: lifecycle.LifecycleAction, now: float) -> None:
        if isinstance(action, lifecycle.DestroyZombie):
            self.log.warning("destroying zombie machine %s (%s): no live machine has this UUID",
                        action.name, action.uuid)
            self.spawn(self.destroy_zombie(action), action.uuid)
            return
        machine = self.machines.get(action.uuid)
        if machine is None:
            return
        if isinstance(action, lifecycle.Adopt):
            self.log.info("%s", action.reason)
            self.transition(machine, MachineState.RUNNING, started=machine.started or now,
                            heartbeat=now)
        elif isinstance(action, lifecycle.MarkGone):
            self.log.info("%s", action.reason)
            self.transition(machine, MachineState.FINISHING, finished=action.end)
        elif isinstance(action, lifecycle.Finish):
            self.spawn(self.finish_or_retry(machine), machine.uuid)

    async def destroy_zombie(self, action: lifecycle.DestroyZombie) -> None:
        backend = self.backends.listable().get(action.backend)
        if backend is None:
            return
        if action.active:
            await self.runtime.call(backend.destroy, action.uuid)
        await self.runtime.call(backend.forget, action.uuid)

    async def finish_or_retry(self, machine: Machine) -> None:
        """Finish a machine; if a step fails (disk full, LVM busy), retry it a little later:
        every step is idempotent, so nothing is done twice."""
        try:
            await self.finish(machine)
        except Exception as error:
            self.log.error("finishing %s failed (%s): retrying in %.0f s", machine.name, error,
                      lifecycle.FINISH_RETRY_SECONDS)
            self.retry_at[machine.uuid] = self.runtime.now() + lifecycle.FINISH_RETRY_SECONDS
        else:
            self.retry_at.pop(machine.uuid, None)

    async def finish(self, machine: Machine) -> None:
        """Final CPU reading, shutdown message, APEL record, finish record, release, slot."""
        backend = self.backends.for_model(machine.machine_model)
        # Clouds report no CPU time (their records account wall time).
        if machine.started is not None and not machine.accounted and backend is not None \
                and backend.kind != "cloud":
            machine = await self.read_final_cpu(machine, backend)
        settings = self.settings_for(machine.machinetype)
        machinetype = self.config.machinetypes.get(machine.machinetype)
        end = machine.finished or self.runtime.now()
        steps = lifecycle.finish_steps(machine, machinetype,
                                       self.records.vm_shutdown_message(machine), end)
        if steps.write_message:
            self.records.write_shutdown_message(machine, steps.message)
        if steps.account:
            await self.runtime.call(self.records.account, settings, machinetype, machine, end)
            machine = self.update(machine, accounted=True)
        finish = Finish(machine.machinetype, machine.name, steps.message, end)
        self.records.save_finish(finish)
        previous = self.finishes.get(machine.machinetype)
        if previous is None or previous.finished_time <= finish.finished_time:
            self.finishes[machine.machinetype] = finish
        if backend is not None:
            await self.runtime.call(backend.release, machine, settings,
                                    self.records.machine_dir(machine))
        self.records.release_slot(machine)
        finished = self.transition(machine, MachineState.FINISHED, finished=end,
                                   shutdown_message=steps.message, shutdown_message_time=end)
        if finished is None:
            return
        self.machines.pop(machine.uuid, None)
        self.last_in_slot[finished.slot] = finished
        ran = (end - machine.started) if machine.started else 0
        self.log.info("%s (%s) finished after %ds: %s", machine.name, machine.machinetype, ran,
                 steps.message or "no shutdown message")
        self.hooks.finished(finished)

    async def read_final_cpu(self, machine: Machine, backend: MachineBackend) -> Machine:
        """The machine with its CPU time up to its end: the backend's reading at its end. A
        machine that ended unseen (vacd down, libvirtd restarting) keeps its last periodic
        reading; the log says so."""
        try:
            reading = await self.runtime.call(backend.cpu_seconds, machine.uuid)
        except BackendError as error:
            reading, problem = None, f"its backend cannot tell: {error}"
        else:
            problem = lifecycle.final_cpu_problem(machine, reading)
        if problem is None:
            return self.update(machine, cpu_seconds=reading) if reading > machine.cpu_seconds \
                else machine
        end = machine.finished or self.runtime.now()
        last = machine.heartbeat or machine.started
        self.log.warning("%s (%s): no CPU reading at its end (%s): CPU time %.0f s is its last reading, "
                    "at %s, %.0f s before its end at %s", machine.name, machine.machinetype,
                    problem, machine.cpu_seconds, scheduler.clock(last), max(0.0, end - last),
                    scheduler.clock(end))
        return machine
