"""The one HTTP(S) client of vac: vacuum pipe documents, user_data templates, root images.

``Fetcher(user_agent=USER_AGENT, ca_dir=None)`` is a requests session
that verifies TLS against the system CAs plus the hashed grid CA directory (STANDARDS.md §E5),
sends one User-Agent and ``Accept-Encoding: identity``, and follows at most ``MAX_REDIRECTS``
redirects itself (so every hop counts against the same deadline).

* ``is_url(text)``: whether ``text`` is an http(s) URL (else a path or file name).
* ``fetchable(url)``: whether a Fetcher would GET ``url`` (http or https, with a host name).
* ``fetcher.get_bytes(url, timeout=, max_bytes=) -> bytes``: the body of a 200 answer; any other
  status, a body over ``max_bytes``, a transfer over ``timeout`` seconds or any network or TLS
  failure raises ``FetchError`` saying which.
* ``with fetcher.open(url, timeout=, idle_timeout=None, headers=None) as reply``: the status and
  headers of the final answer; ``reply.read(max_bytes)`` or ``reply.copy_to(stream, max_bytes)``
  (big files straight to disk) read its body under the same deadline.

``timeout`` is one deadline for the whole fetch, fixed when it starts. A sender cannot stretch
it by dripping bytes: ``iter_content`` and ``read(n)`` keep receiving until they have ``n``
bytes, each receive with a fresh socket timeout, so one byte every few seconds holds them
forever. Here every receive is a single ``read1`` (what has arrived, at most one ``recv``) on a
socket whose timeout is first shrunk to the time remaining. ``idle_timeout`` optionally
abandons a transfer that goes quiet earlier (image downloads may take long, but not silently).
The connection and the status line and headers are bounded by the time remaining when they
start; a server that drips its headers is bounded only by http.client's header limits.
"""

from __future__ import annotations

import functools
import http.client
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, Optional

import requests
import requests.adapters
import urllib3

from vac import __version__

USER_AGENT = f"Vac/{__version__}"
GRID_CA_DIR = "/etc/grid-security/certificates"
MAX_REDIRECTS = 5
CHUNK_BYTES = 1024 * 1024
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """A fetch failed: ``str()`` is "cannot fetch URL: REASON". ``status`` is the HTTP status
    when the server answered with one that was not wanted."""

    def __init__(self, url: str, reason: str, status: Optional[int] = None) -> None:
        super().__init__(f"cannot fetch {url}: {reason}")
        self.url = url
        self.reason = reason
        self.status = status


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def fetchable(url: str) -> bool:
    """Whether ``url`` is one a Fetcher GETs (or follows a redirect to): http or https, with a
    host name."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def grid_ca_dir() -> Optional[str]:
    """The grid CA directory if this host has one."""
    return GRID_CA_DIR if os.path.isdir(GRID_CA_DIR) else None


@functools.lru_cache(maxsize=8)
def _ssl_context(ca_dir: Optional[str]) -> ssl.SSLContext:
    # The system bundle for public web servers plus the IGTF directory for grid ones
    # (a plain requests ``verify=<dir>`` would replace the system bundle instead).
    context = ssl.create_default_context()
    if ca_dir is not None:
        context.load_verify_locations(capath=ca_dir)
    return context


class _ContextAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose TLS connections, direct or through a proxy, use our context."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **kwargs)


class _Deadline:
    """One fetch's deadline, ``timeout`` seconds from its start, and its optional idle timeout."""

    def __init__(self, timeout: float, idle_timeout: Optional[float]) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout
        self.idle_timeout = idle_timeout

    def passed(self, url: str) -> FetchError:
        return FetchError(url, f"took more than {self.timeout:g} s")

    def wait(self, url: str) -> float:
        """How long the next step may wait: the time left, at most the idle timeout. Raises
        FetchError once the deadline has passed."""
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise self.passed(url)
        return remaining if self.idle_timeout is None else min(remaining, self.idle_timeout)


# What reading a body may raise: socket and TLS errors, http.client's (IncompleteRead on a
# broken chunked body), urllib3's and requests' own.
_TRANSFER_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError,
                    requests.RequestException)


