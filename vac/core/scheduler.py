"""The pure planner: from a snapshot of this factory and its space to an ordered list of actions.

Nothing here touches a clock, a file, a socket or a logger: ``Snapshot.now`` is the time, and the
daemon logs ``Create/Shutdown/LowerDeadline.reason`` and ``Plan.notes``.

Rules (REFERENCE.md §2.5, §3.3-3.6, with the documented intent where the classic code is broken):

* Supervision of RUNNING machines, in slot order: a global ``shutdown_time`` earlier than a
  machine's deadline lowers it; a machine past its (lowered) deadline is shut down without a
  message; otherwise heartbeat enforcement may shut it down with a ``700`` message.
* Creation, unless vetoed (load, ``shutdown_time`` passed, draining, no free processors, under
  1 GiB free in the state directory, no free slot, ``max_creating`` machines already creating):
  machinetypes with ``target_share > 0`` are scored space-wide (running HS06 / share, summed over
  all reports; the group score sums its members' scores); those in backoff after an abort, with
  too little time before ``shutdown_time``, or whose work is unproven and already have
  ``max_probes`` young VMs, are not eligible; the rest are ranked by (group score, score, random
  tie-break) and placed with the superslot rules of §3.5. Several machines may be planned at once;
  each one planned counts immediately in the scores, the probe count and the superslots.

Every plan also says when it may next change with time alone (``Plan.wake_at``): the daemon
sleeps until then instead of polling, and enforces deadlines within a second.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping
from typing import Optional, Union

from vac.core.config import Config, Machinetype
from vac.core.model import Finish, Machine, MachineState, MachinetypeReport, is_abort, shutdown_code

MIB = 1 << 20
MIN_STATE_DIR_FREE_BYTES = 1 << 30  # admin guide: no new machines with under 1 GiB free
LOAD_CHECK_MIN_PROCESSORS = 4  # classic: load is compared with running processors above this
FUTURE_ABORT_TOLERANCE_SECONDS = 300.0  # peers' clocks may be a little ahead, not hours
MAX_SHUTDOWN_MESSAGE_CHARS = 200  # VM-written text travels in VacQuery datagrams
DEFAULT_HS06_PER_PROCESSOR = 1.0
HEARTBEAT_NOT_CREATED = "700 Heartbeat file not created"
HEARTBEAT_NOT_UPDATED = "700 Heartbeat file not updated"
BACKOFF_REASON = " in backoff until "  # after the machinetype's name, in Standing.blocked_by

# States whose machines use processors and count as running in reports and superslots.
ACTIVE_STATES = frozenset({MachineState.CREATING, MachineState.RUNNING, MachineState.STOPPING})


@dataclasses.dataclass(frozen=True)
class HostFacts:
    processors: int
    load_averages: tuple[float, float, float]
    state_dir_free_bytes: int
    free_memory_bytes: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    config: Config
    machines: tuple[Machine, ...]  # this factory's machines occupying slots
    num_slots: int
    host: HostFacts
    reports: tuple[MachinetypeReport, ...]  # all factories of the space, this one included
    heartbeat_mtimes: Mapping[str, Optional[float]]  # uuid -> mtime of the heartbeat file
    now: float
    daemon_started: float


@dataclasses.dataclass(frozen=True)
class Create:
    machinetype: str
    slot: int
    processors: int
    deadline: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Shutdown:
    uuid: str
    reason: str
    shutdown_message: Optional[str]  # to record if the machine did not write its own


@dataclasses.dataclass(frozen=True)
class LowerDeadline:
    uuid: str
    deadline: float
    reason: str


Action = Union[Create, Shutdown, LowerDeadline]


@dataclasses.dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    notes: tuple[str, ...]  # why nothing (more) was created, backoffs, ignored input
    # The earliest moment from ``Snapshot.now`` on at which the plan may differ with nothing but
    # the time changing; None if never. The rules compare with ">", so wake just after it.
    wake_at: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Standing:
    """The space-wide position of one machinetype with ``target_share > 0``."""

    machinetype: str
    machinegroup: str
    score: float  # running HS06 / target_share, summed over the space
    group_score: float  # sum of the scores of the group's members
    num_before_fizzle: int  # VMs starting or younger than fizzle_seconds, space-wide
    proven: bool  # some VM of this type is running past fizzle_seconds somewhere
    last_abort_time: Optional[float]
    last_abort_message: Optional[str]
    last_abort_factory: Optional[str]
    blocked_by: Optional[str]  # why it may not be created now; None if eligible


def clock(timestamp: float) -> str:
    """Local wall-clock time of ``timestamp`` for log text."""
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


# ---------------------------------------------------------------------------------------------
# Reports, finishes, accounting


def machine_hs06(machine: Machine, hs06_per_processor: Optional[float]) -> float:
    """HS06 of a machine: its recorded value, else processors × hs06_per_processor (default 1)."""
    if machine.hs06 is not None:
        return machine.hs06
    return machine.processors * (hs06_per_processor or DEFAULT_HS06_PER_PROCESSOR)


def _is_young(machine: Machine, fizzle_seconds: float, now: float) -> bool:
    """Starting, or running for less than fizzle_seconds: no proof yet that work exists."""
    if machine.state == MachineState.CREATING or machine.started is None:
        return True
    return now - machine.started < fizzle_seconds


def local_machinetype_reports(
    config: Config,
    machines: tuple[Machine, ...],
    finishes: Mapping[str, Finish],
    factory: str,
    now: float,
) -> tuple[MachinetypeReport, ...]:
    """This factory's report on every configured machinetype (VacQuery machinetype_status)."""
    hs06_per_processor = config.settings.hs06_per_processor
    reports = []
    for name, machinetype in config.machinetypes.items():
        active = [m for m in machines if m.machinetype == name and m.state in ACTIVE_STATES]
        finish = finishes.get(name)
        reports.append(
            MachinetypeReport(
                factory=factory,
                machinetype=name,
                running_hs06=sum(machine_hs06(m, hs06_per_processor) for m in active),
                running_machines=len(active),
                running_processors=sum(m.processors for m in active),
                num_before_fizzle=sum(
                    1 for m in active if _is_young(m, machinetype.fizzle_seconds, now)
                ),
                shutdown_message=finish.shutdown_message if finish else None,
                shutdown_time=finish.finished_time if finish else None,
                shutdown_machine=finish.machine_name if finish else None,
                fqan=machinetype.accounting_fqan,
                max_wallclock_seconds=machinetype.max_wallclock_seconds,
                max_processors=machinetype.max_processors,
            )
        )
    return tuple(reports)


