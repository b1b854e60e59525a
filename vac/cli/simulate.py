"""``vac simulate``: the real planner over a simulated space, with a virtual clock.

A scenario file (INI, documented in vac(1) and ``etc/simulate/``) names the space's vac
configuration, the factories (``[hosts NAME]``: how many, how many processors) and, per machinetype, when work is
available and how long VMs with work run. ``Simulation.run()`` is a discrete-event simulation:

* every factory is a ``vacd`` in miniature: it calls ``vac.core.scheduler.plan`` unchanged whenever
  something happens to it (a creation completed, a machine finished) and every
  ``tick_seconds`` (``reconcile_seconds``), and applies the actions as the daemon does;
* a VM starts ``create_seconds`` after its Create; if its machinetype has work at that moment it
  runs for a time drawn from the type's run-time distribution and finishes with ``200 Success``,
  otherwise it runs ``probe_seconds`` and finishes with ``300 No more work``; the factory records
  the finish with ``scheduler.finish_message`` as the daemon does. A VM still running at its
  deadline is shut down by the planner and gone ``stop_seconds`` later;
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

import bisect
import configparser
import dataclasses
import heapq
import json
import math
import os
import random
import re
import tempfile
import time
from typing import Any, Optional

from vac.core import scheduler
from vac.core.config import Config, ConfigPaths, load_config
from vac.core.model import Finish, Machine, MachineState, MachinetypeReport, is_abort, slot_name

START_TIME = 1_704_067_200.0  # 2024-01-01 00:00 UTC: scenario times are offsets from here
PEERS_REPORT_NAME = "peers.simulate.invalid"  # factory name of a summed report with no abort
WORK_MESSAGE = "200 Success"
NO_WORK_MESSAGE = "300 No more work"
SIMULATION_HOSTNAME = "factory.simulate.invalid"
ENOUGH_BYTES = 1 << 50  # disk and memory are not simulated
ANY_PROCESSORS = 1 << 20
SCENARIO_SECTIONS = ("simulation", "hosts", "work")

# Event priorities at equal times: machines change first, then caches refresh, then factories
# plan, then measurements are taken.
_CHANGE, _REFRESH, _PLAN, _MEASURE = range(4)


class ScenarioError(Exception):
    """A scenario that cannot be simulated; the message says where and why."""


class PlotError(Exception):
    """A plot cannot be drawn (matplotlib missing, file not writable)."""


# ---------------------------------------------------------------------------------------------
# Scenario values

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?)([dhms])")
_CLOCK = re.compile(r"([0-9]+):([0-5][0-9])(?::([0-5][0-9]))?\Z")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``6h``, ``1d``, ``1h30m`` or a clock ``10:30[:15]``.

    Clock values are offsets from the start of the simulation (which starts at 00:00).
    """
    text = text.strip().lower()
    clock = _CLOCK.match(text)
    if clock:
        hours, minutes, seconds = clock.groups()
        return int(hours) * 3600 + int(minutes) * 60 + int(seconds or 0)
    try:
        value = float(text)
    except ValueError:
        position, seconds = 0, 0.0
        for part in _DURATION_PART.finditer(text):
            if part.start() != position:
                break
            seconds += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
            position = part.end()
        if position != len(text) or not text:
            raise ValueError(
                f"{text!r} is not a duration (like 90, 90s, 15m, 6h, 1d, 1h30m or 10:30)"
            ) from None
        return seconds
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a duration (a non-negative number of seconds)")
    return value


