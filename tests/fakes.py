"""Recording fakes for the adapters (supervisor-style), so the daemon's cycle runs without libvirt."""

from __future__ import annotations

import asyncio
import dataclasses


@dataclasses.dataclass
class FakeDomain:
    uuid: str
    name: str
    active: bool = True
    cpu_seconds: float = 0.0
    is_vac: bool = True

    @property
    def state(self):
        from vac.backends.vm.hypervisor import DomainState

        return DomainState.RUNNING if self.active else DomainState.SHUTOFF


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeWorks:
    """Stands in for vac.daemon.machines.MachineWorks; records every call in ``calls``."""

    instances: list = []
    fail_connects_at_start = 0

    def __init__(self, store, settings, on_stopped, on_reconnected):
        self.store = store
        self.settings = settings
        self.on_stopped = on_stopped
        self.on_reconnected = on_reconnected
        self.domains: dict[str, FakeDomain] = {}
        self.calls: list[tuple] = []
        self.fail_creates = 0
        self.fail_accounts = 0
        self.fail_connects = FakeWorks.fail_connects_at_start
        self.acpi_works = True
        FakeWorks.instances.append(self)

    def connect(self):
        self.calls.append(("connect",))
        if self.fail_connects:
            self.fail_connects -= 1
            from vac.backends.vm.hypervisor import NotConnectedError

            raise NotConnectedError("fake libvirtd is down")

    def check_storage(self):
        if self.settings.volume_group == "missing":
            from vac.backends.vm.disks import DiskError

            raise DiskError("Volume group \"missing\" not found")

    def complete_accounting(self):
        self.calls.append(("complete_accounting",))

    def close(self):
        self.calls.append(("close",))

    def list_domains(self):
        return list(self.domains.values())

    def is_active(self, uuid):
        domain = self.domains.get(uuid)
        return domain is not None and domain.active

    def cpu_seconds(self, uuid):
        """The domain's CPU time, also after it stopped (a kept final reading); None once it
        is forgotten (``vanish``: it ended while vacd could not read it)."""
        domain = self.domains.get(uuid)
        return None if domain is None else domain.cpu_seconds

    def create(self, machine, machinetype, settings):
        self.calls.append(("create", machine.name, machinetype.name, machine.processors))
        self.store.create_machine_dir(machine)
        if self.fail_creates:
            self.fail_creates -= 1
            raise RuntimeError("fake creation failure")
        self.domains[machine.uuid] = FakeDomain(machine.uuid, machine.name)

    def shutdown(self, uuid):
        self.calls.append(("shutdown", uuid))
        if self.acpi_works and uuid in self.domains:
            self.domains[uuid].active = False

    def destroy(self, uuid):
        self.calls.append(("destroy", uuid))
        if uuid in self.domains:
            self.domains[uuid].active = False

    def lower_deadline(self, machine):
        self.calls.append(("lower_deadline", machine.name, machine.deadline))

    def account(self, settings, machinetype, machine, end):
        self.calls.append(("account", machine.uuid, end, machine.cpu_seconds))
        if self.fail_accounts:
            self.fail_accounts -= 1
            raise OSError(28, "No space left on device")

    def release(self, machine, settings):
        self.calls.append(("release", machine.name))

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
