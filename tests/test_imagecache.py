"""The image cache against a real HTTP(S) server on 127.0.0.1: conditional GETs, failures with
and without a cached copy, slow, huge, truncated and redirected downloads, shared checks,
TLS verification against a hashed CA directory; and resolve_root_image.

"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.localhttp import LAST_MODIFIED, LocalHTTPServer, Route, tls_server_context
from vac.content import imagecache
from vac.content.imagecache import ImageCache, ImageError, resolve_root_image
from vac.core.config import Machinetype

USER_AGENT = "Vac/test"


@pytest.fixture
def server():
    local = LocalHTTPServer()
    yield local
    local.close()


@pytest.fixture
def cache(tmp_path):
    images = ImageCache(tmp_path / "imagecache", USER_AGENT, ca_path=str(tmp_path), timeout=1.0)
    yield images
    images.close()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG, logger="vac.content.imagecache")
    return caplog


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def leftovers(cache: ImageCache) -> list[str]:
    return sorted(path.name for path in cache.cache_dir.iterdir() if path.name.startswith("."))


pytestmark = pytest.mark.component


# -- conditional GET ---------------------------------------------------------------------------


def test_download_then_not_modified_then_new_version(server, cache, logs):
    server.routes["/image.iso"] = Route(body=b"version 1" * 1000)
    url = server.url("/image.iso")
    path = cache.get(url)
    port = server.httpd.server_address[1]
    assert path == cache.cache_dir / f"http%3A%2F%2F127.0.0.1%3A{port}%2Fimage.iso"  # classic name
    assert path.read_bytes() == b"version 1" * 1000
    assert path.stat().st_mtime == LAST_MODIFIED
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert logs.messages == [f"downloaded image {url} (9000 bytes, Last-Modified {http_date(LAST_MODIFIED)}) to {path}"]
    _, headers = server.requests[0]
    assert "If-Modified-Since" not in headers
    assert headers["User-Agent"] == USER_AGENT and headers["Accept-Encoding"] == "identity"

    logs.clear()
    assert cache.get(url) == path
    assert server.requests[1][1]["If-Modified-Since"] == http_date(LAST_MODIFIED)
    assert logs.messages == [f"image {url} not modified since {http_date(LAST_MODIFIED)}"]
    assert path.read_bytes() == b"version 1" * 1000

    server.routes["/image.iso"] = Route(body=b"version 2", last_modified=LAST_MODIFIED + 3600)
    assert cache.get(url) == path
    assert path.read_bytes() == b"version 2" and path.stat().st_mtime == LAST_MODIFIED + 3600
    assert leftovers(cache) == []


@pytest.mark.parametrize("route, reason", [
    (Route(status=404), "HTTP 404 Not Found"),
    (Route(status=500), "HTTP 500 Internal Server Error"),
    (Route(status=503), "HTTP 503 Service Unavailable"),
])
def test_failed_check_uses_the_cached_copy_and_says_so(server, cache, logs, route, reason):
    server.routes["/image"] = Route(body=b"good image")
    url = server.url("/image")
    path = cache.get(url)
    server.routes["/image"] = route
    logs.clear()
    assert cache.get(url) == path
    assert path.read_bytes() == b"good image"
    assert logs.messages == [f"cannot check image {url} ({reason}): using the cached copy {path} "
                             f"(Last-Modified {http_date(LAST_MODIFIED)})"]
    assert [record.levelname for record in logs.records] == ["WARNING"]


@pytest.mark.parametrize("route, reason", [
    (Route(status=404), "HTTP 404 Not Found"),
    (Route(status=500), "HTTP 500 Internal Server Error"),
    (Route(status=304), "HTTP 304 Not Modified"),  # a broken server: we asked for no condition
])
def test_failed_check_without_a_copy_is_a_clear_error(server, cache, route, reason):
    server.routes["/image"] = route
    url = server.url("/image")
    with pytest.raises(ImageError) as error:
        cache.get(url)
    assert str(error.value) == f"cannot get image {url}: {reason}; there is no cached copy"
    assert list(cache.cache_dir.iterdir()) == []


def test_refused_connection(tmp_path, cache):
    closed = LocalHTTPServer()
    url = closed.url("/image")
    closed.close()
    with pytest.raises(ImageError, match=rf"cannot get image {re.escape(url)}: .*Connection refused"):
        cache.get(url)


# -- slow, huge, truncated, redirected ---------------------------------------------------------


def test_server_that_stalls_before_answering_times_out(server, cache, logs):
    server.routes["/image"] = Route(body=b"good image")
    url = server.url("/image")
    path = cache.get(url)
    server.routes["/image"] = Route(body=b"new", last_modified=LAST_MODIFIED + 1, delay=5)
    logs.clear()
    started = time.monotonic()
    assert cache.get(url) == path
    assert time.monotonic() - started < 4
    [message] = logs.messages
    assert re.fullmatch(rf"cannot check image {re.escape(url)} \(.*Read timed out.*\): "
                        rf"using the cached copy {re.escape(str(path))} \(Last-Modified .*\)", message)
    assert path.read_bytes() == b"good image"


def test_download_that_stalls_midway_leaves_the_good_copy_untouched(server, cache, logs):
    server.routes["/image"] = Route(body=b"good image")
    url = server.url("/image")
    path = cache.get(url)
    server.routes["/image"] = Route(body=b"x" * 100_000, last_modified=LAST_MODIFIED + 1, stall_after=50_000)
    logs.clear()
    assert cache.get(url) == path
    [message] = logs.messages
    assert re.fullmatch(rf"cannot check image {re.escape(url)} \(sent nothing for 1 s \(after 50000 bytes\)\): "
                        rf"using the cached copy .*", message)
    assert path.read_bytes() == b"good image" and path.stat().st_mtime == LAST_MODIFIED
    assert leftovers(cache) == []


def test_download_slower_than_max_seconds_is_abandoned(server, tmp_path):
    cache = ImageCache(tmp_path / "c", USER_AGENT, ca_path=str(tmp_path), timeout=1.0, max_seconds=0.2)
    server.routes["/trickle"] = Route(body=b"y" * (3 * 1024 * 1024), piece_delay=0.01)
    url = server.url("/trickle")
    with pytest.raises(ImageError) as error:
        cache.get(url)
    assert str(error.value) == f"cannot get image {url}: took more than 0.2 s; there is no cached copy"
    assert list(cache.cache_dir.iterdir()) == []


@pytest.mark.parametrize("declared, reason", [
    (None, "5000 bytes is more than the limit of 1000"),
    (-1, "sent more than the limit of 1000 bytes"),  # no Content-Length: counted while streaming
])
def test_huge_image_is_refused(server, tmp_path, declared, reason):
    cache = ImageCache(tmp_path / "c", USER_AGENT, ca_path=str(tmp_path), timeout=1.0, max_bytes=1000)
    server.routes["/huge"] = Route(body=b"z" * 5000, declared_length=declared)
    url = server.url("/huge")
    with pytest.raises(ImageError) as error:
        cache.get(url)
    assert str(error.value) == f"cannot get image {url}: {reason}; there is no cached copy"
    assert list(cache.cache_dir.iterdir()) == []


def test_truncated_download_is_never_used(server, cache):
    server.routes["/image"] = Route(body=b"a" * 500, declared_length=1000)
    url = server.url("/image")
    with pytest.raises(ImageError, match=r"ended after 500 of its 1000 bytes \(incomplete\)"):
        cache.get(url)
    assert list(cache.cache_dir.iterdir()) == []


def test_redirect_is_followed_and_cached_under_the_configured_url(server, cache):
    server.routes["/image"] = Route(body=b"real image")
    server.routes["/latest"] = Route(status=302, headers={"Location": "/image"}, last_modified=None)
    url = server.url("/latest")
    path = cache.get(url)
    assert path == cache.path_for(url) and path.read_bytes() == b"real image"
    assert server.paths() == ["/latest", "/image"]


def test_redirect_loop_is_an_error(server, cache):
    server.routes["/loop"] = Route(status=302, headers={"Location": "/loop"}, last_modified=None)
    with pytest.raises(ImageError, match="more than 5 redirects"):
        cache.get(server.url("/loop"))
    assert server.paths() == ["/loop"] * 6


def test_missing_last_modified_is_accepted_with_a_warning(server, cache, logs):
    server.routes["/image"] = Route(body=b"data", last_modified=None)
    url = server.url("/image")
    before = time.time()
    path = cache.get(url)
    assert path.read_bytes() == b"data" and path.stat().st_mtime >= int(before)
    assert logs.messages[0] == (f"image {url} has no valid Last-Modified header: it will be "
                                "downloaded again at every check")


# -- sharing and housekeeping ------------------------------------------------------------------


@pytest.mark.parametrize("route, ok", [(Route(body=b"shared", delay=0.5), True),
                                       (Route(status=500, delay=0.5), False)])
def test_concurrent_requests_for_one_url_share_one_check(server, cache, route, ok):
    server.routes["/image"] = route
    url = server.url("/image")
    barrier = threading.Barrier(6)
    outcomes = []

    def fetch() -> None:
        barrier.wait(5)
        try:
            outcomes.append(cache.get(url))
        except ImageError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert server.paths() == ["/image"]
    expected = cache.path_for(url) if ok else f"cannot get image {url}: HTTP 500 Internal Server Error; there is no cached copy"
    assert outcomes == [expected] * 6


def test_later_requests_check_again(server, cache):
    server.routes["/image"] = Route(body=b"data")
    url = server.url("/image")
    cache.get(url)
    cache.get(url)
    assert server.paths() == ["/image", "/image"]


def test_abandoned_partial_downloads_are_removed_at_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vac.content.imagecache")
    directory = tmp_path / "imagecache"
    directory.mkdir()
    old, recent = directory / ".download-old.part", directory / ".download-new.part"
    old.write_bytes(b"half")
    recent.write_bytes(b"in progress")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    ImageCache(directory, USER_AGENT, ca_path=str(tmp_path)).close()
    assert not old.exists() and recent.exists()
    assert caplog.messages == [f"removed the abandoned partial download {old}"]


def test_only_http_urls(cache):
    for url in ("ftp://example.org/image", "file:///etc/passwd", "http:///nohost"):
        with pytest.raises(ImageError, match="is not an http\\(s\\) URL with a host name"):
            cache.get(url)


def test_cache_file_names():
    assert imagecache.cache_file_name("https://a.org/x.iso") == "https%3A%2F%2Fa.org%2Fx.iso"
    long_name = imagecache.cache_file_name("https://a.org/" + "x" * 300)
    assert re.fullmatch(r"sha256-[0-9a-f]{64}", long_name)


# -- TLS against a hashed CA directory ---------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to hash the CA directory")
    context, ca_dir = tls_server_context(tmp_path)
    local = LocalHTTPServer(tls_context=context)
    local.ca_dir = ca_dir
    yield local
    local.close()


def test_https_is_verified_against_the_grid_ca_directory(tls_server, tmp_path):
    tls_server.routes["/image"] = Route(body=b"secure image")
    url = tls_server.url("/image")
    trusted = ImageCache(tmp_path / "trusted", USER_AGENT, ca_path=str(tls_server.ca_dir), timeout=2.0)
    assert trusted.get(url).read_bytes() == b"secure image"
    empty = tmp_path / "empty-ca-dir"
    empty.mkdir()
    untrusted = ImageCache(tmp_path / "untrusted", USER_AGENT, ca_path=str(empty), timeout=2.0)
    with pytest.raises(ImageError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.get(url)
    assert list(untrusted.cache_dir.iterdir()) == []


# -- resolve_root_image ------------------------------------------------------------------------


def machinetype_with(tmp_path: Path, root_image: Optional[str], model: str = "cernvm3") -> Machinetype:
    files = tmp_path / "machinetypes" / "lhcb" / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "cernvm.iso").write_bytes(b"iso")
    return Machinetype(name="lhcb", root_image=root_image, machine_model=model,
                       machinetype_path=str(tmp_path / "machinetypes" / "lhcb"))


@pytest.mark.parametrize("model", ["cernvm3", "cernvm4", "vm-raw"])
def test_relative_root_image_is_under_the_files_directory(tmp_path, model):
    # Classic cernvm3 looked in <root_image>/files/<root_image> instead.
    machinetype = machinetype_with(tmp_path, "cernvm.iso", model)
    assert resolve_root_image(machinetype, None) == tmp_path / "machinetypes/lhcb/files/cernvm.iso"


def test_absolute_and_url_root_images(tmp_path, server, cache):
    image = tmp_path / "abs.img"
    image.write_bytes(b"img")
    assert resolve_root_image(machinetype_with(tmp_path, str(image)), None) == image
    server.routes["/i"] = Route(body=b"remote")
    assert resolve_root_image(machinetype_with(tmp_path, server.url("/i")), cache).read_bytes() == b"remote"


@pytest.mark.parametrize("root_image, message", [
    (None, "machinetype lhcb has no root_image"),
    ("../../../etc/passwd", "root_image '../../../etc/passwd' leaves the files directory"),
    ("missing.iso", "root_image .*/files/missing.iso is not a readable file"),
    ("/nonexistent/x.img", "root_image /nonexistent/x.img is not a readable file"),
    ("docker://centos", "root_image 'docker://centos' has an unsupported scheme"),
])
def test_unusable_root_images(tmp_path, root_image, message):
    with pytest.raises(ImageError, match=message):
        resolve_root_image(machinetype_with(tmp_path, root_image), None)
