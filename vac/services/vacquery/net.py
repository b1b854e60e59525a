"""What the VacQuery responder, client and VacMon sender share: socket buffers, name
resolution, the space's factory entries and rate-limited logging of dropped datagrams."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any, Callable, Union

from vac.core.config import FactoryAddress, Settings

log = logging.getLogger(__name__)


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SOCKET_BUFFER_BYTES = 16 * 1024 * 1024  # the classic size; the kernel caps it for non-root


RESOLVE_TIMEOUT = 5.0


def raise_buffers(sock: socket.socket) -> int:
    """Ask for 16 MiB buffers (beyond rmem_max when root) without touching /proc/sys;
    returns the receive buffer size the kernel granted."""
    for forced, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER_BYTES)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)
            except OSError as error:
                log.debug("cannot raise socket buffer: %s", error)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


async def resolve(name: str, timeout: float) -> list:
    """IPv4 addresses of ``name`` (an address resolves to itself); [] on any failure."""
    try:
        return [str(ipaddress.IPv4Address(name))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_DGRAM), timeout)
    except (OSError, asyncio.TimeoutError, UnicodeError):
        return []
    return sorted({info[4][0] for info in infos})


def factory_address(entry: Union[FactoryAddress, str], settings: Settings) -> FactoryAddress:
    """``entry`` as configured in ``factories`` if listed there (by name), else as given;
    ``"."`` is this factory."""
    name = entry.name if isinstance(entry, FactoryAddress) else entry
    if name == ".":
        name = settings.factory_name
    for configured in settings.factories:
        if configured.name == name:
            return configured
    if isinstance(entry, FactoryAddress):
        return entry
    return FactoryAddress(name=name)


DETAIL_CHARS = 200  # of a dropped datagram's detail in the log line


class DropCounter:
    """Datagrams dropped by reason; the responder logs each reason at most once a minute.

    ``reason`` must come from a fixed set: each new text would be a new key, logged at once and
    counted for ever. What the datagram itself said goes in ``detail``, which the reason's one
    line of the period shows (that of the drop that logs it; the others are only counted), and
    ``details`` keeps the latest of each reason."""

    def __init__(self, what: str, log_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.counts: dict = {}
        self.details: dict = {}  # reason -> the detail of its latest drop that gave one
        self.log_interval = log_interval
        self.clock = clock
        self._last_logged: dict = {}
        self._unlogged: dict = {}

    def summary(self) -> str:
        """``N (reason[: its latest detail])`` for every reason, in the reasons' order."""
        return ", ".join(f"{count} ({reason}: {self.details[reason]})" if reason in self.details
                         else f"{count} ({reason})" for reason, count in sorted(self.counts.items()))

    def drop(self, reason: str, source: Any, log_now: bool = True, exc_info: bool = False,
             detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if detail:
            self.details[reason] = detail[:DETAIL_CHARS]
        if not log_now:
            return
        now = self.clock()
        last = self._last_logged.get(reason)
        if last is not None and now - last < self.log_interval:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._last_logged[reason] = now
        suppressed = self._unlogged.pop(reason, 0)
        more = f" ({suppressed} more like it since the last such line)" if suppressed else ""
        shown = f" ({self.details[reason]})" if detail else ""
        log.warning("%s: dropped datagram from %s: %s%s%s", self.what, source, reason, shown, more,
                    exc_info=exc_info)
