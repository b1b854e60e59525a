"""Component tests of vac.backends.vm.hypervisor.Hypervisor against libvirt's test driver (one private node
per test, STANDARDS.md §E1): domains from our XML, events, listing, destroy semantics, network."""

from __future__ import annotations

import uuid as uuidlib

import libvirt
import pytest

from vac.backends.commands import CommandError
from vac.backends.vm.domain import (
    DiskSpec,
    MachineMetadata,
    domain_name,
    factory_network,
    machine_domain_spec,
)
from vac.backends.vm.hypervisor import (
    DomainState,
    EventKind,
    Hypervisor,
    HypervisorError,
    NotConnectedError,
)
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

pytestmark = pytest.mark.component

SETTINGS = Settings(vac_space="space.example.org", factory_name="factory.example.org",
                    domain_type="test", total_processors=4, mb_per_processor=512)


def make_spec(slot: int = 0, model: str = "cernvm3", settings: Settings = SETTINGS):
    machine = Machine(uuid=str(uuidlib.uuid4()), name=f"factory-{slot:02d}.example.org",
                      slot=slot, machinetype="cms", machine_model=model, processors=1,
                      created=1_800_000_000.0, deadline=1_800_086_400.0)
    disks = (DiskSpec("vda", "/nonexistent/root.raw"),
             DiskSpec("hdc", "/nonexistent/cernvm.iso", device="cdrom", bus="ide",
                      readonly=True))
    return machine, machine_domain_spec(machine, Machinetype(name="cms", machine_model=model),
                                        settings, "/nonexistent", disks)


class RecordingRunner:
    def __init__(self, fail: bool = False):
        self.calls: list = []
        self.fail = fail

    def __call__(self, argv):
        self.calls.append(list(argv))
        if self.fail:
            raise CommandError("ip: no such device")
        return ""


@pytest.fixture
def runner():
    return RecordingRunner()


@pytest.fixture
def adapter(test_driver_uri, events, runner):
    hypervisor = Hypervisor(test_driver_uri, events, command_runner=runner)
    hypervisor.connect()
    yield hypervisor
    hypervisor.close()


def raw_connection(adapter: Hypervisor) -> libvirt.virConnect:
    """The adapter's own connection, to set up states our API does not create (test driver)."""
    return adapter._connection()


def test_created_domain_is_listed_with_its_identity(adapter, events):
    machine, spec = make_spec(slot=5)
    adapter.create(spec)
    events.wait_for(EventKind.STARTED, machine.uuid)
    (info,) = adapter.list_domains()  # the test node's own domains are not vac's
    assert (info.uuid, info.name, info.state, info.active) == \
        (machine.uuid, domain_name(machine), DomainState.RUNNING, True)
    assert info.metadata == MachineMetadata.from_machine(machine)
    assert adapter.is_active(machine.uuid)
    assert adapter.cpu_seconds(machine.uuid) > 0  # the test driver reports wall-clock time


def test_foreign_domains_are_listed_only_on_request(adapter):
    conn = raw_connection(adapter)
    conn.createXML("<domain type='test'><name>other</name><memory>8192</memory>"
                   "<os><type>hvm</type></os></domain>", 0)
    assert adapter.list_domains() == []
    (other,) = adapter.list_domains(include_foreign=True)
    assert (other.name, other.is_vac, other.metadata) == ("other", False, None)


def test_domain_with_unreadable_vac_metadata_counts_as_foreign(adapter):
    _, spec = make_spec()
    adapter.create(spec)
    domain = raw_connection(adapter).lookupByUUIDString(spec.uuid)
    domain.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<machine name='x'/>", "vac",
                       "https://vac.invalid/xmlns/vac/1", libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert adapter.list_domains() == []
    assert adapter.list_domains(include_foreign=True)[0].uuid == spec.uuid


def test_destroy_stops_the_domain_and_is_idempotent(adapter, events):
    machine, spec = make_spec()
    adapter.create(spec)
    adapter.destroy(machine.uuid)
    _, event = events.wait_for(EventKind.STOPPED, machine.uuid)
    assert event.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED
    assert adapter.list_domains() == []  # transient: gone
    adapter.destroy(machine.uuid)  # NO_DOMAIN is success
    assert not adapter.is_active(machine.uuid)
    assert adapter.cpu_seconds(machine.uuid) is None
    assert events.kinds(machine.uuid) == [EventKind.STARTED, EventKind.STOPPED]


