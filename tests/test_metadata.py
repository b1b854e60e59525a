"""Tests of vac.services.metadata: the MJF file helpers (pure) and the two HTTP services (component).

The component tests run the real services on 127.0.0.2 (metadata) and 127.0.0.3 (MJF) with
three fake machines in slots 1-3; a client bound to 127.0.0.(10+N) is the machine in slot N.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import socket
import stat
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Optional

import pytest

from tests.tiers import SYSTEM, require
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine, MachineState
from vac.services import metadata
from vac.services.metadata import (
    BadPath,
    Limits,
    LogLimiter,
    MachineContext,
    lower_deadline_files,
    mjf_features,
    path_segments,
    write_mjf,
)
from vac.services.metadata import base as metadata_base

METADATA_HOST = "127.0.0.2"
MJF_HOST = "127.0.0.3"
STRANGER = "127.0.0.5"  # not a slot address at all
EMPTY_SLOT = "127.0.0.14"  # slot 4: a slot address with no machine in it
SLOTS = 8  # the slot count the services size their shares for
CREATED = 1_700_000_000
KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 root@factory"


def source(slot: int) -> str:
    return f"127.0.0.{10 + slot}"


def loopback_slot(address: str) -> Optional[int]:
    """Test plan: 127.0.0.(10+N) is slot N."""
    parts = address.split(".")
    if len(parts) != 4 or parts[:3] != ["127", "0", "0"] or int(parts[3]) < 10:
        return None
    return int(parts[3]) - 10


def make_settings(**changes) -> Settings:
    values = dict(vac_space="space.example.org", factory_name="factory.example.org",
                  hs06_per_processor=10.5, mb_per_processor=2000)
    values.update(changes)
    return Settings(**values)


def make_machine(slot: int, processors: int = 2, machinetype: str = "lhcb") -> Machine:
    return Machine(uuid=f"00000000-0000-4000-8000-{slot:012d}",
                   name=f"factory-{slot:02d}.example.org", slot=slot, machinetype=machinetype,
                   machine_model="cernvm4", processors=processors, created=CREATED + slot,
                   deadline=CREATED + 86400, state=MachineState.RUNNING)


# ---------------------------------------------------------------------------------------------
# Pure: MJF values and files


def test_mjf_features_are_the_classic_keys_and_values():
    machine = make_machine(1, processors=2)
    settings = make_settings(machinefeatures_options=(("site_extra", "42 units"),))
    machinefeatures, jobfeatures = mjf_features(machine, settings, Machinetype(name="lhcb"),
                                                now=CREATED + 1000.7)
    assert machinefeatures == {
        "hs06": "21.0", "total_cpu": "2", "phys_cores": "2", "log_cores": "2", "jobslots": "2",
        "shutdowntime": str(CREATED + 86400), "site_extra": "42 units",
    }
    wall = 86400 - 1000
    assert jobfeatures == {
        "shutdowntime_job": str(CREATED + 86400), "cpufactor_lrms": "1.0",
        "cpu_limit_secs_lrms": str(2 * wall), "cpu_limit_secs": str(2 * wall),
        "wall_limit_secs_lrms": str(wall), "wall_limit_secs": str(wall),
        "jobstart_secs": str(CREATED + 1000), "hs06_job": "21.0",
        "max_rss_bytes": str(2000 * 2 * 1048576), "mem_limit_MB": str(2000 * 2 * 1048576 // 10**6),
        "allocated_cpu": "2\n", "allocated_CPU": "2\n", "job_id": machine.uuid,
    }
    trailing = [key for key, value in {**machinefeatures, **jobfeatures}.items()
                if value.endswith("\n")]
    assert sorted(trailing) == ["allocated_CPU", "allocated_cpu"]


def test_mjf_features_without_hs06_and_past_deadline():
    machine = make_machine(1, processors=1)
    machinefeatures, jobfeatures = mjf_features(
        machine, make_settings(hs06_per_processor=None), Machinetype(name="lhcb"),
        now=machine.deadline + 50)
    assert "hs06" not in machinefeatures and "hs06_job" not in jobfeatures
    assert jobfeatures["wall_limit_secs"] == "0" and jobfeatures["cpu_limit_secs"] == "0"


def test_mjf_features_refuses_bad_input():
    machine = make_machine(1)
    with pytest.raises(ValueError, match="not a valid MJF key"):
        mjf_features(machine, make_settings(machinefeatures_options=(("../x", "1"),)),
                     Machinetype(name="lhcb"), now=CREATED)
    with pytest.raises(ValueError, match="machinetype 'atlas'"):
        mjf_features(machine, make_settings(), Machinetype(name="atlas"), now=CREATED)


def test_write_mjf_writes_exact_0644_files_atomically(tmp_path):
    write_mjf(tmp_path, {"total_cpu": "2"}, {"allocated_cpu": "2\n", "job_id": "abc"})
    assert (tmp_path / "machinefeatures" / "total_cpu").read_bytes() == b"2"
    assert (tmp_path / "jobfeatures" / "allocated_cpu").read_bytes() == b"2\n"
    for path in [*tmp_path.glob("*/*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(path.name for path in tmp_path.glob("*/*")) == [
        "allocated_cpu", "job_id", "total_cpu"]  # no temporary files left behind
    with pytest.raises(ValueError, match="not a valid MJF key"):
        write_mjf(tmp_path, {"a/b": "1"}, {})


def test_lower_deadline_files_only_lowers(tmp_path):
    write_mjf(tmp_path, {"shutdowntime": "2000"}, {"shutdowntime_job": "2000"})
    assert lower_deadline_files(tmp_path, 3000) is False
    assert (tmp_path / "machinefeatures" / "shutdowntime").read_text() == "2000"
    assert lower_deadline_files(tmp_path, 1500.9) is True
    assert (tmp_path / "machinefeatures" / "shutdowntime").read_text() == "1500"
    assert (tmp_path / "jobfeatures" / "shutdowntime_job").read_text() == "1500"
    (tmp_path / "jobfeatures" / "shutdowntime_job").write_text("garbage")
    assert lower_deadline_files(tmp_path, 1500) is True
    assert (tmp_path / "jobfeatures" / "shutdowntime_job").read_text() == "1500"


def test_reading_machine_files_is_bounded_and_follows_no_links(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata_base, "MAX_DOCUMENT_BYTES", 10)
    (tmp_path / "ten").write_bytes(b"0123456789")
    (tmp_path / "eleven").write_bytes(b"0123456789a")
    (tmp_path / "link").symlink_to(tmp_path / "ten")
    assert metadata.read_document(tmp_path / "ten") == b"0123456789"
    assert metadata.read_document(tmp_path / "missing") is None
    with pytest.raises(OSError, match="larger than 10 bytes"):
        metadata.read_document(tmp_path / "eleven")
    with pytest.raises(OSError):
        metadata.read_document(tmp_path / "link")


# ---------------------------------------------------------------------------------------------
# Pure: paths, names, log limiting


@pytest.mark.parametrize(("raw", "segments"), [
    ("/", []),
    ("//latest//meta-data/", ["latest", "meta-data"]),
    ("/openstack/latest/meta_data.json", ["openstack", "latest", "meta_data.json"]),
    ("/joboutputs/a%20b", ["joboutputs", "a b"]),
])
def test_path_segments(raw, segments):
    assert path_segments(raw) == segments


@pytest.mark.parametrize("raw", [
    "/joboutputs/..", "/joboutputs/%2e%2e", "/joboutputs/%2E%2e/x", "/joboutputs/./x",
    "/joboutputs/a%2Fb", "/joboutputs/a%5Cb", "/joboutputs/a%00b", "/joboutputs/a%0Ab",
    "/joboutputs/%ff", "joboutputs/x", "http://host/joboutputs/x",
])
def test_path_segments_refuses_traversal(raw):
    with pytest.raises(BadPath):
        path_segments(raw)


@pytest.mark.parametrize(("name", "allowed"), [
    ("shutdown_message", True), ("heartbeat", True), ("log-1.txt.gz", True), ("_x", True),
    (".hidden", False), ("..", False), ("-rf", False), ("a b", False), ("a/b", False),
    ("", False), ("x" * 128, True), ("x" * 129, False), ("caf\u00e9", False),
])
def test_joboutput_names(name, allowed):
    assert bool(metadata.JOBOUTPUT_NAME.match(name)) is allowed


def test_log_limiter_bursts_then_counts_drops():
    now = [0.0]
    limiter = LogLimiter(burst=3, per_second=1.0, clock=lambda: now[0], max_sources=2)
    assert [limiter.admit("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert limiter.admit("b") == 0  # sources are independent
    now[0] = 1.0
    assert limiter.admit("a") == 2  # one token back: the line reports the two dropped
    assert limiter.admit("a") is None
    limiter.admit("c")  # a third source evicts the oldest one
    assert len(limiter._buckets) == 2


# ---------------------------------------------------------------------------------------------
# Component: the real services on loopback


def make_contexts(root: Path, slots=(1, 2, 3)) -> dict[int, MachineContext]:
    """Fake machines with their files under ``root``; machine 3 has no user_data and no key."""
    settings = make_settings()
    contexts = {}
    for slot in slots:
        machine = make_machine(slot)
        directory = root / "machines" / machine.directory_name
        for sub in ("machinefeatures", "jobfeatures", "joboutputs"):
            (directory / sub).mkdir(parents=True)
        features = mjf_features(machine, settings, Machinetype(name="lhcb"), CREATED)
        write_mjf(directory, *features)
        if slot != 3:
            (directory / "user_data").write_bytes(f"#!/bin/sh\necho slot {slot}\n".encode())
            os.chmod(directory / "user_data", 0o600)
            (directory / "root_public_key").write_text(KEY)
        contexts[slot] = MachineContext(machine, directory)
    return contexts


class Running:
    """Both services on their own event loop in a thread, with fake machines in tmp dirs."""

    def __init__(self, root: Path, limits: Limits, slots=(1, 2, 3)):
        self.root = root
        self.settings = make_settings()
        self.contexts = make_contexts(root, slots)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.services = self.call(metadata.start_services(
            self.settings, self.contexts.get, metadata_address=METADATA_HOST,
            mjf_address=MJF_HOST, port=0, slot_for_address=loopback_slot, limits=limits,
            slots=SLOTS))

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def stop(self) -> None:
        self.call(self.services.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def directory(self, slot: int) -> Path:
        return self.contexts[slot].directory


def _start(tmp_path, limits=None):
    return Running(tmp_path, limits or Limits(idle_timeout_seconds=1.0, body_timeout_seconds=1.0))


@pytest.fixture
def services(tmp_path):
    running = _start(tmp_path)
    yield running
    running.stop()


def request(base: str, path: str, *, slot: Optional[int] = None, address: Optional[str] = None,
            method: str = "GET", body: Optional[bytes] = None,
            headers: Optional[dict] = None) -> tuple[int, dict, bytes]:
    """One HTTP request from the address of ``slot`` (or ``address``)."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(
        url.hostname, url.port, timeout=5, source_address=(address or source(slot), 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def get(base: str, path: str, slot: int = 1) -> bytes:
    status, _, body = request(base, path, slot=slot)
    assert status == 200, (path, status, body)
    return body


def raw_exchange(base: str, data: bytes, slot: int = 1, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    url = urllib.parse.urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=read_timeout,
                                  source_address=(source(slot), 0)) as sock:
        sock.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


@pytest.mark.component
def test_ec2_paths(services):
    base = services.services.metadata_url
    machine = services.contexts[1].machine
    for version in ("latest", "2009-04-04", "2016-09-02", "2021-03-23", "1.0"):
        assert get(base, f"/{version}/user-data") == b"#!/bin/sh\necho slot 1\n"
        assert get(base, f"/{version}/meta-data/instance-id") == machine.uuid.encode()
    listing = get(base, "/latest/meta-data/")
    assert get(base, "/latest/meta-data") == listing  # cloud-init 0.7.5 omits the slash
    assert listing.decode().splitlines() == [
        "ami-id", "hostname", "instance-id", "local-hostname", "local-ipv4", "placement/",
        "public-keys/"]
    assert get(base, "/latest/meta-data/ami-id") == machine.uuid.encode()
    assert get(base, "/latest/meta-data/hostname") == machine.name.encode()
    assert get(base, "/latest/meta-data/local-ipv4") == b"169.254.169.1"
    assert get(base, "/latest/meta-data/placement/availability-zone") == b"factory.example.org"
    assert get(base, "/latest/meta-data/public-keys/") == b"0=root"
    assert get(base, "/latest/meta-data/public-keys") == b"0=root"
    assert get(base, "/latest/meta-data/public-keys/0/") == b"openssh-key"
    assert get(base, "/latest/meta-data/public-keys/0/openssh-key") == KEY.encode() + b"\n"
    assert get(base, "/latest") == b"meta-data\nuser-data"
    classic = json.loads(get(base, "/latest/meta-data.json"))
    assert classic["uuid"] == machine.uuid
    for missing in ("/latest/meta-data/nothing", "/latest/nothing", "/", "/notaversion/user-data",
                    "/latest/meta-data/hostname/extra"):
        assert request(base, missing, slot=1)[0] == 404, missing


@pytest.mark.component
def test_ec2_paths_of_a_machine_without_user_data_or_key(services):
    base = services.services.metadata_url
    assert request(base, "/latest/user-data", slot=3)[0] == 404  # cloud-init: empty user-data
    assert b"public-keys" not in get(base, "/latest/meta-data/", slot=3)
    assert request(base, "/latest/meta-data/public-keys/0/openssh-key", slot=3)[0] == 404
    document = json.loads(get(base, "/openstack/latest/meta_data.json", slot=3))
    assert "public_keys" not in document
    assert "user_data" not in get(base, "/openstack/latest/", slot=3).decode().split()


@pytest.mark.component
def test_openstack_paths(services):
    base = services.services.metadata_url
    machine = services.contexts[2].machine
    versions = get(base, "/openstack", slot=2).decode().splitlines()
    assert get(base, "/openstack/", slot=2).decode().splitlines() == versions
    assert "2018-08-27" in versions and versions[-1] == "latest"
    for version in ("latest", "2018-08-27", "2012-08-10"):
        response_status, headers, body = request(
            base, f"/openstack/{version}/meta_data.json", slot=2)
        assert response_status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body) == {
            "uuid": machine.uuid, "name": machine.name, "hostname": machine.name,
            "availability_zone": "factory.example.org", "launch_index": 0,
            "public_keys": {"0": KEY},
            "meta": {"machinefeatures": f"{services.services.mjf_url}/machinefeatures",
                     "jobfeatures": f"{services.services.mjf_url}/jobfeatures",
                     "joboutputs": f"{services.services.mjf_url}/joboutputs",
                     "machinetype": "lhcb"}}
        assert get(base, f"/openstack/{version}/user_data", slot=2) == b"#!/bin/sh\necho slot 2\n"
        assert json.loads(get(base, f"/openstack/{version}/vendor_data.json", slot=2)) == {}
        assert json.loads(get(base, f"/openstack/{version}/vendor_data2.json", slot=2)) == {}
        network = json.loads(get(base, f"/openstack/{version}/network_data.json", slot=2))
        assert network["links"][0]["ethernet_mac_address"] == machine.mac
        assert network["networks"][0]["type"] == "ipv4_dhcp"
    assert get(base, "/openstack/latest", slot=2).decode().splitlines() == [
        "meta_data.json", "network_data.json", "user_data", "vendor_data.json",
        "vendor_data2.json"]
    # the classic hyphenated names, for old images
    assert json.loads(get(base, "/openstack/2016-06-30/meta-data.json", slot=2))["uuid"] == \
        machine.uuid
    assert get(base, "/openstack/latest/user-data", slot=2) == b"#!/bin/sh\necho slot 2\n"
    assert get(base, "/openstack/latest/meta-data/instance-id", slot=2) == machine.uuid.encode()
    assert request(base, "/openstack/bogus/meta_data.json", slot=2)[0] == 404
    assert request(base, "/openstack/latest/secrets.json", slot=2)[0] == 404


