"""``vac simulate``: the real planner and vacd's own executor over a simulated space, with a
virtual clock.

A scenario (vac.cli.scenario) names the space's vac configuration, the factories and, per
machinetype, when work is available and how long VMs with work run. ``Simulation.run()`` is a
discrete-event simulation:

* every factory is a ``vacd`` in miniature: vacd's ``Executor`` (vac.daemon.executor) with a
  simulated backend, in-memory records and the simulation's clock. Whenever something happens
  to it (a creation completed, a machine ended) and every ``tick_seconds``
  (``reconcile_seconds``) it finishes what ended and calls ``vac.core.scheduler.plan``
  unchanged, and the executor applies the actions exactly as in vacd;
* the backend's ``create`` completes ``create_seconds`` after the Create; if the machinetype has
  work at that moment the VM runs for a time drawn from the type's run-time distribution and
  writes ``200 Success``, otherwise it runs ``probe_seconds`` and writes ``300 No more work``. A
  VM still running at its deadline is shut down by the planner and gone ``stop_seconds`` later
  (or destroyed after ``stop_grace_seconds``, whichever comes first);
* peer reports are exchanged as through the daemon's peer cache: a factory sees the other
  factories' reports as of its last cache refresh (every ``peer_cache_seconds``, factories spread
  over ``peer_cache_phases`` refresh times) plus its own fresh report.

Two shortcuts make a thousand factories feasible; neither changes a planning decision:

* Peer reports reach the planner summed into one report per machinetype (running HS06, machines
  and young machines added up; the latest abort of any peer whose latest finish is an abort).
  The planner only ever sums reports per machinetype and takes the latest abort, so its actions
  are the same as with one report per peer (tests/test_simulate.py checks this against the
  per-peer reports of ``scheduler.local_machinetype_reports``). Only its notes differ.
* Each factory's report is kept up to date incrementally (at creations, starts, fizzle_seconds
  after a start, and finishes) instead of being recomputed from all its machines; the tests check
  it against ``scheduler.local_machinetype_reports`` too. A factory whose processors are all in
  use and none of whose machines is past its deadline is not planned: the planner could only veto.

Not simulated: host load (always 0), memory and disk (always enough), heartbeats (always fresh),
failures to create, vacuum pipes, ``draining`` and ``shutdown_time``.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from pathlib import Path
from typing import Any, Optional

from vac.backends.base import BackendMachine
from vac.cli.scenario import Scenario, ScenarioError, load_scenario, parse_duration
from vac.cli.simclock import VirtualRuntime
from vac.cli.simreport import (
    MachinetypeOutcome,
    PlotError,
    SimulationResult,
    Window,
    check_plot_support,
    format_json,
    format_summary,
    plot,
)
from vac.core import scheduler
from vac.core.config import Config
from vac.core.model import Finish, Machine, MachineState, MachinetypeReport, is_abort
from vac.daemon.executor import Executor, Hooks

__all__ = ["PlotError", "Scenario", "ScenarioError", "Simulation", "SimulationResult",
           "check_plot_support", "format_json", "format_summary", "load_scenario",
           "parse_duration", "plot", "simulate"]

START_TIME = 1_704_067_200.0  # 2024-01-01 00:00 UTC: scenario times are offsets from here
PEERS_REPORT_NAME = "peers.simulate.invalid"  # factory name of a summed report with no abort
WORK_MESSAGE = "200 Success"
NO_WORK_MESSAGE = "300 No more work"
ENOUGH_BYTES = 1 << 50  # disk and memory are not simulated

# Event priorities at equal times: machines change first, then caches refresh, then factories
# plan, then measurements are taken.
_CHANGE, _REFRESH, _PLAN, _MEASURE = range(4)


# ---------------------------------------------------------------------------------------------
# The simulation


@dataclasses.dataclass(frozen=True)
class _View:
    """The space as one peer-cache refresh saw it: per machinetype index (machines, processors,
    young machines) summed over all factories, and the up to two newest aborts
    ((factory, time, message, machine), newest first) of factories whose latest finish aborted."""

    totals: tuple[tuple[int, int, int], ...]
    aborts: tuple[tuple[tuple[str, float, str, str], ...], ...]


@dataclasses.dataclass(frozen=True)
class _Run:
    """What a started VM does: when it ends by itself, with which message, and whether it works."""

    ends: float
    message: str
    working: bool


# ---------------------------------------------------------------------------------------------
# The simulated machines: vacd's executor on a virtual clock


class _SimBackend:
    """A ``MachineBackend`` whose machines run as the scenario says: one with work runs for a
    time drawn from its type's run-time distribution and writes ``200 Success``, one without
    runs ``probe_seconds`` and writes ``300 No more work``; a stopped one is gone
    ``stop_seconds`` later. CPU time is not simulated."""

    kind = "vm"

    def __init__(self, simulation: Simulation, factory: _Factory):
        self.simulation = simulation
        self.factory = factory
        self.running: set[str] = set()

    def connect(self) -> None:
        """Nothing to connect to."""

    def close(self) -> None:
        """Nothing to close."""

    def create(self, machine: Machine, machinetype: Any, settings: Any, directory: Any) -> None:
        self.running.add(machine.uuid)
        self.simulation.started(self.factory, machine)

    def stop(self, uuid: str) -> None:
        self.simulation.push_after(self.simulation.scenario.stop_seconds, self.end, (uuid, None))

    def destroy(self, uuid: str) -> None:
        self.running.discard(uuid)

    def list_machines(self) -> list[BackendMachine]:
        return [BackendMachine(uuid, uuid, True) for uuid in self.running]

    def cpu_seconds(self, uuid: str) -> Optional[float]:
        return 0.0

    def release(self, machine: Machine, settings: Any, directory: Any) -> None:
        self.running.discard(machine.uuid)

    def forget(self, uuid: str) -> None:
        self.running.discard(uuid)

    def end(self, argument: tuple, _now: float) -> None:
        """The machine ends by itself (``message``) or after a stop (None)."""
        uuid, message = argument
        if uuid in self.running:  # not destroyed or ended meanwhile
            self.running.discard(uuid)
            if message is not None:
                self.factory.records.messages[uuid] = message
            self.factory.executor.on_stopped(uuid)


class _SimRecords:
    """The executor's ``Records`` in memory: only shutdown messages are kept."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}

    def prepare(self, machine: Machine, machinetype: Any, settings: Any) -> Path:
        return Path("/")

    def machine_dir(self, machine: Machine) -> Path:
        return Path("/")

    def save(self, machine: Machine) -> None:
        """Records are not simulated."""

    def vm_shutdown_message(self, machine: Machine) -> Optional[str]:
        return self.messages.get(machine.uuid)

    def write_shutdown_message(self, machine: Machine, message: str) -> None:
        self.messages[machine.uuid] = message

    def last_activity(self, machine: Machine) -> Optional[float]:
        return None

    def lower_deadline(self, machine: Machine) -> None:
        """MJF files are not simulated."""

    def account(self, settings: Any, machinetype: Any, machine: Machine, end: float) -> None:
        """Accounting is not simulated."""

    def save_finish(self, finish: Finish) -> None:
        """Kept in the executor's model only."""

    def release_slot(self, machine: Machine) -> None:
        self.messages.pop(machine.uuid, None)


