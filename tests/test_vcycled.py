"""vcycled as a real process against moto's EC2 server and the OpenStack emulator (``cloud``).

"Machines" are played by the test: it reads a machine's user_data back from the cloud, reads its
MJF and uploads its shutdown message over the HTTPS MJF service (checked against a test CA), then
stops the instance in the cloud, as a VM powering off would.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import boto3
import pytest

from tests import openstack_emulator as emu
from tests.cloudservers import MotoServer, free_port
from tests.localhttp import make_tls_files
from tests.openstack_emulator import OpenStackEmulator
from tests.vacdprocess import machine_records
from tests.waiting import wait_until
from vac.cli import vcycle
from vac.core.cloud import META_MACHINETYPE
from vac.core.config import ConfigPaths
from vac.core.vcycleconfig import load_vcycle_config

pytestmark = pytest.mark.cloud

ACCESS_KEY = "AKIAVCYCLEDTEST00001"
SECRET_KEY = "vcycled-secret-key-never-logged-8e2b"
SPACE = "ec2.example.org"
TEMPLATE = "#!/bin/sh\nMJF=##user_data_machinefeatures_url##\nJO=##user_data_joboutputs_url##\nUUID=##user_data_uuid##\n"
WAIT_SECONDS = 60.0


class Daemon:
    """vcycled in a subprocess, stopped (or killed) by its PID."""

    def __init__(self, tmp_path: Path, config: str) -> None:
        self.tmp_path = tmp_path
        self.conf = tmp_path / "vcycle.conf"
        self.conf.write_text(config)
        (tmp_path / "vcycle.d").mkdir(exist_ok=True)
        _, problems = load_vcycle_config(ConfigPaths(str(tmp_path / "vcycle.d"), str(self.conf), ()))
        assert not [p for p in problems if p.is_error], problems
        if not (tmp_path / "server.pem").exists():
            make_tls_files(tmp_path)
        self.state = tmp_path / "state"
        self.log_path = tmp_path / "vcycled.log"
        self.process = None

    def start(self, https_port: int, *extra: str, env: Optional[dict] = None,
              hostname: str = "vcycle.example.org") -> None:
        environment = {k: v for k, v in os.environ.items()
                       if not k.startswith(("AWS_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vac.daemon.vcycled", "--conf-dir", str(self.tmp_path / "vcycle.d"),
             "--conf", str(self.conf), "--state-dir", str(self.state), "--hostname", hostname,
             "--https-address", "127.0.0.1", "--https-port", str(https_port),
             "--https-cert", str(self.tmp_path / "server.pem"), "--https-key", str(self.tmp_path / "server.key"),
             "--cycle-seconds", "1", "--log-file", str(self.log_path), "--debug", *extra], env=environment)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for(self, what: str, condition: Callable[[], object], seconds: float = WAIT_SECONDS) -> object:
        """The first true value of ``condition``; fails at once if vcycled exits meanwhile."""
        return wait_until(what, condition, seconds, poll=0.3, process=self.process, name="vcycled",
                          details=lambda: self.log()[-6000:])

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def records(self, space: str = SPACE) -> list[dict]:
        return machine_records(self.state / "spaces" / space / "machines")

    def apel_records(self, space: str = SPACE) -> list[str]:
        return [p.read_text() for p in (self.state / "spaces" / space / "apel-archive").glob("*/*")]

    def ca(self) -> ssl.SSLContext:
        return ssl.create_default_context(capath=str(self.tmp_path / "certificates"))


def play_machine(user_data: str, context: ssl.SSLContext, message: bytes = b"200 Success") -> str:
    """A machine's part: read MJF and upload a shutdown message over HTTPS; returns its UUID."""
    mjf = re.search(r"MJF=(\S+)", user_data).group(1)
    joboutputs = re.search(r"JO=(\S+)", user_data).group(1)
    with urllib.request.urlopen(f"{mjf}/shutdowntime", context=context, timeout=10) as answer:
        assert int(answer.read()) > time.time()
    request = urllib.request.Request(f"{joboutputs}/shutdown_message", data=message, method="PUT")
    with urllib.request.urlopen(request, context=context, timeout=10) as answer:
        assert answer.status == 201
    return re.search(r"UUID=(\S+)", user_data).group(1)


