"""System tier: the adapter with real libvirtd + QEMU (TCG) booting the test guest.

The guest (scripts/build-guest.sh) takes DHCP, GETs its user-data from 169.254.169.254, runs it
if it is a script (``vac-put NAME VALUE`` POSTs to 169.254.169.253/joboutputs/NAME), and powers
off. An in-test HTTP server stands in for vacd's metadata and MJF services. At most four guests
run at once (TESTBED.md P10); every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path

import libvirt
import pytest

from tests.conftest import EventRecorder
from vac.backends.vm import disks
from vac.backends.vm.domain import factory_network, machine_domain_spec
from vac.backends.vm.hypervisor import EventKind, Hypervisor
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine, slot_ip, slot_name

pytestmark = pytest.mark.system

FACTORY = "vactest.example.org"
SLOTS = 4
GUEST_SECONDS = 90  # one TCG boot takes ~10 s; four at once on two cores ~25 s


@dataclasses.dataclass
class Request:
    when: float
    method: str
    client: str
    path: str
    body: bytes


class MetadataServer:
    """The metadata (GET user-data) and MJF (POST joboutputs) services, recording requests."""

    def __init__(self, addresses: tuple[str, ...]):
        self.user_data: dict[str, bytes] = {}  # client IP -> user-data
        self.requests: list[Request] = []
        self._condition = threading.Condition()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.user_data.get(self.client_address[0])
                server._record(self, b"")
                if self.path != "/latest/user-data" or body is None:
                    self._answer(404, b"not found\n")
                else:
                    self._answer(200, body)

            def do_POST(self):  # the guest's vac-put uploads with POST (busybox wget)
                length = int(self.headers.get("Content-Length", "0"))
                server._record(self, self.rfile.read(min(length, 65536)))
                self._answer(200 if self.path.startswith("/joboutputs/") else 404, b"")

            def _answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._servers = [http.server.ThreadingHTTPServer((address, 80), Handler)
                         for address in addresses]
        for http_server in self._servers:
            http_server.daemon_threads = True
            threading.Thread(target=http_server.serve_forever, daemon=True).start()

    def _record(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        with self._condition:
            self.requests.append(Request(time.monotonic(), handler.command,
                                         handler.client_address[0], handler.path, body))
            self._condition.notify_all()

    def wait_for(self, client: str, method: str, path: str, timeout: float,
                 count: int = 1) -> list[Request]:
        """The first ``count`` matching requests; fails the test if they do not come in time."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                found = [request for request in self.requests if request.client == client
                         and request.method == method and request.path == path]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no {count}x {method} {path} from {client} in {timeout} s; "
                                f"requests: {self.requests}")
                self._condition.wait(remaining)

    def close(self) -> None:
        for http_server in self._servers:
            http_server.shutdown()
            http_server.server_close()


@dataclasses.dataclass
class Testbed:
    __test__ = False

    hypervisor: Hypervisor
    events: EventRecorder
    server: MetadataServer
    settings: Settings
    bridge: str
    root: Path  # machine directories; searchable by QEMU's user
    guest: object
    created: list = dataclasses.field(default_factory=list)

    def boot(self, slot: int, user_data: str, iso: bool = False) -> tuple[Machine, float]:
        """Create the machine of ``slot`` with ``user_data``; return it and the start time."""
        model = "cernvm3"
        settings = self.settings
        if iso:
            settings = dataclasses.replace(settings, kernel=None, initrd=None,
                                           kernel_cmdline=None)
        now = time.time()
        machine = Machine(uuid=str(uuidlib.uuid4()), name=slot_name(FACTORY, slot), slot=slot,
                          machinetype="guest", machine_model=model, processors=1, created=now,
                          deadline=now + 600)
        directory = self.root / machine.uuid
        directory.mkdir(mode=0o711)
        machinetype = Machinetype(name="guest", machine_model=model, disk_gb_per_processor=1)
        disk_specs = disks.prepare_disks(settings, machinetype, machine, str(directory / "disks"),
                                         self.guest.iso if iso else None)
        spec = machine_domain_spec(machine, machinetype, settings, str(directory), disk_specs)
        self.server.user_data[slot_ip(slot)] = user_data.encode()
        self.created.append(machine)
        started = time.monotonic()
        self.hypervisor.create(spec)
        return machine, started

    def console(self, machine: Machine) -> str:
        return (self.root / machine.uuid / "console.log").read_text(errors="replace")

    def clean_up(self) -> None:
        for machine in self.created:
            self.hypervisor.destroy(machine.uuid)
            disks.release_disks(self.settings, machine, str(self.root / machine.uuid / "disks"))
        self.created.clear()


