"""``vac simulate`` scenarios: the file format (INI, documented in vac(1) and ``etc/simulate/``)
and its values: durations, work timelines, run-time distributions, factory groups.

A scenario names the space's vac configuration, the factories (``[hosts NAME]``: how many, how
many processors) and, per machinetype, when work is available and how long VMs with work run.
vac.cli.simulate runs it.
"""

from __future__ import annotations

import bisect
import configparser
import dataclasses
import math
import os
import random
import re
import tempfile
from typing import Any, Optional

from vac.core.config import Config, ConfigPaths, load_config

SIMULATION_HOSTNAME = "factory.simulate.invalid"
ANY_PROCESSORS = 1 << 20
SCENARIO_SECTIONS = ("simulation", "hosts", "work")


class ScenarioError(Exception):
    """A scenario that cannot be simulated; the message says where and why."""


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
