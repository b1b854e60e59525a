"""libvirt domain and network XML for vac machines, with no connection and no libvirt import.

Two layers, in the spirit of Nova's ``config.py`` / ``designer`` split (STANDARDS.md §A4):

* XML objects (``DiskSpec``, ``InterfaceSpec``, ``MachineMetadata``, ``DomainSpec``, ``DhcpHost``,
  ``NetworkSpec``): plain frozen dataclasses with ``to_element()``/``to_xml()`` (and
  ``from_xml()`` where state is read back). They make no decisions.
* Designers (``machine_domain_spec``, ``factory_network``): the policy of what a vac machine and
  the factory network look like, from the configuration and the machine record.

The connection that creates them is vac.backends.vm.hypervisor; golden tests need neither.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Optional

from vac import __version__
from vac.core.config import Machinetype, Settings
from vac.core.model import NETWORK_PREFIX, Machine, slot_ip, slot_mac, slot_name

VAC_XML_NAMESPACE = "https://vac.invalid/xmlns/vac/1"
ET.register_namespace("vac", VAC_XML_NAMESPACE)

SMBIOS_MANUFACTURER = "Vac"
SMBIOS_PRODUCT = "OpenStack Nova"  # what cloud-init's OpenStack detection looks for (§A5)
SMBIOS_FAMILY = "Virtual Machine"
MIB = 1 << 20


# -- XML objects ---------------------------------------------------------------------------------


def _sub(parent: ET.Element, tag: str, text: Optional[str] = None, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = text
    return element


def _to_text(element: ET.Element) -> str:
    ET.indent(element)
    return ET.tostring(element, encoding="unicode") + "\n"


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """One ``<disk>``: a file or block device shown to the guest as a disk or CD-ROM."""

    target: str  # vda, vdb, hdc ...
    source: str  # file path or block device path
    format: str = "raw"  # raw | qcow2
    source_type: str = "file"  # file | block
    device: str = "disk"  # disk | cdrom
    bus: str = "virtio"  # virtio | ide
    readonly: bool = False

    def to_element(self) -> ET.Element:
        disk = ET.Element("disk", type=self.source_type, device=self.device)
        _sub(disk, "driver", name="qemu", type=self.format, cache="unsafe", error_policy="report")
        _sub(disk, "source", **{"file" if self.source_type == "file" else "dev": self.source})
        _sub(disk, "target", dev=self.target, bus=self.bus)
        if self.readonly:
            _sub(disk, "readonly")
        return disk


@dataclasses.dataclass(frozen=True)
class InterfaceSpec:
    """A virtio NIC on a libvirt network, optionally behind an nwfilter bound to its IP."""

    network: str
    mac: str
    ip: Optional[str] = None  # the nwfilter's IP parameter: no learning window for spoofing
    nwfilter: Optional[str] = "clean-traffic"

    def to_element(self) -> ET.Element:
        interface = ET.Element("interface", type="network")
        _sub(interface, "source", network=self.network)
        _sub(interface, "mac", address=self.mac)
        _sub(interface, "model", type="virtio")
        if self.nwfilter:
            filterref = _sub(interface, "filterref", filter=self.nwfilter)
            if self.ip:
                _sub(filterref, "parameter", name="IP", value=self.ip)
        return interface


@dataclasses.dataclass(frozen=True)
class MachineMetadata:
    """A vac machine's identity, stored in its domain XML so libvirt alone can tell it again."""

    name: str
    slot: int
    machinetype: str
    machine_model: str
    processors: int
    created: float
    deadline: float

    @classmethod
    def from_machine(cls, machine: Machine) -> MachineMetadata:
        return cls(name=machine.name, slot=machine.slot, machinetype=machine.machinetype,
                   machine_model=machine.machine_model, processors=machine.processors,
                   created=machine.created, deadline=machine.deadline)

    def to_element(self) -> ET.Element:
        return ET.Element(f"{{{VAC_XML_NAMESPACE}}}machine", {
            "name": self.name, "slot": str(self.slot), "machinetype": self.machinetype,
            "model": self.machine_model, "processors": str(self.processors),
            "created": repr(float(self.created)), "deadline": repr(float(self.deadline))})

    @classmethod
    def from_xml(cls, text: str) -> MachineMetadata:
        """Parse the ``<vac:machine>`` element; ValueError if it is not a complete, valid one."""
        try:
            element = ET.fromstring(text)
        except ET.ParseError as error:
            raise ValueError(f"vac metadata is not XML: {error}") from error
        # libvirt hands the element back without its namespace; accept it either way.
        if element.tag not in ("machine", f"{{{VAC_XML_NAMESPACE}}}machine"):
            raise ValueError(f"vac metadata has root element {element.tag!r}")
        try:
            return cls(name=element.attrib["name"], slot=int(element.attrib["slot"]),
                       machinetype=element.attrib["machinetype"],
                       machine_model=element.attrib["model"],
                       processors=int(element.attrib["processors"]),
                       created=float(element.attrib["created"]),
                       deadline=float(element.attrib["deadline"]))
        except KeyError as error:
            raise ValueError(f"vac metadata lacks attribute {error.args[0]!r}") from error


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """A transient libvirt domain. ``kernel`` set means direct kernel boot (test guests)."""

    uuid: str
    name: str
    domain_type: str  # kvm | qemu (| test for libvirt's test driver)
    memory_mib: int
    vcpus: int
    disks: tuple[DiskSpec, ...]
    interface: InterfaceSpec
    console_path: str
    metadata: MachineMetadata
    boot_devices: tuple[str, ...] = ("hd",)
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    kernel_cmdline: Optional[str] = None
    cpu_mode: Optional[str] = None  # None: the hypervisor's default model
    vnc: bool = False  # a VNC console on 127.0.0.1 (port chosen by libvirt)
    smbios_manufacturer: str = SMBIOS_MANUFACTURER
    smbios_product: str = SMBIOS_PRODUCT
    smbios_version: str = __version__

    def to_element(self) -> ET.Element:
        domain = ET.Element("domain", type=self.domain_type)
        _sub(domain, "name", self.name)
        _sub(domain, "uuid", self.uuid)
        _sub(domain, "metadata").append(self.metadata.to_element())
        _sub(domain, "memory", str(self.memory_mib), unit="MiB")
        _sub(domain, "currentMemory", str(self.memory_mib), unit="MiB")
        _sub(domain, "vcpu", str(self.vcpus))
        system = _sub(_sub(domain, "sysinfo", type="smbios"), "system")
        for name, value in (("manufacturer", self.smbios_manufacturer),
                            ("product", self.smbios_product), ("version", self.smbios_version),
                            ("serial", self.uuid), ("uuid", self.uuid),
                            ("family", SMBIOS_FAMILY)):
            _sub(system, "entry", value, name=name)
        os_element = _sub(domain, "os")
        _sub(os_element, "type", "hvm", arch="x86_64", machine="pc")
        if self.kernel:
            _sub(os_element, "kernel", self.kernel)
            if self.initrd:
                _sub(os_element, "initrd", self.initrd)
            if self.kernel_cmdline:
                _sub(os_element, "cmdline", self.kernel_cmdline)
        else:
            for device in self.boot_devices:
                _sub(os_element, "boot", dev=device)
        _sub(os_element, "smbios", mode="sysinfo")
        features = _sub(domain, "features")
        for feature in ("acpi", "apic", "pae"):
            _sub(features, feature)
        if self.cpu_mode:
            _sub(domain, "cpu", mode=self.cpu_mode)
        _sub(domain, "clock", offset="utc")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            _sub(domain, event, "destroy")
        power = _sub(domain, "pm")
        _sub(power, "suspend-to-mem", enabled="no")
        _sub(power, "suspend-to-disk", enabled="no")
        devices = _sub(domain, "devices")
        for disk in self.disks:
            devices.append(disk.to_element())
        devices.append(self.interface.to_element())
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", path=self.console_path)
        _sub(serial, "target", port="0")
        if self.vnc:
            graphics = _sub(devices, "graphics", type="vnc", autoport="yes", keymap="en-gb")
            _sub(graphics, "listen", type="address", address="127.0.0.1")
        _sub(devices, "memballoon", model="none")
        return domain

    def to_xml(self) -> str:
        return _to_text(self.to_element())


