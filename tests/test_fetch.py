"""The one HTTP fetch helper against real servers on 127.0.0.1: statuses, User-Agent, size caps,
one deadline that a drip-feeding sender cannot stretch, idle and truncated transfers, chunked
bodies, redirects, streaming to a file, and TLS against a hashed grid CA directory."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.localhttp import LocalHTTPServer, Route, tls_server_context
from vac import __version__
from vac.content import fetch
from vac.content.fetch import Fetcher, FetchError

pytestmark = pytest.mark.component


@pytest.fixture
def server():
    local = LocalHTTPServer()
    yield local
    local.close()


@pytest.fixture
def fetcher():
    with Fetcher() as client:
        yield client


def test_body_user_agent_and_identity_encoding(server, fetcher):
    server.routes["/doc"] = Route(body=b"hello")
    assert fetcher.get_bytes(server.url("/doc"), timeout=5, max_bytes=100) == b"hello"
    [(_, headers)] = server.requests
    assert headers["User-Agent"] == f"Vac/{__version__}" == fetch.USER_AGENT
    assert headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("status, reason", [(404, "Not Found"), (500, "Internal Server Error")])
def test_unwanted_status_is_an_error_with_the_status(server, fetcher, status, reason):
    server.routes["/doc"] = Route(status=status, body=b"no")
    url = server.url("/doc")
    with pytest.raises(FetchError) as error:
        fetcher.get_bytes(url, timeout=5, max_bytes=100)
    assert (str(error.value), error.value.status) == (f"cannot fetch {url}: HTTP {status} {reason}", status)


def test_open_gives_any_status_and_headers(server, fetcher):
    server.routes["/doc"] = Route(status=410, headers={"X-Why": "gone"})
    with fetcher.open(server.url("/doc"), timeout=5) as reply:
        assert (reply.status, reply.reason, reply.headers["x-why"]) == (410, "Gone", "gone")


@pytest.mark.parametrize("declared, message", [
    (None, "5000 bytes is more than the limit of 1000"),  # refused before reading
    (-1, "sent more than the limit of 1000 bytes"),  # no Content-Length: counted
])
def test_size_cap(server, fetcher, declared, message):
    server.routes["/big"] = Route(body=b"z" * 5000, declared_length=declared, piece_bytes=500)
    url = server.url("/big")
    with pytest.raises(FetchError, match=f"^cannot fetch {re.escape(url)}: {message}$"):
        fetcher.get_bytes(url, timeout=5, max_bytes=1000)


def test_a_drip_feeding_sender_cannot_stretch_the_deadline(server, fetcher):
    # One byte every 50 ms: 200 bytes take 10 s, each gap far shorter than any socket timeout.
    # iter_content or read(n) would wait for all of it; the deadline ends the fetch long before.
    server.routes["/drip"] = Route(body=b"d" * 200, piece_bytes=1, piece_delay=0.05)
    url = server.url("/drip")
    with pytest.raises(FetchError, match=f"^cannot fetch {re.escape(url)}: took more than 0.5 s$"):
        fetcher.get_bytes(url, timeout=0.5, max_bytes=1000)
    assert server.finished == 0 and 0 < server.sent < 200


def test_a_drip_fed_chunked_body_is_bounded_too(server, fetcher):
    chunked = b"".join(b"1\r\nc\r\n" for _ in range(200)) + b"0\r\n\r\n"
    server.routes["/drip"] = Route(body=chunked, declared_length=-1, headers={"Transfer-Encoding": "chunked"},
                                   piece_bytes=6, piece_delay=0.05)
    with pytest.raises(FetchError, match="took more than 0.5 s"):
        fetcher.get_bytes(server.url("/drip"), timeout=0.5, max_bytes=1000)
    assert server.finished == 0


def test_chunked_body_is_read_whole(server, fetcher):
    server.routes["/c"] = Route(body=b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", declared_length=-1,
                                headers={"Transfer-Encoding": "chunked"}, piece_bytes=7)
    assert fetcher.get_bytes(server.url("/c"), timeout=5, max_bytes=100) == b"hello world"


def test_a_server_that_never_answers_times_out(server, fetcher):
    server.routes["/late"] = Route(body=b"late", delay=5)
    url = server.url("/late")
    with pytest.raises(FetchError, match=rf"^cannot fetch {re.escape(url)}: .*Read timed out"):
        fetcher.get_bytes(url, timeout=0.3, max_bytes=100)


def test_idle_timeout_ends_a_silent_transfer_before_the_deadline(server, fetcher):
    server.routes["/stall"] = Route(body=b"s" * 1000, stall_after=10)
    url = server.url("/stall")
    with fetcher.open(url, timeout=60, idle_timeout=0.3) as reply:
        with pytest.raises(FetchError, match=rf"^cannot fetch {re.escape(url)}: sent nothing for 0.3 s \(after 10 bytes\)$"):
            reply.read(10_000)


def test_truncated_body_is_an_error(server, fetcher):
    server.routes["/short"] = Route(body=b"a" * 500, declared_length=1000)
    url = server.url("/short")
    with pytest.raises(FetchError, match=rf"^cannot fetch {re.escape(url)}: ended after 500 of its 1000 bytes \(incomplete\)$"):
        fetcher.get_bytes(url, timeout=5, max_bytes=10_000)


def test_other_content_encodings_are_refused(server, fetcher):
    server.routes["/gz"] = Route(body=b"\x1f\x8b...", headers={"Content-Encoding": "gzip"})
    with pytest.raises(FetchError, match="sent Content-Encoding 'gzip' although identity was asked"):
        fetcher.get_bytes(server.url("/gz"), timeout=5, max_bytes=100)


def test_redirects_are_followed_within_a_limit(server, fetcher):
    server.routes["/old"] = Route(status=301, headers={"Location": "/new"}, last_modified=None)
    server.routes["/new"] = Route(body=b"moved")
    with fetcher.open(server.url("/old"), timeout=5) as reply:
        assert (reply.url, reply.requested, reply.read(100)) == (server.url("/new"), server.url("/old"), b"moved")
    server.routes["/loop"] = Route(status=302, headers={"Location": "/loop"}, last_modified=None)
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetcher.get_bytes(server.url("/loop"), timeout=5, max_bytes=100)
    assert server.paths().count("/loop") == 6


def test_redirect_to_another_scheme_is_refused(server, fetcher):
    server.routes["/file"] = Route(status=302, headers={"Location": "file:///etc/passwd"}, last_modified=None)
    with pytest.raises(FetchError, match="'file:///etc/passwd' is not an http\\(s\\) URL"):
        fetcher.get_bytes(server.url("/file"), timeout=5, max_bytes=100)
    server.routes["/nowhere"] = Route(status=302, headers={"Location": "https:///etc/passwd"}, last_modified=None)
    with pytest.raises(FetchError, match="'https:///etc/passwd' is not an http\\(s\\) URL with a host name"):
        fetcher.get_bytes(server.url("/nowhere"), timeout=5, max_bytes=100)


def test_copy_to_streams_into_a_file(server, fetcher, tmp_path):
    body = bytes(range(256)) * 4096  # 1 MiB in 64 KiB pieces
    server.routes["/image"] = Route(body=body)
    target = tmp_path / "image"
    with fetcher.open(server.url("/image"), timeout=10) as reply, open(target, "wb") as stream:
        assert reply.copy_to(stream, max_bytes=len(body)) == len(body)
    assert target.read_bytes() == body


def test_refused_connection(fetcher):
    closed = LocalHTTPServer()
    url = closed.url("/x")
    closed.close()
    with pytest.raises(FetchError, match=rf"^cannot fetch {re.escape(url)}: .*Connection refused"):
        fetcher.get_bytes(url, timeout=5, max_bytes=100)


def test_tls_is_verified_against_the_grid_ca_directory(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to hash the CA directory")
    context, ca_dir = tls_server_context(tmp_path)
    server = LocalHTTPServer(tls_context=context)
    try:
        server.routes["/doc"] = Route(body=b"secure")
        with Fetcher(ca_dir=str(ca_dir)) as trusted:
            assert trusted.get_bytes(server.url("/doc"), timeout=5, max_bytes=100) == b"secure"
        empty = tmp_path / "empty"
        empty.mkdir()
        with Fetcher(ca_dir=str(empty)) as untrusted, pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.get_bytes(server.url("/doc"), timeout=5, max_bytes=100)
    finally:
        server.close()


def test_the_grid_ca_directory_is_used_only_when_present(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "GRID_CA_DIR", str(tmp_path / "absent"))
    assert fetch.grid_ca_dir() is None
    monkeypatch.setattr(fetch, "GRID_CA_DIR", str(tmp_path))
    assert fetch.grid_ca_dir() == str(tmp_path)
