"""Vacuum pipes: machinetypes defined by a remote JSON document (REFERENCE.md §1.4).

A ``[vacuum_pipe PREFIX]`` section names a URL serving
``{"cache_seconds": N, "machinetypes": [{"suffix": "S", ...}, ...]}``; every entry becomes the
machinetype ``PREFIX-S`` with ``machinetype_path`` ``<state_dir>/machinetypes/PREFIX``.
Where one option is given in several places, the first of these wins:

1. a local ``[machinetype PREFIX-S]`` section (options it sets explicitly);
2. the ``[vacuum_pipe PREFIX]`` section (its options other than the URL and share);
3. the pipe entry;
4. ``[settings]`` ``user_data_option_*``/``user_data_file_*``, then the Machinetype defaults.

The pipe's ``target_share`` is split over its entries in proportion to their own shares.

The document comes from a VO's web server and is untrusted. It is size-capped, and every value is
checked by JSON type and by pattern: file names cannot contain ``/`` or start with ``.`` or ``-``,
URLs must be http(s) with no ``..`` segment, no whitespace and no loopback or link-local host,
devices, repositories and FQANs have fixed alphabets and lengths. An entry with any bad value is
rejected whole, with the reason logged; a half-configured machinetype is never run. Unknown keys
are logged and ignored.

The last good document is cached atomically in ``<state_dir>/pipescache/PREFIX.pipe`` and
refetched once it is older than its ``cache_seconds``. When a refresh fails (server down, bad
JSON) the cached copy goes on being used however old it is, so the pipe's machinetypes never
vanish from the configuration (a classic defect that lost accounting of running machines).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import math
import os
import re
import time
import urllib.parse
from typing import Any, Callable, Optional

from vac.content import fetch
from vac.core.config import MACHINE_MODELS, Config, Machinetype, Settings, VacuumPipe
from vac.records.store import atomic_write

log = logging.getLogger(__name__)

DocumentFetcher = Callable[[str], bytes]  # URL -> document body; raises fetch.FetchError (or OSError)

FETCH_TIMEOUT_SECONDS = 30.0
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_ENTRIES = 100
DEFAULT_CACHE_SECONDS = 3600.0
MIN_CACHE_SECONDS = 60.0  # a pipe cannot make every factory poll its server every cycle
MAX_CACHE_SECONDS = 7 * 86400.0
MAX_OPTION_VALUE_CHARS = 65536

NAME_PART = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
OPTION_NAME = re.compile(r"[a-z0-9_]{1,64}")
DEVICE = re.compile(r"[a-z0-9]{1,16}")
FQAN = re.compile(r"/[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._=-]*)*")
MACHINEGROUP = re.compile(r"[A-Za-z0-9/][A-Za-z0-9/._=-]{0,255}")
REPOSITORY = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
CVMFS_PATH = re.compile(r"/cvmfs(?:/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)+")
URL_CHARACTERS = re.compile(r"[!-~]+")  # printable ASCII, no space
PRINTABLE = re.compile(r"[ -~]*")
HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
NUMERIC_HOST = re.compile(r"[0-9.]+|0x[0-9a-fx.]*")  # 2130706433, 127.1, 0x7f.1: resolve to IPs


def fetch_document(url: str) -> bytes:
    """The default :data:`DocumentFetcher`: one GET through vac.content.fetch (TLS against the
    system and grid CAs, the User-Agent, one deadline, the document size cap)."""
    with fetch.Fetcher() as client:
        return client.get_bytes(url, timeout=FETCH_TIMEOUT_SECONDS, max_bytes=MAX_DOCUMENT_BYTES)


# --- the document --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipeDocument:
    cache_seconds: float
    entries: tuple  # raw JSON values, each checked by _pipe_machinetypes


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def parse_document(data: bytes) -> PipeDocument:
    """The checked top level of a pipe document; ValueError says what is wrong."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ValueError("document is not UTF-8") from None
    except RecursionError:
        raise ValueError("document is nested too deeply") from None
    except ValueError as error:
        raise ValueError(f"document is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"document is {_json_type(value)}, not a JSON object")
    if "machinetypes" not in value:
        raise ValueError("document has no \"machinetypes\" array")
    entries = value["machinetypes"]
    if not isinstance(entries, list):
        raise ValueError(f"\"machinetypes\" is {_json_type(entries)}, not an array")
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"document lists {len(entries)} machinetypes, more than {MAX_ENTRIES}")
    cache_seconds = value.get("cache_seconds", DEFAULT_CACHE_SECONDS)
    if isinstance(cache_seconds, bool) or not isinstance(cache_seconds, (int, float)):
        raise ValueError(f"\"cache_seconds\" is {_json_type(cache_seconds)}, not a number")
    cache_seconds = min(max(float(cache_seconds), MIN_CACHE_SECONDS), MAX_CACHE_SECONDS)
    return PipeDocument(cache_seconds=cache_seconds, entries=tuple(entries))


