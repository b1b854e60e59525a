"""Converters from configuration text to typed values, shared by every configuration schema
(vac's in vac.core.schema, vcycle's in vac.core.vcycleconfig).

A converter takes the text of one option and returns its typed value, or raises ``ValueError``
whose message says what is wrong with the text (the loader puts the file, line, section and
option in front). A converter may return ``WithWarning(value, message)`` for a value that is
accepted but deserves a warning. Functions named like ``integer(1)`` build a converter; the others
are converters. ``http_base_url`` goes the other way: the one place a URL is made from a
configured host and port.

Pure: the standard library only.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from typing import Any, Callable, Optional

Converter = Callable[[str], Any]

_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_DNS_LABEL}(?:\.{_DNS_LABEL})*\Z", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_HOST_PORT = re.compile(r"[a-z0-9.-]+:([0-9]+)\Z")
BOOLEANS = {"yes": True, "true": True, "on": True, "1": True,
            "no": False, "false": False, "off": False, "0": False}


class WithWarning:
    """A converted value that also deserves a warning (a legacy spelling, say)."""

    def __init__(self, value: Any, warning: str) -> None:
        self.value = value
        self.warning = warning


def any_text(text: str) -> str:
    return text


def integer(minimum: Optional[int] = None, maximum: Optional[int] = None) -> Converter:
    """Decimal integers within [minimum, maximum] (either bound optional)."""
    def convert(text: str) -> int:
        if not _INTEGER.match(text):
            raise ValueError(f"{text!r} is not an integer")
        value = int(text)
        if minimum is not None and value < minimum:
            raise ValueError(f"{text!r} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{text!r} must be at most {maximum}")
        return value

    return convert


def number(minimum: float = 0.0, *, allow_minimum: bool = False) -> Converter:
    """Finite numbers above ``minimum`` (or from it, with ``allow_minimum``)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        if value < minimum or (value == minimum and not allow_minimum):
            raise ValueError(f"{text!r} must be {'at least' if allow_minimum else 'greater than'} {minimum:g}")
        return value

    return convert


def any_number(text: str) -> float:
    return number(-math.inf)(text)


def boolean(text: str) -> bool:
    try:
        return BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a boolean (use yes/no, true/false, on/off or 1/0)") from None


def one_of(*choices: str) -> Converter:
    """Exactly one of ``choices``."""
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return convert


def matching(pattern: re.Pattern, what: str) -> Converter:
    """Text matching ``pattern``; ``what`` describes it in the error ("a device name")."""
    def convert(text: str) -> str:
        if not pattern.match(text):
            raise ValueError(f"{text!r} is not {what}")
        return text

    return convert


def words(convert_word: Converter) -> Converter:
    """A tuple of whitespace-separated words, each converted by ``convert_word``."""
    def convert(text: str) -> tuple:
        return tuple(convert_word(word) for word in text.split())

    return convert


def absolute_path(text: str) -> str:
    if not text.startswith("/") or "\0" in text:
        raise ValueError(f"{text!r} is not an absolute path")
    return text


def file_name(text: str) -> str:
    if not text or "/" in text or text in (".", "..") or "\0" in text:
        raise ValueError(f"{text!r} is not a plain file name (no /)")
    return text


def http_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return text


DEFAULT_PORTS = {"http": 80, "https": 443}


def http_base_url(scheme: str, host: str, port: int) -> str:
    """``scheme://host[:port]``, as a client would write it: an IPv6 address in brackets, no
    port when it is the scheme's default (``scheme`` is http or https)."""
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}" if port == DEFAULT_PORTS[scheme] else f"{scheme}://{netloc}:{port}"


def ip_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def ip_address_or_all(text: str) -> str:
    """An IP address, or "" for all interfaces."""
    return ip_address(text) if text else ""


def parse_port(text: str) -> int:
    return integer(1, 65535)(text)


def listen_port(text: str) -> int:
    return integer(0, 65535)(text)  # 0: any free port (tests, several daemons on one host)


def dns_name(text: str) -> str:
    if not DNS_NAME.match(text):
        raise ValueError(f"{text!r} is not a valid DNS name (letters, digits, - and .)")
    return text


def host_name(text: str) -> str:
    """A DNS name, lower-cased, without a trailing dot."""
    return dns_name(text.lower().rstrip("."))


def host_port(text: str) -> str:
    text = text.lower()
    match = _HOST_PORT.match(text)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"{text!r} is not host.domain:port")
    return text