def format_offset(seconds: float) -> str:
    """``HH:MM`` since the start (hours may exceed 24)."""
    minutes = int(round(seconds / 60))
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclasses.dataclass(frozen=True)
class WorkTimeline:
    """When a machinetype has work: sorted, disjoint [start, end) intervals of offsets."""

    intervals: tuple[tuple[float, float], ...]

    def has_work(self, offset: float) -> bool:
        index = bisect.bisect_right(self.intervals, (offset, math.inf)) - 1
        return index >= 0 and offset < self.intervals[index][1]

    def returns(self) -> tuple[float, ...]:
        """Offsets at which work becomes available after a time without it."""
        return tuple(start for start, _ in self.intervals if start > 0)

    def describe(self) -> str:
        if not self.intervals:
            return "never"
        if self.intervals == ((0.0, math.inf),):
            return "always"
        return ", ".join(
            f"{format_offset(start)}-{'' if end == math.inf else format_offset(end)}"
            for start, end in self.intervals
        )


ALWAYS = WorkTimeline(((0.0, math.inf),))


def parse_work(text: str) -> WorkTimeline:
    """``always``, ``never``, ``START-END[, START-END ...]`` or ``always except INTERVALS``.

    END may be left out (``14:00-``: from 14:00 on).
    """
    words = text.strip().lower()
    if words == "always":
        return ALWAYS
    if words == "never":
        return WorkTimeline(())
    negate = words.startswith("always except ")
    if negate:
        words = words[len("always except ") :]
    intervals = []
    for item in re.split(r"[,\s]+", words.strip()):
        start_text, dash, end_text = item.partition("-")
        if not dash or not start_text:
            raise ValueError(
                f"{item!r} is not an interval START-END or START- (in {text.strip()!r}); "
                "use always, never, intervals or 'always except' intervals"
            )
        start = parse_duration(start_text)
        end = parse_duration(end_text) if end_text else math.inf
        if not end > start:
            raise ValueError(f"interval {item!r} ends before it starts")
        intervals.append((start, end))
    intervals.sort()
    merged: list[tuple[float, float]] = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    if negate:
        complement, position = [], 0.0
        for start, end in merged:
            if start > position:
                complement.append((position, start))
            position = end
        if position < math.inf:
            complement.append((position, math.inf))
        merged = complement
    return WorkTimeline(tuple(merged))


@dataclasses.dataclass(frozen=True)
class RunTime:
    """How long VMs with work run: ``fixed D``, ``uniform MIN MAX``, ``exponential MEAN`` or
    ``lognormal MEAN SD``. Draws are at least one second."""

    kind: str
    parameters: tuple[float, ...]

    def sample(self, rng: random.Random) -> float:
        kind, values = self.kind, self.parameters
        if kind == "fixed":
            value = values[0]
        elif kind == "uniform":
            value = rng.uniform(values[0], values[1])
        elif kind == "exponential":
            value = rng.expovariate(1.0 / values[0])
        else:
            mean, sd = values
            sigma = math.sqrt(math.log(1.0 + (sd / mean) ** 2))
            value = rng.lognormvariate(math.log(mean) - sigma * sigma / 2.0, sigma)
        return max(1.0, value)

    def describe(self) -> str:
        return " ".join([self.kind, *(f"{value:g}s" for value in self.parameters)])


_RUN_TIME_ARGUMENTS = {"fixed": 1, "uniform": 2, "exponential": 1, "lognormal": 2}


def parse_run_time(text: str) -> RunTime:
    words = text.split()
    if not words or words[0].lower() not in _RUN_TIME_ARGUMENTS:
        raise ValueError(f"{text.strip()!r}: use fixed D, uniform MIN MAX, exponential MEAN or lognormal MEAN SD")
    kind = words[0].lower()
    if len(words) - 1 != _RUN_TIME_ARGUMENTS[kind]:
        raise ValueError(f"{kind} takes {_RUN_TIME_ARGUMENTS[kind]} duration(s), got {text.strip()!r}")
    values = tuple(parse_duration(word) for word in words[1:])
    if any(value <= 0 for value in values[:1]) or (kind == "uniform" and values[1] < values[0]):
        raise ValueError(f"{text.strip()!r}: durations must be positive and MIN <= MAX")
    return RunTime(kind, values)


