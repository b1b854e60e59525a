"""VacQuery 01.03: the UDP protocol factories of a space use to tell each other what they run.

Wire format and classic behaviour: REFERENCE.md §2; hardening: STANDARDS.md §E4. This module has

* the **codec**: queries and the three status messages, byte-compatible with classic peers (every
  key, deprecated duplicates included; floats with two decimals; flat objects), and a strict
  decoder for everything received (size cap, UTF-8, a JSON object without duplicate keys, NaN or
  nesting, every known key of the right type and within bounds);
* **authentication**: an optional shared secret adds an ``hmac`` key that classic peers ignore;
* the **responder** (asyncio UDP endpoint inside vacd) answering from the daemon's in-memory
  status, with a per-source rate limit and no amplification towards sources outside the space;
* the **client** (overall deadline, resends only to incomplete factories, partial results with
  the silent factories named) and the planner's **peer-report cache**;
* **VacMon** messages, and the tables, JSON and ssh command lines of ``vac machines``,
  ``vac machinetypes``, ``vac factories`` and ``vac ssh``.

Nothing raises out of a receive path: a datagram that fails any check is dropped and counted,
with a rate-limited log line (responder) or one summary line per query (client).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional, Union

from vac import __version__
from vac.core.config import FactoryAddress, Settings
from vac.core.model import MachinetypeReport, slot_ip

log = logging.getLogger(__name__)

VACQUERY_VERSION = "VacQuery 01.03"
RESPONDER_CLIENT = "vacd-responder"
FACTORY_CLIENT = "vacd-factory"  # the daemon's own queries and its VacMon messages
COMMAND_CLIENT = "vac-command"
VACMON_COOKIE = "0"
DEFAULT_VACMON_PORT = 8884

MAX_SEND_BYTES = 1400  # below a 1500-byte MTU (TN-2016-04)
# Classic peers write ", "/": " separators and unbounded shutdown messages, so accept a little
# more than we send; anything a 2048-byte receive buffer would truncate is dropped (E4).
MAX_RECEIVE_BYTES = 2048
MAX_ITEMS = 4096  # bound on num_machines / num_machinetypes and on records kept per factory
MAX_NUMBER = 1e15  # any numeric field beyond this is nonsense (and not an exact float)
AMPLIFICATION_FACTOR = 3  # non-space sources get at most this many reply bytes per query byte
COOKIE_MAX_CHARS = 128
SECRET_MIN_BYTES = 16
SECRET_MAX_BYTES = 4096
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SOCKET_BUFFER_BYTES = 16 * 1024 * 1024  # the classic size; the kernel caps it for non-root
MAX_TRIES = 6  # the classic number of rounds (vacqueryTries)
DEFAULT_QUERY_RATE = 20.0  # queries per second and source, on average ...
DEFAULT_QUERY_BURST = 60  # ... and at once: a few full `vac` runs with all their resends
FACTORY_RESOLVE_SECONDS = 600.0  # how often the responder re-resolves the space's factories
RESOLVE_TIMEOUT = 5.0
DEFAULT_PEER_BATCH = 64  # peers the cache queries per refresh: constant, so traffic is linear

MACHINES = "machines"
MACHINETYPES = "machinetypes"
FACTORY = "factory"
QUERY_TYPES = {"machines_query": MACHINES, "machinetypes_query": MACHINETYPES, "factory_query": FACTORY}
LEGACY_METHODS = {"machines": MACHINES, "machinetypes": MACHINETYPES, "factories": FACTORY}
RESPONSE_TYPES = {MACHINES: "machine_status", MACHINETYPES: "machinetype_status", FACTORY: "factory_status"}


class DatagramError(ValueError):
    """A received datagram that is not an acceptable VacQuery message; ``str()`` says why."""


class SecretError(ValueError):
    """``vacquery_secret_file`` is unreadable or unusable."""


# ---------------------------------------------------------------------------------------------
# Typed status records


@dataclasses.dataclass(frozen=True)
class MachineStatus:
    """One slot of one factory: VacQuery ``machine_status`` in typed form.

    ``factory`` is the name the factory was queried under (or our own name when encoding).
    Times are Unix seconds; empty slots have state ``Shut down`` and no machinetype.
    """

    factory: str
    machine: str
    state: str
    machinetype: Optional[str] = None
    machine_model: Optional[str] = None
    uuid: Optional[str] = None
    created_time: Optional[float] = None
    started_time: Optional[float] = None
    heartbeat_time: Optional[float] = None
    processors: int = 0
    cpu_seconds: float = 0.0
    cpu_percentage: float = 0.0
    hs06: Optional[float] = None
    shutdown_message: Optional[str] = None
    shutdown_time: Optional[float] = None
    fqan: Optional[str] = None

    @classmethod
    def from_machine(cls, factory: str, machine: Any) -> MachineStatus:
        """From a ``vac.core.model.Machine``; the shutdown message only once it has shut down."""
        wire_state = machine.state.wire_state
        shut_down = wire_state == "Shut down"
        return cls(
            factory=factory, machine=machine.name, state=wire_state, machinetype=machine.machinetype,
            machine_model=machine.machine_model, uuid=machine.uuid, created_time=machine.created,
            started_time=machine.started, heartbeat_time=machine.heartbeat,
            processors=machine.processors, cpu_seconds=machine.cpu_seconds,
            cpu_percentage=machine.cpu_percentage,
            hs06=machine.hs06 if machine.hs06 is not None else float(machine.processors),
            shutdown_message=machine.shutdown_message if shut_down else None,
            shutdown_time=machine.shutdown_message_time if shut_down else None, fqan=machine.fqan)

    @classmethod
    def empty_slot(cls, factory: str, machine: str) -> MachineStatus:
        return cls(factory=factory, machine=machine, state="Shut down")


@dataclasses.dataclass(frozen=True)
class FactoryStatus:
    """One factory as a whole: VacQuery ``factory_status`` in typed form (kB, Unix seconds)."""

    factory: str
    running_processors: int = 0
    running_machines: int = 0
    running_hs06: float = 0.0
    max_processors: int = 0
    max_machines: int = 0  # classic: allocatable processors, not slots
    max_hs06: float = 0.0
    root_disk_avail_kb: Optional[int] = None
    root_disk_avail_inodes: Optional[int] = None
    vac_disk_avail_kb: Optional[int] = None
    vac_disk_avail_inodes: Optional[int] = None
    load_average: Optional[float] = None
    kernel_version: Optional[str] = None
    os_issue: Optional[str] = None
    boot_time: Optional[int] = None
    factory_heartbeat_time: Optional[int] = None
    responder_heartbeat_time: Optional[int] = None
    mjf_heartbeat_time: Optional[int] = None
    metadata_heartbeat_time: Optional[int] = None
    swap_used_kb: Optional[int] = None
    swap_free_kb: Optional[int] = None
    mem_used_kb: Optional[int] = None
    mem_total_kb: Optional[int] = None
    version: Optional[str] = None  # decoded only: the peer's Vac version ("03.01")
    site: Optional[str] = None  # decoded only


@dataclasses.dataclass(frozen=True)
class StatusSnapshot:
    """What the responder reports; built by the daemon, which caches it between changes."""

    machines: Sequence[MachineStatus]
    machinetypes: Sequence[MachinetypeReport]
    factory: FactoryStatus


StatusRecord = Union[MachineStatus, MachinetypeReport, FactoryStatus]


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


# ---------------------------------------------------------------------------------------------
# Message schemas: one table drives both the encoder (key order, types) and the decoder


STR, INT, NUM = "string", "integer", "number"


@dataclasses.dataclass(frozen=True)
class Field:
    kind: str
    required: bool = False
    nullable: bool = True
    max_chars: int = 255  # strings: longest accepted
    send_chars: Optional[int] = None  # strings: longest we send (VM-controlled text), else max
    count: bool = False  # integers: 0..MAX_ITEMS
    ascii: bool = False  # strings: printable ASCII only (cookies)


_COMMON_RESPONSE = {
    "message_type": Field(STR, required=True, nullable=False, max_chars=32),
    "vac_version": Field(STR, max_chars=100),
    "daemon_version": Field(STR, max_chars=100),
    "vacquery_version": Field(STR, max_chars=100),
    "cookie": Field(STR, required=True, nullable=False, max_chars=COOKIE_MAX_CHARS, ascii=True),
    "space": Field(STR, required=True, nullable=False),
    "factory": Field(STR, required=True, nullable=False),
    "time_sent": Field(INT),
    "site": Field(STR),
}
_SHUTDOWN_MESSAGE = Field(STR, required=True, max_chars=1024, send_chars=256)

SCHEMAS = {
    "query": {
        "message_type": Field(STR, max_chars=32),
        "method": Field(STR, max_chars=32),
        "vac_version": Field(STR, max_chars=100),
        "vacquery_version": Field(STR, max_chars=100),
        "space": Field(STR, required=True, nullable=False),
        "cookie": Field(STR, required=True, nullable=False, max_chars=COOKIE_MAX_CHARS, ascii=True),
    },
    "machine_status": {
        **_COMMON_RESPONSE,
        "num_machines": Field(INT, required=True, nullable=False, count=True),
        "machine": Field(STR, required=True, nullable=False),
        "state": Field(STR, required=True, nullable=False, max_chars=32),
        "machine_model": Field(STR, max_chars=64),
        "uuid": Field(STR, required=True, max_chars=128),
        "created_time": Field(INT, required=True),
        "started_time": Field(INT, required=True),
        "heartbeat_time": Field(INT, required=True),
        "num_cpus": Field(INT, count=True),
        "num_processors": Field(INT, count=True),
        "cpu_seconds": Field(INT, required=True),
        "cpu_percentage": Field(NUM, required=True),
        "hs06": Field(NUM, required=True),
        "machinetype": Field(STR, required=True),
        "shutdown_message": _SHUTDOWN_MESSAGE,
        "shutdown_time": Field(INT, required=True),
        "fqan": Field(STR),
    },
    "machinetype_status": {
        **_COMMON_RESPONSE,
        "num_machinetypes": Field(INT, required=True, nullable=False, count=True),
        "machinetype": Field(STR, required=True, nullable=False),
        "bytes_per_processor": Field(INT),
        "running_hs06": Field(NUM, required=True, nullable=False),
        "running_machines": Field(INT, count=True),
        "running_cpus": Field(INT, count=True),
        "running_processors": Field(INT, count=True),
        "num_before_fizzle": Field(INT, required=True, nullable=False, count=True),
        "shutdown_message": _SHUTDOWN_MESSAGE,
        "shutdown_time": Field(INT, required=True),
        "shutdown_machine": Field(STR, required=True),
        "fqan": Field(STR),
        "max_wallclock_seconds": Field(INT),
        "max_processors": Field(INT, count=True),
    },
    "factory_status": {
        **_COMMON_RESPONSE,
        **{key: Field(INT) for key in (
            "running_cpus", "running_processors", "running_machines")},
        "running_hs06": Field(NUM),
        **{key: Field(INT) for key in ("max_cpus", "max_processors", "max_machines")},
        "max_hs06": Field(NUM),
        "total_cpus": Field(INT),
        "total_machines": Field(INT),
        "total_hs06": Field(NUM),
        **{key: Field(INT) for key in (
            "root_disk_avail_kb", "root_disk_avail_inodes", "vac_disk_avail_kb",
            "daemon_disk_avail_kb", "vac_disk_avail_inodes", "daemon_disk_avail_inodes")},
        "load_average": Field(NUM),
        "kernel_version": Field(STR),
        "os_issue": Field(STR),
        **{key: Field(INT) for key in (
            "boot_time", "factory_heartbeat_time", "responder_heartbeat_time",
            "mjf_heartbeat_time", "metadata_heartbeat_time", "swap_used_kb", "swap_free_kb",
            "mem_used_kb", "mem_total_kb")},
    },
}


def _check_field(key: str, value: Any, spec: Field) -> Any:
    """The value of ``key`` converted to its Python type, or DatagramError."""
    if value is None:
        if spec.nullable:
            return None
        raise DatagramError(f"{key} is null")
    if spec.kind == STR:
        if not isinstance(value, str):
            raise DatagramError(f"{key} is not a string")
        if len(value) > spec.max_chars:
            raise DatagramError(f"{key} longer than {spec.max_chars} characters")
        if spec.ascii and not (value.isascii() and value.isprintable()):
            raise DatagramError(f"{key} is not printable ASCII")
        return value
    # bool is a subclass of int, and a peer sending true for a count is broken
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatagramError(f"{key} is not a number")
    if not -MAX_NUMBER <= value <= MAX_NUMBER:
        raise DatagramError(f"{key} out of range")
    if spec.count and not 0 <= value <= MAX_ITEMS:
        raise DatagramError(f"{key} not in 0..{MAX_ITEMS}")
    return int(value) if spec.kind == INT else float(value)


def _reject_constant(name: str) -> None:
    raise DatagramError(f"{name} is not a JSON number")


def _unique_pairs(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise DatagramError("duplicate keys")
    return result


def parse_datagram(data: bytes) -> dict:
    """The flat JSON object in ``data``, or DatagramError (size, UTF-8, JSON, shape)."""
    if len(data) > MAX_RECEIVE_BYTES:
        raise DatagramError(f"{len(data)} bytes, over {MAX_RECEIVE_BYTES}")
    try:
        text = data.decode("utf-8")
        message = json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise DatagramError("not UTF-8") from error
    except RecursionError as error:
        raise DatagramError("nested too deeply") from error
    except DatagramError:
        raise
    except ValueError as error:  # JSONDecodeError, or an integer of over 4300 digits
        raise DatagramError(f"not JSON: {getattr(error, 'msg', error)}") from error
    if not isinstance(message, dict):
        raise DatagramError(f"not a JSON object but {type(message).__name__}")
    for key, value in message.items():
        if isinstance(value, (dict, list)):
            raise DatagramError(f"{key[:40]!r} is nested")
    return message


def validate(message: dict, schema_name: str) -> dict:
    """The known keys of ``message`` (absent optional ones as None), type-checked."""
    checked = {}
    for key, spec in SCHEMAS[schema_name].items():
        if key not in message:
            if spec.required:
                raise DatagramError(f"{key} missing")
            checked[key] = None
        else:
            checked[key] = _check_field(key, message[key], spec)
    return checked


# ---------------------------------------------------------------------------------------------
# Encoding


def _json_value(value: Any, spec: Field) -> str:
    if value is None:
        return "null"
    if spec.kind == STR:
        limit = spec.send_chars or spec.max_chars
        return json.dumps(str(value)[:limit])
    number = float(value)
    if not math.isfinite(number):
        return "null" if spec.nullable else "0"
    if spec.kind == INT:
        return str(int(number))
    return f"{number:.2f}"  # the classic two-decimal float format


def render(schema_name: str, pairs: Iterable[tuple[str, Any]]) -> bytes:
    """A flat JSON object from (key, value) pairs, typed by the schema, in the given order."""
    schema = SCHEMAS[schema_name]
    return ("{" + ",".join(f'"{key}":{_json_value(value, schema[key])}' for key, value in pairs)
            + "}").encode("ascii")


def site_name(settings: Settings) -> str:
    """``gocdb_sitename``, or the space name without its first label (classic)."""
    if settings.gocdb_sitename:
        return settings.gocdb_sitename
    return settings.vac_space.partition(".")[2] or settings.vac_space


def _response_header(message_type: str, settings: Settings, cookie: str, client: str,
                     time_sent: Optional[float]) -> list:
    version = f"Vac {__version__} {client}"
    return [("message_type", message_type), ("vac_version", version), ("daemon_version", version),
            ("vacquery_version", VACQUERY_VERSION), ("cookie", cookie),
            ("space", settings.vac_space), ("factory", settings.factory_name),
            ("time_sent", time.time() if time_sent is None else time_sent),
            ("site", site_name(settings))]


def _first_line(text: Optional[str]) -> Optional[str]:
    return None if text is None else text.split("\n", 1)[0]


def _fitted(schema_name: str, pairs: list, text_key: str, limit: int) -> bytes:
    """Render ``pairs``, shortening the VM-controlled ``text_key`` until the result fits."""
    body = render(schema_name, pairs)
    index = next(i for i, (key, _) in enumerate(pairs) if key == text_key)
    for _ in range(4):
        if len(body) <= limit:
            return body
        text = pairs[index][1]
        if not text:
            break
        spec = SCHEMAS[schema_name][text_key]
        keep = max(0, min(len(text), spec.send_chars or spec.max_chars) - (len(body) - limit) - 8)
        pairs[index] = (text_key, text[:keep] if keep else None)
        body = render(schema_name, pairs)
    if len(body) > limit:
        raise ValueError(f"{schema_name} message of {len(body)} bytes does not fit in {limit}")
    return body


def encode_machine_status(status: MachineStatus, settings: Settings, *, num_machines: int,
                          cookie: str, client: str = RESPONDER_CLIENT,
                          time_sent: Optional[float] = None, limit: int = MAX_SEND_BYTES) -> bytes:
    pairs = _response_header("machine_status", settings, cookie, client, time_sent) + [
        ("num_machines", num_machines), ("machine", status.machine), ("state", status.state),
        ("machine_model", status.machine_model), ("uuid", status.uuid),
        ("created_time", status.created_time), ("started_time", status.started_time),
        ("heartbeat_time", status.heartbeat_time), ("num_cpus", status.processors),
        ("num_processors", status.processors), ("cpu_seconds", status.cpu_seconds),
        ("cpu_percentage", status.cpu_percentage),
        ("hs06", status.hs06 if status.hs06 is not None else float(status.processors)),
        ("machinetype", status.machinetype), ("shutdown_message", status.shutdown_message),
        ("shutdown_time", status.shutdown_time),
    ]
    if status.fqan is not None:
        pairs.append(("fqan", status.fqan))
    return _fitted("machine_status", pairs, "shutdown_message", limit)


def encode_machinetype_status(report: MachinetypeReport, settings: Settings, *,
                              num_machinetypes: int, cookie: str, client: str = RESPONDER_CLIENT,
                              time_sent: Optional[float] = None,
                              limit: int = MAX_SEND_BYTES) -> bytes:
    pairs = _response_header("machinetype_status", settings, cookie, client, time_sent) + [
        ("num_machinetypes", num_machinetypes), ("machinetype", report.machinetype),
        ("bytes_per_processor", settings.mb_per_processor * 1048576),
        ("running_hs06", report.running_hs06), ("running_machines", report.running_machines),
        ("running_cpus", report.running_processors),
        ("running_processors", report.running_processors),
        ("num_before_fizzle", report.num_before_fizzle),
        ("shutdown_message", _first_line(report.shutdown_message)),
        ("shutdown_time", report.shutdown_time), ("shutdown_machine", report.shutdown_machine),
    ]
    if report.fqan is not None:
        pairs.append(("fqan", report.fqan))
    pairs += [("max_wallclock_seconds", report.max_wallclock_seconds),
              ("max_processors", report.max_processors)]
    return _fitted("machinetype_status", pairs, "shutdown_message", limit)


def encode_factory_status(status: FactoryStatus, settings: Settings, *, cookie: str,
                          client: str = RESPONDER_CLIENT, time_sent: Optional[float] = None,
                          limit: int = MAX_SEND_BYTES) -> bytes:
    def zero(value: Optional[float]) -> float:  # classic peers always send numbers here
        return 0 if value is None else value

    pairs = _response_header("factory_status", settings, cookie, client, time_sent) + [
        ("running_cpus", status.running_processors),
        ("running_processors", status.running_processors),
        ("running_machines", status.running_machines), ("running_hs06", status.running_hs06),
        ("max_cpus", status.max_processors), ("max_processors", status.max_processors),
        ("max_machines", status.max_machines), ("max_hs06", status.max_hs06),
        ("total_cpus", status.max_processors), ("total_machines", status.max_machines),
        ("total_hs06", status.max_hs06),
        ("root_disk_avail_kb", zero(status.root_disk_avail_kb)),
        ("root_disk_avail_inodes", zero(status.root_disk_avail_inodes)),
        ("vac_disk_avail_kb", zero(status.vac_disk_avail_kb)),
        ("daemon_disk_avail_kb", zero(status.vac_disk_avail_kb)),
        ("vac_disk_avail_inodes", zero(status.vac_disk_avail_inodes)),
        ("daemon_disk_avail_inodes", zero(status.vac_disk_avail_inodes)),
        ("load_average", zero(status.load_average)),
        ("kernel_version", status.kernel_version), ("os_issue", status.os_issue),
        ("boot_time", zero(status.boot_time)),
        ("factory_heartbeat_time", zero(status.factory_heartbeat_time)),
        ("responder_heartbeat_time", zero(status.responder_heartbeat_time)),
        ("mjf_heartbeat_time", zero(status.mjf_heartbeat_time)),
        ("metadata_heartbeat_time", zero(status.metadata_heartbeat_time)),
        ("swap_used_kb", zero(status.swap_used_kb)), ("swap_free_kb", zero(status.swap_free_kb)),
        ("mem_used_kb", zero(status.mem_used_kb)), ("mem_total_kb", zero(status.mem_total_kb)),
    ]
    return _fitted("factory_status", pairs, "os_issue", limit)


def encode_query(kind: str, space: str, cookie: str, client: str = COMMAND_CLIENT) -> bytes:
    """A classic query: ``method`` only for machines and factories, no client name for factory."""
    message_type = {MACHINES: "machines_query", MACHINETYPES: "machinetypes_query",
                    FACTORY: "factory_query"}[kind]
    pairs = [("message_type", message_type)]
    if kind == MACHINES:
        pairs.append(("method", "machines"))
    elif kind == FACTORY:
        pairs.append(("method", "factories"))
    version = f"Vac {__version__}" if kind == FACTORY else f"Vac {__version__} {client}"
    pairs += [("vac_version", version), ("vacquery_version", VACQUERY_VERSION),
              ("space", space), ("cookie", cookie)]
    return render("query", pairs)


def new_salt() -> str:
    """Base64 of 32 random bytes, fresh for every batch of queries (classic)."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def make_cookie(salt: str, factory_name: str) -> str:
    """Hex SHA-256 of salt + factory name: binds a reply to the query and to the factory."""
    return hashlib.sha256((salt + factory_name).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclasses.dataclass(frozen=True)
class Query:
    kind: str  # MACHINES, MACHINETYPES or FACTORY
    space: str
    cookie: str
    vac_version: Optional[str]


@dataclasses.dataclass(frozen=True)
class Response:
    kind: str
    factory: str  # as the responder reports itself
    space: str
    cookie: str
    count: Optional[int]  # num_machines / num_machinetypes
    key: Optional[str]  # the machine or machinetype this message is about
    record: StatusRecord  # its ``factory`` is the reported one until the client renames it
    fields: dict  # the validated message, for --json


def parse_query(data: bytes) -> tuple[Query, dict]:
    """A query and its raw object (for the HMAC check), or DatagramError."""
    message = parse_datagram(data)
    fields = validate(message, "query")
    by_type = QUERY_TYPES.get(fields["message_type"]) if fields["message_type"] else None
    by_method = LEGACY_METHODS.get(fields["method"]) if fields["method"] else None
    if fields["message_type"] and by_type is None:
        raise DatagramError(f"unknown message_type {fields['message_type']!r}")
    if fields["method"] and by_method is None and by_type is None:
        raise DatagramError(f"unknown method {fields['method']!r}")
    if by_type and by_method and by_type != by_method:
        raise DatagramError("message_type and method disagree")
    kind = by_type or by_method
    if kind is None:
        raise DatagramError("neither message_type nor method")
    return Query(kind, fields["space"], fields["cookie"], fields["vac_version"]), message


def _version_of(fields: dict) -> Optional[str]:
    """``"Vac 03.01 vacd-responder"`` -> ``"03.01"``."""
    words = (fields.get("daemon_version") or fields.get("vac_version") or "").split()
    return words[1] if len(words) >= 2 and words[0] == "Vac" else None


def _decode_record(kind: str, fields: dict, factory: str) -> StatusRecord:
    if kind == MACHINES:
        processors = fields["num_processors"]
        return MachineStatus(
            factory=factory, machine=fields["machine"], state=fields["state"],
            machinetype=fields["machinetype"], machine_model=fields["machine_model"],
            uuid=fields["uuid"], created_time=fields["created_time"],
            started_time=fields["started_time"], heartbeat_time=fields["heartbeat_time"],
            processors=processors if processors is not None else (fields["num_cpus"] or 0),
            cpu_seconds=fields["cpu_seconds"] or 0, cpu_percentage=fields["cpu_percentage"] or 0.0,
            hs06=fields["hs06"], shutdown_message=fields["shutdown_message"],
            shutdown_time=fields["shutdown_time"], fqan=fields["fqan"])
    if kind == MACHINETYPES:
        processors = fields["running_processors"]
        return MachinetypeReport(
            factory=factory, machinetype=fields["machinetype"], running_hs06=fields["running_hs06"],
            running_machines=fields["running_machines"] or 0,
            running_processors=processors if processors is not None else (fields["running_cpus"] or 0),
            num_before_fizzle=fields["num_before_fizzle"],
            shutdown_message=fields["shutdown_message"], shutdown_time=fields["shutdown_time"],
            shutdown_machine=fields["shutdown_machine"], fqan=fields["fqan"],
            max_wallclock_seconds=fields["max_wallclock_seconds"],
            max_processors=fields["max_processors"])

    def first(*keys: str) -> Any:
        return next((fields[key] for key in keys if fields[key] is not None), None)

    return FactoryStatus(
        factory=factory, running_processors=first("running_processors", "running_cpus") or 0,
        running_machines=fields["running_machines"] or 0, running_hs06=fields["running_hs06"] or 0.0,
        max_processors=first("max_processors", "max_cpus", "total_cpus") or 0,
        max_machines=first("max_machines", "total_machines") or 0,
        max_hs06=first("max_hs06", "total_hs06") or 0.0,
        root_disk_avail_kb=fields["root_disk_avail_kb"],
        root_disk_avail_inodes=fields["root_disk_avail_inodes"],
        vac_disk_avail_kb=first("vac_disk_avail_kb", "daemon_disk_avail_kb"),
        vac_disk_avail_inodes=first("vac_disk_avail_inodes", "daemon_disk_avail_inodes"),
        load_average=fields["load_average"], kernel_version=fields["kernel_version"],
        os_issue=fields["os_issue"], boot_time=fields["boot_time"],
        factory_heartbeat_time=fields["factory_heartbeat_time"],
        responder_heartbeat_time=fields["responder_heartbeat_time"],
        mjf_heartbeat_time=fields["mjf_heartbeat_time"],
        metadata_heartbeat_time=fields["metadata_heartbeat_time"],
        swap_used_kb=fields["swap_used_kb"], swap_free_kb=fields["swap_free_kb"],
        mem_used_kb=fields["mem_used_kb"], mem_total_kb=fields["mem_total_kb"],
        version=_version_of(fields), site=fields["site"])


def parse_response(data: bytes) -> tuple[Response, dict]:
    """A status message and its raw object (for the HMAC check), or DatagramError."""
    message = parse_datagram(data)
    message_type = message.get("message_type")
    kind = next((kind for kind, name in RESPONSE_TYPES.items() if name == message_type), None)
    if kind is None:
        raise DatagramError(f"not a status message: message_type {str(message_type)[:40]!r}")
    fields = validate(message, message_type)
    count = fields["num_machines"] if kind == MACHINES else (
        fields["num_machinetypes"] if kind == MACHINETYPES else None)
    key = fields["machine"] if kind == MACHINES else (
        fields["machinetype"] if kind == MACHINETYPES else None)
    record = _decode_record(kind, fields, fields["factory"])
    return Response(kind, fields["factory"], fields["space"], fields["cookie"], count, key,
                    record, message), message


# ---------------------------------------------------------------------------------------------
# Shared-secret authentication


_HMAC_PREFIX = b',"hmac":"'
_HMAC_SUFFIX = b'"}'
HMAC_OVERHEAD = len(_HMAC_PREFIX) + 64 + len(_HMAC_SUFFIX)


def load_secret(settings: Settings) -> Optional[bytes]:
    """The shared secret of ``vacquery_secret_file`` (surrounding whitespace stripped), or None
    if none is configured. SecretError if it cannot be read or is shorter than 16 bytes."""
    path = settings.vacquery_secret_file
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            secret = handle.read(SECRET_MAX_BYTES + 1).strip()
    except OSError as error:
        raise SecretError(f"cannot read vacquery_secret_file {path}: {error.strerror}") from error
    if len(secret) > SECRET_MAX_BYTES:
        raise SecretError(f"vacquery_secret_file {path} is longer than {SECRET_MAX_BYTES} bytes")
    if len(secret) < SECRET_MIN_BYTES:
        raise SecretError(f"vacquery_secret_file {path} holds fewer than {SECRET_MIN_BYTES} bytes")
    return secret


class Authenticator:
    """Signs outgoing messages and checks incoming ones against an optional shared secret.

    The tag is HMAC-SHA256 over the message without it, appended as the last key
    (``…,"hmac":"<hex>"}``) so the receiver checks exactly the bytes that were sent; classic
    peers ignore the extra key. Unsigned messages pass only when there is no secret or the site
    allows unauthenticated peers, and never from a peer already seen signing (``sticky`` names:
    a stripped tag is a downgrade, not a classic peer).
    """

    def __init__(self, secret: Optional[bytes], allow_unauthenticated: bool = True):
        self.secret = secret
        self.allow_unauthenticated = allow_unauthenticated
        self._signing_peers: set = set()

    def seal(self, body: bytes) -> bytes:
        if self.secret is None:
            return body
        tag = hmac.new(self.secret, body, hashlib.sha256).hexdigest().encode("ascii")
        return body[:-1] + _HMAC_PREFIX + tag + _HMAC_SUFFIX

    def check(self, data: bytes, message: dict, peer: Optional[str] = None) -> Optional[str]:
        """None if ``data`` is acceptable from ``peer``, else why not."""
        tag = message.get("hmac")
        if tag is None:
            if self.secret is None:
                return None
            if peer is not None and peer in self._signing_peers:
                return "unsigned message from a peer that signs"
            return None if self.allow_unauthenticated else "unsigned message"
        if not isinstance(tag, str) or len(tag) != 64:
            return "malformed hmac"
        if self.secret is None:
            return None  # we cannot check it: treat the peer like a classic one
        suffix = _HMAC_PREFIX + tag.encode("ascii", "replace") + _HMAC_SUFFIX
        data = data.rstrip(b" ")  # a datagram sent with segmentation offload may be padded
        if not data.endswith(suffix):
            return "hmac not the last key"
        body = data[:-len(suffix)] + b"}"
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, tag):
            return "wrong hmac"
        if peer is not None and len(self._signing_peers) < MAX_ITEMS:
            self._signing_peers.add(peer)
        return None