@pytest.fixture(scope="module")
def testbed(system_guest, system_network_names):
    settings = Settings(vac_space="space.example.org", factory_name=FACTORY,
                        domain_type="qemu", mb_per_processor=96, total_processors=SLOTS,
                        network_name=system_network_names.network, network_forward="none",
                        bridge_name=system_network_names.bridge, kernel=system_guest.kernel,
                        initrd=system_guest.initrd, kernel_cmdline=system_guest.cmdline)
    events = EventRecorder()
    hypervisor = Hypervisor("qemu:///system", events)
    hypervisor.connect()
    root = Path(tempfile.mkdtemp(prefix="vactest-"))
    root.chmod(0o711)
    server = None
    try:
        bridge = hypervisor.ensure_network(factory_network(settings))
        server = MetadataServer((settings.metadata_address, settings.mjf_address))
        yield Testbed(hypervisor, events, server, settings, bridge, root, system_guest)
    finally:
        if server is not None:
            server.close()
        hypervisor.remove_network(settings.network_name)
        hypervisor.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def bed(testbed):
    """The module's testbed, fresh records for this test; its machines are destroyed after."""
    testbed.server.requests.clear()
    testbed.events.events.clear()
    yield testbed
    testbed.clean_up()


def wait_gone(bed: Testbed, machine: Machine, started: float) -> dict:
    """Wait for SHUTDOWN (guest powered off) and STOPPED; return event times since creation."""
    shutdown_time, shutdown = bed.events.wait_for(EventKind.SHUTDOWN, machine.uuid, GUEST_SECONDS)
    stopped_time, stopped = bed.events.wait_for(EventKind.STOPPED, machine.uuid, 30)
    assert shutdown.detail == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST
    assert shutdown.cpu_seconds > 0, "the guest's CPU time is read as it powers off"
    assert stopped.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
    assert machine.uuid not in [info.uuid for info in bed.hypervisor.list_domains()]
    return {"shutdown": shutdown_time - started, "stopped": stopped_time - started}


def test_network_has_both_factory_addresses_and_is_kept_when_unchanged(testbed):
    addresses = subprocess.run(["ip", "-o", "-4", "address", "show", "dev", testbed.bridge],
                               capture_output=True, text=True, check=True, timeout=10).stdout
    assert "169.254.169.253/16" in addresses and "169.254.169.254/32" in addresses
    conn = testbed.hypervisor._connection()
    before = conn.networkLookupByName(testbed.settings.network_name).UUIDString()
    assert testbed.hypervisor.ensure_network(factory_network(testbed.settings)) == testbed.bridge
    assert conn.networkLookupByName(testbed.settings.network_name).UUIDString() == before


SCRIPT = """#!/bin/sh
echo VACTEST-USER-DATA-RAN
vac-put product "$(cat /sys/class/dmi/id/product_name)"
vac-put uuid "$(cat /sys/class/dmi/id/product_uuid)"
vac-put disks "$(ls /sys/block)"
vac-put shutdown_message '300 No more work'
"""


def test_guest_fetches_user_data_reports_and_powers_off(bed, record_property):
    machine, started = bed.boot(0, SCRIPT)
    started_event, _ = bed.events.wait_for(EventKind.STARTED, machine.uuid, 10)
    (info,) = [info for info in bed.hypervisor.list_domains() if info.uuid == machine.uuid]
    assert info.active and info.metadata.name == machine.name and info.metadata.slot == 0
    ip = slot_ip(0)
    (fetch,) = bed.server.wait_for(ip, "GET", "/latest/user-data", GUEST_SECONDS)
    (message,) = bed.server.wait_for(ip, "POST", "/joboutputs/shutdown_message", 30)
    assert message.body == b"300 No more work"
    outputs = {request.path: request.body for request in bed.server.requests
               if request.client == ip and request.method == "POST"}
    assert outputs["/joboutputs/product"] == b"OpenStack Nova"  # SMBIOS, for cloud-init
    assert outputs["/joboutputs/uuid"].decode().lower() == machine.uuid
    assert "vda" in outputs["/joboutputs/disks"].decode().split()  # the sparse root disk
    times = wait_gone(bed, machine, started)
    assert "VACTEST-USER-DATA-RAN" in bed.console(machine)
    record_property("timing", f"STARTED event {started_event - started:.2f} s, "
                              f"user-data GET {fetch.when - started:.2f} s, shutdown_message "
                              f"POST {message.when - started:.2f} s, SHUTDOWN event "
                              f"{times['shutdown']:.2f} s, STOPPED event {times['stopped']:.2f} s")