@dataclasses.dataclass(frozen=True)
class WorkModel:
    """What VMs of one machinetype find and do."""

    work: WorkTimeline = ALWAYS
    run_time: RunTime = RunTime("exponential", (6 * 3600.0,))
    probe_seconds: float = 300.0


@dataclasses.dataclass(frozen=True)
class FactoryGroup:
    name: str
    count: int
    processors: int


@dataclasses.dataclass(frozen=True)
class Scenario:
    path: str
    description: str
    config: Config
    groups: tuple[FactoryGroup, ...]
    work: dict  # machinetype name -> WorkModel, for every machinetype with target_share > 0
    duration: float = 86400.0
    seed: int = 1
    create_seconds: float = 10.0
    stop_seconds: float = 10.0
    tick_seconds: float = 60.0
    peer_cache_phases: int = 10
    window_seconds: Optional[float] = None  # None: a twelfth of the duration
    sample_seconds: float = 300.0
    fill_fraction: float = 0.95
    warnings: tuple[str, ...] = ()

    @property
    def window(self) -> float:
        return self.window_seconds or self.duration / 12

    @property
    def capacity(self) -> int:
        return sum(group.count * group.processors for group in self.groups)

    @property
    def factory_count(self) -> int:
        return sum(group.count for group in self.groups)

    def replace(self, **changes: Any) -> Scenario:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Loading a scenario file

def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


_SIMULATION_OPTIONS = {
    "description": str,
    "config": str,
    "duration": parse_duration,
    "seed": _integer,
    "create_seconds": parse_duration,
    "stop_seconds": parse_duration,
    "probe_seconds": parse_duration,
    "tick_seconds": parse_duration,
    "peer_cache_phases": _integer,
    "window": parse_duration,
    "sample_seconds": parse_duration,
    "fill_fraction": float,
}
_HOSTS_OPTIONS = {"count": _integer, "processors": _integer}
_WORK_OPTIONS = {"work": parse_work, "run_time": parse_run_time, "probe_seconds": parse_duration}
_GROUP_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}\Z")


def _read_options(parser: configparser.ConfigParser, section: str, known: dict, where: str) -> dict:
    values = {}
    for option, text in parser.items(section):
        convert = known.get(option)
        if convert is None:
            raise ScenarioError(f"{where}: [{section}] unknown option {option!r} (known: {', '.join(sorted(known))})")
        try:
            values[option] = convert(text.strip())
        except ValueError as error:
            raise ScenarioError(f"{where}: [{section}] {option}: {error}") from None
    return values


def _positive(values: dict, option: str, where: str, section: str) -> None:
    if option in values and not values[option] > 0:
        raise ScenarioError(f"{where}: [{section}] {option} must be greater than 0")


def _config_paths(scenario_path: str, config_option: Optional[str], empty_dir: str) -> ConfigPaths:
    """Where vacd would read: ``config`` names a directory like /etc/vac.d, a file like
    /etc/vac.conf, or one of each; the scenario file is read last, like /run/vac.conf."""
    base = os.path.dirname(os.path.abspath(scenario_path))
    conf_dir, main_conf = empty_dir, None
    for word in (config_option or "").split():
        path = os.path.join(base, os.path.expanduser(word))
        if os.path.isdir(path) and conf_dir == empty_dir:
            conf_dir = path
        elif os.path.isfile(path) and main_conf is None:
            main_conf = path
        elif os.path.exists(path):
            raise ScenarioError(f"{scenario_path}: [simulation] config: give at most one directory and one file")
        else:
            raise ScenarioError(f"{scenario_path}: [simulation] config: no such file or directory {path}")
    if main_conf is None:
        return ConfigPaths(conf_dir=conf_dir, main_conf=scenario_path, run_confs=())
    return ConfigPaths(conf_dir=conf_dir, main_conf=main_conf, run_confs=(scenario_path,))


