"""APEL records: text (golden files, server parsing rules), the dirq queues, exactly-once across
crashes (real processes killed at every write step), sync records and ``vac apel-sync``."""

from __future__ import annotations

import calendar
import dataclasses
import os
import re
import threading
from pathlib import Path
from typing import Optional

import pytest
from dirq.QueueSimple import QueueSimple
from hypothesis import given
from hypothesis import strategies as st

from vac.cli import main as cli
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine
from vac.records import apel

END = float(calendar.timegm((2026, 3, 14, 15, 9, 26)))  # 20260314
UUID = "0e1c7a4c-5f3b-4c1b-9a55-123456789abc"


def make_settings(tmp_path: Path, **changes) -> Settings:
    values = dict(vac_space="vac01.example.com", factory_name="factory1.example.com",
                  gocdb_sitename="UKI-TEST", state_dir=str(tmp_path))
    values.update(changes)
    return Settings(**values)


MACHINETYPE = Machinetype(name="lhcb", accounting_fqan="/lhcb/Role=pilot", fizzle_seconds=600)


def make_machine(uuid: str = UUID, started: Optional[float] = END - 7000, **changes) -> Machine:
    values = dict(uuid=uuid, name="factory1-03.example.com", slot=3, machinetype="lhcb",
                  machine_model="cernvm3", processors=4, created=END - 7200, deadline=END + 80000,
                  started=started, hs06=45.6)
    values.update(changes)
    return Machine(**values)


# -- what the APEL server accepts (apel/apel: db/records/job.py, record.py, sync.py) -------------

JOB_FIELDS = ["Site", "SubmitHost", "MachineName", "Queue", "LocalJobId", "LocalUserId",
              "GlobalUserName", "FQAN", "VO", "VOGroup", "VORole", "WallDuration", "CpuDuration",
              "Processors", "NodeCount", "StartTime", "EndTime", "InfrastructureDescription",
              "InfrastructureType", "MemoryReal", "MemoryVirtual", "ServiceLevelType", "ServiceLevel"]
JOB_MANDATORY = ["Site", "LocalJobId", "WallDuration", "CpuDuration", "StartTime", "EndTime"]
JOB_INTS = ["WallDuration", "CpuDuration", "Processors", "NodeCount", "MemoryReal", "MemoryVirtual",
            "StartTime", "EndTime"]


def server_parse(message: str) -> list[dict[str, str]]:
    """Parse like the APEL loader and apply its checks for job records; the records."""
    message.encode("ascii")  # ssmsend decodes as ASCII
    header, _, body = message.strip().partition("\n")
    version = header.split(":", 1)[1].strip()
    records = []
    for chunk in body.split("%%"):
        if not chunk.strip():
            continue
        fields = {}
        for line in chunk.strip().splitlines():
            key, value = (part.strip() for part in line.split(":", 1))
            assert key not in fields, f"duplicate {key}"
            fields[key] = value
        records.append(fields)
        if header.startswith("APEL-individual-job-message"):
            assert set(fields) <= set(JOB_FIELDS), f"unknown fields {set(fields) - set(JOB_FIELDS)}"
            assert all(fields.get(key) for key in JOB_MANDATORY)
            for key in JOB_INTS:
                if key in fields:
                    int(fields[key])
            assert int(fields["EndTime"]) >= int(fields["StartTime"])
            if version == "v0.3":
                assert ("ServiceLevelType" in fields) == ("ServiceLevel" in fields)
                assert fields["ServiceLevelType"].lower() in ("si2k", "hepspec", "hepscore23")
                float(fields["ServiceLevel"])
            else:
                assert "ServiceLevelType" not in fields
                pairs = [item.split(":") for item in fields["ServiceLevel"].strip("{}").split(",")]
                assert {key.strip().lower() for key, _ in pairs} <= {"hepscore23", "hepspec", "si2k"}
                [float(value) for _, value in pairs]
    return records


def read_queue(path: Path) -> list[str]:
    """Consume a dirq QueueSimple as ssmsend does (lock, get, remove, purge); the messages."""
    queue = QueueSimple(str(path))
    messages = []
    for name in queue:
        if queue.lock(name):
            messages.append(queue.get(name).decode("ascii"))
            queue.remove(name)
    queue.purge()
    return messages


def queue_files(path: Path) -> list[Path]:
    return sorted(file for file in path.glob("*/*") if re.fullmatch(r"[0-9a-f]{14}", file.name))


