"""Slot and machine records, life-cycle states, and the slot naming/addressing plan.

Pure: no I/O. The addressing plan (ARCHITECTURE.md §5) is shared by the hypervisor adapter
(MACs, DHCP entries), the metadata services (source IP -> slot) and VacQuery (machine names).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from typing import Optional

NETWORK_PREFIX = 16
CLASSIC_SLOTS = 253  # slots 0..252 live in 169.254.169.0/24, as in the classic plan
MAX_SLOTS = CLASSIC_SLOTS + (254 - 170 + 1) * 256


class SlotAddressError(ValueError):
    """An ordinal or address outside the slot plan."""


def slot_ip(ordinal: int) -> str:
    """IPv4 address of slot ``ordinal``: 169.254.169.N for N < 253, then 169.254.170.0 upwards."""
    if not 0 <= ordinal < MAX_SLOTS:
        raise SlotAddressError(f"slot ordinal {ordinal} outside 0..{MAX_SLOTS - 1}")
    if ordinal < CLASSIC_SLOTS:
        return f"169.254.169.{ordinal}"
    rest = ordinal - CLASSIC_SLOTS
    return f"169.254.{170 + rest // 256}.{rest % 256}"


def slot_for_ip(address: str) -> Optional[int]:
    """The slot ordinal owning ``address``, or None if it is not a slot address."""
    try:
        octets = [int(part) for part in str(ipaddress.IPv4Address(address)).split(".")]
    except ValueError:
        return None
    if octets[0] != 169 or octets[1] != 254:
        return None
    if octets[2] == 169:
        return octets[3] if octets[3] < CLASSIC_SLOTS else None
    if 170 <= octets[2] <= 254:
        return CLASSIC_SLOTS + (octets[2] - 170) * 256 + octets[3]
    return None


def slot_mac(ordinal: int) -> str:
    """MAC of slot ``ordinal``: 56:4d followed by the four octets of its IP in hex."""
    octets = [int(part) for part in slot_ip(ordinal).split(".")]
    return "56:4d:" + ":".join(f"{octet:02x}" for octet in octets)


def slot_name(factory_name: str, ordinal: int) -> str:
    """Machine name of slot ``ordinal``: ``host-NN.domain`` (``%02d``, three digits from 100)."""
    host, _, domain = factory_name.partition(".")
    name = f"{host}-{ordinal:02d}"
    return f"{name}.{domain}" if domain else name


class MachineState(str, enum.Enum):
    """Life-cycle states of a machine inside vacd (ARCHITECTURE.md §4)."""

    CREATING = "creating"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHING = "finishing"
    FINISHED = "finished"

    @property
    def wire_state(self) -> str:
        """The classic state word VacQuery peers expect."""
        return {
            MachineState.CREATING: "Starting",
            MachineState.RUNNING: "Running",
            MachineState.STOPPING: "Running",
            MachineState.FINISHING: "Shut down",
            MachineState.FINISHED: "Shut down",
        }[self]

# The legal changes of a machine's state (ARCHITECTURE.md §4). CREATING -> FINISHING is a failed
# creation or a machine a restart found never started; RUNNING -> FINISHING one that ended by
# itself; STOPPING -> FINISHING one vac stopped.
TRANSITIONS: dict[MachineState, frozenset[MachineState]] = {
    MachineState.CREATING: frozenset({MachineState.RUNNING, MachineState.FINISHING}),
    MachineState.RUNNING: frozenset({MachineState.STOPPING, MachineState.FINISHING}),
    MachineState.STOPPING: frozenset({MachineState.FINISHING}),
    MachineState.FINISHING: frozenset({MachineState.FINISHED}),
    MachineState.FINISHED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change the table does not allow; the machine keeps its state."""