def _ran_seconds(machine: Machine, now: float) -> float:
    """How long the machine ran: started until finished (or now); 0 if it never started."""
    if machine.started is None:
        return 0.0
    end = machine.finished if machine.finished is not None else now
    return max(0.0, end - machine.started)


def finish_message(
    machine: Machine, machinetype: Optional[Machinetype], vm_message: Optional[str], now: float
) -> Optional[str]:
    """The shutdown message to record for a finished machine.

    The VM's own message (first line, bounded) if it starts with a three-digit code; else, if the
    machine ran less than ``fizzle_seconds`` (never starting counts as 0 s), the fizzle abort
    ``300 Vac detects fizzle after N seconds`` so that backoff applies; else None.
    """
    if vm_message is not None:
        first_line = vm_message.strip().split("\n", 1)[0].rstrip()
        if shutdown_code(first_line) is not None:
            return first_line[:MAX_SHUTDOWN_MESSAGE_CHARS]
    if machinetype is None:
        return None
    ran = _ran_seconds(machine, now)
    if ran < machinetype.fizzle_seconds:
        return f"300 Vac detects fizzle after {int(ran)} seconds"
    return None


def should_account(machine: Machine, machinetype: Machinetype, now: float) -> bool:
    """An APEL record is due only for a machine that ran at least fizzle_seconds (one of a
    machinetype no longer configured is never accounted: lifecycle.finish_steps)."""
    return machine.started is not None and _ran_seconds(machine, now) >= machinetype.fizzle_seconds


