"""systemd tier: vac's package under a real systemd, PID 1 of a systemd-nspawn container.

What is proven here is what an administrator meets through ``systemctl``: the RPM's scriptlets,
vacd.service (READY, STATUS, watchdog, reload, stop without touching the machines), the APEL
timers and their services, tmpfiles, journald priorities, drain, and the Puppet module.

How it runs (the host has no systemd: no machinectl, no ``systemd-run -M``):

* ``scripts/build-systemd-root.sh`` builds, once, a Debian 12 root with systemd, libvirtd, the
  Python libraries vac's RPM requires, rpm and puppet, cached in ``$VAC_TEST_SYSTEMD_ROOT``
  (default ./systemd-root).
* Each run mounts an overlay on that root (the cache stays clean), installs the RPMs built from
  this tree with ``rpm --root`` (their ``%post`` runs chrooted, as on an installation: preset,
  tmpfiles), and boots it with ``systemd-nspawn --boot --register=no --keep-unit
  --private-network``: a container with its own PID 1 systemd and its own network namespace.
* Every command runs inside the container through ``nsenter --target <its PID 1> --all``: in
  its mount namespace the container's own systemctl, journalctl, vac and rpm talk to its systemd
  and journal, as an administrator's root shell would. The tests write files into the container
  through the overlay's mount point on the host.
* Machines: vacd drives libvirtd's test driver inside the container (``libvirt_uri =
  test+unix:///default``); its domains live in libvirtd, not in vacd, as QEMU processes do. The
  test driver frees them when its last client disconnects, so a unit of the test holds one
  connection (as QEMU processes outlive every client), and another makes the factory's bridge
  (the test driver makes no devices). Debian's python3 does not look in EL's site-packages,
  where the RPM puts vac: a ``.pth`` file adds it.
* The container is powered off with SIGRTMIN+4 to its PID 1 (SIGKILL to the nspawn process
  started here if that takes too long) and the overlay unmounted.

Each test starts from a factory it sets up itself (``reset``), so a test can run alone. Every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pytest

from tests import tiers
from tests.packages import REPO, build_rpms
from tests.vacdprocess import machine_records
from tests.waiting import wait_until

pytestmark = pytest.mark.systemd

ROOT_VARIABLE = "VAC_TEST_SYSTEMD_ROOT"
BUILD_SCRIPT = REPO / "scripts" / "build-systemd-root.sh"
BUILD_SECONDS = 900  # debootstrap plus apt: about 70 s with a near mirror
BOOT_SECONDS = 120
COMMAND_SECONDS = 120
POWEROFF_SECONDS = 60
# Shorter than the unit's 180 s, set by a drop-in of the watchdog test; long enough for a
# busy CI machine (vacd pings every half of it).
TEST_WATCHDOG_SECONDS = 10
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGES_DIR = "/root/vac-rpms"  # in the container: the RPMs under test
LIBVIRT_URI = "test+unix:///default"
FACTORY = "factory1.example.org"
BRIDGE = "vactest0"
SLOTS = 2
STATUS_RE = re.compile(r"^(\d+)/(\d+) machines running, (\d+)/(\d+) processors$")
STATE_DIRS = ("machines", "slots", "finishes", "tmp", "imagecache", "machinetypes", "pipescache",
              "apel-archive", "apel-outgoing")

TEST_UNITS = {
    "vactest-network.service": f"""[Unit]
