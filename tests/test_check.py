import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vac.cli import check
from vac.cli.check import CRITICAL, OK, UNKNOWN, WARNING, StatusError, validate_status

NOW = 1_800_000_000.0
REPO = Path(__file__).resolve().parent.parent


def healthy_status(**changes) -> dict:
    status = {
        "format": 1, "pid": os.getpid(), "version": "04.00.00", "time": NOW - 2, "loop_time": NOW - 2,
        "responder_time": NOW - 1, "metadata_time": NOW - 3, "mjf_time": NOW - 3,
        "running_machines": 3, "slots": 8, "running_processors": 3, "total_processors": 8,
        "last_creation_error": None, "last_creation_error_time": None,
    }
    status.update(changes)
    return status


def run_check(tmp_path, capsys, status=None, *options) -> tuple[int, str]:
    if status is not None:
        (tmp_path / "status.json").write_text(json.dumps(status) if isinstance(status, dict) else status)
    code = check.main(["--state-dir", str(tmp_path), *options], now=NOW)
    return code, capsys.readouterr().out.strip()


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_ok_with_perfdata(tmp_path, capsys):
    code, line = run_check(tmp_path, capsys, healthy_status())
    assert code == OK
    assert line == (
        "VACD OK - 3/8 machines running | machines=3;;;0;8 processors=3;;;0;8 age=2s;300;600;0 "
        "responder_age=1s;300;600;0 metadata_age=3s;300;600;0 mjf_age=3s;300;600;0"
    )


def test_warning_when_a_service_is_quiet(tmp_path, capsys):
    code, line = run_check(tmp_path, capsys, healthy_status(responder_time=NOW - 400))
    assert code == WARNING
    assert line.startswith("VACD WARNING - responder not seen for 400s; 3/8 machines running |")


def test_critical_when_the_loop_stalls(tmp_path, capsys):
    code, line = run_check(tmp_path, capsys, healthy_status(loop_time=NOW - 700, mjf_time=NOW - 350))
    assert code == CRITICAL
    assert line.startswith("VACD CRITICAL - loop not seen for 700s; MJF service not seen for 350s; 3/8 machines")


def test_thresholds_from_options(tmp_path, capsys):
    status = healthy_status(loop_time=NOW - 70)
    assert run_check(tmp_path, capsys, status, "-w", "60", "-c", "120")[0] == WARNING
    assert run_check(tmp_path, capsys, status, "-w", "30", "-c", "60")[0] == CRITICAL
    code, line = run_check(tmp_path, capsys, status, "60")  # classic positional critical age
    assert code == CRITICAL and "age=70s;60;60;0" in line
    assert run_check(tmp_path, capsys, status, "600")[0] == OK


def test_critical_when_no_status_file(tmp_path, capsys):
    code, line = run_check(tmp_path, capsys)
    assert code == CRITICAL
    assert line == f"VACD CRITICAL - no status file {tmp_path}/status.json: vacd is not running or has not started yet"


def test_critical_when_the_daemon_is_gone(tmp_path, capsys):
    pid = dead_pid()
    code, line = run_check(tmp_path, capsys, healthy_status(pid=pid))
    assert code == CRITICAL
    assert line.startswith(f"VACD CRITICAL - vacd (pid {pid}) is not running; 3/8 machines running |")


def test_critical_when_the_last_creation_failed(tmp_path, capsys):
    error = "image https://example.org/cernvm.iso: HTTP 404\nsecond line"
    code, line = run_check(tmp_path, capsys, healthy_status(last_creation_error=error, last_creation_error_time=NOW - 30))
    assert code == CRITICAL
    assert "last creation failed 30s ago: image https://example.org/cernvm.iso: HTTP 404; 3/8" in line
    assert "second line" not in line


def test_long_creation_error_is_shortened(tmp_path, capsys):
    code, line = run_check(tmp_path, capsys, healthy_status(last_creation_error="x" * 1000, last_creation_error_time=None))
    assert code == CRITICAL
    assert "x" * 197 + "..." in line and "x" * 198 not in line


def test_disabled_service_is_not_checked(tmp_path, capsys):
    code, line = run_check(tmp_path, capsys, healthy_status(metadata_time=None))
    assert code == OK and "metadata_age" not in line


def test_clock_skew_gives_zero_age(tmp_path, capsys):
    code, line = run_check(tmp_path, capsys, healthy_status(loop_time=NOW + 30))
    assert code == OK and " age=0s;" in line


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        (healthy_status(format=2), "format 2 not understood"),
        (healthy_status(pid=True), "pid=True of the wrong type"),
        (healthy_status(loop_time="now"), "loop_time='now' of the wrong type"),
        ({key: value for key, value in healthy_status().items() if key != "slots"}, "lacks 'slots'"),
    ],
)
def test_unknown_for_malformed_status(tmp_path, capsys, content, message):
    code, line = run_check(tmp_path, capsys, content)
    assert code == UNKNOWN
    assert line.startswith("VACD UNKNOWN - ") and message in line


def test_unknown_for_unreadable_status(tmp_path, capsys):
    (tmp_path / "status.json").mkdir()
    code, line = run_check(tmp_path, capsys)
    assert code == UNKNOWN and "cannot read" in line


def test_unknown_for_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--state-dir", str(tmp_path), "-w", "soon"])
    assert exit_info.value.code == UNKNOWN
    assert capsys.readouterr().out.startswith("VACD UNKNOWN - ")
    assert run_check(tmp_path, capsys, healthy_status(), "-c", "60", "60")[0] == UNKNOWN
    assert run_check(tmp_path, capsys, healthy_status(), "-c", "0")[0] == UNKNOWN


def test_validate_status_is_usable_by_the_writer():
    assert validate_status(healthy_status(extra_key="ignored"))["slots"] == 8
    with pytest.raises(StatusError):
        validate_status(healthy_status(slots=8.5))


def test_state_dir_from_configuration(tmp_path, capsys):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "status.json").write_text(json.dumps(healthy_status()))
    conf = tmp_path / "vac.conf"
    conf.write_text(f"[settings]\nvac_space = vac01.example.org\nfactory_name = factory1.example.org\nstate_dir = {state_dir}\n")
    code = check.main(["--conf", str(conf), "--conf-dir", str(tmp_path / "none"), "--run-conf", str(tmp_path / "run.conf")], now=NOW)
    assert code == OK, capsys.readouterr().out


@pytest.mark.component
def test_exit_status_of_the_real_command(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps(healthy_status(pid=dead_pid(), loop_time=0)))
    done = subprocess.run([sys.executable, "-m", "vac.cli.check", "--state-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == CRITICAL
    assert done.stdout.startswith("VACD CRITICAL - vacd (pid ")


def test_unusable_configuration_is_unknown(tmp_path, capsys):
    conf = tmp_path / "vac.conf"
    conf.write_text("[settings]\nvac_space = vac01.example.org\nfactory_name = factory1.example.org\nmb_per_processor = lots\n")
    code = check.main(["--conf", str(conf), "--conf-dir", str(tmp_path / "none"), "--run-conf", str(tmp_path / "run.conf")], now=NOW)
    line = capsys.readouterr().out
    assert code == UNKNOWN
    assert line.startswith(f"VACD UNKNOWN - cannot read the configuration ({conf}:4: ") and "give --state-dir" in line