def crawl_ec2(base: str, url: str, slot: int) -> dict:
    """Walk a meta-data tree the way cloud-init's MetadataMaterializer does."""
    result: dict = {}
    for line in get(base, url, slot).decode().splitlines():
        line = line.strip()
        if line.endswith("/"):
            result[line[:-1]] = crawl_ec2(base, url.rstrip("/") + "/" + line, slot)
        elif "=" in line:
            index, name = line.split("=", 1)
            result[name] = get(base, f"{url.rstrip('/')}/{index}/openssh-key", slot).decode()
        else:
            result[line] = get(base, f"{url.rstrip('/')}/{line}", slot).decode()
    return result


@pytest.mark.component
def test_cloud_init_openstack_then_ec2_sequence(services):
    """STANDARDS.md §A5: what cloud-init's OpenStack and EC2 datasources request, in order."""
    base = services.services.metadata_url
    known = ["2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
             "2016-10-06", "2017-02-22", "2018-08-27"]
    offered = get(base, "/openstack").decode().splitlines()
    version = next((v for v in reversed(known) if v in offered), "latest")
    assert version == "2018-08-27"
    meta = json.loads(get(base, f"/openstack/{version}/meta_data.json"))
    assert meta["uuid"] == services.contexts[1].machine.uuid  # mandatory: the instance-id
    for optional in ("user_data", "vendor_data.json", "vendor_data2.json", "network_data.json"):
        status, _, body = request(base, f"/openstack/{version}/{optional}", slot=1)
        assert status == 200
        if optional.endswith(".json"):
            json.loads(body)
    ec2 = crawl_ec2(base, "/latest/meta-data", 1)
    assert ec2["instance-id"] == meta["uuid"] and ec2["public-keys"] == {"root": KEY + "\n"}
    # EC2 datasource: no IMDSv2 token service (off AWS), version probes, user-data, crawl
    assert request(base, "/latest/api/token", slot=1, method="PUT", body=b"",
                   headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})[0] == 405
    for probe in ("2009-04-04", "2021-03-23", "2016-09-02"):
        assert get(base, f"/{probe}/meta-data/instance-id") == meta["uuid"].encode()
    assert crawl_ec2(base, "/2021-03-23/meta-data/", 1) == ec2