class _SimBackends:
    """The executor's ``BackendSet``: every machine model runs on the factory's _SimBackend."""

    def __init__(self, backend: _SimBackend):
        self.backend = backend

    def for_model(self, model: str) -> _SimBackend:
        return self.backend

    def listable(self) -> dict:
        return {"sim": self.backend}

    def key_of_model(self, model: str) -> str:
        return "sim"


class _SimHooks(Hooks):
    def __init__(self, simulation: Simulation, factory: _Factory):
        self.simulation = simulation
        self.factory = factory

    def wake(self) -> None:
        self.simulation.request_plan(self.factory, self.simulation.now)

    def changed(self, before: Optional[Machine], after: Optional[Machine]) -> None:
        self.simulation.machine_changed(self.factory, before, after)


class _Factory:
    """One simulated vacd: an Executor with its simulated backend and records, its report and
    its peer-cache view."""

    def __init__(self, simulation: Simulation, name: str, config: Config, processors: int,
                 contribution: tuple, view: _View):
        self.name = name
        self.config = config
        self.processors = processors
        self.host = scheduler.HostFacts(processors, (0.0, 0.0, 0.0), ENOUGH_BYTES, ENOUGH_BYTES)
        self.records = _SimRecords()
        self.backend = _SimBackend(simulation, self)
        self.executor = Executor(config, _SimBackends(self.backend), self.records,
                                 simulation.runtime, _SimHooks(simulation, self),
                                 new_uuid=simulation.new_uuid)
        self.runs: dict[str, _Run] = {}
        self.young: set[str] = set()  # uuids starting or started less than fizzle_seconds ago
        self.contribution = contribution  # per machinetype index: (machines, processors, young)
        self.active_processors = 0
        self.overrun: dict[str, float] = {}  # uuid -> deadline of VMs that would outlive it
        self.own_reports: list[Optional[MachinetypeReport]] = [None] * len(contribution)  # None: stale
        self.view = view
        self.view_own = contribution  # this factory's part of ``view``
        self.peer_key: Optional[tuple[_View, tuple]] = None
        self.peer_reports: tuple[MachinetypeReport, ...] = ()
        self.plan_at: Optional[float] = None

    @property
    def machines(self) -> dict[str, Machine]:
        return self.executor.machines

    @property
    def finishes(self) -> dict[str, Finish]:
        return self.executor.finishes


