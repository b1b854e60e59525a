"""The metadata service (169.254.169.254) and the Machine/Job Features service (169.254.169.253).

Both are aiohttp servers on vacd's event loop. A request is attributed to a machine by its TCP
source address only (``slot_for_address``, by default the slot plan's ``model.slot_for_ip``,
then the daemon's ``resolve(slot)``); headers such as ``X-Forwarded-For`` are never read
(STANDARDS.md §E3, OSSN-0074). Anything that cannot be attributed gets 404 (GET) or 403 (writes).

Metadata service, GET/HEAD only (``V`` = ``latest``, ``1.0`` or a ``YYYY-MM-DD`` date):

* EC2: ``/V`` (listing), ``/V/user-data``, ``/V/meta-data[/]`` (listing), ``.../ami-id``,
  ``instance-id``, ``hostname``, ``local-hostname``, ``local-ipv4``,
  ``placement/availability-zone``, ``public-keys/`` (``0=root``), ``public-keys/0/openssh-key``;
  the classic ``/V/meta-data.json``.
* OpenStack, as cloud-init reads it: ``/openstack`` (version list), ``/openstack/V`` (listing),
  ``meta_data.json``, ``user_data``, ``vendor_data.json``, ``vendor_data2.json`` (empty
  objects), ``network_data.json`` (DHCP on the slot's MAC), and the classic hyphenated names
  ``meta-data.json``, ``user-data`` and ``meta-data/...`` under ``/openstack/V``.

MJF service:

* GET/HEAD ``/machinefeatures[/]``, ``/jobfeatures[/]``: the classic HTML list of keys;
  ``/machinefeatures/KEY``, ``/jobfeatures/KEY``: the value, 404 if absent. ``/joboutputs``: 403.
* PUT ``/joboutputs/NAME`` stores the body atomically; 201 on success. NAME must match
  ``JOBOUTPUT_NAME``; a Content-Length is required (411), bodies are capped per file and per
  machine (413), as is the number of files (403); a second upload of a name still being
  received gets 409. Extension: POST is accepted with the same rules, because busybox
  ``wget --post-data`` cannot PUT.

Fairness: no machine can cost another a request. vacd accepts connections with its own loop
(``_Listener``): a machine holds at most ``connections_per_machine`` connections to the two
services together (every address outside the slot plan shares one such share), sized at start so
that every slot's share fits in the descriptor limit (``fair_limits``); a connection over the
share is reset as it is accepted, before anything is read. Uploads being received are capped per
machine (``upload_share_bytes``: one largest file plus room for heartbeats), so the memory they
can hold is bounded by the slot count and one machine's uploads never delay another's (503 with
``Retry-After`` for the machine over its share). When descriptors run out all the same, accepting
pauses with a growing back-off and one rate-limited log line, where asyncio's own accept loop logs
a traceback for every pending connection and keeps retrying.

The pure helpers ``mjf_features``, ``write_mjf`` and ``lower_deadline_files`` produce and update
the MJF files the service reads (REFERENCE.md §4.1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import re
import resource
import socket
import struct
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Optional, Union

from aiohttp import web

from vac.core.config import Machinetype, Settings
from vac.core.model import Machine, slot_for_ip
from vac.records.store import atomic_write

log = logging.getLogger(__name__)
# aiohttp's own protocol errors (malformed requests) go here, rate-limited like request lines.
http_log = logging.getLogger(__name__ + ".http")

MJF_DIRECTORIES = ("machinefeatures", "jobfeatures")
MJF_KEY = re.compile(r"[A-Za-z0-9_]{1,64}\Z")  # B4: [a-z0-9_], plus the legacy mixed-case keys
# Joboutput names: E3 allow-list. A leading "." is refused too, so VM files can never collide
# with the hidden temporary files of atomic writes (and a leading "-" cannot look like an option).
JOBOUTPUT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
VERSION = re.compile(r"(latest|1\.0|[0-9]{4}-[0-9]{2}-[0-9]{2})\Z")
# Versions cloud-init and Nova know; cloud-init picks the newest it recognises from this list.
OPENSTACK_VERSIONS = ("2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
                      "2016-10-06", "2017-02-22", "2018-08-27", "latest")
EC2_KEY_NAME = "root"  # the name shown for key 0 in the EC2 public-keys/ listing
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # user_data and MJF values larger than this are a bug
CLIENT_GONE = 499  # logged (nginx's convention) when a client leaves before the answer
LINGER_SECONDS = 2.0  # after an early refusal, discard what the client still sends this long
# Room beside one largest joboutput in a machine's upload share: heartbeats and messages are tiny.
SMALL_UPLOADS_BYTES = 64 * 1024
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

Resolver = Callable[[int], Optional["MachineContext"]]
SlotForAddress = Callable[[str], Optional[int]]


@dataclasses.dataclass(frozen=True)
class MachineContext:
    """The machine currently in a slot and its directory (``<state_dir>/machines/<dir name>``)."""

    machine: Machine
    directory: Path


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of the two services."""

    joboutput_file_bytes: int = 1024 * 1024
    joboutputs_total_bytes: int = 10 * 1024 * 1024  # per machine, all files together
    joboutputs_max_files: int = 100  # per machine
    # Open connections per machine to both services together; start_services lowers it so that
    # every slot's share fits in the descriptor limit (fair_limits).
    connections_per_machine: int = 16
    body_timeout_seconds: float = 30.0  # whole body of one PUT
    idle_timeout_seconds: float = 15.0  # connection without a complete request (slowloris)
    log_burst: int = 30  # request log lines per source before rate limiting starts
    log_per_second: float = 1.0


