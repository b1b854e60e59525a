"""``vcycle spaces / machinetypes / machines`` over status files as vcycled writes them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vac.cli import vcycle


def write_status(state: Path, space: str, **extra) -> None:
    """A status file written just now (the commands compare its times with the real clock, so
    they must not be taken when the test module was collected, minutes before it runs)."""
    now = time.time()
    status = {
        "space": space, "api": "ec2", "manager": "vcycle.example.org", "updated": now - 5,
        "backed_off_until": None, "error": None, "processors_limit": 10,
        "machines": [{"name": "vcycle-lhcb-aaaaaaaaaa", "machinetype": "lhcb", "state": "running",
                      "processors": 2, "created": now - 600, "started": now - 500, "hs06": None,
                      "shutdown_message": None}],
        "machinetypes": {"lhcb": {"target_share": 1.0, "score": 2.0, "blocked_by": None, "heartbeat_machines": 1,
                                  "last_abort": {"time": now - 60, "message": "300 Nothing to do\x1b[2J",
                                                 "machine": "vcycle-lhcb-bbbbbbbbbb"}}},
        **extra}
    (state / "spaces" / space).mkdir(parents=True)
    (state / "spaces" / space / "status.json").write_text(json.dumps(status))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = vcycle.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tables_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_status(tmp_path, "a.example.org")
    write_status(tmp_path, "b.example.org", backed_off_until=time.time() + 300, error="DescribeInstances: 503")
    code, out, _ = run(capsys, "spaces", "--state-dir", str(tmp_path))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["SPACE", "API", "MACHINES", "PROCESSORS", "LIMIT", "UPDATED", "STATE"]
    assert lines[1].split()[:5] == ["a.example.org", "ec2", "1", "2", "10"] and lines[1].endswith("ok")
    assert "backed off" in lines[2] and "503" in lines[2]
    code, out, _ = run(capsys, "machinetypes", "--state-dir", str(tmp_path), "--space", "a.example.org")
    assert len(out.splitlines()) == 2 and "300 Nothing to do?[2J" in out  # terminal-safe
    assert out.splitlines()[0].split()[5] == "HEARTBEATING" and out.splitlines()[1].split()[5] == "1"
    code, out, _ = run(capsys, "machines", "--state-dir", str(tmp_path), "--json")
    machines = json.loads(out)
    assert [(m["space"], m["name"], m["state"]) for m in machines] == [
        ("a.example.org", "vcycle-lhcb-aaaaaaaaaa", "running"), ("b.example.org", "vcycle-lhcb-aaaaaaaaaa", "running")]


def test_missing_or_broken_status_files_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "spaces", "--state-dir", str(tmp_path))
    assert code == 1 and "vcycled has not completed a cycle" in err
    (tmp_path / "spaces" / "x").mkdir(parents=True)
    (tmp_path / "spaces" / "x" / "status.json").write_text("[1, 2]")
    write_status(tmp_path, "ok.example.org")
    code, out, err = run(capsys, "machines", "--state-dir", str(tmp_path))
    assert code == 0 and "not a vcycled status file" in err and "vcycle-lhcb-aaaaaaaaaa" in out


def test_an_oversized_status_file_is_said_to_be_one(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from vac.cli import vcyclestatus

    write_status(tmp_path, "big.example.org")
    monkeypatch.setattr(vcyclestatus, "MAX_STATUS_BYTES", 100)
    code, _, err = run(capsys, "spaces", "--state-dir", str(tmp_path))
    assert code == 1 and "larger than 100 bytes" in err and "not JSON" not in err
