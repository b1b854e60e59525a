"""VacQuery codec, validation, authentication, responder logic, and the vac command's tables
and ssh command lines (pure tier).

The responder and client logic is driven through a recording socket, without the network;
tests/test_vacquery_component.py runs the same code over real loopback sockets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vac.cli import ssh, tables
from vac.core.config import FactoryAddress, Settings
from vac.core.model import Machine, MachineState, MachinetypeReport
from vac.services import vacquery
from vac.services.vacquery import client as vq_client
from vac.services.vacquery import codec as vq_codec
from vac.services.vacquery import responder as vq_responder

GOLDEN = Path(__file__).parent / "golden" / "vacquery"
NOW = 1767225600  # 2026-01-01 00:00:00 UTC
COOKIE = "c" * 64
SPACE = "vac01.example.ac.uk"
FACTORY_NAME = "factory1.example.ac.uk"
PEER = FactoryAddress("factory2.example.ac.uk", "192.0.2.2")


@pytest.fixture(autouse=True)
def fixed_version(monkeypatch):
    """Golden files must not change with every release."""
    monkeypatch.setattr(vq_codec, "__version__", "04.00.00")


def make_settings(**changes) -> Settings:
    base = Settings(vac_space=SPACE, factory_name=FACTORY_NAME, gocdb_sitename="UKI-EXAMPLE",
                    factories=(FactoryAddress(FACTORY_NAME, "192.0.2.1"), PEER), mb_per_processor=2048,
                    hs06_per_processor=10.0)
    return dataclasses.replace(base, **changes)


MACHINE = vacquery.MachineStatus(
    factory=FACTORY_NAME, machine="factory1-03.example.ac.uk", state="Running", machinetype="lhcb",
    machine_model="cernvm4", uuid="7b6d3c1e-0000-4000-8000-000000000003", created_time=NOW - 3600.4,
    started_time=NOW - 3500, heartbeat_time=NOW - 30, processors=8, cpu_seconds=25000.7,
    cpu_percentage=97.125, hs06=80.0, fqan="/lhcb/Role=NULL/Capability=NULL")
SHUT_DOWN = vacquery.MachineStatus(
    factory=FACTORY_NAME, machine="factory1-04.example.ac.uk", state="Shut down", machinetype="atlas",
    machine_model="cernvm4", uuid="7b6d3c1e-0000-4000-8000-000000000004", created_time=NOW - 90000,
    started_time=NOW - 89000, heartbeat_time=NOW - 600, processors=1, cpu_seconds=3000,
    cpu_percentage=0.0, hs06=10.0, shutdown_message="300 No payload\nsecond line", shutdown_time=NOW - 500)
REPORT = MachinetypeReport(
    factory=FACTORY_NAME, machinetype="lhcb", running_hs06=160.5, running_machines=2, running_processors=16,
    num_before_fizzle=1, shutdown_message="200 Success\nmore detail", shutdown_time=NOW - 100,
    shutdown_machine="factory1-02.example.ac.uk", fqan="/lhcb/Role=NULL/Capability=NULL",
    max_wallclock_seconds=172800, max_processors=8)
FACTORY_STATUS = vacquery.FactoryStatus(
    factory=FACTORY_NAME, running_processors=17, running_machines=3, running_hs06=170.0, max_processors=32,
    max_machines=32, max_hs06=320.0, root_disk_avail_kb=41943040, root_disk_avail_inodes=2500000,
    vac_disk_avail_kb=838860800, vac_disk_avail_inodes=52000000, load_average=12.345,
    kernel_version="5.14.0-427.el9.x86_64", os_issue="AlmaLinux release 9.4 (Seafoam Ocelot)",
    boot_time=NOW - 864000, factory_heartbeat_time=NOW - 20, responder_heartbeat_time=NOW - 5,
    mjf_heartbeat_time=NOW - 7, metadata_heartbeat_time=NOW - 7, swap_used_kb=0, swap_free_kb=8388604,
    mem_used_kb=90000000, mem_total_kb=131072000)


def encoded_messages() -> dict:
    settings_ = make_settings()
    return {
        "machines_query": vacquery.encode_query(vacquery.MACHINES, SPACE, COOKIE),
        "machinetypes_query": vacquery.encode_query(vacquery.MACHINETYPES, SPACE, COOKIE, "vacd-factory"),
        "factory_query": vacquery.encode_query(vacquery.FACTORY, SPACE, COOKIE),
        "machine_status": vacquery.encode_machine_status(
            MACHINE, settings_, num_machines=32, cookie=COOKIE, time_sent=NOW),
        "machine_status_shut_down": vacquery.encode_machine_status(
            SHUT_DOWN, settings_, num_machines=32, cookie=COOKIE, time_sent=NOW),
        "machinetype_status": vacquery.encode_machinetype_status(
            REPORT, settings_, num_machinetypes=3, cookie=COOKIE, time_sent=NOW),
        "factory_status": vacquery.encode_factory_status(
            FACTORY_STATUS, settings_, cookie=COOKIE, time_sent=NOW),
        "vacmon_machine_status": vacquery.vacmon_finish_message(settings_, SHUT_DOWN, 32, time_sent=NOW),
    }


# --- encoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(encoded_messages()))
def test_every_message_type_encodes_as_its_golden_file(golden, name):
    golden(f"vacquery/{name}.json", encoded_messages()[name].decode("ascii") + "\n")


def test_responses_carry_every_classic_key_including_the_deprecated_duplicates():
    messages = {name: json.loads(data) for name, data in encoded_messages().items()}
    common = {"message_type", "vac_version", "daemon_version", "vacquery_version", "cookie", "space",
              "factory", "time_sent", "site"}
    machine = messages["machine_status"]
    assert common | {"num_machines", "machine", "state", "machine_model", "uuid", "created_time",
                     "started_time", "heartbeat_time", "num_cpus", "num_processors", "cpu_seconds",
                     "cpu_percentage", "hs06", "machinetype", "shutdown_message", "shutdown_time",
                     "fqan"} == set(machine)
    machinetype = messages["machinetype_status"]
    assert common | {"num_machinetypes", "machinetype", "bytes_per_processor", "running_hs06",
                     "running_machines", "running_cpus", "running_processors", "num_before_fizzle",
                     "shutdown_message", "shutdown_time", "shutdown_machine", "fqan",
                     "max_wallclock_seconds", "max_processors"} == set(machinetype)
    factory = messages["factory_status"]
    assert {"total_cpus", "total_machines", "total_hs06", "daemon_disk_avail_kb",
            "daemon_disk_avail_inodes", "running_cpus", "max_cpus"} <= set(factory)
    assert factory["total_cpus"] == factory["max_cpus"] == factory["max_processors"] == 32
    assert factory["daemon_disk_avail_kb"] == factory["vac_disk_avail_kb"]
    assert machinetype["bytes_per_processor"] == 2048 * 1048576
    assert machinetype["running_cpus"] == machinetype["running_processors"] == 16
    assert machine["vac_version"] == machine["daemon_version"] == "Vac 04.00.00 vacd-responder"
    assert machine["site"] == "UKI-EXAMPLE"
    assert messages["vacmon_machine_status"]["cookie"] == "0"
    assert messages["vacmon_machine_status"]["vac_version"] == "Vac 04.00.00 vacd-factory"


def test_queries_follow_the_classic_key_sets():
    messages = {name: json.loads(data) for name, data in encoded_messages().items()}
    assert messages["machines_query"]["method"] == "machines"
    assert messages["factory_query"]["method"] == "factories"
    assert "method" not in messages["machinetypes_query"]
    assert messages["machines_query"]["vac_version"] == "Vac 04.00.00 vac-command"
    assert messages["factory_query"]["vac_version"] == "Vac 04.00.00"  # no client name
    assert messages["machinetypes_query"]["vacquery_version"] == "VacQuery 01.03"


def test_floats_have_two_decimals_and_times_are_integers():
    text = encoded_messages()["machine_status"].decode()
    assert '"cpu_percentage":97.12' in text or '"cpu_percentage":97.13' in text
    assert '"hs06":80.00' in text
    assert f'"created_time":{NOW - 3601}' in text  # int() of the float time
    assert '"cpu_seconds":25000,' in text
    assert '"load_average":12.35' in encoded_messages()["factory_status"].decode() \
        or '"load_average":12.34' in encoded_messages()["factory_status"].decode()


def test_machinetype_status_sends_only_the_first_line_of_the_shutdown_message():
    assert json.loads(encoded_messages()["machinetype_status"])["shutdown_message"] == "200 Success"


def test_site_defaults_to_the_space_without_its_first_label():
    assert vacquery.site_name(make_settings(gocdb_sitename=None)) == "example.ac.uk"


def test_cookie_is_the_hex_sha256_of_salt_and_factory_name():
    salt = vacquery.new_salt()
    assert len(salt) == 44 and salt != vacquery.new_salt()
    assert vacquery.make_cookie(salt, FACTORY_NAME) == hashlib.sha256(
        (salt + FACTORY_NAME).encode()).hexdigest()


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=3000))
def test_vm_controlled_text_is_truncated_so_every_reply_fits(message):
    status = dataclasses.replace(SHUT_DOWN, shutdown_message=message)
    data = vacquery.encode_machine_status(status, make_settings(), num_machines=4, cookie=COOKIE)
    assert len(data) <= vacquery.MAX_SEND_BYTES
    response, _ = vacquery.parse_response(data)
    sent = response.record.shutdown_message
    assert sent is None or (len(sent) <= 256 and message.startswith(sent))
    report = dataclasses.replace(REPORT, shutdown_message=message)
    data = vacquery.encode_machinetype_status(report, make_settings(), num_machinetypes=1, cookie=COOKIE)
    assert len(data) <= vacquery.MAX_SEND_BYTES
    vacquery.parse_response(data)


# --- decoding ----------------------------------------------------------------------------------


def test_our_messages_decode_to_the_records_they_were_made_from():
    messages = encoded_messages()
    machine, _ = vacquery.parse_response(messages["machine_status"])
    assert machine.kind == vacquery.MACHINES and machine.count == 32
    assert machine.record == dataclasses.replace(
        MACHINE, created_time=NOW - 3601, cpu_seconds=25000, cpu_percentage=pytest.approx(97.12, abs=0.01))
    shut_down, _ = vacquery.parse_response(messages["machine_status_shut_down"])
    assert shut_down.record.shutdown_message == "300 No payload\nsecond line"
    report, _ = vacquery.parse_response(messages["machinetype_status"])
    assert report.record == dataclasses.replace(REPORT, shutdown_message="200 Success")
    factory, _ = vacquery.parse_response(messages["factory_status"])
    assert factory.record == dataclasses.replace(
        FACTORY_STATUS, load_average=pytest.approx(12.35, abs=0.01), version="04.00.00", site="UKI-EXAMPLE")
    query, _ = vacquery.parse_query(messages["machines_query"])
    assert query == vacquery.Query(vacquery.MACHINES, SPACE, COOKIE, "Vac 04.00.00 vac-command")


@pytest.mark.parametrize("name", ["machines_query", "machinetypes_query", "factory_query"])
def test_query_kinds_decode(name):
    query, _ = vacquery.parse_query(encoded_messages()[name])
    assert query.kind == vacquery.QUERY_TYPES[name]


def test_legacy_method_alone_selects_the_query_kind():
    query, _ = vacquery.parse_query(b'{"method": "factories", "space": "s", "cookie": "x"}')
    assert query.kind == vacquery.FACTORY


def test_classic_format_messages_decode():
    """Hand-written as REFERENCE.md section 2 describes classic Vac 03 output (", " separators,
    float times, empty-slot nulls), not produced by our encoder."""
    machinetype, _ = vacquery.parse_response((GOLDEN / "classic" / "machinetype_status.json").read_bytes())
    assert machinetype.record == MachinetypeReport(
        factory="vac03.example.ac.uk", machinetype="lhcbprod", running_hs06=85.25, running_machines=4,
        running_processors=8, num_before_fizzle=2, shutdown_message="301 Could not connect",
        shutdown_time=1767220000, shutdown_machine="vac03-07.example.ac.uk", fqan=None,
        max_wallclock_seconds=172800, max_processors=2)
    machine, _ = vacquery.parse_response((GOLDEN / "classic" / "machine_status.json").read_bytes())
    assert machine.record.state == "Shut down" and machine.record.machinetype is None
    assert machine.record.processors == 0 and machine.count == 24
    factory, _ = vacquery.parse_response((GOLDEN / "classic" / "factory_status.json").read_bytes())
    assert factory.record.version == "03.01"
    assert factory.record.max_processors == 24 and factory.record.vac_disk_avail_kb == 500000000
    query, _ = vacquery.parse_query((GOLDEN / "classic" / "machines_query.json").read_bytes())
    assert query.kind == vacquery.MACHINES and query.space == "vac01.example.ac.uk"


VALID_QUERY = json.loads(vacquery.encode_query(vacquery.MACHINES, SPACE, COOKIE))


@pytest.mark.parametrize("data, reason", [
    (b'{"message_type": "machines_query", "space": "s", "cook', "not JSON"),
    (b"", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"machines_query"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"42", "not a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"space": "s", "cookie": "c", "message_type": "machines_query", "x": NaN}', "not a JSON number"),
    (b'{"space": "s", "space": "t", "cookie": "c", "message_type": "machines_query"}', "duplicate"),
    (b'{"space": {"a": 1}, "cookie": "c", "message_type": "machines_query"}', "nested"),
    (b"[" * 1000 + b"]" * 1000, "nested too deeply"),
    (b'{"message_type": "machines_query", "cookie": "c"}', "space missing"),
    (b'{"message_type": "machines_query", "space": "s"}', "cookie missing"),
    (b'{"message_type": "machines_query", "space": 7, "cookie": "c"}', "space is not a string"),
    (b'{"message_type": "machines_query", "space": "s", "cookie": null}', "cookie is null"),
    (b'{"message_type": "machines_query", "space": "s", "cookie": "c\\u0007"}', "printable ASCII"),
    (b'{"message_type": "machines_query", "space": "s", "cookie": "' + b"c" * 129 + b'"}', "longer"),
    (b'{"message_type": "reboot", "space": "s", "cookie": "c"}', "unknown message_type"),
    (b'{"space": "s", "cookie": "c"}', "neither message_type nor method"),
    (b'{"message_type": "factory_query", "method": "machines", "space": "s", "cookie": "c"}', "disagree"),
    (b'{"message_type": "machines_query", "space": "' + b"s" * 2100 + b'", "cookie": "c"}', "over 2048"),
])
def test_bad_queries_are_rejected_with_a_reason(data, reason):
    with pytest.raises(vacquery.DatagramError, match=reason):
        vacquery.parse_query(data)


def machinetype_message(**changes) -> bytes:
    message = json.loads(encoded_messages()["machinetype_status"])
    message.update(changes)
    return json.dumps(message).encode()


@pytest.mark.parametrize("changes, reason", [
    ({"running_hs06": "lots"}, "running_hs06 is not a number"),
    ({"running_hs06": None}, "running_hs06 is null"),
    ({"running_hs06": True}, "running_hs06 is not a number"),
    ({"num_machinetypes": 10 ** 9}, "num_machinetypes not in"),
    ({"num_machinetypes": -1}, "num_machinetypes not in"),
    ({"num_before_fizzle": 2.5e300}, "out of range"),
    ({"shutdown_message": ["300 x"]}, "nested"),
    ({"shutdown_message": 300}, "shutdown_message is not a string"),
    ({"shutdown_message": "x" * 1025}, "shutdown_message longer than 1024"),
    ({"machinetype": "m" * 256}, "machinetype longer than 255"),
    ({"factory": 3}, "factory is not a string"),
    ({"message_type": "machine_status"}, "num_machines missing"),
    ({"message_type": "weather_report"}, "not a status message"),
])
def test_bad_responses_are_rejected_with_a_reason(changes, reason):
    with pytest.raises(vacquery.DatagramError, match=reason):
        vacquery.parse_response(machinetype_message(**changes))


def test_numbers_that_parse_as_infinity_are_rejected():
    data = machinetype_message(running_hs06=1.5).replace(b'"running_hs06": 1.5', b'"running_hs06": 1e400')
    with pytest.raises(vacquery.DatagramError, match="running_hs06 out of range"):
        vacquery.parse_response(data)


@pytest.mark.parametrize("key", ["num_machinetypes", "machinetype", "running_hs06", "num_before_fizzle",
                                 "shutdown_message", "shutdown_time", "shutdown_machine", "cookie",
                                 "space", "factory"])
def test_each_required_machinetype_key_is_required(key):
    message = json.loads(encoded_messages()["machinetype_status"])
    del message[key]
    with pytest.raises(vacquery.DatagramError, match=f"{key} missing"):
        vacquery.parse_response(json.dumps(message).encode())


def test_integral_numbers_from_classic_peers_are_accepted_as_floats_or_ints():
    response, _ = vacquery.parse_response(machinetype_message(shutdown_time=1767220000.75, running_hs06=3))
    assert response.record.shutdown_time == 1767220000 and response.record.running_hs06 == 3.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2200))
def test_arbitrary_bytes_never_raise_anything_but_datagram_error(data):
    for parse in (vacquery.parse_query, vacquery.parse_response):
        try:
            parse(data)
        except vacquery.DatagramError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(vacquery.SCHEMAS["machinetype_status"])),
                       st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)))
def test_arbitrary_objects_never_raise_anything_but_datagram_error(message):
    try:
        vacquery.parse_response(json.dumps(message).encode())
    except vacquery.DatagramError:
        pass


# --- authentication ------------------------------------------------------------------------------


SECRET = b"0123456789abcdef-shared"


def test_sealed_messages_verify_and_tampering_is_caught():
    sender = vacquery.Authenticator(SECRET)
    receiver = vacquery.Authenticator(SECRET, allow_unauthenticated=False)
    data = sender.seal(encoded_messages()["machinetype_status"])
    message = json.loads(data)
    assert len(message["hmac"]) == 64 and data.endswith(b'"}')
    assert receiver.check(data, message, "peer") is None
    tampered = data.replace(b'"running_hs06":160.50', b'"running_hs06":999.00')
    assert receiver.check(tampered, json.loads(tampered), "peer") == "wrong hmac"
    other = vacquery.Authenticator(b"another-secret-of-16").seal(encoded_messages()["machinetype_status"])
    assert receiver.check(other, json.loads(other), "peer") == "wrong hmac"
    moved = json.dumps(dict(reversed(list(message.items())))).encode()
    assert receiver.check(moved, json.loads(moved), "peer") == "hmac not the last key"
    bad = data.replace(message["hmac"].encode(), b"zz")
    assert receiver.check(bad, json.loads(bad), "peer") == "malformed hmac"


def test_unsigned_messages_pass_only_where_the_site_allows_them():
    data = encoded_messages()["machinetype_status"]
    message = json.loads(data)
    assert vacquery.Authenticator(None, allow_unauthenticated=False).check(data, message, "p") is None
    assert vacquery.Authenticator(SECRET, allow_unauthenticated=True).check(data, message, "p") is None
    assert vacquery.Authenticator(SECRET, allow_unauthenticated=False).check(data, message, "p") \
        == "unsigned message"


def test_a_peer_seen_signing_may_not_fall_back_to_unsigned():
    receiver = vacquery.Authenticator(SECRET, allow_unauthenticated=True)
    plain = encoded_messages()["machinetype_status"]
    signed = vacquery.Authenticator(SECRET).seal(plain)
    assert receiver.check(signed, json.loads(signed), "factory2") is None
    assert receiver.check(plain, json.loads(plain), "factory2") == "unsigned message from a peer that signs"
    assert receiver.check(plain, json.loads(plain), "factory3") is None


def test_without_a_secret_tags_are_ignored_like_a_classic_peer_would():
    signed = vacquery.Authenticator(SECRET).seal(encoded_messages()["factory_status"])
    assert vacquery.Authenticator(None).check(signed, json.loads(signed), "p") is None


def test_load_secret(tmp_path):
    path = tmp_path / "secret"
    assert vacquery.load_secret(make_settings()) is None
    with pytest.raises(vacquery.SecretError, match="cannot read"):
        vacquery.load_secret(make_settings(vacquery_secret_file=str(path)))
    path.write_bytes(b"short\n")
    with pytest.raises(vacquery.SecretError, match="fewer than 16"):
        vacquery.load_secret(make_settings(vacquery_secret_file=str(path)))
    path.write_bytes(SECRET + b"\n")
    assert vacquery.load_secret(make_settings(vacquery_secret_file=str(path))) == SECRET


# --- responder logic with a recording socket -----------------------------------------------------


class RecordingSocket:
    def __init__(self):
        self.sent = []

    def sendto(self, data, addr):
        self.sent.append((data, addr))

    def close(self):
        pass


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


SNAPSHOT = vacquery.StatusSnapshot(
    machines=[dataclasses.replace(MACHINE, machine=f"factory1-{n:02d}.example.ac.uk") for n in range(12)],
    machinetypes=[dataclasses.replace(REPORT, machinetype=f"type{n:02d}") for n in range(20)],
    factory=FACTORY_STATUS)


def make_responder(secret=None, **changes):
    clock = Clock()
    responder = vacquery.Responder(make_settings(**changes), lambda: SNAPSHOT, secret, clock=clock,
                                   wall_clock=lambda: NOW, rate=5, burst=10)
    responder.factory_addresses = frozenset({"192.0.2.1", "192.0.2.2"})
    responder.attach(RecordingSocket())
    return responder, clock


def test_responder_answers_a_space_factory_with_every_slot_and_copies_the_cookie():
    responder, _ = make_responder()
    responder.datagram_received(vacquery.encode_query(vacquery.MACHINES, SPACE, COOKIE), ("192.0.2.2", 5000))
    sent = responder.sock.sent
    assert len(sent) == 12 and {addr for _, addr in sent} == {("192.0.2.2", 5000)}
    responses = [vacquery.parse_response(data)[0] for data, _ in sent]
    assert {response.cookie for response in responses} == {COOKIE}
    assert {response.count for response in responses} == {12}
    assert sorted(response.key for response in responses) == [m.machine for m in SNAPSHOT.machines]
    assert all(len(data) <= vacquery.MAX_SEND_BYTES for data, _ in sent)
    assert responder.answered[vacquery.MACHINES] == 1


def test_responder_replies_match_the_direct_encoding():
    responder, _ = make_responder()
    responder.datagram_received(vacquery.encode_query(vacquery.FACTORY, SPACE, COOKIE), ("192.0.2.2", 5000))
    [(data, _)] = responder.sock.sent
    assert data == vacquery.encode_factory_status(FACTORY_STATUS, make_settings(), cookie=COOKIE, time_sent=NOW)


def test_sources_outside_the_space_get_no_amplification():
    responder, _ = make_responder()
    query = vacquery.encode_query(vacquery.MACHINETYPES, SPACE, COOKIE)
    responder.datagram_received(query, ("198.51.100.7", 5000))
    assert responder.sock.sent == [] and responder.truncated == 1  # one reply is > 3 queries
    padded = query[:-1] + b',"padding":"' + b"x" * 1200 + b'"}'
    responder.datagram_received(padded, ("198.51.100.7", 5000))
    sent_bytes = sum(len(data) for data, _ in responder.sock.sent)
    assert 0 < sent_bytes <= vacquery.AMPLIFICATION_FACTOR * len(padded)
    assert len(responder.sock.sent) < 20 and responder.truncated == 2


def test_per_source_rate_limit_and_recovery():
    responder, clock = make_responder()
    query = vacquery.encode_query(vacquery.FACTORY, SPACE, COOKIE)
    for _ in range(15):
        responder.datagram_received(query, ("192.0.2.2", 5000))
    assert len(responder.sock.sent) == 10 and responder.drops.counts["rate limit"] == 5
    responder.datagram_received(query, ("192.0.2.1", 5000))  # another source has its own bucket
    assert len(responder.sock.sent) == 11
    clock.now += 1.0
    responder.datagram_received(query, ("192.0.2.2", 5000))
    assert len(responder.sock.sent) == 12


@pytest.mark.parametrize("data, reason", [
    (vacquery.encode_query(vacquery.MACHINES, "other.space", COOKIE), "is not ours"),
    (b"[]", "not a JSON object"),
    (b"{" * 3000, "over 2048"),
    (b'{"message_type": "machines_query", "space": "' + SPACE.encode() + b'", "cookie": 5}', "not a string"),
])
def test_responder_drops_bad_queries_silently_with_a_rate_limited_log(data, reason, caplog):
    responder, _ = make_responder()
    for _ in range(3):
        responder.datagram_received(data, ("192.0.2.2", 5000))
    assert responder.sock.sent == []
    assert sum(responder.drops.counts.values()) == 3
    lines = [record for record in caplog.records if reason in record.getMessage()]
    assert len(lines) == 1  # one line, not one per datagram


def foreign_space(number: int) -> bytes:
    return vacquery.encode_query(vacquery.MACHINES, f"space{number}.example.org", COOKIE)


def unknown_method(number: int) -> bytes:
    return json.dumps({"method": f"method{number}", "space": SPACE, "cookie": COOKIE}).encode()


@pytest.mark.parametrize("datagram, reason, first", [
    (foreign_space, "space is not ours", "'space0.example.org'"),
    (unknown_method, "malformed query", "'method0'"),
])
def test_distinct_texts_from_one_source_add_no_log_lines_or_counters(datagram, reason, first, caplog):
    """Drop reasons are a fixed set: 1,000 different spaces (or methods) sent at the highest
    rate a source is allowed make one log line a minute and one counter, not one of each per
    text."""
    clock = Clock()
    responder = vacquery.Responder(make_settings(), lambda: SNAPSHOT, clock=clock,
                                   wall_clock=lambda: NOW)
    responder.attach(RecordingSocket())
    for number in range(1000):  # 50 s at the default 20 queries a second
        responder.datagram_received(datagram(number), ("198.51.100.7", 5000))
        clock.now += 1 / vq_responder.DEFAULT_QUERY_RATE
    lines = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert len(lines) == 1 and reason in lines[0] and first in lines[0], lines
    assert responder.drops.counts == {reason: 1000}
    clock.now += 60  # the next period's line counts the rest and shows its own first value
    responder.datagram_received(datagram(1000), ("198.51.100.7", 5000))
    lines = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert len(lines) == 2 and first.replace("0", "1000", 1) in lines[1]
    assert "999 more like it" in lines[1] and responder.drops.counts == {reason: 1001}


def test_responder_survives_a_failing_status_provider(caplog):
    responder, _ = make_responder()

    def broken():
        raise RuntimeError("daemon bug")

    responder.status_provider = broken
    for _ in range(3):
        responder.datagram_received(vacquery.encode_query(vacquery.MACHINES, SPACE, COOKIE), ("192.0.2.2", 1))
    assert responder.sock.sent == [] and responder.drops.counts == {"internal error": 3}
    [line] = [record for record in caplog.records if "internal error" in record.getMessage()]
    assert line.exc_info is not None  # the traceback, once
    responder.status_provider = lambda: None  # before the daemon's first cycle
    responder.datagram_received(vacquery.encode_query(vacquery.MACHINES, SPACE, COOKIE), ("192.0.2.2", 1))
    assert responder.sock.sent == [] and responder.answered[vacquery.MACHINES] == 1


def test_responder_with_a_secret_signs_and_enforces_site_policy():
    responder, _ = make_responder(SECRET, vacquery_allow_unauthenticated=False)
    plain = vacquery.encode_query(vacquery.FACTORY, SPACE, COOKIE)
    responder.datagram_received(plain, ("192.0.2.2", 5000))
    assert responder.sock.sent == [] and responder.drops.counts == {"unsigned message": 1}
    signed = vacquery.Authenticator(SECRET).seal(plain)
    responder.datagram_received(signed, ("192.0.2.2", 5000))
    [(data, _)] = responder.sock.sent
    assert vacquery.Authenticator(SECRET, False).check(data, json.loads(data), "r") is None


def test_classic_clients_keep_working_when_the_site_allows_unsigned_peers():
    responder, _ = make_responder(SECRET, vacquery_allow_unauthenticated=True)
    responder.datagram_received(vacquery.encode_query(vacquery.FACTORY, SPACE, COOKIE), ("192.0.2.2", 1))
    [(data, _)] = responder.sock.sent
    assert "hmac" in json.loads(data)  # an extra key a classic client ignores


def test_responder_caches_renderings_per_snapshot():
    snapshots = [SNAPSHOT]
    responder, _ = make_responder()
    responder.status_provider = lambda: snapshots[-1]
    query = vacquery.encode_query(vacquery.MACHINETYPES, SPACE, COOKIE)
    responder.datagram_received(query, ("192.0.2.2", 1))
    first = responder._templates[vacquery.MACHINETYPES]
    responder.datagram_received(query, ("192.0.2.2", 1))
    assert responder._templates[vacquery.MACHINETYPES] is first
    snapshots.append(dataclasses.replace(SNAPSHOT, machinetypes=SNAPSHOT.machinetypes[:2]))
    responder.datagram_received(query, ("192.0.2.2", 1))
    assert len(responder.sock.sent) == 20 + 20 + 2


class SegmentingSocket(RecordingSocket):
    """Splits a UDP_SEGMENT sendmsg into datagrams as the kernel does."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def sendmsg(self, buffers, ancillary, flags, addr):
        [(level, option, data)] = ancillary
        assert (level, option) == (vq_responder.SOL_UDP, vq_responder.UDP_SEGMENT)
        size = struct.unpack("=H", data)[0]
        payload = b"".join(buffers)
        self.sent += [(payload[at:at + size], addr) for at in range(0, len(payload), size)]
        self.batches += 1


