"""Logging for vacd and the tools: journald under systemd, a rotatable file otherwise.

``setup_logging`` installs exactly one handler on the root logger (calling it again replaces it):

* ``log_file`` given: a ``WatchedFileHandler`` (it reopens the file by itself after logrotate
  moves or deletes it, so no signal and no postrotate command is needed), lines with timestamps;
* otherwise stderr. When stderr is connected to the journal (``$JOURNAL_STREAM`` names the
  device:inode of stderr, systemd.exec(5)) every line starts with its syslog priority ``<N>`` so
  journald records the level, and timestamps are left to journald. On a terminal, timestamps.

``log_format="json"`` writes one JSON object per line instead (for log shippers).
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from typing import IO, Optional

LOG_FORMATS = ("text", "json")

TIMESTAMPED_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

# syslog(3) priorities, as journald reads them from a "<N>" line prefix.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a logging level: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, else 7."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


def connected_to_journal(stream: IO, environ: Optional[Mapping[str, str]] = None) -> bool:
    """True if ``stream`` is the journal stream systemd gave this service."""
    environ = os.environ if environ is None else environ
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        # No JOURNAL_STREAM, a malformed one, or a stream without a file descriptor.
        return False


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, pid, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class PriorityPrefixFormatter(logging.Formatter):
    """Prefixes every line of ``inner``'s output with ``<N>``, so tracebacks keep the level too."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).splitlines())


_installed: Optional[logging.Handler] = None


def setup_logging(
    log_file: Optional[str] = None,
    level: int = logging.INFO,
    log_format: str = "text",
    stream: Optional[IO] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> logging.Handler:
    """Install the root handler described in the module docstring and return it.

    Raises ValueError for an unknown ``log_format`` and OSError if ``log_file`` cannot be opened.
    """
    global _installed
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; choose one of {', '.join(LOG_FORMATS)}")
    stream = sys.stderr if stream is None else stream
    json_lines = log_format == "json"
    handler: logging.Handler
    if log_file:
        handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        formatter = JsonFormatter() if json_lines else logging.Formatter(TIMESTAMPED_FORMAT)
    elif connected_to_journal(stream, environ):
        handler = logging.StreamHandler(stream)
        formatter = PriorityPrefixFormatter(JsonFormatter() if json_lines else logging.Formatter(JOURNAL_FORMAT))
    else:
        handler = logging.StreamHandler(stream)
        formatter = JsonFormatter() if json_lines else logging.Formatter(TIMESTAMPED_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler
    return handler


def start_daemon_logging(program: str, log_file: Optional[str], debug: bool, log_format: str) -> bool:
    """A daemon's logging from its command-line options, then its umask; False (after one line
    on stderr) when the log file cannot be opened."""
    try:
        setup_logging(log_file, logging.DEBUG if debug else logging.INFO, log_format)
    except OSError as error:
        print(f"{program}: cannot open log file: {error}", file=sys.stderr)
        return False
    os.umask(0o022)
    return True
