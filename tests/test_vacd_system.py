"""System tier: the whole vacd (a real process) on real libvirtd + QEMU booting the test guest.

Each scenario starts vacd with its own configuration and state directory on an isolated test
network, scripts the guests through their user_data (``vac-put NAME VALUE`` uploads to MJF
joboutputs), and watches the outcome where an administrator would: the machine records, the
joboutputs, the APEL archive and the logs. At most two guests run at once; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt
import pytest

from tests.qemu_cpu import QemuCpuWatcher
from tests.vacdprocess import WAIT_SECONDS, VacdProcess

pytestmark = pytest.mark.system

FACTORY = "vacd-test.example.org"

GOOD_SCRIPT = """#!/bin/sh
vac-put heartbeat alive
sleep 3
vac-put shutdown_message "200 Success from ##user_data_uuid##"
"""
NO_WORK_SCRIPT = """#!/bin/sh
vac-put shutdown_message "300 No more work"
"""
STALL_SCRIPT = """#!/bin/sh
vac-put heartbeat alive
sleep 100000
"""
FOREVER_SCRIPT = """#!/bin/sh
while :; do vac-put heartbeat alive; sleep 2; done
"""
SLOW_SCRIPT = """#!/bin/sh
vac-put heartbeat alive
sleep 25
vac-put shutdown_message "200 Success"
"""
BURN_SECONDS = 15
BURN_SCRIPT = f"""#!/bin/sh
vac-put heartbeat alive
end=$(( $(cut -d. -f1 /proc/uptime) + {BURN_SECONDS} ))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    i=0; while [ $i -lt 1000 ]; do i=$((i + 1)); done
done
vac-put shutdown_message "200 Burned {BURN_SECONDS} s"
"""
STOP_GRACE_SECONDS = 3


class Vacd(VacdProcess):
    """One vacd process with a machinetype of real VMs."""

    def __init__(self, tmp_path: Path, guest, names, machinetype_options: str, *,
                 processors: int = 1, port: int = 19995, settings: str = ""):
        super().__init__(tmp_path)
        (tmp_path / "user_data").write_text(machinetype_options.split("\n#SCRIPT\n")[1])
        options = machinetype_options.split("\n#SCRIPT\n")[0]
        (self.conf_dir / "10-test.conf").write_text(f"""
[settings]
vac_space = space.example.org
factory_name = {FACTORY}
factories = {FACTORY}@127.0.0.1:{port}
gocdb_sitename = TEST-SITE
hs06_per_processor = 10
state_dir = {self.state}
libvirt_uri = qemu:///system
domain_type = qemu
network_name = {names.network}
bridge_name = {names.bridge}
network_forward = none
vacquery_address = 127.0.0.1
vacquery_port = {port}
total_processors = {processors}
mb_per_processor = 96
disk_gb_per_processor = 1
root_public_key = {tmp_path}/no-key.pub
stop_grace_seconds = {STOP_GRACE_SECONDS}
reconcile_seconds = 3
# The host's load comes from the test machine, not these scenarios (the veto has pure tests).
overload_per_processor = 1000
kernel = {guest.kernel}
initrd = {guest.initrd}
kernel_cmdline = {guest.cmdline}