# --- values --------------------------------------------------------------------------------------


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,15}", value.strip()):
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {_json_type(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def _number(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,15}(\.[0-9]{1,15})?", value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, not {_json_type(value)}")
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(f"must be between {low:g} and {high:g}")
        return float(value)

    return convert


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"must be true or false, not {_show(value) if word is not None else _json_type(value)}")


def _text(value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_json_type(value)}")
    if len(value) > max_chars:
        raise ValueError(f"is longer than {max_chars} characters")
    return value


def _matching(pattern: re.Pattern, description: str, max_chars: int = 256) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not pattern.fullmatch(_text(value, max_chars)):
            raise ValueError(f"must be {description}, not {_show(value)}")
        return value

    return convert


def _url(value: str) -> str:
    """An http(s) URL that cannot point at this host or climb out of its path."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL must be http or https: {_show(value)}")
    if not URL_CHARACTERS.fullmatch(value) or "\\" in value:
        raise ValueError(f"URL contains spaces, control or non-ASCII characters: {_show(value)}")
    if not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"URL must have a host and no user name: {_show(value)}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"URL has an invalid port: {_show(value)}")
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        address = None
    if address is None and (not HOST_NAME.fullmatch(parts.hostname) or NUMERIC_HOST.fullmatch(parts.hostname)):
        raise ValueError(f"URL host must be a DNS name or an IP address: {_show(value)}")
    local = parts.hostname == "localhost" or (
        address is not None
        and (address.is_loopback or address.is_link_local or address.is_unspecified or address.is_multicast)
    )
    if local:
        raise ValueError(f"URL may not point at a local or link-local address: {_show(value)}")
    if any(segment in (".", "..") for segment in urllib.parse.unquote(parts.path).split("/")):
        raise ValueError(f"URL path may not contain . or .. segments: {_show(value)}")
    return value


def _user_data(value: Any) -> str:
    text = _text(value, 2048)
    if "/" in text:
        return _url(text)
    if not FILE_NAME.fullmatch(text):
        raise ValueError(f"must be an http(s) URL or a plain file name, not {_show(value)}")
    return text


def _root_image(value: Any) -> str:
    text = _text(value, 2048)
    if text.startswith("/cvmfs/"):
        if not CVMFS_PATH.fullmatch(text) or "/../" in text + "/" or "/./" in text + "/":
            raise ValueError(f"must be a plain /cvmfs/ path, not {_show(value)}")
        return text
    if text.startswith("docker://"):
        raise ValueError("docker:// images need container machinetypes, which this Vac does not support")
    if "/" in text:
        return _url(text)
    if not FILE_NAME.fullmatch(text):
        raise ValueError(f"must be an http(s) URL, a /cvmfs/ path or a plain file name, not {_show(value)}")
    return text


def _machine_model(value: Any) -> str:
    text = _text(value, 64)
    if text not in MACHINE_MODELS:
        raise ValueError(f"must be one of {', '.join(MACHINE_MODELS)}, not {_show(value)}")
    return text


def _signing_dn(value: Any) -> str:
    text = _text(value, 512)
    if not PRINTABLE.fullmatch(text):
        raise ValueError("contains control or non-ASCII characters")
    try:
        re.compile(text)
    except re.error as error:
        raise ValueError(f"is not a valid regular expression ({error})") from None
    return text


def _repositories(value: Any) -> tuple[str, ...]:
    names = tuple(_text(value, 4096).split())
    if len(names) > 32:
        raise ValueError("lists more than 32 repositories")
    for name in names:
        if not REPOSITORY.fullmatch(name):
            raise ValueError(f"repository names must be like lhcb.cern.ch, not {_show(name)}")
    return names


@dataclasses.dataclass(frozen=True)
class _Option:
    convert: Callable[[Any], Any]
    from_pipe: bool = True  # False: only the [vacuum_pipe] section may set it


OPTIONS: dict[str, _Option] = {
    "accounting_fqan": _Option(_matching(FQAN, "an FQAN like /vo/Role=production")),
    "backoff_seconds": _Option(_integer(0, 10**7)),
    "cvmfs_repositories": _Option(_repositories),
    "disk_gb_per_processor": _Option(_number(0.001, 10**5)),
    "fizzle_seconds": _Option(_integer(0, 10**7)),
    "heartbeat_file": _Option(_matching(FILE_NAME, "a plain file name")),
    "heartbeat_seconds": _Option(_integer(0, 10**7)),
    "image_signing_dn": _Option(_signing_dn),
    "legacy_proxy": _Option(_boolean),
    "machine_model": _Option(_machine_model),
    "max_processors": _Option(_integer(1, 4096)),
    "max_wallclock_seconds": _Option(_integer(0, 10**8)),
    "min_processors": _Option(_integer(1, 4096)),
    "min_wallclock_seconds": _Option(_integer(0, 10**8)),
    "root_device": _Option(_matching(DEVICE, "a device name of a-z and 0-9 like vda")),
    "root_image": _Option(_root_image),
    "scratch_device": _Option(_matching(DEVICE, "a device name of a-z and 0-9 like vdb")),
    "target_share": _Option(_number(0.0, 10**9)),
    "user_data": _Option(_user_data),
    "user_data_proxy": _Option(_boolean),
    "machinegroup": _Option(_matching(MACHINEGROUP, "a group name"), from_pipe=False),
    "machines_dir_days": _Option(_number(-10**5, 10**5), from_pipe=False),
}
CONTAINER_KEYS = ("container_command", "tmp_binds")
OPTION_PREFIXES = {"user_data_option_": "user_data_options", "user_data_file_": "user_data_files"}


def _option_value(key: str, value: Any) -> str:
    if key.startswith("user_data_file_"):
        return _matching(FILE_NAME, "a plain file name")(value)
    text = _text(value, MAX_OPTION_VALUE_CHARS)
    if "\0" in text:
        raise ValueError("contains a NUL character")
    return text


@dataclasses.dataclass
class _Options:
    """Checked options of one layer: Machinetype fields plus user_data option/file pairs."""

    fields: dict = dataclasses.field(default_factory=dict)
    user_data_options: dict = dataclasses.field(default_factory=dict)
    user_data_files: dict = dataclasses.field(default_factory=dict)


class _Rejected(Exception):
    pass


def _check_options(pairs: Any, *, from_pipe: bool, where: str, problems: list[str]) -> _Options:
    """Check every key and value; a bad value raises _Rejected, unknown keys are reported."""
    checked = _Options()
    for key, value in pairs:
        if not isinstance(key, str) or len(key) > 128:
            problems.append(f"{where}: ignored key {_show(key)}")
            continue
        prefix = next((p for p in OPTION_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            name = key[len(prefix):]
            if not OPTION_NAME.fullmatch(name):
                raise _Rejected(f"option name {_show(key)} must be {prefix} followed by a-z, 0-9 or _")
            try:
                getattr(checked, OPTION_PREFIXES[prefix])[name] = _option_value(key, value)
            except ValueError as error:
                raise _Rejected(f"{key} {error}") from None
            continue
        option = OPTIONS.get(key)
        if key in CONTAINER_KEYS:
            problems.append(f"{where}: ignored {key}: container machinetypes are not supported")
        elif option is None or (from_pipe and not option.from_pipe):
            problems.append(f"{where}: ignored unknown or not allowed key {_show(key)}")
        else:
            try:
                checked.fields[key] = option.convert(value)
            except ValueError as error:
                raise _Rejected(f"{key} {error}") from None
    return checked


# --- expansion -----------------------------------------------------------------------------------


def _machinetype_fields() -> dict[str, Any]:
    return {field.name: field for field in dataclasses.fields(Machinetype)}


def _locally_set(config: Config, local: Machinetype) -> set[str]:
    """Fields an admin set in a local section for ``local``: named in ``config.sources`` or
    differing from the Machinetype default."""
    fields = _machinetype_fields()
    named = {
        option
        for (section, option), source in config.sources.items()
        if section == f"machinetype {local.name}" and source != "default"
    }
    differing = {
        name
        for name, field in fields.items()
        if field.default is not dataclasses.MISSING and getattr(local, name) != field.default
    }
    return (named | differing) & set(fields) - {"name", "machinetype_path"}


def _merged_pairs(settings_pairs: tuple, *layers: dict, local_pairs: tuple = ()) -> tuple:
    merged = dict(settings_pairs)
    for layer in layers:
        merged.update(layer)
    # Pairs equal to the settings defaults may have been merged in by the loader: not local.
    merged.update((key, value) for key, value in local_pairs if (key, value) not in settings_pairs)
    return tuple(sorted(merged.items()))


def _build_machinetype(
    name: str,
    path: str,
    entry: _Options,
    section: _Options,
    share: float,
    settings: Settings,
    local: Optional[Machinetype],
    local_fields: set[str],
) -> Machinetype:
    values = {**entry.fields, **section.fields, "target_share": share}
    values["user_data_options"] = _merged_pairs(
        settings.user_data_options, entry.user_data_options, section.user_data_options,
        local_pairs=local.user_data_options if local else (),
    )
    values["user_data_files"] = _merged_pairs(
        settings.user_data_files, entry.user_data_files, section.user_data_files,
        local_pairs=local.user_data_files if local else (),
    )
    if local is not None:
        values.update(
            (field, getattr(local, field))
            for field in local_fields - {"user_data_options", "user_data_files"}
        )
    machinetype = Machinetype(name=name, machinetype_path=path, **values)
    for required in ("root_image", "user_data"):
        if getattr(machinetype, required) is None:
            raise _Rejected(f"no {required} given")
    if machinetype.min_processors > machinetype.max_processors:
        raise _Rejected(
            f"min_processors {machinetype.min_processors} > max_processors {machinetype.max_processors}"
        )
    return machinetype


def _pipe_machinetypes(
    config: Config, pipe: VacuumPipe, document: PipeDocument, problems: list[str]
) -> list[Machinetype]:
    where = f"vacuum pipe {pipe.prefix}"
    try:
        section = _check_options(pipe.defaults, from_pipe=False, where=f"[vacuum_pipe {pipe.prefix}]", problems=problems)
    except _Rejected as error:
        problems.append(f"[vacuum_pipe {pipe.prefix}]: {error}; pipe skipped")
        return []
    accepted: list[tuple[str, _Options]] = []
    suffixes: set[str] = set()
    for index, entry in enumerate(document.entries):
        label = f"{where} entry {index}"
        try:
            if not isinstance(entry, dict):
                raise _Rejected(f"is {_json_type(entry)}, not an object")
            suffix = entry.get("suffix")
            if not isinstance(suffix, str) or not NAME_PART.fullmatch(suffix):
                raise _Rejected(f"suffix must be 1-32 of a-z, 0-9 and inner -, not {_show(suffix)}")
            label = f"{where} entry {index} ({suffix})"
            if suffix in suffixes:
                raise _Rejected("repeats an earlier suffix")
            options = _check_options(
                ((key, value) for key, value in entry.items() if key != "suffix"),
                from_pipe=True, where=label, problems=problems,
            )
        except _Rejected as error:
            problems.append(f"{label} rejected: {error}")
            continue
        suffixes.add(suffix)
        accepted.append((suffix, options))

    total = sum(options.fields.get("target_share", 0.0) for _, options in accepted)
    if accepted and pipe.target_share > 0 and total <= 0:
        problems.append(f"{where}: no entry has a positive target_share, so none will be created")
    path = os.path.join(config.settings.state_dir, "machinetypes", pipe.prefix)
    machinetypes = []
    for suffix, options in accepted:
        name = f"{pipe.prefix}-{suffix}"
        share = pipe.target_share * options.fields.get("target_share", 0.0) / total if total > 0 else 0.0
        local = config.machinetypes.get(name)
        local_fields = _locally_set(config, local) if local is not None else set()
        try:
            machinetypes.append(
                _build_machinetype(name, path, options, section, share, config.settings, local, local_fields)
            )
        except _Rejected as error:
            problems.append(f"{where} entry {suffix} rejected: {error}")
    return machinetypes


@dataclasses.dataclass(frozen=True)
class _Cached:
    document: PipeDocument
    mtime: float


def _read_cache(path: str, problems: list[str], where: str) -> Optional[_Cached]:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_DOCUMENT_BYTES + 1)
            mtime = os.fstat(stream.fileno()).st_mtime
    except FileNotFoundError:
        return None
    except OSError as error:
        problems.append(f"{where}: cannot read cache {path}: {error.strerror}")
        return None
    try:
        return _Cached(parse_document(data), mtime)
    except ValueError as error:
        problems.append(f"{where}: ignoring corrupt cache {path}: {error}")
        return None


def _current_document(
    pipe: VacuumPipe, cache_path: str, fetcher: DocumentFetcher, now: float, problems: list[str]
) -> Optional[PipeDocument]:
    where = f"vacuum pipe {pipe.prefix}"
    cached = _read_cache(cache_path, problems, where)
    if cached is not None and now - cached.mtime < cached.document.cache_seconds:
        return cached.document
    try:
        data = fetcher(pipe.vacuum_pipe_url)
        document = parse_document(data)
    # Any failure of any fetcher is reported, never allowed to stop the other pipes or the cycle.
    except Exception as error:
        if cached is None:
            problems.append(
                f"{where}: cannot refresh from {pipe.vacuum_pipe_url} ({error}) and there is no "
                "cached copy: its machinetypes are left out"
            )
            return None
        cached_at = datetime.datetime.fromtimestamp(cached.mtime, datetime.timezone.utc)
        problems.append(
            f"{where}: cannot refresh from {pipe.vacuum_pipe_url} ({error}); still using the copy "
            f"cached at {cached_at:%Y-%m-%d %H:%M:%S}Z"
        )
        return cached.document
    try:
        os.makedirs(os.path.dirname(cache_path), mode=0o755, exist_ok=True)
        atomic_write(cache_path, data)
        os.utime(cache_path, (now, now))
    except OSError as error:
        problems.append(f"{where}: cannot write cache {cache_path}: {error.strerror}")
    return document


def expand_pipes(
    config: Config, fetcher: Optional[DocumentFetcher] = None, now: Optional[float] = None
) -> tuple[Config, list[str]]:
    """``config`` with the machinetypes of every vacuum pipe added, and the problems found.

    ``fetcher`` maps a URL to the document body (default: :func:`fetch_document`); ``now`` is the time for cache expiry. Every problem is
    also logged as a warning. Never raises for anything a pipe server or cache file contains.
    """
    if not config.vacuum_pipes:
        return config, []
    now = time.time() if now is None else now
    fetcher = fetcher if fetcher is not None else fetch_document
    problems: list[str] = []
    machinetypes = dict(config.machinetypes)
    from_pipes: dict[str, str] = {}
    for prefix, pipe in sorted(config.vacuum_pipes.items()):
        if not NAME_PART.fullmatch(prefix) or prefix != pipe.prefix:
            problems.append(f"vacuum pipe {_show(prefix)}: prefix must be 1-32 of a-z, 0-9 and inner -")
            continue
        cache_path = os.path.join(config.settings.state_dir, "pipescache", f"{prefix}.pipe")
        document = _current_document(pipe, cache_path, fetcher, now, problems)
        if document is None:
            continue
        for machinetype in _pipe_machinetypes(config, pipe, document, problems):
            if machinetype.name in from_pipes:
                problems.append(
                    f"vacuum pipe {prefix}: machinetype {machinetype.name} is already defined by "
                    f"vacuum pipe {from_pipes[machinetype.name]}; ignored"
                )
                continue
            from_pipes[machinetype.name] = prefix
            machinetypes[machinetype.name] = machinetype
    for problem in problems:
        log.warning("%s", problem)
    return config.replace(machinetypes=dict(sorted(machinetypes.items()))), problems
