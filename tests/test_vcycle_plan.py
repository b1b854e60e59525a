"""vcycle's pure planner (vac.core.vcycleplan) with injected time: creation to the quota, shares,
backoff, deletions with the classic 700 messages, finishes and take-over."""

from __future__ import annotations

import dataclasses
import random
from typing import Optional

from vac.core import vcycleplan as vp
from vac.core.cloud import CloudState
from vac.core.config import Machinetype
from vac.core.lifecycle import DestroyZombie, MarkGone
from vac.core.model import Finish, Machine, MachineState
from vac.core.scheduler import LowerDeadline, in_backoff
from vac.core.vcycleconfig import CloudMachinetype, Space

NOW = 1_800_000_000.0
STARTED_LONG_AGO = NOW - 100_000.0  # vcycled has been up for a day


def cloud_type(name: str = "lhcb", share: float = 1.0, **extra) -> CloudMachinetype:
    fields = {key: extra.pop(key) for key in list(extra) if key in {f.name for f in dataclasses.fields(Machinetype)}}
    fields.setdefault("max_processors", 4096)
    machinetype = Machinetype(name=name, target_share=share, backoff_seconds=600, fizzle_seconds=300,
                              user_data="user_data", root_image="image:x", **fields)
    return CloudMachinetype(machinetype, **extra)


def make_space(*types: CloudMachinetype, **options) -> Space:
    types = types or (cloud_type(),)
    return Space(name="cloud.example.org", api="openstack", url="https://keystone.example.org/v3",
                 machinetypes={t.name: t for t in types}, **options)


def record(name: str, machinetype: str = "lhcb", *, state: MachineState = MachineState.RUNNING,
           created: float = NOW - 1000, started: Optional[float] = NOW - 900, processors: int = 1,
           **changes) -> Machine:
    return Machine(uuid=f"uuid-{name}", name=f"vcycle-{machinetype}-{name}", slot=0, machinetype=machinetype,
                   machine_model=vp.MACHINE_MODEL, processors=processors, created=created,
                   deadline=created + 86400, state=state, started=started, **changes)


def listed(machine: Machine, state: CloudState = CloudState.RUNNING, **changes) -> vp.Listed:
    fields = dict(uuid=machine.uuid, name=machine.name, state=state, machinetype=machine.machinetype,
                  processors=machine.processors, created=machine.created, started=machine.started)
    fields.update(changes)
    return vp.Listed(**fields)


def snapshot(space: Space, records=(), listing=(), *, finishes=None, heartbeats=None, last_seen=None,
             cloud_limit: Optional[int] = None, cloud_used: Optional[int] = None, now: float = NOW,
             daemon_started: float = STARTED_LONG_AGO) -> vp.SpaceSnapshot:
    return vp.SpaceSnapshot(space=space, factory="vcycle.example.org", listed=tuple(listing),
                            records={machine.uuid: machine for machine in records},
                            finishes=finishes or {}, heartbeats=heartbeats or {}, last_seen=last_seen or {},
                            cloud_limit=cloud_limit, cloud_used=cloud_used, now=now,
                            daemon_started=daemon_started)


def plan(snap: vp.SpaceSnapshot, seed: int = 1) -> vp.Plan:
    return vp.plan(snap, random.Random(seed))


def of(result: vp.Plan, kind: type) -> list:
    return [action for action in result.actions if isinstance(action, kind)]


# --- creation ------------------------------------------------------------------------------------


def test_creates_a_tenth_of_the_space_limit_per_cycle() -> None:
    result = plan(snapshot(make_space(processors_limit=40)))
    creates = of(result, vp.Create)
    assert len(creates) == 4  # ceil(0.1 × 40)
    assert {c.machinetype for c in creates} == {"lhcb"}
    assert all(c.processors == 1 and c.deadline == NOW + 86400 for c in creates)