def test_replies_of_similar_size_share_one_segmented_send(monkeypatch):
    monkeypatch.setattr(vq_responder.sys, "platform", "linux")
    messages = ["", "300 x", "300 " + "y" * 200, "", "200 Success"] * 4
    snapshot = dataclasses.replace(SNAPSHOT, machinetypes=[
        dataclasses.replace(REPORT, machinetype=f"type{n:02d}", shutdown_message=message)
        for n, message in enumerate(messages)])
    responder, _ = make_responder()
    responder.status_provider = lambda: snapshot
    responder.attach(SegmentingSocket())
    responder.datagram_received(vacquery.encode_query(vacquery.MACHINETYPES, SPACE, COOKIE), ("192.0.2.2", 1))
    sent = [data for data, _ in responder.sock.sent]
    assert 1 < responder.sock.batches < 20 and len(sent) == 20
    keys = sorted(vacquery.parse_response(data)[0].key for data in sent)
    assert keys == [f"type{n:02d}" for n in range(20)]
    assert all(len(data) - len(data.rstrip(b" ")) <= vq_responder.GSO_MAX_PADDING for data in sent)
    assert all(json.loads(data)["cookie"] == COOKIE for data in sent)  # classic json.loads too


def test_gso_batches_bound_padding_and_segments():
    replies = [b"x" * size for size in (700, 650, 600, 500, 1300, 1299)] + [b"y" * 100] * 70
    batches = vq_responder.gso_batches(replies)
    assert sorted(sum(batches, []), key=len) == sorted(replies, key=len)
    for batch in batches:
        assert len(batch) <= vq_responder.GSO_MAX_SEGMENTS
        assert all(len(batch[0]) - len(reply) <= vq_responder.GSO_MAX_PADDING for reply in batch)
    assert [len(batch) for batch in batches] == [2, 2, 1, 1, 64, 6]