def _load_vac_config(scenario_path: str, config_option: Optional[str]) -> tuple[Config, list[str]]:
    """The space's configuration, read exactly as vacd reads its files."""
    with tempfile.TemporaryDirectory() as empty_dir:
        paths = _config_paths(scenario_path, config_option, empty_dir)
        # Factory sizes come from [hosts]: total_processors is replaced, so any value may pass.
        config, problems = load_config(paths, hostname=SIMULATION_HOSTNAME, processor_count=ANY_PROCESSORS)

    def about_scenario_section(problem: Any) -> bool:  # "unknown section" for our own sections
        kind = (problem.section or "").split(" ")[0].lower()
        return problem.file == scenario_path and kind in SCENARIO_SECTIONS

    warnings = [str(p) for p in problems if not p.is_error and not about_scenario_section(p)]
    if config is None:
        errors = [str(p) for p in problems if p.is_error]
        raise ScenarioError("configuration errors:\n  " + "\n  ".join(errors))
    settings = config.settings
    if config.vacuum_pipes:
        warnings.append(f"vacuum pipes are not fetched in a simulation: ignored {', '.join(config.vacuum_pipes)}")
    if settings.draining or settings.shutdown_time is not None:
        warnings.append("draining and shutdown_time are not simulated: ignored")
        config = config.replace(settings=dataclasses.replace(settings, draining=False, shutdown_time=None))
    return config, warnings