# ---------------------------------------------------------------------------------------------
# Space-wide standings


def _report_problem(report: MachinetypeReport) -> str:
    """Why a report that failed the plausibility check in _Space cannot be used."""
    if not 0.0 <= report.running_hs06 < math.inf:
        return f"running_hs06={report.running_hs06!r}"
    if report.running_machines < 0 or report.num_before_fizzle < 0:
        return (
            f"running_machines={report.running_machines} "
            f"num_before_fizzle={report.num_before_fizzle}"
        )
    return f"shutdown_time={report.shutdown_time!r}"


class _Space:
    """Sums over the space's reports per machinetype; planned creations are added as they go."""

    def __init__(self, config: Config, reports: tuple[MachinetypeReport, ...], now: float):
        self.settings = config.settings
        self.now = now
        self.types = {n: mt for n, mt in config.machinetypes.items() if mt.target_share > 0}
        self.young = dict.fromkeys(self.types, 0)
        self.proven: set[str] = set()
        self.abort: dict[str, MachinetypeReport] = {}
        self.notes: list[str] = []
        self.future_aborts: list[float] = []  # when ignored future aborts become believable
        self._sum_reports(reports)
        # Eligibility changes only for a machinetype that gets a machine planned.
        self.blocked = {name: self._why_blocked(name) for name in self.types}
        self.group_score: dict[str, float] = {}
        for name, machinetype in self.types.items():
            group = machinetype.effective_machinegroup
            self.group_score[group] = self.group_score.get(group, 0.0) + self.score[name]

    def _sum_reports(self, reports: tuple[MachinetypeReport, ...]) -> None:
        # The hot loop of the planner (thousands of reports): locals, one chained check.
        hs06_sums = dict.fromkeys(self.types, 0.0)
        young = self.young
        factories_seen: dict[str, set[str]] = {name: set() for name in hs06_sums}
        abort_messages: dict[str, bool] = {}  # the same few messages recur in many reports
        inf = math.inf
        for report in reports:
            name = report.machinetype
            seen = factories_seen.get(name)
            if seen is None:
                continue
            if report.factory in seen:
                self.notes.append(f"ignored duplicate report from {report.factory} on {name}")
                continue
            seen.add(report.factory)
            hs06 = report.running_hs06
            running = report.running_machines
            num_before_fizzle = report.num_before_fizzle
            when = report.shutdown_time
            if not (
                0.0 <= hs06 < inf  # also false for NaN
                and running >= 0
                and num_before_fizzle >= 0
                and (when is None or -inf < when < inf)
            ):
                problem = _report_problem(report)
                self.notes.append(f"ignored report from {report.factory} on {name}: {problem}")
                continue
            hs06_sums[name] += hs06
            young[name] += num_before_fizzle
            if running > num_before_fizzle:
                self.proven.add(name)
            message = report.shutdown_message
            if message is not None and when is not None:
                aborted = abort_messages.get(message)
                if aborted is None:
                    aborted = abort_messages[message] = is_abort(message)
                if aborted:
                    self._note_abort(report)
        self.score = {name: hs06_sums[name] / mt.target_share for name, mt in self.types.items()}

    def _note_abort(self, report: MachinetypeReport) -> None:
        if report.shutdown_time > self.now + FUTURE_ABORT_TOLERANCE_SECONDS:
            self.future_aborts.append(report.shutdown_time - FUTURE_ABORT_TOLERANCE_SECONDS)
            self.notes.append(
                f"ignored abort time {clock(report.shutdown_time)} in the future in report "
                f"from {report.factory} on {report.machinetype}"
            )
            return
        latest = self.abort.get(report.machinetype)
        if latest is None or report.shutdown_time > latest.shutdown_time:
            self.abort[report.machinetype] = report

    def add_planned(self, name: str, hs06: float) -> None:
        """A machine planned now runs from now on and is young until it passes fizzle_seconds."""
        machinetype = self.types[name]
        increment = hs06 / machinetype.target_share
        self.score[name] += increment
        self.group_score[machinetype.effective_machinegroup] += increment
        self.young[name] += 1
        self.blocked[name] = self._why_blocked(name)

    def _why_blocked(self, name: str) -> Optional[str]:
        machinetype = self.types[name]
        shutdown_time = self.settings.shutdown_time
        min_wallclock = machinetype.effective_min_wallclock_seconds
        if shutdown_time is not None and not self.now + min_wallclock < shutdown_time:
            return (
                f"{name} needs min_wallclock_seconds={min_wallclock} before "
                f"shutdown_time {clock(shutdown_time)}"
            )
        abort = self.abort.get(name)
        if abort is not None:
            extension = machinetype.fizzle_seconds if self.young[name] > 0 else 0
            until = abort.shutdown_time + machinetype.backoff_seconds + extension
            if not abort.shutdown_time < self.now - machinetype.backoff_seconds - extension:
                why = f"{name}{BACKOFF_REASON}{clock(until)} after '{abort.shutdown_message}'"
                why += f" on {abort.factory}"
                if extension:
                    why += f" (+fizzle_seconds={extension} while {self.young[name]} are young)"
                return why
        max_probes = self.settings.max_probes
        if max_probes > 0 and name not in self.proven and self.young[name] >= max_probes:
            return (
                f"{name} has {self.young[name]} probe VMs starting or younger than "
                f"fizzle_seconds={machinetype.fizzle_seconds} and none older "
                f"(max_probes={max_probes})"
            )
        return None

    def moments(self) -> list[float]:
        """When eligibility may change with time alone: a backoff ends (with or without the
        fizzle extension), an abort from a clock ahead becomes believable, or
        min_wallclock_seconds no longer fits before shutdown_time."""
        found = list(self.future_aborts)
        shutdown_time = self.settings.shutdown_time
        for name, machinetype in self.types.items():
            if shutdown_time is not None:
                found.append(shutdown_time - machinetype.effective_min_wallclock_seconds)
            abort = self.abort.get(name)
            if abort is not None:
                ends = abort.shutdown_time + machinetype.backoff_seconds
                found += [ends, ends + machinetype.fizzle_seconds]
        return found

    def standing(self, name: str) -> Standing:
        abort = self.abort.get(name)
        machinetype = self.types[name]
        return Standing(
            machinetype=name,
            machinegroup=machinetype.effective_machinegroup,
            score=self.score[name],
            group_score=self.group_score[machinetype.effective_machinegroup],
            num_before_fizzle=self.young[name],
            proven=name in self.proven,
            last_abort_time=abort.shutdown_time if abort else None,
            last_abort_message=abort.shutdown_message if abort else None,
            last_abort_factory=abort.factory if abort else None,
            blocked_by=self.blocked[name],
        )

    def ranked(self, tie_breaks: Mapping[str, float]) -> list[Machinetype]:
        """Eligible machinetypes, most starved first."""
        eligible = [mt for name, mt in self.types.items() if self.blocked[name] is None]

        def key(machinetype: Machinetype) -> tuple[float, float, float]:
            name = machinetype.name
            group = self.group_score[machinetype.effective_machinegroup]
            return (group, self.score[name], tie_breaks[name])

        return sorted(eligible, key=key)