def test_cernvm_style_iso_boots_from_the_cdrom(bed, record_property):
    machine, started = bed.boot(1, "#!/bin/sh\nvac-put shutdown_message '100 Shutdown as requested'\n",
                                iso=True)
    (message,) = bed.server.wait_for(slot_ip(1), "POST", "/joboutputs/shutdown_message",
                                     GUEST_SECONDS)
    assert message.body == b"100 Shutdown as requested"
    times = wait_gone(bed, machine, started)
    assert "ISOLINUX" in bed.console(machine)  # booted by isolinux from hdc, not a direct kernel
    record_property("timing", f"shutdown_message POST {message.when - started:.2f} s, SHUTDOWN "
                              f"{times['shutdown']:.2f} s, STOPPED {times['stopped']:.2f} s")


def test_hanging_guest_heartbeats_uses_cpu_and_is_destroyed(bed, record_property):
    script = "#!/bin/sh\nwhile :; do vac-put heartbeat ok; sleep 1; done &\nsleep 600\n"
    machine, started = bed.boot(2, script)
    bed.server.wait_for(slot_ip(2), "POST", "/joboutputs/heartbeat", GUEST_SECONDS, count=2)
    first = bed.hypervisor.cpu_seconds(machine.uuid)
    time.sleep(1)
    assert bed.hypervisor.cpu_seconds(machine.uuid) > first > 0
    assert bed.hypervisor.is_active(machine.uuid)
    destroy_start = time.monotonic()
    bed.hypervisor.destroy(machine.uuid)
    destroyed = time.monotonic() - destroy_start
    _, stopped = bed.events.wait_for(EventKind.STOPPED, machine.uuid, 30)
    assert stopped.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED
    bed.hypervisor.destroy(machine.uuid)  # already gone: success
    assert not bed.hypervisor.is_active(machine.uuid)
    assert bed.hypervisor.cpu_seconds(machine.uuid) is None
    record_property("timing", f"destroy() took {destroyed:.2f} s")


def test_four_guests_at_once_each_on_its_own_address(bed, record_property):
    begin = time.monotonic()
    machines = [bed.boot(slot, f"#!/bin/sh\nvac-put shutdown_message '200 slot {slot}'\n")
                for slot in range(SLOTS)]
    for slot in range(SLOTS):
        (message,) = bed.server.wait_for(slot_ip(slot), "POST", "/joboutputs/shutdown_message",
                                         GUEST_SECONDS)
        assert message.body == f"200 slot {slot}".encode()
    stops = [wait_gone(bed, machine, started)["stopped"] for machine, started in machines]
    record_property("timing", f"4 guests: all STOPPED after {time.monotonic() - begin:.2f} s "
                              f"(slowest {max(stops):.2f} s after its own creation)")


def our_libvirtd_clients() -> list[str]:
    """Ids of this process's client connections to libvirtd (virt-admin)."""
    listing = subprocess.run(["virt-admin", "srv-clients-list", "libvirtd"], capture_output=True,
                             text=True, check=True, timeout=10).stdout
    ids = [line.split()[0] for line in listing.splitlines()[2:] if line.strip()]
    ours = []
    for client in ids:
        info = subprocess.run(["virt-admin", "client-info", "libvirtd", client],
                              capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if fields.get("unix_process_id", "").strip() == str(os.getpid()):
            ours.append(client)
    return ours


def test_reconnects_when_libvirtd_drops_the_connection_and_loses_no_domain(bed, record_property):
    machine, _ = bed.boot(3, "#!/bin/sh\nsleep 600\n")
    bed.events.wait_for(EventKind.STARTED, machine.uuid, 10)
    clients = our_libvirtd_clients()
    assert clients, "the adapter's connection is not among libvirtd's clients"
    dropped = time.monotonic()
    for client in clients:
        subprocess.run(["virt-admin", "client-disconnect", "libvirtd", client], check=True,
                       capture_output=True, timeout=10)
    lost_time, _ = bed.events.wait_for(EventKind.CONNECTION_LOST, None, 10)
    back_time, _ = bed.events.wait_for(EventKind.RECONNECTED, None, 30)
    assert machine.uuid in [info.uuid for info in bed.hypervisor.list_domains()]
    bed.hypervisor.destroy(machine.uuid)
    bed.events.wait_for(EventKind.STOPPED, machine.uuid, 30)  # events flow on the new connection
    record_property("timing", f"close callback after {lost_time - dropped:.2f} s, reconnected "
                              f"after {back_time - dropped:.2f} s")