# ---------------------------------------------------------------------------------------------
# Sockets and names


def _raise_buffers(sock: socket.socket) -> int:
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


async def _resolve(name: str, timeout: float) -> list:
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


class DropCounter:
    """Datagrams dropped by reason; the responder logs each reason at most once a minute."""

    def __init__(self, what: str, log_interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.what = what
        self.counts: dict = {}
        self.log_interval = log_interval
        self.clock = clock
        self._last_logged: dict = {}
        self._unlogged: dict = {}

    def drop(self, reason: str, source: Any, log_now: bool = True, exc_info: bool = False) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
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
        log.warning("%s: dropped datagram from %s: %s%s", self.what, source, reason, more,
                    exc_info=exc_info)


class SourceLimiter:
    """Token bucket per source address: ``burst`` at once, then ``rate`` per second."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = MAX_ITEMS):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.max_sources = max_sources
        self._buckets: dict = {}  # source -> [tokens, last time]

    def allow(self, source: str) -> bool:
        now = self.clock()
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]  # forget the oldest source
            bucket = self._buckets[source] = [self.burst, now]
        bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True


# ---------------------------------------------------------------------------------------------
# Responder


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
        self.limiter = SourceLimiter(rate, burst, clock)
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
        results = await asyncio.gather(*(_resolve(name, RESOLVE_TIMEOUT) for name in names))
        addresses = set()
        for name, found in zip(names, results):
            if not found:
                log.warning("VacQuery responder: cannot resolve factory %s; it is treated as "
                            "outside the space", name)
            addresses.update(found)
        self.factory_addresses = frozenset(addresses)

    async def _refresh_factories(self) -> None:
        while True:
            await asyncio.sleep(FACTORY_RESOLVE_SECONDS)
            await self.resolve_factories()

    # -- receiving

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            try:
                # One byte more than we accept: a longer datagram arrives cut and is dropped.
                data, addr = self.sock.recvfrom(MAX_RECEIVE_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. ICMP errors reported on the socket
                self.drops.drop(f"socket error: {error.strerror or error}", "-")
                return
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self._answer(data, addr)
        except Exception as error:  # a bug must never stop the responder
            self.drops.drop(f"internal error: {error.__class__.__name__}", addr[0], exc_info=True)

    def _answer(self, data: bytes, addr: tuple) -> None:
        source = addr[0]
        if not self.limiter.allow(source):
            self.drops.drop("rate limit", source)
            return
        try:
            query, message = parse_query(data)
        except DatagramError as error:
            self.drops.drop(str(error), source)
            return
        if query.space != self.settings.vac_space:
            self.drops.drop(f"space {query.space[:80]!r} is not ours", source)
            return
        problem = self.authenticator.check(data, message, source)
        if problem:
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
            self.drops.drop(f"cannot send: {error.strerror or error}", addr[0])

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
        _raise_buffers(sock)
    except OSError:
        sock.close()
        raise
    responder.attach(sock, loop)
    responder._refresh_task = loop.create_task(responder._refresh_factories())
    return responder


# ---------------------------------------------------------------------------------------------
# Client


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
            self.run.drops.drop(f"internal error: {error.__class__.__name__}", addr[0], exc_info=True)

    def error_received(self, exc: Exception) -> None:
        self.run.drops.drop(f"socket error: {exc.__class__.__name__}", "-", False)


class _QueryRun:
    """One query of many factories: sending, resending, receiving, the deadline."""

    def __init__(self, settings: Settings, kind: str, targets: list, space: str, client: str,
                 authenticator: Authenticator, clock: Callable[[], float]):
        self.settings = settings
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
        self.messages: list = []
        self.progress = asyncio.Event()
        self.expected_replies = EXPECTED_REPLIES[kind]
        self.remaining = len(targets)  # factories not complete yet
        self.waiting_for_window = False  # factories wait to be sent to until others complete

    def receive(self, data: bytes, source: str) -> None:
        try:
            response, message = parse_response(data)
        except DatagramError as error:
            self.drops.drop(str(error), source, False)
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
    found = await asyncio.gather(*(_resolve(t.name, min(RESOLVE_TIMEOUT, timeout)) for t in unresolved))
    for target, addresses in zip(unresolved, found):
        if addresses:
            target.address = addresses[0]
        else:
            problems[target.name] = "cannot resolve name"
    run = _QueryRun(settings, kind, [t for t in targets if t.address], space, client,
                    authenticator, clock)
    loop = asyncio.get_running_loop()
    transport = None
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ClientProtocol(run), local_addr=(settings.vacquery_address or "0.0.0.0", 0),
            family=socket.AF_INET)
        _raise_buffers(transport.get_extra_info("socket"))
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
        log.info("VacQuery %s query: dropped %s", kind, ", ".join(
            f"{count} ({reason})" for reason, count in sorted(result.dropped.items())))
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


# ---------------------------------------------------------------------------------------------
# Peer-report cache for the planner


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
        self.refresh_seconds = refresh_seconds or settings.peer_cache_seconds
        self.batch_size = max(1, batch_size)
        self.timeout = timeout
        self.clock = clock
        self.authenticator = Authenticator(secret, settings.vacquery_allow_unauthenticated)
        self.last_result: Optional[QueryResult] = None
        self._entries: dict = {}  # factory -> {machinetype: (received, MachinetypeReport)}
        self._next = 0
        self._refreshing: Optional[asyncio.Future] = None
        self._wake: Optional[asyncio.Event] = None

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
            try:
                await self.refresh()
            except Exception:
                log.exception("peer report refresh failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       self.refresh_seconds * random.uniform(0.9, 1.1))
            except asyncio.TimeoutError:
                pass


# ---------------------------------------------------------------------------------------------
# VacMon


def vacmon_cycle_messages(settings: Settings, snapshot: StatusSnapshot,
                          time_sent: Optional[float] = None) -> list:
    """The per-cycle VacMon datagrams: ``factory_status`` and one ``machinetype_status`` each."""
    count = len(snapshot.machinetypes)
    messages = [encode_factory_status(snapshot.factory, settings, cookie=VACMON_COOKIE,
                                      client=FACTORY_CLIENT, time_sent=time_sent)]
    messages += [encode_machinetype_status(report, settings, num_machinetypes=count,
                                           cookie=VACMON_COOKIE, client=FACTORY_CLIENT,
                                           time_sent=time_sent)
                 for report in snapshot.machinetypes]
    return messages


def vacmon_finish_message(settings: Settings, machine: MachineStatus, num_machines: int,
                          time_sent: Optional[float] = None) -> bytes:
    """The ``machine_status`` VacMon gets when a machine finishes."""
    return encode_machine_status(machine, settings, num_machines=num_machines,
                                 cookie=VACMON_COOKIE, client=FACTORY_CLIENT, time_sent=time_sent)


def parse_hostport(hostport: str) -> tuple:
    """``host:port`` (port default 8884) -> (host, port); ValueError if the port is bad."""
    host, sep, port = hostport.strip().rpartition(":")
    if not sep:
        return hostport.strip(), DEFAULT_VACMON_PORT
    number = int(port)
    if not host or not 0 < number < 65536:
        raise ValueError(f"bad VacMon address {hostport!r}")
    return host, number


async def send_vacmon(settings: Settings, messages: Sequence[bytes]) -> int:
    """Send ``messages`` to every ``vacmon_hostport``; returns the datagrams sent. Problems
    (bad address, unresolvable name, socket errors) are logged, never raised."""
    if not settings.vacmon_hostport or not messages:
        return 0
    destinations = []
    for hostport in settings.vacmon_hostport:
        try:
            host, port = parse_hostport(hostport)
        except ValueError:
            log.warning("VacMon: bad vacmon_hostport %r", hostport)
            continue
        addresses = await _resolve(host, RESOLVE_TIMEOUT)
        if not addresses:
            log.warning("VacMon: cannot resolve %s", host)
            continue
        destinations.append((addresses[0], port))
    sent = 0
    if not destinations:
        return sent
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for destination in destinations:
            for message in messages:
                try:
                    sock.sendto(message, destination)
                    sent += 1
                except OSError as error:
                    log.warning("VacMon: cannot send to %s:%d: %s", *destination, error)
                    break
    return sent


# ---------------------------------------------------------------------------------------------
# Presentation for the vac command: tables, summaries, ssh command lines


MODEL_CODES = {"cernvm3": "VM", "cernvm4": "VM", "vm-raw": "VM", "docker": "DC", "singularity": "SC"}
LIVE_STATES = ("Starting", "Running", "Paused")


def printable(text: Optional[str], limit: Optional[int] = None) -> str:
    """Peer- and VM-controlled text made safe for a terminal: control characters become ``?``."""
    if not text:
        return ""
    cleaned = "".join(char if char.isprintable() else "?" for char in text[: limit or len(text)])
    return cleaned


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Iterable[int] = ()) -> list:
    """Aligned text lines; columns in ``right`` are right-aligned (numbers)."""
    right = set(right)
    widths = [max(len(str(row[column])) for row in [headers, *rows]) for column in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).rjust(width) if column in right else str(cell).ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _ago(seconds: Optional[float]) -> str:
    """A short age: 45s, 12m, 3.5h, 4.2d."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _kib(value: Optional[int]) -> str:
    if value is None:
        return "-"
    for unit, size in (("T", 1024 ** 3), ("G", 1024 ** 2), ("M", 1024)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}K"


def _factories(count: int) -> str:
    return f"{count} factory" if count == 1 else f"{count} factories"


def _short(name: str) -> str:
    return name.split(".", 1)[0]


def problem_lines(result: QueryResult) -> list:
    """Lines naming the factories that did not answer, or not completely."""
    lines = []
    if result.silent:
        named = [f"{name} ({result.problems[name]})" if name in result.problems else name
                 for name in result.silent]
        lines.append(f"no answer from {_factories(len(result.silent))}: {', '.join(named)}")
    if result.incomplete:
        lines.append(f"incomplete answer from {_factories(len(result.incomplete))}: "
                     f"{', '.join(result.incomplete)}")
    return lines


def render_machines(result: QueryResult, now: float) -> str:
    """``vac machines``: one line per slot, a summary line, the silent factories."""
    rows = []
    counts = {"Running": 0, "Starting": 0, "Shut down": 0}
    processors, hs06 = 0, 0.0
    for machine in result.reports:
        age, life_cpu, message = "", "", ""
        if machine.state == "Running" and machine.started_time:
            age = _ago(now - machine.started_time)
            if machine.heartbeat_time and machine.heartbeat_time > machine.started_time:
                life_cpu = f"{100 * machine.cpu_seconds / (machine.heartbeat_time - machine.started_time):.0f}"
        elif machine.state == "Starting" and machine.created_time:
            age = _ago(now - machine.created_time)
        elif machine.state == "Shut down":
            message = printable(machine.shutdown_message, 60)
        if machine.state in LIVE_STATES:
            processors += machine.processors
            hs06 += machine.hs06 or 0.0
        counts[machine.state] = counts.get(machine.state, 0) + 1
        rows.append([
            printable(_short(machine.machine)), printable(machine.machinetype) or "-",
            printable(machine.state), str(machine.processors) if machine.machinetype else "",
            MODEL_CODES.get(machine.machine_model or "", "??" if machine.machine_model else ""),
            f"{machine.hs06:.1f}" if machine.hs06 is not None and machine.machinetype else "",
            age, life_cpu,
            f"{machine.cpu_percentage:.0f}" if machine.state == "Running" else "",
            printable(machine.uuid) if machine.state in LIVE_STATES else "", message])
    lines = format_table(["NAME", "MACHINETYPE", "STATE", "PROC", "MODEL", "HS06", "AGE",
                          "CPU%LIFE", "CPU%NOW", "UUID", "SHUTDOWN MESSAGE"], rows,
                         right=(3, 5, 6, 7, 8)) if rows else []
    others = sum(count for state, count in counts.items()
                 if state not in ("Running", "Starting", "Shut down"))
    lines.append(
        f"{len(result.reports)} slots on {_factories(len(result.answered) + len(result.incomplete))}: "
        f"{counts['Running']} running, {counts['Starting']} starting, "
        f"{counts['Shut down']} shut down" + (f", {others} other" if others else "")
        + f"; {processors} processors and {hs06:.1f} HS06 in use")
    return "\n".join(lines + problem_lines(result)) + "\n"


def render_machinetypes(result: QueryResult, now: float, machinetype: Optional[str] = None) -> str:
    """``vac machinetypes``: one line per factory and machinetype, then totals per machinetype."""
    reports = [report for report in result.reports
               if machinetype is None or report.machinetype == machinetype]
    rows, totals = [], {}
    for report in reports:
        rows.append([
            printable(_short(report.factory)), printable(report.machinetype),
            str(report.running_machines), str(report.running_processors),
            f"{report.running_hs06:.1f}", str(report.num_before_fizzle),
            _ago(now - report.shutdown_time) if report.shutdown_time else "-",
            printable(report.shutdown_message, 60)])
        total = totals.setdefault(report.machinetype, [0, 0, 0.0, 0])
        total[0] += report.running_machines
        total[1] += report.running_processors
        total[2] += report.running_hs06
        total[3] += report.num_before_fizzle
    lines = format_table(["FACTORY", "MACHINETYPE", "MACHINES", "PROC", "HS06", "FIZZLE?",
                          "LAST END", "LAST SHUTDOWN MESSAGE"], rows, right=(2, 3, 4, 5, 6)) if rows else []
    if len(totals) > 0 and len(result.answered) + len(result.incomplete) > 1:
        total_rows = [[printable(name), str(t[0]), str(t[1]), f"{t[2]:.1f}", str(t[3])]
                      for name, t in sorted(totals.items())]
        lines += [""] + format_table(["ALL FACTORIES", "MACHINES", "PROC", "HS06", "FIZZLE?"],
                                     total_rows, right=(1, 2, 3, 4))
    machines = sum(t[0] for t in totals.values())
    processors = sum(t[1] for t in totals.values())
    hs06 = sum(t[2] for t in totals.values())
    what = f"machinetype {printable(machinetype)}" if machinetype else f"{len(totals)} machinetypes"
    lines.append(f"{what} on {_factories(len(result.answered) + len(result.incomplete))}: "
                 f"{machines} machines, {processors} processors, {hs06:.1f} HS06")
    return "\n".join(lines + problem_lines(result)) + "\n"


def render_factories(result: QueryResult, now: float) -> str:
    """``vac factories``: one line per factory with capacity, load, disk, memory and version."""
    rows = []
    running = maximum = machines = 0
    hs06 = max_hs06 = 0.0
    for status in result.reports:
        running += status.running_processors
        maximum += status.max_processors
        machines += status.running_machines
        hs06 += status.running_hs06
        max_hs06 += status.max_hs06
        memory = (f"{_kib(status.mem_used_kb)}/{_kib(status.mem_total_kb)}"
                  if status.mem_total_kb is not None else "-")
        rows.append([
            printable(_short(status.factory)),
            f"{status.running_processors}/{status.max_processors}", str(status.running_machines),
            f"{status.running_hs06:.0f}/{status.max_hs06:.0f}",
            f"{status.load_average:.2f}" if status.load_average is not None else "-",
            _kib(status.root_disk_avail_kb), _kib(status.vac_disk_avail_kb), memory,
            _ago(now - status.boot_time) if status.boot_time else "-",
            _ago(now - status.factory_heartbeat_time) if status.factory_heartbeat_time else "-",
            printable(status.version) or "?", printable(status.os_issue, 40)])
    lines = format_table(["FACTORY", "PROC", "MACHINES", "HS06", "LOAD", "ROOT FREE", "VAC FREE",
                          "MEMORY", "UP", "CYCLE", "VERSION", "OS"], rows,
                         right=(1, 2, 3, 4, 5, 6, 7, 8, 9)) if rows else []
    lines.append(f"{_factories(len(result.reports))}: {running}/{maximum} processors, "
                 f"{machines} machines, {hs06:.0f}/{max_hs06:.0f} HS06 in use")
    return "\n".join(lines + problem_lines(result)) + "\n"


def find_machine(reports: Iterable[MachineStatus], wanted: str) -> list:
    """Slots whose machine name, short name or UUID is ``wanted``."""
    return [machine for machine in reports
            if wanted in (machine.machine, _short(machine.machine)) or machine.uuid == wanted]


def slot_of(machine_name: str) -> Optional[int]:
    """The slot ordinal in a machine name ``host-NN.domain``, or None."""
    _, dash, digits = _short(machine_name).rpartition("-")
    return int(digits) if dash and digits.isdigit() else None


def ssh_argv(machine: MachineStatus, settings: Settings, command: Sequence[str] = ()) -> list:
    """``ssh`` to ``machine`` as root with the factory key, through its factory unless that is
    this host. Host keys are not recorded: every machine boots with new ones, and the
    clean-traffic filter stops other machines from taking a slot's address.
    ValueError if the name has no slot number or root_public_key does not end in ``.pub``."""
    ordinal = slot_of(machine.machine)
    if ordinal is None:
        raise ValueError(f"{machine.machine} is not a slot name (host-NN.domain)")
    public_key = settings.root_public_key
    if not public_key.endswith(".pub"):
        raise ValueError(f"root_public_key {public_key} does not end in .pub, so its private key "
                         "cannot be found")
    argv = ["ssh", "-i", public_key[:-len(".pub")], "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR"]
    if machine.factory != settings.factory_name:
        argv += ["-J", factory_address(machine.factory, settings).address or machine.factory]
    return argv + [f"root@{slot_ip(ordinal)}", *command]