class Simulation:
    """One run of a scenario. ``run()`` once; the state stays inspectable afterwards (tests)."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        config = scenario.config
        settings = config.settings
        self.names = list(config.machinetypes)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.machinetypes = [config.machinetypes[name] for name in self.names]
        self.shared = [i for i, mt in enumerate(self.machinetypes) if mt.target_share > 0]
        self.work = [scenario.work.get(name) for name in self.names]
        self.hs06_per_processor = settings.hs06_per_processor or scheduler.DEFAULT_HS06_PER_PROCESSOR
        self.heartbeat_types = frozenset(mt.name for mt in self.machinetypes if mt.heartbeat_file)
        self.peer_cache_seconds = settings.peer_cache_seconds
        self.end = START_TIME + scenario.duration
        self.workload_rng = random.Random(scenario.seed)
        self.planner_rng = random.Random(f"planner {scenario.seed}")
        self.events: list = []
        self.sequence = 0
        self.now = START_TIME
        self.vm_counter = 0
        # vacd's creations take create_seconds; every other backend call returns at once.
        self.runtime = VirtualRuntime(self, {_SimBackend.create: scenario.create_seconds})
        count = len(self.names)
        self.machines_total = [0] * count
        self.processors_total = [0] * count
        self.young_total = [0] * count
        self.aborts: list[dict] = [{} for _ in self.names]  # factory -> (time, message, machine)
        self.version = 0  # changes whenever the space's reports change
        zero = tuple((0, 0, 0) for _ in self.names)
        self.view = _View(zero, tuple(() for _ in self.names))
        self.view_version = 0
        self.factories: list[_Factory] = []
        for group in scenario.groups:
            width = max(4, len(str(group.count)))
            group_settings = dataclasses.replace(settings, total_processors=group.processors)
            for number in range(1, group.count + 1):
                name = f"{group.name}{number:0{width}d}.{settings.vac_space}"
                factory_config = config.replace(settings=dataclasses.replace(group_settings, factory_name=name))
                self.factories.append(_Factory(self, name, factory_config, group.processors, zero,
                                               self.view))
        self.phases = [self.factories[phase :: scenario.peer_cache_phases]
                       for phase in range(min(scenario.peer_cache_phases, len(self.factories)))]
        # Measurements.
        self.processor_seconds = [0.0] * count
        self.last_change = [START_TIME] * count
        self.busy = 0
        self.fill_target = scenario.fill_fraction * scenario.capacity
        self.fill_time: Optional[float] = None
        self.window_start = START_TIME
        self.window_vms = [0] * count
        self.window_probes = [0] * count
        self.windows: list[Window] = []
        self.vms = [0] * count
        self.probe_vms = [0] * count
        self.probe_processor_seconds = [0.0] * count
        self.returns = [model.work.returns() if model else () for model in self.work]
        self.recoveries: list[list] = [[] for _ in self.names]
        self.sample_times: list[float] = []
        self.samples: list[tuple[int, ...]] = []
        self.plans = 0
        self.skipped_plans = 0

    # -- events ----------------------------------------------------------------------------------

    def _push(self, when: float, priority: int, handler: Any, argument: Any) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, priority, self.sequence, handler, argument))

    def run(self) -> SimulationResult:
        scenario = self.scenario
        wall_started = time.perf_counter()
        if self.peer_cache_seconds > 0:
            for phase in range(len(self.phases)):
                offset = phase * self.peer_cache_seconds / len(self.phases)
                self._push(START_TIME + offset, _REFRESH, self._refresh, phase)
        for factory in self.factories:  # the daemons start during the first tick
            self._push(START_TIME + self.workload_rng.uniform(0, scenario.tick_seconds), _PLAN, self._tick, factory)
        self._push(START_TIME, _MEASURE, self._sample, None)
        self._push(min(START_TIME + scenario.window, self.end), _MEASURE, self._close_window, None)
        events = self.events
        handled = 0
        while events and events[0][0] <= self.end:
            when, _, _, handler, argument = heapq.heappop(events)
            self.now = when
            handler(argument, when)
            handled += 1
        return self._result(handled, time.perf_counter() - wall_started)

    def _refresh(self, phase: int, now: float) -> None:
        view = self._current_view()
        for factory in self.phases[phase]:
            factory.view = view
            factory.view_own = factory.contribution
        self._push(now + self.peer_cache_seconds, _REFRESH, self._refresh, phase)

    def _current_view(self) -> _View:
        if self.view_version != self.version:
            aborts = []
            for by_factory in self.aborts:
                newest = []
                for factory in reversed(by_factory):  # inserted in time order
                    when, message, machine = by_factory[factory]
                    newest.append((factory, when, message, machine))
                    if len(newest) == 2:
                        break
                aborts.append(tuple(newest))
            totals = tuple(zip(self.machines_total, self.processors_total, self.young_total))
            self.view = _View(totals, tuple(aborts))
            self.view_version = self.version
        return self.view

    def _tick(self, factory: _Factory, now: float) -> None:
        self._push(now + self.scenario.tick_seconds, _PLAN, self._tick, factory)
        if self._only_veto(factory, now):
            self.skipped_plans += 1
        else:
            self.request_plan(factory, now)

    @staticmethod
    def _only_veto(factory: _Factory, now: float) -> bool:
        """All processors in use and no deadline passed: the planner could only veto creation."""
        return factory.active_processors >= factory.processors and not any(
            now > deadline for deadline in factory.overrun.values())

    def request_plan(self, factory: _Factory, now: float) -> None:
        """Plan once at ``now`` after every change at ``now``, however many there are."""
        if factory.plan_at != now:
            factory.plan_at = now
            self._push(now, _PLAN, self._plan, factory)

    # -- the space's reports -----------------------------------------------------------------

    def _change(self, factory: _Factory, i: int, machines: int, processors: int, young: int, now: float) -> None:
        """A factory's report on machinetype ``i`` changes by these amounts at ``now``."""
        self.processor_seconds[i] += self.processors_total[i] * (now - self.last_change[i])
        self.last_change[i] = now
        self.machines_total[i] += machines
        self.processors_total[i] += processors
        self.young_total[i] += young
        contribution = factory.contribution
        old_machines, old_processors, old_young = contribution[i]
        factory.contribution = (*contribution[:i], (old_machines + machines, old_processors + processors,
                                                    old_young + young), *contribution[i + 1 :])
        factory.active_processors += processors
        factory.own_reports[i] = None
        self.version += 1
        self.busy += processors
        if processors > 0 and self.fill_time is None and self.busy >= self.fill_target:
            self.fill_time = now - START_TIME

    def own_reports(self, factory: _Factory) -> tuple[MachinetypeReport, ...]:
        """The factory's fresh report (what scheduler.local_machinetype_reports would give)."""
        reports = factory.own_reports
        for i, report in enumerate(reports):
            if report is None:
                mt = self.machinetypes[i]
                machines, processors, young = factory.contribution[i]
                finish = factory.finishes.get(mt.name)
                reports[i] = MachinetypeReport(
                    factory=factory.name, machinetype=mt.name,
                    running_hs06=processors * self.hs06_per_processor,
                    running_machines=machines, running_processors=processors, num_before_fizzle=young,
                    shutdown_message=finish.shutdown_message if finish else None,
                    shutdown_time=finish.finished_time if finish else None,
                    shutdown_machine=finish.machine_name if finish else None,
                    fqan=mt.accounting_fqan, max_wallclock_seconds=mt.max_wallclock_seconds,
                    max_processors=mt.max_processors)
        return tuple(reports)

    def peer_reports(self, factory: _Factory) -> tuple[MachinetypeReport, ...]:
        """The other factories' reports in the factory's peer cache, summed per machinetype."""
        if self.peer_cache_seconds > 0:
            view, own = factory.view, factory.view_own
        else:
            view, own = self._current_view(), factory.contribution
        key = factory.peer_key
        if key is not None and key[0] is view and key[1] is own:
            return factory.peer_reports
        hs06 = self.hs06_per_processor
        reports = []
        for i in self.shared:
            machines, processors, young = view.totals[i]
            own_machines, own_processors, own_young = own[i]
            latest = next((abort for abort in view.aborts[i] if abort[0] != factory.name), None)
            reports.append(MachinetypeReport(
                factory=latest[0] if latest else PEERS_REPORT_NAME, machinetype=self.names[i],
                running_hs06=(processors - own_processors) * hs06, running_machines=machines - own_machines,
                running_processors=processors - own_processors, num_before_fizzle=young - own_young,
                shutdown_message=latest[2] if latest else None, shutdown_time=latest[1] if latest else None,
                shutdown_machine=latest[3] if latest else None))
        factory.peer_key = (view, own)
        factory.peer_reports = tuple(reports)
        return factory.peer_reports

    # -- planning ----------------------------------------------------------------------------

    def snapshot(self, factory: _Factory, now: float) -> scheduler.Snapshot:
        heartbeats = {}
        if self.heartbeat_types:  # healthy VMs: their heartbeat files are always fresh
            heartbeats = {uuid: now for uuid, machine in factory.machines.items()
                          if machine.machinetype in self.heartbeat_types}
        return scheduler.Snapshot(
            config=factory.config, machines=tuple(factory.machines.values()), num_slots=factory.processors,
            host=factory.host, reports=self.peer_reports(factory) + self.own_reports(factory),
            heartbeat_mtimes=heartbeats, now=now, daemon_started=START_TIME)

    def _plan(self, factory: _Factory, now: float) -> None:
        """One cycle of the factory's vacd: finish what ended, plan, apply the plan."""
        factory.plan_at = None
        executor = factory.executor
        executor.start_finishes(now)
        if self._only_veto(factory, now):
            self.skipped_plans += 1
            return
        self.plans += 1
        for action in scheduler.plan(self.snapshot(factory, now), self.planner_rng).actions:
            executor.apply(action, now)

    # -- machines ----------------------------------------------------------------------------

    def new_uuid(self) -> str:
        self.vm_counter += 1
        return f"vm{self.vm_counter}"

    def push_after(self, delay: float, handler: Any, argument: Any) -> None:
        self._push(self.now + delay, _CHANGE, handler, argument)

    def started(self, factory: _Factory, machine: Machine) -> None:
        """The backend has started ``machine`` (now): what it will do, and when it ends."""
        now = self.now
        i = self.index[machine.machinetype]
        model = self.work[i]
        offset = now - START_TIME
        working = model.work.has_work(offset)
        self.vms[i] += 1
        self.window_vms[i] += 1
        if working:
            run = _Run(now + model.run_time.sample(self.workload_rng), WORK_MESSAGE, True)
            self._note_recovery(i, offset)
        else:
            run = _Run(now + model.probe_seconds, NO_WORK_MESSAGE, False)
            self.probe_vms[i] += 1
            self.window_probes[i] += 1
        factory.runs[machine.uuid] = run
        self._push(run.ends, _CHANGE, factory.backend.end, (machine.uuid, run.message))
        if run.ends > machine.deadline:
            factory.overrun[machine.uuid] = machine.deadline
        fizzle_seconds = self.machinetypes[i].fizzle_seconds
        if fizzle_seconds > 0:
            self._push(now + fizzle_seconds, _CHANGE, self._grown_up, (factory, machine.uuid))
        else:
            self._grown_up((factory, machine.uuid), now)

    def _note_recovery(self, i: int, offset: float) -> None:
        """The first working VM after work returned; a return missed entirely counts as None."""
        returns = self.returns[i]
        recoveries = self.recoveries[i]
        while len(recoveries) < len(returns) and returns[len(recoveries)] <= offset:
            returned = returns[len(recoveries)]
            missed = len(recoveries) + 1 < len(returns) and returns[len(recoveries) + 1] <= offset
            recoveries.append((returned, None if missed else offset - returned))

    def _grown_up(self, argument: tuple, now: float) -> None:
        factory, uuid = argument
        if uuid in factory.young:
            factory.young.discard(uuid)
            machine = factory.machines[uuid]
            self._change(factory, self.index[machine.machinetype], 0, 0, -1, now)

    def machine_changed(self, factory: _Factory, before: Optional[Machine],
                        after: Optional[Machine]) -> None:
        """Keep the factory's report and the measurements up to date as its executor changes
        its machines."""
        now = self.now
        if before is None:  # planned: it counts from now on
            factory.young.add(after.uuid)
            self._change(factory, self.index[after.machinetype], 1, after.processors, 1, now)
        elif after.state is MachineState.FINISHED:
            self._finished(factory, after, now)
        elif after.state is MachineState.STOPPING:
            factory.overrun.pop(after.uuid, None)
        elif after.deadline != before.deadline:
            run = factory.runs.get(after.uuid)
            if run is not None and run.ends > after.deadline:
                factory.overrun[after.uuid] = after.deadline

    def _finished(self, factory: _Factory, machine: Machine, now: float) -> None:
        i = self.index[machine.machinetype]
        aborts = self.aborts[i]
        aborts.pop(factory.name, None)
        if is_abort(machine.shutdown_message):
            aborts[factory.name] = (now, machine.shutdown_message, machine.name)
        run = factory.runs.pop(machine.uuid, None)
        factory.overrun.pop(machine.uuid, None)
        if run is not None and not run.working:
            self.probe_processor_seconds[i] += machine.processors * (now - machine.started)
        young = 1 if machine.uuid in factory.young else 0
        factory.young.discard(machine.uuid)
        self._change(factory, i, -1, -machine.processors, -young, now)

    # -- measurements --------------------------------------------------------------------------

    def _sample(self, _: None, now: float) -> None:
        self.sample_times.append(now - START_TIME)
        self.samples.append(tuple(self.processors_total))
        if now + self.scenario.sample_seconds <= self.end:
            self._push(now + self.scenario.sample_seconds, _MEASURE, self._sample, None)

    def _close_window(self, _: None, now: float) -> None:
        for i, processors in enumerate(self.processors_total):
            self.processor_seconds[i] += processors * (now - self.last_change[i])
            self.last_change[i] = now
        shared = [self.names[i] for i in self.shared]
        self.windows.append(Window(
            start=self.window_start - START_TIME, end=now - START_TIME,
            processor_seconds={name: self.processor_seconds[self.index[name]] for name in shared},
            vms={name: self.window_vms[self.index[name]] for name in shared},
            probe_vms={name: self.window_probes[self.index[name]] for name in shared},
            capacity=self.scenario.capacity))
        self.processor_seconds = [0.0] * len(self.names)
        self.window_vms = [0] * len(self.names)
        self.window_probes = [0] * len(self.names)
        self.window_start = now
        if now < self.end:
            self._push(min(now + self.scenario.window, self.end), _MEASURE, self._close_window, None)

    def _result(self, events: int, wall_seconds: float) -> SimulationResult:
        shared = [self.names[i] for i in self.shared]
        total_share = sum(self.machinetypes[i].target_share for i in self.shared)
        outcomes = {}
        for i in self.shared:
            name = self.names[i]
            recoveries = list(self.recoveries[i])
            recoveries += [(returned, None) for returned in self.returns[i][len(recoveries):]
                           if returned < self.scenario.duration]
            outcomes[name] = MachinetypeOutcome(
                name=name, target=self.machinetypes[i].target_share / total_share, vms=self.vms[i],
                probe_vms=self.probe_vms[i], probe_processor_hours=self.probe_processor_seconds[i] / 3600,
                recoveries=tuple(recoveries))
        windows = tuple(self.windows)
        whole = Window(
            start=0.0, end=self.scenario.duration,
            processor_seconds={name: sum(w.processor_seconds[name] for w in windows) for name in shared},
            vms={name: sum(w.vms[name] for w in windows) for name in shared},
            probe_vms={name: sum(w.probe_vms[name] for w in windows) for name in shared},
            capacity=self.scenario.capacity)
        return SimulationResult(
            scenario=self.scenario, machinetypes=outcomes, windows=windows, whole=whole,
            fill_seconds=self.fill_time, sample_times=tuple(self.sample_times),
            sample_processors={name: tuple(sample[self.index[name]] for sample in self.samples)
                               for name in shared},
            events=events, plans=self.plans, skipped_plans=self.skipped_plans, wall_seconds=wall_seconds)


def simulate(scenario: Scenario) -> SimulationResult:
    """Run ``scenario`` once and return what was measured."""
    return Simulation(scenario).run()
