"""Root images: local paths, and http(s) URLs cached with If-Modified-Since (REFERENCE.md §6.6).

``ImageCache(cache_dir, user_agent=USER_AGENT, ca_path=None, timeout=60.0, max_bytes=None,
max_seconds=3600.0).get(url) -> Path`` checks the URL at every call with a conditional GET
through vac.content.fetch (TLS against the system and grid CAs, one User-Agent, one deadline):

* 200: the body is streamed to a temporary file in the cache directory, fsynced, given the
  server's ``Last-Modified`` as its mtime (so the next ``If-Modified-Since`` is the server's own
  clock) and renamed over the cached copy: a half-written image is never used.
* 304: the cached copy is current.
* anything else (404, 5xx, timeouts, refused connections, TLS errors, an image over
  ``max_bytes``, a download over ``max_seconds`` or silent for ``timeout``): a good cached copy
  is kept and used, with a warning saying why; without one ``ImageError`` says what failed.

Threads asking for the same URL at once share one check (per-URL lock): the daemon calls
``get`` from an executor. ``resolve_root_image(machinetype, cache)`` maps ``root_image`` to a
file: an absolute path, a name under ``<machinetype_path>/files/`` or a cached URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import hashlib
import logging
import os
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Optional, Union

from vac.content.fetch import USER_AGENT, Fetcher, FetchError, Reply, fetchable, is_url
from vac.core.config import Machinetype

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds to connect, and longest silence during a download
DEFAULT_MAX_SECONDS = 3600.0  # one download, start to end, however the server paces it
TEMPORARY_PREFIX = ".download-"
MAX_NAME_LENGTH = 240  # file names are at most 255 bytes


class ImageError(Exception):
    """No usable image; the message says which and why."""


def check_url(url: str) -> None:
    if not fetchable(url):
        raise ImageError(f"{url!r} is not an http(s) URL with a host name")


def cache_file_name(url: str) -> str:
    """The classic name (the URL percent-encoded, nothing kept), or a hash if that is too long."""
    name = urllib.parse.quote(url, safe="")
    if len(name) <= MAX_NAME_LENGTH:
        return name
    return "sha256-" + hashlib.sha256(url.encode("utf-8")).hexdigest()


def _http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def _parse_http_date(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class _DownloadFailed(Exception):
    pass


@dataclasses.dataclass
class _Check:
    """The latest check of one URL; threads that waited for it share its outcome."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    finished: Optional[float] = None  # time.monotonic() when the latest check ended
    path: Optional[Path] = None
    error: Optional[str] = None