@pytest.mark.component
def test_mjf_listings_keys_and_absent_keys(services):
    base = services.services.mjf_url
    directory = services.directory(1)
    for name in ("machinefeatures", "jobfeatures"):
        listing = get(base, f"/{name}")
        assert get(base, f"/{name}/") == listing
        keys = sorted(path.name for path in (directory / name).iterdir())
        assert listing.decode() == "<html><body><ul>" + "".join(
            f'<li><a href="{key}">{key}</a></li>' for key in keys) + "</ul></body></html>"
        for key in keys:
            status, headers, body = request(base, f"/{name}/{key}", slot=1)
            assert status == 200 and body == (directory / name / key).read_bytes()
            assert headers["Content-Type"].startswith("text/plain")
    assert get(base, "/jobfeatures/allocated_cpu") == b"2\n"
    assert get(base, "/machinefeatures/shutdowntime") == str(CREATED + 86400).encode()
    for absent in ("/machinefeatures/grace_secs", "/jobfeatures/max_swap_bytes",
                   "/jobfeatures/scratch_limit_bytes", "/machinefeatures/no-such-key!",
                   "/nothing", "/machinefeatures/hs06/x"):
        status, _, body = request(base, absent, slot=1)
        assert status == 404 and body != b"", absent  # never an empty 200
    assert request(base, "/joboutputs/", slot=1)[0] == 403
    (directory / "joboutputs" / "log").write_text("secret")
    assert request(base, "/joboutputs/log", slot=1)[0] == 403
    assert request(base, "/jobfeatures/job_id", slot=1, method="HEAD")[0] == 200
    assert request(base, "/jobfeatures/job_id", slot=1, method="DELETE")[0] == 405