DEFAULT_LIMITS = Limits()


def upload_share_bytes(limits: Limits) -> int:
    """Bytes of upload bodies one machine may have in flight: a file of the largest size
    allowed and room for small ones beside it. Bodies are held in memory until written, so all
    machines together hold at most the slot count times this."""
    return limits.joboutput_file_bytes + SMALL_UPLOADS_BYTES


def reserved_descriptors(descriptors: int) -> int:
    """Descriptors left for vacd's own use out of a limit of ``descriptors``."""
    return max(RESERVED_DESCRIPTORS, descriptors // 4)


def fair_limits(limits: Limits, slots: int, descriptors: int) -> Limits:
    """``limits`` with ``connections_per_machine`` lowered, if need be, so that ``slots``
    machines and the share of all unattributed addresses fit in ``descriptors`` (the open file
    limit) beside vacd's reserve. Each share is at least one connection: if even that does not
    fit, ``shares_fit`` says so and vacd warns."""
    if slots < 1:
        raise ValueError(f"the slot count must be positive, not {slots}")
    room = descriptors - reserved_descriptors(descriptors)
    share = max(1, min(limits.connections_per_machine, room // (slots + 1)))
    return dataclasses.replace(limits, connections_per_machine=share)


def shares_fit(limits: Limits, slots: int, descriptors: int) -> bool:
    """Whether every share of ``limits`` and vacd's reserve fit in ``descriptors``."""
    return ((slots + 1) * limits.connections_per_machine
            + reserved_descriptors(descriptors) <= descriptors)

# ---------------------------------------------------------------------------------------------
# MJF files (REFERENCE.md §4.1)


def _decimal(value: float) -> str:
    return str(round(float(value), 3))


def mjf_features(machine: Machine, settings: Settings, machinetype: Machinetype,
                 now: float) -> tuple[dict[str, str], dict[str, str]]:
    """(machinefeatures, jobfeatures): key -> exact file content for a machine created at ``now``.

    ``machinefeatures_option_XXX`` values are written verbatim and may replace a standard key.
    """
    if machinetype.name != machine.machinetype:
        raise ValueError(f"machinetype {machinetype.name!r} given for a machine of type "
                         f"{machine.machinetype!r}")
    processors = machine.processors
    shutdown = int(machine.deadline)
    start = int(now)
    wall_seconds = max(0, shutdown - start)
    rss_bytes = settings.mb_per_processor * processors * 1048576

    machinefeatures = {
        "total_cpu": str(processors),
        "phys_cores": str(processors),
        "log_cores": str(processors),
        "jobslots": str(processors),
        "shutdowntime": str(shutdown),
    }
    jobfeatures = {
        "shutdowntime_job": str(shutdown),
        "cpufactor_lrms": "1.0",
        "cpu_limit_secs_lrms": str(wall_seconds * processors),
        "cpu_limit_secs": str(wall_seconds * processors),
        "wall_limit_secs_lrms": str(wall_seconds),
        "wall_limit_secs": str(wall_seconds),
        "jobstart_secs": str(start),
        "max_rss_bytes": str(rss_bytes),
        "mem_limit_MB": str(rss_bytes // 1000000),
        "allocated_cpu": f"{processors}\n",
        "allocated_CPU": f"{processors}\n",
        "job_id": machine.uuid,
    }
    if settings.hs06_per_processor is not None:
        machinefeatures["hs06"] = _decimal(settings.hs06_per_processor * processors)
        jobfeatures["hs06_job"] = _decimal(settings.hs06_per_processor * processors)
    for key, value in settings.machinefeatures_options:
        if not MJF_KEY.match(key):
            raise ValueError(f"machinefeatures_option_{key}: not a valid MJF key name")
        machinefeatures[key] = value
    return machinefeatures, jobfeatures


def write_mjf(directory: Union[str, Path], machinefeatures: dict[str, str],
              jobfeatures: dict[str, str]) -> None:
    """Write every key atomically (temp + fsync + rename) as 0644 files under ``directory``."""
    for subdirectory, features in (("machinefeatures", machinefeatures),
                                   ("jobfeatures", jobfeatures)):
        target = Path(directory) / subdirectory
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        for key, value in features.items():
            if not MJF_KEY.match(key):
                raise ValueError(f"{subdirectory}: not a valid MJF key name: {key!r}")
            atomic_write(target / key, value, 0o644)


def lower_deadline_files(directory: Union[str, Path], deadline: float) -> bool:
    """Lower ``shutdowntime`` and ``shutdowntime_job`` to ``deadline`` (never raise them).

    A missing or unreadable value is rewritten. Returns True if any file changed.
    """
    new = int(deadline)
    changed = False
    for relative in ("machinefeatures/shutdowntime", "jobfeatures/shutdowntime_job"):
        path = Path(directory) / relative
        try:
            current: Optional[int] = int(path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            current = None
        if current is None or new < current:
            atomic_write(path, str(new), 0o644)
            changed = True
    return changed


# ---------------------------------------------------------------------------------------------
# Request paths


class BadPath(ValueError):
    """A request path that could name something outside the served tree."""


def path_segments(raw_path: str) -> list[str]:
    """The percent-decoded, non-empty segments of a raw request path.

    ``//`` folds and a trailing ``/`` vanishes. Dot segments, separators or control characters
    inside a segment (even percent-encoded) and invalid UTF-8 raise ``BadPath``, so a segment is
    always a plain file name.
    """
    if not raw_path.startswith("/"):
        raise BadPath(f"path does not start with '/': {raw_path[:80]!r}")
    segments = []
    for raw in raw_path.split("/"):
        if not raw:
            continue
        try:
            segment = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError as error:
            raise BadPath(f"invalid UTF-8 in {raw[:80]!r}") from error
        if segment in (".", "..") or not segment.isprintable() or "/" in segment \
                or "\\" in segment:
            raise BadPath(f"forbidden path segment {raw[:80]!r}")
        segments.append(segment)
    return segments


# ---------------------------------------------------------------------------------------------
# Rate-limited logging


class LogLimiter:
    """Token bucket per source: ``burst`` lines at once, then ``per_second`` on average."""

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


class _RateLimitFilter(logging.Filter):
    def __init__(self, limiter: LogLimiter):
        super().__init__()
        self.limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        return self.limiter.admit("aiohttp") is not None


# ---------------------------------------------------------------------------------------------
# Documents


def _read(path: Path) -> Optional[bytes]:
    """Contents of a regular file, or None if it is absent. Symbolic links are not followed."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:  # plain os calls: this runs for every request, a buffered file object costs 3x more
        chunk_bytes = min(os.fstat(descriptor).st_size + 1, MAX_DOCUMENT_BYTES + 1)
        chunks = []
        size = 0
        while size <= MAX_DOCUMENT_BYTES:
            chunk = os.read(descriptor, chunk_bytes)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise OSError(f"{path} is larger than {MAX_DOCUMENT_BYTES} bytes")
    finally:
        os.close(descriptor)


def _public_key(context: MachineContext) -> Optional[str]:
    data = _read(context.directory / "root_public_key")
    return data.decode("utf-8", "replace").strip() if data else None


def openstack_meta_data(context: MachineContext, settings: Settings, mjf_url: str) -> dict:
    """``meta_data.json``: what cloud-init's OpenStack reader and the pilots (A7) use."""
    machine = context.machine
    document = {
        "uuid": machine.uuid,
        "name": machine.name,
        "hostname": machine.name,
        "availability_zone": settings.factory_name,
        "launch_index": 0,
        "meta": {
            "machinefeatures": f"{mjf_url}/machinefeatures",
            "jobfeatures": f"{mjf_url}/jobfeatures",
            "joboutputs": f"{mjf_url}/joboutputs",
            "machinetype": machine.machinetype,
        },
    }
    key = _public_key(context)
    if key:
        document["public_keys"] = {"0": key}
    return document


def network_data(machine: Machine) -> dict:
    """``network_data.json``: DHCP on the slot's NIC.

    An empty document would make cloud-init render a network configuration without any
    interface; describing the real (DHCP) set-up is both valid and harmless.
    """
    return {
        "links": [{"id": "vac0", "type": "phy", "ethernet_mac_address": machine.mac}],
        "networks": [{"id": "network0", "type": "ipv4_dhcp", "link": "vac0",
                      "network_id": "vac"}],
        "services": [],
    }


def ec2_meta_data(context: MachineContext, settings: Settings) -> dict:
    """The EC2 ``meta-data/`` tree: dicts are directories, strings are values."""
    machine = context.machine
    tree: dict = {
        "ami-id": machine.uuid,
        "hostname": machine.name,
        "instance-id": machine.uuid,
        "local-hostname": machine.name,
        "local-ipv4": machine.ip,
        "placement": {"availability-zone": settings.factory_name},
    }
    key = _public_key(context)
    if key:
        tree["public-keys"] = {"0": {"openssh-key": key + "\n"}}
    return tree


def _ec2_listing(path: list[str], directory: dict) -> str:
    if path == ["public-keys"]:  # EC2 lists keys as INDEX=NAME; cloud-init depends on it
        return "\n".join(f"{index}={EC2_KEY_NAME}" for index in directory)
    return "\n".join(name + "/" if isinstance(value, dict) else name
                     for name, value in sorted(directory.items()))


# ---------------------------------------------------------------------------------------------
# Services

def _text(text: str, content_type: str = "text/plain") -> web.Response:
    return web.Response(text=text, content_type=content_type,
                        headers={"Cache-Control": "no-cache"})


def _bytes(body: bytes, content_type: str) -> web.Response:
    return web.Response(body=body, content_type=content_type,
                        headers={"Cache-Control": "no-cache"})


def _status(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=f"{status} {reason}\n")


def _json(document: dict) -> web.Response:
    return _text(json.dumps(document, sort_keys=True), "application/json")


def _read_request(request: web.Request, context: Optional[MachineContext], allowed: str
                  ) -> Union[web.Response, list[str]]:
    """The path segments of a GET/HEAD from a known machine, or the response refusing it."""
    if request.method not in ("GET", "HEAD"):
        methods = allowed.rsplit(", ", 1)
        return web.Response(status=405, text=f"405 only {' and '.join(methods)}\n",
                            headers={"Allow": allowed})
    if context is None:
        return _status(404, "no machine at this source address")
    try:
        return path_segments(request.rel_url.raw_path)
    except BadPath as error:
        return _status(404, str(error))


class _Service:
    """What both services share: attribution of a request to a machine and the request log."""

    name = ""

    def __init__(self, resolve: Resolver, slot_for_address: SlotForAddress, limits: Limits):
        self.resolve = resolve
        self.slot_for_address = slot_for_address
        self.limits = limits
        self.log_limiter = LogLimiter(limits.log_burst, limits.log_per_second)

    def application(self) -> web.Application:
        app = web.Application()
        # One catch-all route: paths are parsed from the raw path here, never by the router.
        app.router.add_route("*", r"/{path:[\s\S]*}", self._entry, expect_handler=_no_expect)
        return app

    def _identify(self, request: web.Request) -> tuple[str, Optional[MachineContext]]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address = peer[0] if peer else "?"
        slot = self.slot_for_address(address)
        context = self.resolve(slot) if slot is not None else None
        if context is not None and context.machine.slot != slot:
            log.error("%s: resolver returned %s (slot %d) for slot %d; refusing %s", self.name,
                      context.machine.name, context.machine.slot, slot, address)
            context = None
        return (context.machine.name if context else f"unknown({address})"), context

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        who, context = self._identify(request)
        status, problem = 500, ""
        try:
            try:
                response = await self.handle(request, context)
            except asyncio.CancelledError:
                # The client went away and aiohttp cancelled the handler. A joboutput whose
                # body had arrived is still written (the write is shielded).
                status, problem = CLIENT_GONE, ": client closed the connection"
                raise
            except ConnectionError:
                # The client went away while we read its request: nobody gets this answer,
                # but returning one keeps aiohttp from logging a traceback for it.
                status, problem = CLIENT_GONE, ": client closed the connection"
                return web.Response(status=CLIENT_GONE)
            except OSError as error:  # the machine's files: unreadable, too big, disk trouble
                problem = f": {error}"
                response = _status(500, "this machine's files cannot be used")
            status = response.status
            return response
        finally:
            dropped = self.log_limiter.admit(who)
            if dropped is not None:
                note = f" ({dropped} lines from {who} suppressed)" if dropped else ""
                log.log(logging.ERROR if 500 <= status < 600 else logging.INFO,
                        "%s %s %s %s %d%s%s", self.name, who, request.method,
                        repr(request.raw_path[:200])[1:-1], status, problem, note)

    async def handle(self, request: web.Request, context: Optional[MachineContext]
                     ) -> web.StreamResponse:
        raise NotImplementedError


async def _no_expect(request: web.Request) -> None:
    """Leave ``Expect: 100-continue`` to the handler, which answers it only after its checks."""


class MetadataService(_Service):
    name = "metadata"

    def __init__(self, settings: Settings, resolve: Resolver, mjf_url: str,
                 slot_for_address: SlotForAddress, limits: Limits):
        super().__init__(resolve, slot_for_address, limits)
        self.settings = settings
        self.mjf_url = mjf_url.rstrip("/")

    async def handle(self, request: web.Request, context: Optional[MachineContext]
                     ) -> web.StreamResponse:
        segments = _read_request(request, context, "GET, HEAD")
        if isinstance(segments, web.Response):
            return segments
        if segments[:1] == ["openstack"]:
            return self._openstack(context, segments[1:])
        return self._ec2(context, segments)

    def _openstack(self, context: MachineContext, segments: list[str]) -> web.Response:
        if not segments:
            return _text("\n".join(OPENSTACK_VERSIONS))
        if not VERSION.match(segments[0]):
            return _status(404, "unknown OpenStack metadata version")
        rest = segments[1:]
        if not rest:
            names = ["meta_data.json", "network_data.json", "vendor_data.json",
                     "vendor_data2.json"]
            if (context.directory / "user_data").exists():
                names.append("user_data")
            return _text("\n".join(sorted(names)))
        if rest[0] == "meta-data":  # classic: the EC2 tree under /openstack/V/ as well
            return self._ec2_tree(context, rest[1:])
        if len(rest) != 1:
            return _status(404, "not found")
        name = rest[0]
        if name in ("meta_data.json", "meta-data.json"):
            return _json(openstack_meta_data(context, self.settings, self.mjf_url))
        if name in ("user_data", "user-data"):
            return self._user_data(context)
        if name in ("vendor_data.json", "vendor_data2.json"):
            return _json({})
        if name == "network_data.json":
            return _json(network_data(context.machine))
        return _status(404, "not found")

    def _ec2(self, context: MachineContext, segments: list[str]) -> web.Response:
        if not segments or not VERSION.match(segments[0]):
            return _status(404, "not found")
        rest = segments[1:]
        if not rest:
            return _text("meta-data\nuser-data")
        if rest == ["user-data"]:
            return self._user_data(context)
        if rest == ["meta-data.json"]:  # classic Vac: the OpenStack document at EC2 paths
            return _json(openstack_meta_data(context, self.settings, self.mjf_url))
        if rest[0] == "meta-data":
            return self._ec2_tree(context, rest[1:])
        return _status(404, "not found")

    def _ec2_tree(self, context: MachineContext, path: list[str]) -> web.Response:
        node: Union[dict, str] = ec2_meta_data(context, self.settings)
        for segment in path:
            if not isinstance(node, dict) or segment not in node:
                return _status(404, "no such metadata item")
            node = node[segment]
        return _text(_ec2_listing(path, node) if isinstance(node, dict) else node)

    def _user_data(self, context: MachineContext) -> web.Response:
        data = _read(context.directory / "user_data")
        if data is None:
            return _status(404, "this machine has no user_data")
        return _bytes(data, "application/octet-stream")


class MjfService(_Service):
    name = "mjf"

    def __init__(self, resolve: Resolver, slot_for_address: SlotForAddress, limits: Limits):
        super().__init__(resolve, slot_for_address, limits)
        # Uploads being received, per joboutputs directory: name -> Content-Length, so that
        # concurrent PUTs cannot together exceed the caps or the machine's upload share.
        self._pending: dict[Path, dict[str, int]] = {}

    async def handle(self, request: web.Request, context: Optional[MachineContext]
                     ) -> web.StreamResponse:
        if request.method in ("PUT", "POST"):
            return await self._put(request, context)
        segments = _read_request(request, context, "GET, HEAD, PUT, POST")
        if isinstance(segments, web.Response):
            return segments
        if segments[:1] == ["joboutputs"]:
            return _status(403, "joboutputs are write-only")
        if not segments or segments[0] not in MJF_DIRECTORIES or len(segments) > 2:
            return _status(404, "not found")
        directory = context.directory / segments[0]
        if len(segments) == 1:
            return _text(_mjf_listing(directory), "text/html")
        if not MJF_KEY.match(segments[1]):
            return _status(404, "not a valid MJF key name")
        data = _read(directory / segments[1])
        if data is None:
            return _status(404, f"no {segments[0]} key {segments[1]}")
        return _bytes(data, "text/plain")

    def _refusal(self, request: web.Request, context: Optional[MachineContext]
                 ) -> Union[web.Response, tuple[Path, str, int]]:
        """An error response, or (joboutputs directory, name, length) of an acceptable PUT."""
        if context is None:
            return _status(403, "no machine at this source address")
        try:
            segments = path_segments(request.rel_url.raw_path)
        except BadPath as error:
            return _status(403, str(error))
        if len(segments) != 2 or segments[0] != "joboutputs":
            return _status(403, "only joboutputs/NAME can be written")
        name = segments[1]
        if not JOBOUTPUT_NAME.match(name):
            return _status(403, f"joboutput name not allowed (must match {JOBOUTPUT_NAME.pattern})")
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            return _status(417, "only Expect: 100-continue is supported")
        length = request.content_length
        if length is None:
            return _status(411, "a Content-Length is required")
        limits = self.limits
        if length > limits.joboutput_file_bytes:
            return _status(413, f"joboutput larger than {limits.joboutput_file_bytes} bytes")
        directory = context.directory / "joboutputs"
        pending = self._pending.get(directory, {})
        if name in pending:  # one winner: the upload already under way
            return web.Response(status=409, text=f"409 {name} is already being uploaded\n",
                                headers={"Retry-After": "1"})
        # An OSError here (disk trouble, the machine's directory removed as it finishes) is
        # answered 500 and logged, rate-limited, by _entry.
        directory.mkdir(mode=0o755, exist_ok=True)
        used_bytes, used_files = _usage(directory, excluding=name)
        pending_bytes = sum(pending.values())
        if used_bytes + pending_bytes + length > limits.joboutputs_total_bytes:
            return _status(413, f"joboutputs of this machine would exceed "
                               f"{limits.joboutputs_total_bytes} bytes")
        if used_files + len(pending) >= limits.joboutputs_max_files:
            return _status(403, f"this machine already has {limits.joboutputs_max_files} "
                               f"joboutputs")
        share = upload_share_bytes(limits)
        if pending_bytes + length > share:
            return web.Response(status=503, text=f"503 this machine already has "
                                f"{pending_bytes} bytes of uploads under way (at most {share})\n",
                                headers={"Retry-After": "5"})
        return directory, name, length

    async def _put(self, request: web.Request, context: Optional[MachineContext]
                   ) -> web.Response:
        verdict = self._refusal(request, context)
        if isinstance(verdict, web.Response):
            return verdict
        directory, name, length = verdict
        pending = self._pending.setdefault(directory, {})
        pending[name] = length
        try:
            if request.headers.get("Expect"):
                # As aiohttp's default expect handler does, but only once the checks passed.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0
            body = await self._read_body(request, length)
            if body is None:
                return _status(408, f"body not received within "
                                   f"{self.limits.body_timeout_seconds:g} seconds")
            if len(body) != length:
                return _status(400, f"body has {len(body)} bytes, Content-Length says {length}")
            # fsync can take a while on a busy disk: off the loop, and finished even if the
            # client goes away meanwhile (the body is complete by then).
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(
                None, atomic_write, directory / name, bytes(body), 0o644))
        finally:
            del pending[name]
            if not pending:
                self._pending.pop(directory, None)
        return _status(201, "Created")

    async def _read_body(self, request: web.Request, length: int) -> Optional[bytearray]:
        """The body (at most ``length`` bytes), or None if it is not complete in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_seconds
        body = bytearray()
        while len(body) < length:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                chunk = await asyncio.wait_for(request.content.read(length - len(body)),
                                               remaining)
            except asyncio.TimeoutError:
                return None
            if not chunk:
                break
            body += chunk
        return body


def _mjf_listing(directory: Path) -> str:
    try:
        keys = sorted(entry.name for entry in os.scandir(directory)
                      if MJF_KEY.match(entry.name) and entry.is_file(follow_symlinks=False))
    except FileNotFoundError:
        keys = []
    items = "".join(f'<li><a href="{key}">{key}</a></li>' for key in keys)
    return f"<html><body><ul>{items}</ul></body></html>"


def _usage(directory: Path, excluding: str) -> tuple[int, int]:
    """Bytes and number of files in ``directory``, not counting ``excluding`` (being replaced).

    Hidden names are the temporary files of uploads being written, already counted as pending;
    a file that vanishes between listing and ``stat`` (renamed over, or the machine finishing)
    no longer counts.
    """
    total = files = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name == excluding or entry.name.startswith(".") \
                    or not entry.is_file(follow_symlinks=False):
                continue
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            files += 1
    return total, files


def metadata_app(settings: Settings, resolve: Resolver, *, mjf_url: str,
                 slot_for_address: SlotForAddress = slot_for_ip,
                 limits: Limits = DEFAULT_LIMITS) -> web.Application:
    """The metadata service as an aiohttp application; ``mjf_url`` goes into ``meta``."""
    return MetadataService(settings, resolve, mjf_url, slot_for_address, limits).application()


def mjf_app(resolve: Resolver, *, slot_for_address: SlotForAddress = slot_for_ip,
            limits: Limits = DEFAULT_LIMITS) -> web.Application:
    """The MJF service as an aiohttp application."""
    return MjfService(resolve, slot_for_address, limits).application()


def base_url(address: str, port: int) -> str:
    """``http://address[:port]`` as a VM would write it (no port for 80)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}" if port == 80 else f"http://{host}:{port}"


# ---------------------------------------------------------------------------------------------
# Connections: shares per machine and vac's own accept loop


class ConnectionShares:
    """Open connections per machine: the slot of the source address, or one share for every
    address outside the slot plan together."""

    def __init__(self, per_machine: int, slot_for_address: SlotForAddress):
        self.per_machine = per_machine
        self.slot_for_address = slot_for_address
        self.open: dict[Optional[int], int] = {}

    def take(self, address: str) -> tuple[Optional[int], bool]:
        """(the share's key, whether a connection from ``address`` fits in it and was counted)."""
        key = self.slot_for_address(address)
        held = self.open.get(key, 0)
        if held >= self.per_machine:
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


class _Listener:
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
    """

    def __init__(self, name: str, runner: web.AppRunner, sock: socket.socket,
                 shares: ConnectionShares, events: LogLimiter):
        self.name = name
        self.runner = runner
        self.sock = sock
        self.shares = shares
        self.events = events
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
            who = f"slot {key} ({address})" if key is not None else \
                f"addresses outside the slot plan ({address})"
            self._log_event(f"share {key}", "%s: %s already holds its %d connections; "
                            "refusing more", self.name, who, self.shares.per_machine)
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
            await self._loop.connect_accepted_socket(protocol, conn)
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
            log.warning(message + "%s", *args, note)


def _listening_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.create_server((address, port), family=family, backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


@dataclasses.dataclass
class Services:
    """The two running services; ``close()`` stops them and their connections."""

    metadata_url: str
    mjf_url: str
    listeners: list
    limits: Limits  # as sized for the slot count and descriptor limit

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close()
        self.listeners = []


async def _serve(name: str, app: web.Application, address: str, port: int, limits: Limits,
                 shares: ConnectionShares, events: LogLimiter) -> _Listener:
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=limits.idle_timeout_seconds,
                           lingering_time=LINGER_SECONDS, handler_cancellation=True,
                           logger=http_log, shutdown_timeout=5.0)
    await runner.setup()
    try:
        sock = _listening_socket(address, port)
    except BaseException:
        await runner.cleanup()
        raise
    return _Listener(name, runner, sock, shares, events)


async def start_services(settings: Settings, resolve: Resolver, *,
                         metadata_address: Optional[str] = None,
                         mjf_address: Optional[str] = None, port: Optional[int] = None,
                         slot_for_address: SlotForAddress = slot_for_ip,
                         limits: Limits = DEFAULT_LIMITS, slots: Optional[int] = None,
                         descriptors: Optional[int] = None) -> Services:
    """Bind and start both services (defaults: the settings' addresses and ``http_port``).

    Each machine's share of connections is sized for ``slots`` (default: the settings'
    ``total_processors``, which the configuration loader fills in) and ``descriptors`` (default:
    this process's open file limit). Raises OSError if an address cannot be bound (e.g. not yet
    configured on the bridge); the caller retries. Port 0 picks free ports, and the metadata
    ``meta`` URLs follow the MJF one.
    """
    metadata_address = metadata_address or settings.metadata_address
    mjf_address = mjf_address or settings.mjf_address
    port = settings.http_port if port is None else port
    if metadata_address == mjf_address:
        raise ValueError(f"metadata and MJF services need different addresses, both are "
                         f"{metadata_address}")
    slots = slots or settings.total_processors
    if not slots:
        raise ValueError("the slot count is needed to size each machine's share of the services")
    if descriptors is None:
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if descriptors == resource.RLIM_INFINITY:
            descriptors = 1 << 20
    limits = fair_limits(limits, slots, descriptors)
    if not shares_fit(limits, slots, descriptors):
        log.warning("an open file limit of %d is too low for %d slots: machines may run the "
                    "services out of descriptors (raise LimitNOFILE)", descriptors, slots)
    limiter = LogLimiter(limits.log_burst, limits.log_per_second)
    if not any(isinstance(existing, _RateLimitFilter) for existing in http_log.filters):
        http_log.addFilter(_RateLimitFilter(limiter))
    shares = ConnectionShares(limits.connections_per_machine, slot_for_address)
    events = LogLimiter(1, 1.0 / EVENT_LOG_SECONDS)
    mjf = await _serve("mjf", mjf_app(resolve, slot_for_address=slot_for_address,
                                      limits=limits), mjf_address, port, limits, shares, events)
    mjf_url = base_url(mjf_address, mjf.port)
    try:
        metadata = await _serve(
            "metadata", metadata_app(settings, resolve, mjf_url=mjf_url,
                                     slot_for_address=slot_for_address, limits=limits),
            metadata_address, port, limits, shares, events)
    except BaseException:
        await mjf.close()
        raise
    metadata_url = base_url(metadata_address, metadata.port)
    log.info("metadata service on %s, MJF service on %s; each of %d slots may hold %d "
             "connections and %d bytes of uploads in flight (open file limit %d)", metadata_url,
             mjf_url, slots, limits.connections_per_machine, upload_share_bytes(limits),
             descriptors)
    return Services(metadata_url, mjf_url, [metadata, mjf], limits)
