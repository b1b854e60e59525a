"""VacQuery over real loopback sockets: many responders, one client, classic peers, the CLI.

Responders run in their own thread and event loop (like peers on other hosts); clients run in
the test's thread. Factories live on 127.0.0.2 upwards, ports 19950 upwards.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time

import pytest

from vac.cli import main as cli
from vac.core.config import FactoryAddress, Settings
from vac.core.model import MachinetypeReport
from vac.services import vacquery

pytestmark = pytest.mark.component

SPACE = "vac01.example.ac.uk"
SECRET = b"a-secret-shared-by-the-space"


def factory_name(n: int) -> str:
    return f"factory{n:02d}.example.ac.uk"


def space_factories(count: int, port: int) -> tuple:
    return tuple(FactoryAddress(factory_name(n), f"127.0.0.{n + 2}", port) for n in range(count))


def factory_settings(entry: FactoryAddress, factories: tuple, **changes) -> Settings:
    return Settings(vac_space=SPACE, factory_name=entry.name, factories=factories,
                    vacquery_address=entry.address, vacquery_port=entry.port, udp_timeout_seconds=2.0,
                    **changes)


def snapshot_for(name: str, slots: int = 4, machinetypes: int = 3) -> vacquery.StatusSnapshot:
    host, _, domain = name.partition(".")
    now = time.time()
    machines = [vacquery.MachineStatus(
        factory=name, machine=f"{host}-{n:02d}.{domain}", state="Running", machinetype=f"type{n % 3}",
        machine_model="cernvm4", uuid=f"{host}-uuid-{n}", created_time=now - 600, started_time=now - 500,
        heartbeat_time=now - 10, processors=1, cpu_seconds=450, cpu_percentage=99.0, hs06=10.0)
        for n in range(slots)]
    reports = [MachinetypeReport(factory=name, machinetype=f"type{n}", running_hs06=10.0 * n,
                                 running_machines=n, running_processors=n)
               for n in range(machinetypes)]
    status = vacquery.FactoryStatus(factory=name, running_processors=slots, running_machines=slots,
                                    running_hs06=10.0 * slots, max_processors=slots, max_machines=slots,
                                    max_hs06=10.0 * slots)
    return vacquery.StatusSnapshot(machines, reports, status)


class PeerLoop:
    """An event loop in a thread hosting responders: the other hosts of the space."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.responders: dict = {}

    def call(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, settings: Settings, snapshot: vacquery.StatusSnapshot, secret=None, **options):
        responder = self.call(vacquery.start_responder(settings, lambda: snapshot, secret, **options))
        self.responders[settings.factory_name] = responder
        return responder

    def stop(self, name: str) -> None:
        self.loop.call_soon_threadsafe(self.responders.pop(name).close)

    def close(self) -> None:
        for name in list(self.responders):
            self.stop(name)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def peers():
    peer_loop = PeerLoop()
    yield peer_loop
    peer_loop.close()


def start_space(peers: PeerLoop, count: int, port: int, **changes) -> tuple:
    factories = space_factories(count, port)
    for entry in factories:
        peers.start(factory_settings(entry, factories, **changes), snapshot_for(entry.name))
    return factories


def test_twenty_factories_answer_completely_and_five_stopped_ones_are_named(peers):
    factories = start_space(peers, 20, 19950)
    client = factory_settings(factories[0], factories)
    for kind, per_factory in ((vacquery.MACHINES, 4), (vacquery.MACHINETYPES, 3), (vacquery.FACTORY, 1)):
        result = asyncio.run(vacquery.query(client, kind, timeout=2.0))
        assert result.complete, (kind, result.silent, result.incomplete, result.dropped)
        assert len(result.reports) == 20 * per_factory and result.answered == [f.name for f in factories]
    stopped = [factories[n].name for n in (3, 7, 11, 15, 19)]
    for name in stopped:
        peers.stop(name)
    started = time.monotonic()
    result = asyncio.run(vacquery.query_machinetypes(client, timeout=1.5))
    elapsed = time.monotonic() - started
    assert elapsed < 1.5 + 0.3
    assert result.silent == stopped and not result.incomplete
    assert len(result.reports) == 15 * 3
    assert {report.factory for report in result.reports} == {f.name for f in factories} - set(stopped)


