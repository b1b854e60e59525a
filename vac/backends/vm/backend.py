"""``LibvirtBackend``: the cernvm3, cernvm4 and vm-raw machine models as libvirt domains.

The ``MachineBackend`` over vac.backends.vm.hypervisor (the connection and its events),
vac.backends.vm.domain (the XML) and vac.backends.vm.disks (root, scratch and context disks).
The daemon has written the machine's directory (MJF, user_data, keys) before ``create``; this
backend makes the disks, describes the domain and starts it.

CPU time at a machine's end: libvirt answers for an ended domain only after its teardown, with
0. So the reading taken at the guest's poweroff (the SHUTDOWN event reads QEMU's /proc entry) or
just before a ``destroy`` is kept and returned by ``cpu_seconds`` until ``release``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from vac.backends.base import BackendMachine, StoppedCallback
from vac.backends.vm import disks, hypervisor
from vac.backends.vm.domain import factory_network, machine_domain_spec
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

log = logging.getLogger(__name__)

# Final CPU readings wait here from the machine's end until its release; the bound only matters
# for domains vacd never finishes (foreign ones, zombies it could not forget).
FINAL_READINGS_KEPT = 4096
# lvremove fails while QEMU still holds the volume: release waits this long for the domain.
LV_RELEASE_WAIT_SECONDS = 120.0
LV_RELEASE_POLL_SECONDS = 0.5

# The machinetype's root image as a local file (downloaded, verified), or None if it has none.
RootImageResolver = Callable[[Machinetype], Optional[Path]]


class LibvirtBackend:
    """Machines of the VM models as transient libvirt domains (``MachineBackend``)."""

    kind = "vm"

    def __init__(self, settings: Settings, on_stopped: StoppedCallback,
                 on_reconnected: Callable[[], None], root_image: RootImageResolver):
        self.settings = settings  # for the factory network at connect
        self.on_stopped = on_stopped
        self.on_reconnected = on_reconnected
        self.root_image = root_image
        self.hypervisor = hypervisor.Hypervisor(settings.libvirt_uri, self._on_event)
        self._final_lock = threading.Lock()
        self._final_cpu: collections.OrderedDict[str, float] = collections.OrderedDict()

    def _on_event(self, event: hypervisor.DomainEvent) -> None:
        """On libvirt's event thread: only hand the news over."""
        # SHUTDOWN: the guest has powered off; libvirt's teardown (STOPPED) takes seconds more,
        # and the slot's next machine need not wait for it (domain names are unique). The
        # event carries the CPU time read at that moment: kept before the daemon hears of it.
        if event.kind is hypervisor.EventKind.SHUTDOWN and event.cpu_seconds is not None:
            self._keep_final_cpu(event.uuid, event.cpu_seconds)
        if event.stopped or event.kind is hypervisor.EventKind.SHUTDOWN:
            self.on_stopped(event.uuid)
        elif event.kind is hypervisor.EventKind.RECONNECTED:
            self.on_reconnected()

    def connect(self) -> None:
        self.hypervisor.connect()
        self.hypervisor.ensure_network(factory_network(self.settings))

    def close(self) -> None:
        self.hypervisor.close()

    # -- machines ------------------------------------------------------------------------------

    def create(self, machine: Machine, machinetype: Machinetype, settings: Settings,
               directory: Path) -> None:
        """Make the machine's disks, describe its domain (policy in vac.backends.vm.domain) and
        start it."""
        image = self.root_image(machinetype) if machinetype.root_image else None
        machine_disks = disks.prepare_disks(settings, machinetype, machine,
                                            str(directory / "disks"),
                                            str(image) if image is not None else None)
        self.hypervisor.create(machine_domain_spec(machine, machinetype, settings,
                                                   str(directory), machine_disks))

    def stop(self, uuid: str) -> None:
        """ACPI shutdown: the guest powers itself off."""
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

    def list_machines(self) -> list[BackendMachine]:
        return [BackendMachine(uuid=domain.uuid, name=domain.name, active=domain.active,
                               cpu_seconds=domain.cpu_seconds)
                for domain in self.hypervisor.list_domains()]

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

    def release(self, machine: Machine, settings: Settings, directory: Path) -> None:
        """Remove the machine's disks (files, and its logical volume if any). Idempotent."""
        if settings.volume_group:
            deadline = time.monotonic() + LV_RELEASE_WAIT_SECONDS
            while self.hypervisor.is_active(machine.uuid) and time.monotonic() < deadline:
                time.sleep(LV_RELEASE_POLL_SECONDS)
        disks.release_disks(settings, machine, str(directory / "disks"))
        self.forget(machine.uuid)

    def forget(self, uuid: str) -> None:
        """Drop the kept final CPU reading: the domain is transient, libvirt keeps nothing."""
        with self._final_lock:
            self._final_cpu.pop(uuid, None)