@pytest.mark.component
def test_mjf_put_and_post_store_atomically(services):
    base = services.services.mjf_url
    outputs = services.directory(1) / "joboutputs"
    status, _, _ = request(base, "/joboutputs/shutdown_message", slot=1, method="PUT",
                           body=b"300 No more work")
    assert status == 201
    assert (outputs / "shutdown_message").read_bytes() == b"300 No more work"
    assert stat.S_IMODE((outputs / "shutdown_message").stat().st_mode) == 0o644
    # busybox wget --post-data: POST, form content type, same rules
    status, _, _ = request(base, "/joboutputs/shutdown_message", slot=1, method="POST",
                           body=b"100 Shutdown as requested",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 201
    assert (outputs / "shutdown_message").read_bytes() == b"100 Shutdown as requested"
    assert request(base, "/joboutputs/empty", slot=1, method="PUT", body=b"")[0] == 201
    assert (outputs / "empty").read_bytes() == b""
    # Expect: 100-continue is answered once the checks pass (as curl sends for bodies > 1 KiB)
    body = b"x" * 5000
    reply = raw_exchange(base, b"PUT /joboutputs/big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000"
                         b"\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" + body, slot=1)
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201")
    assert (outputs / "big").read_bytes() == body
    assert sorted(path.name for path in outputs.iterdir()) == ["big", "empty", "shutdown_message"]


@pytest.mark.component
@pytest.mark.parametrize("path", [
    "/joboutputs/..", "/joboutputs/%2e%2e", "/joboutputs/%2e%2e/user_data",
    "/joboutputs/..%2Fuser_data", "/joboutputs/%2E%2E%2Fuser_data", "/joboutputs/a%2Fb",
    "/joboutputs/.hidden", "/joboutputs/", "/joboutputs", "/joboutputs/a/b",
    "/machinefeatures/total_cpu", "/joboutputs/a%20b", "/../user_data",
    "/joboutputs/%00", "/joboutputs/a%0Ab", "/joboutputs/" + "x" * 129,
])
def test_mjf_put_refuses_names_outside_the_allow_list(services, path):
    before = {p: p.read_bytes() for p in services.root.rglob("*") if p.is_file()}
    status, _, body = request(services.services.mjf_url, path, slot=1, method="PUT",
                              body=b"pwned")
    assert status == 403, body
    after = {p: p.read_bytes() for p in services.root.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.component
def test_mjf_put_size_caps(services):
    base = services.services.mjf_url
    outputs = services.directory(1) / "joboutputs"
    limit = metadata.DEFAULT_LIMITS.joboutput_file_bytes
    assert request(base, "/joboutputs/at_limit", slot=1, method="PUT",
                   body=b"a" * limit)[0] == 201
    assert request(base, "/joboutputs/over", slot=1, method="PUT",
                   body=b"a" * (limit + 1))[0] == 413
    # A 100 MB upload is refused on its headers alone: only a few bytes are ever sent.
    started = time.monotonic()
    reply = raw_exchange(base, b"PUT /joboutputs/huge HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100000000\r\n\r\n" + b"a" * 1000, slot=1)
    assert status_of(reply) == 413 and time.monotonic() - started < 4
    # With Expect: 100-continue, no 100 is sent: the client learns it without sending anything.
    reply = raw_exchange(base, b"PUT /joboutputs/huge HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n", slot=1)
    assert reply.startswith(b"HTTP/1.1 413")
    # chunked bodies have no Content-Length to check in advance
    reply = raw_exchange(base, b"PUT /joboutputs/chunked HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n", slot=1)
    assert status_of(reply) == 411
    reply = raw_exchange(base, b"PUT /joboutputs/odd HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1\r\nExpect: something\r\nConnection: close\r\n\r\nx",
                         slot=1)
    assert status_of(reply) == 417
    assert sorted(path.name for path in outputs.iterdir()) == ["at_limit"]


@pytest.mark.component
def test_mjf_per_machine_quota(tmp_path):
    running = _start(tmp_path, Limits(joboutput_file_bytes=1000, joboutputs_total_bytes=2500,
                                      joboutputs_max_files=3))
    try:
        base = running.services.mjf_url

        def put(name: str, size: int, slot: int = 1) -> int:
            return request(base, f"/joboutputs/{name}", slot=slot, method="PUT",
                           body=b"x" * size)[0]

        assert put("a", 1000) == 201 and put("b", 1000) == 201
        assert put("c", 1000) == 413  # 3000 > 2500 in total
        assert put("b", 1000) == 201  # replacing a file does not count it twice
        assert put("c", 400) == 201
        assert put("d", 1) == 403  # a fourth file
        assert put("a", 1) == 201  # but files can still be replaced
        assert put("d", 1000, slot=2) == 201  # quotas are per machine
        assert sorted(p.name for p in (running.directory(1) / "joboutputs").iterdir()) == [
            "a", "b", "c"]
    finally:
        running.stop()


@pytest.mark.component
def test_slow_clients_are_cut_off(services):
    base = services.services.mjf_url
    outputs = services.directory(1) / "joboutputs"
    # headers that never finish: closed after the idle timeout (1 s here) with nothing stored
    started = time.monotonic()
    reply = raw_exchange(base, b"PUT /joboutputs/slow HTTP/1.1\r\nHost: x\r\nContent-Le", slot=1)
    assert reply == b"" and 0.5 < time.monotonic() - started < 4
    # an idle connection that never sends anything is closed too
    started = time.monotonic()
    assert raw_exchange(base, b"", slot=1) == b""
    assert time.monotonic() - started < 4
    # a body that trickles: 408 after the body timeout (1 s here), nothing stored
    url = urllib.parse.urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=5,
                                  source_address=(source(1), 0)) as sock:
        sock.sendall(b"PUT /joboutputs/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        started = time.monotonic()
        reply = sock.recv(65536)
        assert status_of(reply) == 408 and time.monotonic() - started < 4
    assert list(outputs.iterdir()) == []
    # a client that gives up half way leaves nothing behind, and the service carries on
    with socket.create_connection((url.hostname, url.port), timeout=5,
                                  source_address=(source(1), 0)) as sock:
        sock.sendall(b"PUT /joboutputs/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    assert request(base, "/joboutputs/after", slot=1, method="PUT", body=b"ok")[0] == 201
    assert [path.name for path in outputs.iterdir()] == ["after"]


@pytest.mark.component
def test_machines_are_isolated(services):
    meta, mjf = services.services.metadata_url, services.services.mjf_url
    uuids = {slot: context.machine.uuid for slot, context in services.contexts.items()}
    for slot in (1, 2, 3):
        others = [uuid.encode() for other, uuid in uuids.items() if other != slot]
        # identity comes from the TCP source only: a forged header changes nothing
        spoof = {"X-Forwarded-For": source(2 if slot != 2 else 1),
                 "X-Real-IP": source(2 if slot != 2 else 1)}
        for base, path in ((meta, "/openstack/latest/meta_data.json"),
                           (meta, "/latest/meta-data/instance-id"),
                           (mjf, "/jobfeatures/job_id")):
            status, _, body = request(base, path, slot=slot, headers=spoof)
            assert status == 200 and uuids[slot].encode() in body
            assert not any(other in body for other in others)
        assert request(mjf, "/joboutputs/mine", slot=slot, method="PUT",
                       body=f"from {slot}".encode(), headers=spoof)[0] == 201
    for slot in (1, 2, 3):
        assert (services.directory(slot) / "joboutputs" / "mine").read_text() == f"from {slot}"
    assert get(meta, "/latest/user-data", slot=2) == b"#!/bin/sh\necho slot 2\n"
    # unknown sources: a non-slot address and an empty slot
    for address in (STRANGER, EMPTY_SLOT):
        assert request(meta, "/latest/user-data", address=address)[0] == 404
        assert request(meta, "/openstack/latest/meta_data.json", address=address)[0] == 404
        assert request(mjf, "/jobfeatures/job_id", address=address)[0] == 404
        assert request(mjf, "/joboutputs/x", address=address, method="PUT", body=b"x")[0] == 403


@pytest.mark.component
def test_a_resolver_answer_for_another_slot_is_refused(services):
    services.contexts[4] = services.contexts[1]  # daemon bug: slot 4 maps to slot 1's machine
    assert request(services.services.mjf_url, "/jobfeatures/job_id",
                   address=EMPTY_SLOT)[0] == 404


@pytest.mark.component
def test_request_log_is_rate_limited(tmp_path, caplog):
    running = _start(tmp_path, Limits(log_burst=3, log_per_second=0.001))
    try:
        with caplog.at_level(logging.INFO, logger="vac.services.metadata"):
            for _ in range(10):
                request(running.services.mjf_url, "/jobfeatures/job_id", slot=1)
            request(running.services.mjf_url, "/jobfeatures/nope", slot=2)
            request(running.services.metadata_url, "/latest/user-data", address=STRANGER)
    finally:
        running.stop()
    lines = [record.getMessage() for record in caplog.records if record.name == "vac.services.metadata"]
    machine1 = [line for line in lines if "factory-01.example.org" in line]
    assert machine1 == ["mjf factory-01.example.org GET /jobfeatures/job_id 200"] * 3
    assert "mjf factory-02.example.org GET /jobfeatures/nope 404" in lines
    assert f"metadata unknown({STRANGER}) GET /latest/user-data 404" in lines


@pytest.mark.component
def test_start_services_refuses_one_address_for_both(tmp_path):
    with pytest.raises(ValueError, match="different addresses"):
        asyncio.run(metadata.start_services(make_settings(), {}.get,
                                            metadata_address=METADATA_HOST,
                                            mjf_address=METADATA_HOST, port=0))


@pytest.mark.component
def test_malformed_requests_get_400_and_a_rate_limited_log(services, caplog):
    base = services.services.mjf_url
    with caplog.at_level(logging.INFO, logger="vac.services.metadata"):
        for garbage in (b"GARBAGE\r\n\r\n", b"GET /jobfeatures/job_id HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: -5\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200
                        + b"\r\n"):
            assert status_of(raw_exchange(base, garbage, slot=1)) in (400, 431)
    assert any(record.name == "vac.services.metadata.http" for record in caplog.records)
    assert get(base, "/jobfeatures/job_id") == services.contexts[1].machine.uuid.encode()


@pytest.mark.component
def test_unreadable_machine_data_is_a_logged_500(services, caplog):
    user_data = services.directory(1) / "user_data"
    user_data.unlink()
    os.symlink("/etc/passwd", user_data)  # symbolic links are never followed
    with caplog.at_level(logging.ERROR, logger="vac.services.metadata"):
        status, _, body = request(services.services.metadata_url, "/latest/user-data", slot=1)
    assert status == 500 and b"root:" not in body
    assert any("user-data" in record.getMessage() for record in caplog.records)


CLOUD_INIT_READER = r"""
import json, sys
import urllib3.util.connection as connection
base, source_address = sys.argv[1], sys.argv[2]
connect = connection.create_connection
def from_the_machine(address, *args, **kwargs):
    if not address[0].startswith("127."):
        raise OSError("test guard: only loopback, not %s" % (address,))
    kwargs["source_address"] = (source_address, 0)
    return connect(address, *args, **kwargs)
connection.create_connection = from_the_machine
from cloudinit.sources.helpers import ec2, openstack
reader = openstack.MetadataReader(base, timeout=5, retries=0)
reader._read_ec2_metadata = lambda: ec2.get_instance_metadata(
    metadata_address=base, timeout=5, retries=0)
result = reader.read_v2()
mac = result["networkdata"]["links"][0]["ethernet_mac_address"]
print(json.dumps({
    "metadata": result["metadata"], "userdata": result["userdata"].decode(),
    "vendordata": result["vendordata"], "vendordata2": result["vendordata2"],
    "network": openstack.convert_net_json(result["networkdata"], known_macs={mac: "eth0"}),
    "ec2": result["ec2-metadata"],
    "ec2_user_data": ec2.get_instance_userdata(
        api_version="2009-04-04", metadata_address=base, timeout=5, retries=0).decode(),
}, sort_keys=True))
"""


def _system_cloud_init() -> bool:
    try:
        return subprocess.run(["/usr/bin/python3", "-c", "import cloudinit"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.component
def test_real_cloud_init_readers(services):
    """cloud-init's own OpenStack and EC2 metadata readers against the service."""
    # .ci/run installs it with the real-VM tier's packages.
    require(SYSTEM, None if _system_cloud_init()
            else "cloud-init for /usr/bin/python3 (Debian package cloud-init) not installed")
    completed = subprocess.run(
        ["/usr/bin/python3", "-c", CLOUD_INIT_READER, services.services.metadata_url, source(1)],
        capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    machine = services.contexts[1].machine
    assert result["metadata"]["instance-id"] == machine.uuid
    assert result["metadata"]["local-hostname"] == machine.name
    assert result["metadata"]["public_keys"] == {"0": KEY}
    assert result["metadata"]["meta"]["machinetype"] == "lhcb"
    assert result["userdata"] == result["ec2_user_data"] == "#!/bin/sh\necho slot 1\n"
    assert result["vendordata"] == {} and result["vendordata2"] == {}
    assert result["network"]["config"] == [{"mac_address": machine.mac, "name": "eth0",
                                            "subnets": [{"type": "dhcp4"}], "type": "physical"}]
    assert result["ec2"]["instance-id"] == machine.uuid
    assert result["ec2"]["public-keys"] == {"root": [KEY]}
