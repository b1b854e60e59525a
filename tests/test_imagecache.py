"""The image cache against a real HTTP(S) server on 127.0.0.1: conditional GETs, failures with
and without a cached copy, slow, huge, truncated and redirected downloads, shared checks,
TLS verification against a hashed CA directory; and resolve_root_image.

``LocalHTTPServer`` and ``Route`` are also used by test_userdata.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import http.server
import logging
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from vac.content import imagecache
from vac.content.imagecache import ImageCache, ImageError, resolve_root_image
from vac.core.config import Machinetype

LAST_MODIFIED = 1_700_000_000.0
USER_AGENT = "Vac/test"


@dataclasses.dataclass
class Route:
    """What the server answers on one path."""

    status: int = 200
    body: bytes = b""
    last_modified: Optional[float] = LAST_MODIFIED  # None: no Last-Modified header
    honour_ims: bool = True  # 304 when If-Modified-Since >= Last-Modified
    headers: dict = dataclasses.field(default_factory=dict)
    declared_length: Optional[int] = None  # Content-Length to send if not len(body); -1: none
    delay: float = 0.0  # before the status line
    stall_after: Optional[int] = None  # send this many body bytes, then stall until released
    piece_delay: float = 0.0  # pause between 64 KiB pieces of the body


class LocalHTTPServer:
    """A threaded HTTP/1.0 server on 127.0.0.1 serving ``routes``; it records every request."""

    def __init__(self, tls_context: Optional[ssl.SSLContext] = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict]] = []
        self.release = threading.Event()  # ends stalls
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append((self.path, dict(self.headers)))
                route = server.routes.get(self.path, Route(status=404))
                if route.delay:
                    server.release.wait(route.delay)
                ims = email.utils.parsedate_to_datetime(self.headers["If-Modified-Since"]).timestamp() \
                    if self.headers.get("If-Modified-Since") else None
                if (route.honour_ims and ims is not None and route.last_modified is not None
                        and ims >= route.last_modified and route.status == 200):
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(route.status)
                if route.last_modified is not None:
                    self.send_header("Last-Modified", email.utils.formatdate(route.last_modified, usegmt=True))
                length = len(route.body) if route.declared_length is None else route.declared_length
                if length >= 0:
                    self.send_header("Content-Length", str(length))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if route.stall_after is not None:
                    self.wfile.write(route.body[:route.stall_after])
                    self.wfile.flush()
                    server.release.wait(30)
                    return
                for start in range(0, len(route.body), 65536):
                    self.wfile.write(route.body[start:start + 65536])
                    if route.piece_delay and server.release.wait(route.piece_delay):
                        return

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls_context is not None else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


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
    with pytest.raises(ImageError, match=rf"cannot get image {re.escape(url)}: request failed: .*Connection refused"):
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
    assert re.fullmatch(rf"cannot check image {re.escape(url)} \(request failed: .*Read timed out.*\): "
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
    assert re.fullmatch(rf"cannot check image {re.escape(url)} \(download failed after \d+ bytes: .*timed out.*\): "
                        rf"using the cached copy .*", message)
    assert path.read_bytes() == b"good image" and path.stat().st_mtime == LAST_MODIFIED
    assert leftovers(cache) == []


def test_download_slower_than_max_seconds_is_abandoned(server, tmp_path):
    cache = ImageCache(tmp_path / "c", USER_AGENT, ca_path=str(tmp_path), timeout=1.0, max_seconds=0.2)
    server.routes["/trickle"] = Route(body=b"y" * (3 * 1024 * 1024), piece_delay=0.01)
    url = server.url("/trickle")
    with pytest.raises(ImageError) as error:
        cache.get(url)
    assert str(error.value) == f"cannot get image {url}: download took longer than 0.2 s; there is no cached copy"
    assert list(cache.cache_dir.iterdir()) == []


@pytest.mark.parametrize("declared, reason", [
    (None, "image of 5000 bytes is larger than the limit of 1000"),
    (-1, "image is larger than the limit of 1000 bytes"),  # no Content-Length: counted while streaming
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
    with pytest.raises(ImageError, match=r"download failed after \d+ bytes: .*(IncompleteRead|incomplete)"):
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
    with pytest.raises(ImageError, match="Exceeded 5 redirects"):
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


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA (in a hashed directory) and a server certificate for 127.0.0.1 signed by it."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Vac Test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(1)
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                   .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(2)
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    ca_dir = directory / "certificates"
    ca_dir.mkdir()
    (ca_dir / "vac-test-ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    subprocess.run(["openssl", "rehash", str(ca_dir)], check=True, capture_output=True, timeout=30)
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return ca_dir, cert_file, key_file


@pytest.fixture
def tls_server(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to hash the CA directory")
    ca_dir, cert_file, key_file = make_tls_files(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
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