def test_the_clouds_core_limit_applies_when_the_space_has_none_and_counts_foreign_use() -> None:
    assert len(of(plan(snapshot(make_space(), cloud_limit=100)), vp.Create)) == 10
    # 97 cores in use in the tenancy (foreign servers included): room for 3
    assert len(of(plan(snapshot(make_space(), cloud_limit=100, cloud_used=97)), vp.Create)) == 3
    full = plan(snapshot(make_space(), cloud_limit=100, cloud_used=100))
    assert of(full, vp.Create) == []
    assert any("100 of the limit 100" in note for note in full.notes)


def test_creation_fills_the_quota_over_cycles_and_stops_there() -> None:
    space = make_space(processors_limit=30, max_creations=2)  # a tenth: 3 processors, but 2 machines
    machines: list[Machine] = []
    for cycle in range(20):
        result = plan(snapshot(space, machines, [listed(m) for m in machines]))
        for number, _create in enumerate(of(result, vp.Create)):
            machines.append(record(f"c{cycle}n{number}", started=NOW - 900))
        assert len(of(result, vp.Create)) == (2 if cycle < 15 else 0)
    assert sum(m.processors for m in machines) == 30


def test_no_limit_anywhere_creates_only_bounded_machinetypes() -> None:
    unbounded = plan(snapshot(make_space(cloud_type())))
    assert of(unbounded, vp.Create) == []
    assert any("unbounded" in note for note in unbounded.notes)
    bounded = plan(snapshot(make_space(cloud_type(max_machines=3))))
    assert len(of(bounded, vp.Create)) == 3


def test_machinetype_caps_processors_machines_and_starting() -> None:
    space = make_space(cloud_type(processors_limit=5, max_starting_processors=2), processors_limit=100)
    starting = [record(f"s{n}", state=MachineState.CREATING, started=None) for n in range(1)]
    result = plan(snapshot(space, starting, [listed(m, CloudState.STARTING) for m in starting]))
    assert len(of(result, vp.Create)) == 1  # 1 starting + 1 = max_starting_processors
    running = [record(f"r{n}") for n in range(4)]
    result = plan(snapshot(space, running, [listed(m) for m in running]))
    assert len(of(result, vp.Create)) == 1  # processors_limit 5
    capped = make_space(cloud_type(max_machines=2), processors_limit=100)
    assert len(of(plan(snapshot(capped)), vp.Create)) == 2


def test_min_processors_is_what_each_creation_spends() -> None:
    space = make_space(cloud_type(min_processors=4, max_processors=8), processors_limit=100)
    creates = of(plan(snapshot(space)), vp.Create)
    assert [c.processors for c in creates] == [4, 4]  # budget 10 processors: two of 4
    assert len(of(plan(snapshot(space, cloud_used=97, cloud_limit=100)), vp.Create)) == 0


def test_two_machinetypes_converge_to_their_target_shares() -> None:
    space = make_space(cloud_type("atlas", 3.0), cloud_type("lhcb", 1.0), processors_limit=40)
    machines: list[Machine] = []
    for cycle in range(12):
        result = plan(snapshot(space, machines, [listed(m) for m in machines]), seed=cycle)
        for number, create in enumerate(of(result, vp.Create)):
            machines.append(record(f"{cycle}-{number}", create.machinetype))
    counts = {name: sum(1 for m in machines if m.machinetype == name) for name in ("atlas", "lhcb")}
    assert counts == {"atlas": 30, "lhcb": 10}


def test_backoff_after_an_abort_and_fizzle_extension() -> None:
    space = make_space(processors_limit=100)
    abort = {"lhcb": Finish("lhcb", "vcycle-lhcb-x", "300 Nothing to do", NOW - 100)}
    result = plan(snapshot(space, finishes=abort))
    assert of(result, vp.Create) == []
    assert any("backoff" in note for note in result.notes)
    assert in_backoff(result.standings["lhcb"])
    # after backoff_seconds (600) one machine may be created; while it is young the backoff is
    # extended by fizzle_seconds (classic), so it is the only one
    later = plan(snapshot(space, finishes=abort, now=NOW + 600))
    assert len(of(later, vp.Create)) == 1
    assert len(of(plan(snapshot(space, finishes=abort, now=NOW + 900)), vp.Create)) == 10
    # within backoff + fizzle while one of its machines is young: still blocked
    young = [record("young", started=NOW + 550)]
    extended = plan(snapshot(space, young, [listed(m) for m in young], finishes=abort, now=NOW + 600))
    assert of(extended, vp.Create) == []


