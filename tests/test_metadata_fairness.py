"""One machine never costs another a request (issue 17): shares per machine in the metadata and
MJF services, the accept loop when descriptors run out, vacd's open file limit.

As in test_metadata.py, a client bound to 127.0.0.(10+N) is the machine in slot N. The tests
that need a low descriptor limit run the services in a child process that lowers its own
``RLIMIT_NOFILE`` first, as a host with systemd's default of 1,024 would, only lower.
"""

from __future__ import annotations

import configparser
import contextlib
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.test_metadata import (
    STRANGER,
    Running,
    request,
    source,
)
from vac.ops.limits import DescriptorLimit, _kernel_cap
from vac.records.store import atomic_write
from vac.services import metadata
from vac.services.metadata import DEFAULT_LIMITS, Limits, fair_limits, shares_fit

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Pure: sizing the shares


@pytest.mark.parametrize(("slots", "descriptors", "share"), [
    (64, 65536, 16),  # the unit's limit: the full share for every slot
    (64, 1024, 11),  # systemd's default soft limit: (1024 - 256) // 65
    (200, 1024, 3),
    (3, 256, 16),  # (256 - 64) // 4 = 48: the full share
    (10, 100, 3),
])
def test_every_share_fits_in_the_descriptor_limit(slots, descriptors, share):
    limits = fair_limits(DEFAULT_LIMITS, slots, descriptors)
    assert limits.connections_per_machine == share
    assert shares_fit(limits, slots, descriptors)
    # all slots plus the share of unattributed addresses, and vacd's own reserve
    assert (slots + 1) * share + metadata.reserved_descriptors(descriptors) <= descriptors


def test_too_few_descriptors_still_give_one_connection_and_say_so():
    limits = fair_limits(DEFAULT_LIMITS, 500, 200)
    assert limits.connections_per_machine == 1
    assert not shares_fit(limits, 500, 200)
    with pytest.raises(ValueError, match="slot count"):
        fair_limits(DEFAULT_LIMITS, 0, 1024)


def test_a_machine_upload_share_holds_a_largest_file_and_heartbeats():
    limits = Limits(joboutput_file_bytes=1000)
    assert metadata.upload_share_bytes(limits) == 1000 + metadata.SMALL_UPLOADS_BYTES


def test_unit_limit_gives_the_full_share_to_a_large_host():
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(REPO / "etc" / "systemd" / "vacd.service")
    hard = int(parser["Service"]["LimitNOFILE"].split(":")[-1])
    assert fair_limits(DEFAULT_LIMITS, 256, hard).connections_per_machine == \
        DEFAULT_LIMITS.connections_per_machine


RAISE_LIMIT = r"""
import json, resource, sys
from vac.ops.limits import raise_descriptor_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
first = raise_descriptor_limit()
second = raise_descriptor_limit()
print(json.dumps([first.before, first.after, first.hard, first.describe(), second.describe(),
                  resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def test_raise_descriptor_limit_in_a_child_process():
    completed = subprocess.run([sys.executable, "-c", RAISE_LIMIT], cwd=REPO, timeout=60,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    before, after, hard, described, again, now = json.loads(completed.stdout)
    assert before == min(256, hard) and after == hard == now
    if hard > 256:
        assert described == f"open file limit raised from 256 to {hard} (the hard limit)"
    assert again == f"open file limit {hard} (already the hard limit)"


def test_descriptor_limit_descriptions(tmp_path):
    failed = DescriptorLimit(1024, 1024, 4096, "Operation not permitted")
    assert failed.describe() == ("open file limit stays at 1024 (hard limit 4096): cannot "
                                 "raise it: Operation not permitted")
    (tmp_path / "nr_open").write_text("1048576\n")
    assert _kernel_cap(str(tmp_path / "nr_open")) == 1048576
    assert _kernel_cap(str(tmp_path / "missing")) == 1024 * 1024


def test_usage_scan_tolerates_files_that_vanish(tmp_path):
    """Uploads rename temporary files over their names and machines finish while the quota
    scan lists the directory: a file gone before its stat() is simply not counted."""
    stop = threading.Event()

    def churn() -> None:
        for turn in range(3000):
            if stop.is_set():
                return
            atomic_write(tmp_path / f"out{turn % 4}", b"x" * (turn % 50), 0o644)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path / f"out{(turn + 2) % 4}")

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        scans = 0
        while writer.is_alive() and scans < 20000:
            total, files = metadata.joboutputs_usage(tmp_path, excluding="none")
            assert files <= 4 and total <= 4 * 50
            scans += 1
    finally:
        stop.set()
        writer.join(30)
    assert scans > 0


# ---------------------------------------------------------------------------------------------
# Component: in-process services


def connect(base: str, slot: int) -> socket.socket:
    url = urllib.parse.urlsplit(base)
    return socket.create_connection((url.hostname, url.port), timeout=5,
                                    source_address=(source(slot), 0))


def answer(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and return the first bytes answered ("" if closed, "reset" if reset)."""
    try:
        sock.sendall(data)
        return sock.recv(65536)
    except ConnectionError:  # reset, or a broken pipe when the reset came first
        return b"reset"


