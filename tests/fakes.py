"""Recording fakes for the adapters (supervisor-style), so the daemon's cycle runs without libvirt."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Optional


@dataclasses.dataclass
class FakeDomain:
    """A machine as the fake backend lists it (a vac.backends.base.BackendMachine)."""

    uuid: str
    name: str
    active: bool = True
    cpu_seconds: float = 0.0


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeWorks:
    """Stands in for vac.daemon.machines.MachineWorks *and*, through ``FAKE_BACKENDS``, for
    every machine backend (a MachineBackend); records every call in ``calls``."""

    instances: list = []
    fail_connects_at_start = 0
    kind = "vm"

    def __init__(self, store, settings):
        self.store = store
        self.settings = settings
        self.on_stopped = None
        self.on_reconnected = None
        self.domains: dict[str, FakeDomain] = {}
        self.calls: list[tuple] = []
        self.fail_creates = 0
        self.fail_accounts = 0
        self.fail_connects = FakeWorks.fail_connects_at_start
        self.acpi_works = True
        FakeWorks.instances.append(self)

    def attach(self, on_stopped, on_reconnected) -> FakeWorks:
        self.on_stopped = on_stopped
        self.on_reconnected = on_reconnected
        return self

    # -- the daemon's side (Records) -------------------------------------------------------------

    def check_storage(self):
        if self.settings.volume_group == "missing":
            from vac.backends.vm.disks import DiskError

            raise DiskError("Volume group \"missing\" not found")

    def complete_accounting(self):
        self.calls.append(("complete_accounting",))

    def prepare(self, machine, machinetype, settings):
        return self.store.create_machine_dir(machine)

    def machine_dir(self, machine):
        return self.store.machine_dir(machine)

    def save(self, machine):
        self.store.save(machine)

    def vm_shutdown_message(self, machine):
        return self.store.vm_shutdown_message(machine)

    def write_shutdown_message(self, machine, message):
        self.store.write_file(machine, "joboutputs/shutdown_message", message)

    def last_activity(self, machine):
        self.calls.append(("last_activity", machine.uuid))
        return self.store.last_activity(machine)

    def lower_deadline(self, machine):
        self.calls.append(("lower_deadline", machine.name, machine.deadline))

    def account(self, settings, machinetype, machine, end):
        self.calls.append(("account", machine.uuid, end, machine.cpu_seconds))
        if self.fail_accounts:
            self.fail_accounts -= 1
            raise OSError(28, "No space left on device")

    def save_finish(self, finish):
        self.store.save_finish(finish)

    def release_slot(self, machine):
        self.store.release_slot(machine)

    # -- the backend's side (MachineBackend) -----------------------------------------------------

    def connect(self):
        self.calls.append(("connect",))
        if self.fail_connects:
            self.fail_connects -= 1
            from vac.backends.vm.hypervisor import NotConnectedError

            raise NotConnectedError("fake libvirtd is down")

    def close(self):
        self.calls.append(("close",))

    def list_machines(self):
        return list(self.domains.values())

    def cpu_seconds(self, uuid) -> Optional[float]:
        """The domain's CPU time, also after it stopped (a kept final reading); None once it
        is forgotten (``vanish``: it ended while vacd could not read it)."""
        domain = self.domains.get(uuid)
        return None if domain is None else domain.cpu_seconds

    def create(self, machine, machinetype, settings, directory):
        self.calls.append(("create", machine.name, machinetype.name, machine.processors))
        if self.fail_creates:
            self.fail_creates -= 1
            raise RuntimeError("fake creation failure")
        self.domains[machine.uuid] = FakeDomain(machine.uuid, machine.name)

    def stop(self, uuid):
        self.calls.append(("shutdown", uuid))
        if self.acpi_works and uuid in self.domains:
            self.domains[uuid].active = False
            self.on_stopped(uuid)

    def destroy(self, uuid):
        self.calls.append(("destroy", uuid))
        if uuid in self.domains:
            self.domains[uuid].active = False

    def release(self, machine, settings, directory):
        self.calls.append(("release", machine.name))

    def forget(self, uuid):
        self.calls.append(("forget", uuid))
        self.domains.pop(uuid, None)

    # -- test controls -----------------------------------------------------------------------

    def power_off(self, uuid, *, notify=True):
        self.domains[uuid].active = False
        if notify:
            self.on_stopped(uuid)

    def vanish(self, uuid):
        """The domain ends and disappears without vacd hearing of it or reading its CPU."""
        del self.domains[uuid]

    def named(self, call):
        return [entry for entry in self.calls if entry[0] == call]


def _attach(settings, on_stopped, on_reconnected, works):
    return works.attach(on_stopped, on_reconnected)


# Every backend key of vac.daemon.backends is the factory's one FakeWorks.
FAKE_BACKENDS = {"libvirt": _attach, "engine": _attach, "apptainer": _attach}


async def settle(factory, rounds: int = 50) -> None:
    """Let a Factory's background steps finish and its cycle catch up (at most ``rounds``)."""
    for _ in range(rounds):
        await asyncio.sleep(0)
        if factory.tasks:
            await asyncio.gather(*list(factory.tasks), return_exceptions=True)
        elif not factory.wake.is_set():
            return
        factory.wake.clear()
        await factory.cycle(reconcile=False)