def test_partial_results_come_back_when_replies_are_lost(peers):
    """A responder that drops every other datagram: resends complete the answer."""
    factories = space_factories(1, 19951)
    responder = peers.start(factory_settings(factories[0], factories), snapshot_for(factories[0].name, slots=10))
    original = responder._answer
    counter = {"n": 0}

    class Lossy:
        def __init__(self, sock):
            self.sock = sock

        def sendto(self, data, addr):
            counter["n"] += 1
            if counter["n"] % 2 or counter["n"] > 30:
                self.sock.sendto(data, addr)

    def lossy_answer(data, addr):
        real = responder.sock
        responder.sock = Lossy(real)
        try:
            original(data, addr)
        finally:
            responder.sock = real

    responder._answer = lossy_answer
    responder._gso = False  # datagram by datagram, so that the loss pattern is per datagram
    result = asyncio.run(vacquery.query_machines(factory_settings(factories[0], factories), timeout=3.0))
    assert result.complete and len(result.reports) == 10


def test_the_deadline_holds_while_a_peer_keeps_sending_garbage(peers, caplog):
    """Classic clients loop forever while packets arrive; ours stops at its deadline."""
    factories = space_factories(2, 19952)
    peers.start(factory_settings(factories[0], factories), snapshot_for(factories[0].name))
    client = factory_settings(factories[0], factories)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind((factories[1].address, factories[1].port))  # the second factory floods junk
    stop = threading.Event()

    def flood():
        sender.settimeout(0.05)
        targets = set()
        while not stop.is_set():
            try:
                _, addr = sender.recvfrom(4096)
                targets.add(addr)
            except socket.timeout:
                pass
            for addr in targets:
                for _ in range(50):
                    sender.sendto(b'{"message_type": "machinetype_status"}', addr)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="vac.services.vacquery.client"):
            result = asyncio.run(vacquery.query_machinetypes(client, timeout=1.0))
        assert time.monotonic() - started < 1.5
    finally:
        stop.set()
        thread.join(5)
        sender.close()
    assert result.answered == [factories[0].name] and result.silent == [factories[1].name]
    dropped = result.dropped["malformed reply"]
    assert dropped > 0
    assert [record for record in caplog.records if record.getMessage().startswith("VacQuery machinetypes query: ")
            and f"{dropped} (malformed reply: cookie missing)" in record.getMessage()]


def test_shared_secret_between_our_factories(peers):
    factories = space_factories(3, 19953)
    strict = dict(vacquery_allow_unauthenticated=False)
    peers.start(factory_settings(factories[0], factories, **strict), snapshot_for(factories[0].name), SECRET)
    peers.start(factory_settings(factories[1], factories, **strict), snapshot_for(factories[1].name),
                b"a-different-secret-entirely")
    peers.start(factory_settings(factories[2], factories, **strict), snapshot_for(factories[2].name), SECRET)
    client = factory_settings(factories[0], factories, **strict)
    signed = asyncio.run(vacquery.query_factories(client, timeout=1.0, secret=SECRET))
    assert signed.answered == [factories[0].name, factories[2].name]
    assert signed.silent == [factories[1].name]  # its replies never come: it drops our queries
    unsigned = asyncio.run(vacquery.query_factories(client, timeout=0.5))
    assert unsigned.silent == [f.name for f in factories]


# --- classic peers -------------------------------------------------------------------------------


