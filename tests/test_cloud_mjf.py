"""vcycle's HTTPS MJF service (vac.services.cloudmjf): a real TLS server on loopback, a test CA,
and real clients (http.client/ssl)."""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.localhttp import make_tls_files
from vac.services import cloudmjf
from vac.services.metadata import DEFAULT_LIMITS, Limits, joboutputs, write_mjf

pytestmark = pytest.mark.component

SPACE = "cloud.example.org"
TOKEN = "s3cr3t-token-of-machine-a"


class Running:
    """The service on its own event loop thread, like vcycled's."""

    def __init__(self, tmp_path: Path, limits: Limits = DEFAULT_LIMITS, **options: object):
        self.ca_dir, cert, key = make_tls_files(tmp_path)
        self.machines: dict[tuple[str, str], cloudmjf.CloudMachineFiles] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listener = asyncio.run_coroutine_threadsafe(cloudmjf.start_cloud_mjf(
            lambda space, name: self.machines.get((space, name)), address="127.0.0.1", port=0,
            cert_file=str(cert), key_file=str(key), machines=10, limits=limits, **options), self.loop).result(10)
        self.port = self.listener.port

    def add(self, root: Path, name: str, token: str, heartbeat_lists: Optional[Path] = None) -> Path:
        directory = root / name
        write_mjf(directory, {"shutdowntime": "1800000000", "total_cpu": "2"}, {"wall_limit_secs": "86400"})
        self.machines[(SPACE, name)] = cloudmjf.CloudMachineFiles(directory, token, heartbeat_lists)
        return directory

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                context: Optional[ssl.SSLContext] = None, source: str = "127.0.0.1") -> tuple[int, bytes]:
        context = context or ssl.create_default_context(capath=str(self.ca_dir))
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=10,
                                                 source_address=(source, 0))
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def service(tmp_path: Path):
    running = Running(tmp_path)
    yield running
    running.stop()


def base(name: str, token: str = TOKEN) -> str:
    return f"/machines/{SPACE}/{name}/{token}"


def test_machine_url_layout() -> None:
    assert cloudmjf.machine_url("vcycle.example.org", 443, SPACE, "vcycle-lhcb-a", "t") == \
        f"https://vcycle.example.org/machines/{SPACE}/vcycle-lhcb-a/t"
    assert cloudmjf.machine_url("::1", 8443, SPACE, "n", "t") == f"https://[::1]:8443/machines/{SPACE}/n/t"


def test_get_keys_and_listing_with_the_token(service: Running, tmp_path: Path) -> None:
    service.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN)
    assert service.request("GET", base("vcycle-lhcb-a") + "/machinefeatures/shutdowntime") == (200, b"1800000000")
    assert service.request("GET", base("vcycle-lhcb-a") + "/jobfeatures/wall_limit_secs") == (200, b"86400")
    status, listing = service.request("GET", base("vcycle-lhcb-a") + "/machinefeatures/")
    assert status == 200 and b'href="total_cpu"' in listing
    assert service.request("GET", base("vcycle-lhcb-a") + "/machinefeatures/absent")[0] == 404
    assert service.request("GET", base("vcycle-lhcb-a") + "/joboutputs/x")[0] == 403


def test_wrong_token_or_unknown_machine_is_404_for_every_method(service: Running, tmp_path: Path) -> None:
    directory = service.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN)
    for path in (base("vcycle-lhcb-a", "wrong") + "/machinefeatures/shutdowntime",
                 base("vcycle-lhcb-b") + "/machinefeatures/shutdowntime",
                 f"/machines/{SPACE}/vcycle-lhcb-a/machinefeatures/shutdowntime",  # classic, no token
                 "/machines/other.space/vcycle-lhcb-a/" + TOKEN + "/machinefeatures/shutdowntime"):
        assert service.request("GET", path)[0] == 404, path
    assert service.request("PUT", base("vcycle-lhcb-a", "wrong") + "/joboutputs/shutdown_message", b"x")[0] == 404
    assert not (directory / "joboutputs" / "shutdown_message").exists()
    assert service.request("GET", "/machines/%2e%2e/x/y/machinefeatures/k")[0] == 404


def test_put_joboutputs_with_vacs_caps(service: Running, tmp_path: Path) -> None:
    directory = service.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN)
    assert service.request("PUT", base("vcycle-lhcb-a") + "/joboutputs/heartbeat", b"alive")[0] == 201
    assert service.request("POST", base("vcycle-lhcb-a") + "/joboutputs/shutdown_message", b"200 Success")[0] == 201
    assert (directory / "joboutputs" / "shutdown_message").read_bytes() == b"200 Success"
    assert (directory / "joboutputs" / "heartbeat").read_bytes() == b"alive"
    assert service.request("PUT", base("vcycle-lhcb-a") + "/joboutputs/.hidden", b"x")[0] == 403
    assert service.request("PUT", base("vcycle-lhcb-a") + "/machinefeatures/shutdowntime", b"0")[0] == 403
    too_big = b"x" * (Limits().joboutput_file_bytes + 1)
    assert service.request("PUT", base("vcycle-lhcb-a") + "/joboutputs/log", too_big)[0] == 413