def test_padded_signed_datagrams_still_verify():
    sealed = vacquery.Authenticator(SECRET).seal(encoded_messages()["machinetype_status"]) + b" " * 40
    assert vacquery.Authenticator(SECRET, False).check(sealed, json.loads(sealed), "p") is None


# --- client receive logic ------------------------------------------------------------------------


def make_run(kind=vacquery.MACHINETYPES, authenticator=None):
    targets = [vq_client._Target(PEER.name, 995, PEER.address)]
    return vq_client._QueryRun(kind, targets, SPACE, "vac-command",
                              authenticator or vacquery.Authenticator(None), Clock())


def reply_for(run, factory=PEER.name, space=SPACE, cookie=None, **changes) -> bytes:
    settings_ = make_settings(factory_name=factory, vac_space=space)
    report = dataclasses.replace(REPORT, **changes)
    return vacquery.encode_machinetype_status(report, settings_, num_machinetypes=2,
                                              cookie=cookie or run.targets[0].cookie)


def test_client_accepts_replies_bound_to_its_cookie_and_counts_completion():
    run = make_run()
    run.receive(reply_for(run, machinetype="a"), PEER.address)
    assert run.targets[0].heard and not run.targets[0].complete(vacquery.MACHINETYPES)
    run.receive(reply_for(run, machinetype="b"), PEER.address)
    assert run.targets[0].complete(vacquery.MACHINETYPES) and run.progress.is_set()


