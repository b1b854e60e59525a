import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vac.ops.daemonize import DaemonizeError, PidFile, process_alive, read_pid

REPO = Path(__file__).resolve().parent.parent

# Daemonizes, logs through the preserved log file, then idles for at most 60 s.
DAEMON_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, time
    from vac.ops.daemonize import DaemonizeError, daemonize
    from vac.ops.logsetup import setup_logging

    setup_logging(log_file=sys.argv[2])
    try:
        daemonize(sys.argv[1])
    except DaemonizeError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
    umask = os.umask(0o022)
    logging.getLogger("child").info("daemonized pid=%d umask=%03o", os.getpid(), umask)
    for _ in range(600):
        time.sleep(0.1)
    """
)


def gone(pid: int) -> bool:
    """Exited; a zombie waiting for a reaper that is not ours also counts as exited."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def launch(tmp_path, pidfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", DAEMON_SCRIPT, str(pidfile), str(tmp_path / "vacd.log")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30,
    )


@pytest.fixture
def daemon_pids():
    """PIDs of daemons started by a test; any still alive at the end are stopped by PID."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.component
def test_daemon_detaches_writes_pidfile_and_stops_on_sigterm(tmp_path, daemon_pids):
    pidfile = tmp_path / "vacd.pid"
    launched = launch(tmp_path, pidfile)
    assert launched.returncode == 0, launched.stderr
    assert wait_for(pidfile.exists)
    pid = read_pid(str(pidfile))
    daemon_pids.append(pid)
    assert pid is not None and process_alive(pid) and not gone(pid)

    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    assert status["Umask"].strip() == "0022"
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.getsid(pid) != os.getsid(0)  # in a session of its own
    assert Path(f"/proc/{pid}/fd/0").resolve() == Path("/dev/null")

    log = tmp_path / "vacd.log"
    assert wait_for(lambda: f"daemonized pid={pid} umask=022" in log.read_text())

    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: gone(pid))
    assert wait_for(lambda: not pidfile.exists())


@pytest.mark.component
def test_second_instance_is_refused_before_detaching(tmp_path):
    pidfile = tmp_path / "vacd.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # a live process owns it
    launched = launch(tmp_path, pidfile)
    assert launched.returncode == 1
    assert f"already running as pid {os.getpid()}" in launched.stderr
    assert read_pid(str(pidfile)) == os.getpid()


@pytest.mark.component
def test_stale_pidfile_is_replaced(tmp_path, daemon_pids):
    finished = subprocess.Popen(["true"])
    finished.wait()
    pidfile = tmp_path / "vacd.pid"
    pidfile.write_text(f"{finished.pid}\n")
    launched = launch(tmp_path, pidfile)
    assert launched.returncode == 0, launched.stderr
    assert wait_for(lambda: read_pid(str(pidfile)) not in (None, finished.pid))
    pid = read_pid(str(pidfile))
    daemon_pids.append(pid)
    assert process_alive(pid)
    os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: gone(pid))


def test_pidfile_context_writes_and_removes_own_pid(tmp_path):
    path = tmp_path / "vacd.pid"
    with PidFile(str(path)):
        assert read_pid(str(path)) == os.getpid()
    assert not path.exists()


def test_pidfile_is_left_alone_when_another_pid_took_it_over(tmp_path):
    path = tmp_path / "vacd.pid"
    with PidFile(str(path)):
        path.write_text("1\n")
    assert read_pid(str(path)) == 1


def test_pidfile_refuses_live_owner(tmp_path):
    path = tmp_path / "vacd.pid"
    path.write_text("1\n")  # PID 1 always exists
    with pytest.raises(DaemonizeError, match="already running as pid 1"):
        PidFile(str(path)).__enter__()


def test_unwritable_pidfile_location_is_a_clear_error(tmp_path):
    with pytest.raises(DaemonizeError, match="cannot create pidfile"):
        PidFile(str(tmp_path / "missing" / "vacd.pid")).__enter__()


def test_read_pid_rejects_garbage(tmp_path):
    path = tmp_path / "pid"
    for text in ("", "abc", "-5", "0", "12 13"):
        path.write_text(text)
        assert read_pid(str(path)) is None
    assert read_pid(str(tmp_path / "absent")) is None