# -- record text -------------------------------------------------------------------------------


@pytest.mark.parametrize("case, changes, settings_changes", [
    ("v03", {}, {}),
    ("v03-no-fqan-no-hs06", {"hs06": None, "fqan": None}, {"gocdb_sitename": None}),
    ("v04", {}, {"apel_version": "0.4"}),
    ("v04-hepscore23", {}, {"apel_version": "0.4", "hepscore23_per_processor": 13.25}),
])
def test_record_text_golden(tmp_path, golden, case, changes, settings_changes):
    machinetype = MACHINETYPE if "no-fqan" not in case else dataclasses.replace(MACHINETYPE, accounting_fqan=None)
    text = apel.record_text(make_settings(tmp_path, **settings_changes), machinetype,
                            make_machine(**changes), END, 20000.9)
    golden(f"apel/{case}.txt", text)
    [record] = server_parse(text)
    assert record["LocalJobId"] == UUID


def test_record_values_follow_the_classic_rules(tmp_path):
    fields = dict(apel.record_fields(make_settings(tmp_path, gocdb_sitename=None), MACHINETYPE,
                                     make_machine(processors=3, hs06=34.2), END, 99.99))
    assert fields["Site"] == "example.com"  # the space without its first label
    assert fields["GlobalUserName"] == "/DC=com/DC=example/DC=vac01"  # classic order, not the TN's
    assert fields["WallDuration"] == "7000" and fields["CpuDuration"] == "99"
    assert fields["MemoryReal"] == str(2048 * 3 * 1024)  # KiB
    assert fields["ServiceLevel"] == "11.4"  # HS06 per processor
    assert apel.site_name(make_settings(tmp_path, gocdb_sitename=None, vac_space="localspace")) == "localspace"


@pytest.mark.parametrize("value, text", [(10.0, "10.0"), (11.4, "11.4"), (34.2 / 3, "11.4"),
                                         (1e-05, "0.0"), (13.25, "13.25"), (1234567.0, "1234567.0")])
def test_decimal_text_never_has_an_exponent(value, text):
    assert apel.decimal_text(value) == text


@pytest.mark.parametrize("changes, end, message", [
    ({"processors": 0}, END, "0 processors"),
    ({}, END - 8000, "before start time"),
    ({"fqan": "/lhcb/Rôle=pilot"}, END, "printable ASCII"),
    ({"fqan": "/lhcb\n%%"}, END, "printable ASCII"),
    ({}, float("nan"), "not a non-negative number"),
])
def test_record_rejects_unusable_input(tmp_path, changes, end, message):
    with pytest.raises(apel.ApelError, match=message):
        apel.record_text(make_settings(tmp_path), MACHINETYPE, make_machine(**changes), end, 1.0)


def test_record_rejects_unknown_version(tmp_path):
    with pytest.raises(apel.ApelError, match="apel_version '0.5'"):
        apel.record_text(make_settings(tmp_path, apel_version="0.5"), MACHINETYPE, make_machine(), END, 1.0)


@given(processors=st.integers(1, 512), wall=st.integers(0, 10**8), cpu=st.floats(0, 1e10),
       hs06=st.one_of(st.none(), st.floats(0.001, 1e5)), version=st.sampled_from(["0.3", "0.4"]),
       hepscore=st.one_of(st.none(), st.floats(0.001, 1e5)))
def test_any_valid_machine_gives_a_record_the_server_accepts(processors, wall, cpu, hs06, version, hepscore):
    settings = Settings(vac_space="vac01.example.com", factory_name="f1.example.com",
                        apel_version=version, hepscore23_per_processor=hepscore)
    machine = make_machine(processors=processors, hs06=hs06, started=END - wall)
    [record] = server_parse(apel.record_text(settings, MACHINETYPE, machine, END, cpu))
    assert int(record["WallDuration"]) == wall


def test_sync_text_golden(golden):
    counts = [apel.SyncCount("UKI-TEST", "vac01.example.com/vac-factory1.example.com", 5),
              apel.SyncCount("UKI-OLD", "vac01.example.com/vac-factory0.example.com", 0)]
    text = apel.sync_text(counts, 2026, 3)
    golden("apel/sync.txt", text)
    assert [record["NumberOfJobs"] for record in server_parse(text)] == ["5", "0"]