def test_shutdown_time_passed_stops_creation_and_lowers_deadlines() -> None:
    space = make_space(processors_limit=100, shutdown_time=int(NOW + 3600))
    machine = record("a")
    result = plan(snapshot(space, [machine], [listed(machine)]))
    assert of(result, LowerDeadline) == [LowerDeadline(machine.uuid, NOW + 3600, result.actions[0].reason)]
    assert all(c.deadline == NOW + 3600 for c in of(result, vp.Create))
    after = plan(snapshot(space, [machine], [listed(machine)], now=NOW + 3601))
    assert of(after, vp.Create) == []
    assert [d.message for d in of(after, vp.Delete)] == [vp.PASSED_SHUTDOWNTIME]


# --- deletion ------------------------------------------------------------------------------------


def test_never_started_machine_is_deleted_after_an_hour() -> None:
    space = make_space(processors_limit=0)
    young = record("y", state=MachineState.CREATING, started=None, created=NOW - 3000)
    old = record("o", state=MachineState.CREATING, started=None, created=NOW - 3700)
    result = plan(snapshot(space, [young, old], [listed(young, CloudState.STARTING), listed(old, CloudState.STARTING)]))
    assert [(d.uuid, d.message) for d in of(result, vp.Delete)] == [(old.uuid, vp.FAILED_TO_START)]


def test_past_wallclock_is_deleted_with_its_message() -> None:
    space = make_space(cloud_type(max_wallclock_seconds=1000), processors_limit=0)
    machine = record("w", started=NOW - 1001)
    result = plan(snapshot(space, [machine], [listed(machine)]))
    assert [d.message for d in of(result, vp.Delete)] == [vp.EXCEEDED_WALLCLOCK]


def test_heartbeat_rules() -> None:
    space = make_space(cloud_type(heartbeat_file="heartbeat", heartbeat_seconds=600), processors_limit=0)
    machine = record("h", started=NOW - 700)
    listing = [listed(machine)]

    def deletes(heartbeats, **kw) -> list:
        return [d.message for d in of(plan(snapshot(space, [machine], listing, heartbeats=heartbeats, **kw)), vp.Delete)]

    assert deletes({machine.uuid: NOW - 100}) == []
    assert deletes({machine.uuid: NOW - 601}) == [vp.HEARTBEAT_NOT_UPDATED]
    assert deletes({machine.uuid: None}) == [vp.HEARTBEAT_NOT_CREATED]
    assert deletes({}) == []  # not read: not judged
    # vcycled restarted 500 s ago: the HTTPS service received nothing before
    assert deletes({machine.uuid: NOW - 601}, daemon_started=NOW - 500) == []
    # only heartbeat_file set (classic: both needed)
    only_file = make_space(cloud_type(heartbeat_file="heartbeat"), processors_limit=0)
    assert of(plan(snapshot(only_file, [machine], listing, heartbeats={machine.uuid: None})), vp.Delete) == []


def test_delete_is_retried_at_most_hourly() -> None:
    space = make_space(cloud_type(max_wallclock_seconds=1000), processors_limit=0)
    machine = record("w", started=NOW - 2000, stop_requested=NOW - 100)
    assert of(plan(snapshot(space, [machine], [listed(machine)])), vp.Delete) == []
    retried = machine.replace(stop_requested=NOW - 3600)
    assert len(of(plan(snapshot(space, [retried], [listed(retried)])), vp.Delete)) == 1


def test_a_deleting_machine_still_counts_against_the_quota() -> None:
    space = make_space(cloud_type(max_wallclock_seconds=1000), processors_limit=1)
    machine = record("w", started=NOW - 2000)
    result = plan(snapshot(space, [machine], [listed(machine)]))
    assert len(of(result, vp.Delete)) == 1 and of(result, vp.Create) == []


