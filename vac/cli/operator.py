"""Operator actions behind ``vac drain``, ``vac undrain`` and ``vac squid-conf``.

Draining writes ``[settings] draining = yes`` (and ``shutdown_time`` for a deadline) into the
run-time configuration file (``/run/vac.conf``), which is read after ``/etc/vac.d`` and
``/etc/vac.conf`` and vanishes at reboot. The file is edited line by line so that anything else
in it (other run-time overrides, comments) survives, and replaced atomically.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional

from vac.core.config import FactoryAddress
from vac.records.store import atomic_write

SETTINGS_SECTION = "settings"

_RELATIVE_TIME = re.compile(r"^\+(\d+)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class OpsError(Exception):
    """An operator action cannot be carried out; the message says why."""


def parse_time(text: str, now: float) -> int:
    """Unix seconds for TIME: Unix seconds, ``+N[smhd]`` from now, or ISO 8601 (local time
    unless a zone is given, e.g. ``2026-03-01 18:00`` or ``2026-03-01T18:00+00:00``).

    Raises OpsError for anything else and for times not in the future.
    """
    text = text.strip()
    relative = _RELATIVE_TIME.match(text)
    if text.isdigit():
        moment = int(text)
    elif relative:
        moment = int(now) + int(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
    else:
        try:
            moment = int(datetime.datetime.fromisoformat(text).timestamp())
        except ValueError:
            raise OpsError(
                f"cannot understand time {text!r}: give Unix seconds, +N[smhd] or YYYY-MM-DD HH:MM[:SS][+ZONE]"
            ) from None
    if moment <= now:
        raise OpsError(f"time {text!r} is not in the future")
    return moment


def _section_header(line: str) -> Optional[str]:
    stripped = line.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        return stripped[1:-1].strip()
    return None


def _option_name(line: str) -> Optional[str]:
    """The (lower-case, as configparser sees it) option a line assigns, or None."""
    if not line.strip() or line[0].isspace() or line.lstrip()[0] in "#;":
        return None
    separator = min((index for index in (line.find("="), line.find(":")) if index > 0), default=-1)
    return line[:separator].strip().lower() if separator > 0 else None


def edit_settings(text: str, changes: Mapping[str, Optional[str]]) -> str:
    """``text`` with options of every ``[settings]`` section set (value) or removed (None).

    Existing assignments of the changed options (with their continuation lines) are removed;
    new values go right after the first ``[settings]`` header, or into a new section at the end.
    """
    kept: list[str] = []
    section = None
    skipping_continuation = False
    for line in text.splitlines():
        header = _section_header(line)
        if header is not None:
            section, skipping_continuation = header, False
        elif skipping_continuation and line.strip() and line[0].isspace():
            continue
        else:
            skipping_continuation = False
            if section == SETTINGS_SECTION and _option_name(line) in changes:
                skipping_continuation = True
                continue
        kept.append(line)
    assignments = [f"{option} = {value}" for option, value in changes.items() if value is not None]
    if assignments:
        headers = [index for index, line in enumerate(kept) if _section_header(line) == SETTINGS_SECTION]
        if headers:
            kept[headers[0] + 1 : headers[0] + 1] = assignments
        else:
            if kept and kept[-1].strip():
                kept.append("")
            kept += [f"[{SETTINGS_SECTION}]", *assignments]
    return "\n".join(kept) + "\n" if kept else ""


def _has_content(text: str) -> bool:
    """True if anything but section headers and blank lines is left."""
    return any(line.strip() and _section_header(line) is None for line in text.splitlines())


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as error:
        raise OpsError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from error


def set_draining(path: str, shutdown_time: Optional[int] = None) -> None:
    """Write ``draining = yes`` (and ``shutdown_time``, if given) into the run-time file."""
    changes: dict[str, Optional[str]] = {"draining": "yes"}
    if shutdown_time is not None:
        changes["shutdown_time"] = str(shutdown_time)
    target = Path(path)
    try:
        atomic_write(target, edit_settings(_read(target), changes))
    except OSError as error:
        raise OpsError(f"cannot write {target}: {error.strerror}") from error


def clear_draining(path: str) -> bool:
    """Remove ``draining`` and ``shutdown_time`` from the run-time file; True if it changed.

    The file is deleted when nothing but empty sections would be left.
    """
    target = Path(path)
    original = _read(target)
    edited = edit_settings(original, {"draining": None, "shutdown_time": None})
    if edited == original:
        return False
    try:
        if _has_content(edited):
            atomic_write(target, edited)
        else:
            target.unlink()
    except OSError as error:
        raise OpsError(f"cannot write {target}: {error.strerror}") from error
    return True


def unique_paths(paths: Iterable[str]) -> list[str]:
    """Paths without duplicates through symbolic links (/var/run is usually /run)."""
    seen, unique = set(), []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def resolve_factory(factory: FactoryAddress) -> str:
    """The IP address of a factory: its explicit address, else its name, resolved (IPv4 first)."""
    host = factory.address or factory.name
    try:
        results = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as error:
        raise OpsError(f"cannot resolve factory {factory.name} ({host}): {error}") from error
    addresses = [result[4][0] for result in results]
    return next((address for address in addresses if ":" not in address), addresses[0])


def squid_conf(template: str, factories: Sequence[tuple[str, str]], own_name: str) -> str:
    """The template plus ``acl localnet`` for every factory and ``cache_peer`` for the others.

    ``factories``: (name, IP address) pairs, in configuration order.
    """
    lines = [template.rstrip("\n"), "", "# Added by vac squid-conf: the factories of this space"]
    for _, address in factories:
        prefix = ipaddress.ip_address(address).max_prefixlen
        lines.append(f"acl localnet src {address}/{prefix}")
    for name, address in factories:
        if name.lower() != own_name.lower():
            lines.append(f"cache_peer {address} sibling 3128 3130 default")
    return "\n".join(lines) + "\n"


def write_if_changed(path: str, text: str) -> bool:
    """Atomically replace ``path`` with ``text`` unless it already holds exactly that."""
    target = Path(path)
    try:
        if target.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass  # absent or unreadable: write it
    atomic_write(target, text)
    return True


def describe_time(moment: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(moment))