def test_months():
    assert apel.parse_month("202603") == (2026, 3)
    for bad in ("2026-03", "202613", "202600", "20263", "march"):
        with pytest.raises(ValueError, match="YYYYMM"):
            apel.parse_month(bad)
    assert apel.default_month(calendar.timegm((2026, 3, 1, 12, 0, 0))) == "202602"
    assert apel.default_month(calendar.timegm((2026, 3, 2, 0, 0, 1))) == "202603"


def test_dirq_names_match_the_regex():
    names = {apel.dirq_name(END + fraction / 7) for fraction in range(200)}
    assert all(re.fullmatch(r"[0-9a-f]{14}", name) for name in names)
    assert re.fullmatch(r"[0-9a-f]{14}", apel.record_name(UUID))


# -- writing -----------------------------------------------------------------------------------


def test_write_archives_and_queues_once(tmp_path):
    settings = make_settings(tmp_path)
    machine = make_machine()
    result = apel.write_accounting(settings, MACHINETYPE, machine, END, 20000.0)
    assert result.written and result.outcome is apel.Outcome.WRITTEN
    expected = apel.record_text(settings, MACHINETYPE, machine, END, 20000.0)
    assert result.archive_path == tmp_path / "apel-archive" / "20260314" / apel.record_name(UUID)
    assert result.archive_path.read_text() == expected
    assert oct(result.archive_path.stat().st_mode & 0o777) == "0o644"
    assert "queued for ssmsend" in str(result)

    again = apel.write_accounting(settings, MACHINETYPE, machine, END + 60, 20100.0)
    assert again.outcome is apel.Outcome.ALREADY_WRITTEN and not again.written
    assert again.archive_path == result.archive_path and again.outgoing_path is None
    assert "already written" in str(again)

    assert read_queue(tmp_path / "apel-outgoing") == [expected]
    assert queue_files(tmp_path / "apel-archive") == [result.archive_path]
    assert len(queue_files(tmp_path / "apel-queued")) == 1
    assert list((tmp_path / "apel-pending").iterdir()) == [tmp_path / "apel-pending" / ".lock"]


@pytest.mark.parametrize("settings_changes, machine_changes, reason", [
    ({"gocdb_sitename": None}, {}, "gocdb_sitename is not set"),
    ({}, {"hs06": None}, "its HS06 is unknown"),
])
def test_unpublishable_records_are_only_archived(tmp_path, settings_changes, machine_changes, reason):
    settings = make_settings(tmp_path, **settings_changes)
    result = apel.write_accounting(settings, MACHINETYPE, make_machine(**machine_changes), END, 1.0)
    assert result.written and result.outgoing_path is None
    assert str(result).endswith(f"not sent: {reason}")
    assert queue_files(tmp_path / "apel-archive") == [result.archive_path]
    assert read_queue(tmp_path / "apel-outgoing") == []
    assert queue_files(tmp_path / "apel-queued") == []


def test_fizzles_and_unstarted_machines_get_no_record(tmp_path):
    settings = make_settings(tmp_path)
    fizzled = apel.write_accounting(settings, MACHINETYPE, make_machine(started=END - 599), END, 1.0)
    assert fizzled.outcome is apel.Outcome.FIZZLED
    assert str(fizzled) == f"no APEL record: {UUID} ran 599 s, less than fizzle_seconds = 600"
    never = apel.write_accounting(settings, MACHINETYPE, make_machine(started=None), END, 0.0)
    assert never.outcome is apel.Outcome.NOT_STARTED
    assert queue_files(tmp_path / "apel-archive") == []
    just_enough = apel.write_accounting(settings, MACHINETYPE, make_machine(started=END - 600), END, 1.0)
    assert just_enough.written


def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    (tmp_path / "apel-archive").write_text("not a directory")
    with pytest.raises(apel.ApelError, match=f"cannot write the APEL record of {UUID}"):
        apel.write_accounting(make_settings(tmp_path), MACHINETYPE, make_machine(), END, 1.0)


def test_concurrent_writers_of_one_machine_write_one_record(tmp_path):
    settings = make_settings(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        apel.write_accounting(settings, MACHINETYPE, make_machine(), END, 1.0))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(result.outcome.value for result in results) == ["already written"] * 7 + ["written"]
    assert len(read_queue(tmp_path / "apel-outgoing")) == 1


