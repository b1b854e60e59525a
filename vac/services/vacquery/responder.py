"""The VacQuery responder: an endpoint on vacd's event loop answering from the daemon's
in-memory status, with a per-source rate limit and no amplification towards sources outside
the space. Nothing raises out of the receive path: a datagram that fails any check is dropped
and counted under one of a fixed set of reasons, with at most one log line per reason a minute
(what the datagram said shown in it), however many sources or distinct texts there are."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

from vac.core.config import FactoryAddress, Settings
from vac.services.fairness import LogLimiter
from vac.services.vacquery.auth import HMAC_OVERHEAD, Authenticator
from vac.services.vacquery.codec import (
    AMPLIFICATION_FACTOR,
    COOKIE_MAX_CHARS,
    FACTORY,
    MACHINES,
    MACHINETYPES,
    MAX_ITEMS,
    MAX_RECEIVE_BYTES,
    MAX_SEND_BYTES,
    DatagramError,
    encode_factory_status,
    encode_machine_status,
    encode_machinetype_status,
    parse_query,
)
from vac.services.vacquery.net import RESOLVE_TIMEOUT, DropCounter, raise_buffers, resolve
from vac.services.vacquery.records import StatusSnapshot

log = logging.getLogger(__name__)


DEFAULT_QUERY_RATE = 20.0  # queries per second and source, on average ...
DEFAULT_QUERY_BURST = 60  # ... and at once: a few full `vac` runs with all their resends
FACTORY_RESOLVE_SECONDS = 600.0  # how often the responder re-resolves the space's factories


StatusProvider = Callable[[], StatusSnapshot]


def gso_batches(replies: Sequence[bytes]) -> list:
    """Replies grouped for UDP segmentation: largest first, each batch led by its largest
    datagram, the others needing at most GSO_MAX_PADDING bytes to reach its size (the last one
    is sent unpadded), at most GSO_MAX_SEGMENTS datagrams and 64 KiB per batch."""
    batches: list = []
    for reply in sorted(replies, key=len, reverse=True):
        if batches:
            batch = batches[-1]
            size = len(batch[0])
            if (size - len(reply) <= GSO_MAX_PADDING and len(batch) < GSO_MAX_SEGMENTS
                    and size * (len(batch) + 1) <= 65000):
                batch.append(reply)
                continue
        batches.append([reply])
    return batches


READ_BATCH = 64  # datagrams read per wake-up of the event loop
SOL_UDP = 17
UDP_SEGMENT = 103  # Linux >= 4.18: one sendmsg carries many equal-sized datagrams (GSO)
GSO_MAX_SEGMENTS = 64
GSO_MAX_PADDING = 96  # bytes of trailing spaces a datagram may get to join a GSO batch


class Responder:
    """Answers VacQuery queries from ``status_provider()`` (called once per query).

    Replies are rendered once per snapshot and second with a gap for the cookie, so a query
    costs a few string joins and ``sendto`` calls. Sources outside the space's factories get at
    most ``AMPLIFICATION_FACTOR`` times the query's size back.

    It reads its non-blocking socket directly (``attach``), many datagrams per wake-up, and
    sends without asyncio's transport: a reply that would block is dropped like any lost UDP
    datagram instead of queueing without bound in memory. On Linux, replies of similar size go
    out in one ``sendmsg`` with UDP segmentation offload, padded with trailing spaces (valid
    JSON whitespace) to equal length; this is what lets one core answer thousands of queries a
    second, since the per-datagram cost of ``sendto`` dominates everything else.
    """

    def __init__(self, settings: Settings, status_provider: StatusProvider,
                 secret: Optional[bytes] = None, *, rate: float = DEFAULT_QUERY_RATE,
                 burst: float = DEFAULT_QUERY_BURST, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.settings = settings
        self.status_provider = status_provider
        self.authenticator = Authenticator(secret, settings.vacquery_allow_unauthenticated)
        # Per source address; as many as the records kept of factories (the oldest forgotten).
        self.limiter = LogLimiter(burst, rate, clock, max_sources=MAX_ITEMS)
        self.drops = DropCounter("VacQuery responder", clock=clock)
        self.wall_clock = wall_clock
        self.answered: dict = {MACHINES: 0, MACHINETYPES: 0, FACTORY: 0}
        self.truncated = 0  # replies cut short by the amplification rule
        self.factory_addresses: frozenset = frozenset()
        self.sock: Optional[socket.socket] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._templates: dict = {}  # kind -> (snapshot, second, [(prefix, suffix)])
        self._refresh_task: Optional[asyncio.Task] = None

    # -- lifecycle

    def attach(self, sock: Any, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Answer on ``sock`` (bound, non-blocking); with ``loop``, read it when readable."""
        self.sock = sock
        self._gso = sys.platform.startswith("linux") and hasattr(sock, "sendmsg")
        if loop is not None:
            self._loop = loop
            loop.add_reader(sock.fileno(), self._readable)

    @property
    def address(self) -> tuple:
        """The bound (address, port)."""
        return self.sock.getsockname() if self.sock is not None else ("", 0)

    def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            self._refresh_task = None
        if self.sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def resolve_factories(self) -> None:
        """Learn the addresses of the space's factories (ours included), for the
        amplification rule. Names that do not resolve are logged and skipped."""
        settings = self.settings
        entries = list(settings.factories)
        if settings.vacquery_address:
            entries.append(FactoryAddress(settings.factory_name, settings.vacquery_address))
        elif all(entry.name != settings.factory_name for entry in entries):
            entries.append(FactoryAddress(settings.factory_name))
        names = [entry.address or entry.name for entry in entries]
        results = await asyncio.gather(*(resolve(name, RESOLVE_TIMEOUT) for name in names))
        addresses = set()
        for name, found in zip(names, results):
            if not found:
                log.warning("VacQuery responder: cannot resolve factory %s; it is treated as "
                            "outside the space", name)
            addresses.update(found)
        self.factory_addresses = frozenset(addresses)

    async def _refresh_factories(self, now: bool = False) -> None:
        """Resolve the space's factories every FACTORY_RESOLVE_SECONDS (first at once with
        ``now``)."""
        while True:
            if not now:
                await asyncio.sleep(FACTORY_RESOLVE_SECONDS)
            now = False
            await self.resolve_factories()

    def reconfigure(self, settings: Settings, secret: Optional[bytes]) -> None:
        """Answer with reloaded settings and secret from the next query on. The socket stays
        where it was bound: vacquery_address and vacquery_port need a restart."""
        factories_changed = settings.factories != self.settings.factories
        self.settings = settings
        self.authenticator.configure(secret, settings.vacquery_allow_unauthenticated)
        self._templates.clear()  # rendered with the old settings (space, site, ...)
        if factories_changed and self._refresh_task is not None:
            # Resolve the new list now (the amplification rule), then on the usual schedule.
            self._refresh_task.cancel()
            self._refresh_task = self._loop.create_task(self._refresh_factories(now=True))

    # -- receiving

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            try:
                # One byte more than we accept: a longer datagram arrives cut and is dropped.
                data, addr = self.sock.recvfrom(MAX_RECEIVE_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. ICMP errors reported on the socket
                self.drops.drop("socket error", "-", detail=str(error.strerror or error))
                return
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self._answer(data, addr)
        except Exception as error:  # a bug must never stop the responder
            self.drops.drop("internal error", addr[0], exc_info=True,
                            detail=error.__class__.__name__)

    def _answer(self, data: bytes, addr: tuple) -> None:
        source = addr[0]
        if self.limiter.admit(source) is None:
            self.drops.drop("rate limit", source)
            return
        try:
            query, message = parse_query(data)
        except DatagramError as error:
            self.drops.drop("malformed query", source, detail=str(error))
            return
        if query.space != self.settings.vac_space:
            self.drops.drop("space is not ours", source, detail=repr(query.space[:80]))
            return
        problem = self.authenticator.check(data, message, source)
        if problem:  # one of the authenticator's fixed texts
            self.drops.drop(problem, source)
            return
        replies = self._replies(query.kind, query.cookie)
        if source not in self.factory_addresses:
            budget = AMPLIFICATION_FACTOR * len(data)
            for count, reply in enumerate(replies):
                budget -= len(reply)
                if budget < 0:
                    replies = replies[:count]
                    self.truncated += 1
                    self.drops.drop("reply cut short: source outside the space", source)
                    break
        self._send(replies, addr)
        self.answered[query.kind] += 1

    def _send(self, replies: list, addr: tuple) -> None:
        try:
            if self._gso and len(replies) > 1:
                for batch in gso_batches(replies):
                    self._send_batch(batch, addr)
            else:
                for reply in replies:
                    self.sock.sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            self.drops.drop("send buffer full", addr[0])
        except OSError as error:
            self.drops.drop("cannot send", addr[0], detail=str(error.strerror or error))

    def _send_batch(self, batch: list, addr: tuple) -> None:
        if len(batch) == 1:
            self.sock.sendto(batch[0], addr)
            return
        size = len(batch[0])
        payload = b"".join(reply.ljust(size) for reply in batch[:-1]) + batch[-1]
        try:
            self.sock.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as error:  # no UDP segmentation here (old kernel, odd device)
            log.info("VacQuery responder: UDP segmentation unavailable (%s); sending datagrams "
                     "one by one", error.strerror or error)
            self._gso = False
            for reply in batch:
                self.sock.sendto(reply, addr)

    def _replies(self, kind: str, cookie: str) -> list:
        snapshot = self.status_provider()
        if snapshot is None:  # the daemon has not finished its first cycle
            return []
        second = int(self.wall_clock())
        cached = self._templates.get(kind)
        if cached is None or cached[0] is not snapshot or cached[1] != second:
            cached = (snapshot, second, self._render_templates(kind, snapshot, second))
            self._templates[kind] = cached
        quoted = json.dumps(cookie).encode("ascii")
        if self.authenticator.secret is None:
            return [prefix + quoted + suffix for prefix, suffix in cached[2]]
        return [self.authenticator.seal(prefix + quoted + suffix) for prefix, suffix in cached[2]]

    def _render_templates(self, kind: str, snapshot: StatusSnapshot, second: int) -> list:
        """The replies with an empty cookie, split around it; room is left for the longest
        cookie and the HMAC so that every sent datagram stays within MAX_SEND_BYTES."""
        limit = MAX_SEND_BYTES - COOKIE_MAX_CHARS - HMAC_OVERHEAD
        settings = self.settings
        if kind == MACHINES:
            count = len(snapshot.machines)
            bodies = [encode_machine_status(machine, settings, num_machines=count, cookie="",
                                            time_sent=second, limit=limit)
                      for machine in snapshot.machines[:MAX_ITEMS]]
        elif kind == MACHINETYPES:
            count = len(snapshot.machinetypes)
            bodies = [encode_machinetype_status(report, settings, num_machinetypes=count,
                                                cookie="", time_sent=second, limit=limit)
                      for report in snapshot.machinetypes[:MAX_ITEMS]]
        else:
            bodies = [encode_factory_status(snapshot.factory, settings, cookie="",
                                            time_sent=second, limit=limit)]
        marker = b'"cookie":""'
        templates = []
        for body in bodies:
            at = body.index(marker) + len(b'"cookie":')
            templates.append((body[:at], body[at + 2:]))
        return templates


async def start_responder(settings: Settings, status_provider: StatusProvider,
                          secret: Optional[bytes] = None, **options: Any) -> Responder:
    """Bind ``(vacquery_address or all interfaces, vacquery_port)`` and answer queries.

    ``options`` go to ``Responder`` (``rate``, ``burst``, clocks). Raises OSError if the port
    cannot be bound. Stop it with ``responder.close()``.
    """
    loop = asyncio.get_running_loop()
    responder = Responder(settings, status_provider, secret, **options)
    await responder.resolve_factories()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((settings.vacquery_address or "0.0.0.0", settings.vacquery_port))
        raise_buffers(sock)
    except OSError:
        sock.close()
        raise
    responder.attach(sock, loop)
    responder._refresh_task = loop.create_task(responder._refresh_factories())
    return responder
