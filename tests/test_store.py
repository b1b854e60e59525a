"""The on-disk store: atomic writes, records, recovery scan, finishes, expiry."""

import json
import os
import stat

import pytest

from vac.core.model import Finish, Machine, MachineState
from vac.records.store import Store, atomic_write


def make_machine(**changes):
    values = dict(uuid="11111111-2222-3333-4444-555555555555", name="f1-03.example.org", slot=3,
                  machinetype="lhcb", machine_model="cernvm3", processors=1, created=1700000000.0,
                  deadline=1700086400.0)
    values.update(changes)
    return Machine(**values)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "state")
    store.prepare()
    return store


def test_atomic_write_sets_mode_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "user_data"
    atomic_write(target, "secret", mode=0o600)
    assert target.read_text() == "secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(target, b"again", mode=0o600)
    assert target.read_bytes() == b"again"
    assert sorted(os.listdir(tmp_path)) == ["user_data"]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "value"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # not str/bytes: fails before the rename
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["value"]


def test_machine_dir_uses_classic_name_and_round_trips(store):
    machine = make_machine()
    directory = store.create_machine_dir(machine)
    assert directory.name == "1700000000_lhcb_f1-03.example.org"
    for sub in ("machinefeatures", "jobfeatures", "joboutputs"):
        assert (directory / sub).is_dir()
    assert (store.root / "slots" / machine.name).read_text() == "1700000000 lhcb cernvm3"
    assert store.load_record(directory) == machine
    record = json.loads((directory / "machine.json").read_text())
    assert record["format"] == 1


def test_live_machines_skips_finished_and_corrupt_records(store, caplog):
    running = make_machine(state=MachineState.RUNNING)
    finished = make_machine(uuid="u2", name="f1-04.example.org", slot=4,
                            state=MachineState.FINISHED, finished=1700001000.0)
    store.create_machine_dir(running)
    store.create_machine_dir(finished)
    broken = store.root / "machines" / "1700000001_lhcb_f1-05.example.org"
    broken.mkdir()
    (broken / "machine.json").write_text("{not json")
    future = store.root / "machines" / "1700000002_lhcb_f1-06.example.org"
    future.mkdir()
    (future / "machine.json").write_text(json.dumps({"format": 99, "machine": {}}))
    assert store.live_machines() == [running]
    assert "unreadable machine record" in caplog.text
    assert "unknown format 99" in caplog.text


def test_vm_shutdown_message_is_bounded_and_printable(store):
    machine = make_machine()
    store.create_machine_dir(machine)
    assert store.vm_shutdown_message(machine) is None
    store.write_file(machine, "joboutputs/shutdown_message", "300 No more work\x07\nsecond line")
    assert store.vm_shutdown_message(machine) == "300 No more work"
    store.write_file(machine, "joboutputs/shutdown_message", "x" * 100000)
    assert store.vm_shutdown_message(machine) == "x" * 256


def test_finishes_round_trip_and_ignore_garbage(store, caplog):
    finish = Finish("lhcb", "f1-03.example.org", "300 No more work", 1700000500.0)
    store.save_finish(finish)
    (store.root / "finishes" / "atlas").write_text("[]")
    assert store.load_finishes() == {"lhcb": finish}
    assert "unreadable finish record" in caplog.text


def test_expiry_never_removes_live_or_recent_machines(store):
    day = 86400
    old = make_machine(uuid="old", name="f1-01.example.org", slot=1, state=MachineState.FINISHED,
                       finished=1700000000.0)
    recent = make_machine(uuid="recent", name="f1-02.example.org", slot=2,
                          state=MachineState.FINISHED, finished=1700000000.0 + 2.5 * day)
    live = make_machine(uuid="live", state=MachineState.RUNNING)
    for machine in (old, recent, live):
        store.create_machine_dir(machine)
    removed = store.expire_machine_dirs(["live"], {"lhcb": 3.0}, 3.0, now=1700000000.0 + 3.1 * day)
    assert removed == [store.machine_dir(old)]
    assert store.machine_dir(recent).is_dir() and store.machine_dir(live).is_dir()


def test_last_activity_is_the_newest_console_or_joboutput(store):
    machine = make_machine()
    assert store.last_activity(machine) is None
    directory = store.create_machine_dir(machine)
    (directory / "console.log").write_text("boot")
    os.utime(directory / "console.log", (1700000100, 1700000100))
    store.write_file(machine, "joboutputs/heartbeat", "ok")
    os.utime(directory / "joboutputs" / "heartbeat", (1700000200, 1700000200))
    assert store.last_activity(machine) == 1700000200


def test_upgrade_marks_a_new_directory_and_migrates_older_records(store, monkeypatch):
    from vac.records import store as storemod

    assert store.upgrade() is None
    assert (store.root / "format").read_text() == "1\n"
    assert store.upgrade() == 1  # idempotent
    machine = make_machine()
    store.create_machine_dir(machine)
    # Pretend this version is format 2 and the directory format 1, with a renaming migration.
    old = json.loads((store.machine_dir(machine) / "machine.json").read_text())
    old["machine"]["cpu_seconds"] = 42.0
    (store.machine_dir(machine) / "machine.json").write_text(json.dumps(old))

    def rename_cpu(record):
        record["machine"]["cpu_percentage"] = record["machine"].pop("cpu_seconds")
        record["format"] = 2
        return record

    monkeypatch.setattr(storemod, "RECORD_FORMAT", 2)
    monkeypatch.setattr(storemod, "MIGRATIONS", {1: rename_cpu})
    assert store.upgrade() == 1
    migrated = json.loads((store.machine_dir(machine) / "machine.json").read_text())
    assert migrated["format"] == 2 and migrated["machine"]["cpu_percentage"] == 42.0
    assert (store.root / "format").read_text() == "2\n"


def test_a_newer_state_format_is_refused(store):
    from vac.records.store import StoreError

    (store.root / "format").write_text("99\n")
    with pytest.raises(StoreError, match="written by a newer vac \\(format 99"):
        store.upgrade()