def standings(config: Config, reports: tuple[MachinetypeReport, ...], now: float) -> dict:
    """Machinetype name -> Standing, for every machinetype with ``target_share > 0``."""
    space = _Space(config, reports, now)
    return {name: space.standing(name) for name in space.types}


def in_backoff(standing: Standing) -> bool:
    """Whether a machinetype is blocked by backoff after an abort (not by another rule)."""
    return (standing.blocked_by or "").startswith(standing.machinetype + BACKOFF_REASON)


# ---------------------------------------------------------------------------------------------
# Supervision of running machines


def wallclock_deadline(machinetype: Machinetype, start: float, shutdown_time: Optional[float]) -> float:
    """The deadline of a machine of ``machinetype`` created at ``start``: its max_wallclock_seconds
    later, or the space's ``shutdown_time`` if that comes first."""
    deadline = start + machinetype.max_wallclock_seconds
    return deadline if shutdown_time is None else min(deadline, shutdown_time)


def _effective_deadline(machine: Machine, shutdown_time: Optional[float]) -> float:
    """A machine's deadline, or the global shutdown_time if that is earlier."""
    if shutdown_time is not None and shutdown_time < machine.deadline:
        return shutdown_time
    return machine.deadline


def _supervise(machine: Machine, snapshot: Snapshot, notes: list) -> Optional[Action]:
    """At most one action for a RUNNING machine: shut down, or lower its deadline."""
    now = snapshot.now
    deadline = _effective_deadline(machine, snapshot.config.settings.shutdown_time)
    label = f"{machine.name} ({machine.machinetype})"
    if now > deadline:
        return Shutdown(machine.uuid, f"{label} passed its deadline {clock(deadline)}", None)
    heartbeat_message = _heartbeat_failure(machine, snapshot, notes)
    if heartbeat_message is not None:
        return Shutdown(machine.uuid, f"{label}: {heartbeat_message[4:]}", heartbeat_message)
    if deadline < machine.deadline:
        return LowerDeadline(
            machine.uuid, deadline, f"{label} deadline lowered to shutdown_time {clock(deadline)}"
        )
    return None


