"""The tables and summaries of ``vac machines``, ``vac machinetypes`` and ``vac factories``,
made from VacQuery results. Peer- and VM-controlled text is made safe for a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

from vac.services.vacquery import QueryResult

MODEL_CODES = {"cernvm3": "VM", "cernvm4": "VM", "vm-raw": "VM", "docker": "DC", "singularity": "SC"}
LIVE_STATES = ("Starting", "Running", "Paused")


def printable(text: Optional[str], limit: Optional[int] = None) -> str:
    """Peer- and VM-controlled text made safe for a terminal: control characters become ``?``."""
    if not text:
        return ""
    cleaned = "".join(char if char.isprintable() else "?" for char in text[: limit or len(text)])
    return cleaned


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Iterable[int] = ()) -> list:
    """Aligned text lines; columns in ``right`` are right-aligned (numbers)."""
    right = set(right)
    widths = [max(len(str(row[column])) for row in [headers, *rows]) for column in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).rjust(width) if column in right else str(cell).ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _ago(seconds: Optional[float]) -> str:
    """A short age: 45s, 12m, 3.5h, 4.2d."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _kib(value: Optional[int]) -> str:
    if value is None:
        return "-"
    for unit, size in (("T", 1024 ** 3), ("G", 1024 ** 2), ("M", 1024)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}K"


def _factories(count: int) -> str:
    return f"{count} factory" if count == 1 else f"{count} factories"


def short_name(name: str) -> str:
    """``host-03`` of ``host-03.example.org``."""
    return name.split(".", 1)[0]


def problem_lines(result: QueryResult) -> list:
    """Lines naming the factories that did not answer, or not completely."""
    lines = []
    if result.silent:
        named = [f"{name} ({result.problems[name]})" if name in result.problems else name
                 for name in result.silent]
        lines.append(f"no answer from {_factories(len(result.silent))}: {', '.join(named)}")
    if result.incomplete:
        lines.append(f"incomplete answer from {_factories(len(result.incomplete))}: "
                     f"{', '.join(result.incomplete)}")
    return lines


def render_machines(result: QueryResult, now: float) -> str:
    """``vac machines``: one line per slot, a summary line, the silent factories."""
    rows = []
    counts = {"Running": 0, "Starting": 0, "Shut down": 0}
    processors, hs06 = 0, 0.0
    for machine in result.reports:
        age, life_cpu, message = "", "", ""
        if machine.state == "Running" and machine.started_time:
            age = _ago(now - machine.started_time)
            if machine.heartbeat_time and machine.heartbeat_time > machine.started_time:
                life_cpu = f"{100 * machine.cpu_seconds / (machine.heartbeat_time - machine.started_time):.0f}"
        elif machine.state == "Starting" and machine.created_time:
            age = _ago(now - machine.created_time)
        elif machine.state == "Shut down":
            message = printable(machine.shutdown_message, 60)
        if machine.state in LIVE_STATES:
            processors += machine.processors
            hs06 += machine.hs06 or 0.0
        counts[machine.state] = counts.get(machine.state, 0) + 1
        rows.append([
            printable(short_name(machine.machine)), printable(machine.machinetype) or "-",
            printable(machine.state), str(machine.processors) if machine.machinetype else "",
            MODEL_CODES.get(machine.machine_model or "", "??" if machine.machine_model else ""),
            f"{machine.hs06:.1f}" if machine.hs06 is not None and machine.machinetype else "",
            age, life_cpu,
            f"{machine.cpu_percentage:.0f}" if machine.state == "Running" else "",
            printable(machine.uuid) if machine.state in LIVE_STATES else "", message])
    lines = format_table(["NAME", "MACHINETYPE", "STATE", "PROC", "MODEL", "HS06", "AGE",
                          "CPU%LIFE", "CPU%NOW", "UUID", "SHUTDOWN MESSAGE"], rows,
                         right=(3, 5, 6, 7, 8)) if rows else []
    others = sum(count for state, count in counts.items()
                 if state not in ("Running", "Starting", "Shut down"))
    lines.append(
        f"{len(result.reports)} slots on {_factories(len(result.answered) + len(result.incomplete))}: "
        f"{counts['Running']} running, {counts['Starting']} starting, "
        f"{counts['Shut down']} shut down" + (f", {others} other" if others else "")
        + f"; {processors} processors and {hs06:.1f} HS06 in use")
    return "\n".join(lines + problem_lines(result)) + "\n"


