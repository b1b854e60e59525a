"""The whole vacd (a real process) with a podman machinetype on real podman (``container`` tier).

vacd connects only the engine backend (no libvirt: no VM machinetype), creates the container,
whose user_data heartbeats, burns CPU and writes its shutdown_message; the container exits, the
engine's event reaches vacd, and vacd finishes the machine with exactly one APEL record whose
CpuDuration holds the CPU the busy loop used (read from the container's cgroup before its
release). Skipped without podman or root, like tests/test_container_podman.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuidmod
from pathlib import Path

import pytest

from tests.containerimage import busybox_image, engine_available

pytestmark = pytest.mark.container
WAIT_SECONDS = 120.0
BURN_TICKS = 300  # CPU time the user_data burns in its own shell, in clock ticks (3 s at 100 Hz)

# The shell burns CPU until /proc/$$/stat says it used BURN_TICKS of user + system time (``read``
# is a builtin: the loop forks nothing, so all of it is the shell's own).
USER_DATA = f"""#!/bin/sh
date > $JOBOUTPUTS/heartbeat
while :; do
    i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done
    read -r stat < /proc/$$/stat
    set -- ${{stat##*) }}
    [ $(( ${{12}} + ${{13}} )) -ge {BURN_TICKS} ] && break
done
date > $JOBOUTPUTS/heartbeat
echo "200 Burned $(( ${{12}} + ${{13}} )) ticks" > $JOBOUTPUTS/shutdown_message
"""


@pytest.fixture(scope="module")
def image() -> str:
    reason = engine_available("podman") if os.geteuid() == 0 else "needs root"
    if reason:
        if os.environ.get("VAC_REQUIRE_CONTAINER") == "1":
            pytest.fail(f"container tier required but {reason}")
        pytest.skip(reason)
    return busybox_image("podman")


class Vacd:
    def __init__(self, root: Path, image: str):
        self.root = root
        self.name = f"vacd{uuidmod.uuid4().hex[:10]}.test.invalid"
        self.state = root / "state"
        self.log = root / "vacd.log"
        self.conf_dir = root / "vac.d"
        self.conf_dir.mkdir()
        (root / "user_data").write_text(USER_DATA)
        (self.conf_dir / "10-test.conf").write_text(f"""
[settings]
vac_space = space.test.invalid
factory_name = {self.name}
gocdb_sitename = TEST-SITE
hs06_per_processor = 10
state_dir = {self.state}
total_processors = 1
mb_per_processor = 128
metadata_address = 127.0.0.1
mjf_address = 127.0.0.2
http_port = 0
vacquery_address = 127.0.0.1
vacquery_port = 0
reconcile_seconds = 5
overload_per_processor = 1000
container_runtime = runc
container_network = none

[machinetype busy]
target_share = 1
machine_model = podman
root_image = docker://{image}
user_data = {root}/user_data
fizzle_seconds = 1
heartbeat_file = heartbeat
heartbeat_seconds = 600
""")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vac.daemon.vacd", "--conf-dir", str(self.conf_dir),
             "--conf", str(root / "absent.conf"), "--run-conf", str(root / "run.conf"),
             "--log-file", str(self.log), "--debug"], stdin=subprocess.DEVNULL)

    def records(self) -> list[dict]:
        found = []
        for path in sorted((self.state / "machines").glob("*/machine.json")):
            try:
                found.append(json.loads(path.read_text())["machine"] | {"dir": path.parent})
            except (OSError, ValueError):
                continue  # being replaced right now
        return found

    def wait_for(self, what: str, predicate):
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"vacd exited with {self.process.returncode} while waiting for "
                            f"{what}:\n{self.log_text()}")
            result = predicate()
            if result:
                return result
            time.sleep(0.3)
        pytest.fail(f"timed out waiting for {what}:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text()[-6000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)

    def remove_containers(self) -> None:
        """Whatever vacd left running when it stopped (it leaves machines running by design)."""
        from vac.backends.container.engine import EngineBackend

        backend = EngineBackend(self.name, lambda uuid: None, engine="podman", runtime="runc",
                                network="none")
        backend.connect()
        try:
            for machine in backend.list_machines():
                backend.destroy(machine.uuid)
                backend.forget(machine.uuid)
        finally:
            backend.close()


@pytest.fixture
def vacd(image):
    # Not pytest's 0700 tmp_path: every directory above a machine's must be searchable.
    root = Path(tempfile.mkdtemp(prefix="vacd-container-", dir="/var/tmp"))
    root.chmod(0o755)
    daemon = Vacd(root, image)
    yield daemon
    daemon.stop()
    daemon.remove_containers()
    shutil.rmtree(root, ignore_errors=True)


def test_vacd_runs_a_podman_machine_to_its_end_and_accounts_its_cpu_once(vacd):
    first = vacd.wait_for("the container running", lambda: next(
        (r for r in vacd.records() if r["state"] == "running"), None))
    # No second machine afterwards: the run-time file drains the factory from the next plan on.
    (vacd.root / "run.conf").write_text("[settings]\ndraining = yes\n")
    finished = vacd.wait_for("the machine finished", lambda: next(
        (r for r in vacd.records() if r["uuid"] == first["uuid"] and r["state"] == "finished"),
        None))
    outputs = finished["dir"] / "joboutputs"
    message = (outputs / "shutdown_message").read_text()
    assert message.startswith("200 Burned ") and (outputs / "heartbeat").stat().st_size > 0
    assert finished["shutdown_message"] == message.strip()
    assert finished["accounted"] is True
    burned = int(message.split()[2]) / os.sysconf("SC_CLK_TCK")

    archive = vacd.state / "apel-archive"
    records = [path.read_text() for path in archive.rglob("*") if path.is_file()]
    mine = [text for text in records if first["uuid"] in text]
    assert len(mine) == 1, records
    fields = dict(line.split(": ", 1) for line in mine[0].splitlines() if ": " in line)
    # The cgroup holds the shell's CPU and its forks' (date, echo): at least what it burned,
    # never more than its processor could give it in the time it ran.
    assert burned <= int(fields["CpuDuration"]) + 1
    assert int(fields["CpuDuration"]) <= int(fields["WallDuration"]) + 1
    assert fields["LocalJobId"] == first["uuid"]
    log = vacd.log_text()
    assert "the libvirt backend" not in log and "powered off" not in log
    assert f"{finished['name']} (busy) ended" in log