def _supervision_moments(machine: Machine, snapshot: Snapshot) -> list[float]:
    """When _supervise may decide differently for a RUNNING machine: its deadline passes, its
    heartbeat checks begin (after fizzle_seconds, and as long after vacd started), or its
    heartbeat file falls overdue."""
    found = [_effective_deadline(machine, snapshot.config.settings.shutdown_time)]
    machinetype = snapshot.config.machinetypes.get(machine.machinetype)
    if (machinetype is None or not machinetype.heartbeat_file or machinetype.fizzle_seconds <= 0
            or machine.started is None):
        return found
    found += [machine.started + machinetype.fizzle_seconds,
              snapshot.daemon_started + machinetype.fizzle_seconds]
    mtime = snapshot.heartbeat_mtimes.get(machine.uuid)
    if mtime is not None and machinetype.heartbeat_seconds > 0:
        found.append(mtime + machinetype.heartbeat_seconds)
    return found


def _heartbeat_failure(machine: Machine, snapshot: Snapshot, notes: list) -> Optional[str]:
    machinetype = snapshot.config.machinetypes.get(machine.machinetype)
    if machinetype is None or not machinetype.heartbeat_file or machinetype.fizzle_seconds <= 0:
        return None
    now = snapshot.now
    fizzle = machinetype.fizzle_seconds
    if machine.started is None or not now > machine.started + fizzle:
        return None
    if not now > snapshot.daemon_started + fizzle:
        return None  # grace after a restart: heartbeats could not be received while vacd was down
    if machine.uuid not in snapshot.heartbeat_mtimes:
        notes.append(f"heartbeat of {machine.name} not checked: no file time given")
        return None
    mtime = snapshot.heartbeat_mtimes[machine.uuid]
    if mtime is None:
        return HEARTBEAT_NOT_CREATED
    if machinetype.heartbeat_seconds > 0 and now > mtime + machinetype.heartbeat_seconds:
        return HEARTBEAT_NOT_UPDATED
    return None


# ---------------------------------------------------------------------------------------------
# Creation