def attempt(base: str, slot: int, data: bytes) -> bytes:
    """``answer`` on a new connection, which may already be reset as it is made."""
    try:
        with connect(base, slot) as sock:
            return answer(sock, data)
    except ConnectionError:
        return b"reset"


GET = b"GET /jobfeatures/job_id HTTP/1.1\r\nHost: x\r\n\r\n"


def refusal_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if "already holds its" in record.getMessage()]


@pytest.mark.component
def test_connections_over_a_machine_share_are_reset_at_once(tmp_path, caplog):
    running = Running(tmp_path, Limits(connections_per_machine=4))
    meta, mjf = running.services.metadata_url, running.services.mjf_url
    held = []
    try:
        with caplog.at_level(logging.INFO, logger="vac.services.metadata"):
            # the share covers both services together
            held = [connect(meta, 1), connect(meta, 1), connect(mjf, 1), connect(mjf, 1)]
            for sock in held:
                assert answer(sock, GET).startswith(b"HTTP/1.1 ")  # served, kept alive
            for number in range(20):
                assert attempt(meta if number % 2 else mjf, 1, GET) in (b"", b"reset")
            # every other machine is served as usual, and so are unknown addresses
            for slot in (2, 3):
                assert request(meta, "/latest/meta-data/instance-id", slot=slot)[0] == 200
                assert request(mjf, "/joboutputs/heartbeat", slot=slot, method="PUT",
                               body=b"ok")[0] == 201
            assert request(meta, "/latest/user-data", address=STRANGER)[0] == 404
            # a connection that ends gives its place back
            held.pop().close()
            for _ in range(100):
                if attempt(mjf, 1, GET).startswith(b"HTTP/1.1 200"):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the closed connection's place was never given back")
    finally:
        for sock in held:
            sock.close()
        running.stop()
    assert 1 <= len(refusal_lines(caplog)) <= 2  # one line per machine per 10 s
    assert "slot 1 (127.0.0.11) already holds its 4 connections" in refusal_lines(caplog)[0]