# --- starting, finishing ---------------------------------------------------------------------------


def test_first_sight_running_marks_started_with_the_flavors_processors() -> None:
    space = make_space(processors_limit=0)
    machine = record("s", state=MachineState.CREATING, started=None, created=NOW - 60)
    result = plan(snapshot(space, [machine], [listed(machine, processors=2, started=NOW - 30)]))
    assert of(result, vp.Started) == [vp.Started(machine.uuid, NOW - 30, 2)]
    # vac's executor records a machine it created as running: the cloud's starting state
    # is what the start timeout and max_starting_processors read
    created = record("c", created=NOW - 3700, started=NOW - 3700)
    result = plan(snapshot(space, [created], [listed(created, CloudState.STARTING)]))
    assert of(result, vp.Started) == [] and [d.message for d in of(result, vp.Delete)] == [vp.FAILED_TO_START]


def test_stopped_machine_is_finished_once_and_removed_at_most_hourly() -> None:
    space = make_space(processors_limit=0)
    machine = record("f")
    result = plan(snapshot(space, [machine], [listed(machine, CloudState.SHUT_DOWN, updated=NOW - 10)]))
    assert of(result, MarkGone) == [MarkGone(machine.uuid, NOW - 10, result.actions[0].reason)]
    finishing = machine.transition(MachineState.FINISHING, finished=NOW - 10)
    assert plan(snapshot(space, [finishing], [listed(machine, CloudState.SHUT_DOWN)])).actions == ()
    finished = dataclasses.replace(machine, state=MachineState.FINISHED, finished=NOW - 10, stop_requested=NOW)
    again = plan(snapshot(space, [finished], [listed(finished, CloudState.SHUT_DOWN)]))
    assert of(again, MarkGone) == [] and of(again, DestroyZombie) == []  # asked within the hour
    deleting = plan(snapshot(space, [machine], [listed(machine, CloudState.DELETING)], last_seen={machine.uuid: NOW - 50}))
    assert [f.end for f in of(deleting, MarkGone)] == [NOW - 50]


def test_gone_machine_is_finished_at_its_last_sighting() -> None:
    space = make_space(processors_limit=0)
    machine = record("g")
    result = plan(snapshot(space, [machine], [], last_seen={machine.uuid: NOW - 40}))
    assert [(f.uuid, f.end) for f in of(result, MarkGone)] == [(machine.uuid, NOW - 40)]
    # EC2 lists a new instance a little later: not gone within the listing grace
    just_created = record("n", created=NOW - 10, started=NOW - 5)
    assert of(plan(snapshot(space, [just_created], [])), MarkGone) == []


def test_aborts_are_300_to_699_and_never_700() -> None:
    assert [vp.is_abort(m) for m in ("200 Success", "300 Nothing to do", "699 x", vp.EXCEEDED_WALLCLOCK, None)] \
        == [False, True, True, False, False]


# --- take-over ---------------------------------------------------------------------------------------


def test_listed_machines_without_records_are_taken_over() -> None:
    space = make_space(cloud_type(hs06_per_processor=10.0), processors_limit=2)
    running = vp.Listed("u1", "vcycle-lhcb-aaaaaaaaaa", CloudState.RUNNING, "lhcb", 2, NOW - 500, NOW - 400)
    stranger = vp.Listed("u2", "vcycle-cms-bbbbbbbbbb", CloudState.RUNNING, "cms", 1, NOW - 500, NOW - 400)
    result = plan(snapshot(space, [], [running, stranger]))
    adopted = of(result, vp.Adopt)
    assert [a.machine.uuid for a in adopted] == ["u1"]
    machine = adopted[0].machine
    assert (machine.state, machine.started, machine.processors, machine.hs06) == (MachineState.RUNNING, NOW - 400, 2, 20.0)
    assert machine.deadline == NOW - 500 + 86400
    assert of(result, vp.Create) == []  # the adopted machine fills the limit
    assert any("cms is not configured" in note for note in result.notes)