def _creation_veto(snapshot: Snapshot, running_processors: int, total: int) -> Optional[str]:
    """Reasons to create nothing at all, in the classic order, then ours."""
    settings = snapshot.config.settings
    host = snapshot.host
    now = snapshot.now
    if not all(math.isfinite(value) for value in host.load_averages):
        return f"no creation: load average unknown {host.load_averages!r}"
    load = max(host.load_averages)
    overload = settings.overload_per_processor
    if running_processors > LOAD_CHECK_MIN_PROCESSORS and load > overload * running_processors:
        return (
            f"no creation: load {load:.2f} > overload_per_processor {overload} × "
            f"{running_processors} running processors"
        )
    if load > overload * host.processors:
        return (
            f"no creation: load {load:.2f} > overload_per_processor {overload} × "
            f"{host.processors} processors"
        )
    if settings.shutdown_time is not None and now >= settings.shutdown_time:
        return f"no creation: shutdown_time {clock(settings.shutdown_time)} has passed"
    if settings.draining:
        return "no creation: draining"
    if running_processors >= total:
        return f"no creation: {running_processors} of {total} processors in use"
    if host.state_dir_free_bytes < MIN_STATE_DIR_FREE_BYTES:
        return (
            f"no creation: {host.state_dir_free_bytes // MIB} MiB free in {settings.state_dir}, "
            f"{MIN_STATE_DIR_FREE_BYTES // MIB} MiB needed"
        )
    return None


@dataclasses.dataclass(frozen=True)
class _Placement:
    machinetype: Machinetype
    processors: int
    deadline: float
    how: str


def _place(
    ranked: list, superslots: Mapping[float, int], free: int, snapshot: Snapshot
) -> Optional[_Placement]:
    """REFERENCE.md §3.5: complete the earliest-ending incomplete superslot, else start one."""
    settings = snapshot.config.settings
    per_superslot = settings.processors_per_superslot
    now = snapshot.now
    for ends in sorted(superslots):
        used = superslots[ends] % per_superslot
        if used == 0:
            continue
        need = min(free, per_superslot - used)
        free -= need  # reserved for this superslot even if nothing fits now
        for machinetype in ranked:
            if (
                need >= machinetype.min_processors
                and machinetype.effective_min_wallclock_seconds
                <= ends - now
                <= machinetype.max_wallclock_seconds
            ):
                processors = min(need, machinetype.max_processors, per_superslot)
                how = f"joins the superslot ending {clock(ends)}"
                return _Placement(machinetype, processors, ends, how)
    if free <= 0:
        return None
    for machinetype in ranked:
        if min(free, per_superslot) >= machinetype.min_processors:
            processors = min(free, machinetype.max_processors, per_superslot)
            return _Placement(machinetype, processors, wallclock_deadline(machinetype, now, settings.shutdown_time),
                              "starts a new superslot")
    return None


def _creation_moments(snapshot: Snapshot, space: _Space, superslots: Mapping[float, int]) -> list:
    """When creation may change with time alone (once no veto stops it): shutdown_time
    arrives, a machinetype's eligibility changes, a local machine grows past fizzle_seconds
    (probes, backoff extension), an incomplete superslot comes within a machinetype's wallclock
    limits or leaves them."""
    settings = snapshot.config.settings
    found = space.moments()
    if settings.shutdown_time is not None:
        found.append(settings.shutdown_time)
    for machine in snapshot.machines:
        machinetype = space.types.get(machine.machinetype)
        if (machinetype is not None and machine.state in ACTIVE_STATES
                and machine.started is not None):
            found.append(machine.started + machinetype.fizzle_seconds)
    if settings.processors_per_superslot > 1:
        for ends in superslots:
            for machinetype in space.types.values():
                found += [ends - machinetype.effective_min_wallclock_seconds,
                          ends - machinetype.max_wallclock_seconds]
    return found