def test_destroy_works_on_a_paused_domain(adapter, events):
    machine, spec = make_spec()
    adapter.create(spec)
    raw_connection(adapter).lookupByUUIDString(machine.uuid).suspend()
    assert adapter.list_domains()[0].state is DomainState.PAUSED
    adapter.destroy(machine.uuid)
    events.wait_for(EventKind.STOPPED, machine.uuid)
    assert adapter.list_domains() == []


def test_destroy_of_a_shut_off_persistent_domain_undefines_it(adapter):
    # OPERATION_INVALID (not running) is success when the domain is shut off (Nova _destroy).
    _, spec = make_spec()
    raw_connection(adapter).defineXML(spec.to_xml())
    assert adapter.list_domains()[0].state is DomainState.SHUTOFF
    adapter.destroy(spec.uuid)
    assert adapter.list_domains() == []


def test_acpi_shutdown_powers_the_guest_off(adapter, events):
    machine, spec = make_spec()
    adapter.create(spec)
    assert adapter.shutdown(machine.uuid) is True
    _, event = events.wait_for(EventKind.STOPPED, machine.uuid)
    assert event.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
    assert adapter.list_domains() == []  # on_poweroff=destroy removed the transient domain
    assert adapter.shutdown(machine.uuid) is False


def test_creating_a_duplicate_domain_fails_clearly(adapter):
    _, spec = make_spec()
    adapter.create(spec)
    with pytest.raises(HypervisorError, match=f"cannot create domain {spec.name}") as error:
        adapter.create(spec)
    assert error.value.code is not None


def test_event_sink_failures_do_not_stop_event_delivery(test_driver_uri, events):
    calls = []

    def sink(event):
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("sink bug")
        events(event)

    adapter = Hypervisor(test_driver_uri, sink)
    adapter.connect()
    try:
        machine, spec = make_spec()
        adapter.create(spec)  # STARTED: the sink raises
        adapter.destroy(machine.uuid)
        events.wait_for(EventKind.STOPPED, machine.uuid)
    finally:
        adapter.close()


def test_calls_without_a_connection_raise_not_connected(test_driver_uri, events):
    adapter = Hypervisor(test_driver_uri, events)
    with pytest.raises(NotConnectedError):
        adapter.list_domains()
    with pytest.raises(NotConnectedError, match="cannot connect to test:///nonexistent"):
        Hypervisor("test:///nonexistent/node.xml", events).connect()


