"""systemd's notification protocol (sd_notify(3)), in-tree.

The protocol is one datagram of newline-separated ``KEY=VALUE`` assignments to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``; a leading ``@`` names a socket in the abstract namespace. Without
``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every call is a cheap no-op, so
the daemon calls it unconditionally.

Usage in vacd::

    notifier = SystemdNotifier()              # reads the environment once
    notifier.ready("0/8 machines running")    # sockets bound, first reconcile done
    notifier.status("3/8 machines running")
    notifier.watchdog()                        # every notifier.watchdog_seconds
    notifier.stopping()                        # on SIGTERM
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Optional

log = logging.getLogger(__name__)

_ENVIRONMENT_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: Optional[str]) -> Optional[str]:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value, or None if unusable.

    ``@name`` is the abstract socket ``\\0name``; other values must be absolute paths.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor @abstract", value)
    return None


def watchdog_interval(environ: Optional[Mapping[str, str]] = None, pid: Optional[int] = None) -> Optional[float]:
    """Seconds between ``WATCHDOG=1`` pings, or None if the watchdog is off for this process.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends; ``$WATCHDOG_PID``, when
    set, must name this process (the variables may have been inherited from a parent).
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != pid:
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", watchdog_pid)
            return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


class SystemdNotifier:
    """Sends notifications to systemd; does nothing when not started as a notify service.

    ``unset_environment=True`` removes the systemd variables from ``environ`` after reading them,
    so child processes (qemu-img, ssmsend) do not notify on vacd's behalf.
    """

    def __init__(self, environ: Optional[MutableMapping[str, str]] = None, unset_environment: bool = False):
        environ = os.environ if environ is None else environ
        self.address = socket_address(environ.get("NOTIFY_SOCKET"))
        self.watchdog_seconds = watchdog_interval(environ)
        if unset_environment:
            for key in _ENVIRONMENT_KEYS:
                environ.pop(key, None)
        self._socket: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True if systemd got it."""
        if self.address is None:
            return False
        for assignment in assignments:
            if "=" not in assignment or "\n" in assignment:
                raise ValueError(f"not a single KEY=VALUE assignment: {assignment!r}")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as error:
            # systemd gone or socket not there: report, never take the daemon down.
            log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), error)
            self.close()
            return False
        return True

    def ready(self, status: Optional[str] = None) -> bool:
        return self.send("READY=1", *self._status_assignment(status))

    def status(self, text: str) -> bool:
        return self.send(*self._status_assignment(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: Optional[str] = None) -> bool:
        return self.send("STOPPING=1", *self._status_assignment(status))

    def reloading(self) -> bool:
        """Start of a configuration reload (SIGHUP); follow with ``ready()`` when done."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @staticmethod
    def _status_assignment(text: Optional[str]) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.splitlines()),)