# --- EC2 (moto) ------------------------------------------------------------------------------------


@pytest.fixture
def ec2(moto: MotoServer):
    moto.reset()
    return boto3.client("ec2", endpoint_url=moto.url, region_name="us-east-1",
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def ec2_config(url: str, image: str, https_port: int, template: Path, *, limit: int = 3,
               shares: Optional[dict] = None, **machinetype: object) -> str:
    lines = [f"[space {SPACE}]", "api = ec2", f"url = {url}", "region = us-east-1",
             f"access_key = {ACCESS_KEY}", f"secret_key = {SECRET_KEY}", f"processors_limit = {limit}",
             "https_host = 127.0.0.1", f"https_port = {https_port}", "flavor_names = t2.micro", ""]
    for name, share in (shares or {"lhcb": 1}).items():
        options = {"target_share": share, "backoff_seconds": 0, "fizzle_seconds": 0, **machinetype}
        lines += [f"[machinetype {SPACE} {name}]", f"root_image = image:{image}", f"user_data = {template}"]
        lines += [f"{key} = {value}" for key, value in options.items()] + [""]
    return "\n".join(lines)


def instances(ec2, *states: str) -> list[dict]:
    found = []
    for reservation in ec2.describe_instances()["Reservations"]:
        found += [i for i in reservation["Instances"] if i["State"]["Name"] in states]
    return found


def user_data_of(ec2, instance_id: str) -> str:
    answer = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(answer["UserData"]["Value"]).decode()


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def ec2_daemon(tmp_path: Path, moto: MotoServer, ec2, daemons: list, **options: object) -> tuple[Daemon, int]:
    template = tmp_path / "user_data"
    template.write_text(TEMPLATE)
    image = ec2.describe_images(MaxResults=5)["Images"][0]["ImageId"]
    https_port = free_port()
    daemon = Daemon(tmp_path, ec2_config(moto.url, image, https_port, template, **options))
    daemons.append(daemon)
    daemon.start(https_port)
    return daemon, https_port


def test_ec2_quota_poweroff_finished_and_accounted_once(tmp_path: Path, moto: MotoServer, ec2, daemons) -> None:
    daemon, _ = ec2_daemon(tmp_path, moto, ec2, daemons)
    running = daemon.wait_for("3 machines (the quota)", lambda: len(instances(ec2, "pending", "running")) == 3
                              and instances(ec2, "pending", "running"))
    time.sleep(3)  # a few more cycles: still the quota, not more
    assert len(instances(ec2, "pending", "running", "stopped", "stopping")) == 3
    instance = running[0]
    uuid = play_machine(user_data_of(ec2, instance["InstanceId"]), daemon.ca())
    time.sleep(2)  # the machine ran past fizzle_seconds (0) and powers off
    ec2.stop_instances(InstanceIds=[instance["InstanceId"]])
    daemon.wait_for("its finish", lambda: any(r["uuid"] == uuid and r["state"] == "finished" for r in daemon.records()))
    record = next(r for r in daemon.records() if r["uuid"] == uuid)
    assert record["shutdown_message"] == "200 Success"
    daemon.wait_for("its termination", lambda: instance["InstanceId"] in
                    {i["InstanceId"] for i in instances(ec2, "terminated", "shutting-down")})
    daemon.wait_for("a replacement", lambda: len(instances(ec2, "pending", "running")) == 3)
    time.sleep(2)
    accounted = [text for text in daemon.apel_records() if f"LocalJobId: {uuid}" in text]
    assert len(accounted) == 1
    assert "InfrastructureDescription: APEL-VCYCLE" in accounted[0]
    assert f"SubmitHost: {SPACE}/vcycle-vcycle.example.org" in accounted[0]
    assert SECRET_KEY not in daemon.log()
    # The shared executor's lines are vcycled's, each naming its space.
    assert f"vcycled[{daemon.process.pid}] INFO: space {SPACE}: creating vcycle-lhcb-" in daemon.log()
    assert "vacd[" not in daemon.log()


def test_ec2_past_wallclock_is_deleted_with_its_700(tmp_path: Path, moto: MotoServer, ec2, daemons) -> None:
    daemon, _ = ec2_daemon(tmp_path, moto, ec2, daemons, max_wallclock_seconds=3, processors_limit=1)
    daemon.wait_for("a deletion", lambda: instances(ec2, "terminated", "shutting-down"))
    finished = daemon.wait_for("a finished record", lambda: [r for r in daemon.records() if r["state"] == "finished"])
    assert finished[0]["shutdown_message"] == "700 Exceeded max_wallclock_seconds"
    assert "deleting" in daemon.log()


def test_ec2_kill_9_and_restart_takes_the_machines_over(tmp_path: Path, moto: MotoServer, ec2, daemons) -> None:
    daemon, https_port = ec2_daemon(tmp_path, moto, ec2, daemons)
    running = daemon.wait_for("3 machines", lambda: len(instances(ec2, "pending", "running")) == 3
                              and instances(ec2, "pending", "running"))
    daemon.wait_for("their records", lambda: len([r for r in daemon.records() if r["state"] == "running"]) == 3)
    daemon.kill()
    # one machine's record is lost with its directory; not the one played below: a machine
    # taken over has no MJF token here
    played = {tag["Key"]: tag["Value"] for tag in running[1]["Tags"]}["Name"]
    lost = next(d for d in (daemon.state / "spaces" / SPACE / "machines").iterdir() if played not in d.name)
    shutil.rmtree(lost)
    daemon.start(https_port)
    daemon.wait_for("the restart", lambda: "2 not finished" in daemon.log())
    daemon.wait_for("the take-over", lambda: "taking over" in daemon.log() and len(daemon.records()) == 3)
    time.sleep(3)  # several cycles: nothing created twice, nothing lost
    assert len(instances(ec2, "pending", "running")) == 3
    uuid = play_machine(user_data_of(ec2, running[1]["InstanceId"]), daemon.ca(), b"300 Nothing to do")
    ec2.stop_instances(InstanceIds=[running[1]["InstanceId"]])
    daemon.wait_for("its finish after the restart",
                    lambda: any(r["uuid"] == uuid and r["state"] == "finished" for r in daemon.records()))
    assert next(r for r in daemon.records() if r["uuid"] == uuid)["shutdown_message"] == "300 Nothing to do"


def test_ec2_two_vcycleds_on_one_space_share_its_quota_and_leave_each_others_machines(
        tmp_path: Path, moto: MotoServer, ec2, daemons) -> None:
    first, _ = ec2_daemon(tmp_path, moto, ec2, daemons, limit=4)
    first.wait_for("the quota's 4 machines", lambda: len(instances(ec2, "pending", "running")) == 4)
    (tmp_path / "second").mkdir()
    second = Daemon(tmp_path / "second", first.conf.read_text())
    daemons.append(second)
    second.start(free_port(), hostname="vcycle2.example.org")
    second.wait_for("the second's cycles", lambda: second.log().count("managed by vcycle.example.org") >= 8)
    first.kill()  # just now: its machines are not abandoned yet
    time.sleep(3)
    assert len(instances(ec2, "pending", "running")) == 4  # nothing created past the shared quota
    assert second.records() == [] and "taking over" not in second.log()
    for instance in instances(ec2, "pending", "running"):
        assert {"Key": "vcycle_manager", "Value": "vcycle.example.org"} in instance["Tags"]


# --- OpenStack (emulator) --------------------------------------------------------------------------


def test_openstack_garbage_answers_are_logged_and_the_space_recovers(tmp_path: Path, daemons) -> None:
    emulator = OpenStackEmulator(max_total_cores=2)
    try:
        image = tmp_path / "root.img"
        image.write_bytes(b"\0" * 1024)
        template = tmp_path / "user_data"
        template.write_text(TEMPLATE)
        https_port = free_port()
        space = "os.example.org"
        config = "\n".join([
            f"[space {space}]", "api = openstack", f"url = {emulator.auth_url}", f"project_name = {emu.PROJECT}",
            f"domain_name = {emu.DOMAIN}", f"username = {emu.USER}",
            f"password_base64 = {base64.b64encode(emu.PASSWORD.encode()).decode()}", f"region = {emu.REGION}",
            "glance_api = 2", "https_host = 127.0.0.1", f"https_port = {https_port}", "",
            f"[machinetype {space} lhcb]", "target_share = 1", f"root_image = {image}", f"user_data = {template}",
            "backoff_seconds = 0", "fizzle_seconds = 0", ""])
        emulator.answers[("GET", "/compute/v2.1/servers/detail")] = (200, {"servers": "garbage"})
        daemon = Daemon(tmp_path, config)
        daemons.append(daemon)
        daemon.start(https_port)
        daemon.wait_for("the error line", lambda: "field 'servers' is str, expected list" in daemon.log())
        assert daemon.process.poll() is None and emulator.servers == {}
        del emulator.answers[("GET", "/compute/v2.1/servers/detail")]
        # the cloud's core limit (2) is the quota: one machine of 1 core per cycle, then none
        daemon.wait_for("machines to the core limit", lambda: len(emulator.servers) == 2, seconds=90)
        server_id = next(iter(emulator.servers))
        emulator.set_server(server_id, "ACTIVE")
        uuid = play_machine(emulator.user_data[server_id].decode(), daemon.ca())
        daemon.wait_for("vcycled to see it running", lambda: any(r["uuid"] == uuid and r["state"] == "running"
                                                                 for r in daemon.records(space)))
        emulator.set_server(server_id, "SHUTOFF", power_state=4)
        daemon.wait_for("its finish", lambda: any(r["uuid"] == uuid and r["state"] == "finished"
                                                  for r in daemon.records(space)))
        assert len([t for t in daemon.apel_records(space) if uuid in t]) == 1
        assert emu.PASSWORD not in daemon.log()
    finally:
        emulator.close()


def test_ec2_300_backs_the_machinetype_off_and_vcycle_shows_why(tmp_path: Path, moto: MotoServer, ec2, daemons,
                                                                 capsys: pytest.CaptureFixture) -> None:
    daemon, _ = ec2_daemon(tmp_path, moto, ec2, daemons, backoff_seconds=3600)
    running = daemon.wait_for("3 machines", lambda: len(instances(ec2, "pending", "running")) == 3
                              and instances(ec2, "pending", "running"))
    uuid = play_machine(user_data_of(ec2, running[0]["InstanceId"]), daemon.ca(), b"300 Nothing to do")
    ec2.stop_instances(InstanceIds=[running[0]["InstanceId"]])
    daemon.wait_for("its finish", lambda: any(r["uuid"] == uuid and r["state"] == "finished" for r in daemon.records()))
    time.sleep(3)  # cycles in backoff: no replacement
    assert len(instances(ec2, "pending", "running")) == 2
    assert vcycle.main(["machinetypes", "--json", "--state-dir", str(daemon.state)]) == 0
    [lhcb] = json.loads(capsys.readouterr().out)
    assert lhcb["last_abort"]["message"] == "300 Nothing to do" and "backoff" in lhcb["blocked_by"]
    assert vcycle.main(["machines", "--state-dir", str(daemon.state)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 2


def heartbeat(user_data: str, context: ssl.SSLContext, stop: threading.Event) -> None:
    """A machine's heartbeat: its joboutputs/heartbeat every half second until ``stop``."""
    joboutputs = re.search(r"JO=(\S+)", user_data).group(1)
    deadline = time.monotonic() + WAIT_SECONDS
    while not stop.is_set() and time.monotonic() < deadline:
        request = urllib.request.Request(f"{joboutputs}/heartbeat", data=b"ok", method="PUT")
        with urllib.request.urlopen(request, context=context, timeout=10):
            pass
        stop.wait(0.5)


def test_ec2_machines_that_stop_heartbeating_are_deleted_with_700_and_replaced(
        tmp_path: Path, moto: MotoServer, ec2, daemons) -> None:
    daemon, _ = ec2_daemon(tmp_path, moto, ec2, daemons, limit=2, backoff_seconds=3600,
                           heartbeat_file="heartbeat", heartbeat_seconds=3)
    running = daemon.wait_for("2 machines", lambda: len(instances(ec2, "pending", "running")) == 2
                              and instances(ec2, "pending", "running"))
    stop = threading.Event()
    beating = threading.Thread(target=heartbeat, args=(user_data_of(ec2, running[0]["InstanceId"]), daemon.ca(), stop))
    beating.start()
    try:
        silent = daemon.wait_for("the silent machine's deletion", lambda: [
            r for r in daemon.records() if r["state"] == "finished"])
        assert silent[0]["shutdown_message"] == "700 Heartbeat file not created"
        # 700 is no abort: a replacement is created although backoff_seconds is an hour
        daemon.wait_for("a replacement", lambda: len(daemon.records()) == 3)
        heartbeating = {i["InstanceId"] for i in instances(ec2, "pending", "running")}
        assert running[0]["InstanceId"] in heartbeating
    finally:
        stop.set()
        beating.join(15)


def test_ec2_heartbeat_lists_and_the_cvmfs_proxies_made_of_them(tmp_path: Path, moto: MotoServer, ec2,
                                                                 daemons) -> None:
    template = tmp_path / "user_data"
    template.write_text(TEMPLATE + "HB=##user_data_heartbeat_machines_url##\nPROXY=##user_data_option_cvmfs_proxy##\n")
    image = ec2.describe_images(MaxResults=5)["Images"][0]["ImageId"]
    https_port = free_port()
    config = ec2_config(moto.url, image, https_port, template, limit=1, shares={"squid": 1},
                        heartbeat_file="heartbeat", heartbeat_seconds=30, max_machines=1)
    daemon = Daemon(tmp_path, config)
    daemons.append(daemon)
    daemon.start(https_port)
    [squid] = daemon.wait_for("the squid machine", lambda: instances(ec2, "pending", "running"))
    squid_name = {tag["Key"]: tag["Value"] for tag in squid["Tags"]}["Name"]
    stop = threading.Event()
    beating = threading.Thread(target=heartbeat, args=(user_data_of(ec2, squid["InstanceId"]), daemon.ca(), stop))
    beating.start()
    try:
        squid_list = daemon.state / "spaces" / SPACE / "heartbeatlists" / "squid"
        line = daemon.wait_for("the squid in its list", lambda: squid_list.exists() and squid_list.read_text())
        assert line.split()[1:] == [squid_name, squid["PrivateIpAddress"]]
        # A machinetype whose cvmfs proxies are the squids heartbeating now, then the site's.
        daemon.conf.write_text(config.replace("processors_limit = 1", "processors_limit = 2") + "\n".join((
            f"[machinetype {SPACE} lhcb]", f"root_image = image:{image}", f"user_data = {template}",
            "target_share = 1", "backoff_seconds = 0", "fizzle_seconds = 0", "cvmfs_proxy_machinetype = squid:3128",
            "user_data_option_cvmfs_proxy = http://site-squid.example.org:3128", "")))
        os.kill(daemon.process.pid, signal.SIGHUP)
        [lhcb] = daemon.wait_for("an lhcb machine", lambda: [
            i for i in instances(ec2, "pending", "running")
            if {"Key": META_MACHINETYPE, "Value": "lhcb"} in i["Tags"]])
        user_data = user_data_of(ec2, lhcb["InstanceId"])
        assert f"PROXY=http://{squid['PrivateIpAddress']}:3128;http://site-squid.example.org:3128\n" in user_data
        # The lists are read with the machine's own token, the machinetype added to the URL.
        lists_url = re.search(r"HB=(\S+)", user_data).group(1)
        with urllib.request.urlopen(f"{lists_url}/squid", context=daemon.ca(), timeout=10) as answer:
            assert answer.read().decode().split()[1:] == [squid_name, squid["PrivateIpAddress"]]
    finally:
        stop.set()
        beating.join(15)


def test_ec2_two_machinetypes_converge_to_their_target_shares(tmp_path: Path, moto: MotoServer, ec2,
                                                                daemons) -> None:
    daemon, _ = ec2_daemon(tmp_path, moto, ec2, daemons, limit=8, shares={"atlas": 3, "lhcb": 1})
    daemon.wait_for("8 machines", lambda: len(instances(ec2, "pending", "running")) == 8)
    time.sleep(2)
    counts: dict = {}
    for instance in instances(ec2, "pending", "running"):
        tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
        counts[tags[META_MACHINETYPE]] = counts.get(tags[META_MACHINETYPE], 0) + 1
    assert counts == {"atlas": 6, "lhcb": 2}


# --- OpenStack: two clouds, systemd, metrics, VacMon ------------------------------------------------


def openstack_config(emulator: OpenStackEmulator, space: str, https_port: int, tmp_path: Path,
                     *space_options: str, **machinetype: object) -> str:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * 1024)
    template = tmp_path / "user_data"
    template.write_text(TEMPLATE)
    options = {"target_share": 1, "backoff_seconds": 0, "fizzle_seconds": 0, **machinetype}
    lines = [f"[space {space}]", "api = openstack", f"url = {emulator.auth_url}", f"project_name = {emu.PROJECT}",
             f"domain_name = {emu.DOMAIN}", f"username = {emu.USER}",
             f"password_base64 = {base64.b64encode(emu.PASSWORD.encode()).decode()}", f"region = {emu.REGION}",
             "glance_api = 2", "https_host = 127.0.0.1", f"https_port = {https_port}", *space_options, "",
             f"[machinetype {space} lhcb]", f"root_image = {image}", f"user_data = {template}"]
    lines += [f"{key} = {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n\n"


def test_a_cloud_failing_and_throttling_backs_off_its_space_only(tmp_path: Path, daemons) -> None:
    good, bad = OpenStackEmulator(max_total_cores=2), OpenStackEmulator(max_total_cores=2)
    try:
        bad.faults = [500, 500, 429, 429]  # backoff: 1, 2, 4, 8 cycles of 1 s
        https_port = free_port()
        config = openstack_config(good, "good.example.org", https_port, tmp_path) \
            + openstack_config(bad, "bad.example.org", https_port, tmp_path)
        daemon = Daemon(tmp_path, config)
        daemons.append(daemon)
        daemon.start(https_port)
        daemon.wait_for("the good space's machines", lambda: len(good.servers) == 2)
        assert "space bad.example.org" in daemon.log() and "next attempt in" in daemon.log()
        daemon.wait_for("the bad space's recovery", lambda: len(bad.servers) == 2, seconds=90)
        assert len(good.servers) == 2 and bad.faults == []
    finally:
        good.close()
        bad.close()


def test_a_hanging_cloud_holds_back_no_other_space(tmp_path: Path, daemons) -> None:
    good, hung = OpenStackEmulator(max_total_cores=2), OpenStackEmulator(max_total_cores=2)
    try:
        https_port = free_port()
        config = openstack_config(good, "good.example.org", https_port, tmp_path) \
            + openstack_config(hung, "hung.example.org", https_port, tmp_path)
        daemon = Daemon(tmp_path, config)
        daemons.append(daemon)
        hung.stall.set()  # every call of the hung space waits (up to a minute)
        daemon.start(https_port)
        # One creation per cycle (a tenth of the limit): the second needs a second cycle, which
        # must not wait for the hung space's first.
        daemon.wait_for("the good space's two machines", lambda: len(good.servers) == 2, seconds=20)
        daemon.wait_for("a skipped cycle of the hung space",
                        lambda: "space hung.example.org: its previous cycle is still running" in daemon.log())
        hung.stall.clear()
        daemon.wait_for("the hung space's machines once it answers", lambda: len(hung.servers) == 2, seconds=90)
    finally:
        hung.stall.clear()
        good.close()
        hung.close()


def notifications(sock: socket.socket, wanted: Callable[[list], bool], seconds: float = WAIT_SECONDS) -> list:
    received: list = []
    deadline = time.monotonic() + seconds
    while not wanted(received):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            received.append(sock.recv(4096).decode())
        except socket.timeout:
            raise AssertionError(f"timed out; received {received}") from None
    return received


def test_notify_watchdog_reload_metrics_and_vacmon(tmp_path: Path, daemons) -> None:
    emulator = OpenStackEmulator(max_total_cores=2)
    short = Path(tempfile.mkdtemp(prefix="vcn", dir="/tmp"))  # AF_UNIX paths are short
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    vacmon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        notify.bind(str(short / "notify"))
        vacmon.bind(("127.0.0.1", 0))
        https_port, metrics_port = free_port(), free_port()
        space = "os.example.org"
        config = openstack_config(emulator, space, https_port, tmp_path,
                                  f"vacmon_hostport = 127.0.0.1:{vacmon.getsockname()[1]}")
        daemon = Daemon(tmp_path, config)
        daemons.append(daemon)
        daemon.start(https_port, "--metrics-port", str(metrics_port),
                     env={"NOTIFY_SOCKET": str(short / "notify"), "WATCHDOG_USEC": "1000000"})
        seen = notifications(notify, lambda got: any("READY=1" in m for m in got)
                             and any("WATCHDOG=1" in m for m in got))
        assert any("STATUS=1 spaces" in m for m in seen)
        vacmon.settimeout(WAIT_SECONDS)
        kinds = set()
        while not {"factory_status", "machinetype_status"} <= kinds:
            message = json.loads(vacmon.recv(65536))
            kinds.add(message["message_type"])
            assert (message["factory"], message["space"]) == ("vcycle.example.org", space)
        daemon.wait_for("two machines", lambda: len(emulator.servers) == 2)
        scraped = daemon.wait_for("metrics", lambda: "vcycle_creations_total" in (text := urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()) and text)
        assert f'vcycle_processors_limit{{space="{space}"}} 2.0' in scraped
        os.kill(daemon.process.pid, signal.SIGHUP)
        seen = notifications(notify, lambda got: any("RELOADING=1" in m for m in got))
        notifications(notify, lambda got: any("READY=1" in m for m in got))
        assert "reloading the configuration (SIGHUP)" in daemon.log()
    finally:
        notify.close()
        vacmon.close()
        shutil.rmtree(short, ignore_errors=True)
        emulator.close()


def test_ec2_reclaimed_preemptible_machine_is_finished_without_backoff(tmp_path: Path, moto: MotoServer, ec2,
                                                                       daemons) -> None:
    # a fizzle would back the machinetype off for an hour: a preempted machine is no fizzle
    daemon, _ = ec2_daemon(tmp_path, moto, ec2, daemons, limit=1, backoff_seconds=3600, fizzle_seconds=3600,
                           preemptible="true", grace_secs=1)
    [instance] = daemon.wait_for("a machine", lambda: instances(ec2, "pending", "running"))
    ec2.stop_instances(InstanceIds=[instance["InstanceId"]])  # the cloud reclaims it
    finished = daemon.wait_for("its finish", lambda: [r for r in daemon.records() if r["state"] == "finished"])
    assert finished[0]["shutdown_message"] == "200 Preempted by the cloud"
    daemon.wait_for("a replacement", lambda: len(instances(ec2, "pending", "running")) == 1
                    and instances(ec2, "pending", "running")[0]["InstanceId"] != instance["InstanceId"])