[machinetype test]
target_share = 1
machine_model = cernvm3
root_image = {guest.iso}
user_data = {tmp_path}/user_data
{options}
""")
        if settings:  # a later fragment: its values replace those above
            (self.conf_dir / "20-settings.conf").write_text(f"[settings]\n{settings}\n")

    def vac_command(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "vac.cli.main", *self.config_options(), *arguments]

    def shutdown_message(self, record: dict):
        path = Path(record["dir"]) / "joboutputs" / "shutdown_message"
        return path.read_text() if path.exists() else None


@pytest.fixture
def vacd_factory(system_guest, system_network_names):
    # QEMU runs as libvirt-qemu and opens the disks by path: the state directory must be
    # searchable by it, which pytest's 0700 tmp_path is not.
    tmp_path = Path(tempfile.mkdtemp(prefix="vacd-system-", dir="/var/tmp"))
    tmp_path.chmod(0o755)
    started = []

    def make(options: str, **kwargs) -> Vacd:
        vacd = Vacd(tmp_path, system_guest, system_network_names, options, **kwargs)
        started.append(vacd)
        return vacd

    yield make
    for vacd in started:
        vacd.kill(signal.SIGTERM)
        vacd.destroy_domains()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_vm_runs_finishes_cleanly_and_the_slot_is_reused(vacd_factory):
    vacd = vacd_factory("fizzle_seconds = 1\n#SCRIPT\n" + GOOD_SCRIPT)
    vacd.start()
    first = vacd.wait_for("a finished machine", lambda: vacd.machines_in("finished"))[0]
    message = vacd.shutdown_message(first)
    assert message == f"200 Success from {first['uuid']}"
    assert (Path(first["dir"]) / "joboutputs" / "heartbeat").read_text() == "alive"
    user_data = Path(first["dir"]) / "user_data"
    assert user_data.stat().st_mode & 0o077 == 0, "user_data must be readable by root only"
    console = (Path(first["dir"]) / "console.log").read_text(errors="replace")
    assert "GUEST" in console
    # Exactly one APEL record for it, and the same slot runs the next machine.
    vacd.wait_for("an APEL archive record", vacd.apel_paths, timeout=10)
    assert sum(first["uuid"] in Path(path).read_text() for path in vacd.apel_paths()) == 1
    second = vacd.wait_for("the next machine in slot 0", lambda: [
        r for r in vacd.records() if r["uuid"] != first["uuid"] and r["slot"] == 0])[0]
    assert second["machinetype"] == "test"
    # An admin's view of it, through VacQuery from this factory.
    shown = subprocess.run(vacd.vac_command("machinetypes"), capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert "test" in shown.stdout and "200 Success" in shown.stdout


def test_no_more_work_backs_the_machinetype_off(vacd_factory):
    vacd = vacd_factory("fizzle_seconds = 1\nbackoff_seconds = 3600\n#SCRIPT\n" + NO_WORK_SCRIPT)
    vacd.start()
    vacd.wait_for("a finished machine", lambda: vacd.machines_in("finished"))
    time.sleep(8)  # several cycles: nothing new may start
    assert len(vacd.records()) == 1
    assert "backoff" in vacd.log_text()


def test_a_vm_that_stops_heartbeating_is_killed_with_700(vacd_factory):
    vacd = vacd_factory("fizzle_seconds = 30\nheartbeat_file = heartbeat\nheartbeat_seconds = 5\n"
                        "backoff_seconds = 3600\n#SCRIPT\n" + STALL_SCRIPT)
    vacd.start()
    record = vacd.wait_for("a finished machine", lambda: vacd.machines_in("finished"))[0]
    assert vacd.shutdown_message(record) == "700 Heartbeat file not updated"


def test_a_vm_past_its_wallclock_is_stopped_on_time(vacd_factory, record_property):
    """Its deadline wakes vacd: no reconcile tick (every 600 s here) is needed."""
    vacd = vacd_factory("max_wallclock_seconds = 25\nmin_wallclock_seconds = 25\nfizzle_seconds = 1\n"
                        "#SCRIPT\n" + FOREVER_SCRIPT, settings="reconcile_seconds = 600")
    vacd.start()
    record = vacd.wait_for("a finished machine", lambda: vacd.machines_in("finished"))[0]
    assert record["deadline"] - record["created"] == pytest.approx(25)
    assert 0 < record["stop_requested"] - record["deadline"] <= 2, record
    # The guest ignores the ACPI button: destroyed after the grace period.
    assert record["finished"] - record["deadline"] <= 2 + STOP_GRACE_SECONDS + 2, record
    assert "passed its deadline" in vacd.log_text()
    record_property("timing", f"stop requested {record['stop_requested'] - record['deadline']:.2f} s "
                              f"after the deadline, finished {record['finished'] - record['deadline']:.2f} s after")


def test_a_busy_guest_is_accounted_all_the_cpu_qemu_used(vacd_factory, record_property):
    vacd = vacd_factory("fizzle_seconds = 1\n#SCRIPT\n" + BURN_SCRIPT)
    vacd.start()
    running = vacd.wait_for("a running machine", lambda: vacd.machines_in("running"))[0]
    uuid = running["uuid"]
    qemu = QemuCpuWatcher(f"{running['name']}-{uuid[:8]}", timeout=WAIT_SECONDS + BURN_SECONDS)
    finished = vacd.wait_for("the busy machine to finish", lambda: [
        r for r in vacd.machines_in("finished") if r["uuid"] == uuid],
        timeout=WAIT_SECONDS + BURN_SECONDS)[0]
    assert vacd.shutdown_message(finished) == f"200 Burned {BURN_SECONDS} s"
    used = qemu.total()
    fields = vacd.wait_for("its APEL record", lambda: vacd.apel_records(uuid), timeout=10)[0]
    accounted = int(fields["CpuDuration"])
    assert accounted >= 1
    assert abs(accounted - used) <= 0.1 * used, (accounted, used, finished["cpu_seconds"])
    assert abs(finished["cpu_seconds"] - used) <= 0.1 * used, (finished["cpu_seconds"], used)
    record_property("timing", f"QEMU used {used:.2f} s, vacd recorded {finished['cpu_seconds']:.2f} s, "
                           f"APEL CpuDuration {accounted} s, WallDuration {fields['WallDuration']} s")


def test_a_configuration_change_applies_to_the_next_creation(vacd_factory):
    """No SIGHUP and no reconcile tick (every 600 s here): the next plan reads the new file."""
    vacd = vacd_factory("fizzle_seconds = 1\n#SCRIPT\n" + GOOD_SCRIPT, settings="reconcile_seconds = 600")
    vacd.start()
    first = vacd.wait_for("a running machine", lambda: vacd.machines_in("running"))[0]
    assert first["deadline"] - first["created"] != pytest.approx(5000)
    (vacd.conf_dir / "30-change.conf").write_text("[machinetype test]\nmax_wallclock_seconds = 5000\n")
    second = vacd.wait_for("the next machine", lambda: [
        r for r in vacd.records() if r["uuid"] != first["uuid"]])[0]
    assert second["deadline"] - second["created"] == pytest.approx(5000)


def test_kill_9_and_restart_adopts_running_vms_and_accounts_each_once(vacd_factory):
    vacd = vacd_factory("fizzle_seconds = 1\n#SCRIPT\n" + SLOW_SCRIPT)
    vacd.start()
    running = vacd.wait_for("a running machine", lambda: vacd.machines_in("running"))[0]
    vacd.kill()  # kill -9 while the VM runs
    conn = libvirt.open("qemu:///system")
    try:
        assert conn.lookupByUUIDString(running["uuid"]).isActive()
    finally:
        conn.close()
    vacd.start()
    vacd.wait_for("the adopted machine to finish", lambda: [
        r for r in vacd.machines_in("finished") if r["uuid"] == running["uuid"]])
    assert "recovered 1 live machines" in vacd.log_text()
    vacd.wait_for("its APEL record", lambda: [p for p in vacd.apel_paths()
                                              if running["uuid"] in Path(p).read_text()], timeout=10)
    later = vacd.wait_for("a second machine", lambda: [
        r for r in vacd.machines_in("running") if r["uuid"] != running["uuid"]])[0]
    # Kill -9 again; this VM finishes while vacd is down, and is finished once after restart.
    vacd.kill()
    deadline = time.monotonic() + WAIT_SECONDS
    conn = libvirt.open("qemu:///system")
    try:
        while time.monotonic() < deadline:
            try:
                if not conn.lookupByUUIDString(later["uuid"]).isActive():
                    break
            except libvirt.libvirtError:
                break
            time.sleep(0.5)
    finally:
        conn.close()
    vacd.start()
    vacd.wait_for("the machine that ended while vacd was down to be finished", lambda: [
        r for r in vacd.machines_in("finished") if r["uuid"] == later["uuid"]])
    time.sleep(4)
    records = {path: Path(path).read_text() for path in vacd.apel_paths()}
    for uuid in (running["uuid"], later["uuid"]):
        assert sum(uuid in text for text in records.values()) == 1


def test_vacd_survives_a_libvirtd_restart(vacd_factory):
    pid_file = Path(os.environ.get("VAC_TESTBED_STATE", "/run/vac-testbed")) / "libvirtd.pid"
    if not pid_file.exists():
        pytest.skip("libvirtd was not started by scripts/testbed-up: not ours to restart")
    vacd = vacd_factory("fizzle_seconds = 1\n#SCRIPT\n" + SLOW_SCRIPT)
    vacd.start()
    running = vacd.wait_for("a running machine", lambda: vacd.machines_in("running"))[0]
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    subprocess.run(["/usr/sbin/libvirtd", "-d"], check=True)
    for _ in range(200):
        if subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    pid_file.write_text(Path("/run/libvirtd.pid").read_text())
    vacd.wait_for("the machine to finish after the libvirtd restart", lambda: [
        r for r in vacd.machines_in("finished") if r["uuid"] == running["uuid"]])
    vacd.wait_for("a new machine after the restart", lambda: [
        r for r in vacd.records() if r["uuid"] != running["uuid"]])
