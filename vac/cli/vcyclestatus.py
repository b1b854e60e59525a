"""``vcycle spaces / machinetypes / machines``: tables (or JSON) of what vcycled last wrote.

vcycled writes ``<state_dir>/spaces/<space>/status.json`` after every cycle of a space
(vac.daemon.vcycled.SpaceWorker.status); these commands only read those files, so they work
whether or not vcycled runs, and say how old each space's status is. A file that cannot be read
or is not vcycled's is reported on stderr and left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from vac.cli.tables import _ago, format_table, printable
from vac.core.vcycleconfig import STATUS_FILE

MAX_STATUS_BYTES = 16 * 1024 * 1024


def load_statuses(state_dir: str, space: Optional[str] = None) -> tuple[list[dict], list[str]]:
    """(statuses sorted by space, problems) of the spaces under ``state_dir`` (or one)."""
    statuses, problems = [], []
    root = Path(state_dir) / "spaces"
    paths = [root / space / STATUS_FILE] if space else sorted(root.glob(f"*/{STATUS_FILE}"))
    for path in paths:
        try:
            with open(path, "rb") as stream:
                text = stream.read(MAX_STATUS_BYTES + 1)
        except OSError as error:
            problems.append(f"{path}: cannot read: {error.strerror}")
            continue
        if len(text) > MAX_STATUS_BYTES:
            problems.append(f"{path}: larger than {MAX_STATUS_BYTES} bytes")
            continue
        try:
            data = json.loads(text)
        except ValueError as error:
            problems.append(f"{path}: not JSON: {error}")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("space"), str) \
                or not isinstance(data.get("machines"), list) or not isinstance(data.get("machinetypes"), dict):
            problems.append(f"{path}: not a vcycled status file")
            continue
        statuses.append(data)
    if not paths:
        problems.append(f"no status under {root}: vcycled has not completed a cycle there")
    return sorted(statuses, key=lambda status: status["space"]), problems


def _number(value: Any, digits: int = 0) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _age(now: float, moment: Any) -> str:
    return _ago(now - moment) if isinstance(moment, (int, float)) else "-"


def _condition(status: dict, now: float) -> str:
    until = status.get("backed_off_until")
    if isinstance(until, (int, float)) and until > now:
        return f"backed off {_ago(until - now)}: {printable(status.get('error'), 80)}"
    return "ok"


def render_spaces(statuses: list[dict], now: float) -> str:
    rows = []
    for status in statuses:
        machines = [m for m in status["machines"] if isinstance(m, dict)]
        processors = sum(m.get("processors") or 0 for m in machines)
        rows.append([printable(status["space"]), printable(status.get("api")), str(len(machines)),
                     str(processors), _number(status.get("processors_limit")), _age(now, status.get("updated")),
                     _condition(status, now)])
    return "\n".join(format_table(["SPACE", "API", "MACHINES", "PROCESSORS", "LIMIT", "UPDATED", "STATE"],
                                  rows, right=(2, 3, 4))) + "\n"


def render_machinetypes(statuses: list[dict], now: float) -> str:
    rows = []
    for status in statuses:
        machines = [m for m in status["machines"] if isinstance(m, dict)]
        for name, info in sorted(status["machinetypes"].items()):
            info = info if isinstance(info, dict) else {}
            own = [m for m in machines if m.get("machinetype") == name]
            abort = info.get("last_abort") if isinstance(info.get("last_abort"), dict) else {}
            last = f"{_age(now, abort.get('time'))} ago: {printable(abort.get('message'), 40)}" if abort else "-"
            rows.append([printable(status["space"]), printable(name), _number(info.get("target_share"), 1),
                         str(len(own)), str(sum(m.get("processors") or 0 for m in own)),
                         _number(info.get("heartbeat_machines")), _number(info.get("score"), 2), last,
                         printable(info.get("blocked_by"), 80) or "-"])
    headers = ["SPACE", "MACHINETYPE", "SHARE", "MACHINES", "PROCESSORS", "HEARTBEATING", "SCORE",
               "LAST ABORT", "NOT CREATED"]
    return "\n".join(format_table(headers, rows, right=(2, 3, 4, 5, 6))) + "\n"


def render_machines(statuses: list[dict], now: float) -> str:
    rows = []
    for status in statuses:
        for machine in status["machines"]:
            if not isinstance(machine, dict):
                continue
            rows.append([printable(status["space"]), printable(machine.get("name")),
                         printable(machine.get("machinetype")), printable(machine.get("state")),
                         _number(machine.get("processors")), _age(now, machine.get("created")),
                         _age(now, machine.get("started")), printable(machine.get("shutdown_message"), 60)])
    headers = ["SPACE", "NAME", "MACHINETYPE", "STATE", "PROCS", "CREATED", "STARTED", "MESSAGE"]
    return "\n".join(format_table(headers, rows, right=(4,))) + "\n"


RENDERERS = {"spaces": render_spaces, "machinetypes": render_machinetypes, "machines": render_machines}


def as_json(table: str, statuses: list[dict]) -> str:
    """The same selection as the table, as JSON: spaces whole, or their machinetypes or machines
    each with its space."""
    if table == "spaces":
        items: list = statuses
    elif table == "machinetypes":
        items = [{"space": s["space"], "machinetype": name, **(info if isinstance(info, dict) else {})}
                 for s in statuses for name, info in sorted(s["machinetypes"].items())]
    else:
        items = [{"space": s["space"], **m} for s in statuses for m in s["machines"] if isinstance(m, dict)]
    return json.dumps(items, indent=2, sort_keys=True) + "\n"