def test_heartbeat_lists_only_to_the_spaces_machines(service: Running, tmp_path: Path) -> None:
    lists = tmp_path / "heartbeatlists"
    lists.mkdir()
    (lists / "squid").write_text("1800000000 vcycle-squid-a 10.0.0.2\n")
    (tmp_path / "secret").write_text("not a list")
    service.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN, lists)
    service.add(tmp_path / "m", "vcycle-lhcb-b", "other-token")  # vacd-like: no lists
    url = base("vcycle-lhcb-a") + "/heartbeatlists"
    assert service.request("GET", url + "/squid") == (200, b"1800000000 vcycle-squid-a 10.0.0.2\n")
    assert service.request("GET", url + "/lhcb")[0] == 404  # no list (yet)
    for path in (base("vcycle-lhcb-a", "wrong") + "/heartbeatlists/squid",  # wrong token
                 f"/heartbeatlists/{SPACE}/squid",  # classic: unauthenticated
                 url + "/..%2fsecret", url + "/.hidden", url + "/squid/x", url,
                 base("vcycle-lhcb-b", "other-token") + "/heartbeatlists/squid"):
        assert service.request("GET", path)[0] == 404, path
    assert service.request("PUT", url + "/squid", b"x")[0] == 403


def open_upload(service: Running, name: str, length: int) -> ssl.SSLSocket:
    """A TLS connection with the headers of a PUT of ``length`` bytes sent (the body is not)."""
    context = ssl.create_default_context(capath=str(service.ca_dir))
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", service.port), 10),
                               server_hostname="127.0.0.1")
    sock.sendall(f"PUT {base(name)}/joboutputs/log HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")  # the handler now reads the body
    return sock


def reset(sock: ssl.SSLSocket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def request_lines(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    """The service's log records about ``method`` requests, once there are any (within 10 s)."""
    give_up = time.monotonic() + 10
    while time.monotonic() < give_up:
        records = [record for record in caplog.records
                   if record.name == cloudmjf.log.name and f" {method}" in record.getMessage()]
        if records:
            return records
        time.sleep(0.05)
    raise AssertionError(f"no {method} request was logged")


def test_a_client_resetting_mid_upload_is_logged_as_gone_not_as_an_error(
        service: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = service.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN)
    with caplog.at_level(logging.INFO, logger=cloudmjf.log.name):
        sock = open_upload(service, "vcycle-lhcb-a", 1000)
        sock.sendall(b"x" * 10)
        reset(sock)
        records = request_lines(caplog, "PUT")
    assert [(record.levelno, record.getMessage()) for record in records] == [
        (logging.INFO, "cloud MJF cloud.example.org/vcycle-lhcb-a PUT 499: client closed the connection")]
    assert not (directory / "joboutputs" / "log").exists()


def test_a_client_leaving_during_the_write_is_logged_as_gone_and_the_file_is_written(
        service: Running, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory = service.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN)
    release = threading.Event()
    write = joboutputs.atomic_write

    def slow_write(*args: object) -> None:
        release.wait(10)  # the client leaves meanwhile: aiohttp cancels the handler
        write(*args)

    monkeypatch.setattr(joboutputs, "atomic_write", slow_write)
    with caplog.at_level(logging.INFO, logger=cloudmjf.log.name):
        sock = open_upload(service, "vcycle-lhcb-a", 5)
        sock.sendall(b"alive")
        reset(sock)
        records = request_lines(caplog, "PUT")
    release.set()
    assert [(record.levelno, record.getMessage()) for record in records] == [
        (logging.INFO, "cloud MJF cloud.example.org/vcycle-lhcb-a PUT 499: client closed the connection")]
    give_up = time.monotonic() + 10
    while not (directory / "joboutputs" / "log").exists() and time.monotonic() < give_up:
        time.sleep(0.05)
    assert (directory / "joboutputs" / "log").read_bytes() == b"alive"  # the body had arrived


def test_a_machines_address_gets_a_machines_share_and_a_nat_gateway_more(tmp_path: Path) -> None:
    machine_address = int(ipaddress.ip_address("127.0.0.2"))
    running = Running(tmp_path, Limits(connections_per_machine=2), descriptors=256,
                      is_machine_address=lambda key: key == machine_address)
    running.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN)
    path = base("vcycle-lhcb-a") + "/machinefeatures/shutdowntime"
    held: list = []
    try:
        held += [socket.create_connection(("127.0.0.1", running.port), 10, ("127.0.0.2", 0)) for _ in range(2)]
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            running.request("GET", path, source="127.0.0.2")  # over its 2: reset at accept
        # 127.0.0.1 is no machine's address: many machines behind one NAT share its larger share.
        held += [socket.create_connection(("127.0.0.1", running.port), 10) for _ in range(8)]
        assert running.request("GET", path) == (200, b"1800000000")
    finally:
        for sock in held:
            sock.close()
        running.stop()


def test_too_few_descriptors_for_the_machines_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=cloudmjf.log.name):
        running = Running(tmp_path, descriptors=70)  # 64 reserved: not even one each for 10 machines
    running.stop()
    assert "an open file limit of 70 is too low for 10 machines: machines may run the services out of " \
        "descriptors (raise LimitNOFILE)" in [record.getMessage() for record in caplog.records]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_plain_http_and_old_tls_are_refused(service: Running, tmp_path: Path) -> None:
    service.add(tmp_path / "m", "vcycle-lhcb-a", TOKEN)
    plain = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        plain.request("GET", base("vcycle-lhcb-a") + "/machinefeatures/shutdowntime")
        plain.getresponse().read()
    plain.close()
    old = ssl.create_default_context(capath=str(service.ca_dir))
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        service.request("GET", base("vcycle-lhcb-a") + "/machinefeatures/shutdowntime", context=old)


def test_unusable_certificate_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ssl.SSLError):
        cloudmjf.server_context(str(tmp_path / "bad.pem"), str(tmp_path / "bad.pem"))
