"""The whole vacd (a real process) with podman machinetypes on real podman (``container`` tier).

Every scenario runs vacd with its own configuration and state directory; containers run the
busybox image of tests/containerimage.py, are scripted through their user_data and watched where
an administrator would: machine records, joboutputs, the APEL archive, the log and VacQuery.
vacd connects only the engine backend (no VM machinetype: no libvirt, and the metadata/MJF
services keep their default addresses, which this host does not have). Skipped without podman or
root, like tests/test_container_podman.py; ``VAC_REQUIRE_CONTAINER=1`` makes that a failure.

The last scenario, a mixed node of VMs and containers, also needs the system tier (libvirtd,
QEMU and the test guest) and is marked ``system`` too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidmod
from pathlib import Path
from typing import Optional

import pytest

from tests.containerimage import podman_image, remove_factory_containers
from tests.vacdprocess import VacdProcess

pytestmark = pytest.mark.container
STOP_GRACE_SECONDS = 2
BURN_TICKS = 300  # CPU time the user_data burns in its own shell, in clock ticks (3 s at 100 Hz)

# The shell burns CPU until /proc/$$/stat says it used BURN_TICKS of user + system time (``read``
# is a builtin: the loop forks nothing, so all of it is the shell's own).
BURN_SCRIPT = f"""#!/bin/sh
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
NO_WORK_SCRIPT = """#!/bin/sh
echo "300 No more work" > $JOBOUTPUTS/shutdown_message
"""
# Heartbeats once, then ignores SIGTERM (noting it): only the SIGKILL after the grace ends it.
STALL_SCRIPT = """#!/bin/sh
trap 'echo TERM >> $JOBOUTPUTS/signals' TERM
date > $JOBOUTPUTS/heartbeat
while :; do sleep 1; done
"""
# Heartbeats until SIGTERM, then leaves with a message of its own.
FOREVER_SCRIPT = """#!/bin/sh
trap 'echo "200 Stopped by SIGTERM" > $JOBOUTPUTS/shutdown_message; exit 0' TERM
while :; do date > $JOBOUTPUTS/heartbeat; sleep 1; done
"""
SLOW_SECONDS = 8
SLOW_SCRIPT = f"""#!/bin/sh
date > $JOBOUTPUTS/heartbeat
sleep {SLOW_SECONDS}
echo "200 Success" > $JOBOUTPUTS/shutdown_message
"""
SHORT_SCRIPT = """#!/bin/sh
sleep 2
echo "200 Success" > $JOBOUTPUTS/shutdown_message
"""