def classic_query(kind: str, salt: str, factory: str) -> bytes:
    """As classic Vac 03 builds it: json.dumps defaults, REFERENCE.md §2.2 keys."""
    message = {"message_type": kind + "_query", "vac_version": "Vac 03.01 vac-command",
               "vacquery_version": "VacQuery 01.03", "space": SPACE,
               "cookie": hashlib.sha256((salt + factory).encode()).hexdigest()}
    if kind == "machines":
        message["method"] = "machines"
    return json.dumps(message).encode()


CLASSIC_REQUIRED = {
    "machinetype_status": ["num_machinetypes", "machinetype", "running_hs06", "num_before_fizzle",
                           "shutdown_message", "shutdown_time", "shutdown_machine"],
    "machine_status": ["num_machines", "machine", "state", "uuid", "created_time", "started_time",
                       "heartbeat_time", "cpu_seconds", "cpu_percentage", "hs06", "machinetype",
                       "shutdown_message", "shutdown_time"],
}


@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_classic_client_gets_answers_it_accepts(peers, secret):
    """The classic client's acceptance rules (REFERENCE.md §2.4) and its 10240-byte buffer."""
    factories = space_factories(2, 19954)
    peers.start(factory_settings(factories[0], factories), snapshot_for(factories[0].name), secret)
    salt = base64.b64encode(os.urandom(32)).decode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((factories[1].address, 0))  # a classic factory of the space
        sock.settimeout(2.0)
        for kind, message_type, expected in (("machinetypes", "machinetype_status", 3),
                                             ("machines", "machine_status", 4)):
            sock.sendto(classic_query(kind, salt, factories[0].name), (factories[0].address, factories[0].port))
            accepted = {}
            while len(accepted) < expected:
                response = json.loads(sock.recvfrom(10240)[0])
                assert response["message_type"] == message_type and response["space"] == SPACE
                assert response["cookie"] == hashlib.sha256((salt + response["factory"]).encode()).hexdigest()
                assert all(key in response for key in CLASSIC_REQUIRED[message_type])
                assert isinstance(response["time_sent"], int)
                accepted[response.get("machinetype") if kind == "machinetypes" else response["machine"]] = response
            assert all(r["num_" + kind] == expected for r in accepted.values())


class ClassicResponder:
    """Answers machinetypes and factory queries as classic Vac 03 does (python2 json.dumps
    defaults, float ctimes, no hmac), in a thread with a blocking socket."""

    def __init__(self, address: str, port: int, name: str):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.sock.settimeout(0.1)
        self.stopping = threading.Event()
        self.queries = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping.is_set():
            try:
                data, addr = self.sock.recvfrom(1024)
            except socket.timeout:
                continue
            query = json.loads(data)
            if "cookie" not in query or query.get("space") != SPACE:
                continue
            self.queries.append(query)
            common = {"vac_version": "Vac 03.01 vacd-responder", "daemon_version": "Vac 03.01 vacd-responder",
                      "vacquery_version": "VacQuery 01.03", "cookie": query["cookie"], "space": SPACE,
                      "factory": self.name, "time_sent": int(time.time()), "site": "example.ac.uk"}
            if query.get("message_type") == "machinetypes_query":
                for n, machinetype in enumerate(["alice", "cms"]):
                    message = dict(common, message_type="machinetype_status", num_machinetypes=2,
                                   machinetype=machinetype, bytes_per_processor=2147483648,
                                   running_hs06=12.5 * n, running_machines=n, running_cpus=n,
                                   running_processors=n, num_before_fizzle=0,
                                   shutdown_message="302 Fizzle" if n else None,
                                   shutdown_time=1767220000.25 if n else None,
                                   shutdown_machine="classic-01.example.ac.uk" if n else None,
                                   max_wallclock_seconds=86400, max_processors=1)
                    self.sock.sendto(json.dumps(message).encode(), addr)
            elif query.get("method") == "factories":
                message = dict(common, message_type="factory_status", running_cpus=1, running_processors=1,
                               running_machines=1, running_hs06=12.5, max_cpus=8, max_processors=8,
                               max_machines=8, max_hs06=100.0, total_cpus=8, total_machines=8,
                               total_hs06=100.0, load_average=0.5, kernel_version="3.10.0",
                               os_issue="Scientific Linux release 7.9 (Nitrogen)")
                self.sock.sendto(json.dumps(message).encode(), addr)

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def test_our_client_reads_a_classic_responder_with_our_secret_set_when_allowed():
    classic = ClassicResponder("127.0.0.2", 19955, "classic.example.ac.uk")
    try:
        factories = (FactoryAddress("classic.example.ac.uk", "127.0.0.2", 19955),)
        client = Settings(vac_space=SPACE, factory_name="ours.example.ac.uk", factories=factories,
                          vacquery_address="127.0.0.3", vacquery_port=19955)
        result = asyncio.run(vacquery.query_machinetypes(client, timeout=1.0, secret=SECRET))
        assert result.complete
        assert result.reports[1] == MachinetypeReport(
            factory="classic.example.ac.uk", machinetype="cms", running_hs06=12.5, running_machines=1,
            running_processors=1, shutdown_message="302 Fizzle", shutdown_time=1767220000,
            shutdown_machine="classic-01.example.ac.uk", max_wallclock_seconds=86400, max_processors=1)
        factory = asyncio.run(vacquery.query_factories(client, timeout=1.0))
        assert factory.complete and factory.reports[0].version == "03.01"
        assert factory.reports[0].max_processors == 8
        assert {query["vacquery_version"] for query in classic.queries} == {"VacQuery 01.03"}
        strict = dataclasses.replace(client, vacquery_allow_unauthenticated=False)
        refused = asyncio.run(vacquery.query_machinetypes(strict, timeout=0.5, secret=SECRET))
        assert refused.silent == ["classic.example.ac.uk"] and refused.dropped["unsigned message"] >= 2
    finally:
        classic.close()


