"""Rules of the pure planner, with hand-checked numbers (REFERENCE.md §2.5, §3.3-3.6)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from vac.core.config import Config, Machinetype, Settings
from vac.core.model import Finish, Machine, MachineState, MachinetypeReport
from vac.core.scheduler import (
    HEARTBEAT_NOT_CREATED,
    HEARTBEAT_NOT_UPDATED,
    Create,
    HostFacts,
    LowerDeadline,
    Shutdown,
    Snapshot,
    clock,
    finish_message,
    in_backoff,
    local_machinetype_reports,
    plan,
    should_account,
    standings,
)

NOW = 1_700_000_000.0
GIB = 1 << 30
FACTORY = "f01.example.org"


def machinetype(name: str, share: float = 1.0, **options) -> Machinetype:
    return Machinetype(name=name, target_share=share, **options)


def make_config(*machinetypes: Machinetype, **settings) -> Config:
    return Config(
        settings=Settings(vac_space="vac01.example.org", factory_name=FACTORY, **settings),
        machinetypes={mt.name: mt for mt in machinetypes},
    )


def host(processors=8, load=(0.0, 0.0, 0.0), disk=100 * GIB, memory=256 * GIB) -> HostFacts:
    return HostFacts(processors, load, disk, memory)


def machine(slot: int, mtype: str, state=MachineState.RUNNING, processors=1, **fields) -> Machine:
    values = dict(created=NOW - 3600, started=NOW - 3590, deadline=NOW + 80000)
    if state == MachineState.CREATING:
        values.update(created=NOW - 5, started=None)
    values.update(fields)
    return Machine(
        uuid=f"uuid-{slot}",
        name=f"f01-{slot:02d}.example.org",
        slot=slot,
        machinetype=mtype,
        machine_model="cernvm3",
        processors=processors,
        state=state,
        **values,
    )


def report(mtype: str, factory="f02.example.org", **fields) -> MachinetypeReport:
    return MachinetypeReport(factory=factory, machinetype=mtype, **fields)


def snapshot(config, machines=(), reports=(), num_slots=8, host_facts=None, heartbeats=None,
             now=NOW, daemon_started=NOW - 86400) -> Snapshot:
    return Snapshot(
        config=config,
        machines=tuple(machines),
        num_slots=num_slots,
        host=host_facts or host(processors=num_slots),
        reports=tuple(reports),
        heartbeat_mtimes=heartbeats or {},
        now=now,
        daemon_started=daemon_started,
    )


def creates(result):
    return [action for action in result.actions if isinstance(action, Create)]


def created_types(result):
    return [action.machinetype for action in creates(result)]


def one_create(config, reports=(), **kwargs):
    """Plan on a host with room for exactly one machine."""
    return plan(snapshot(config, reports=reports, num_slots=1, **kwargs), random.Random(1))


# --------------------------------------------------------------------------------------------
# Shares


def test_worked_share_example_prefers_b_until_its_usage_per_share_exceeds_a():
    config = make_config(machinetype("a", 2.0), machinetype("b", 1.0))
    reports = [report("a", running_hs06=40.0), report("b", running_hs06=10.0)]
    table = standings(config, tuple(reports), NOW)
    assert (table["a"].score, table["b"].score) == (20.0, 10.0)
    assert created_types(one_create(config, reports)) == ["b"]
    reports[1] = report("b", running_hs06=21.0)
    assert created_types(one_create(config, reports)) == ["a"]


def test_scores_sum_over_factories_including_this_one():
    config = make_config(machinetype("a", 2.0), machinetype("b", 1.0))
    reports = [
        report("a", factory=FACTORY, running_hs06=10.0),
        report("a", factory="f02.example.org", running_hs06=30.0),
        report("b", factory=FACTORY, running_hs06=4.0),
        report("b", factory="f03.example.org", running_hs06=21.0),
    ]
    table = standings(config, tuple(reports), NOW)
    assert (table["a"].score, table["b"].score) == (20.0, 25.0)
    assert created_types(one_create(config, reports)) == ["a"]


def test_group_score_sorts_before_the_machinetype_score():
    config = make_config(
        machinetype("lhcb-a", machinegroup="lhcb"),
        machinetype("lhcb-b", machinegroup="lhcb"),
        machinetype("atlas"),
    )
    reports = [
        report("lhcb-a", running_hs06=5.0),
        report("lhcb-b", running_hs06=6.0),
        report("atlas", running_hs06=8.0),
    ]
    table = standings(config, tuple(reports), NOW)
    assert table["lhcb-a"].group_score == table["lhcb-b"].group_score == 11.0
    # lhcb-a has the lowest own score (5) but its group (11) is ahead of atlas (8).
    assert created_types(one_create(config, reports)) == ["atlas"]
    reports[2] = report("atlas", running_hs06=12.0)
    assert created_types(one_create(config, reports)) == ["lhcb-a"]


def test_machinegroup_defaults_to_accounting_fqan():
    config = make_config(
        machinetype("x1", accounting_fqan="/lhcb/Role=pilot"),
        machinetype("x2", accounting_fqan="/lhcb/Role=pilot"),
        machinetype("y"),
    )
    reports = [report("x1", running_hs06=3.0), report("y", running_hs06=2.0)]
    table = standings(config, tuple(reports), NOW)
    assert table["x2"].group_score == 3.0
    assert created_types(one_create(config, reports)) == ["y"]


def test_share_zero_is_never_created():
    config = make_config(machinetype("zero", 0.0), machinetype("busy", 1.0))
    result = one_create(config, [report("busy", running_hs06=1000.0)])
    assert created_types(result) == ["busy"]
    assert "zero" not in standings(config, (), NOW)


def test_no_machinetype_with_a_share_creates_nothing_and_says_why():
    result = one_create(make_config(machinetype("zero", 0.0)))
    assert result.actions == ()
    assert "no creation: no machinetype has target_share > 0" in result.notes


def test_random_tie_break_is_seeded():
    config = make_config(machinetype("a"), machinetype("b"))
    chosen = {
        seed: created_types(plan(snapshot(config, num_slots=1), random.Random(seed)))[0]
        for seed in range(40)
    }
    assert set(chosen.values()) == {"a", "b"}
    for seed, name in chosen.items():
        assert created_types(plan(snapshot(config, num_slots=1), random.Random(seed))) == [name]


def test_planned_machines_count_at_once_so_a_batch_follows_the_shares():
    # a has three times b's share; both idle. HS06 per processor 10.
    config = make_config(
        machinetype("a", 3.0), machinetype("b", 1.0), hs06_per_processor=10.0, max_creating=8,
        max_probes=0,
    )
    result = plan(snapshot(config, num_slots=8), random.Random(3))
    types = created_types(result)
    assert len(types) == 8
    # After 8 machines of 10 HS06: a 6 (60/3 = 20), b 2 (20/1 = 20): equal usage per share.
    assert (types.count("a"), types.count("b")) == (6, 2)


# --------------------------------------------------------------------------------------------
# Backoff after aborts, and the fizzle extension


ABORT_AT = NOW - 1000.0


def backoff_config(**options):
    return make_config(machinetype("lhcb", backoff_seconds=10, fizzle_seconds=600, **options))


def abort_report(message="300 No more work", at=ABORT_AT, **fields):
    return report(
        "lhcb", factory="f07.example.org", shutdown_message=message, shutdown_time=at,
        shutdown_machine="f07-03.example.org", **fields,
    )


@pytest.mark.parametrize(
    ("seconds_after_abort", "created"), [(5.0, False), (10.0, False), (10.5, True)]
)
def test_backoff_lasts_backoff_seconds_after_the_abort(seconds_after_abort, created):
    result = one_create(backoff_config(), [abort_report()], now=ABORT_AT + seconds_after_abort)
    assert bool(creates(result)) is created
    if not created:
        expected = (
            f"lhcb in backoff until {clock(ABORT_AT + 10)} after '300 No more work' "
            "on f07.example.org"
        )
        assert expected in result.notes


@pytest.mark.parametrize(
    ("seconds_after_abort", "created"), [(11.0, False), (610.0, False), (611.0, True)]
)
def test_young_vms_extend_backoff_by_fizzle_seconds(seconds_after_abort, created):
    reports = [abort_report(), report("lhcb", factory="f09.example.org", num_before_fizzle=1,
                                      running_machines=1)]
    result = one_create(backoff_config(), reports, now=ABORT_AT + seconds_after_abort)
    assert bool(creates(result)) is created
    if not created:
        assert any(f"until {clock(ABORT_AT + 610)}" in note and "fizzle_seconds=600" in note
                   for note in result.notes)


def test_after_backoff_only_one_probe_is_started_then_the_extension_applies():
    config = backoff_config()
    result = plan(snapshot(config, reports=[abort_report()], now=ABORT_AT + 11),
                  random.Random(0))
    assert created_types(result) == ["lhcb"]
    assert any("lhcb in backoff until" in note for note in result.notes)


def test_the_newest_abort_in_the_space_counts():
    reports = [
        abort_report(at=ABORT_AT),
        report("lhcb", factory="f08.example.org", shutdown_message="500 Broken",
               shutdown_time=ABORT_AT + 100),
    ]
    table = standings(backoff_config(), tuple(reports), ABORT_AT + 105)
    assert table["lhcb"].last_abort_time == ABORT_AT + 100
    assert table["lhcb"].last_abort_factory == "f08.example.org"
    assert table["lhcb"].blocked_by.startswith(f"lhcb in backoff until {clock(ABORT_AT + 110)}")
    assert in_backoff(table["lhcb"])
    assert not in_backoff(standings(backoff_config(), tuple(reports), ABORT_AT + 111)["lhcb"])
    assert creates(one_create(backoff_config(), reports, now=ABORT_AT + 111))


@pytest.mark.parametrize(
    ("message", "backoff"),
    [
        ("300 No more work", True),
        ("400 Site banned", True),
        ("700 Heartbeat file not updated", True),
        ("999 Anything", True),
        ("200 Intentional shutdown", False),
        ("100 Shutdown as requested", False),
        ("no code here", False),
        (None, False),
    ],
)
def test_only_codes_of_300_and_above_are_aborts(message, backoff):
    result = one_create(backoff_config(), [abort_report(message=message)], now=ABORT_AT + 5)
    assert bool(creates(result)) is not backoff


def test_abort_without_a_time_is_no_abort():
    result = one_create(backoff_config(), [abort_report(at=None)], now=ABORT_AT + 5)
    assert created_types(result) == ["lhcb"]


def test_abort_time_far_in_the_future_is_ignored_with_a_note():
    future = NOW + 86400
    result = one_create(backoff_config(), [abort_report(at=future)])
    assert created_types(result) == ["lhcb"]
    assert any("ignored abort time" in note and "f07.example.org" in note
               for note in result.notes)


def test_fizzle_without_message_leads_to_backoff():
    """A VM that ran 42 s and left no message: fizzle abort recorded, then backoff follows."""
    config = backoff_config()
    lhcb = config.machinetypes["lhcb"]
    short = machine(3, "lhcb", started=NOW - 42, finished=NOW)
    message = finish_message(short, lhcb, None, NOW)
    assert message == "300 Vac detects fizzle after 42 seconds"
    finishes = {"lhcb": Finish("lhcb", short.name, message, NOW)}
    own = local_machinetype_reports(config, (), finishes, FACTORY, NOW)
    assert own[0].shutdown_message == message and own[0].shutdown_time == NOW
    assert creates(one_create(config, own, now=NOW + 10)) == []
    assert created_types(one_create(config, own, now=NOW + 11)) == ["lhcb"]


# --------------------------------------------------------------------------------------------
# finish_message and should_account


def test_finish_message_keeps_the_vms_valid_message_first_line_bounded():
    lhcb = machinetype("lhcb")
    short = machine(0, "lhcb", started=NOW - 5)
    assert finish_message(short, lhcb, "200 Done\nmore text", NOW) == "200 Done"
    assert finish_message(short, lhcb, "  300 No more work  \n", NOW) == "300 No more work"
    long_message = "500 " + "x" * 1000
    assert finish_message(short, lhcb, long_message, NOW) == long_message[:200]


@pytest.mark.parametrize(
    ("started", "vm_message", "expected"),
    [
        (NOW - 599, None, "300 Vac detects fizzle after 599 seconds"),
        (NOW - 599, "garbage", "300 Vac detects fizzle after 599 seconds"),
        (NOW - 600, None, None),
        (None, None, "300 Vac detects fizzle after 0 seconds"),
    ],
)
def test_finish_message_fizzle(started, vm_message, expected):
    lhcb = machinetype("lhcb", fizzle_seconds=600)
    assert finish_message(machine(0, "lhcb", started=started), lhcb, vm_message, NOW) == expected


def test_finish_message_uses_the_finish_time_when_known_and_none_for_unknown_types():
    lhcb = machinetype("lhcb", fizzle_seconds=600)
    finished_early = machine(0, "lhcb", started=NOW - 5000, finished=NOW - 4990)
    assert finish_message(finished_early, lhcb, None, NOW) == (
        "300 Vac detects fizzle after 10 seconds"
    )
    assert finish_message(machine(0, "gone", started=NOW - 5), None, None, NOW) is None


@pytest.mark.parametrize(
    ("started", "fizzle", "accounted"),
    [(NOW - 599, 600, False), (NOW - 600, 600, True), (None, 600, False), (NOW - 1, 0, True)],
)
def test_should_account_only_after_fizzle_seconds(started, fizzle, accounted):
    lhcb = machinetype("lhcb", fizzle_seconds=fizzle)
    assert should_account(machine(0, "lhcb", started=started), lhcb, NOW) is accounted


# --------------------------------------------------------------------------------------------
# local_machinetype_reports


def test_local_reports_hand_checked():
    config = make_config(
        machinetype("lhcb", fizzle_seconds=600, accounting_fqan="/lhcb", max_processors=4),
        machinetype("atlas", 0.0),
        hs06_per_processor=10.0,
    )
    machines = (
        machine(0, "lhcb", processors=4),  # 40 HS06, old
        machine(1, "lhcb", hs06=25.0, started=NOW - 100),  # recorded HS06, young
        machine(2, "lhcb", state=MachineState.CREATING, processors=2),  # 20 HS06, young
        machine(3, "lhcb", state=MachineState.STOPPING),  # 10 HS06, old
        machine(4, "lhcb", state=MachineState.FINISHING, processors=8),  # not running
    )
    finishes = {"lhcb": Finish("lhcb", "f01-07.example.org", "300 No more work", NOW - 50)}
    lhcb, atlas = local_machinetype_reports(config, machines, finishes, FACTORY, NOW)
    assert lhcb == MachinetypeReport(
        factory=FACTORY, machinetype="lhcb", running_hs06=95.0, running_machines=4,
        running_processors=8, num_before_fizzle=2, shutdown_message="300 No more work",
        shutdown_time=NOW - 50, shutdown_machine="f01-07.example.org", fqan="/lhcb",
        max_wallclock_seconds=86400, max_processors=4,
    )
    assert atlas == MachinetypeReport(
        factory=FACTORY, machinetype="atlas", max_wallclock_seconds=86400, max_processors=1
    )


def test_local_reports_default_hs06_is_one_per_processor():
    config = make_config(machinetype("lhcb"))
    (lhcb,) = local_machinetype_reports(config, (machine(0, "lhcb", processors=3),), {},
                                        FACTORY, NOW)
    assert lhcb.running_hs06 == 3.0


# --------------------------------------------------------------------------------------------
# Vetoes


def vetoed(result, text):
    assert creates(result) == []
    assert any(note.startswith("no creation") and text in note for note in result.notes), (
        result.notes
    )


def running(count, mtype="lhcb"):
    return [machine(slot, mtype) for slot in range(count)]


def test_load_against_running_processors_vetoes_above_four_running():
    config = make_config(machinetype("lhcb"))
    # 5 running, load 6.3 > 1.25 × 5 = 6.25 (host limit 1.25 × 16 = 20 not reached).
    result = plan(snapshot(config, running(5), num_slots=16,
                           host_facts=host(16, load=(1.0, 6.3, 2.0))), random.Random(0))
    vetoed(result, "load 6.30 > overload_per_processor 1.25 × 5 running processors")
    # 4 running: the per-running-processor rule does not apply.
    result = plan(snapshot(config, running(4), num_slots=16,
                           host_facts=host(16, load=(6.3, 0.0, 0.0))), random.Random(0))
    assert creates(result)


def test_load_against_all_processors_vetoes():
    config = make_config(machinetype("lhcb"))
    result = plan(snapshot(config, num_slots=8, host_facts=host(8, load=(10.1, 0.0, 0.0))),
                  random.Random(0))
    vetoed(result, "load 10.10 > overload_per_processor 1.25 × 8 processors")
    result = plan(snapshot(config, num_slots=8, host_facts=host(8, load=(10.0, 0.0, 0.0))),
                  random.Random(0))
    assert creates(result)


def test_unknown_load_vetoes():
    config = make_config(machinetype("lhcb"))
    result = plan(snapshot(config, host_facts=host(8, load=(float("nan"), 0.0, 0.0))),
                  random.Random(0))
    vetoed(result, "load average unknown")


def test_shutdown_time_passed_vetoes():
    config = make_config(machinetype("lhcb"), shutdown_time=int(NOW))
    vetoed(one_create(config), "shutdown_time")


def test_draining_vetoes():
    vetoed(one_create(make_config(machinetype("lhcb"), draining=True)), "draining")


def test_total_processors_vetoes_and_limits():
    config = make_config(machinetype("lhcb", max_processors=8), total_processors=6,
                         processors_per_superslot=8, max_probes=0)
    result = plan(snapshot(config, running(6), num_slots=8), random.Random(0))
    vetoed(result, "6 of 6 processors in use")
    # The host has 8 processors but total_processors caps one superslot of 8 at 6.
    result = plan(snapshot(config, num_slots=8), random.Random(0))
    assert [c.processors for c in creates(result)] == [6]


def test_state_dir_under_one_gib_vetoes():
    config = make_config(machinetype("lhcb"))
    vetoed(one_create(config, host_facts=host(1, disk=GIB - 1)), "1023 MiB free in /var/lib/vac")
    assert creates(one_create(config, host_facts=host(1, disk=GIB)))


def test_free_memory_must_hold_the_vm():
    config = make_config(machinetype("lhcb", max_processors=2), processors_per_superslot=2,
                         mb_per_processor=2048)
    result = one_create(config, host_facts=host(2, memory=4096 * (1 << 20) - 1))
    vetoed(result, "lhcb needs 4096 MiB, 4095 MiB free")
    result = plan(snapshot(config, num_slots=1, host_facts=host(2, memory=4096 << 20)),
                  random.Random(0))
    assert [(c.processors) for c in creates(result)] == [2]


def test_free_memory_is_used_up_by_planned_vms():
    config = make_config(machinetype("lhcb"), mb_per_processor=2048, max_probes=0)
    result = plan(snapshot(config, num_slots=8, host_facts=host(8, memory=5 * GIB)),
                  random.Random(0))
    assert len(creates(result)) == 2
    assert "no creation: lhcb needs 2048 MiB, 1024 MiB free" in result.notes


def test_all_slots_occupied_vetoes_even_with_free_processors():
    config = make_config(machinetype("lhcb"), total_processors=8)
    machines = [machine(0, "lhcb"), machine(1, "lhcb", state=MachineState.FINISHING)]
    result = plan(snapshot(config, machines, num_slots=2, host_facts=host(8)), random.Random(0))
    vetoed(result, "all 2 slots occupied")


# --------------------------------------------------------------------------------------------
# Slots, max_creating, probes


def test_creates_take_the_lowest_free_slots():
    config = make_config(machinetype("lhcb"), max_probes=0)
    machines = [machine(0, "lhcb"), machine(2, "lhcb", state=MachineState.FINISHING)]
    result = plan(snapshot(config, machines, num_slots=8), random.Random(0))
    assert [c.slot for c in creates(result)] == [1, 3, 4, 5]


def test_max_creating_caps_machines_in_creating_state():
    config = make_config(machinetype("lhcb"), max_creating=3, max_probes=0)
    machines = [machine(0, "lhcb", state=MachineState.CREATING)]
    result = plan(snapshot(config, machines, num_slots=8), random.Random(0))
    assert len(creates(result)) == 2
    assert "no more creation now: max_creating=3 reached" in result.notes
    machines.append(machine(1, "lhcb", state=MachineState.CREATING))
    machines.append(machine(2, "lhcb", state=MachineState.CREATING))
    assert creates(plan(snapshot(config, machines, num_slots=8), random.Random(0))) == []


def test_unproven_type_gets_at_most_max_probes_young_vms_space_wide():
    config = make_config(machinetype("lhcb", fizzle_seconds=600), max_creating=8)
    result = plan(snapshot(config, num_slots=8), random.Random(0))
    assert created_types(result) == ["lhcb", "lhcb"]
    assert (
        "lhcb has 2 probe VMs starting or younger than fizzle_seconds=600 and none older "
        "(max_probes=2)"
    ) in result.notes
    # One probe already young on a peer: one more here.
    young_peer = report("lhcb", num_before_fizzle=1, running_machines=1)
    assert len(creates(plan(snapshot(config, reports=[young_peer]), random.Random(0)))) == 1


def test_a_vm_past_fizzle_anywhere_proves_work_and_lifts_the_probe_cap():
    config = make_config(machinetype("lhcb", fizzle_seconds=600), max_creating=8)
    proof = report("lhcb", running_machines=3, num_before_fizzle=2, running_hs06=3.0)
    result = plan(snapshot(config, reports=[proof], num_slots=8), random.Random(0))
    assert len(creates(result)) == 8
    assert standings(config, (proof,), NOW)["lhcb"].proven


def test_probe_cap_is_per_machinetype_and_zero_disables_it():
    config = make_config(machinetype("a"), machinetype("b"), max_creating=8)
    assert sorted(created_types(plan(snapshot(config), random.Random(0)))) == ["a", "a", "b", "b"]
    config = make_config(machinetype("a"), max_creating=8, max_probes=0)
    assert len(creates(plan(snapshot(config), random.Random(0)))) == 8


# --------------------------------------------------------------------------------------------
# Superslots and sizing (processors_per_superslot = 8)


def superslot_config(**single_options):
    return make_config(
        machinetype("single", 1.0, **single_options),
        machinetype("octo", 1.0, min_processors=8, max_processors=8),
        processors_per_superslot=8,
        total_processors=16,
        max_creating=8,
        max_probes=0,
    )


def test_superslot_is_completed_with_its_end_time_before_a_new_one_starts():
    ends = NOW + 3600
    config = superslot_config(min_wallclock_seconds=3000)
    machines = [machine(slot, "single", deadline=ends) for slot in range(6)]
    reports = [report("single", factory=FACTORY, running_hs06=6.0)]
    result = plan(snapshot(config, machines, reports=reports, num_slots=16), random.Random(0))
    placed = [(c.machinetype, c.processors, c.deadline) for c in creates(result)]
    # octo (score 0) ranks first but needs 8: the 2 processors that complete the superslot go
    # to single, with the superslot's end time; then the 8 free processors start a new one.
    assert placed == [("single", 1, ends), ("single", 1, ends), ("octo", 8, NOW + 86400)]


def test_octo_starts_a_whole_new_superslot():
    config = superslot_config()
    # singles already have more usage: octo is preferred for the empty host.
    reports = [report("single", running_hs06=100.0)]
    result = plan(snapshot(config, reports=reports, num_slots=16), random.Random(0))
    placed = [(c.machinetype, c.processors, c.deadline) for c in creates(result)]
    assert placed[0] == ("octo", 8, NOW + 86400)
    # The second superslot of 8 goes to octo again only if it is still the more starved:
    # octo now 8, single 100 -> octo.
    assert placed == [("octo", 8, NOW + 86400), ("octo", 8, NOW + 86400)]


def test_an_incomplete_superslot_reserves_its_processors_even_if_nothing_fits():
    config = superslot_config()  # single: min_wallclock = max_wallclock, cannot join old slots
    machines = [machine(slot, "single", deadline=NOW + 3600) for slot in range(6)]
    # 10 free processors: 2 reserved for the superslot ending in an hour, 8 for a new one.
    result = plan(snapshot(config, machines, num_slots=16,
                           reports=[report("single", running_hs06=100.0)]), random.Random(0))
    assert [(c.machinetype, c.processors) for c in creates(result)] == [("octo", 8)]
    assert "no creation: no eligible machinetype fits 2 free processors" in result.notes


def test_singles_fill_a_new_superslot_within_one_plan():
    config = make_config(machinetype("single"), processors_per_superslot=8, max_creating=8,
                         max_probes=0)
    result = plan(snapshot(config, num_slots=8), random.Random(0))
    assert [(c.processors, c.deadline) for c in creates(result)] == [(1, NOW + 86400)] * 8


def test_wallclock_window_decides_who_may_join_a_superslot():
    ends = NOW + 3600
    config = make_config(
        machinetype("long", min_wallclock_seconds=7200, max_wallclock_seconds=86400),
        machinetype("short", min_wallclock_seconds=600, max_wallclock_seconds=3000),
        machinetype("fits", min_wallclock_seconds=1800, max_wallclock_seconds=86400),
        processors_per_superslot=2, total_processors=2, max_probes=0,
    )
    machines = [machine(0, "fits", deadline=ends)]
    reports = [report("long", running_hs06=0.0), report("short", running_hs06=0.0),
               report("fits", running_hs06=5.0)]
    result = plan(snapshot(config, machines, reports=reports, num_slots=4), random.Random(0))
    assert [(c.machinetype, c.deadline) for c in creates(result)] == [("fits", ends)]


def test_multiprocessor_sizing_respects_min_and_max_processors():
    config = make_config(machinetype("mp", min_processors=2, max_processors=4),
                         processors_per_superslot=8, total_processors=5, max_probes=0)
    result = plan(snapshot(config, num_slots=8, host_facts=host(8)), random.Random(0))
    # 5 free: 4 (max), then 1 left is below min_processors.
    assert [c.processors for c in creates(result)] == [4]
    assert "no creation: no eligible machinetype fits 1 free processors" in result.notes


# --------------------------------------------------------------------------------------------
# Deadlines


def test_running_machine_past_its_deadline_is_shut_down_without_message():
    config = make_config(machinetype("lhcb"))
    late = machine(0, "lhcb", deadline=NOW - 1)
    result = plan(snapshot(config, [late], num_slots=1), random.Random(0))
    assert result.actions == (
        Shutdown("uuid-0", f"{late.name} (lhcb) passed its deadline {clock(NOW - 1)}", None),
    )


def test_machine_exactly_at_its_deadline_keeps_running():
    config = make_config(machinetype("lhcb"))
    result = plan(snapshot(config, [machine(0, "lhcb", deadline=NOW)], num_slots=1),
                  random.Random(0))
    assert result.actions == ()


def test_shutdown_time_lowers_later_deadlines_only():
    shutdown_time = int(NOW + 3600)
    config = make_config(machinetype("lhcb", min_wallclock_seconds=600),
                         shutdown_time=shutdown_time)
    machines = [
        machine(0, "lhcb", deadline=NOW + 7200),
        machine(1, "lhcb", deadline=NOW + 1800),
        machine(2, "lhcb", state=MachineState.STOPPING, deadline=NOW + 7200),
    ]
    result = plan(snapshot(config, machines, num_slots=3), random.Random(0))
    assert result.actions == (
        LowerDeadline("uuid-0", shutdown_time,
                      f"{machines[0].name} (lhcb) deadline lowered to shutdown_time "
                      f"{clock(shutdown_time)}"),
    )


def test_passed_shutdown_time_shuts_running_machines_down():
    config = make_config(machinetype("lhcb"), shutdown_time=int(NOW - 10))
    result = plan(snapshot(config, [machine(0, "lhcb")], num_slots=2), random.Random(0))
    assert [type(a) for a in result.actions] == [Shutdown]
    assert result.actions[0].shutdown_message is None


def test_new_machines_end_at_shutdown_time_and_need_min_wallclock_before_it():
    shutdown_time = int(NOW + 3600)
    config = make_config(
        machinetype("short", min_wallclock_seconds=3000),
        machinetype("long", min_wallclock_seconds=3600),
        shutdown_time=shutdown_time, max_probes=0,
    )
    result = plan(snapshot(config, num_slots=2), random.Random(0))
    assert [(c.machinetype, c.deadline) for c in creates(result)] == [
        ("short", shutdown_time), ("short", shutdown_time)
    ]
    assert any(note.startswith("long needs min_wallclock_seconds=3600") for note in result.notes)


def test_lowered_deadline_forms_the_superslot_new_machines_join():
    shutdown_time = int(NOW + 3600)
    config = make_config(machinetype("lhcb", min_wallclock_seconds=600), shutdown_time=shutdown_time,
                         processors_per_superslot=2, total_processors=2, max_probes=0)
    result = plan(snapshot(config, [machine(0, "lhcb", deadline=NOW + 7200)], num_slots=2),
                  random.Random(0))
    lowered, created = result.actions
    assert isinstance(lowered, LowerDeadline) and lowered.deadline == shutdown_time
    assert (created.processors, created.deadline) == (1, shutdown_time)


# --------------------------------------------------------------------------------------------
# Heartbeats


def heartbeat_config(**options):
    values = dict(heartbeat_file="heartbeat", heartbeat_seconds=900, fizzle_seconds=600)
    values.update(options)
    return make_config(machinetype("lhcb", **values))


def heartbeat_plan(config, mtime="missing", started=NOW - 700, daemon_started=NOW - 86400):
    beating = machine(0, "lhcb", started=started)
    heartbeats = {} if mtime == "missing" else {"uuid-0": mtime}
    return plan(snapshot(config, [beating], num_slots=1, heartbeats=heartbeats,
                         daemon_started=daemon_started), random.Random(0))


def test_missing_heartbeat_file_after_fizzle_seconds():
    result = heartbeat_plan(heartbeat_config(), mtime=None)
    assert result.actions == (
        Shutdown("uuid-0", "f01-00.example.org (lhcb): Heartbeat file not created",
                 HEARTBEAT_NOT_CREATED),
    )


def test_stale_heartbeat_file():
    result = heartbeat_plan(heartbeat_config(), mtime=NOW - 901)
    assert [a.shutdown_message for a in result.actions] == [HEARTBEAT_NOT_UPDATED]
    assert heartbeat_plan(heartbeat_config(), mtime=NOW - 900).actions == ()


def test_heartbeat_seconds_zero_checks_existence_only():
    config = heartbeat_config(heartbeat_seconds=0)
    assert heartbeat_plan(config, mtime=NOW - 100000).actions == ()
    assert [a.shutdown_message for a in heartbeat_plan(config, mtime=None).actions] == [
        HEARTBEAT_NOT_CREATED
    ]


@pytest.mark.parametrize(
    ("started", "daemon_started"),
    [
        (NOW - 600, NOW - 86400),  # not yet past fizzle_seconds (now == started + fizzle)
        (NOW - 700, NOW - 600),  # vacd restarted 600 s ago: grace for heartbeats to arrive
        (NOW - 700, NOW - 100),
    ],
)
def test_no_heartbeat_enforcement_while_young_or_in_restart_grace(started, daemon_started):
    result = heartbeat_plan(heartbeat_config(), mtime=None, started=started,
                            daemon_started=daemon_started)
    assert result.actions == ()


def test_heartbeat_enforced_once_restart_grace_is_over():
    result = heartbeat_plan(heartbeat_config(), mtime=None, daemon_started=NOW - 601)
    assert [a.shutdown_message for a in result.actions] == [HEARTBEAT_NOT_CREATED]


@pytest.mark.parametrize("options", [dict(heartbeat_file=None), dict(fizzle_seconds=0)])
def test_no_heartbeat_enforcement_without_file_or_fizzle(options):
    assert heartbeat_plan(heartbeat_config(**options), mtime=None).actions == ()


def test_heartbeat_not_checked_for_removed_machinetypes():
    config = make_config(machinetype("other"))
    result = heartbeat_plan(config, mtime=None)
    assert not any(isinstance(a, Shutdown) for a in result.actions)


def test_heartbeat_without_mtime_information_is_not_enforced_but_noted():
    result = heartbeat_plan(heartbeat_config())
    assert result.actions == ()
    assert "heartbeat of f01-00.example.org not checked: no file time given" in result.notes


def test_deadline_shutdown_takes_precedence_over_heartbeat():
    config = heartbeat_config()
    late = machine(0, "lhcb", deadline=NOW - 5)
    result = plan(snapshot(config, [late], num_slots=1, heartbeats={"uuid-0": None}),
                  random.Random(0))
    assert [(type(a), a.shutdown_message) for a in result.actions] == [(Shutdown, None)]


def test_machines_being_shut_down_leave_their_superslot_but_keep_their_processors():
    config = make_config(machinetype("lhcb", min_wallclock_seconds=600),
                         processors_per_superslot=2, total_processors=2, max_probes=0)
    late = machine(0, "lhcb", deadline=NOW - 5)
    result = plan(snapshot(config, [late], num_slots=2), random.Random(0))
    # Its processor is still in use until it is gone; the other is free for a new superslot.
    assert [type(a) for a in result.actions] == [Shutdown, Create]
    assert creates(result)[0].deadline == NOW + 86400


# --------------------------------------------------------------------------------------------
# Untrusted reports


def test_bad_and_duplicate_reports_are_ignored_with_notes():
    config = make_config(machinetype("a"), machinetype("b"))
    reports = [
        report("a", running_hs06=float("nan")),
        report("a", factory="f03.example.org", running_hs06=-5.0),
        report("b", running_hs06=1.0),
        report("b", running_hs06=50.0),
        report("unknown", running_hs06=float("inf")),
    ]
    result = one_create(config, reports)
    assert created_types(result) == ["a"]
    assert standings(config, tuple(reports), NOW)["b"].score == 1.0
    assert "ignored report from f02.example.org on a: running_hs06=nan" in result.notes
    assert "ignored report from f03.example.org on a: running_hs06=-5.0" in result.notes
    assert "ignored duplicate report from f02.example.org on b" in result.notes
    assert not any("unknown" in note for note in result.notes)


def test_actions_order_supervision_then_creates_with_reasons():
    config = make_config(machinetype("lhcb"), max_probes=0)
    machines = [machine(1, "lhcb", deadline=NOW - 1), machine(0, "lhcb")]
    result = plan(snapshot(config, machines, num_slots=3), random.Random(0))
    assert [type(a) for a in result.actions] == [Shutdown, Create]
    create = result.actions[1]
    assert create.slot == 2
    assert create.reason.startswith(
        f"lhcb in slot 2 with 1 processors until {clock(NOW + 86400)}: starts a new superslot"
    )


def test_creating_machines_count_in_the_superslot_at_shutdown_time():
    shutdown_time = int(NOW + 3600)
    config = make_config(machinetype("lhcb", min_wallclock_seconds=600), shutdown_time=shutdown_time,
                         processors_per_superslot=2, total_processors=2, max_probes=0)
    starting = machine(0, "lhcb", state=MachineState.CREATING, deadline=NOW + 86400)
    result = plan(snapshot(config, [starting], num_slots=2), random.Random(0))
    assert [(c.processors, c.deadline) for c in creates(result)] == [(1, shutdown_time)]


# --------------------------------------------------------------------------------------------
# When to plan again (Plan.wake_at): the earliest moment a decision may change with time alone


def later(snap, now):
    return dataclasses.replace(snap, now=now)


def test_wake_at_is_the_earliest_running_deadline_and_it_is_enforced_just_after():
    config = make_config(machinetype("lhcb"))
    machines = [machine(0, "lhcb", deadline=NOW + 500), machine(1, "lhcb", deadline=NOW + 200)]
    full = snapshot(config, machines, num_slots=2)
    assert plan(full, random.Random(0)).wake_at == NOW + 200
    at_deadline = plan(later(full, NOW + 200), random.Random(0))
    assert (at_deadline.actions, at_deadline.wake_at) == ((), NOW + 200)
    just_after = plan(later(full, NOW + 200.01), random.Random(0))
    assert [(type(a), a.uuid) for a in just_after.actions] == [(Shutdown, "uuid-1")]
    assert just_after.wake_at == NOW + 500


def test_nothing_due_means_no_wake():
    config = make_config(machinetype("lhcb"), max_probes=0)
    assert plan(snapshot(config, num_slots=2), random.Random(0)).wake_at is None
    leaving = [machine(0, "lhcb", state=MachineState.STOPPING, deadline=NOW - 10),
               machine(1, "lhcb", state=MachineState.CREATING)]
    assert plan(snapshot(config, leaving, num_slots=2), random.Random(0)).wake_at is None


def test_shutdown_time_is_a_moment_of_its_own():
    config = make_config(machinetype("lhcb"), shutdown_time=int(NOW + 3600))
    result = plan(snapshot(config, [machine(0, "lhcb", deadline=NOW + 1800)], num_slots=1),
                  random.Random(0))
    assert result.wake_at == NOW + 1800
    lowered = plan(snapshot(config, [machine(0, "lhcb", deadline=NOW + 7200)], num_slots=1),
                   random.Random(0))
    assert [type(a) for a in lowered.actions] == [LowerDeadline]
    assert lowered.wake_at == NOW + 3600


def test_wake_at_follows_the_heartbeat_rules():
    config = heartbeat_config()  # fizzle_seconds 600, heartbeat_seconds 900
    fresh = snapshot(config, [machine(0, "lhcb", started=NOW - 100)], num_slots=1,
                     heartbeats={"uuid-0": NOW - 50})
    assert plan(fresh, random.Random(0)).wake_at == NOW + 500  # checks begin
    checked = plan(later(fresh, NOW + 500.5), random.Random(0))
    assert (checked.actions, checked.wake_at) == ((), NOW + 850)  # the file is overdue then
    overdue = plan(later(fresh, NOW + 850.5), random.Random(0))
    assert [a.shutdown_message for a in overdue.actions] == [HEARTBEAT_NOT_UPDATED]

    missing = snapshot(config, [machine(0, "lhcb", started=NOW - 700)], num_slots=1,
                       heartbeats={"uuid-0": None}, daemon_started=NOW - 100)
    assert plan(missing, random.Random(0)).wake_at == NOW + 500  # the restart grace ends
    after_grace = plan(later(missing, NOW + 500.5), random.Random(0))
    assert [a.shutdown_message for a in after_grace.actions] == [HEARTBEAT_NOT_CREATED]


def test_wake_at_is_the_end_of_a_backoff():
    result = one_create(backoff_config(), [abort_report()], now=ABORT_AT + 5)
    assert (creates(result), result.wake_at) == ([], ABORT_AT + 10)
    assert created_types(one_create(backoff_config(), [abort_report()], now=ABORT_AT + 10.5))
    reports = [abort_report(), report("lhcb", factory="f09.example.org", num_before_fizzle=1,
                                      running_machines=1)]
    extended = one_create(backoff_config(), reports, now=ABORT_AT + 11)
    assert (creates(extended), extended.wake_at) == ([], ABORT_AT + 610)


def test_wake_at_when_an_abort_from_a_clock_ahead_becomes_believable():
    reports = [abort_report(at=NOW + 1000)]
    result = one_create(backoff_config(), reports)
    assert (created_types(result), result.wake_at) == (["lhcb"], NOW + 700)
    assert creates(one_create(backoff_config(), reports, now=NOW + 700.5)) == []


def test_wake_at_when_min_wallclock_no_longer_fits_before_shutdown_time():
    config = make_config(machinetype("lhcb", min_wallclock_seconds=3000),
                         shutdown_time=int(NOW + 3600), max_probes=0)
    result = one_create(config)
    assert (created_types(result), result.wake_at) == (["lhcb"], NOW + 600)
    assert creates(one_create(config, now=NOW + 600.5)) == []


def test_wake_at_when_a_superslot_can_no_longer_be_joined():
    config = make_config(machinetype("lhcb", min_wallclock_seconds=3000, fizzle_seconds=60),
                         processors_per_superslot=2, total_processors=2, max_probes=0)
    half = snapshot(config, [machine(0, "lhcb", deadline=NOW + 5000)], num_slots=2)
    result = plan(half, random.Random(0))
    assert (created_types(result), result.wake_at) == (["lhcb"], NOW + 2000)
    assert creates(plan(later(half, NOW + 2000.5), random.Random(0))) == []


def test_non_finite_moments_are_ignored():
    config = make_config(machinetype("lhcb"))
    result = plan(snapshot(config, [machine(0, "lhcb", deadline=math.inf)], num_slots=1),
                  random.Random(0))
    assert result.wake_at is None