@pytest.mark.parametrize("make, reason, detail", [
    (lambda run: reply_for(run, cookie="f" * 64), "not a reply to this query", None),
    (lambda run: reply_for(run, space="other.space"), "wrong space", None),
    (lambda run: reply_for(run, factory="impostor.example.org"), "cookie does not match factory", None),
    (lambda run: vacquery.encode_factory_status(FACTORY_STATUS, make_settings(factory_name=PEER.name),
                                                cookie=run.targets[0].cookie), "not a reply to this query", None),
    # What the peer's datagram said is a detail, never a reason of its own (one key per text).
    (lambda run: b"[]", "malformed reply", "not a JSON object"),
    (lambda run: b'{"message_type": "machinetype_status"', "malformed reply", "not JSON"),
])
def test_client_drops_replies_it_did_not_ask_for(make, reason, detail):
    run = make_run()
    run.receive(make(run), "203.0.113.9")  # not the factory's address either
    assert not run.targets[0].heard
    assert run.drops.counts == {reason: 1}
    if detail is None:
        assert run.drops.summary() == f"1 ({reason})"
    else:
        assert detail in run.drops.details[reason]
        assert run.drops.summary() == f"1 ({reason}: {run.drops.details[reason]})"


def test_an_aliased_factory_is_accepted_from_the_address_it_was_asked_at():
    run = make_run()
    run.receive(reply_for(run, factory="real-hostname.example.ac.uk"), PEER.address)
    assert run.targets[0].heard


