"""What ``vac simulate`` measured (``SimulationResult``) and how it is shown: the summary table,
JSON, and a plot of the processors each machinetype holds over time."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from vac.cli.scenario import Scenario, format_offset


class PlotError(Exception):
    """A plot cannot be drawn (matplotlib missing, file not writable)."""


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