def render_machinetypes(result: QueryResult, now: float, machinetype: Optional[str] = None) -> str:
    """``vac machinetypes``: one line per factory and machinetype, then totals per machinetype."""
    reports = [report for report in result.reports
               if machinetype is None or report.machinetype == machinetype]
    rows, totals = [], {}
    for report in reports:
        rows.append([
            printable(short_name(report.factory)), printable(report.machinetype),
            str(report.running_machines), str(report.running_processors),
            f"{report.running_hs06:.1f}", str(report.num_before_fizzle),
            _ago(now - report.shutdown_time) if report.shutdown_time else "-",
            printable(report.shutdown_message, 60)])
        total = totals.setdefault(report.machinetype, [0, 0, 0.0, 0])
        total[0] += report.running_machines
        total[1] += report.running_processors
        total[2] += report.running_hs06
        total[3] += report.num_before_fizzle
    lines = format_table(["FACTORY", "MACHINETYPE", "MACHINES", "PROC", "HS06", "FIZZLE?",
                          "LAST END", "LAST SHUTDOWN MESSAGE"], rows, right=(2, 3, 4, 5, 6)) if rows else []
    if len(totals) > 0 and len(result.answered) + len(result.incomplete) > 1:
        total_rows = [[printable(name), str(t[0]), str(t[1]), f"{t[2]:.1f}", str(t[3])]
                      for name, t in sorted(totals.items())]
        lines += [""] + format_table(["ALL FACTORIES", "MACHINES", "PROC", "HS06", "FIZZLE?"],
                                     total_rows, right=(1, 2, 3, 4))
    machines = sum(t[0] for t in totals.values())
    processors = sum(t[1] for t in totals.values())
    hs06 = sum(t[2] for t in totals.values())
    what = f"machinetype {printable(machinetype)}" if machinetype else f"{len(totals)} machinetypes"
    lines.append(f"{what} on {_factories(len(result.answered) + len(result.incomplete))}: "
                 f"{machines} machines, {processors} processors, {hs06:.1f} HS06")
    return "\n".join(lines + problem_lines(result)) + "\n"


def render_factories(result: QueryResult, now: float) -> str:
    """``vac factories``: one line per factory with capacity, load, disk, memory and version."""
    rows = []
    running = maximum = machines = 0
    hs06 = max_hs06 = 0.0
    for status in result.reports:
        running += status.running_processors
        maximum += status.max_processors
        machines += status.running_machines
        hs06 += status.running_hs06
        max_hs06 += status.max_hs06
        memory = (f"{_kib(status.mem_used_kb)}/{_kib(status.mem_total_kb)}"
                  if status.mem_total_kb is not None else "-")
        rows.append([
            printable(short_name(status.factory)),
            f"{status.running_processors}/{status.max_processors}", str(status.running_machines),
            f"{status.running_hs06:.0f}/{status.max_hs06:.0f}",
            f"{status.load_average:.2f}" if status.load_average is not None else "-",
            _kib(status.root_disk_avail_kb), _kib(status.vac_disk_avail_kb), memory,
            _ago(now - status.boot_time) if status.boot_time else "-",
            _ago(now - status.factory_heartbeat_time) if status.factory_heartbeat_time else "-",
            printable(status.version) or "?", printable(status.os_issue, 40)])
    lines = format_table(["FACTORY", "PROC", "MACHINES", "HS06", "LOAD", "ROOT FREE", "VAC FREE",
                          "MEMORY", "UP", "CYCLE", "VERSION", "OS"], rows,
                         right=(1, 2, 3, 4, 5, 6, 7, 8, 9)) if rows else []
    lines.append(f"{_factories(len(result.reports))}: {running}/{maximum} processors, "
                 f"{machines} machines, {hs06:.0f}/{max_hs06:.0f} HS06 in use")
    return "\n".join(lines + problem_lines(result)) + "\n"