def test_client_records_are_renamed_to_the_queried_factory():
    run = make_run()
    run.receive(reply_for(run, factory="real-hostname.example.ac.uk", machinetype="a"), PEER.address)
    result = run.result({}, 0.1)
    assert result.reports[0].factory == PEER.name and result.incomplete == [PEER.name]


def test_client_without_the_secret_rejects_nothing_and_with_it_requires_it():
    run = make_run(authenticator=vacquery.Authenticator(SECRET, allow_unauthenticated=False))
    run.receive(reply_for(run, machinetype="a"), PEER.address)
    assert not run.targets[0].heard and run.drops.counts == {"unsigned message": 1}
    run.receive(vacquery.Authenticator(SECRET).seal(reply_for(run, machinetype="a")), PEER.address)
    assert run.targets[0].heard


# --- peer report cache ---------------------------------------------------------------------------


def test_peer_cache_rotates_batches_replaces_complete_answers_and_ages_out(monkeypatch):
    import asyncio

    peers = tuple(FactoryAddress(f"peer{n}.example.ac.uk", f"192.0.2.{10 + n}") for n in range(5))
    settings_ = make_settings(factories=(FactoryAddress(FACTORY_NAME, "192.0.2.1"), *peers))
    asked, answers = [], {}

    async def fake_query(settings, kind, factories, timeout, **options):
        names = [entry.name for entry in factories]
        asked.append(names)
        reports = [report for name in names for report in answers.get(name, [])]
        answered = [name for name in names if name in answers]
        return vacquery.QueryResult(kind, reports, answered, [n for n in names if n not in answers], [],
                                    [], {}, {}, 0.0)

    monkeypatch.setattr(vq_client, "query", fake_query)
    clock = Clock()
    cache = vacquery.PeerReportCache(settings_, 30, batch_size=2, clock=clock)
    for peer in peers:
        answers[peer.name] = [MachinetypeReport(peer.name, "a"), MachinetypeReport(peer.name, "b")]
    for _ in range(3):
        asyncio.run(cache.refresh())
    assert asked == [[p.name for p in peers[0:2]], [p.name for p in peers[2:4]],
                     [peers[4].name, peers[0].name]]
    assert FACTORY_NAME not in sum(asked, [])  # never queries itself
    assert len(cache.reports()) == 10
    answers[peers[0].name] = [MachinetypeReport(peers[0].name, "b", running_hs06=5.0)]
    asyncio.run(cache.refresh(full=True))
    assert [r for r in cache.reports() if r.factory == peers[0].name] == answers[peers[0].name]
    assert cache.max_age == 3 * 30 * 3
    del answers[peers[1].name]  # silent from now on: its reports age out
    clock.now += cache.max_age - 1
    asyncio.run(cache.refresh(full=True))
    clock.now += 2
    assert {r.factory for r in cache.reports()} == {p.name for p in peers} - {peers[1].name}