def _plan_creates(snapshot: Snapshot, rng: random.Random, leaving: set, notes: list,
                  moments: list) -> list:
    settings = snapshot.config.settings
    now = snapshot.now
    active = [m for m in snapshot.machines if m.state in ACTIVE_STATES]
    running_processors = sum(m.processors for m in active)
    total = settings.total_processors
    if total is None:
        total = snapshot.host.processors
    veto = _creation_veto(snapshot, running_processors, total)
    if veto:
        notes.append(veto)
        return []
    occupied = {m.slot for m in snapshot.machines}
    free_slots = [slot for slot in range(snapshot.num_slots) if slot not in occupied]
    budget = settings.max_creating - sum(1 for m in active if m.state == MachineState.CREATING)
    superslots: dict[float, int] = {}
    for machine in active:
        if machine.uuid not in leaving:
            # Deadlines beyond shutdown_time are (or will be, once running) lowered to it.
            ends = _effective_deadline(machine, settings.shutdown_time)
            superslots[ends] = superslots.get(ends, 0) + machine.processors
    space = _Space(snapshot.config, snapshot.reports, now)
    notes.extend(space.notes)
    moments.extend(_creation_moments(snapshot, space, superslots))
    tie_breaks = {name: rng.random() for name in space.types}
    free_memory = snapshot.host.free_memory_bytes
    hs06_per_processor = settings.hs06_per_processor or DEFAULT_HS06_PER_PROCESSOR
    creates = []
    ranked_at_all = False  # explain blocked machinetypes only if they were considered
    while True:
        free = total - running_processors
        if free <= 0:
            break
        if not free_slots:
            notes.append(f"no creation: all {snapshot.num_slots} slots occupied")
            break
        if budget <= 0:
            notes.append(f"no more creation now: max_creating={settings.max_creating} reached")
            break
        ranked = space.ranked(tie_breaks)
        ranked_at_all = True
        placement = _place(ranked, superslots, free, snapshot)
        if placement is None:
            if ranked:
                notes.append(f"no creation: no eligible machinetype fits {free} free processors")
            elif not space.types:
                notes.append("no creation: no machinetype has target_share > 0")
            break
        machinetype = placement.machinetype
        needed_memory = placement.processors * settings.mb_per_processor * MIB
        if needed_memory > free_memory:
            notes.append(
                f"no creation: {machinetype.name} needs {needed_memory // MIB} MiB, "
                f"{free_memory // MIB} MiB free"
            )
            break
        standing = space.standing(machinetype.name)
        slot = free_slots.pop(0)
        creates.append(
            Create(
                machinetype=machinetype.name,
                slot=slot,
                processors=placement.processors,
                deadline=placement.deadline,
                reason=(
                    f"{machinetype.name} in slot {slot} with {placement.processors} processors "
                    f"until {clock(placement.deadline)}: {placement.how}; lowest usage "
                    f"(group {standing.machinegroup} {standing.group_score:.2f}, "
                    f"{standing.score:.2f} HS06 per unit of share)"
                ),
            )
        )
        running_processors += placement.processors
        budget -= 1
        free_memory -= needed_memory
        superslots[placement.deadline] = (
            superslots.get(placement.deadline, 0) + placement.processors
        )
        space.add_planned(machinetype.name, placement.processors * hs06_per_processor)
    if ranked_at_all:
        notes.extend(reason for reason in space.blocked.values() if reason is not None)
    return creates


# ---------------------------------------------------------------------------------------------
# The planner


def plan(snapshot: Snapshot, rng: random.Random) -> Plan:
    """Shutdowns and deadline changes for running machines, then the machines to create, and
    when to plan again if nothing else happens."""
    notes: list[str] = []
    actions: list[Action] = []
    leaving: set[str] = set()
    moments: list[float] = []
    for machine in sorted(snapshot.machines, key=lambda m: m.slot):
        if machine.state != MachineState.RUNNING:
            continue
        moments.extend(_supervision_moments(machine, snapshot))
        action = _supervise(machine, snapshot, notes)
        if isinstance(action, Shutdown):
            leaving.add(machine.uuid)
        if action is not None:
            actions.append(action)
    actions.extend(_plan_creates(snapshot, rng, leaving, notes, moments))
    now = snapshot.now
    # Moments in the past were decided on now; a non-finite one (bad input) decides nothing.
    wake_at = min((moment for moment in moments if now <= moment < math.inf), default=None)
    return Plan(actions=tuple(actions), notes=tuple(notes), wake_at=wake_at)