@pytest.fixture(scope="module")
def image() -> str:
    return podman_image()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def podman(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", "--cgroup-manager", "cgroupfs", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def container_running(uuid: str) -> Optional[bool]:
    """Whether vac's container of machine ``uuid`` runs (None: no such container)."""
    result = podman("inspect", "--type", "container", "--format", "{{.State.Running}}",
                    f"vac-{uuid}")
    return None if result.returncode != 0 else result.stdout.strip() == "true"


class Vacd(VacdProcess):
    """One vacd process with a podman machinetype."""

    def __init__(self, root: Path, image: str, user_data: str, machinetype: str = "",
                 settings: str = ""):
        super().__init__(root)
        self.name = f"vacd{uuidmod.uuid4().hex[:10]}.test.invalid"
        self.vacquery_port = free_udp_port()
        (root / "user_data").write_text(user_data)
        (self.conf_dir / "10-test.conf").write_text(f"""
[settings]
vac_space = space.test.invalid
factory_name = {self.name}
factories = {self.name}@127.0.0.1:{self.vacquery_port}
gocdb_sitename = TEST-SITE
hs06_per_processor = 10
state_dir = {self.state}
total_processors = 1
mb_per_processor = 128
http_port = 0
vacquery_address = 127.0.0.1
vacquery_port = {self.vacquery_port}
reconcile_seconds = 2
stop_grace_seconds = {STOP_GRACE_SECONDS}
overload_per_processor = 1000
container_runtime = runc
container_network = none

[machinetype busy]
target_share = 1
machine_model = podman
root_image = docker://{image}
user_data = {root}/user_data
fizzle_seconds = 1
""")
        # A later fragment: its values replace those above.
        (self.conf_dir / "15-scenario.conf").write_text(
            f"[settings]\n{settings}\n[machinetype busy]\n{machinetype}\n")

    def drain(self) -> None:
        """No new machine from the next plan on (the run-time file)."""
        (self.root / "run.conf").write_text("[settings]\ndraining = yes\n")

    def vacquery_machines(self) -> list[dict]:
        """This factory's machine_status messages, through VacQuery as ``vac machines`` asks."""
        result = subprocess.run(
            [sys.executable, "-m", "vac.cli.main", "--conf-dir", str(self.conf_dir),
             "--conf", str(self.root / "absent.conf"), "--run-conf", str(self.root / "run.conf"),
             "machines", "--json", "."], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return [message for message in json.loads(result.stdout)
                if message.get("message_type") == "machine_status"]



@pytest.fixture
def make_vacd(image):
    """``make_vacd(user_data, machinetype=..., settings=...)``: a Vacd, not started;
    stopped and its containers removed afterwards."""
    # Not pytest's 0700 tmp_path: every directory above a machine's must be searchable.
    root = Path(tempfile.mkdtemp(prefix="vacd-container-", dir="/var/tmp"))
    root.chmod(0o755)
    made = []

    def make(user_data: str, **options: str) -> Vacd:
        made.append(Vacd(root, image, user_data, **options))
        return made[-1]

    yield make
    for daemon in made:
        daemon.kill(signal.SIGTERM)
        remove_factory_containers(daemon.name)
    shutil.rmtree(root, ignore_errors=True)


def test_vacd_runs_a_podman_machine_to_its_end_and_accounts_its_cpu_once(make_vacd):
    vacd = make_vacd(BURN_SCRIPT, machinetype="heartbeat_file = heartbeat\nheartbeat_seconds = 600")
    vacd.start()
    first = vacd.wait_for("the container running", lambda: vacd.machines_in("running"))[0]
    # Peers see the classic model name for a podman machine.
    shown = [m for m in vacd.vacquery_machines() if m.get("uuid") == first["uuid"]]
    assert [m["machine_model"] for m in shown] == ["docker"], shown
    vacd.drain()  # no second machine afterwards
    finished = vacd.wait_for("the machine finished",
                             lambda: vacd.machines_in("finished", first["uuid"]))[0]
    outputs = finished["dir"] / "joboutputs"
    message = (outputs / "shutdown_message").read_text()
    assert message.startswith("200 Burned ") and (outputs / "heartbeat").stat().st_size > 0
    assert finished["shutdown_message"] == message.strip()
    assert finished["accounted"] is True
    burned = int(message.split()[2]) / os.sysconf("SC_CLK_TCK")

    records = vacd.apel_records(first["uuid"])
    assert len(records) == 1, records
    fields = records[0]
    # The cgroup holds the shell's CPU and its forks' (date, echo): at least what it burned,
    # never more than its processor could give it in the time it ran.
    assert burned <= int(fields["CpuDuration"]) + 1
    assert int(fields["CpuDuration"]) <= int(fields["WallDuration"]) + 1
    assert fields["LocalJobId"] == first["uuid"]
    log = vacd.log_text()
    assert "the libvirt backend" not in log and "powered off" not in log
    assert "the metadata and MJF services are not started" in log
    assert f"{finished['name']} (busy) ended" in log


def test_no_more_work_backs_the_machinetype_off(make_vacd):
    vacd = make_vacd(NO_WORK_SCRIPT, machinetype="backoff_seconds = 3600")
    vacd.start()
    first = vacd.wait_for("a finished machine", lambda: vacd.machines_in("finished"))[0]
    assert first["shutdown_message"] == "300 No more work"
    vacd.wait_for("the backoff in the log", lambda: "backoff" in vacd.log_text(), timeout=30)
    # Several plans and reconciles (every 2 s) later, still nothing new of that type.
    time.sleep(6)
    assert [r["uuid"] for r in vacd.records()] == [first["uuid"]]


def test_a_container_that_stops_heartbeating_is_stopped_with_700(make_vacd):
    """SIGTERM, which the payload ignores, the grace period, then SIGKILL."""
    vacd = make_vacd(STALL_SCRIPT, machinetype="fizzle_seconds = 2\nheartbeat_file = heartbeat\n"
                                              "heartbeat_seconds = 3\nbackoff_seconds = 3600")
    vacd.start()
    record = vacd.wait_for("a finished machine", lambda: vacd.machines_in("finished"))[0]
    assert record["shutdown_message"] == "700 Heartbeat file not updated"
    assert "TERM" in (record["dir"] / "joboutputs" / "signals").read_text()
    # It ignored SIGTERM: only the SIGKILL after the grace period ended it.
    assert record["finished"] - record["stop_requested"] >= STOP_GRACE_SECONDS
    assert len(vacd.apel_records(record["uuid"])) == 1
    assert container_running(record["uuid"]) is None, "released: the container is removed"


def test_a_container_past_its_wallclock_is_stopped_on_time(make_vacd, record_property):
    """Its deadline wakes vacd: no reconcile tick (every 600 s here) is needed."""
    vacd = make_vacd(FOREVER_SCRIPT, machinetype="max_wallclock_seconds = 6\n"
                                                 "min_wallclock_seconds = 6",
                     settings="reconcile_seconds = 600")
    vacd.start()
    record = vacd.wait_for("a finished machine", lambda: vacd.machines_in("finished"))[0]
    assert record["deadline"] - record["created"] == pytest.approx(6)
    assert 0 < record["stop_requested"] - record["deadline"] <= 2, record
    # It left on SIGTERM with its own message, within the grace period.
    assert record["shutdown_message"] == "200 Stopped by SIGTERM"
    assert "passed its deadline" in vacd.log_text()
    record_property("timing", f"stop requested {record['stop_requested'] - record['deadline']:.2f}"
                              f" s after the deadline, finished "
                              f"{record['finished'] - record['deadline']:.2f} s after")


def test_kill_9_and_restart_adopts_running_containers_and_accounts_each_once(make_vacd):
    vacd = make_vacd(SLOW_SCRIPT)
    vacd.start()
    running = vacd.wait_for("a running machine", lambda: vacd.machines_in("running"))[0]
    vacd.kill()  # kill -9 while the container runs
    assert container_running(running["uuid"]) is True
    vacd.start()
    vacd.wait_for("the adopted machine to finish",
                  lambda: vacd.machines_in("finished", running["uuid"]))
    assert "recovered 1 live machines" in vacd.log_text()
    vacd.wait_for("its APEL record", lambda: vacd.apel_records(running["uuid"]), timeout=10)
    later = vacd.wait_for("a second machine", lambda: [
        r for r in vacd.machines_in("running") if r["uuid"] != running["uuid"]])[0]
    # kill -9 again; this container ends while vacd is down, and is finished once after restart.
    vacd.kill()
    vacd.drain()
    ended = time.monotonic() + SLOW_SECONDS + 30
    while container_running(later["uuid"]) and time.monotonic() < ended:
        time.sleep(0.5)
    assert container_running(later["uuid"]) is False, "exited, kept listed until its release"
    vacd.start()
    finished = vacd.wait_for("the machine that ended while vacd was down to be finished",
                             lambda: vacd.machines_in("finished", later["uuid"]))[0]
    assert finished["shutdown_message"] == "200 Success"
    time.sleep(3)  # a reconcile later: nothing is finished or accounted twice
    for uuid in (running["uuid"], later["uuid"]):
        assert len(vacd.apel_records(uuid)) == 1, uuid
    assert container_running(later["uuid"]) is None


def test_a_labelled_container_without_a_record_is_removed_as_a_zombie(make_vacd, image):
    from vac.backends.container.common import process_ulimits

    vacd = make_vacd(SLOW_SCRIPT)
    vacd.drain()  # only the zombie runs
    vacd.start()
    vacd.wait_for("vacd ready", lambda: "ready: factory" in vacd.log_text(), timeout=30)
    zombie = str(uuidmod.uuid4())
    nofile, nproc = process_ulimits()
    started = podman("run", "--detach", "--runtime", "runc", "--name", f"vac-{zombie}",
                     "--label", f"vac.machine_uuid={zombie}", "--label", f"vac.factory={vacd.name}",
                     "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}",
                     "--network", "none", "--", image, "sleep", "1000")
    assert started.returncode == 0, started.stderr
    vacd.wait_for("the zombie removed", lambda: container_running(zombie) is None, timeout=30)
    assert f"destroying zombie machine vac-{zombie} ({zombie})" in vacd.log_text()
    assert vacd.records() == []


@pytest.mark.system
def test_a_mixed_node_shares_its_processors_between_vms_and_containers(
        make_vacd, system_guest, system_network_names):
    """A VM machinetype on real libvirtd + QEMU beside a podman one, one slot each by their
    target shares: the VM runs while containers come and go in the other slot."""
    vacd = make_vacd(SHORT_SCRIPT, settings=f"""
total_processors = 2
libvirt_uri = qemu:///system
domain_type = qemu
network_name = {system_network_names.network}
bridge_name = {system_network_names.bridge}
network_forward = none
kernel = {system_guest.kernel}
initrd = {system_guest.initrd}
kernel_cmdline = {system_guest.cmdline}
mb_per_processor = 96
disk_gb_per_processor = 1
""")
    (vacd.root / "vm_user_data").write_text("#!/bin/sh\nwhile :; do vac-put heartbeat alive; "
                                            "sleep 2; done\n")
    (vacd.conf_dir / "20-vm.conf").write_text(f"""
[machinetype vm]
target_share = 1
machine_model = cernvm3
root_image = {system_guest.iso}
user_data = {vacd.root}/vm_user_data
fizzle_seconds = 1
""")
    vacd.start()
    try:
        vm = vacd.wait_for("the VM running", lambda: [
            r for r in vacd.machines_in("running") if r["machinetype"] == "vm"])[0]
        vacd.wait_for("two containers finished beside the VM", lambda: len(
            [r for r in vacd.machines_in("finished") if r["machinetype"] == "busy"]) >= 2)
        assert vacd.machines_in("running", vm["uuid"]), "the VM kept its slot"
        models = {(m["machinetype"], m["machine_model"]) for m in vacd.vacquery_machines()
                  if m.get("machinetype")}
        assert ("vm", "cernvm3") in models and models <= {("vm", "cernvm3"), ("busy", "docker")}
        busy = [r for r in vacd.records() if r["machinetype"] == "busy"]
        assert {r["slot"] for r in busy} == {1 - vm["slot"]}, "containers only in the other slot"
    finally:
        vacd.kill(signal.SIGTERM)
        vacd.destroy_domains()