def load_scenario(path: str) -> Scenario:
    """Read and check a scenario file; raises ScenarioError with a specific message."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"), strict=True)
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream, source=path)
    except OSError as error:
        raise ScenarioError(f"cannot read scenario {path}: {error.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as error:
        raise ScenarioError(f"scenario {path}: {error}") from None
    if not parser.has_section("simulation"):
        raise ScenarioError(f"{path}: no [simulation] section")
    simulation = _read_options(parser, "simulation", _SIMULATION_OPTIONS, path)
    for option in ("duration", "tick_seconds", "window", "sample_seconds", "probe_seconds"):
        _positive(simulation, option, path, "simulation")
    if not 0 < simulation.get("fill_fraction", 0.95) <= 1:
        raise ScenarioError(f"{path}: [simulation] fill_fraction must be in (0, 1]")
    if simulation.get("peer_cache_phases", 1) < 1:
        raise ScenarioError(f"{path}: [simulation] peer_cache_phases must be at least 1")

    groups, work_sections = [], {}
    for section in parser.sections():
        kind, _, name = section.partition(" ")
        kind, name = kind.lower(), name.strip().lower()
        if kind == "hosts":
            if not _GROUP_NAME.match(name):
                raise ScenarioError(f"{path}: [{section}] needs a name of a-z, 0-9 and - (up to 31 characters)")
            values = _read_options(parser, section, _HOSTS_OPTIONS, path)
            count, processors = values.get("count", 1), values.get("processors", 64)
            if count < 1 or processors < 1:
                raise ScenarioError(f"{path}: [{section}] count and processors must be at least 1")
            groups.append(FactoryGroup(name, count, processors))
        elif kind == "work":
            work_sections[name] = (section, _read_options(parser, section, _WORK_OPTIONS, path))
            _positive(work_sections[name][1], "probe_seconds", path, section)
    if not groups:
        raise ScenarioError(f"{path}: no [hosts NAME] section (count = N, processors = P)")

    config, warnings = _load_vac_config(path, simulation.get("config"))
    shared = [name for name, mt in config.machinetypes.items() if mt.target_share > 0]
    if not shared:
        raise ScenarioError(f"{path}: no machinetype has target_share > 0: nothing would run")
    probe_seconds = simulation.get("probe_seconds", WorkModel.probe_seconds)
    work = {}
    for name in shared:
        section, values = work_sections.pop(name, (None, {}))
        work[name] = WorkModel(
            work=values.get("work", ALWAYS),
            run_time=values.get("run_time", WorkModel.run_time),
            probe_seconds=values.get("probe_seconds", probe_seconds),
        )
    for name, (section, _) in work_sections.items():
        if name in config.machinetypes:
            warnings.append(f"[{section}]: machinetype {name} has no target_share: never created")
        else:
            raise ScenarioError(f"{path}: [{section}]: no machinetype {name} in the configuration "
                                f"(machinetypes: {', '.join(config.machinetypes) or 'none'})")
    duration = simulation.get("duration", Scenario.duration)
    return Scenario(
        path=path,
        description=simulation.get("description", ""),
        config=config,
        groups=tuple(groups),
        work=work,
        duration=duration,
        seed=simulation.get("seed", Scenario.seed),
        create_seconds=simulation.get("create_seconds", Scenario.create_seconds),
        stop_seconds=simulation.get("stop_seconds", Scenario.stop_seconds),
        tick_seconds=simulation.get("tick_seconds", config.settings.reconcile_seconds),
        peer_cache_phases=simulation.get("peer_cache_phases", Scenario.peer_cache_phases),
        window_seconds=simulation.get("window"),
        sample_seconds=simulation.get("sample_seconds", Scenario.sample_seconds),
        fill_fraction=simulation.get("fill_fraction", Scenario.fill_fraction),
        warnings=tuple(warnings),
    )


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


class _Factory:
    """One simulated vacd: its machines, finishes and report, and its peer-cache view."""

    def __init__(self, name: str, config: Config, processors: int, contribution: tuple, view: _View):
        self.name = name
        self.config = config
        self.processors = processors
        self.host = scheduler.HostFacts(processors, (0.0, 0.0, 0.0), ENOUGH_BYTES, ENOUGH_BYTES)
        self.machines: dict[str, Machine] = {}
        self.runs: dict[str, _Run] = {}
        self.young: set[str] = set()  # uuids starting or started less than fizzle_seconds ago
        self.finishes: dict[str, Finish] = {}
        self.contribution = contribution  # per machinetype index: (machines, processors, young)
        self.active_processors = 0
        self.overrun: dict[str, float] = {}  # uuid -> deadline of VMs that would outlive it
        self.own_reports: list[Optional[MachinetypeReport]] = [None] * len(contribution)  # None: stale
        self.view = view
        self.view_own = contribution  # this factory's part of ``view``
        self.peer_key: Optional[tuple[_View, tuple]] = None
        self.peer_reports: tuple[MachinetypeReport, ...] = ()
        self.plan_at: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Window:
    """Measurements over [start, end) (offsets from the start of the simulation)."""

    start: float
    end: float
    processor_seconds: dict  # machinetype -> processor-seconds in use (creating to stopped)
    vms: dict  # machinetype -> VMs started (running) in the window
    probe_vms: dict  # machinetype -> of those, VMs that found no work
    capacity: int

    @property
    def busy_fraction(self) -> float:
        return sum(self.processor_seconds.values()) / (self.capacity * (self.end - self.start))

    def shares(self) -> dict:
        """Each machinetype's fraction of the processor-seconds in use (0 if none were)."""
        used = sum(self.processor_seconds.values())
        return {name: (value / used if used else 0.0) for name, value in self.processor_seconds.items()}


