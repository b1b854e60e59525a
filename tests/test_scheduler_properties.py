"""Properties of the planner over random snapshots, checked against a small independent oracle."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vac.core.config import Config, Machinetype, Settings
from vac.core.model import Machine, MachineState, MachinetypeReport, is_abort
from vac.core.scheduler import ACTIVE_STATES, Create, HostFacts, Shutdown, Snapshot, plan

NOW = 1_700_000_000.0
GIB = 1 << 30
TYPE_NAMES = ("t0", "t1", "t2", "t3")
FACTORIES = ("f0.example.org", "f1.example.org", "f2.example.org")
MESSAGES = (None, "100 Shutdown as requested", "200 Done", "300 No more work", "700 Oops", "bad")
FAST = settings(max_examples=200, deadline=None)


def random_machinetype(rng: random.Random, name: str, per_superslot: int) -> Machinetype:
    min_processors = rng.randint(1, 2 if per_superslot > 1 else 1)
    max_wallclock = rng.choice((3600, 86400))
    return Machinetype(
        name=name,
        target_share=rng.choice((0.0, 0.5, 1.0, 1.0, 2.0, 3.0)),
        machinegroup=rng.choice((None, "g1", "g2")),
        min_processors=min_processors,
        max_processors=rng.randint(min_processors, 8),
        max_wallclock_seconds=max_wallclock,
        min_wallclock_seconds=rng.choice((None, 600, max_wallclock // 2)),
        backoff_seconds=rng.choice((0, 10, 300)),
        fizzle_seconds=rng.choice((0, 60, 600)),
    )


def random_machine(rng: random.Random, slot: int) -> Machine:
    return Machine(
        uuid=f"uuid-{slot}", name=f"f0-{slot:02d}.example.org", slot=slot,
        machinetype=rng.choice(TYPE_NAMES), machine_model="cernvm3",
        processors=rng.choice((1, 1, 1, 2, 4)), created=NOW - 90000,
        deadline=rng.uniform(NOW - 100, NOW + 90000),
        state=rng.choice(list(MachineState)[:4]),
        started=rng.choice((None, rng.uniform(NOW - 90000, NOW))),
    )


def random_report(rng: random.Random, factory: str, machinetype: str) -> MachinetypeReport:
    running = rng.randint(0, 5)
    return MachinetypeReport(
        factory=factory, machinetype=machinetype,
        running_hs06=rng.uniform(0, 100),
        running_machines=running,
        num_before_fizzle=rng.randint(0, running),
        shutdown_message=rng.choice(MESSAGES),
        shutdown_time=rng.choice((None, rng.uniform(NOW - 2000, NOW))),
    )


@st.composite
def snapshots(draw, per_superslot=None) -> Snapshot:
    """A random snapshot from a drawn seed: few draws keep it fast, and uniform choices keep
    most examples past the vetoes, so that creation rules get exercised."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    if per_superslot is None:
        per_superslot = draw(st.sampled_from((1, 2, 4, 8)))
    shutdown_offset = rng.choice((None, None, None, None, -100, 3000, 50000))
    host_processors = rng.randint(1, 16)
    num_slots = rng.randint(1, 16)
    types = [random_machinetype(rng, name, per_superslot)
             for name in TYPE_NAMES[:rng.randint(1, len(TYPE_NAMES))]]
    config = Config(
        settings=Settings(
            vac_space="vac01.example.org",
            factory_name=FACTORIES[0],
            processors_per_superslot=per_superslot,
            total_processors=rng.choice((None, rng.randint(1, host_processors))),
            draining=rng.random() < 0.1,
            shutdown_time=None if shutdown_offset is None else int(NOW) + shutdown_offset,
            max_creating=rng.randint(1, 8),
            max_probes=rng.randint(0, 3),
            hs06_per_processor=rng.choice((None, 10.0)),
        ),
        machinetypes={mt.name: mt for mt in types},
    )
    occupied = rng.sample(range(num_slots), rng.randint(0, num_slots // 2))
    machines = tuple(random_machine(rng, slot) for slot in occupied)
    reports = tuple(
        random_report(rng, factory, mt.name)
        for factory in FACTORIES for mt in types if rng.random() < 0.6
    )
    # Mostly a load the running machines explain; sometimes an overloaded host.
    busy = sum(m.processors for m in machines if m.state in ACTIVE_STATES) or 1
    limit = 2.0 * host_processors if rng.random() < 0.1 else 1.2 * min(busy, host_processors)
    host = HostFacts(
        processors=host_processors,
        load_averages=tuple(rng.uniform(0, limit) for _ in range(3)),
        state_dir_free_bytes=GIB - 1 if rng.random() < 0.1 else 10 * GIB,
        free_memory_bytes=rng.choice((3, 64, 64)) * GIB,
    )
    return Snapshot(config=config, machines=machines, num_slots=num_slots, host=host,
                    reports=reports, heartbeat_mtimes={}, now=NOW, daemon_started=NOW - 86400)


def creates(result) -> list:
    return [action for action in result.actions if isinstance(action, Create)]


class Oracle:
    """Straightforward re-statement of §2.5/§3.3 over the raw reports plus earlier creates."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot
        self.types = {n: m for n, m in snapshot.config.machinetypes.items() if m.target_share > 0}
        self.hs06 = {name: 0.0 for name in self.types}
        self.young = {name: 0 for name in self.types}
        self.proven = set()
        self.last_abort = {}
        for report in snapshot.reports:
            if report.machinetype not in self.types:
                continue
            self.hs06[report.machinetype] += report.running_hs06
            self.young[report.machinetype] += report.num_before_fizzle
            if report.running_machines > report.num_before_fizzle:
                self.proven.add(report.machinetype)
            if is_abort(report.shutdown_message) and report.shutdown_time is not None:
                self.last_abort[report.machinetype] = max(
                    self.last_abort.get(report.machinetype, 0.0), report.shutdown_time
                )

    def add(self, create: Create) -> None:
        per_processor = self.snapshot.config.settings.hs06_per_processor or 1.0
        self.hs06[create.machinetype] += create.processors * per_processor
        self.young[create.machinetype] += 1

    def in_backoff(self, name: str) -> bool:
        mt = self.types[name]
        if name not in self.last_abort:
            return False
        extension = mt.fizzle_seconds if self.young[name] > 0 else 0
        return self.snapshot.now <= self.last_abort[name] + mt.backoff_seconds + extension

    def eligible(self, name: str) -> bool:
        mt = self.types[name]
        settings_ = self.snapshot.config.settings
        if settings_.shutdown_time is not None and not (
            self.snapshot.now + mt.effective_min_wallclock_seconds < settings_.shutdown_time
        ):
            return False
        if self.in_backoff(name):
            return False
        probes = settings_.max_probes
        return not (probes > 0 and name not in self.proven and self.young[name] >= probes)

    def key(self, name: str) -> tuple[float, float]:
        score = {n: self.hs06[n] / mt.target_share for n, mt in self.types.items()}
        group = self.types[name].effective_machinegroup
        group_score = sum(s for n, s in score.items()
                          if self.types[n].effective_machinegroup == group)
        return (group_score, score[name])


@FAST
@given(snapshots())
def test_never_more_processors_or_slots_than_free(snapshot):
    result = plan(snapshot, random.Random(7))
    made = creates(result)
    running = sum(m.processors for m in snapshot.machines if m.state in ACTIVE_STATES)
    total = snapshot.config.settings.total_processors or snapshot.host.processors
    assert sum(c.processors for c in made) <= max(0, total - running)
    occupied = {m.slot for m in snapshot.machines}
    slots = [c.slot for c in made]
    assert len(set(slots)) == len(slots)
    assert all(0 <= slot < snapshot.num_slots and slot not in occupied for slot in slots)
    creating = sum(1 for m in snapshot.machines if m.state == MachineState.CREATING)
    assert len(made) <= max(0, snapshot.config.settings.max_creating - creating)
    per_superslot = snapshot.config.settings.processors_per_superslot
    for create in made:
        mt = snapshot.config.machinetypes[create.machinetype]
        assert mt.min_processors <= create.processors <= min(mt.max_processors, per_superslot)


@FAST
@given(snapshots())
def test_never_creates_in_backoff_or_with_share_zero(snapshot):
    oracle = Oracle(snapshot)
    for create in creates(plan(snapshot, random.Random(7))):
        assert create.machinetype in oracle.types
        assert not oracle.in_backoff(create.machinetype)
        assert oracle.eligible(create.machinetype)
        oracle.add(create)


@FAST
@given(snapshots())
def test_never_creates_while_draining_or_past_shutdown_time(snapshot):
    settings_ = snapshot.config.settings
    made = creates(plan(snapshot, random.Random(7)))
    if settings_.draining or (
        settings_.shutdown_time is not None and snapshot.now >= settings_.shutdown_time
    ):
        assert made == []
    if settings_.shutdown_time is not None:
        assert all(c.deadline <= settings_.shutdown_time for c in made)


@FAST
@given(snapshots(per_superslot=1))
def test_chosen_type_has_the_lowest_group_score_then_score(snapshot):
    oracle = Oracle(snapshot)
    for create in creates(plan(snapshot, random.Random(7))):
        fitting = [n for n in oracle.types if oracle.eligible(n)
                   and oracle.types[n].min_processors <= 1]
        assert create.machinetype in fitting
        best = min(oracle.key(n) for n in fitting)
        chosen = oracle.key(create.machinetype)
        assert chosen[0] <= best[0] + 1e-9 and (
            chosen[0] < best[0] - 1e-9 or chosen[1] <= best[1] + 1e-9
        )
        oracle.add(create)


@FAST
@given(snapshots(), st.integers(0, 2**32))
def test_deterministic_for_a_fixed_seed(snapshot, seed):
    assert plan(snapshot, random.Random(seed)) == plan(snapshot, random.Random(seed))


def decisions(result) -> list:
    """What a plan does, without its reasons and the deadlines of new superslots (now + wallclock)."""
    found = []
    for action in result.actions:
        if isinstance(action, Create):
            found.append(("create", action.machinetype, action.slot, action.processors))
        elif isinstance(action, Shutdown):
            found.append(("shutdown", action.uuid, action.shutdown_message))
        else:
            found.append(("lower", action.uuid, action.deadline))
    return found


@st.composite
def snapshots_with_heartbeats(draw) -> Snapshot:
    """Random snapshots whose machinetypes check heartbeat files of random ages (or none)."""
    snapshot = draw(snapshots())
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    machinetypes = {
        name: dataclasses.replace(mt, heartbeat_file="heartbeat",
                                  heartbeat_seconds=rng.choice((0, 300, 900)))
        for name, mt in snapshot.config.machinetypes.items()
    }
    mtimes = {m.uuid: rng.choice((None, rng.uniform(NOW - 2000, NOW))) for m in snapshot.machines}
    return dataclasses.replace(
        snapshot, config=dataclasses.replace(snapshot.config, machinetypes=machinetypes),
        heartbeat_mtimes=mtimes, daemon_started=rng.choice((NOW - 86400, NOW - 300)))


@FAST
@given(st.one_of(snapshots(), snapshots_with_heartbeats()), st.floats(0.0, 1.0))
def test_no_decision_changes_before_wake_at(snapshot, fraction):
    """Between now and wake_at the plan stays the same: sleeping until then misses nothing."""
    result = plan(snapshot, random.Random(7))
    wake_at = result.wake_at
    if wake_at is None:
        wake_at = NOW + 10 * 86400  # beyond every time in these snapshots
    assert wake_at >= NOW
    moment = NOW + fraction * (wake_at - NOW)
    if not NOW < moment < wake_at:
        return
    later = dataclasses.replace(snapshot, now=moment)
    assert decisions(plan(later, random.Random(7))) == decisions(result)