# --- peer cache, VacMon --------------------------------------------------------------------------


def test_peer_cache_refreshes_from_real_responders(peers):
    factories = start_space(peers, 4, 19956)
    cache = vacquery.PeerReportCache(factory_settings(factories[0], factories), 30, timeout=1.0)
    asyncio.run(cache.refresh())
    reports = cache.reports()
    assert {r.factory for r in reports} == {f.name for f in factories[1:]}  # not itself
    assert len(reports) == 9 and cache.last_result.complete


def test_peer_cache_run_loop_refreshes_on_demand(peers):
    factories = start_space(peers, 2, 19957)

    async def scenario():
        cache = vacquery.PeerReportCache(factory_settings(factories[0], factories), 3600, timeout=0.5)
        task = asyncio.ensure_future(cache.run())
        for _ in range(100):
            if cache.reports():
                break
            await asyncio.sleep(0.02)
        first = cache.last_result
        cache.request_refresh()
        for _ in range(100):
            if cache.last_result is not first:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        return first, cache.last_result, cache.reports()

    first, second, reports = asyncio.run(scenario())
    assert first is not None and second is not first and len(reports) == 3


def test_send_vacmon_reaches_every_hostport():
    receivers = []
    for port in (19958, 19959):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.2", port))
        sock.settimeout(2.0)
        receivers.append(sock)
    try:
        settings = Settings(vac_space=SPACE, factory_name="f.example.ac.uk",
                            vacmon_hostport=("127.0.0.2:19958", "localhost-does-not-resolve.invalid:1",
                                             "127.0.0.2:19959"))
        messages = vacquery.vacmon_cycle_messages(settings, snapshot_for("f.example.ac.uk"))
        assert asyncio.run(vacquery.send_vacmon(settings, messages)) == 2 * len(messages)
        for sock in receivers:
            got = [json.loads(sock.recvfrom(4096)[0]) for _ in messages]
            assert got[0]["message_type"] == "factory_status" and {m["cookie"] for m in got} == {"0"}
    finally:
        for sock in receivers:
            sock.close()