@dataclasses.dataclass(frozen=True)
class MachinetypeOutcome:
    name: str
    target: float  # target_share / sum of target_shares
    vms: int  # VMs started (running)
    probe_vms: int  # VMs that found no work ("300 No more work")
    probe_processor_hours: float
    recoveries: tuple[tuple[float, Optional[float]], ...]  # (work returned, first working VM after)


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    scenario: Scenario
    machinetypes: dict  # name -> MachinetypeOutcome, machinetypes with target_share > 0
    windows: tuple[Window, ...]
    whole: Window
    fill_seconds: Optional[float]  # when fill_fraction of all processors were first in use
    sample_times: tuple[float, ...]
    sample_processors: dict  # machinetype -> processors in use at each sample time
    events: int
    plans: int
    skipped_plans: int  # planning requests of full factories (the planner could only veto)
    wall_seconds: float

    @property
    def idle_processor_hours(self) -> float:
        whole = self.whole
        return (whole.capacity * (whole.end - whole.start) - sum(whole.processor_seconds.values())) / 3600

    def to_dict(self) -> dict:
        scenario = self.scenario

        def window(item: Window) -> dict:
            shares = item.shares()
            return {
                "start": item.start, "end": item.end, "busy_fraction": item.busy_fraction,
                "machinetypes": {
                    name: {"processor_seconds": item.processor_seconds[name], "share": shares[name],
                           "vms": item.vms[name], "probe_vms": item.probe_vms[name]}
                    for name in self.machinetypes
                },
            }

        return {
            "scenario": {
                "path": scenario.path, "description": scenario.description,
                "duration": scenario.duration, "seed": scenario.seed,
                "factories": [dataclasses.asdict(group) for group in scenario.groups],
                "capacity": scenario.capacity,
                "work": {name: {"work": model.work.describe(), "run_time": model.run_time.describe(),
                                "probe_seconds": model.probe_seconds}
                         for name, model in scenario.work.items()},
            },
            "machinetypes": {
                name: {"target": outcome.target, "achieved": self.whole.shares()[name], "vms": outcome.vms,
                       "probe_vms": outcome.probe_vms, "probe_processor_hours": outcome.probe_processor_hours,
                       "recoveries": [{"work_returned": returned, "recovered_after": after}
                                      for returned, after in outcome.recoveries]}
                for name, outcome in self.machinetypes.items()
            },
            "windows": [window(item) for item in self.windows],
            "whole": window(self.whole),
            "idle_processor_hours": self.idle_processor_hours,
            "fill_seconds": self.fill_seconds,
            "samples": {"times": list(self.sample_times),
                        "processors": {name: list(values) for name, values in self.sample_processors.items()}},
            "events": self.events, "plans": self.plans, "skipped_plans": self.skipped_plans,
            "wall_seconds": self.wall_seconds,
            "warnings": list(scenario.warnings),
        }


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
                self.factories.append(_Factory(name, factory_config, group.processors, zero, self.view))
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
        self.vm_counter = 0

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
            self._request_plan(factory, now)

    @staticmethod
    def _only_veto(factory: _Factory, now: float) -> bool:
        """All processors in use and no deadline passed: the planner could only veto creation."""
        return factory.active_processors >= factory.processors and not any(
            now > deadline for deadline in factory.overrun.values())

    def _request_plan(self, factory: _Factory, now: float) -> None:
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
        factory.plan_at = None
        if self._only_veto(factory, now):
            self.skipped_plans += 1
            return
        self.plans += 1
        for action in scheduler.plan(self.snapshot(factory, now), self.planner_rng).actions:
            if isinstance(action, scheduler.Create):
                self._create(factory, action, now)
            elif isinstance(action, scheduler.Shutdown):
                machine = factory.machines[action.uuid]
                factory.machines[action.uuid] = machine.replace(state=MachineState.STOPPING, stop_requested=now)
                factory.overrun.pop(action.uuid, None)
                self._push(now + self.scenario.stop_seconds, _CHANGE, self._stopped,
                           (factory, action.uuid, action.shutdown_message))
            else:
                factory.machines[action.uuid] = factory.machines[action.uuid].replace(deadline=action.deadline)
                run = factory.runs.get(action.uuid)
                if run is not None and run.ends > action.deadline:
                    factory.overrun[action.uuid] = action.deadline

    # -- machines ----------------------------------------------------------------------------

    def _create(self, factory: _Factory, action: scheduler.Create, now: float) -> None:
        i = self.index[action.machinetype]
        machinetype = self.machinetypes[i]
        hs06_per_processor = factory.config.settings.hs06_per_processor
        self.vm_counter += 1
        uuid = f"vm{self.vm_counter}"
        factory.machines[uuid] = Machine(
            uuid=uuid, name=slot_name(factory.name, action.slot), slot=action.slot,
            machinetype=machinetype.name, machine_model=machinetype.machine_model,
            processors=action.processors, created=now, deadline=action.deadline,
            fqan=machinetype.accounting_fqan,
            hs06=hs06_per_processor * action.processors if hs06_per_processor else None)
        factory.young.add(uuid)
        self._change(factory, i, 1, action.processors, 1, now)
        self._push(now + self.scenario.create_seconds, _CHANGE, self._started, (factory, uuid))

    def _started(self, argument: tuple, now: float) -> None:
        factory, uuid = argument
        machine = factory.machines[uuid] = factory.machines[uuid].replace(
            state=MachineState.RUNNING, started=now, heartbeat=now)
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
        factory.runs[uuid] = run
        self._push(run.ends, _CHANGE, self._ended, argument)
        if run.ends > machine.deadline:
            factory.overrun[uuid] = machine.deadline
        fizzle_seconds = self.machinetypes[i].fizzle_seconds
        if fizzle_seconds > 0:
            self._push(now + fizzle_seconds, _CHANGE, self._grown_up, argument)
        else:
            self._grown_up(argument, now)
        self._request_plan(factory, now)

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

    def _ended(self, argument: tuple, now: float) -> None:
        factory, uuid = argument
        machine = factory.machines.get(uuid)
        if machine is not None and machine.state is MachineState.RUNNING:  # not shut down before
            self._finish(factory, machine, factory.runs[uuid].message, now)

    def _stopped(self, argument: tuple, now: float) -> None:
        factory, uuid, message = argument
        self._finish(factory, factory.machines[uuid], message, now)

    def _finish(self, factory: _Factory, machine: Machine, vm_message: Optional[str], now: float) -> None:
        """Record the finish as vacd does, free the slot, and plan."""
        i = self.index[machine.machinetype]
        machinetype = self.machinetypes[i]
        message = scheduler.finish_message(machine, machinetype, vm_message, now)  # it ran until now
        factory.finishes[machinetype.name] = Finish(machinetype.name, machine.name, message, now)
        aborts = self.aborts[i]
        aborts.pop(factory.name, None)
        if is_abort(message):
            aborts[factory.name] = (now, message, machine.name)
        del factory.machines[machine.uuid]
        run = factory.runs.pop(machine.uuid)
        factory.overrun.pop(machine.uuid, None)
        if not run.working:
            self.probe_processor_seconds[i] += machine.processors * (now - machine.started)
        young = 1 if machine.uuid in factory.young else 0
        factory.young.discard(machine.uuid)
        self._change(factory, i, -1, -machine.processors, -young, now)
        self._request_plan(factory, now)

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


