"""``check-vacd``: Nagios/Icinga plugin for the health of the local vacd.

Contract with vacd (format 1). vacd writes ``<state_dir>/status.json`` atomically (temporary file
in the same directory, fsync, rename; mode 0644) at the end of every loop iteration, and at least
every ``reconcile_seconds``. It holds one JSON object:

==========================  =============  ==================================================
key                         type           meaning
==========================  =============  ==================================================
format                      int            1; any other value is not understood (UNKNOWN)
pid                         int            vacd's process ID
version                     str            vacd's version
time                        number         when the file was written (Unix seconds)
loop_time                   number         end of the last completed loop iteration
responder_time              number | null  last time the VacQuery responder was seen serving
metadata_time               number | null  same for the metadata HTTP service
mjf_time                    number | null  same for the MJF HTTP service
running_machines            int            machines created and not yet finished
slots                       int            machine slots of the factory
running_processors          int            processors allocated to those machines
total_processors            int            processors vacd may allocate
last_creation_error         str | null     error of the latest creation attempt if it failed;
                                           null once a later creation succeeds
last_creation_error_time    number | null  when that creation failed
==========================  =============  ==================================================

A service time is null only when that service is deliberately not running; it is then not
checked. Unknown keys are ignored, so vacd may add keys without a new format number.

States (exit status): OK 0; WARNING 1 if the loop or a service is older than ``-w`` seconds;
CRITICAL 2 if the status file is missing, vacd's PID is not running, the loop or a service is
older than ``-c`` seconds, or the last creation failed (as the classic ``factory-error`` file);
UNKNOWN 3 for an unreadable or malformed status file, an unreadable configuration or bad options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, NoReturn, Optional

from vac.ops.daemonize import process_alive

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

STATUS_FILE = "status.json"
STATUS_FORMAT = 1
DEFAULT_WARNING_SECONDS = 300
DEFAULT_CRITICAL_SECONDS = 600  # the classic check-vacd default
MAX_STATUS_BYTES = 1 << 20
MAX_ERROR_CHARS = 200

_NUMBER = (int, float)
_NULLABLE_NUMBER = (int, float, type(None))
STATUS_FIELDS: dict[str, tuple] = {
    "format": (int,),
    "pid": (int,),
    "version": (str,),
    "time": _NUMBER,
    "loop_time": _NUMBER,
    "responder_time": _NULLABLE_NUMBER,
    "metadata_time": _NULLABLE_NUMBER,
    "mjf_time": _NULLABLE_NUMBER,
    "running_machines": (int,),
    "slots": (int,),
    "running_processors": (int,),
    "total_processors": (int,),
    "last_creation_error": (str, type(None)),
    "last_creation_error_time": _NULLABLE_NUMBER,
}

# (status key, name in messages, perfdata label)
_LIVENESS = (
    ("loop_time", "loop", "age"),
    ("responder_time", "responder", "responder_age"),
    ("metadata_time", "metadata service", "metadata_age"),
    ("mjf_time", "MJF service", "mjf_age"),
)


class StatusError(Exception):
    """The status file cannot be used; ``state`` is the plugin state to report."""

    def __init__(self, state: int, message: str):
        super().__init__(message)
        self.state = state


def validate_status(status: object) -> dict:
    """Check a decoded status.json against the format-1 contract; raise StatusError (UNKNOWN)."""
    if not isinstance(status, dict):
        raise StatusError(UNKNOWN, "status file is not a JSON object")
    if status.get("format") != STATUS_FORMAT:
        raise StatusError(UNKNOWN, f"status file format {status.get('format')!r} not understood (expected {STATUS_FORMAT})")
    for key, types in STATUS_FIELDS.items():
        if key not in status:
            raise StatusError(UNKNOWN, f"status file lacks {key!r}")
        value = status[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise StatusError(UNKNOWN, f"status file has {key}={value!r} of the wrong type")
    return status


def read_status(path: Path) -> dict:
    """Read and validate a status file; raise StatusError with the state to report."""
    try:
        with open(path, "rb") as status_file:
            data = status_file.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError as error:
        raise StatusError(CRITICAL, f"no status file {path}: vacd is not running or has not started yet") from error
    except OSError as error:
        raise StatusError(UNKNOWN, f"cannot read {path}: {error.strerror}") from error
    if len(data) > MAX_STATUS_BYTES:
        raise StatusError(UNKNOWN, f"{path} is larger than {MAX_STATUS_BYTES} bytes")
    try:
        status = json.loads(data)
    except ValueError as error:
        raise StatusError(UNKNOWN, f"{path} is not valid JSON: {error}") from error
    return validate_status(status)


@dataclasses.dataclass
class CheckResult:
    state: int
    message: str
    perfdata: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        text = f"VACD {STATE_NAMES[self.state]} - {self.message}"
        return f"{text} | {' '.join(self.perfdata)}" if self.perfdata else text


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "(no message)"
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def evaluate(
    status: Mapping, now: float, warning: float, critical: float, alive: Callable[[int], bool] = process_alive
) -> CheckResult:
    """The plugin result for a validated status document at time ``now``."""
    problems: list[tuple[int, str]] = []
    if not alive(status["pid"]):
        problems.append((CRITICAL, f"vacd (pid {status['pid']}) is not running"))
    perfdata = [
        f"machines={status['running_machines']};;;0;{status['slots']}",
        f"processors={status['running_processors']};;;0;{status['total_processors']}",
    ]
    for key, name, label in _LIVENESS:
        if status[key] is None:
            continue
        age = max(0, round(now - status[key]))
        perfdata.append(f"{label}={age}s;{warning:g};{critical:g};0")
        if age >= critical:
            problems.append((CRITICAL, f"{name} not seen for {age}s"))
        elif age >= warning:
            problems.append((WARNING, f"{name} not seen for {age}s"))
    if status["last_creation_error"] is not None:
        when = status["last_creation_error_time"]
        ago = f" {max(0, round(now - when))}s ago" if when is not None else ""
        problems.append((CRITICAL, f"last creation failed{ago}: {_first_line(status['last_creation_error'])}"))
    summary = f"{status['running_machines']}/{status['slots']} machines running"
    state = max((problem_state for problem_state, _ in problems), default=OK)
    return CheckResult(state, "; ".join([text for _, text in problems] + [summary]), perfdata)


def _state_dir_from_config(args: argparse.Namespace) -> str:
    from vac.core import config as configmod

    loaded, problems = configmod.load_config(configmod.ConfigPaths.from_args(args))
    if loaded is None:
        errors = [problem for problem in problems if problem.is_error] or problems
        reason = errors[0] if errors else "unknown problem"
        raise StatusError(UNKNOWN, f"cannot read the configuration ({reason}); give --state-dir")
    return loaded.settings.state_dir


class _PluginArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Nagios plugins report bad usage as UNKNOWN, not argparse's exit status 2 (CRITICAL).
        self.print_usage(sys.stderr)
        print(f"VACD UNKNOWN - {message}")
        sys.exit(UNKNOWN)


def build_parser() -> argparse.ArgumentParser:
    from vac.ops.configcli import add_config_arguments

    parser = _PluginArgumentParser(prog="check-vacd", description="Nagios/Icinga check of the local vacd.")
    parser.add_argument("-w", "--warning", type=float, default=DEFAULT_WARNING_SECONDS, metavar="SECONDS",
                        help="WARNING if the loop or a service is older (default %(default)s)")
    parser.add_argument("-c", "--critical", type=float, default=None, metavar="SECONDS",
                        help=f"CRITICAL if older (default {DEFAULT_CRITICAL_SECONDS})")
    parser.add_argument("seconds", type=float, nargs="?", default=None,
                        help="classic form of --critical (check-vacd 600)")
    parser.add_argument("--state-dir", default=None, help="vacd's state directory (default: from the configuration)")
    add_config_arguments(parser)
    return parser


def main(argv: Optional[list] = None, now: Optional[float] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.critical is not None and args.seconds is not None:
        return _report(CheckResult(UNKNOWN, "give the critical age either as -c or as an argument, not both"))
    critical = next((value for value in (args.critical, args.seconds) if value is not None), DEFAULT_CRITICAL_SECONDS)
    warning = min(args.warning, critical)  # check-vacd 120: CRITICAL at 120 s, no separate WARNING band
    if critical <= 0 or warning <= 0:
        return _report(CheckResult(UNKNOWN, "thresholds must be positive numbers of seconds"))
    try:
        state_dir = args.state_dir if args.state_dir else _state_dir_from_config(args)
        status = read_status(Path(state_dir) / STATUS_FILE)
    except StatusError as error:
        return _report(CheckResult(error.state, str(error)))
    return _report(evaluate(status, time.time() if now is None else now, warning, critical))


def _report(result: CheckResult) -> int:
    print(result.line())
    return result.state


if __name__ == "__main__":
    sys.exit(main())