# --- the vac commands ----------------------------------------------------------------------------


def write_conf(tmp_path, factories, own: FactoryAddress, extra: str = "") -> list:
    listed = " ".join(f"{f.name}@{f.address}" for f in factories)
    (tmp_path / "vac.conf").write_text(
        f"[settings]\nvac_space = {SPACE}\nfactory_name = {own.name}\nfactories = {listed}\n"
        f"vacquery_port = {own.port}\nvacquery_address = {own.address}\nudp_timeout_seconds = 1\n{extra}")
    (tmp_path / "vac.d").mkdir(exist_ok=True)
    return ["--conf", str(tmp_path / "vac.conf"), "--conf-dir", str(tmp_path / "vac.d"),
            "--run-conf", str(tmp_path / "run.conf")]


def test_vac_machines_machinetypes_factories(peers, tmp_path, capsys):
    factories = start_space(peers, 3, 19960)
    conf = write_conf(tmp_path, factories, factories[0])
    assert cli.main([*conf, "machines"]) == 0
    out = capsys.readouterr().out
    assert "factory00-03" in out and "factory02-00" in out
    assert "12 slots on 3 factories: 12 running" in out
    assert cli.main([*conf, "machinetypes"]) == 0
    out = capsys.readouterr().out
    assert "3 machinetypes on 3 factories: 9 machines" in out and "ALL FACTORIES" in out
    assert cli.main([*conf, "machinetype", "type2", "."]) == 0
    out = capsys.readouterr().out
    assert "machinetype type2 on 1 factory: 2 machines" in out and "type1" not in out
    assert cli.main([*conf, "factories", "-J", factories[1].name]) == 0
    [message] = json.loads(capsys.readouterr().out)
    assert message["factory"] == factories[1].name and message["message_type"] == "factory_status"


def test_vac_commands_name_silent_factories_and_fail(peers, tmp_path, capsys):
    factories = start_space(peers, 2, 19961)
    dead = FactoryAddress("dead.example.ac.uk", "127.0.0.30", 19961)
    conf = write_conf(tmp_path, (*factories, dead), factories[0])
    started = time.monotonic()
    assert cli.main([*conf, "factories", "-t", "0.5"]) == 1
    assert time.monotonic() - started < 1.5
    out = capsys.readouterr().out
    assert "2 factories:" in out and "no answer from 1 factory: dead.example.ac.uk" in out
    assert cli.main([*conf, "machines", "-J", "-t", "0.3"]) == 1
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 8 and "dead.example.ac.uk" in captured.err
    assert cli.main([*conf, "machines", "--space", "other.space", "-t", "0.3"]) == 1
    assert "no answer from 3 factories" in capsys.readouterr().out


def test_vac_ssh_execs_ssh_to_the_right_factory(peers, tmp_path, capsys, monkeypatch):
    factories = start_space(peers, 3, 19962)
    conf = write_conf(tmp_path, factories, factories[0], "root_public_key = /root/.ssh/vac_key.pub\n")
    calls = []

    def fake_execvp(program, argv):
        calls.append(argv)
        raise OSError("not really")

    monkeypatch.setattr(os, "execvp", fake_execvp)
    assert cli.main([*conf, "ssh", "factory02-01", "cat", "/etc/motd"]) == 1
    [argv] = calls
    assert argv[:3] == ["ssh", "-i", "/root/.ssh/vac_key"]
    assert argv[argv.index("-J") + 1] == factories[2].address
    assert argv[-3:] == ["root@169.254.169.1", "cat", "/etc/motd"]
    assert cli.main([*conf, "ssh", "-t", "0.5", "factory00-02"]) == 1
    assert "-J" not in calls[-1] and calls[-1][-1] == "root@169.254.169.2"
    assert cli.main([*conf, "ssh", "-t", "0.5", "nosuch-07"]) == 1
    assert "nosuch-07 was not found" in capsys.readouterr().err
    assert len(calls) == 2