Description=vac test: the factory bridge (libvirt's test driver makes no devices)
Before=vacd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip link add {BRIDGE} type bridge
ExecStart=/usr/sbin/ip address add 169.254.169.253/16 dev {BRIDGE}
ExecStart=/usr/sbin/ip link set {BRIDGE} up

[Install]
WantedBy=multi-user.target
""",
    "vactest-libvirt-hold.service": f"""[Unit]
Description=vac test: one client of libvirtd's test driver, whose domains live while one is connected
BindsTo=libvirtd.service
After=libvirtd.service

[Service]
ExecStart=/usr/bin/python3 -c "import libvirt, signal; connection = libvirt.open('{LIBVIRT_URI}'); signal.pause()"

[Install]
WantedBy=libvirtd.service
""",
}

CONFIG = """[settings]
vac_space = space.example.org
factory_name = {factory}
factories = {factory}@127.0.0.1
gocdb_sitename = TEST-SITE
hs06_per_processor = 10
libvirt_uri = {uri}
domain_type = qemu
network_name = vactest
bridge_name = {bridge}
network_forward = none
total_processors = {slots}
mb_per_processor = 96
disk_gb_per_processor = 1
# Cycles come from events, SIGHUP and changed files only: the tests see what causes them.
reconcile_seconds = 3600
# The load of the CI machine is not this factory's (the veto has pure tests).
overload_per_processor = 1000
metrics_port = 9393
kernel = /etc/vactest/vmlinuz
kernel_cmdline = console=ttyS0

[machinetype test]
target_share = {share}
machine_model = cernvm3
root_image = /etc/vactest/root.iso
user_data = /etc/vactest/user_data
# A machine that ends early is no reason to back off here: the tests end machines by hand.
fizzle_seconds = 0
backoff_seconds = 0
"""

SSMSEND_STUB = """#!/bin/sh
# Stand-in for apel-ssm's ssmsend: checks its arguments, counts the outgoing messages.
[ "$1" = -c ] && [ -r "$2" ] || { echo "ssmsend stub: bad arguments: $*" >&2; exit 2; }
queue=$(sed -n 's/^path *[:=] *//p' "$2")
echo "ssmsend stub: $(find "$queue" -type f | wc -l) messages in $queue"
"""


class Container:
    """A booted container: commands inside it, its files through the overlay, bounded waits."""

    def __init__(self, root: Path, leader: int):
        self.root = root  # the overlay's mount point on the host: the container's /
        self.leader = leader  # host PID of the container's PID 1
        self.nsenter = shutil.which("nsenter")
        self.fresh: dict = {}  # what the package left, seen right after the first boot

    def run(self, *argv: str, check: bool = True,
            timeout: float = COMMAND_SECONDS) -> subprocess.CompletedProcess:
        environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0",
                       "SYSTEMD_PAGER": "", "TERM": "dumb"}
        done = subprocess.run([self.nsenter, "--target", str(self.leader), "--all", "--", *argv],
                              capture_output=True, text=True, timeout=timeout, env=environment)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}"
                        f"{done.stderr}\n{self.diagnostics()}")
        return done

    def systemctl(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("systemctl", *arguments, check=check)

    def show(self, unit: str, *properties: str) -> dict:
        done = self.systemctl("show", unit, *(f"--property={name}" for name in properties))
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def path(self, path: str) -> Path:
        """The host's view of ``path`` in the container (not of the tmpfs on its /run and /tmp)."""
        return self.root / path.lstrip("/")

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def cursor(self) -> str:
        """The journal's position now, for ``journal(after=...)``."""
        done = self.run("journalctl", "--lines=0", "--show-cursor", "--quiet")
        return done.stdout.strip().split("cursor: ", 1)[1]

    def journal(self, *arguments: str, after: Optional[str] = None) -> list[dict]:
        """Entries of ``journalctl ARGUMENTS``, only those after the cursor ``after`` if given.

        journalctl 252 skips entries that share a timestamp with their predecessor (one write
        of several lines) when --after-cursor or --lines is combined with matches: the whole
        selection is read and cut at the cursor's sequence number here instead.
        """
        done = self.run("journalctl", "--output=json", "--no-pager", *arguments)
        entries = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        if after is None:
            return entries
        return [entry for entry in entries if sequence_number(entry["__CURSOR"]) > sequence_number(after)]

    def messages(self, unit: str, after: Optional[str] = None) -> list[str]:
        return [entry.get("MESSAGE", "") for entry in self.journal(f"--unit={unit}", after=after)]

    def wait_for(self, what: str, predicate: Callable, timeout: float = 60):
        return wait_until(what, predicate, timeout, poll=0.3, details=self.diagnostics)

    def diagnostics(self) -> str:
        """vacd's state and recent journal, for failure messages."""
        try:
            journal = subprocess.run(
                [self.nsenter, "--target", str(self.leader), "--all", "--", "journalctl",
                 "--no-pager", "--output=short-precise", "--unit=vacd"], capture_output=True,
                text=True, timeout=30, env={"PATH": PATH, "SYSTEMD_COLORS": "0"})
            return "vacd's journal:\n" + "\n".join(journal.stdout.splitlines()[-40:])
        except (OSError, subprocess.SubprocessError) as error:
            return f"(no journal: {error})"


def sequence_number(cursor: str) -> int:
    """The entry's sequence number in a journal cursor ("s=...;i=HEX;b=...")."""
    return int(dict(field.split("=", 1) for field in cursor.split(";"))["i"], 16)


# -- the container -----------------------------------------------------------------------------


def find_leader(nspawn: subprocess.Popen, console: Path) -> int:
    """The host PID of the container's PID 1: nspawn's child running systemd."""
    deadline = time.monotonic() + BOOT_SECONDS
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            pytest.fail(f"systemd-nspawn exited with {nspawn.returncode}:\n"
                        f"{console.read_text(errors='replace')[-4000:]}")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name may contain spaces and parentheses: fields follow the last ")".
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == nspawn.pid and Path(f"/proc/{entry}/comm").read_text().strip() == "systemd":
                return int(entry)
        time.sleep(0.2)
    pytest.fail("the container's systemd did not start")


def install_packages(root: Path, rpms: dict) -> None:
    """Install vac-command and vac as on EL: rpm runs the scriptlets chrooted into ``root``."""
    packages = root / PACKAGES_DIR.lstrip("/")
    packages.mkdir(parents=True)
    for rpm in rpms.values():
        shutil.copy2(rpm, packages / rpm.name)
    # The container's rpm keeps its database in root's home (Debian's default): use the same.
    done = subprocess.run(["rpm", "--root", str(root), "--dbpath", "/root/.rpmdb", "--nodeps",
                           "--install", *(str(packages / rpm.name) for rpm in rpms.values())],
                          capture_output=True, text=True, timeout=COMMAND_SECONDS)
    assert done.returncode == 0, done.stdout + done.stderr
    sitelib = next(root.glob("usr/lib/python3*/site-packages/vac")).parent
    (root / "usr/lib/python3/dist-packages/vac-el-site-packages.pth").write_text(
        f"/{sitelib.relative_to(root)}\n")


def prepare_test_files(root: Path) -> None:
    for name, text in TEST_UNITS.items():
        (root / "etc/systemd/system" / name).write_text(text)
    for wanted_by, name in (("multi-user.target", "vactest-network.service"),
                            ("libvirtd.service", "vactest-libvirt-hold.service")):
        wants = root / "etc/systemd/system" / f"{wanted_by}.wants"
        wants.mkdir(exist_ok=True)
        (wants / name).symlink_to(f"/etc/systemd/system/{name}")
    files = root / "etc" / "vactest"
    files.mkdir()
    # The test driver opens neither the kernel nor the image: stand-ins with the right names.
    (files / "vmlinuz").write_bytes(b"\0" * 512)
    (files / "root.iso").write_bytes(b"\0" * 2048)
    (files / "user_data").write_text("#!/bin/sh\necho machine ##user_data_uuid##\n")


def first_boot_facts(container: Container) -> dict:
    """What the package installation left, before anyone configured vac."""
    units = ("vacd.service", "vac-apel-sync.timer", "vac-ssmsend.timer")
    facts = {unit: container.show(unit, "UnitFileState", "ActiveState") for unit in units}
    # Started by hand before configuration, apel-sync is skipped by its conditions.
    started = container.systemctl("start", "vac-apel-sync.service", check=False)
    facts["apel-sync unconfigured"] = (started.returncode, container.show(
        "vac-apel-sync.service", "ConditionResult", "Result", "ActiveState"))
    facts["/run/vac"] = container.run("stat", "--format=%F %a %U:%G", "/run/vac",
                                      check=False).stdout.strip()
    return facts


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> Container:
    if os.geteuid() != 0:
        tiers.require(tiers.SYSTEMD, "the systemd tier needs root")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "rpmbuild", "rpm", "mount", "umount"):
        if shutil.which(tool) is None:
            tiers.require(tiers.SYSTEMD, f"{tool} is not installed")
    cache = Path(os.environ.get(ROOT_VARIABLE) or REPO / "systemd-root")
    built = subprocess.run([str(BUILD_SCRIPT), str(cache)], capture_output=True, text=True,
                           timeout=BUILD_SECONDS)
    if built.returncode != 0:
        pytest.fail(f"{BUILD_SCRIPT.name} failed:\n{built.stdout[-3000:]}{built.stderr[-3000:]}")
    rpms = build_rpms(tmp_path_factory.mktemp("rpmbuild"))

    work = tmp_path_factory.mktemp("systemd")
    layers = {name: work / name for name in ("upper", "work", "merged")}
    for layer in layers.values():
        layer.mkdir()
    root = layers["merged"]
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={cache},upperdir={layers['upper']},workdir={layers['work']}",
                    str(root)], check=True, capture_output=True, timeout=30)
    nspawn = None
    try:
        install_packages(root, rpms)
        prepare_test_files(root)
        console = work / "console.log"
        with open(console, "wb") as output:
            nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--private-network",
                 f"--machine=vactest-{os.getpid()}", "--console=read-only", "--quiet",
                 "--directory", str(root)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        container = Container(root, find_leader(nspawn, console))
        # systemctl needs the manager's private socket, which comes a moment after PID 1 starts.
        container.wait_for("the container's systemd to answer", lambda: container.run(
            "systemctl", "is-system-running", check=False).stdout.strip(), timeout=BOOT_SECONDS)
        booted = container.run("systemctl", "is-system-running", "--wait", check=False,
                               timeout=BOOT_SECONDS)
        if booted.stdout.strip() != "running":
            failed = container.run("systemctl", "--failed", "--no-legend", check=False).stdout
            pytest.fail(f"the container booted {booted.stdout.strip()!r} ({booted.stderr.strip()}); "
                        f"failed units:\n{failed}")
        container.fresh = first_boot_facts(container)
        yield container
    finally:
        if nspawn is not None:
            power_off(nspawn)
        subprocess.run(["umount", str(root)], capture_output=True, timeout=60)


