"""Running vacd as a classic background daemon, for hosts without systemd (``vacd --daemon``).

``daemonize(pidfile)`` uses python-daemon's ``DaemonContext`` (PEP 3143): double fork, new session,
working directory ``/``, umask 0o022 (never 0: the classic daemon's umask 0 made user_data with
proxy keys world-readable), stdin/stdout/stderr on /dev/null, every other descriptor closed except
the log files. It must be called before the asyncio event loop and any thread or socket exist.
SIGTERM raises SystemExit (python-daemon's default) until the daemon installs its own handlers;
the pidfile is removed at exit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import IO, Any, Optional, Union

DAEMON_UMASK = 0o022

log = logging.getLogger(__name__)


class DaemonizeError(Exception):
    """The daemon cannot start: another instance holds the pidfile, or the pidfile is unusable."""


def process_alive(pid: int) -> bool:
    """True if a process with this PID exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: str) -> Optional[int]:
    """The PID stored in ``path``, or None if the file is absent, empty or malformed."""
    try:
        with open(path, encoding="ascii") as pidfile:
            text = pidfile.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


class PidFile:
    """A pidfile that refuses to start a second instance and replaces stale files.

    Context manager as python-daemon expects: ``__enter__`` writes this process's PID,
    ``__exit__`` removes the file if it still holds that PID.
    """

    def __init__(self, path: str):
        self.path = path

    def check(self) -> None:
        """Raise DaemonizeError if a live process already owns the pidfile."""
        pid = read_pid(self.path)
        if pid is not None and pid != os.getpid() and process_alive(pid):
            raise DaemonizeError(f"{self.path}: already running as pid {pid}")

    def __enter__(self) -> PidFile:
        # Written to a private file, then hard-linked into place: the link fails if the pidfile
        # exists (no two winners) and readers never see an empty pidfile.
        private = f"{self.path}.{os.getpid()}"
        try:
            with open(private, "w", encoding="ascii") as pidfile:
                pidfile.write(f"{os.getpid()}\n")
            os.chmod(private, 0o644)
            for _ in range(2):
                try:
                    os.link(private, self.path)
                    return self
                except FileExistsError:
                    self.check()
                    log.info("removing stale pidfile %s", self.path)
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
        except OSError as error:
            raise DaemonizeError(f"cannot create pidfile {self.path}: {error.strerror}") from error
        finally:
            try:
                os.unlink(private)
            except FileNotFoundError:
                pass
        raise DaemonizeError(f"{self.path}: another process keeps creating this pidfile")

    def __exit__(self, *exc_info: Any) -> None:
        if read_pid(self.path) == os.getpid():
            os.unlink(self.path)


def _log_streams() -> list:
    """Open streams of the root logger's handlers: kept open across daemonizing."""
    streams = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
        streams.append(stream)
    return streams


def daemonize(pidfile: str, preserve: Optional[Iterable[Union[IO, int]]] = None) -> Any:
    """Detach into the background and write ``pidfile``; returns the open ``DaemonContext``.

    ``preserve``: files or descriptors to keep open; default: the root logger's log files, so
    ``setup_logging(log_file=...)`` must be called first. Raises DaemonizeError *before*
    detaching if another live instance holds the pidfile, so the error reaches the terminal.
    """
    import daemon  # python-daemon; imported here so check-vacd and the CLI do not need it

    lock = PidFile(os.path.abspath(pidfile))
    lock.check()
    context = daemon.DaemonContext(
        working_directory="/",
        umask=DAEMON_UMASK,
        detach_process=True,  # --daemon was asked for explicitly, even when started by init
        pidfile=lock,
        files_preserve=list(_log_streams() if preserve is None else preserve),
    )
    context.open()
    return context