# --- status records ----------------------------------------------------------------------------


def test_machine_status_from_the_model_hides_the_message_until_shut_down():
    machine = Machine(uuid="u", name="factory1-05.example.ac.uk", slot=5, machinetype="lhcb",
                      machine_model="cernvm4", processors=2, created=NOW - 10, deadline=NOW + 100,
                      state=MachineState.RUNNING, started=NOW - 5, shutdown_message="200 done")
    status = vacquery.MachineStatus.from_machine(FACTORY_NAME, machine)
    assert status.state == "Running" and status.shutdown_message is None and status.hs06 == 2.0
    finished = vacquery.MachineStatus.from_machine(FACTORY_NAME, dataclasses.replace(
        machine, state=MachineState.FINISHED, shutdown_message_time=NOW))
    assert finished.state == "Shut down" and finished.shutdown_message == "200 done"


def test_vacmon_cycle_messages_are_factory_then_machinetypes_with_cookie_zero():
    messages = [json.loads(m) for m in vacquery.vacmon_cycle_messages(make_settings(), SNAPSHOT, NOW)]
    assert [m["message_type"] for m in messages] == ["factory_status"] + ["machinetype_status"] * 20
    assert {m["cookie"] for m in messages} == {"0"}
    assert {m["num_machinetypes"] for m in messages[1:]} == {20}