class ImageCache:
    """Images from http(s) URLs, cached under ``cache_dir`` (see the module documentation)."""

    def __init__(self, cache_dir: Union[str, Path], user_agent: str = USER_AGENT,
                 ca_path: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
                 max_bytes: Optional[int] = None, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        """``ca_path`` None: the grid CA directory if present. ``timeout``: to connect and the
        longest silence. ``max_seconds``: one download's deadline. ``max_bytes``: optional cap."""
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self._fetcher = Fetcher(user_agent=user_agent, ca_dir=ca_path)
        self._checks: dict[str, _Check] = {}
        self._checks_lock = threading.Lock()
        self.cache_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._remove_stale_downloads()

    def path_for(self, url: str) -> Path:
        return self.cache_dir / cache_file_name(url)

    def get(self, url: str) -> Path:
        """The cached file of ``url`` after checking the server; ImageError if nothing usable."""
        check_url(url)
        with self._checks_lock:
            check = self._checks.setdefault(url, _Check())
        arrived = time.monotonic()
        with check.lock:
            if check.finished is not None and check.finished > arrived:
                # Another thread checked while we waited for the lock: share its outcome.
                if check.error is not None:
                    raise ImageError(check.error)
                assert check.path is not None
                return check.path
            try:
                check.path, check.error = self._refresh(url), None
            except ImageError as error:
                check.path, check.error = None, str(error)
                raise
            finally:
                check.finished = time.monotonic()
            return check.path

    def close(self) -> None:
        self._fetcher.close()

    # -- one check ---------------------------------------------------------------------------

    def _refresh(self, url: str) -> Path:
        target = self.path_for(url)
        cached_mtime: Optional[float] = None
        with contextlib.suppress(FileNotFoundError):
            if target.is_file():
                cached_mtime = target.stat().st_mtime
        headers = {}
        if cached_mtime is not None:
            headers["If-Modified-Since"] = _http_date(cached_mtime)
        try:
            reply = self._fetcher.open(url, timeout=self.max_seconds, idle_timeout=self.timeout,
                                       headers=headers)
        except FetchError as error:
            return self._fall_back(url, target, cached_mtime, error.reason)
        with reply:
            if reply.status == 304 and cached_mtime is not None:
                log.debug("image %s not modified since %s", url, _http_date(cached_mtime))
                return target
            if reply.status != 200:
                return self._fall_back(url, target, cached_mtime, f"HTTP {reply.status} {reply.reason}".rstrip())
            try:
                size, last_modified = self._download(reply, target)
            except _DownloadFailed as error:
                return self._fall_back(url, target, cached_mtime, str(error))
        log.info("downloaded image %s (%d bytes, Last-Modified %s) to %s", url, size,
                 _http_date(last_modified), target)
        return target

    def _fall_back(self, url: str, target: Path, cached_mtime: Optional[float], reason: str) -> Path:
        if cached_mtime is None:
            raise ImageError(f"cannot get image {url}: {reason}; there is no cached copy")
        log.warning("cannot check image %s (%s): using the cached copy %s (Last-Modified %s)",
                    url, reason, target, _http_date(cached_mtime))
        return target

    def _download(self, reply: Reply, target: Path) -> tuple[int, float]:
        """Stream the body into place; (bytes, mtime given). _DownloadFailed leaves no trace."""
        last_modified = _parse_http_date(reply.headers.get("Last-Modified"))
        if last_modified is None:
            log.warning("image %s has no valid Last-Modified header: it will be downloaded again "
                        "at every check", reply.url)
            last_modified = time.time()
        fd, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=TEMPORARY_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as part:
                size = reply.copy_to(part, self.max_bytes)
                part.flush()
                os.fchmod(part.fileno(), 0o644)
                os.fsync(part.fileno())
            os.utime(temporary, (last_modified, last_modified))
            os.replace(temporary, target)
        except FetchError as error:
            os.unlink(temporary)
            raise _DownloadFailed(error.reason) from error
        except OSError as error:
            os.unlink(temporary)
            raise _DownloadFailed(f"cannot store the download in {self.cache_dir}: {error}") from error
        except BaseException:
            os.unlink(temporary)
            raise
        return size, last_modified

    def _remove_stale_downloads(self) -> None:
        """Remove temporary files of downloads that died with their process."""
        quiet_since = time.time() - max(3600.0, 2 * self.timeout)
        for path in self.cache_dir.glob(TEMPORARY_PREFIX + "*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < quiet_since:
                    path.unlink()
                    log.info("removed the abandoned partial download %s", path)


def resolve_root_image(machinetype: Machinetype, cache: Optional[ImageCache]) -> Path:
    """The file of ``machinetype.root_image``: absolute path, ``<machinetype_path>/files/<name>``
    (also for cernvm3, where the classic factory got this wrong) or an http(s) URL via ``cache``."""
    image = machinetype.root_image
    if not image:
        raise ImageError(f"machinetype {machinetype.name} has no root_image")
    if is_url(image):
        if cache is None:
            raise ImageError(f"machinetype {machinetype.name}: no image cache for {image}")
        return cache.get(image)
    if "://" in image:
        raise ImageError(f"machinetype {machinetype.name}: root_image {image!r} has an unsupported scheme")
    if os.path.isabs(image):
        path = Path(image)
    else:
        if ".." in Path(image).parts:
            raise ImageError(f"machinetype {machinetype.name}: root_image {image!r} leaves the files directory")
        path = Path(machinetype.machinetype_path) / "files" / image
    if not path.is_file():
        raise ImageError(f"machinetype {machinetype.name}: root_image {path} is not a readable file")
    return path
