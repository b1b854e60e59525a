"""The VacQuery client (an overall deadline, resends only to incomplete factories, partial
results with the silent factories named) and the planner's peer-report cache. Every reply is
validated before it is stored; what fails is counted and summed up in one log line per query."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import socket
import time
from collections.abc import Iterable
from typing import Any, Callable, Optional

from vac.core.config import Settings
from vac.services.vacquery.auth import Authenticator
from vac.services.vacquery.codec import (
    FACTORY,
    FACTORY_CLIENT,
    MACHINES,
    MACHINETYPES,
    MAX_ITEMS,
    DatagramError,
    encode_query,
    make_cookie,
    new_salt,
    parse_response,
)
from vac.services.vacquery.net import (
    RESOLVE_TIMEOUT,
    DropCounter,
    factory_address,
    raise_buffers,
    resolve,
)

log = logging.getLogger(__name__)


MAX_TRIES = 6  # the classic number of rounds (vacqueryTries)


DEFAULT_PEER_BATCH = 64  # peers the cache queries per refresh: constant, so traffic is linear


@dataclasses.dataclass
class QueryResult:
    """Outcome of one query of many factories.

    ``reports`` holds the records in factory order (then by machine or machinetype name), each
    with ``factory`` set to the name it was queried under. ``silent`` factories sent nothing
    valid (or could not be resolved: see ``problems``); ``incomplete`` ones sent only part.
    ``messages`` are the validated raw messages (for ``--json``).
    """

    kind: str
    reports: list = dataclasses.field(repr=False)  # thousands of records: kept out of reprs,
    answered: list  # which asyncio makes of finished tasks
    silent: list
    incomplete: list
    messages: list = dataclasses.field(repr=False)
    problems: dict  # factory -> why it was not queried
    dropped: dict  # reason -> number of datagrams dropped
    elapsed: float

    @property
    def complete(self) -> bool:
        return not self.silent and not self.incomplete


TRUESIZE_BYTES = 2304  # kernel memory one received datagram of ~1 kB takes in a socket buffer
MIN_WINDOW = 16
EXPECTED_REPLIES = {MACHINES: 16, MACHINETYPES: 16, FACTORY: 1}


@dataclasses.dataclass
class _Target:
    name: str
    port: int
    address: Optional[str] = None
    cookie: str = ""
    sends: int = 0
    last_activity: float = 0.0
    expected: Optional[int] = None  # num_machines / num_machinetypes last reported
    heard: bool = False
    items: dict = dataclasses.field(default_factory=dict)  # key -> Response

    def complete(self, kind: str) -> bool:
        if kind == FACTORY:
            return self.heard
        return self.heard and self.expected is not None and len(self.items) >= self.expected


class _ClientProtocol(asyncio.DatagramProtocol):
    """Receives replies for one query run; everything is validated before it is stored."""

    def __init__(self, run: _QueryRun):
        self.run = run

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self.run.receive(data, addr[0])
        except Exception as error:  # never let a bad datagram end the query
            self.run.drops.drop("internal error", addr[0], exc_info=True, detail=error.__class__.__name__)

    def error_received(self, exc: Exception) -> None:
        self.run.drops.drop("socket error", "-", False, detail=str(exc))


class _QueryRun:
    """One query of many factories: sending, resending, receiving, the deadline."""

    def __init__(self, kind: str, targets: list, space: str, client: str,
                 authenticator: Authenticator, clock: Callable[[], float]):
        self.kind = kind
        self.targets = targets
        self.space = space
        self.client = client
        self.authenticator = authenticator
        self.clock = clock
        self.salt = new_salt()
        self.by_cookie: dict = {}
        for target in targets:
            target.cookie = make_cookie(self.salt, target.name)
            self.by_cookie[target.cookie] = target
        self.drops = DropCounter("VacQuery client", clock=clock)
        self.progress = asyncio.Event()
        self.expected_replies = EXPECTED_REPLIES[kind]
        self.remaining = len(targets)  # factories not complete yet
        self.waiting_for_window = False  # factories wait to be sent to until others complete

    def receive(self, data: bytes, source: str) -> None:
        try:
            response, message = parse_response(data)
        except DatagramError as error:
            self.drops.drop("malformed reply", source, False, detail=str(error))
            return
        target = self.by_cookie.get(response.cookie)
        if response.kind != self.kind or target is None:
            self.drops.drop("not a reply to this query", source, False)
            return
        # Classic binding: the cookie hashes the responder's own name. A factory listed under
        # an alias is accepted when it answers from the address it was asked at.
        if make_cookie(self.salt, response.factory) != response.cookie and source != target.address:
            self.drops.drop("cookie does not match factory", source, False)
            return
        if response.space != self.space:
            self.drops.drop("wrong space", source, False)
            return
        problem = self.authenticator.check(data, message, target.name)
        if problem:
            self.drops.drop(problem, source, False)
            return
        was_complete = target.complete(self.kind)
        target.heard = True
        target.last_activity = self.clock()
        if response.count is not None:
            target.expected = response.count
            self.expected_replies = max(self.expected_replies, response.count)
        key = response.key or ""
        if key in target.items or len(target.items) < MAX_ITEMS:
            target.items[key] = response
        if not was_complete and target.complete(self.kind):
            self.remaining -= 1
            if self.remaining == 0 or self.waiting_for_window:
                self.progress.set()

    def window(self, receive_buffer: int) -> int:
        """How many factories may be answering at once without overflowing our buffer."""
        return max(MIN_WINDOW, receive_buffer // (TRUESIZE_BYTES * max(1, self.expected_replies)))

    async def run(self, transport: asyncio.DatagramTransport, timeout: float) -> None:
        start = self.clock()
        deadline = start + timeout
        # The first resend comes after timeout/16 (at most 0.5 s); each later one waits twice
        # as long, counted from the last datagram the factory sent (it may still be sending).
        base = min(0.5, max(0.05, timeout / 16))
        receive_buffer = transport.get_extra_info("socket").getsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF)
        unsent = list(reversed(self.targets))  # pop() from the end keeps configured order
        outstanding: list = []
        while True:
            now = self.clock()
            if now >= deadline:
                break
            outstanding = [t for t in outstanding if not t.complete(self.kind)]
            if not unsent and not outstanding:
                break
            in_flight = 0
            due = []
            next_wake = deadline
            for target in outstanding:
                interval = base * 2 ** (target.sends - 1)
                wake = target.last_activity + interval
                if now < wake:
                    in_flight += 1
                    next_wake = min(next_wake, wake)
                elif target.sends < MAX_TRIES:
                    due.append(target)
            window = self.window(receive_buffer)
            for target in due:
                if in_flight >= window:
                    break
                self._send(transport, target, now)
                in_flight += 1
                next_wake = min(next_wake, now + base * 2 ** (target.sends - 1))
            while unsent and in_flight < window:
                target = unsent.pop()
                self._send(transport, target, now)
                outstanding.append(target)
                in_flight += 1
                next_wake = min(next_wake, now + base)
            if in_flight == 0 and not unsent:
                break  # every outstanding factory has used all its tries and its last wait
            if self.remaining == 0:
                break
            self.waiting_for_window = bool(unsent)
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), max(0.0, next_wake - self.clock()))
            except asyncio.TimeoutError:
                pass

    def _send(self, transport: asyncio.DatagramTransport, target: _Target, now: float) -> None:
        target.sends += 1
        target.last_activity = now
        query = self.authenticator.seal(encode_query(self.kind, self.space, target.cookie, self.client))
        transport.sendto(query, (target.address, target.port))

    def result(self, problems: dict, elapsed: float) -> QueryResult:
        reports, answered, silent, incomplete, messages = [], [], [], [], []
        for target in self.targets:
            if target.name in problems:
                silent.append(target.name)
                continue
            if not target.heard:
                silent.append(target.name)
                continue
            (answered if target.complete(self.kind) else incomplete).append(target.name)
            for key in sorted(target.items):
                response = target.items[key]
                reports.append(dataclasses.replace(response.record, factory=target.name))
                messages.append(response.fields)
        return QueryResult(self.kind, reports, answered, silent, incomplete, messages,
                           dict(problems), dict(self.drops.counts), elapsed)


async def query(settings: Settings, kind: str, factories: Optional[Iterable] = None,
                timeout: Optional[float] = None, *, space: Optional[str] = None,
                client: str = FACTORY_CLIENT, secret: Optional[bytes] = None,
                authenticator: Optional[Authenticator] = None,
                clock: Callable[[], float] = time.monotonic) -> QueryResult:
    """Query ``factories`` (FactoryAddress or names; default: the space's) concurrently and
    return within ``timeout`` seconds (default ``udp_timeout_seconds``) with what arrived.

    Queries leave from ``vacquery_address`` when it is set, so peers see a factory of the
    space. Never raises for network trouble: unresolvable or unreachable factories are silent.
    """
    timeout = settings.udp_timeout_seconds if timeout is None else timeout
    space = space or settings.vac_space
    authenticator = authenticator or Authenticator(secret, settings.vacquery_allow_unauthenticated)
    entries = list(settings.factories if factories is None else factories)
    started = clock()
    targets: list = []
    seen = set()
    for entry in entries:
        address = factory_address(entry, settings)
        if address.name in seen:
            continue
        seen.add(address.name)
        targets.append(_Target(address.name, address.port or settings.vacquery_port, address.address))
    problems: dict = {}
    unresolved = [target for target in targets if target.address is None]
    found = await asyncio.gather(*(resolve(t.name, min(RESOLVE_TIMEOUT, timeout)) for t in unresolved))
    for target, addresses in zip(unresolved, found):
        if addresses:
            target.address = addresses[0]
        else:
            problems[target.name] = "cannot resolve name"
    run = _QueryRun(kind, [t for t in targets if t.address], space, client, authenticator, clock)
    loop = asyncio.get_running_loop()
    transport = None
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ClientProtocol(run), local_addr=(settings.vacquery_address or "0.0.0.0", 0),
            family=socket.AF_INET)
        raise_buffers(transport.get_extra_info("socket"))
        await run.run(transport, max(0.0, timeout - (clock() - started)))
    except OSError as error:
        for target in run.targets:
            problems.setdefault(target.name, f"cannot send: {error.strerror or error}")
    finally:
        if transport is not None:
            transport.close()
    run.targets = targets
    result = run.result(problems, clock() - started)
    if result.dropped:
        log.info("VacQuery %s query: dropped %s", kind, run.drops.summary())
    return result


async def query_machines(settings: Settings, factories: Optional[Iterable] = None,
                         timeout: Optional[float] = None, **options: Any) -> QueryResult:
    """``machines_query``: ``reports`` is a list of MachineStatus."""
    return await query(settings, MACHINES, factories, timeout, **options)


async def query_machinetypes(settings: Settings, factories: Optional[Iterable] = None,
                             timeout: Optional[float] = None, **options: Any) -> QueryResult:
    """``machinetypes_query``: ``reports`` is a list of MachinetypeReport."""
    return await query(settings, MACHINETYPES, factories, timeout, **options)


async def query_factories(settings: Settings, factories: Optional[Iterable] = None,
                          timeout: Optional[float] = None, **options: Any) -> QueryResult:
    """``factory_query``: ``reports`` is a list of FactoryStatus."""
    return await query(settings, FACTORY, factories, timeout, **options)


class PeerReportCache:
    """The latest ``machinetype_status`` of every peer factory (not this one), for the planner.

    Each refresh queries the next ``batch_size`` peers in turn, so a factory sends a constant
    number of queries per ``refresh_seconds`` however big the space is: space-wide traffic grows
    linearly with the number of factories. A complete answer replaces what the cache held for
    that factory; a partial one updates the machinetypes it contains. Reports older than three
    full rotations are aged out.
    """

    def __init__(self, settings: Settings, refresh_seconds: Optional[float] = None, *,
                 secret: Optional[bytes] = None, batch_size: int = DEFAULT_PEER_BATCH,
                 timeout: Optional[float] = None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._refresh_seconds = refresh_seconds  # None: peer_cache_seconds, reloaded
        self.batch_size = max(1, batch_size)
        self.timeout = timeout
        self.clock = clock
        self.authenticator = Authenticator(secret, settings.vacquery_allow_unauthenticated)
        self.last_result: Optional[QueryResult] = None
        self._entries: dict = {}  # factory -> {machinetype: (received, MachinetypeReport)}
        self._next = 0
        self._refreshing: Optional[asyncio.Future] = None
        self._wake: Optional[asyncio.Event] = None

    @property
    def refresh_seconds(self) -> float:
        return self._refresh_seconds or self.settings.peer_cache_seconds

    def reconfigure(self, settings: Settings, secret: Optional[bytes]) -> None:
        """Query with reloaded settings and secret from the next refresh on; a changed refresh
        period starts with a refresh now rather than at the end of the old period's wait."""
        period = self.refresh_seconds
        self.settings = settings
        self.authenticator.configure(secret, settings.vacquery_allow_unauthenticated)
        if self.refresh_seconds != period:
            self.request_refresh()

    def peers(self) -> list:
        return [entry for entry in self.settings.factories if entry.name != self.settings.factory_name]

    @property
    def max_age(self) -> float:
        rotations = max(1, math.ceil(len(self.peers()) / self.batch_size))
        return 3 * self.refresh_seconds * rotations

    def _batch(self) -> list:
        peers = self.peers()
        if len(peers) <= self.batch_size:
            return peers
        start = self._next % len(peers)
        self._next = start + self.batch_size
        return (peers + peers)[start:start + self.batch_size]

    async def refresh(self, full: bool = False) -> QueryResult:
        """Query the next batch of peers (all of them with ``full``); concurrent calls share
        one query."""
        if self._refreshing is not None and not self._refreshing.done():
            return await asyncio.shield(self._refreshing)
        self._refreshing = asyncio.ensure_future(
            self._refresh(self.peers() if full else self._batch()))
        return await asyncio.shield(self._refreshing)

    async def _refresh(self, peers: list) -> QueryResult:
        result = await query(self.settings, MACHINETYPES, peers, self.timeout,
                             authenticator=self.authenticator)
        now = self.clock()
        received: dict = {}
        for report in result.reports:
            received.setdefault(report.factory, {})[report.machinetype] = (now, report)
        for factory, reports in received.items():
            if factory in result.answered:
                self._entries[factory] = reports
            else:
                self._entries.setdefault(factory, {}).update(reports)
        self.last_result = result
        return result

    def reports(self) -> tuple:
        """Every fresh report, in factory then machinetype order; stale ones are dropped."""
        oldest = self.clock() - self.max_age
        known = {entry.name for entry in self.peers()}
        fresh = []
        for factory in list(self._entries):
            kept = {name: entry for name, entry in self._entries[factory].items()
                    if entry[0] >= oldest}
            if kept and factory in known:
                self._entries[factory] = kept
                fresh.extend(kept[name][1] for name in sorted(kept))
            else:
                del self._entries[factory]
        return tuple(fresh)

    def request_refresh(self) -> None:
        """Make ``run()`` refresh now instead of at the end of its current wait."""
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Refresh every ``refresh_seconds`` (±10 % so factories do not synchronise) until
        cancelled; a failed refresh is logged and retried at the next turn."""
        self._wake = asyncio.Event()
        while True:
            # Cleared before the refresh: a request made during it (a reload) gets one more.
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:
                log.exception("peer report refresh failed")
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       self.refresh_seconds * random.uniform(0.9, 1.1))
            except asyncio.TimeoutError:
                pass
