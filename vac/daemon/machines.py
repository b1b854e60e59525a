"""The blocking steps of a machine's life, behind one seam (``MachineWorks``).

vacd runs each method in its thread pool. Tests replace the whole object with a recording fake,
so the daemon's cycle is tested without libvirt; this module itself is tested against libvirt's
``test:///`` driver and, in the system tier, real libvirtd + QEMU.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from vac.backends.vm import disks, hypervisor
from vac.content import imagecache, userdata
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine
from vac.records import apel
from vac.records.store import Store
from vac.services import metadata

log = logging.getLogger(__name__)

# Final CPU readings wait here from the machine's end until its finish step releases it; the
# bound only matters for domains vacd never finishes (foreign ones, zombies).
FINAL_READINGS_KEPT = 4096


class MachineWorks:
    """Creates, stops, lists and cleans up machines with libvirt, disks and the store."""

    def __init__(self, store: Store, settings: Settings,
                 on_stopped: Callable[[str], None], on_reconnected: Callable[[], None]):
        self.store = store
        self.settings = settings
        self.on_stopped = on_stopped
        self.on_reconnected = on_reconnected
        self.hypervisor = hypervisor.Hypervisor(settings.libvirt_uri, self._on_event)
        self.images = None
        self._final_lock = threading.Lock()
        self._final_cpu: collections.OrderedDict[str, float] = collections.OrderedDict()

    def _on_event(self, event: hypervisor.DomainEvent) -> None:
        """On libvirt's event thread: only hand the news over to the loop."""
        # SHUTDOWN: the guest has powered off; libvirt's teardown (STOPPED) takes seconds more,
        # and the slot's next machine need not wait for it (domain names are unique). The
        # event carries the CPU time read at that moment: kept before the loop hears of it.
        if event.kind is hypervisor.EventKind.SHUTDOWN and event.cpu_seconds is not None:
            self._keep_final_cpu(event.uuid, event.cpu_seconds)
        if event.stopped or event.kind is hypervisor.EventKind.SHUTDOWN:
            self.on_stopped(event.uuid)
        elif event.kind is hypervisor.EventKind.RECONNECTED:
            self.on_reconnected()

    def connect(self) -> None:
        self.hypervisor.connect()
        self.hypervisor.ensure_network(hypervisor.factory_network(self.settings))

    def check_storage(self) -> None:
        """DiskError unless the configured volume group exists (classic: a config error)."""
        if self.settings.volume_group:
            disks.volume_group_size(self.settings.volume_group)

    def close(self) -> None:
        self.hypervisor.close()

    def list_domains(self) -> list:
        return self.hypervisor.list_domains()

    def is_active(self, uuid: str) -> bool:
        return self.hypervisor.is_active(uuid)

    def shutdown(self, uuid: str) -> None:
        self.hypervisor.shutdown(uuid)

    def destroy(self, uuid: str) -> None:
        """Power the domain off at once, after a last reading of its CPU time."""
        try:
            reading = self.hypervisor.cpu_seconds(uuid)
        except hypervisor.HypervisorError as error:
            log.debug("no CPU reading of %s before destroying it: %s", uuid, error)
            reading = None
        self.hypervisor.destroy(uuid)
        if reading is not None:  # final only once the domain is really gone
            self._keep_final_cpu(uuid, reading)

    # -- CPU time ----------------------------------------------------------------------------

    def cpu_seconds(self, uuid: str) -> Optional[float]:
        """CPU time the machine used so far, or in total once it ended (read at the guest's
        poweroff or just before a destroy); None if it is gone with no such reading.
        HypervisorError if libvirt cannot be asked."""
        with self._final_lock:
            final = self._final_cpu.get(uuid)
        if final is not None:
            return final
        return self.hypervisor.cpu_seconds(uuid)

    def _keep_final_cpu(self, uuid: str, seconds: float) -> None:
        with self._final_lock:
            # Several readings of an ending machine (SHUTDOWN, then destroy): keep the largest.
            self._final_cpu[uuid] = max(seconds, self._final_cpu.pop(uuid, 0.0))
            while len(self._final_cpu) > FINAL_READINGS_KEPT:
                self._final_cpu.popitem(last=False)

    # -- creation ----------------------------------------------------------------------------

    def create(self, machine: Machine, machinetype: Machinetype, settings: Settings) -> None:
        """Write the machine directory (MJF, user_data, keys), make its disks, start the domain."""
        now = time.time()
        directory = self.store.create_machine_dir(machine)
        machinefeatures, jobfeatures = metadata.mjf_features(machine, settings, machinetype, now)
        metadata.write_mjf(directory, machinefeatures, jobfeatures)
        if machinetype.accounting_fqan:
            self.store.write_file(machine, "accounting_fqan", machinetype.accounting_fqan)
        self._copy_public_key(machine, settings)
        template, url = userdata.fetch_template(machinetype, settings)
        proxy = None
        if machinetype.user_data_proxy:
            from vac.content import x509

            proxy = x509.machinetype_proxy(machinetype, machine.deadline, now)
        text = userdata.build_user_data(template, settings=settings, machinetype=machinetype,
                                        machine=machine, template_url=url, proxy_pem=proxy)
        self.store.write_file(machine, "user_data", text, mode=0o600)
        spec = self.domain_spec(machine, machinetype, settings, directory)
        self.hypervisor.create(spec)

    def _copy_public_key(self, machine: Machine, settings: Settings) -> None:
        try:
            key = Path(settings.root_public_key).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return  # optional: VMs then get no public key
        self.store.write_file(machine, "root_public_key", key)

    def root_image(self, machinetype: Machinetype, settings: Settings) -> Path:
        if self.images is None:
            self.images = imagecache.ImageCache(Path(settings.state_dir) / "imagecache")
        return imagecache.resolve_root_image(machinetype, self.images)

    def domain_spec(self, machine: Machine, machinetype: Machinetype, settings: Settings,
                    directory: Path) -> hypervisor.DomainSpec:
        """Make the machine's disks and describe its domain (policy here, none in the XML)."""
        image = self.root_image(machinetype, settings) if machinetype.root_image else None
        if image is not None and machinetype.image_signing_dn and machinetype.machine_model != "vm-raw":
            from vac.content import x509

            x509.verify_cernvm_image(str(image), machinetype.image_signing_dn)
        machine_disks = disks.prepare_disks(settings, machinetype, machine,
                                            str(directory / "disks"),
                                            str(image) if image is not None else None)
        return hypervisor.machine_domain_spec(machine, machinetype, settings, str(directory),
                                              machine_disks)

    # -- finishing ---------------------------------------------------------------------------

    def lower_deadline(self, machine: Machine) -> None:
        metadata.lower_deadline_files(self.store.machine_dir(machine), machine.deadline)

    def account(self, settings: Settings, machinetype: Machinetype, machine: Machine,
                end: float) -> None:
        result = apel.write_accounting(settings, machinetype, machine, end, machine.cpu_seconds)
        log.info("accounting for %s: %s", machine.name, result)

    def complete_accounting(self) -> None:
        """Finish publishing records a crash interrupted (see vac.records.apel)."""
        completed = apel.complete_pending(self.settings)
        if completed:
            log.info("completed %d interrupted APEL records", completed)

    def release(self, machine: Machine, settings: Settings) -> None:
        """Remove the machine's disks (files, and its logical volume if any). Idempotent."""
        disks.release_disks(settings, machine, str(self.store.machine_dir(machine) / "disks"))
        with self._final_lock:
            self._final_cpu.pop(machine.uuid, None)  # accounted by now: never asked again