# ---------------------------------------------------------------------------------------------
# Output


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def format_summary(result: SimulationResult) -> str:
    """The human-readable report: shares per window, per machinetype outcomes, idle time, filling."""
    scenario = result.scenario
    names = list(result.machinetypes)
    lines = [f"Scenario {scenario.path}" + (f": {scenario.description}" if scenario.description else "")]
    lines.append(
        f"{scenario.factory_count} factories, {scenario.capacity} processors, {len(names)} machinetypes "
        f"with a share; {format_offset(scenario.duration)} simulated in {result.wall_seconds:.1f} s "
        f"({result.events} events, {result.plans} plans, {result.skipped_plans} skipped as full)")
    for warning in scenario.warnings:
        lines.append(f"warning: {warning}")
    lines += ["", "Share of processors in use, achieved (target), per window:"]
    rows = [["window", *names, "in use", "VMs", "probes"]]
    for window in (*result.windows, result.whole):
        shares = window.shares()
        label = "whole run" if window is result.whole else f"{format_offset(window.start)}-{format_offset(window.end)}"
        rows.append([label, *(f"{_percent(shares[name])} ({_percent(result.machinetypes[name].target)})"
                              for name in names),
                     _percent(window.busy_fraction), str(sum(window.vms.values())),
                     str(sum(window.probe_vms.values()))])
    lines += _table(rows)
    lines += ["", "Per machinetype:"]
    rows = [["machinetype", "target", "achieved", "VMs", "probe VMs", "probe processor-hours",
             "work returned: first working VM after"]]
    whole_shares = result.whole.shares()
    for name, outcome in result.machinetypes.items():
        recoveries = ", ".join(
            f"{format_offset(returned)}: {'never' if after is None else format_offset(after)}"
            for returned, after in outcome.recoveries) or "-"
        rows.append([name, _percent(outcome.target), _percent(whole_shares[name]), str(outcome.vms),
                     str(outcome.probe_vms), f"{outcome.probe_processor_hours:.1f}", recoveries])
    lines += _table(rows)
    capacity_hours = scenario.capacity * scenario.duration / 3600
    lines += ["", f"Idle: {result.idle_processor_hours:.1f} processor-hours "
                  f"({_percent(result.idle_processor_hours / capacity_hours)} of {capacity_hours:.0f})"]
    fill = "never" if result.fill_seconds is None else f"after {format_offset(result.fill_seconds)}"
    lines.append(f"Filled to {_percent(scenario.fill_fraction)} of the processors: {fill}")
    return "\n".join(lines) + "\n"