def test_another_vcycleds_machines_count_and_are_taken_over_only_once_abandoned() -> None:
    space = make_space(processors_limit=3)  # max_wallclock_seconds: a day
    other = "vcycle2.example.org"
    young = vp.Listed("u1", "vcycle-lhcb-aaaaaaaaaa", CloudState.RUNNING, "lhcb", 1, NOW - 500, NOW - 400,
                      manager=other)
    starting = vp.Listed("u2", "vcycle-lhcb-bbbbbbbbbb", CloudState.STARTING, "lhcb", 1, NOW - 600, manager=other)
    result = plan(snapshot(space, [], [young, starting]))
    assert of(result, vp.Adopt) == [] and [c.machinetype for c in of(result, vp.Create)] == ["lhcb"]  # 2 of 3 used
    assert any(f"managed by {other}" in note for note in result.notes)

    # Past its deadline, past the start timeout, or stopped: each by TAKEOVER_SECONDS, then ours.
    day = 86400
    overdue = dataclasses.replace(young, created=NOW - day - vp.TAKEOVER_SECONDS - 1)
    nearly = dataclasses.replace(young, uuid="u3", created=NOW - day - vp.TAKEOVER_SECONDS + 60)
    never = dataclasses.replace(starting, created=NOW - vp.START_TIMEOUT_SECONDS - vp.TAKEOVER_SECONDS - 1)
    stopped = dataclasses.replace(young, uuid="u4", state=CloudState.SHUT_DOWN, updated=NOW - vp.TAKEOVER_SECONDS - 1)
    stopped_lately = dataclasses.replace(stopped, uuid="u5", updated=NOW - 60)
    result = plan(snapshot(space, [], [overdue, nearly, never, stopped, stopped_lately]))
    assert sorted(a.machine.uuid for a in of(result, vp.Adopt)) == ["u1", "u2", "u4"]
    assert all(other in a.reason for a in of(result, vp.Adopt))
    # Without an updated time, a stopped machine counts from when this vcycled last saw it running.
    quiet = dataclasses.replace(stopped, updated=None)
    assert of(plan(snapshot(space, [], [quiet], last_seen={"u4": NOW - 60})), vp.Adopt) == []
    assert len(of(plan(snapshot(space, [], [quiet], daemon_started=NOW - vp.TAKEOVER_SECONDS - 1)), vp.Adopt)) == 1
    # Our own machines and classic ones (no manager) are taken over at once.
    for manager in ("vcycle.example.org", None):
        assert len(of(plan(snapshot(space, [], [dataclasses.replace(young, manager=manager)])), vp.Adopt)) == 1


def test_finished_record_still_listed_is_deleted_not_adopted() -> None:
    space = make_space(processors_limit=0)
    finished = record("f", state=MachineState.FINISHED, finished=NOW - 100)
    result = plan(snapshot(space, [finished], [listed(finished, CloudState.SHUT_DOWN)]))
    assert of(result, DestroyZombie) == [DestroyZombie(space.name, finished.uuid, finished.name, True)] and of(result, vp.Adopt) == []


# --- preemptible ---------------------------------------------------------------------------------


def test_a_reclaimed_preemptible_machine_waits_its_grace_then_is_finished_as_preempted() -> None:
    space = make_space(cloud_type(preemptible=True, grace_secs=120), processors_limit=1)
    machine = record("p")
    stopped = [listed(machine, CloudState.SHUT_DOWN, updated=NOW - 60)]
    within = plan(snapshot(space, [machine], stopped))
    assert within.actions == ()  # within its grace: it may still upload its message, and holds the quota
    after = plan(snapshot(space, [machine], stopped, now=NOW + 61))
    assert [(a.uuid, a.end) for a in of(after, vp.Reclaimed)] == [(machine.uuid, NOW - 60)]
    assert of(after, MarkGone) == [] and not vp.is_abort(vp.PREEMPTED)
    # the same machine of an ordinary machinetype is finished at once
    plain = plan(snapshot(make_space(processors_limit=1), [machine], stopped))
    assert [g.uuid for g in of(plain, MarkGone)] == [machine.uuid]