@pytest.mark.parametrize("text, expected", [
    ("vacmon.example.org:8884", ("vacmon.example.org", 8884)),
    ("vacmon.example.org", ("vacmon.example.org", 8884)),
    ("127.0.0.1:9000", ("127.0.0.1", 9000)),
])
def test_parse_hostport(text, expected):
    assert vacquery.parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["host:0", "host:99999", ":80", "host:http"])
def test_parse_hostport_rejects_bad_ports(text):
    with pytest.raises(ValueError):
        vacquery.parse_hostport(text)


# --- tables and ssh ------------------------------------------------------------------------------


def table_result(reports, kind, silent=(), incomplete=()):
    answered = sorted({r.factory for r in reports} - set(incomplete))
    return vacquery.QueryResult(kind, list(reports), answered, list(silent), list(incomplete), [],
                                {name: "cannot resolve name" for name in silent if "dns" in name}, {}, 1.0)


def test_machines_table(golden):
    starting = dataclasses.replace(MACHINE, machine="factory1-05.example.ac.uk", state="Starting",
                                   started_time=None, created_time=NOW - 240, machine_model="docker")
    hostile = dataclasses.replace(SHUT_DOWN, machine="factory2-00.example.ac.uk", factory=PEER.name,
                                  shutdown_message="500 \x1b[2Jgone\x07")
    empty = vacquery.MachineStatus.empty_slot(PEER.name, "factory2-01.example.ac.uk")
    result = table_result([MACHINE, SHUT_DOWN, starting, hostile, empty], vacquery.MACHINES,
                          silent=["factory9.example.ac.uk", "nodns.example.ac.uk"])
    text = tables.render_machines(result, NOW)
    assert "\x1b" not in text and "\x07" not in text
    golden("vacquery/machines_table.txt", text)