def power_off(nspawn: subprocess.Popen) -> None:
    """A clean poweroff (SIGRTMIN+4 to the container's systemd), else SIGKILL to nspawn."""
    leader = None
    if nspawn.poll() is None:
        try:
            children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children").read_text().split()
            leader = int(children[0]) if children else None
        except OSError:
            leader = None
    if leader is not None:
        os.kill(leader, signal.SIGRTMIN + 4)
    try:
        nspawn.wait(timeout=POWEROFF_SECONDS)
    except subprocess.TimeoutExpired:
        nspawn.kill()
        nspawn.wait(timeout=30)


# -- the factory inside ------------------------------------------------------------------------


def configure(container: Container, share: float) -> None:
    container.write("/etc/vac.d/10-test.conf", CONFIG.format(
        factory=FACTORY, uri=LIBVIRT_URI, bridge=BRIDGE, slots=SLOTS, share=share))


def libvirt_domains(container: Container, destroy: bool = False) -> set:
    """UUIDs of the active vac domains in the container's libvirtd (destroyed if ``destroy``)."""
    script = """
import sys, libvirt
connection = libvirt.open(sys.argv[1])
for domain in connection.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
    if domain.name() != "test":  # the test driver's own domain
        print(domain.UUIDString())
        if sys.argv[2] == "destroy":
            domain.destroy()
"""
    done = container.run("python3", "-c", script, LIBVIRT_URI, "destroy" if destroy else "list")
    return set(done.stdout.split())