def put_headers(name: str, length: int) -> bytes:
    return (f"PUT /joboutputs/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()


@pytest.mark.component
@pytest.mark.parametrize("total_max_bytes", [10 * 1024 * 1024, 200 * 1024 * 1024])
def test_machines_holding_their_whole_upload_share_leave_others_a_heartbeat(tmp_path,
                                                                           total_max_bytes):
    """Issue 17, failure 2: seven machines each try ten slow 1 MiB PUTs (and with a large
    per-machine total, one machine alone used to be enough to fill the shared budget)."""
    limits = Limits(joboutputs_total_bytes=total_max_bytes, body_timeout_seconds=30,
                    idle_timeout_seconds=30)
    running = Running(tmp_path, limits, slots=range(1, 9))
    mjf = running.services.mjf_url
    size = limits.joboutput_file_bytes
    held: list[socket.socket] = []
    try:
        for slot in range(1, 8):
            statuses = []
            for number in range(10):
                sock = connect(mjf, slot)
                held.append(sock)
                reply = answer(sock, put_headers(f"big{number}", size))
                statuses.append(reply.split(b"\r\n", 1)[0])
                if reply.startswith(b"HTTP/1.1 100"):
                    sock.sendall(b"x" * 1000)  # then nothing more: the body stays in flight
                else:
                    assert b"Retry-After: 5" in reply
            assert statuses == [b"HTTP/1.1 100 Continue"] + [
                b"HTTP/1.1 503 Service Unavailable"] * 9, (slot, statuses)
        # every machine's share is taken; another machine's heartbeat is accepted at once,
        # and so is one beside a machine's own largest upload
        for slot in (8, 1):
            assert request(mjf, "/joboutputs/heartbeat", slot=slot, method="PUT",
                           body=b"1700000000")[0] == 201
            assert (running.directory(slot) / "joboutputs" / "heartbeat").read_bytes() == \
                b"1700000000"
    finally:
        for sock in held:
            sock.close()
        running.stop()


@pytest.mark.component
def test_a_name_being_uploaded_has_one_winner(tmp_path):
    running = Running(tmp_path, Limits(body_timeout_seconds=30))
    mjf = running.services.mjf_url
    outputs = running.directory(1) / "joboutputs"
    try:
        with connect(mjf, 1) as first:
            assert answer(first, put_headers("message", 5)).startswith(b"HTTP/1.1 100")
            status, headers, _ = request(mjf, "/joboutputs/message", slot=1, method="PUT",
                                         body=b"second")
            assert status == 409 and headers["Retry-After"] == "1"
            assert answer(first, b"first").startswith(b"HTTP/1.1 201")
        assert (outputs / "message").read_bytes() == b"first"
        assert request(mjf, "/joboutputs/message", slot=1, method="PUT", body=b"third")[0] == 201
        assert (outputs / "message").read_bytes() == b"third"
    finally:
        running.stop()


@pytest.mark.component
def test_no_500_in_many_parallel_uploads_from_one_machine(tmp_path, caplog):
    """Issue 17, failure 3 (the 10,000 of the issue: benchmarks/metadata_flood.py)."""
    running = Running(tmp_path, Limits())
    mjf = running.services.mjf_url
    url = urllib.parse.urlsplit(mjf)
    statuses: dict[int, int] = {}
    bodies = {f"out{n}": set() for n in range(6)}
    lock = threading.Lock()

    def uploader(number: int) -> None:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10,
                                                source_address=(source(1), 0))
        try:
            for turn in range(150):
                name = f"out{(number + turn) % 6}"
                body = f"{number}-{turn}-".encode() * (1 + turn % 7)
                with lock:
                    bodies[name].add(body)
                connection.request("PUT", f"/joboutputs/{name}", body=body)
                response = connection.getresponse()
                response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
        finally:
            connection.close()

    try:
        with caplog.at_level(logging.INFO, logger="vac.services.metadata"):
            threads = [threading.Thread(target=uploader, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
    finally:
        running.stop()
    assert sum(statuses.values()) == 8 * 150
    assert set(statuses) <= {201, 409}, statuses
    assert statuses.get(201, 0) > 0
    outputs = running.directory(1) / "joboutputs"
    for path in outputs.iterdir():
        assert not path.name.startswith("."), "temporary file left behind"
        assert path.read_bytes() in bodies[path.name]  # exactly one whole upload won
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------------------------
# Component: the services in a child process with a low descriptor limit

CHILD_NOFILE = 256
CHILD = r"""
import asyncio, json, logging, os, resource, sys, threading
repo, root, log_path, nofile = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.path.insert(0, repo)
logging.basicConfig(filename=log_path, level=logging.INFO,
                    format="%(levelname)s %(name)s %(message)s")
from pathlib import Path
from vac.services import metadata
from tests.test_metadata import (METADATA_HOST, MJF_HOST, loopback_slot, make_contexts,
                                 make_settings)

hogged = []

def hog():  # what a descriptor leak elsewhere in vacd would do
    while True:
        try:
            hogged.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    print("hogged", len(hogged), flush=True)

def release():
    while hogged:
        os.close(hogged.pop())
    print("released", flush=True)

async def main():
    contexts = make_contexts(Path(root), (1, 2, 3))
    services = await metadata.start_services(
        make_settings(), contexts.get, metadata_address=METADATA_HOST, mjf_address=MJF_HOST,
        port=0, slot_for_address=loopback_slot, slots=3)
    print(json.dumps([services.metadata_url, services.mjf_url,
                      services.limits.connections_per_machine]), flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def commands():
        for line in sys.stdin:
            action = {"hog": hog, "release": release}.get(line.strip())
            if action:
                loop.call_soon_threadsafe(action)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=commands, daemon=True).start()
    await done.wait()
    await services.close()

asyncio.run(main())
"""


class Child:
    """The services in a child process with ``RLIMIT_NOFILE`` = ``CHILD_NOFILE``."""

    def __init__(self, root: Path):
        self.log = root / "services.log"
        (root / "state").mkdir()
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(REPO), str(root / "state"), str(self.log),
             str(CHILD_NOFILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=REPO)
        line = self.readline()
        self.metadata_url, self.mjf_url, self.share = json.loads(line)

    def readline(self) -> str:
        line = self.process.stdout.readline()
        assert line, f"child exited: {self.log.read_text() if self.log.exists() else ''}"
        return line

    def command(self, text: str) -> str:
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self.readline()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()  # our own child, by its handle
            self.process.wait(10)

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def child(tmp_path):
    started = Child(tmp_path)
    yield started
    started.stop()


def serve_slot(child: Child, slot: int, gets: int, heartbeats: int) -> list[int]:
    statuses = []
    for number in range(max(gets, heartbeats)):
        if number < gets:
            statuses.append(request(child.metadata_url, "/openstack/latest/user_data",
                                    slot=slot)[0])
        if number < heartbeats:
            statuses.append(request(child.mjf_url, "/joboutputs/heartbeat", slot=slot,
                                    method="PUT", body=str(number).encode())[0])
    return statuses


@pytest.mark.component
def test_a_flood_to_the_descriptor_limit_leaves_other_machines_served(child):
    """Issue 17, failure 1: one machine opens more keep-alive connections than the process has
    descriptors, and keeps opening more, while another machine reads its user_data and sends
    heartbeats."""
    assert child.share == DEFAULT_LIMITS.connections_per_machine
    held: list[socket.socket] = []
    stop = threading.Event()
    flooded = [0]

    def flood() -> None:  # new connections from machine 1 as fast as it can, all refused
        while not stop.is_set() and flooded[0] < 20000:
            attempt(child.metadata_url, 1, GET)
            flooded[0] += 1

    flooder = threading.Thread(target=flood)
    try:
        served = 0
        for number in range(CHILD_NOFILE + 100):
            with contextlib.suppress(ConnectionError):  # reset before connect() returned
                sock = connect(child.metadata_url if number % 2 else child.mjf_url, 1)
                held.append(sock)
                if answer(sock, GET).startswith(b"HTTP/1.1 "):
                    served += 1
        assert served == child.share  # the rest were reset as they were accepted
        flooder.start()
        statuses = serve_slot(child, 2, gets=100, heartbeats=15)
    finally:
        stop.set()
        if flooder.is_alive():
            flooder.join(30)
        for sock in held:
            sock.close()
    assert flooded[0] > 0
    assert statuses.count(200) == 100 and statuses.count(201) == 15, statuses
    lines = child.log_lines()
    assert len(lines) < 100, lines[-20:]
    assert not any("Traceback" in line or "out of system resource" in line for line in lines)


@pytest.mark.component
def test_running_out_of_descriptors_pauses_accepting_with_one_log_line(child):
    """When descriptors run out anyway (here: hogged inside the process), the accept loop backs
    off instead of spinning, logs one line, and serves the waiting machine once they are back."""
    assert child.command("hog").startswith("hogged")
    results: list[int] = []
    waiting = threading.Thread(target=lambda: results.extend(
        serve_slot(child, 2, gets=1, heartbeats=1)))
    waiting.start()
    time.sleep(1.0)  # let the accept loop meet EMFILE a few times (not a timing assertion)
    assert child.command("release") == "released\n"
    waiting.join(30)
    assert results == [200, 201]
    assert serve_slot(child, 3, gets=5, heartbeats=5).count(201) == 5
    lines = child.log_lines()
    paused = [line for line in lines if "cannot accept connections" in line]
    assert 1 <= len(paused) <= 2 and "Too many open files" in paused[0], lines
    assert len(lines) < 100
    assert not any("Traceback" in line or "out of system resource" in line for line in lines)
