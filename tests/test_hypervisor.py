"""Pure tests of the libvirt domain and network XML objects and designers (golden files), and of
the adapter's event and state vocabulary."""

from __future__ import annotations

import dataclasses

import pytest

from vac.backends.vm import domain
from vac.backends.vm.domain import (
    DhcpHost,
    DiskSpec,
    MachineMetadata,
    NetworkSpec,
    factory_network,
    machine_domain_spec,
)
from vac.backends.vm.hypervisor import DomainEvent, DomainState, EventKind
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

UUID = "0b9c2a1e-3f4d-4c5b-8a6e-7f8091a2b3c4"
CREATED = 1_800_000_000.0


def make_settings(**changes) -> Settings:
    values = {"vac_space": "space.example.org", "factory_name": "factory.example.org",
              "total_processors": 4}
    return Settings(**{**values, **changes})


def make_machine(model: str = "cernvm3", slot: int = 3, processors: int = 2) -> Machine:
    return Machine(uuid=UUID, name=f"factory-{slot:02d}.example.org", slot=slot,
                   machinetype="cms", machine_model=model, processors=processors,
                   created=CREATED, deadline=CREATED + 86400.5)


MACHINE_DIR = "/var/lib/vac/machines/1800000000_cms_factory-03.example.org"
ISO = DiskSpec("hdc", "/var/lib/vac/imagecache/cernvm.iso", device="cdrom", bus="ide",
               readonly=True)


# -- domain XML ----------------------------------------------------------------------------------


def test_cernvm3_domain_with_file_root_disk_and_iso(golden):
    disks = (DiskSpec("vda", f"{MACHINE_DIR}/disks/root.raw"), ISO)
    spec = machine_domain_spec(make_machine(), Machinetype(name="cms"), make_settings(),
                               MACHINE_DIR, disks)
    golden("hypervisor/domain_cernvm3_file.xml", spec.to_xml())


def test_cernvm4_domain_on_qemu_with_logical_volume(golden):
    disks = (DiskSpec("vda", "/dev/vac_volume_group/factory-03.example.org",
                      source_type="block"), ISO)
    spec = machine_domain_spec(make_machine("cernvm4", processors=1),
                               Machinetype(name="cms", machine_model="cernvm4"),
                               make_settings(domain_type="qemu", mb_per_processor=3000),
                               MACHINE_DIR, disks)
    golden("hypervisor/domain_cernvm4_lv.xml", spec.to_xml())


def test_vm_raw_domain_with_overlay_and_scratch_volume(golden):
    disks = (DiskSpec("vda", f"{MACHINE_DIR}/disks/root.qcow2", format="qcow2"),
             DiskSpec("vdb", "/dev/vg0/factory-03.example.org", source_type="block"))
    spec = machine_domain_spec(make_machine("vm-raw", processors=4),
                               Machinetype(name="cms", machine_model="vm-raw"),
                               make_settings(network_name="vac_test"), MACHINE_DIR, disks)
    golden("hypervisor/domain_vm_raw_scratch.xml", spec.to_xml())


def test_direct_kernel_boot_domain_for_test_guests(golden):
    settings = make_settings(domain_type="qemu", mb_per_processor=96, kernel="/guest/vmlinuz",
                             initrd="/guest/initrd.gz", kernel_cmdline="console=ttyS0 panic=-1")
    spec = machine_domain_spec(make_machine(processors=1), Machinetype(name="cms"), settings,
                               MACHINE_DIR, (DiskSpec("vda", f"{MACHINE_DIR}/disks/root.raw"),))
    golden("hypervisor/domain_kernel_boot.xml", spec.to_xml())


def test_domain_policy_follows_settings_and_machine():
    disks = (DiskSpec("vda", "/d/root.raw"), ISO)
    spec = machine_domain_spec(make_machine(slot=7, processors=3), Machinetype(name="cms"),
                               make_settings(mb_per_processor=1000), "/m", disks)
    assert (spec.memory_mib, spec.vcpus) == (3000, 3)
    assert spec.cpu_mode == "host-model"  # kvm: never host-passthrough (TESTBED.md P2)
    assert spec.boot_devices == ("cdrom", "hd")
    assert spec.vnc and spec.name == "factory-07.example.org-" + spec.uuid[:8]
    assert spec.console_path == "/m/console.log"
    assert (spec.interface.mac, spec.interface.ip) == ("56:4d:a9:fe:a9:07", "169.254.169.7")
    assert spec.interface.nwfilter == "clean-traffic"
    qemu = machine_domain_spec(make_machine(), Machinetype(name="cms"),
                               make_settings(domain_type="qemu"), "/m", disks[:1])
    assert qemu.cpu_mode is None and qemu.boot_devices == ("hd",)


def test_domain_xml_carries_identity_for_cloud_init_and_recovery():
    spec = machine_domain_spec(make_machine(), Machinetype(name="cms"), make_settings(), "/m",
                               (ISO,))
    root = spec.to_element()
    entries = {entry.get("name"): entry.text for entry in root.findall("sysinfo/system/entry")}
    assert entries["product"] == "OpenStack Nova"
    assert entries["uuid"] == UUID == root.findtext("uuid")
    assert root.find("os/smbios").get("mode") == "sysinfo"
    assert [root.findtext(event) for event in ("on_poweroff", "on_reboot", "on_crash")] == \
        ["destroy"] * 3
    element = root.find(f"metadata/{{{domain.VAC_XML_NAMESPACE}}}machine")
    assert MachineMetadata.from_xml(domain.ET.tostring(element)) == \
        MachineMetadata.from_machine(make_machine())