class Reply:
    """The final answer of one fetch (after redirects): ``url``, ``status``, ``reason``,
    ``headers`` (case-insensitive); its body is read with ``read`` or ``copy_to``."""

    def __init__(self, response: requests.Response, requested: str, deadline: _Deadline) -> None:
        self._response = response
        self.requested = requested
        self.url = response.url
        self.status = response.status_code
        self.reason = response.reason or ""
        self.headers: Mapping[str, str] = response.headers
        self._deadline = deadline

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._response.close()

    def declared_length(self) -> Optional[int]:
        text = self.headers.get("Content-Length", "")
        return int(text) if text.isdigit() else None

    def chunks(self, max_bytes: Optional[int]) -> Iterator[bytes]:
        """The body as it arrives, checked against ``max_bytes`` and the deadline. ``max_bytes``
        None: no cap (root images, bounded by the deadline and the disk instead)."""
        url = self.requested
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchError(url, f"sent Content-Encoding {encoding!r} although identity was asked")
        declared = self.declared_length()
        if declared is not None and max_bytes is not None and declared > max_bytes:
            raise FetchError(url, f"{declared} bytes is more than the limit of {max_bytes}")
        raw = self._response.raw
        # http.client's response below urllib3's (``_fp``, in urllib3 1.26 as in 2.x): its read1
        # does at most one receive, also for chunked bodies; urllib3 1.26 has no read1.
        body = raw._fp
        sock = raw.connection.sock if raw.connection is not None else None
        received = 0
        while True:
            wait = self._deadline.wait(url)
            try:
                if sock is not None:
                    sock.settimeout(wait)
                chunk = body.read1(CHUNK_BYTES)
            except socket.timeout:
                if time.monotonic() >= self._deadline.at:
                    raise self._deadline.passed(url) from None
                raise FetchError(url, f"sent nothing for {wait:g} s (after {received} bytes)") from None
            except _TRANSFER_ERRORS as error:
                raise FetchError(url, f"failed after {received} bytes: {error!r}") from None
            if not chunk:
                break
            received += len(chunk)
            if max_bytes is not None and received > max_bytes:
                raise FetchError(url, f"sent more than the limit of {max_bytes} bytes")
            yield chunk
        if declared is not None and received != declared:
            raise FetchError(url, f"ended after {received} of its {declared} bytes (incomplete)")

    def read(self, max_bytes: Optional[int]) -> bytes:
        return b"".join(self.chunks(max_bytes))

    def copy_to(self, stream: BinaryIO, max_bytes: Optional[int]) -> int:
        """Write the body to ``stream``; the number of bytes written."""
        size = 0
        for chunk in self.chunks(max_bytes):
            stream.write(chunk)
            size += len(chunk)
        return size


class Fetcher:
    """HTTP(S) GETs with one User-Agent, TLS against the system and grid CAs, and deadlines.

    ``ca_dir``: a hashed CA directory trusted besides the system CAs; None: the grid CA
    directory when this host has one. One Fetcher may be shared by threads (the image cache's
    executor threads share one), as a requests session may for plain GETs.
    """

    def __init__(self, *, user_agent: str = USER_AGENT, ca_dir: Optional[str] = None,
                 max_redirects: int = MAX_REDIRECTS) -> None:
        self.user_agent = user_agent
        self.max_redirects = max_redirects
        self._session = requests.Session()
        adapter = _ContextAdapter(_ssl_context(ca_dir or grid_ca_dir()))
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)  # a redirect may lead from http to https

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    def open(self, url: str, *, timeout: float, idle_timeout: Optional[float] = None,
             headers: Optional[Mapping[str, str]] = None) -> Reply:
        """GET ``url`` and follow redirects; the final answer, whatever its status. Its body
        must be read (or the reply closed) before ``timeout`` seconds from now."""
        deadline = _Deadline(timeout, idle_timeout)
        request_headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity", **(headers or {})}
        current = url
        for _hop in range(self.max_redirects + 1):
            if not fetchable(current):
                raise FetchError(url, f"{current!r} is not an http(s) URL with a host name")
            wait = deadline.wait(url)
            try:
                response = self._session.get(current, headers=request_headers, stream=True,
                                             allow_redirects=False, timeout=(wait, wait))
            except requests.RequestException as error:
                raise FetchError(url, str(error)) from None
            location = response.headers.get("Location")
            if response.status_code not in REDIRECT_STATUSES or not location:
                return Reply(response, url, deadline)
            response.close()
            current = urllib.parse.urljoin(current, location)
        raise FetchError(url, f"more than {self.max_redirects} redirects")

    def get_bytes(self, url: str, *, timeout: float, max_bytes: int) -> bytes:
        """The body of a 200 answer to GET ``url`` (see the module documentation)."""
        with self.open(url, timeout=timeout) as reply:
            if reply.status != 200:
                raise FetchError(url, f"HTTP {reply.status} {reply.reason}".rstrip(), reply.status)
            return reply.read(max_bytes)