@dataclasses.dataclass(frozen=True)
class Machine:
    """Everything vacd knows about one machine; persisted by the store as JSON.

    Times are Unix seconds (floats allowed). ``deadline`` is the machine's shutdown time
    (MJF ``shutdowntime``/``shutdowntime_job``); ``started`` is None until the domain runs.
    """

    uuid: str
    name: str
    slot: int
    machinetype: str
    machine_model: str
    processors: int
    created: float
    deadline: float
    state: MachineState = MachineState.CREATING
    started: Optional[float] = None
    heartbeat: Optional[float] = None
    finished: Optional[float] = None
    cpu_seconds: float = 0.0
    cpu_percentage: float = 0.0
    hs06: Optional[float] = None
    fqan: Optional[str] = None
    shutdown_message: Optional[str] = None
    shutdown_message_time: Optional[float] = None
    stop_requested: Optional[float] = None
    accounted: bool = False

    @property
    def directory_name(self) -> str:
        """The classic machine directory name, ``<created>_<machinetype>_<name>``."""
        return f"{int(self.created)}_{self.machinetype}_{self.name}"

    @property
    def ip(self) -> str:
        return slot_ip(self.slot)

    @property
    def mac(self) -> str:
        return slot_mac(self.slot)

    def replace(self, **changes) -> Machine:
        """This machine with other field values; its state changes only through ``transition``."""
        if "state" in changes:
            raise TypeError("a machine's state changes only through Machine.transition")
        return dataclasses.replace(self, **changes)

    def transition(self, state: MachineState, **changes) -> Machine:
        """This machine in ``state`` (with ``changes``); IllegalTransition unless TRANSITIONS
        allows going there from its current state."""
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.name} ({self.uuid}): {self.state.value} -> "
                                    f"{state.value} is not a legal transition")
        return dataclasses.replace(self, state=state, **changes)

    def with_cpu_reading(self, seconds: float, now: float) -> Machine:
        """This running machine after a reading of its CPU time at ``now``.

        CPU time is the maximum of all readings: a reading of a dying domain can come back short
        or as 0 (libvirt fakes 0 once QEMU's /proc entry is gone). ``cpu_percentage`` is the CPU
        used since the previous reading, whose time ``heartbeat`` records (classic: last seen
        running).
        """
        cpu = max(self.cpu_seconds, seconds)
        elapsed = now - self.heartbeat if self.heartbeat is not None else 0.0
        percentage = 100.0 * (cpu - self.cpu_seconds) / elapsed if elapsed > 0 else 0.0
        return self.replace(cpu_seconds=cpu, cpu_percentage=percentage, heartbeat=now)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Machine:
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in fields}
        values["state"] = MachineState(values.get("state", MachineState.CREATING.value))
        return cls(**values)


def shutdown_code(message: Optional[str]) -> Optional[int]:
    """The three-digit code of a shutdown message ``"NNN text"``, or None if it has none."""
    if not message or len(message) < 3 or not message[:3].isdigit():
        return None
    return int(message[:3])


def is_abort(message: Optional[str]) -> bool:
    """Classic rule (REFERENCE.md §5): any code >= 300 is an abort that triggers backoff."""
    code = shutdown_code(message)
    return code is not None and code >= 300


@dataclasses.dataclass(frozen=True)
class Finish:
    """The most recent finished machine of a machinetype on one factory (drives backoff)."""

    machinetype: str
    machine_name: str
    shutdown_message: Optional[str]
    finished_time: float


@dataclasses.dataclass(frozen=True)
class MachinetypeReport:
    """One factory's report on one machinetype: VacQuery ``machinetype_status`` in typed form.

    Produced locally for this factory (scheduler) and decoded from peers (vacquery); consumed by
    the planner and encoded by the responder.
    """

    factory: str
    machinetype: str
    running_hs06: float = 0.0
    running_machines: int = 0
    running_processors: int = 0
    num_before_fizzle: int = 0
    shutdown_message: Optional[str] = None
    shutdown_time: Optional[float] = None
    shutdown_machine: Optional[str] = None
    fqan: Optional[str] = None
    max_wallclock_seconds: Optional[int] = None
    max_processors: Optional[int] = None