# -- metadata ------------------------------------------------------------------------------------


def test_metadata_round_trips_with_or_without_namespace():
    metadata = MachineMetadata.from_machine(make_machine(slot=260))
    text = domain.ET.tostring(metadata.to_element(), encoding="unicode")
    assert MachineMetadata.from_xml(text) == metadata
    # libvirt's virDomainGetMetadata returns the element with the namespace stripped
    bare = ('<machine name="factory-260.example.org" slot="260" machinetype="cms" '
            'model="cernvm3" processors="2" created="1800000000.0" deadline="1800086400.5"/>')
    assert MachineMetadata.from_xml(bare) == metadata


@pytest.mark.parametrize("text, message", [
    ("not xml <", "not XML"),
    ("<other/>", "root element"),
    ('<machine name="a" slot="1" machinetype="m" model="vm-raw" processors="1" created="1"/>',
     "lacks attribute 'deadline'"),
    ('<machine name="a" slot="x" machinetype="m" model="vm-raw" processors="1" created="1" '
     'deadline="2"/>', "invalid literal"),
])
def test_bad_metadata_is_refused_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        MachineMetadata.from_xml(text)


# -- network XML ---------------------------------------------------------------------------------


def test_factory_network_is_nat_with_an_entry_for_every_slot(golden):
    spec = factory_network(make_settings(forward_dev="eth0"))
    assert spec.bridge_addresses == ("169.254.169.254/32",)
    golden("hypervisor/network_factory_nat.xml", spec.to_xml())


def test_isolated_test_network_has_no_forward_and_no_dns(golden):
    settings = make_settings(network_forward="none", network_name="vactest-1-0",
                             bridge_name="vt1n0", forward_dev="eth0")
    spec = factory_network(settings, slot_count=2)
    assert (spec.forward_mode, spec.forward_dev, spec.dns) == (None, None, False)
    golden("hypervisor/network_isolated.xml", spec.to_xml())


def test_factory_network_covers_slots_beyond_the_classic_hundred():
    spec = factory_network(make_settings(total_processors=300))
    assert len(spec.hosts) == 300
    assert spec.hosts[252] == DhcpHost("56:4d:a9:fe:a9:fc", "factory-252.example.org",
                                       "169.254.169.252")
    assert spec.hosts[253] == DhcpHost("56:4d:a9:fe:aa:00", "factory-253.example.org",
                                       "169.254.170.0")


# What libvirt 9.0 gives back for a network created from factory_network(): it adds a UUID, a
# MAC, NAT ports and the bridge name it chose.
LIBVIRT_NETWORK_XML = """<network>
  <name>vac_169.254.0.0</name>
  <uuid>6f0ea2b9-6d0b-4c63-a6b4-61b4b1c86f45</uuid>
  <forward mode='nat'>
    <nat><port start='1024' end='65535'/></nat>
  </forward>
  <bridge name='virbr1' stp='off' delay='0'/>
  <mac address='52:54:00:12:34:56'/>
  <dns enable='yes'/>
  <ip address='169.254.169.253' netmask='255.255.0.0'>
    <dhcp>
      <host mac='56:4D:A9:FE:A9:00' name='factory-00.example.org' ip='169.254.169.0'/>
      <host mac='56:4d:a9:fe:a9:01' name='factory-01.example.org' ip='169.254.169.1'/>
    </dhcp>
  </ip>
</network>
"""


def test_network_read_back_from_libvirt_satisfies_the_spec():
    spec = factory_network(make_settings(), slot_count=2)
    existing = NetworkSpec.from_xml(LIBVIRT_NETWORK_XML)
    assert existing.bridge == "virbr1"
    assert spec.satisfied_by(existing)
    assert NetworkSpec.from_xml(spec.to_xml()) == dataclasses.replace(spec, bridge_addresses=())


@pytest.mark.parametrize("changes", [
    {"slot_count": 3},
    {"settings": {"network_forward": "none"}},
    {"settings": {"mjf_address": "169.254.169.250"}},
    {"settings": {"bridge_name": "vacbr0"}},
    {"settings": {"forward_dev": "eth1"}},
])
def test_network_with_other_settings_does_not_satisfy_the_spec(changes):
    spec = factory_network(make_settings(**changes.get("settings", {})),
                           slot_count=changes.get("slot_count", 2))
    assert not spec.satisfied_by(NetworkSpec.from_xml(LIBVIRT_NETWORK_XML))


def test_network_netmask_from_prefix():
    assert NetworkSpec("n", "10.0.0.1", 16).netmask == "255.255.0.0"
    assert NetworkSpec.from_xml("<network><name>n</name><ip address='10.0.0.1' prefix='24'/>"
                                "</network>").prefix == 24


# -- states and events ---------------------------------------------------------------------------


@pytest.mark.parametrize("state, name, active", [
    (1, "running", True), (3, "paused", True), (4, "shutdown", True), (5, "shutoff", False),
    (6, "crashed", False), (99, "nostate", False)])
def test_domain_states_from_libvirt(state, name, active):
    assert DomainState.from_libvirt(state).value == name
    assert DomainState.from_libvirt(state).active is active


def test_only_stopped_means_gone():
    assert DomainEvent(EventKind.STOPPED, UUID).stopped
    assert not DomainEvent(EventKind.SHUTDOWN, UUID).stopped