def test_lost_connection_is_reopened_and_reported(adapter, events):
    # libvirt calls the close callback when libvirtd goes away; the test driver has no remote
    # end, so the test calls it as libvirt would.
    machine, spec = make_spec()
    old = raw_connection(adapter)
    adapter._on_close(old, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
    events.wait_for(EventKind.CONNECTION_LOST)
    events.wait_for(EventKind.RECONNECTED)
    assert adapter.connected and raw_connection(adapter) is not old
    adapter.create(spec)  # the new connection works and delivers events
    events.wait_for(EventKind.STARTED, machine.uuid)


# -- the network ---------------------------------------------------------------------------------


def isolated_network(slot_count: int = 2):
    settings = Settings(vac_space="s", factory_name="factory.example.org",
                        network_name="vactest-net", network_forward="none", bridge_name="vtbr0")
    return factory_network(settings, slot_count=slot_count)


def test_network_is_created_once_and_gets_the_metadata_address(adapter, runner):
    spec = isolated_network()
    assert adapter.ensure_network(spec) == "vtbr0"
    network = raw_connection(adapter).networkLookupByName("vactest-net")
    assert network.isActive() and not network.isPersistent()
    first_uuid = network.UUIDString()
    assert adapter.ensure_network(spec) == "vtbr0"
    assert raw_connection(adapter).networkLookupByName("vactest-net").UUIDString() == first_uuid
    assert runner.calls == [["ip", "address", "replace", "169.254.169.254/32", "dev", "vtbr0"]] * 2


def test_network_with_wrong_xml_is_recreated_when_idle(adapter):
    adapter.ensure_network(isolated_network(slot_count=2))
    old_uuid = raw_connection(adapter).networkLookupByName("vactest-net").UUIDString()
    adapter.ensure_network(isolated_network(slot_count=3))
    network = raw_connection(adapter).networkLookupByName("vactest-net")
    assert network.UUIDString() != old_uuid
    assert network.XMLDesc(0).count("<host ") == 3


def test_network_in_use_is_kept_even_if_its_xml_is_wrong(adapter, caplog):
    adapter.ensure_network(isolated_network(slot_count=2))
    old_uuid = raw_connection(adapter).networkLookupByName("vactest-net").UUIDString()
    _, spec = make_spec(settings=Settings(vac_space="s", factory_name="factory.example.org",
                                          domain_type="test", network_name="vactest-net"))
    adapter.create(spec)
    adapter.ensure_network(isolated_network(slot_count=3))
    assert raw_connection(adapter).networkLookupByName("vactest-net").UUIDString() == old_uuid
    assert "1 domains use it (factory-00.example.org-" in caplog.text


def test_inactive_persistent_network_is_replaced_by_a_transient_one(adapter):
    spec = isolated_network()
    raw_connection(adapter).networkDefineXML(spec.to_xml())
    adapter.ensure_network(spec)
    network = raw_connection(adapter).networkLookupByName("vactest-net")
    assert network.isActive() and not network.isPersistent()
    adapter.remove_network("vactest-net")
    adapter.remove_network("vactest-net")  # absent is success
    assert "vactest-net" not in [net.name() for net in raw_connection(adapter).listAllNetworks()]


def test_failing_address_command_is_reported(test_driver_uri, events):
    adapter = Hypervisor(test_driver_uri, events, command_runner=RecordingRunner(fail=True))
    adapter.connect()
    try:
        with pytest.raises(HypervisorError, match="cannot give bridge .* the address .*: ip: no such device"):
            adapter.ensure_network(isolated_network())
    finally:
        adapter.close()


def test_libvirt_backend_keeps_final_cpu_readings_until_the_release(test_driver_uri, tmp_path):
    """The CPU time of a domain that is gone: read before vacd destroyed it, or carried by the
    SHUTDOWN event of the guest's poweroff, and kept until the machine is released (or, for a
    zombie, forgotten)."""
    import dataclasses

    from vac.backends.vm.backend import LibvirtBackend
    from vac.backends.vm.hypervisor import DomainEvent

    settings = dataclasses.replace(SETTINGS, libvirt_uri=test_driver_uri, state_dir=str(tmp_path))
    stopped = []
    backend = LibvirtBackend(settings, stopped.append, lambda: None, lambda machinetype: None)
    backend.hypervisor.connect()
    try:
        machine, spec = make_spec()
        backend.hypervisor.create(spec)
        running = backend.cpu_seconds(machine.uuid)
        assert running > 0
        (listed,) = backend.list_machines()
        assert (listed.uuid, listed.name, listed.active) == (machine.uuid, spec.name, True)
        backend.destroy(machine.uuid)
        assert backend.hypervisor.cpu_seconds(machine.uuid) is None  # libvirt forgot it
        assert backend.cpu_seconds(machine.uuid) >= running
        powered_off = str(uuidlib.uuid4())
        backend.hypervisor.event_sink(DomainEvent(EventKind.SHUTDOWN, powered_off, "guest", 1,
                                                  cpu_seconds=7.5))
        assert stopped[-1] == powered_off and backend.cpu_seconds(powered_off) == 7.5
        backend.release(machine, settings, tmp_path / "machine")
        assert backend.cpu_seconds(machine.uuid) is None
        backend.forget(powered_off)
        assert backend.cpu_seconds(powered_off) is None
    finally:
        backend.close()


def test_qemu_cpu_time_is_read_from_proc_with_libvirts_pid_file(tmp_path):
    import os
    import shutil
    import subprocess

    from vac.backends.vm.hypervisor import qemu_cpu_seconds

    fake_qemu = tmp_path / "qemu-system-x86_64"  # the kernel names the process after the file
    shutil.copy("/bin/sleep", fake_qemu)
    process = subprocess.Popen([str(fake_qemu), "60"])
    try:
        (tmp_path / "vm.pid").write_text(f"{process.pid}\n")
        seconds = qemu_cpu_seconds(str(tmp_path), "vm")
        assert seconds is not None and 0 <= seconds < 60
        (tmp_path / "other.pid").write_text(f"{os.getpid()}\n")  # a stale file: not QEMU's pid
        assert qemu_cpu_seconds(str(tmp_path), "other") is None
        (tmp_path / "garbage.pid").write_text("not a pid\n")
        assert qemu_cpu_seconds(str(tmp_path), "garbage") is None
        assert qemu_cpu_seconds(str(tmp_path), "absent") is None
    finally:
        process.kill()
        process.wait(timeout=10)
    assert qemu_cpu_seconds(str(tmp_path), "vm") is None  # the process is gone
