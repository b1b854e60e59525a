"""vcycle's pure planner: one space's cloud listing, records and quota to a list of actions.

Nothing here touches a cloud, a file or a clock: ``SpaceSnapshot.now`` is the time and vcycled
has vac's executor (vac.daemon.executor) apply the ``Plan``: creations and deadline changes are
vac's planner's actions, a machine that ended is finished by the executor with vac's finish steps
(vac.core.lifecycle.finish_steps), and its cloud backend deletes it as it releases it. Shares, backoff (with its fizzle extension) and the finish decisions are
vac's planner's (vac.core.scheduler), fed with this space's machines as one factory's reports;
what differs on a cloud is here (VCYCLE.md §4):

* Capacity is a quota: ``processors_limit`` of the space, else the cloud's core limit (whose use
  counts foreign servers too); a cloud with neither creates only machinetypes bounded by their own
  ``processors_limit`` or ``max_machines`` (classic Vcycle crashed instead). Per machinetype:
  ``processors_limit`` and ``max_machines`` over machines in any state, ``max_starting_processors``
  over those starting. Each cycle creates at most a tenth of the limit's processors (classic),
  or ``max_creations`` machines, each planned at ``min_processors`` (the flavor decides).
* Deletion, at most once per ``DELETE_RETRY_SECONDS`` per machine, with the classic messages:
  never started within ``START_TIMEOUT_SECONDS``, past ``max_wallclock_seconds`` since it
  started, heartbeat stopped (only with both heartbeat options, after fizzle and as long after
  vcycled started, since the HTTPS service could receive nothing while it was down), past the
  space's ``shutdown_time``.
* A machine seen ended (Shut down, Failed, Deleting) or gone from the listing is finished once:
  its message is the machine's own, else ours (a ``700``), else the fizzle rule; ``300``-``699``
  is an abort (backoff); ``700`` never is (classic Vcycle, ``is_abort``). A preemptible
  machinetype's machine that the cloud reclaimed (shut down by the cloud, not by itself, within
  its ``grace_seconds`` of the cloud's notice) is no abort either: it gets ``PREEMPTED``.
* Take-over: a machine listed with a configured machinetype and no record (its vcycled died
  with its state, or it is a classic machine) is adopted, then supervised like the others. A
  machine another vcycled host created (its ``manager``) counts towards the quota and shares
  but is left to that host, until it has outlived what a live manager would allow it by
  ``TAKEOVER_SECONDS``: then that manager is taken to be gone and the machine is adopted.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Optional, Union

from vac.core import scheduler
from vac.core.cloud import CloudState, creation_budget
from vac.core.config import Config, Settings
from vac.core.lifecycle import DestroyZombie, MarkGone
from vac.core.model import Finish, Machine, MachineState, shutdown_code
from vac.core.scheduler import Create, LowerDeadline
from vac.core.vcycleconfig import CloudMachinetype, Space

START_TIMEOUT_SECONDS = 3600  # classic: a machine not running an hour after creation failed
DELETE_RETRY_SECONDS = 3600  # classic: at most one delete attempt an hour
TAKEOVER_SECONDS = 3600  # classic: another manager's machines are taken over after its silence
LISTING_GRACE_SECONDS = 300  # a machine just created may not be listed yet (EC2 is eventually consistent)
DEFAULT_BUDGET_PROCESSORS = 10  # creations per cycle where no limit gives a tenth
MACHINE_MODEL = "cloud"  # Machine.machine_model of vcycle's records

FAILED_TO_START = "700 Failed to start"
EXCEEDED_WALLCLOCK = "700 Exceeded max_wallclock_seconds"
PASSED_SHUTDOWNTIME = "700 Passed shutdowntime"
PREEMPTED = "200 Preempted by the cloud"  # a code of its own: neither an abort nor a fizzle
HEARTBEAT_NOT_UPDATED = scheduler.HEARTBEAT_NOT_UPDATED
HEARTBEAT_NOT_CREATED = scheduler.HEARTBEAT_NOT_CREATED


@dataclasses.dataclass(frozen=True)
class Listed:
    """One vcycle machine of this space as the cloud lists it (the backends' CloudMachine)."""

    uuid: str
    name: str
    state: CloudState
    machinetype: Optional[str] = None
    processors: Optional[int] = None
    created: Optional[float] = None
    started: Optional[float] = None
    updated: Optional[float] = None
    address: Optional[str] = None  # for the heartbeat lists
    manager: Optional[str] = None  # the vcycled host that created it; None: unknown (classic)


@dataclasses.dataclass(frozen=True)
class SpaceSnapshot:
    space: Space
    factory: str  # this vcycled's host name (reports, records)
    listed: tuple[Listed, ...]
    records: Mapping[str, Machine]  # uuid -> record, finished ones included while listed
    finishes: Mapping[str, Finish]  # machinetype -> its latest abort
    heartbeats: Mapping[str, Optional[float]]  # uuid -> heartbeat file mtime, None if absent
    last_seen: Mapping[str, float]  # uuid -> when it was last listed active
    cloud_limit: Optional[int]  # the cloud's core limit, None if it has none
    cloud_used: Optional[int]  # cores in use in the tenancy (foreign servers too), if known
    now: float
    daemon_started: float


@dataclasses.dataclass(frozen=True)
class Delete:
    uuid: str
    name: str
    message: Optional[str]  # recorded for the finish unless the machine wrote its own
    reason: str


@dataclasses.dataclass(frozen=True)
class Reclaimed:
    """A preemptible machine the cloud stopped or removed, its grace period over: finished at
    ``end`` with ``PREEMPTED`` unless it wrote its own message."""

    uuid: str
    end: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Started:
    """First sight running of a machine recorded as creating (vcycled restarted while it was
    being created): RUNNING from ``started``, with the flavor's processors when the cloud says."""

    uuid: str
    started: float
    processors: int


@dataclasses.dataclass(frozen=True)
class Adopt:
    """A listed machine without a record: take it over with this record."""

    machine: Machine
    reason: str


# The life cycle's actions: ``MarkGone`` for a machine that ended (the cloud shows it stopped,
# or it is gone), which the executor then finishes and accounts, its backend deleting it from
# the cloud as it releases it; ``DestroyZombie`` for a finished machine the cloud still lists
# (deleted again at most hourly), its backend key being the space's name.
Action = Union[Create, Delete, Started, MarkGone, Reclaimed, DestroyZombie, Adopt, LowerDeadline]


@dataclasses.dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    notes: tuple[str, ...]
    standings: Mapping[str, scheduler.Standing]  # machinetype -> its position (status)


def is_abort(message: Optional[str]) -> bool:
    """Classic Vcycle: codes 300 to 699 are aborts; 700 (deleted by vcycle) is not."""
    code = shutdown_code(message)
    return code is not None and 300 <= code <= 699


# ---------------------------------------------------------------------------------------------
# Supervision


def _cloud_type(space: Space, name: str) -> Optional[CloudMachinetype]:
    return space.machinetypes.get(name)


def _deletion(record: Machine, snap: SpaceSnapshot, started: Optional[float]) -> Optional[tuple[str, str]]:
    """(message, reason) if the active machine is to be deleted now; ``started`` is None while
    the cloud lists it as starting."""
    cloud_type = _cloud_type(snap.space, record.machinetype)
    now = snap.now
    label = f"{record.name} ({record.machinetype})"
    if started is None:
        if now > record.created + START_TIMEOUT_SECONDS:
            return FAILED_TO_START, f"{label} not running {START_TIMEOUT_SECONDS} s after creation"
        return None
    if cloud_type is None:
        return None  # machinetype no longer configured: runs to its end, no rules to apply
    machinetype = cloud_type.machinetype
    if now > started + machinetype.max_wallclock_seconds:
        return EXCEEDED_WALLCLOCK, f"{label} ran more than max_wallclock_seconds={machinetype.max_wallclock_seconds}"
    beat = machinetype.heartbeat_seconds
    if machinetype.heartbeat_file and beat > 0 \
            and now > started + max(machinetype.fizzle_seconds, beat) and now > snap.daemon_started + beat \
            and record.uuid in snap.heartbeats:
        mtime = snap.heartbeats[record.uuid]
        if mtime is None:
            return HEARTBEAT_NOT_CREATED, f"{label}: no {machinetype.heartbeat_file} in its joboutputs"
        if now > mtime + beat:
            return HEARTBEAT_NOT_UPDATED, f"{label}: {machinetype.heartbeat_file} older than {beat} s"
    shutdown_time = snap.space.shutdown_time
    if shutdown_time is not None and now > shutdown_time:
        return PASSED_SHUTDOWNTIME, f"{label} passed the space's shutdown_time {scheduler.clock(shutdown_time)}"
    return None


def _may_delete(record: Machine, now: float) -> bool:
    return record.stop_requested is None or now - record.stop_requested >= DELETE_RETRY_SECONDS


def _supervise(snap: SpaceSnapshot, actions: list, notes: list) -> dict[str, Machine]:
    """Actions for every listed and recorded machine; returns the records still active (as they
    will be once the actions are executed), by uuid."""
    now = snap.now
    listed = {machine.uuid: machine for machine in snap.listed}
    active: dict[str, Machine] = {}
    for uuid, record in snap.records.items():
        seen = listed.get(uuid)
        if record.state == MachineState.FINISHED:
            if seen is not None and seen.state != CloudState.DELETING and _may_delete(record, now):
                actions.append(DestroyZombie(snap.space.name, uuid, record.name, True))
            continue
        if record.state == MachineState.FINISHING:
            if seen is not None:
                active[uuid] = record  # being finished: its quota is used until its backend deletes it
            continue
        if seen is None:
            if uuid not in snap.last_seen and now - record.created < LISTING_GRACE_SECONDS:
                active[uuid] = record  # created, not listed yet
                continue
            end = snap.last_seen.get(uuid, record.started or record.created)
            _ended(snap, record, end, f"{record.name} is gone from the cloud", actions)
            continue
        if not seen.state.active:
            # never seen running (stopped between two cycles): its start is the best guess
            end = seen.updated if seen.updated is not None else snap.last_seen.get(uuid, record.started or record.created)
            active[uuid] = record  # still listed: it holds its quota until its finish deletes it
            _ended(snap, record, min(end, now), f"{record.name} is {seen.state.value}", actions)
            continue
        active[uuid] = record
        if record.state == MachineState.STOPPING:
            continue  # being deleted
        if record.state == MachineState.CREATING and seen.state == CloudState.RUNNING:
            started = seen.started if seen.started is not None and seen.started <= now else now
            actions.append(Started(uuid, started, seen.processors or record.processors))
            continue
        started = record.started if seen.state == CloudState.RUNNING else None
        if not _may_delete(record, now):
            continue
        deletion = _deletion(record, snap, started)
        if deletion is not None:
            message, reason = deletion
            actions.append(Delete(uuid, record.name, message, reason))  # uses the quota until gone
            continue
        shutdown_time = snap.space.shutdown_time
        if shutdown_time is not None and shutdown_time < record.deadline:
            actions.append(LowerDeadline(uuid, shutdown_time,
                                         f"{record.name} deadline lowered to shutdown_time "
                                         f"{scheduler.clock(shutdown_time)}"))
    for seen in snap.listed:
        if seen.uuid in snap.records:
            continue
        adopted = _adoption(seen, snap, notes)
        if adopted is None:
            continue
        if seen.manager not in (None, snap.factory) and not _abandoned(seen, adopted, snap):
            notes.append(f"{seen.name} is managed by {seen.manager}: counted, left to it")
            active[adopted.uuid] = adopted  # holds quota and shares, but gets no actions here
            continue
        whose = f"{seen.manager}'s" if seen.manager not in (None, snap.factory) else "without a record here"
        actions.append(Adopt(adopted, f"taking over {seen.name} ({seen.state.value}), {whose}"))
        if adopted.state != MachineState.FINISHED:
            active[adopted.uuid] = adopted
    return active


def _abandoned(seen: Listed, machine: Machine, snap: SpaceSnapshot) -> bool:
    """Whether another vcycled's machine has outlived what that vcycled, were it alive, would
    have allowed it, by TAKEOVER_SECONDS: a stopped machine is deleted at once, one that never
    starts after START_TIMEOUT_SECONDS, a running one at its deadline."""
    if not seen.state.active:
        since = seen.updated or snap.last_seen.get(seen.uuid) or snap.daemon_started
        return snap.now > since + TAKEOVER_SECONDS
    if machine.state == MachineState.CREATING:
        return snap.now > machine.created + START_TIMEOUT_SECONDS + TAKEOVER_SECONDS
    return snap.now > machine.deadline + TAKEOVER_SECONDS


def _ended(snap: SpaceSnapshot, record: Machine, end: float, reason: str, actions: list) -> None:
    """A machine that ended at ``end``: finished, unless it is preemptible and still within the
    grace the cloud gives it (it may yet upload its shutdown message)."""
    cloud_type = _cloud_type(snap.space, record.machinetype)
    if cloud_type is None or not cloud_type.preemptible:
        actions.append(MarkGone(record.uuid, end, reason))
    elif snap.now >= end + (cloud_type.grace_secs or 0):
        actions.append(Reclaimed(record.uuid, end, f"{reason}: preemptible, taken as reclaimed by the cloud"))


def _adoption(seen: Listed, snap: SpaceSnapshot, notes: list) -> Optional[Machine]:
    cloud_type = _cloud_type(snap.space, seen.machinetype or "")
    if cloud_type is None:
        notes.append(f"{seen.name} left alone: machinetype {seen.machinetype or '(none)'} is not "
                     f"configured in space {snap.space.name}")
        return None
    machinetype = cloud_type.machinetype
    created = seen.created if seen.created is not None else snap.now
    started = seen.started if seen.state == CloudState.RUNNING else None
    if seen.state == CloudState.RUNNING and started is None:
        started = snap.now
    processors = seen.processors or machinetype.min_processors
    state = MachineState.RUNNING if started is not None else MachineState.CREATING
    return Machine(uuid=seen.uuid, name=seen.name, slot=0, machinetype=machinetype.name,
                   machine_model=MACHINE_MODEL, processors=processors, created=created,
                   deadline=scheduler.wallclock_deadline(machinetype, created, snap.space.shutdown_time), state=state, started=started,
                   hs06=_hs06(cloud_type, processors), fqan=machinetype.accounting_fqan)


def _hs06(cloud_type: CloudMachinetype, processors: int) -> Optional[float]:
    per = cloud_type.hs06_per_processor
    return per * processors if per is not None else None


# ---------------------------------------------------------------------------------------------
# Creation


def _standings_config(space: Space, factory: str) -> Config:
    """vac's planner sees the space as one factory. Classic Vcycle has no probe limit and
    creates until shutdown_time itself (lowering the machines' deadlines), so neither
    ``max_probes`` nor the min_wallclock rule before ``shutdown_time`` applies."""
    settings = Settings(vac_space=space.name, factory_name=factory, max_probes=0)
    return Config(settings=settings,
                  machinetypes={name: ct.machinetype for name, ct in space.machinetypes.items()})


@dataclasses.dataclass
class _Usage:
    machines: int = 0
    processors: int = 0
    starting_processors: int = 0

    def add(self, machine: Machine, starting: bool) -> None:
        self.machines += 1
        self.processors += machine.processors
        if starting:
            self.starting_processors += machine.processors


def _type_block(cloud_type: CloudMachinetype, usage: _Usage, space_bounded: bool) -> Optional[str]:
    """Why the machinetype's own caps stop one more machine of min_processors, or None."""
    machinetype = cloud_type.machinetype
    need = machinetype.min_processors
    name = machinetype.name
    if cloud_type.processors_limit is not None and usage.processors + need > cloud_type.processors_limit:
        return f"{name} has {usage.processors} of its processors_limit={cloud_type.processors_limit}"
    if cloud_type.max_machines is not None and usage.machines >= cloud_type.max_machines:
        return f"{name} has {usage.machines} of its max_machines={cloud_type.max_machines}"
    starting_cap = cloud_type.max_starting_processors
    if starting_cap is None:
        starting_cap = cloud_type.processors_limit
    if starting_cap is not None and usage.starting_processors + need > starting_cap:
        return f"{name} has {usage.starting_processors} processors starting, max_starting_processors={starting_cap}"
    if not space_bounded and cloud_type.processors_limit is None and cloud_type.max_machines is None:
        return (f"{name} is unbounded: the space has no processors_limit, the cloud no core limit, "
                "and the machinetype neither processors_limit nor max_machines")
    return None


def _plan_creates(snap: SpaceSnapshot, active: dict[str, Machine], rng: random.Random, notes: list
                  ) -> tuple[list[Create], dict]:
    space = snap.space
    now = snap.now
    config = _standings_config(space, snap.factory)
    machines = list(active.values())

    def current_standings() -> dict:
        reports = scheduler.local_machinetype_reports(config, tuple(machines), snap.finishes, snap.factory, now)
        return scheduler.standings(config, reports, now)

    standings = current_standings()
    if space.shutdown_time is not None and now >= space.shutdown_time:
        notes.append(f"no creation: shutdown_time {scheduler.clock(space.shutdown_time)} has passed")
        return [], standings
    limit = space.processors_limit if space.processors_limit is not None else snap.cloud_limit
    ours = sum(machine.processors for machine in machines)
    used = max(ours, snap.cloud_used or 0)
    budget = creation_budget(limit) if limit else DEFAULT_BUDGET_PROCESSORS
    count_cap = space.max_creations
    usage = {name: _Usage() for name in space.machinetypes}
    # Starting: what the cloud lists as starting, and what it does not list yet.
    running = {seen.uuid for seen in snap.listed if seen.state != CloudState.STARTING}
    for machine in machines:
        if machine.machinetype in usage:
            usage[machine.machinetype].add(machine, machine.uuid not in running)
    tie_breaks = {name: rng.random() for name in space.machinetypes}
    creates: list[Create] = []
    blocked: dict[str, str] = {}
    while True:
        if count_cap is not None and len(creates) >= count_cap:
            notes.append(f"no more creation this cycle: max_creations={count_cap}")
            break
        candidates = []
        for name, cloud_type in space.machinetypes.items():
            standing = standings.get(name)
            if standing is None:
                continue  # target_share <= 0
            need = cloud_type.machinetype.min_processors
            why = standing.blocked_by or _type_block(cloud_type, usage[name], limit is not None)
            if why is None and limit is not None and used + need > limit:
                why = f"{name} needs {need} processors: {used} of the limit {limit} in use"
            if why is None and need > budget:
                why = f"{name} needs {need} processors: {budget} left of this cycle's creations"
            if why is not None:
                blocked[name] = why
                continue
            blocked.pop(name, None)
            candidates.append((standing.group_score, standing.score, tie_breaks[name], name))
        if not candidates:
            break
        _, score, _, name = min(candidates)
        cloud_type = space.machinetypes[name]
        machinetype = cloud_type.machinetype
        processors = machinetype.min_processors
        hs06 = _hs06(cloud_type, processors)
        deadline = scheduler.wallclock_deadline(machinetype, now, space.shutdown_time)
        creates.append(Create(name, 0, processors, deadline,
                              f"{name} with {processors} processors: lowest usage "
                              f"({score:.2f} HS06 per unit of share)"))
        planned = Machine(uuid=f"planned-{len(creates)}", name="", slot=0, machinetype=name,
                          machine_model=MACHINE_MODEL, processors=processors, created=now,
                          deadline=deadline, hs06=hs06)
        machines.append(planned)
        usage[name].add(planned, True)
        used += processors
        budget -= processors
        standings = current_standings()
    notes.extend(blocked.values())
    if not space.machinetypes or not standings:
        notes.append("no creation: no machinetype has target_share > 0")
    return creates, standings


# ---------------------------------------------------------------------------------------------
# The planner


def plan(snap: SpaceSnapshot, rng: random.Random) -> Plan:
    """Finishes, starts, deletions and adoptions for the listed and recorded machines, then the
    machines to create."""
    notes: list[str] = []
    actions: list[Action] = []
    active = _supervise(snap, actions, notes)
    creates, standings = _plan_creates(snap, active, rng, notes)
    actions.extend(creates)
    return Plan(tuple(actions), tuple(notes), standings)