def test_machinetypes_table_and_single_machinetype(golden):
    peer_report = dataclasses.replace(REPORT, factory=PEER.name, running_hs06=10.0, running_machines=1,
                                      running_processors=1, shutdown_message=None, shutdown_time=None)
    other = dataclasses.replace(REPORT, machinetype="atlas", running_hs06=0.0, running_machines=0,
                                running_processors=0, num_before_fizzle=0)
    result = table_result([REPORT, other, peer_report], vacquery.MACHINETYPES,
                          incomplete=[PEER.name])
    golden("vacquery/machinetypes_table.txt", tables.render_machinetypes(result, NOW))
    only = tables.render_machinetypes(result, NOW, "atlas")
    assert "lhcb" not in only and "machinetype atlas on 2 factories" in only


def test_factories_table(golden):
    classic = vacquery.FactoryStatus(factory=PEER.name, running_processors=0, max_processors=8,
                                     max_hs06=80.0, version="03.01")
    result = table_result([FACTORY_STATUS, classic], vacquery.FACTORY, silent=["factory3.example.ac.uk"])
    golden("vacquery/factories_table.txt", tables.render_factories(result, NOW))


def test_find_machine_by_name_short_name_or_uuid():
    reports = [MACHINE, SHUT_DOWN]
    assert ssh.find_machine(reports, "factory1-03.example.ac.uk") == [MACHINE]
    assert ssh.find_machine(reports, "factory1-03") == [MACHINE]
    assert ssh.find_machine(reports, MACHINE.uuid) == [MACHINE]
    assert ssh.find_machine(reports, "factory1-99") == []


def test_ssh_argv_on_the_machines_own_factory():
    argv = ssh.ssh_argv(MACHINE, make_settings(root_public_key="/root/.ssh/id_ed25519.pub"))
    assert argv[:3] == ["ssh", "-i", "/root/.ssh/id_ed25519"]
    assert "-J" not in argv and argv[-1] == "root@169.254.169.3"


def test_ssh_argv_jumps_through_another_factory_and_passes_the_command():
    machine = dataclasses.replace(MACHINE, factory=PEER.name, machine="factory2-12.example.ac.uk")
    argv = ssh.ssh_argv(machine, make_settings(), ["uptime", "-p"])
    assert argv[argv.index("-J") + 1] == PEER.address
    assert argv[-3:] == ["root@169.254.169.12", "uptime", "-p"]
    unlisted = dataclasses.replace(machine, factory="elsewhere.example.ac.uk")
    argv = ssh.ssh_argv(unlisted, make_settings())
    assert argv[argv.index("-J") + 1] == "elsewhere.example.ac.uk"


def test_ssh_argv_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="does not end in .pub"):
        ssh.ssh_argv(MACHINE, make_settings(root_public_key="/root/key"))
    with pytest.raises(ValueError, match="not a slot name"):
        ssh.ssh_argv(dataclasses.replace(MACHINE, machine="weird.example.ac.uk"), make_settings())
