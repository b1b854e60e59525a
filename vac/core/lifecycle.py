"""Life-cycle decisions beside the planner: what the daemon does with machines that ended,
vanished, were left behind by a restart, or belong to nobody.

Pure, like the planner: from the model, the backends' listings and ``now`` to *actions*
(``Adopt``, ``MarkGone``, ``RecordCpu``, ``DestroyZombie``, ``Finish``), and from a finishing
machine to its finish steps (``FinishSteps``: which shutdown message, whether to account). The
daemon's executor applies them; the planner (vac.core.scheduler) decides creations and
shutdowns. Nothing here knows which backend runs a machine: listings arrive tagged with an
opaque backend key that actions hand back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Optional, Protocol, Union

from vac.core.config import Machinetype
from vac.core.model import Machine, MachineState
from vac.core.scheduler import finish_message, should_account

# States whose machines a backend should be running.
RUNNING_STATES = frozenset({MachineState.RUNNING, MachineState.STOPPING})
# A finish that failed (disk full, a logical volume still busy) is retried this long after:
# every finish step is idempotent.
FINISH_RETRY_SECONDS = 30.0


class Listed(Protocol):
    """A machine as a backend lists it (vac.backends.base.BackendMachine has these fields)."""

    uuid: str
    name: str
    active: bool
    cpu_seconds: Optional[float]


@dataclasses.dataclass(frozen=True)
class Adopt:
    """A machine recorded as CREATING when vacd stopped runs: it is RUNNING."""

    uuid: str
    reason: str


@dataclasses.dataclass(frozen=True)
class MarkGone:
    """A machine that should run does not (any more): FINISHING, ended at ``end``."""

    uuid: str
    end: float
    reason: str


@dataclasses.dataclass(frozen=True)
class RecordCpu:
    """A reading of a running machine's CPU time, taken by the listing."""

    uuid: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class DestroyZombie:
    """A machine of this factory that no live or last finished machine has: stop it (if it runs)
    and make its backend forget it. ``backend`` is the key its listing came with."""

    backend: str
    uuid: str
    name: str
    active: bool


@dataclasses.dataclass(frozen=True)
class Finish:
    """Finish (account, record, release) a FINISHING machine now."""

    uuid: str


LifecycleAction = Union[Adopt, MarkGone, RecordCpu, DestroyZombie, Finish]


def estimated_end(machine: Machine, activity: Optional[float], now: float) -> float:
    """When a machine found gone ended: its last sign of life (a CPU reading, its start or
    creation, or ``activity``, the newest file it wrote), never after now."""
    seen = [machine.heartbeat or machine.started or machine.created]
    if activity is not None:
        seen.append(activity)
    return min(now, max(seen))


def reconcile(machines: Sequence[Machine], busy: Collection[str],
              listed: Sequence[tuple[str, Listed]], known: Collection[str],
              activity: Mapping[str, Optional[float]], now: float) -> list[LifecycleAction]:
    """Compare the model with what the backends list.

    ``machines`` are the live machines whose backend answered; those in ``busy`` (a create,
    stop or finish in flight) are left to that step. ``listed`` pairs each listed machine with
    its backend's key; ``known`` holds every UUID vac still has a record of in memory (live
    machines and the last finished one of each slot); ``activity`` the newest file time of the
    RUNNING/STOPPING machines not listed active (only those can be found gone). A CREATING machine is only seen here after a restart (creation is
    never in flight across one): adopted if it runs, else finished as never started.
    """
    by_uuid = {item.uuid: item for _, item in listed}
    actions: list[LifecycleAction] = []
    for machine in sorted(machines, key=lambda m: m.slot):
        if machine.uuid in busy:
            continue
        seen = by_uuid.get(machine.uuid)
        label = f"{machine.name} ({machine.machinetype})"
        if machine.state in RUNNING_STATES:
            if seen is None or not seen.active:
                actions.append(MarkGone(machine.uuid, estimated_end(
                    machine, activity.get(machine.uuid), now), f"{label} is no longer running"))
            elif seen.cpu_seconds is not None:
                actions.append(RecordCpu(machine.uuid, seen.cpu_seconds))
        elif machine.state is MachineState.CREATING:
            if seen is not None and seen.active:
                actions.append(Adopt(machine.uuid, f"adopting {machine.name} ({machine.uuid}) "
                                                   "created before a restart"))
            else:
                actions.append(MarkGone(machine.uuid, now,
                                        f"{machine.name} was never started: finishing it"))
    for backend, item in listed:
        if item.uuid not in known:
            actions.append(DestroyZombie(backend, item.uuid, item.name, item.active))
    return actions


def due_finishes(machines: Sequence[Machine], busy: Collection[str],
                 retry_at: Mapping[str, float], now: float) -> list[Finish]:
    """FINISHING machines with no step in flight whose last failed finish (if any) may be
    retried by now."""
    return [Finish(machine.uuid) for machine in sorted(machines, key=lambda m: m.slot)
            if machine.state is MachineState.FINISHING and machine.uuid not in busy
            and retry_at.get(machine.uuid, 0.0) <= now]


@dataclasses.dataclass(frozen=True)
class FinishSteps:
    """What finishing a machine records: ``message`` (None: none), written to its joboutputs
    when ``write_message`` (the machine wrote none itself), and an APEL record when
    ``account``."""

    message: Optional[str]
    write_message: bool
    account: bool


def finish_steps(machine: Machine, machinetype: Optional[Machinetype],
                 vm_message: Optional[str], end: float) -> FinishSteps:
    message = finish_message(machine, machinetype, vm_message, end)
    return FinishSteps(
        message=message, write_message=bool(message) and vm_message is None,
        account=(not machine.accounted and machinetype is not None
                 and should_account(machine, machinetype, end)))


def final_cpu_problem(machine: Machine, reading: Optional[float]) -> Optional[str]:
    """None if ``reading`` (the backend's CPU time at the machine's end) can be used as its
    total; else why the machine keeps its last periodic reading. Readings never lower the
    total: a dying domain's can come back short (libvirt's 0 once QEMU has exited)."""
    if reading is None:
        return "it was gone before it could be read"
    if reading < machine.cpu_seconds:
        return f"the reading came back short, {reading:.0f} s"
    return None
