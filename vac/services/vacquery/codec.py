"""The VacQuery 01.03 codec: queries and the three status messages.

Byte-compatible with classic peers (every key, deprecated duplicates included; floats with two
decimals; flat objects), and a strict decoder for everything received (size cap, UTF-8, a JSON
object without duplicate keys, NaN or nesting, every known key of the right type and within
bounds). Wire format: REFERENCE.md §2; hardening: STANDARDS.md §E4.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable
from typing import Any, Optional

from vac import __version__
from vac.core.config import Settings
from vac.core.model import MachinetypeReport
from vac.services.vacquery.records import FactoryStatus, MachineStatus, StatusRecord

VACQUERY_VERSION = "VacQuery 01.03"
RESPONDER_CLIENT = "vacd-responder"
FACTORY_CLIENT = "vacd-factory"  # the daemon's own queries and its VacMon messages
COMMAND_CLIENT = "vac-command"


MAX_SEND_BYTES = 1400  # below a 1500-byte MTU (TN-2016-04)
# Classic peers write ", "/": " separators and unbounded shutdown messages, so accept a little
# more than we send; anything a 2048-byte receive buffer would truncate is dropped (E4).
MAX_RECEIVE_BYTES = 2048
MAX_ITEMS = 4096  # bound on num_machines / num_machinetypes and on records kept per factory
MAX_NUMBER = 1e15  # any numeric field beyond this is nonsense (and not an exact float)
AMPLIFICATION_FACTOR = 3  # non-space sources get at most this many reply bytes per query byte
COOKIE_MAX_CHARS = 128


MACHINES = "machines"
MACHINETYPES = "machinetypes"
FACTORY = "factory"
QUERY_TYPES = {"machines_query": MACHINES, "machinetypes_query": MACHINETYPES, "factory_query": FACTORY}
LEGACY_METHODS = {"machines": MACHINES, "machinetypes": MACHINETYPES, "factories": FACTORY}
RESPONSE_TYPES = {MACHINES: "machine_status", MACHINETYPES: "machinetype_status", FACTORY: "factory_status"}


class DatagramError(ValueError):
    """A received datagram that is not an acceptable VacQuery message; ``str()`` says why."""


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