def format_json(result: SimulationResult) -> str:
    return json.dumps(result.to_dict(), indent=2, sort_keys=True)


def check_plot_support() -> Any:
    """matplotlib's Figure class, imported only now; PlotError if matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'vac[plots]' "
                        "(or install your distribution's python3-matplotlib)") from None
    return Figure


def plot(result: SimulationResult, path: str) -> None:
    """PNG of processors in use per machinetype over time, each with its target (dashed) and its
    times without work (shaded). Needs matplotlib (``pip install 'vac[plots]'``)."""
    Figure = check_plot_support()
    scenario = result.scenario
    hours = [seconds / 3600 for seconds in result.sample_times]
    figure = Figure(figsize=(11, 6), dpi=100)
    axes = figure.subplots()
    for number, (name, series) in enumerate(result.sample_processors.items()):
        color = f"C{number % 10}"
        axes.plot(hours, series, color=color, linewidth=1.4, label=name)
        axes.axhline(result.machinetypes[name].target * scenario.capacity, color=color, linestyle="--", linewidth=0.8)
        end = scenario.duration
        no_work, position = [], 0.0
        for start, stop in scenario.work[name].work.intervals:
            if start > position:
                no_work.append((position, min(start, end)))
            position = stop
        if position < end:
            no_work.append((position, end))
        for start, stop in no_work:
            axes.axvspan(start / 3600, stop / 3600, color=color, alpha=0.08, linewidth=0)
    in_use = [sum(values) for values in zip(*result.sample_processors.values())]
    axes.plot(hours, in_use, color="grey", linewidth=1, label="all in use")
    axes.axhline(scenario.capacity, color="black", linewidth=0.8)
    axes.set_xlim(0, scenario.duration / 3600)
    axes.set_ylim(0, scenario.capacity * 1.05)
    axes.set_xlabel("hours since start")
    axes.set_ylabel("processors in use")
    title = os.path.basename(scenario.path) + (f": {scenario.description}" if scenario.description else "")
    axes.set_title(f"{title}\n{scenario.factory_count} factories, {scenario.capacity} processors; "
                   "dashed: target, shaded: no work", fontsize=10)
    axes.legend(loc="upper left", fontsize=8, ncol=max(1, len(result.sample_processors) // 6))
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise PlotError(f"cannot write {path}: {error.strerror or error}") from None