def reset(container: Container, share: float = 0, start: bool = True) -> None:
    """A factory as after installation and configuration: no machines, no drain, vacd started."""
    container.systemctl("stop", "vacd.service")
    container.systemctl("reset-failed", "vacd.service", check=False)
    libvirt_domains(container, destroy=True)
    container.run("rm", "-rf", "/var/lib/vac", "/run/vac.conf", "/etc/vac.d")
    container.run("mkdir", "/etc/vac.d")
    container.run("systemd-tmpfiles", "--create", "vac.conf")
    configure(container, share)
    if start:
        container.systemctl("start", "vacd.service")


def records(container: Container) -> list[dict]:
    return machine_records(container.path("/var/lib/vac/machines"))


def in_state(container: Container, state: str) -> list[dict]:
    return [record for record in records(container) if record["state"] == state]


def status(container: Container) -> Optional[tuple]:
    """vacd's STATUS= as (running machines, slots, running processors, processors)."""
    match = STATUS_RE.match(container.show("vacd.service", "StatusText")["StatusText"])
    return tuple(int(group) for group in match.groups()) if match else None


def running_machines(container: Container, count: int) -> list[dict]:
    """Wait until vacd runs ``count`` machines and says so in its status; their records."""
    return container.wait_for(
        f"{count} running machines in vacd's records and status",
        lambda: (len(in_state(container, "running")) == count
                 and (status(container) or (None,))[0] == count and in_state(container, "running")))


def main_pid(container: Container) -> int:
    return int(container.show("vacd.service", "MainPID")["MainPID"])


def drop_in(container: Container, name: str, text: Optional[str]) -> None:
    """Write (or with None remove) a drop-in of vacd.service, then daemon-reload."""
    path = f"/etc/systemd/system/vacd.service.d/{name}.conf"
    if text is None:
        container.path(path).unlink(missing_ok=True)
    else:
        container.write(path, text)
    container.systemctl("daemon-reload")


# -- the tests ---------------------------------------------------------------------------------


def test_the_rpm_enables_the_timers_and_leaves_vacd_to_the_administrator(container):
    fresh = container.fresh
    assert fresh["vac-apel-sync.timer"] == {"UnitFileState": "enabled", "ActiveState": "active"}
    assert fresh["vac-ssmsend.timer"] == {"UnitFileState": "enabled", "ActiveState": "active"}
    assert fresh["vacd.service"] == {"UnitFileState": "disabled", "ActiveState": "inactive"}
    # Before configuration the daily apel-sync is skipped, not failed.
    returncode, apel_sync = fresh["apel-sync unconfigured"]
    assert returncode == 0
    assert apel_sync == {"ConditionResult": "no", "Result": "success", "ActiveState": "inactive"}
    # /run is a fresh tmpfs at boot: systemd-tmpfiles-setup made /run/vac from vac's snippet.
    assert fresh["/run/vac"] == "directory 755 root:root"
    installed = container.run("rpm", "--query", "vac", "vac-command").stdout.split()
    assert all(name.startswith(("vac-04", "vac-command-04")) for name in installed), installed