@dataclasses.dataclass(frozen=True)
class DhcpHost:
    mac: str
    name: str
    ip: str


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A libvirt network with static DHCP entries only, plus addresses for the bridge itself.

    ``bridge_addresses`` (CIDR strings) are not libvirt XML: ``Hypervisor.ensure_network`` puts
    them on the bridge after starting the network (the metadata service's 169.254.169.254/32).
    """

    name: str
    address: str
    prefix: int
    hosts: tuple[DhcpHost, ...] = ()
    forward_mode: Optional[str] = "nat"  # None: isolated
    forward_dev: Optional[str] = None
    bridge: Optional[str] = None  # None: libvirt picks virbrN
    dns: bool = True
    bridge_addresses: tuple[str, ...] = ()

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)

    def to_element(self) -> ET.Element:
        network = ET.Element("network")
        _sub(network, "name", self.name)
        if self.forward_mode:
            forward = _sub(network, "forward", mode=self.forward_mode)
            if self.forward_dev:
                forward.set("dev", self.forward_dev)
        bridge_name = {"name": self.bridge} if self.bridge else {}
        _sub(network, "bridge", **bridge_name, stp="off", delay="0")
        _sub(network, "dns", enable="yes" if self.dns else "no")
        ip = _sub(network, "ip", address=self.address, netmask=self.netmask)
        dhcp = _sub(ip, "dhcp")
        for host in self.hosts:
            _sub(dhcp, "host", mac=host.mac, name=host.name, ip=host.ip)
        return network

    def to_xml(self) -> str:
        return _to_text(self.to_element())

    @classmethod
    def from_xml(cls, text: str) -> NetworkSpec:
        """The fields of this class found in a network's XML (libvirt adds more; ignored)."""
        root = ET.fromstring(text)
        forward = root.find("forward")
        bridge = root.find("bridge")
        dns = root.find("dns")
        ip = root.find("ip")
        if ip is None:
            address, prefix, hosts = "", 0, ()
        else:
            address = ip.get("address", "")
            if ip.get("prefix"):
                prefix = int(ip.get("prefix"))
            else:
                mask = ip.get("netmask", "0.0.0.0")
                prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
            hosts = tuple(DhcpHost(mac=host.get("mac", "").lower(), name=host.get("name", ""),
                                   ip=host.get("ip", ""))
                          for host in ip.findall("dhcp/host"))
        return cls(name=root.findtext("name", ""), address=address, prefix=prefix, hosts=hosts,
                   forward_mode=forward.get("mode", "nat") if forward is not None else None,
                   forward_dev=forward.get("dev") if forward is not None else None,
                   bridge=bridge.get("name") if bridge is not None else None,
                   dns=dns is None or dns.get("enable", "yes") == "yes")

    def satisfied_by(self, existing: NetworkSpec) -> bool:
        """True if a network with ``existing``'s XML is this one (any bridge if ours is None)."""
        fields = dataclasses.replace(existing, bridge_addresses=self.bridge_addresses)
        if self.bridge is None:
            fields = dataclasses.replace(fields, bridge=None)
        return fields == self


# -- designers: the policy -----------------------------------------------------------------------


def factory_network(settings: Settings, slot_count: Optional[int] = None) -> NetworkSpec:
    """The factory's network (ARCHITECTURE.md §5): a DHCP entry for every slot.

    ``slot_count`` defaults to the processors vac may use (each machine has at least one).
    Guests on a NAT network get dnsmasq's DNS; an isolated (test) network has none.
    """
    if slot_count is None:
        slot_count = settings.total_processors or os.cpu_count() or 1
    hosts = tuple(DhcpHost(mac=slot_mac(slot), name=slot_name(settings.factory_name, slot),
                           ip=slot_ip(slot)) for slot in range(slot_count))
    nat = settings.network_forward != "none"
    return NetworkSpec(name=settings.network_name, address=settings.mjf_address,
                       prefix=NETWORK_PREFIX, hosts=hosts,
                       forward_mode="nat" if nat else None,
                       forward_dev=settings.forward_dev if nat else None,
                       bridge=settings.bridge_name, dns=nat,
                       bridge_addresses=(f"{settings.metadata_address}/32",))


def domain_name(machine: Machine) -> str:
    """The libvirt name of a machine's domain: its name plus the start of its UUID.

    Unique per machine, not per slot, so the next machine of a slot can be created while
    libvirt still tears the previous one down (seconds, with clean-traffic); the machine's
    name itself is in the vac metadata element and is what the VM, DHCP and ``vac`` use.
    """
    return f"{machine.name}-{machine.uuid[:8]}"


def machine_domain_spec(machine: Machine, machinetype: Machinetype, settings: Settings,
                        directory: str, disks: Sequence[DiskSpec]) -> DomainSpec:
    """The domain of ``machine``, whose disks ``vac.backends.vm.disks.prepare_disks`` made.

    KVM guests get the host CPU model (as Nova does), never host-passthrough, which fails on
    nested hosts (TESTBED.md P2); QEMU (TCG) guests get QEMU's default CPU. The console goes to
    ``<directory>/console.log``; VNC listens on 127.0.0.1 (libvirt picks the port).
    """
    boot = ("cdrom", "hd") if any(disk.device == "cdrom" for disk in disks) else ("hd",)
    return DomainSpec(
        uuid=machine.uuid, name=domain_name(machine), domain_type=settings.domain_type,
        memory_mib=settings.mb_per_processor * machine.processors, vcpus=machine.processors,
        disks=tuple(disks),
        interface=InterfaceSpec(network=settings.network_name, mac=slot_mac(machine.slot),
                                ip=slot_ip(machine.slot)),
        console_path=os.path.join(str(directory), "console.log"),
        metadata=MachineMetadata.from_machine(machine), boot_devices=boot,
        kernel=settings.kernel, initrd=settings.initrd, kernel_cmdline=settings.kernel_cmdline,
        cpu_mode="host-model" if settings.domain_type == "kvm" else None,
        vnc=True)
