"""Typed VacQuery status records: what a factory reports about its slots, machinetypes and
itself, as the codec encodes and decodes them (REFERENCE.md §2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

from vac.core.model import MachinetypeReport
from vac.core.schema import classic_model_name


@dataclasses.dataclass(frozen=True)
class MachineStatus:
    """One slot of one factory: VacQuery ``machine_status`` in typed form.

    ``factory`` is the name the factory was queried under (or our own name when encoding).
    Times are Unix seconds; empty slots have state ``Shut down`` and no machinetype.
    """

    factory: str
    machine: str
    state: str
    machinetype: Optional[str] = None
    machine_model: Optional[str] = None
    uuid: Optional[str] = None
    created_time: Optional[float] = None
    started_time: Optional[float] = None
    heartbeat_time: Optional[float] = None
    processors: int = 0
    cpu_seconds: float = 0.0
    cpu_percentage: float = 0.0
    hs06: Optional[float] = None
    shutdown_message: Optional[str] = None
    shutdown_time: Optional[float] = None
    fqan: Optional[str] = None

    @classmethod
    def from_machine(cls, factory: str, machine: Any) -> MachineStatus:
        """From a ``vac.core.model.Machine``; the shutdown message only once it has shut down;
        the machine model as Vac 03 names it (podman is reported as docker)."""
        wire_state = machine.state.wire_state
        shut_down = wire_state == "Shut down"
        return cls(
            factory=factory, machine=machine.name, state=wire_state, machinetype=machine.machinetype,
            machine_model=classic_model_name(machine.machine_model), uuid=machine.uuid, created_time=machine.created,
            started_time=machine.started, heartbeat_time=machine.heartbeat,
            processors=machine.processors, cpu_seconds=machine.cpu_seconds,
            cpu_percentage=machine.cpu_percentage,
            hs06=machine.hs06 if machine.hs06 is not None else float(machine.processors),
            shutdown_message=machine.shutdown_message if shut_down else None,
            shutdown_time=machine.shutdown_message_time if shut_down else None, fqan=machine.fqan)

    @classmethod
    def empty_slot(cls, factory: str, machine: str) -> MachineStatus:
        return cls(factory=factory, machine=machine, state="Shut down")


@dataclasses.dataclass(frozen=True)
class FactoryStatus:
    """One factory as a whole: VacQuery ``factory_status`` in typed form (kB, Unix seconds)."""

    factory: str
    running_processors: int = 0
    running_machines: int = 0
    running_hs06: float = 0.0
    max_processors: int = 0
    max_machines: int = 0  # classic: allocatable processors, not slots
    max_hs06: float = 0.0
    root_disk_avail_kb: Optional[int] = None
    root_disk_avail_inodes: Optional[int] = None
    vac_disk_avail_kb: Optional[int] = None
    vac_disk_avail_inodes: Optional[int] = None
    load_average: Optional[float] = None
    kernel_version: Optional[str] = None
    os_issue: Optional[str] = None
    boot_time: Optional[int] = None
    factory_heartbeat_time: Optional[int] = None
    responder_heartbeat_time: Optional[int] = None
    mjf_heartbeat_time: Optional[int] = None
    metadata_heartbeat_time: Optional[int] = None
    swap_used_kb: Optional[int] = None
    swap_free_kb: Optional[int] = None
    mem_used_kb: Optional[int] = None
    mem_total_kb: Optional[int] = None
    version: Optional[str] = None  # decoded only: the peer's Vac version ("03.01")
    site: Optional[str] = None  # decoded only


@dataclasses.dataclass(frozen=True)
class StatusSnapshot:
    """What the responder reports; built by the daemon, which caches it between changes."""

    machines: Sequence[MachineStatus]
    machinetypes: Sequence[MachinetypeReport]
    factory: FactoryStatus


StatusRecord = Union[MachineStatus, MachinetypeReport, FactoryStatus]
