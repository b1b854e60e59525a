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
checked by the machinetype schema of configuration files in its stricter remote mode
(vac.core.schema): by JSON type and by pattern, file names cannot contain ``/`` or start with
``.`` or ``-``, URLs must be http(s) with no ``..`` segment, no whitespace and no loopback or
link-local host, images are URLs, /cvmfs/ paths, files of the machinetype directory or (for the
docker/podman models) ``docker://`` image references whose registry is held to the URL host
rules, numbers have upper bounds, ``tmp_binds`` may not cover vac's own binds. The container
models are checked as in files (a ``docker://`` image for docker/podman only, singularity and
apptainer only where ``singularity_user`` is set); their commands and paths are argv elements,
never shell text. An entry with any bad value is rejected whole, with the reason logged; a
half-configured machinetype is never run. Unknown keys, and options a pipe may not set
(``machinegroup``, ``machines_dir_days``), are logged and ignored.

The last good document is cached atomically in ``<state_dir>/pipescache/PREFIX.pipe`` and
refetched once it is older than its ``cache_seconds``. When a refresh fails (server down, bad
JSON) the cached copy goes on being used however old it is, so the pipe's machinetypes never
vanish from the configuration (a classic defect that lost accounting of running machines).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import time
from typing import Any, Callable, Optional

from vac.content import fetch
from vac.core import schema
from vac.core.config import Config, Machinetype, Settings, VacuumPipe
from vac.core.schema import MACHINETYPE_PREFIXES, MACHINETYPE_SCHEMA, json_type, show
from vac.records.store import atomic_write

log = logging.getLogger(__name__)

DocumentFetcher = Callable[[str], bytes]  # URL -> document body; raises fetch.FetchError (or OSError)

FETCH_TIMEOUT_SECONDS = 30.0
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_ENTRIES = 100
DEFAULT_CACHE_SECONDS = 3600.0
MIN_CACHE_SECONDS = 60.0  # a pipe cannot make every factory poll its server every cycle
MAX_CACHE_SECONDS = 7 * 86400.0

NAME_PART = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")


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
        raise ValueError(f"document is {json_type(value)}, not a JSON object")
    if "machinetypes" not in value:
        raise ValueError("document has no \"machinetypes\" array")
    entries = value["machinetypes"]
    if not isinstance(entries, list):
        raise ValueError(f"\"machinetypes\" is {json_type(entries)}, not an array")
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"document lists {len(entries)} machinetypes, more than {MAX_ENTRIES}")
    cache_seconds = value.get("cache_seconds", DEFAULT_CACHE_SECONDS)
    if isinstance(cache_seconds, bool) or not isinstance(cache_seconds, (int, float)):
        raise ValueError(f"\"cache_seconds\" is {json_type(cache_seconds)}, not a number")
    cache_seconds = min(max(float(cache_seconds), MIN_CACHE_SECONDS), MAX_CACHE_SECONDS)
    return PipeDocument(cache_seconds=cache_seconds, entries=tuple(entries))


# --- values --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Options:
    """Checked options of one layer: Machinetype fields plus user_data option/file pairs."""

    fields: dict = dataclasses.field(default_factory=dict)
    user_data_options: dict = dataclasses.field(default_factory=dict)
    user_data_files: dict = dataclasses.field(default_factory=dict)


class _Rejected(Exception):
    pass


def _check_options(pairs: Any, *, from_pipe: bool, where: str, problems: list[str]) -> _Options:
    """Check every key and value by the schema's remote mode; a bad value raises _Rejected.
    Unknown keys are reported and ignored, and so are those a pipe document may not set
    (``from_pipe``; a ``[vacuum_pipe]`` section may)."""
    checked = _Options()
    for key, value in pairs:
        if not isinstance(key, str) or len(key) > 128:
            problems.append(f"{where}: ignored key {show(key)}")
            continue
        prefix = next((p for p in MACHINETYPE_PREFIXES if key.startswith(p)), None)
        spec = MACHINETYPE_SCHEMA.get(key)
        try:
            if prefix is not None:
                suffix = key[len(prefix):]
                getattr(checked, MACHINETYPE_PREFIXES[prefix])[suffix] = schema.remote_pair_value(prefix, suffix, value)
            elif spec is None:
                problems.append(f"{where}: ignored unknown key {show(key)}")
            elif from_pipe and not spec.remote_allowed:
                problems.append(f"{where}: ignored {show(key)}: not accepted from a vacuum pipe")
            else:
                checked.fields[key] = schema.remote_option_value(key, value, local_only=not from_pipe)
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
    problem = schema.container_model_problem(machinetype.machine_model, machinetype.root_image,
                                             settings.singularity_user)
    if problem is not None:
        raise _Rejected(f"machine_model and root_image: {problem}")
    for low, _, message in schema.order_problems(lambda option: getattr(machinetype, option)):
        raise _Rejected(f"{low}: {message}")
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
    accepted: list[tuple[int, str, _Options]] = []
    suffixes: set[str] = set()
    for index, entry in enumerate(document.entries):
        label = f"{where} entry {index}"
        try:
            if not isinstance(entry, dict):
                raise _Rejected(f"is {json_type(entry)}, not an object")
            suffix = entry.get("suffix")
            if not isinstance(suffix, str) or not NAME_PART.fullmatch(suffix):
                raise _Rejected(f"suffix must be 1-32 of a-z, 0-9 and inner -, not {show(suffix)}")
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
        accepted.append((index, suffix, options))

    total = sum(options.fields.get("target_share", 0.0) for _, _, options in accepted)
    if accepted and pipe.target_share > 0 and total <= 0:
        problems.append(f"{where}: no entry has a positive target_share, so none will be created")
    path = os.path.join(config.settings.state_dir, "machinetypes", pipe.prefix)
    machinetypes = []
    for index, suffix, options in accepted:
        name = f"{pipe.prefix}-{suffix}"
        share = pipe.target_share * options.fields.get("target_share", 0.0) / total if total > 0 else 0.0
        local = config.machinetypes.get(name)
        local_fields = _locally_set(config, local) if local is not None else set()
        try:
            machinetypes.append(
                _build_machinetype(name, path, options, section, share, config.settings, local, local_fields)
            )
        except _Rejected as error:
            problems.append(f"{where} entry {index} ({suffix}) rejected: {error}")
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
            problems.append(f"vacuum pipe {show(prefix)}: prefix must be 1-32 of a-z, 0-9 and inner -")
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