def test_tmpfiles_create_the_state_directories_with_their_modes(container):
    reset(container, start=False)
    container.run("rm", "-rf", "/var/lib/vac", "/run/vac")
    done = container.run("systemd-tmpfiles", "--create", "vac.conf")
    assert done.stdout + done.stderr == ""
    for directory in ["/run/vac", "/var/lib/vac", *(f"/var/lib/vac/{name}" for name in STATE_DIRS)]:
        described = container.run("stat", "--format=%F %a %U:%G", directory).stdout.strip()
        assert described == "directory 755 root:root", directory
    # A wrong mode is put right by the next --create (as at every boot).
    container.run("chmod", "0700", "/var/lib/vac/apel-outgoing")
    container.run("systemd-tmpfiles", "--create", "vac.conf")
    assert container.run("stat", "--format=%a", "/var/lib/vac/apel-outgoing").stdout.strip() == "755"


def test_start_returns_once_vacd_is_ready_and_status_shows_its_line(container):
    reset(container, start=False)
    # Without libvirtd vacd cannot get ready: it retries, and says so in its status.
    container.systemctl("stop", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket",
                        "libvirtd.service")
    cursor = container.cursor()
    starting = subprocess.Popen(
        [container.nsenter, "--target", str(container.leader), "--all", "--", "systemctl",
         "start", "vacd.service"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": PATH})
    try:
        def waiting_for_libvirt():
            shown = container.show("vacd.service", "ActiveState", "StatusText")
            return (shown["ActiveState"] == "activating"
                    and shown["StatusText"].startswith("waiting for libvirt: "))

        container.wait_for("vacd waiting for libvirt", waiting_for_libvirt)
        assert starting.poll() is None, "systemctl start returned before vacd was ready"
        container.systemctl("start", "libvirtd.socket", "libvirtd-ro.socket",
                            "libvirtd-admin.socket", "libvirtd.service")
        assert starting.wait(timeout=COMMAND_SECONDS) == 0, starting.stdout.read()
    finally:
        if starting.poll() is None:
            starting.kill()
            starting.wait(timeout=30)
    # systemctl start returned: vacd had sent READY=1 (it logs that right after sending it).
    shown = container.show("vacd.service", "ActiveState", "SubState", "StatusText")
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
    messages = container.messages("vacd.service", after=cursor)
    assert any(message.startswith("INFO vacd: vacd ") and " ready: factory " in message
               for message in messages), messages
    # The status line is vacd's, as systemctl status shows it to the administrator.
    assert status(container) == (0, SLOTS, 0, SLOTS)
    text = container.systemctl("status", "vacd.service", check=False).stdout
    assert f'Status: "0/{SLOTS} machines running, 0/{SLOTS} processors"' in text
    # The holder of libvirt's test driver came back with libvirtd (it is wanted by it).
    container.wait_for("the test driver's holder", lambda: container.show(
        "vactest-libvirt-hold.service", "ActiveState")["ActiveState"] == "active")


def test_metrics_endpoint_with_the_distributions_prometheus_client(container):
    reset(container)
    script = ("import urllib.request; "
              "print(urllib.request.urlopen('http://127.0.0.1:9393/metrics', timeout=10).read().decode())")
    text = container.run("python3", "-c", script).stdout
    assert f"vac_slots {SLOTS}.0" in text.splitlines()
    assert "# TYPE vac_creations_total counter" in text.splitlines()
    assert any(line.startswith("process_resident_memory_bytes ") for line in text.splitlines())


def test_the_watchdog_restarts_a_vacd_whose_loop_stopped(container):
    reset(container, start=False)
    # A short watchdog for this test; no core dumps of the killed process in CI.
    drop_in(container, "watchdog", f"[Service]\nWatchdogSec={TEST_WATCHDOG_SECONDS}s\nLimitCORE=0\n")
    try:
        container.systemctl("start", "vacd.service")
        before = container.show("vacd.service", "MainPID", "NRestarts")
        cursor = container.cursor()
        container.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", "vacd.service")
        # Watchdog timeout, SIGABRT, RestartSec=10s, a new vacd's start: all bounded here.
        def restarted():
            shown = container.show("vacd.service", "MainPID", "NRestarts", "ActiveState")
            return (shown["NRestarts"] == str(int(before["NRestarts"]) + 1)
                    and shown["ActiveState"] == "active"
                    and shown["MainPID"] not in ("0", before["MainPID"]))

        container.wait_for("vacd restarted by the watchdog", restarted,
                           timeout=TEST_WATCHDOG_SECONDS + 90)
        messages = container.messages("vacd.service", after=cursor)
        assert any(f"Watchdog timeout (limit {TEST_WATCHDOG_SECONDS}s)" in message
                   for message in messages), messages
        assert any("with signal SIGABRT" in message for message in messages), messages
    finally:
        drop_in(container, "watchdog", None)
        container.systemctl("restart", "vacd.service")


def test_reload_applies_a_changed_option(container):
    reset(container, share=0)
    pid = main_pid(container)
    assert status(container) == (0, SLOTS, 0, SLOTS) and records(container) == []
    configure(container, share=1)
    cursor = container.cursor()
    container.systemctl("reload", "vacd.service")
    # vac conf shows the new value and where it came from ...
    effective = container.run("vac", "conf").stdout
    assert re.search(r"^target_share += 1(\.0)? +; /etc/vac.d/10-test.conf:\d+$", effective,
                     re.MULTILINE), effective
    # ... and vacd acts on it at once: the machinetype's share now fills the slots.
    running_machines(container, SLOTS)
    assert main_pid(container) == pid, "reload must not restart vacd"
    assert "INFO vacd: reloading configuration (SIGHUP)" in container.messages("vacd.service",
                                                                             after=cursor)


def test_stop_leaves_the_machines_and_start_adopts_them(container):
    reset(container, share=1)
    machines = {record["uuid"] for record in running_machines(container, SLOTS)}
    assert libvirt_domains(container) == machines
    container.systemctl("stop", "vacd.service")
    assert container.show("vacd.service", "ActiveState")["ActiveState"] == "inactive"
    # The domains are libvirtd's: stopping vacd leaves them running.
    assert libvirt_domains(container) == machines
    cursor = container.cursor()
    container.systemctl("start", "vacd.service")
    # The new vacd adopts them: the same machines, running, and no new ones.
    assert f"INFO vacd: recovered {SLOTS} live machines from /var/lib/vac" in container.messages(
        "vacd.service", after=cursor)
    adopted = running_machines(container, SLOTS)
    assert {record["uuid"] for record in adopted} == machines
    assert {record["uuid"] for record in records(container)} == machines
    assert libvirt_domains(container) == machines


def test_drain_and_reload_stop_creation(container):
    reset(container, share=1)
    machines = running_machines(container, SLOTS)
    assert "Draining" in container.run("vac", "drain").stdout
    container.systemctl("reload", "vacd.service")
    # A machine ends (its domain goes away): vacd finishes it and does not refill its slot.
    gone = machines[0]["uuid"]
    container.run("virsh", "--connect", LIBVIRT_URI, "destroy", gone)
    container.wait_for("the ended machine finished", lambda: any(
        record["uuid"] == gone for record in in_state(container, "finished")))
    # The status is published after the plan of the same cycle: had it created, a record would be.
    container.wait_for("the status to show the free slot", lambda: status(container) == (
        SLOTS - 1, SLOTS, SLOTS - 1, SLOTS))
    assert len(records(container)) == SLOTS
    assert any(message == "INFO vacd: plan: no creation: draining"
               for message in container.messages("vacd.service"))
    # Undrained, the slot is refilled.
    container.run("vac", "undrain")
    container.systemctl("reload", "vacd.service")
    running_machines(container, SLOTS)
    assert len(records(container)) == SLOTS + 1


def test_journal_has_vacds_errors_at_error_priority_and_nothing_else(container):
    reset(container)
    pid = main_pid(container)

    def vacd_errors(after: str, count: int) -> list:
        def reported():
            errors = [entry for entry in container.journal("--unit=vacd.service", "--priority=err", after=after)
                      if entry.get("SYSLOG_IDENTIFIER") == "vacd"]
            return len(errors) >= count and errors
        return container.wait_for(f"{count} error lines of vacd", reported)

    # A broken fragment: the reload's check refuses it, in the journal at error priority, and
    # vacd is not signalled.
    cursor = container.cursor()
    container.write("/etc/vac.d/20-broken.conf", "[settings]\nmax_creating = many\n")
    refused = container.systemctl("reload", "vacd.service", check=False)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    [checked] = vacd_errors(cursor, 1)
    assert checked["MESSAGE"].startswith("error: /etc/vac.d/20-broken.conf:2: [settings] max_creating")
    assert checked["PRIORITY"] == "3"
    assert "INFO vacd: reloading configuration (SIGHUP)" not in container.messages("vacd.service", after=cursor)
    assert main_pid(container) == pid and container.show("vacd.service", "ActiveState")["ActiveState"] == "active"

    # Signalled anyway, vacd reports each problem and keeps its configuration.
    cursor = container.cursor()
    container.systemctl("kill", "--signal=HUP", "--kill-who=main", "vacd.service")
    messages = [entry["MESSAGE"] for entry in vacd_errors(cursor, 2)]
    assert len(messages) == 2, messages
    assert "/etc/vac.d/20-broken.conf" in messages[0] and "max_creating" in messages[0]
    assert messages[1] == "ERROR vacd: configuration has errors: keeping the previous configuration"
    # Everything else vacd said meanwhile is below error priority, with its own level.
    everything = container.journal("--unit=vacd.service", after=cursor)
    levels = {entry["MESSAGE"]: entry["PRIORITY"] for entry in everything
              if entry.get("SYSLOG_IDENTIFIER") == "vacd"}
    assert levels["INFO vacd: reloading configuration (SIGHUP)"] == "6"
    assert not any(message.startswith("<") for message in levels), "priority prefixes leaked"

    # Fixed, the reload goes through.
    container.run("rm", "/etc/vac.d/20-broken.conf")
    container.systemctl("reload", "vacd.service")
    assert main_pid(container) == pid and container.show("vacd.service", "ActiveState")["ActiveState"] == "active"


def test_the_apel_timers_services_run(container):
    reset(container)
    for timer in ("vac-apel-sync.timer", "vac-ssmsend.timer"):
        assert container.show(timer, "UnitFileState", "ActiveState") == {
            "UnitFileState": "enabled", "ActiveState": "active"}
        assert container.show(timer, "NextElapseUSecRealtime")["NextElapseUSecRealtime"]
    cursor = container.cursor()
    container.systemctl("start", "vac-apel-sync.service")
    assert container.show("vac-apel-sync.service", "Result", "ExecMainStatus", "ConditionResult") == {
        "Result": "success", "ExecMainStatus": "0", "ConditionResult": "yes"}
    assert any(message.startswith("written to /var/lib/vac/apel-outgoing/")
               for message in container.messages("vac-apel-sync.service", after=cursor))
    # Without apel-ssm's ssmsend (only recommended) the service is skipped, not failed ...
    container.run("rm", "-f", "/usr/bin/ssmsend")
    container.systemctl("start", "vac-ssmsend.service")
    assert container.show("vac-ssmsend.service", "ConditionResult", "Result", "ActiveState") == {
        "ConditionResult": "no", "Result": "success", "ActiveState": "inactive"}
    # ... and with it, it sends the queue apel-sync wrote to.
    container.write("/usr/bin/ssmsend", SSMSEND_STUB, mode=0o755)
    try:
        cursor = container.cursor()
        container.systemctl("start", "vac-ssmsend.service")
        assert container.show("vac-ssmsend.service", "Result", "ExecMainStatus", "ConditionResult") == {
            "Result": "success", "ExecMainStatus": "0", "ConditionResult": "yes"}
        assert "ssmsend stub: 1 messages in /var/lib/vac/apel-outgoing" in container.messages(
            "vac-ssmsend.service", after=cursor)
    finally:
        container.run("rm", "-f", "/usr/bin/ssmsend")


def puppet_manifest(share: float) -> str:
    settings = {
        "factory_name": FACTORY, "libvirt_uri": LIBVIRT_URI, "domain_type": "qemu",
        "network_name": "vactest", "bridge_name": BRIDGE, "network_forward": "none",
        "total_processors": SLOTS, "reconcile_seconds": 3600, "overload_per_processor": 1000,
        "kernel": "/etc/vactest/vmlinuz", "gocdb_sitename": "TEST-SITE", "hs06_per_processor": 10,
    }
    machinetype = {"root_image": "/etc/vactest/root.iso", "user_data": "/etc/vactest/user_data",
                   "fizzle_seconds": 0, "backoff_seconds": 0}

    def puppet_hash(values: dict) -> str:
        return "{" + ", ".join(f"'{key}' => {value!r}" if isinstance(value, str) else f"'{key}' => {value}"
                               for key, value in values.items()) + "}"

    return f"""# vac's RPMs were installed with rpm, not apt: Puppet asks rpm about the package.
Package {{ provider => 'rpm' }}

class {{ 'vac':
  space            => 'space.example.org',
  factories        => ['{FACTORY}@127.0.0.1', 'factory2.example.org@127.0.0.2',
                       'factory3.example.org@127.0.0.3'],
  settings         => {puppet_hash(settings)},
  machinetypes     => {{
    'test'  => {puppet_hash({**machinetype, "target_share": share})},
    'other' => {puppet_hash({**machinetype, "target_share": 0})},
  }},
  apel_cert_source => '/etc/vactest/apel-cert.pem',
  apel_key_source  => '/etc/vactest/apel-key.pem',
}}
"""


def puppet_apply(container: Container, share: float) -> int:
    """Apply the vac class with Puppet in the container; its --detailed-exitcodes status."""
    container.write("/etc/vactest/site.pp", puppet_manifest(share))
    done = container.run("puppet", "apply", "--detailed-exitcodes", "--color=false",
                         "--modulepath=/usr/share/vac/puppet", "/etc/vactest/site.pp",
                         check=False, timeout=300)
    # 0: no changes, 2: changes; 1, 4 and 6 are failures.
    assert done.returncode in (0, 2), done.stdout + done.stderr
    return done.returncode


def test_the_puppet_module_configures_starts_and_reloads_vacd(container):
    reset(container, start=False)
    container.write("/etc/vactest/apel-cert.pem", "certificate\n")
    container.write("/etc/vactest/apel-key.pem", "key\n", mode=0o600)
    assert puppet_apply(container, share=0) == 2
    fragments = sorted(path.name for path in container.path("/etc/vac.d").iterdir())
    assert fragments == ["10-puppet-settings.conf", "50-puppet-machinetype-other.conf",
                         "50-puppet-machinetype-test.conf"]  # the test's own fragment purged
    assert container.run("vac", "conf", "--check").returncode == 0
    factories = container.run("vac", "conf").stdout
    assert re.search(r"^factories += factory1.example.org@127.0.0.1 factory2.example.org@127.0.0.2 "
                     r"factory3.example.org@127.0.0.3 +; /etc/vac.d/10-puppet-settings.conf:\d+$",
                     factories, re.MULTILINE), factories
    assert container.show("vacd.service", "UnitFileState", "ActiveState") == {
        "UnitFileState": "enabled", "ActiveState": "active"}
    for timer in ("vac-apel-sync.timer", "vac-ssmsend.timer"):
        assert container.show(timer, "UnitFileState", "ActiveState") == {
            "UnitFileState": "enabled", "ActiveState": "active"}
    key = container.run("stat", "--format=%a", "/etc/grid-security/vac-apel-key.pem").stdout.strip()
    assert key == "600"
    assert status(container) == (0, SLOTS, 0, SLOTS)
    # Applied again, nothing changes.
    assert puppet_apply(container, share=0) == 0
    # A changed class parameter reaches the running vacd by a reload, not a restart.
    pid = main_pid(container)
    cursor = container.cursor()
    assert puppet_apply(container, share=1) == 2
    running_machines(container, SLOTS)
    assert main_pid(container) == pid
    assert "INFO vacd: reloading configuration (SIGHUP)" in container.messages("vacd.service",
                                                                             after=cursor)


def test_rpm_upgrade_restarts_vacd_and_erase_stops_it_without_touching_the_machines(container):
    reset(container, share=1)
    machines = {record["uuid"] for record in running_machines(container, SLOTS)}
    pid = main_pid(container)
    packages = sorted(f"{PACKAGES_DIR}/{path.name}"
                      for path in container.path(PACKAGES_DIR).glob("*.rpm"))
    # An upgrade (here: the same packages again): the %postun of the replaced package
    # try-restarts vacd, and the new vacd adopts the machines.
    container.run("rpm", "--reinstall", "--nodeps", *packages)
    container.wait_for("vacd restarted by the upgrade", lambda: main_pid(container) not in (0, pid))
    assert {record["uuid"] for record in running_machines(container, SLOTS)} == machines
    try:
        # Erased, the package stops and disables its units first (%preun) ...
        container.run("rpm", "--erase", "--nodeps", "vac", "vac-command")
        for unit in ("vacd.service", "vac-apel-sync.timer", "vac-ssmsend.timer"):
            assert container.show(unit, "LoadState", "ActiveState") == {
                "LoadState": "not-found", "ActiveState": "inactive"}, unit
        # ... and the machines, libvirtd's, keep running.
        assert libvirt_domains(container) == machines
    finally:
        # --replacepkgs: vac-vcycle was not erased and is simply installed again.
        container.run("rpm", "--upgrade", "--replacepkgs", "--nodeps", *packages)
        container.systemctl("start", "vac-apel-sync.timer", "vac-ssmsend.timer")
