"""Fairness per machine for any HTTP service machines can reach: a share of connections per
source, vac's own accept loop, and rate-limited log lines.

Every service a VM (or container, or cloud machine) talks to is served through a
``FairListener``: connections are counted per machine (``ConnectionShares``, keyed by the slot of
the source address, every address outside the slot plan sharing one share) and a connection over
its machine's share is reset as it is accepted, before anything is read. ``connection_share``
sizes the share so that every slot's share and vacd's own reserve fit in the descriptor limit.
When descriptors run out all the same, accepting pauses with a growing back-off and one
rate-limited log line (``LogLimiter``), where asyncio's own accept loop logs a traceback for every
pending connection and keeps retrying. Nothing a machine does can grow the log by more than a
few lines a second.

The metadata and MJF services (vac.services.metadata) are the first users.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
import struct
import time
from typing import Callable, Optional

from aiohttp import web

log = logging.getLogger(__name__)

# Descriptors kept out of the machines' connection shares, for everything else vacd opens
# (libvirt, VacQuery, state and log files, executor threads writing files): at least this many,
# and a quarter of the limit when it is larger.
RESERVED_DESCRIPTORS = 64
LISTEN_BACKLOG = 1024  # connections the kernel queues before accept (capped by somaxconn)
ACCEPT_BATCH = 64  # connections accepted per turn of the event loop before others get theirs
ACCEPT_PAUSE_SECONDS = (0.05, 2.0)  # back-off when accepting fails: first, longest (doubling)
EVENT_LOG_SECONDS = 10.0  # at most one refusal / out-of-descriptors line this often per cause
# accept() failures that concern only the one connection: try the next at once
ACCEPT_TRANSIENT = frozenset((errno.ECONNABORTED, errno.EINTR, errno.EAGAIN, errno.EPROTO,
                              errno.EPERM))
TLS_HANDSHAKE_SECONDS = 15.0  # a client that opens a TLS connection and stalls holds its share this long
UNLIMITED_DESCRIPTORS = 1 << 20  # taken for an RLIM_INFINITY limit (Linux's default nr_open)

SlotForAddress = Callable[[str], Optional[int]]


# ---------------------------------------------------------------------------------------------
# Sizing the shares


def reserved_descriptors(descriptors: int) -> int:
    """Descriptors left for vacd's own use out of a limit of ``descriptors``."""
    return max(RESERVED_DESCRIPTORS, descriptors // 4)


def connection_share(wanted: int, slots: int, descriptors: int) -> int:
    """Connections per machine: ``wanted``, lowered if need be so that ``slots`` machines and
    the share of all unattributed addresses fit in ``descriptors`` (the open file limit) beside
    vacd's reserve. At least one: if even that does not fit, ``shares_fit_in`` says so."""
    if slots < 1:
        raise ValueError(f"the slot count must be positive, not {slots}")
    room = descriptors - reserved_descriptors(descriptors)
    return max(1, min(wanted, room // (slots + 1)))


def shares_fit_in(share: int, slots: int, descriptors: int) -> bool:
    """Whether ``slots`` + 1 shares of ``share`` connections and vacd's reserve fit."""
    return (slots + 1) * share + reserved_descriptors(descriptors) <= descriptors


def descriptor_limit() -> int:
    """This process's soft open file limit (a large number for "unlimited")."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED_DESCRIPTORS if soft == resource.RLIM_INFINITY else soft


# ---------------------------------------------------------------------------------------------
# Rate-limited logging


class LogLimiter:
    """Token bucket per source: ``burst`` lines at once, then ``per_second`` on average (also
    the VacQuery responder's limit on queries per source address)."""

    def __init__(self, burst: int, per_second: float,
                 clock: Callable[[], float] = time.monotonic, max_sources: int = 4096):
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self.max_sources = max_sources
        self._buckets: dict[str, list[float]] = {}  # source -> [tokens, last time, dropped]

    def admit(self, source: str) -> Optional[int]:
        """None if this line is to be dropped, else how many were dropped since the last one."""
        now = self.clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]  # forget the oldest source
            bucket = self._buckets[source] = [float(self.burst), now, 0]
        bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.per_second)
        bucket[1] = now
        if bucket[0] < 1.0:
            bucket[2] += 1
            return None
        bucket[0] -= 1.0
        dropped, bucket[2] = int(bucket[2]), 0
        return dropped


class RateLimitFilter(logging.Filter):
    """Passes a logger's records through one ``LogLimiter`` bucket (a library's own logger, such
    as aiohttp's protocol errors, whose lines a client can provoke at will)."""

    def __init__(self, limiter: LogLimiter):
        super().__init__()
        self.limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        return self.limiter.admit("aiohttp") is not None


def limit_logger(logger: logging.Logger, limiter: LogLimiter) -> None:
    """Rate-limit ``logger`` through ``limiter``, once however often services start."""
    if not any(isinstance(existing, RateLimitFilter) for existing in logger.filters):
        logger.addFilter(RateLimitFilter(limiter))


# ---------------------------------------------------------------------------------------------
# Connections: shares per machine and vac's own accept loop


class ConnectionShares:
    """Open connections per machine: the slot of the source address, or one share for every
    address outside the slot plan together. One instance may serve several listeners, whose
    connections then count together."""

    def __init__(self, per_machine: int, slot_for_address: SlotForAddress):
        self.per_machine = per_machine
        self.slot_for_address = slot_for_address
        self.open: dict[Optional[int], int] = {}

    def limit(self, key: Optional[int]) -> int:
        """The connections the share ``key`` may hold."""
        return self.per_machine

    def describe(self, key: Optional[int], address: str) -> str:
        """Whose share ``key`` is, for the log."""
        return f"slot {key} ({address})" if key is not None else f"addresses outside the slot plan ({address})"

    def take(self, address: str) -> tuple[Optional[int], bool]:
        """(the share's key, whether a connection from ``address`` fits in it and was counted)."""
        key = self.slot_for_address(address)
        held = self.open.get(key, 0)
        if held >= self.limit(key):
            return key, False
        self.open[key] = held + 1
        return key, True

    def give_back(self, key: Optional[int]) -> None:
        held = self.open[key] - 1
        if held:
            self.open[key] = held
        else:
            del self.open[key]


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, which gives its share back when it ends."""

    def __init__(self, inner: asyncio.Protocol, give_back: Callable[[], None]):
        self.inner = inner
        self._give_back: Optional[Callable[[], None]] = give_back

    def release(self) -> None:
        """Give the share back, once."""
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.release()
        self.inner.connection_lost(exc)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset: no TIME_WAIT left here, and the client learns at once."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        conn.close()


def listening_socket(address: str, port: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``address``:``port`` (IPv4 or IPv6)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.create_server((address, port), family=family, backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class FairListener:
    """One service's listening socket, accepted by vac itself instead of ``loop.create_server``.

    Up to ``ACCEPT_BATCH`` connections are accepted each time the socket is readable, so a flood
    of connections neither fills the kernel's queue (whose overflow would drop every machine's
    connection attempts alike) nor keeps the loop from answering the machines already connected.
    A connection over its machine's share is reset as it is accepted. When accept() fails for
    want of descriptors or memory, accepting pauses (doubling from 50 ms to 2 s) with at most
    one log line every ``EVENT_LOG_SECONDS``: asyncio's own accept loop instead logs the error
    with a traceback for each of up to ``backlog`` queued connections and schedules as many
    retries (CPython's ``BaseSelectorEventLoop._accept_connection`` goes on looping after
    EMFILE), which grew a log by 100 MB in 30 s.

    ``events`` limits the refusal and accept-failure lines (one bucket per cause, shared by
    listeners that share it); they go to ``logger``, the service's own.
    """

    def __init__(self, name: str, runner: web.AppRunner, sock: socket.socket,
                 shares: ConnectionShares, events: LogLimiter, logger: logging.Logger = log,
                 ssl_context: Optional[ssl.SSLContext] = None):
        self.name = name
        self.ssl_context = ssl_context  # TLS on every connection (vcycle's HTTPS MJF)
        self.runner = runner
        self.sock = sock
        self.shares = shares
        self.events = events
        self.log = logger
        self._loop = asyncio.get_running_loop()
        self._connecting: set[asyncio.Task] = set()
        self._pause = ACCEPT_PAUSE_SECONDS[0]
        self._resume: Optional[asyncio.TimerHandle] = None
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    async def close(self) -> None:
        """Stop accepting, then close every connection (aiohttp answers those mid-request)."""
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self.sock.fileno())
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        self.sock.close()
        await self.runner.cleanup()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                if error.errno in ACCEPT_TRANSIENT:
                    continue
                self._log_event("accept", "%s: cannot accept connections: %s; pausing %.2f s",
                                self.name, error.strerror or error, self._pause)
                self._loop.remove_reader(self.sock.fileno())
                self._resume = self._loop.call_later(self._pause, self._resume_accepting)
                self._pause = min(2 * self._pause, ACCEPT_PAUSE_SECONDS[1])
                return
            self._adopt(conn, peer[0])
        self._pause = ACCEPT_PAUSE_SECONDS[0]

    def _resume_accepting(self) -> None:
        self._resume = None
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def _adopt(self, conn: socket.socket, address: str) -> None:
        key, admitted = self.shares.take(address)
        if not admitted:
            _reset(conn)
            self._log_event(f"share {key}", "%s: %s already holds its %d connections; "
                            "refusing more", self.name, self.shares.describe(key, address),
                            self.shares.limit(key))
            return
        conn.setblocking(False)
        task = self._loop.create_task(self._connect(conn, key))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, key: Optional[int]) -> None:
        holder: Optional[_Counted] = None

        def protocol() -> _Counted:
            nonlocal holder
            holder = _Counted(self.runner.server(), lambda: self.shares.give_back(key))
            return holder

        try:
            await self._loop.connect_accepted_socket(
                protocol, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS if self.ssl_context else None)
        except BaseException as error:
            # Without a protocol the socket is still ours to close; with one, asyncio closes
            # the transport. Either way the share is given back exactly once.
            if holder is None:
                conn.close()
                self.shares.give_back(key)
            else:
                holder.release()
            if not isinstance(error, Exception):
                raise
            self._log_event("connect", "%s: cannot set up a connection: %s", self.name, error)

    def _log_event(self, cause: str, message: str, *args: object) -> None:
        dropped = self.events.admit(cause)
        if dropped is not None:
            note = f" ({dropped} more since the last such line)" if dropped else ""
            self.log.warning(message + "%s", *args, note)


async def serve_fairly(name: str, runner: web.AppRunner, address: str, port: int,
                       shares: ConnectionShares, events: LogLimiter,
                       logger: logging.Logger = log,
                       ssl_context: Optional[ssl.SSLContext] = None) -> FairListener:
    """Set ``runner`` up and serve it on ``address``:``port`` through a ``FairListener`` (with
    TLS if ``ssl_context`` is given). Raises OSError if the address cannot be bound (the runner
    is cleaned up)."""
    await runner.setup()
    try:
        sock = listening_socket(address, port)
    except BaseException:
        await runner.cleanup()
        raise
    return FairListener(name, runner, sock, shares, events, logger, ssl_context)