def test_ssmsend_purging_the_day_directory_does_not_lose_records(tmp_path):
    settings = make_settings(tmp_path)
    apel.write_accounting(settings, MACHINETYPE, make_machine(uuid="a"), END, 1.0)
    assert len(read_queue(tmp_path / "apel-outgoing")) == 1  # purge keeps the newest directory
    os.rmdir(tmp_path / "apel-outgoing" / "20260314")  # as an older one would be
    apel.write_accounting(settings, MACHINETYPE, make_machine(uuid="b"), END, 1.0)
    assert [apel.parse_record(text)["LocalJobId"] for text in read_queue(tmp_path / "apel-outgoing")] == ["b"]


# -- crashes: a real process killed at each write step -----------------------------------------

WRAPPED = ("open", "write", "fsync", "link", "rename", "unlink", "mkdir", "fchmod")


def run_killed(settings: Settings, machine: Machine, kill_at: int, after: bool) -> bool:
    """Run write_accounting in a child that dies (os._exit) at its ``kill_at``-th write-side
    system call, before or after doing it; True if the child got that far and died."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        calls = 0

        def wrap(original):
            def step(*args, **kwargs):
                nonlocal calls
                calls += 1
                if calls == kill_at and not after:
                    os._exit(99)
                result = original(*args, **kwargs)
                if calls == kill_at and after:
                    os._exit(99)
                return result
            return step

        for name in WRAPPED:
            setattr(os, name, wrap(getattr(os, name)))
        try:
            apel.write_accounting(settings, MACHINETYPE, machine, END, 123.0)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 99


@pytest.mark.component  # forks a few hundred processes
@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
@pytest.mark.parametrize("publishable", [True, False])
@pytest.mark.parametrize("sender_runs_between", [False, True], ids=["", "ssmsend-between"])
def test_a_kill_at_any_step_loses_nothing_and_duplicates_nothing(tmp_path, after, publishable,
                                                                 sender_runs_between):
    for kill_at in range(1, 60):
        state = tmp_path / f"kill{kill_at}"
        settings = make_settings(state, gocdb_sitename="UKI-TEST" if publishable else None)
        machine = make_machine()
        if not run_killed(settings, machine, kill_at, after):
            break  # the child finished before reaching this step: every step has been tried
        sent = read_queue(state / "apel-outgoing") if sender_runs_between else []
        result = apel.write_accounting(settings, MACHINETYPE, machine, END, 123.0)
        assert result.outcome in (apel.Outcome.WRITTEN, apel.Outcome.ALREADY_WRITTEN)
        sent += read_queue(state / "apel-outgoing")
        archived = queue_files(state / "apel-archive")
        expected = apel.record_text(settings, MACHINETYPE, machine, END, 123.0)
        assert [path.read_text() for path in archived] == [expected], f"kill at {kill_at}"
        assert sent == ([expected] if publishable else []), f"kill at {kill_at}"
        assert len(queue_files(state / "apel-queued")) == (1 if publishable else 0)
        assert not list((state / "apel-archive").glob("*/*.tmp")), f"kill at {kill_at}"
        assert apel.write_accounting(settings, MACHINETYPE, machine, END, 123.0).outgoing_path is None
        assert read_queue(state / "apel-outgoing") == []
    else:
        pytest.fail("write_accounting makes more write calls than expected")


def test_complete_pending_queues_records_committed_before_a_crash(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)

    def crash(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(apel, "_move_into_queue", crash)
    with pytest.raises(KeyboardInterrupt):
        apel.write_accounting(settings, MACHINETYPE, make_machine(), END, 1.0)
    monkeypatch.undo()
    assert read_queue(tmp_path / "apel-outgoing") == []
    (tmp_path / "apel-pending" / "00000000000000").write_text("uncommitted: no archive copy")
    assert apel.complete_pending(settings) == 1
    assert len(read_queue(tmp_path / "apel-outgoing")) == 1
    assert (tmp_path / "apel-pending" / "00000000000000").exists()  # left for its own writer
    assert apel.complete_pending(settings) == 0


# -- sync records ------------------------------------------------------------------------------


def test_sync_counts_only_records_queued_for_ssmsend_in_the_month(tmp_path):
    settings = make_settings(tmp_path)
    march = [make_machine(uuid=f"m{i}") for i in range(3)]
    for machine in march:
        apel.write_accounting(settings, MACHINETYPE, machine, END, 1.0)
    apel.write_accounting(settings, MACHINETYPE, make_machine(uuid="no-hs06", hs06=None), END, 1.0)
    april = calendar.timegm((2026, 4, 1, 0, 0, 5))
    apel.write_accounting(settings, MACHINETYPE, make_machine(uuid="april", started=april - 7000), april, 1.0)
    renamed = make_settings(tmp_path, factory_name="factory0.example.com")
    apel.write_accounting(renamed, MACHINETYPE, make_machine(uuid="old-name"), END, 1.0)
    read_queue(tmp_path / "apel-outgoing")  # ssmsend has sent the records meanwhile

    [result] = apel.sync_records(settings, ["202603"], now=april)
    assert [(count.submit_host, count.number_of_jobs) for count in result.counts] == [
        ("vac01.example.com/vac-factory1.example.com", 3),
        ("vac01.example.com/vac-factory0.example.com", 1),
    ]
    [message] = read_queue(tmp_path / "apel-outgoing")
    assert message == apel.sync_text(result.counts, 2026, 3)
    assert [(r["Month"], r["Year"], r["NumberOfJobs"]) for r in server_parse(message)] == [
        ("3", "2026", "3"), ("3", "2026", "1")]
    assert result.path.parent.name == "20260401"


def test_sync_of_an_empty_month_reports_zero_jobs(tmp_path):
    settings = make_settings(tmp_path)
    now = calendar.timegm((2026, 2, 1, 12, 0, 0))
    [result] = apel.sync_records(settings, now=now)  # default: January, nothing there
    assert (result.year, result.month) == (2026, 1)
    [message] = read_queue(tmp_path / "apel-outgoing")
    assert server_parse(message) == [{"Site": "UKI-TEST", "SubmitHost": "vac01.example.com/vac-factory1.example.com",
                                      "NumberOfJobs": "0", "Month": "1", "Year": "2026"}]


def test_sync_completes_pending_records_first(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)
    monkeypatch.setattr(apel, "_move_into_queue", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        apel.write_accounting(settings, MACHINETYPE, make_machine(), END, 1.0)
    monkeypatch.undo()
    [result] = apel.sync_records(settings, ["202603"], now=END)
    assert result.counts[0].number_of_jobs == 1
    assert len(read_queue(tmp_path / "apel-outgoing")) == 2  # the record and the sync message


def test_sync_needs_a_gocdb_site_and_valid_months(tmp_path):
    with pytest.raises(apel.ApelError, match="gocdb_sitename is not set"):
        apel.sync_records(make_settings(tmp_path, gocdb_sitename=None), ["202603"])
    with pytest.raises(ValueError, match="'2026-3' is not a month"):
        apel.sync_records(make_settings(tmp_path), ["202603", "2026-3"])
    assert not (tmp_path / "apel-outgoing").exists()  # nothing written for the good month either


def test_sync_skips_unreadable_records(tmp_path, caplog):
    settings = make_settings(tmp_path)
    apel.write_accounting(settings, MACHINETYPE, make_machine(), END, 1.0)
    broken = tmp_path / "apel-queued" / "20260314" / "0123456789abcd"
    broken.write_text("APEL-individual-job-message: v0.3\nLocalJobId: x\n%%\n")
    [result] = apel.sync_records(settings, ["202603"], now=END)
    assert result.counts[0].number_of_jobs == 1
    assert f"APEL sync: skipping {broken}: it has no Site or no SubmitHost" in caplog.messages


def test_cli_apel_sync(tmp_path, capsys):
    conf = tmp_path / "vac.conf"
    conf.write_text(f"[settings]\nvac_space = vac01.example.com\nfactory_name = factory1.example.com\n"
                    f"gocdb_sitename = UKI-TEST\nstate_dir = {tmp_path / 'state'}\n")
    options = ["--conf", str(conf), "--conf-dir", str(tmp_path / "none"), "--run-conf", str(tmp_path / "run.conf")]
    assert cli.main([*options, "apel-sync", "202603", "202604"]) == 0
    out = capsys.readouterr().out
    assert "2026-03 Site UKI-TEST SubmitHost vac01.example.com/vac-factory1.example.com: 0 jobs" in out
    assert "2026-04 Site UKI-TEST" in out
    assert len(read_queue(tmp_path / "state" / "apel-outgoing")) == 2
    assert cli.main([*options, "apel-sync", "2026-03"]) == 1
    assert "vac apel-sync: '2026-03' is not a month in the form YYYYMM" in capsys.readouterr().err
