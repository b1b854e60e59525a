"""Pure tests of the machine state table and the life-cycle decisions (vac.core.lifecycle)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import pytest

from vac.core import lifecycle
from vac.core.config import Machinetype
from vac.core.model import TRANSITIONS, IllegalTransition, Machine, MachineState

NOW = 1_800_000_000.0
S = MachineState


def machine(slot: int = 0, state: MachineState = S.RUNNING, **fields) -> Machine:
    values = dict(uuid=f"uuid-{slot}", name=f"f1-{slot:02d}", slot=slot, machinetype="lhcb",
                  machine_model="cernvm3", processors=1, created=NOW - 1000, deadline=NOW + 3600,
                  state=state, started=NOW - 900 if state is not S.CREATING else None)
    values.update(fields)
    return Machine(**values)


@dataclasses.dataclass(frozen=True)
class Seen:
    uuid: str
    name: str
    active: bool = True
    cpu_seconds: Optional[float] = None


# -- the table of legal transitions ----------------------------------------------------------------

LEGAL = {(S.CREATING, S.RUNNING), (S.CREATING, S.FINISHING), (S.RUNNING, S.STOPPING),
         (S.RUNNING, S.FINISHING), (S.STOPPING, S.FINISHING), (S.FINISHING, S.FINISHED)}


@pytest.mark.parametrize(("before", "after"), list(itertools.product(S, S)))
def test_only_the_life_cycle_of_architecture_4_is_legal(before, after):
    assert ((before, after) in LEGAL) is (after in TRANSITIONS[before])
    start = machine(state=before)
    if (before, after) in LEGAL:
        moved = start.transition(after, finished=NOW)
        assert (moved.state, moved.finished, moved.uuid) == (after, NOW, start.uuid)
    else:
        with pytest.raises(IllegalTransition, match=f"{before.value} -> {after.value}"):
            start.transition(after)


def test_finished_is_final_and_every_state_can_reach_it():
    assert TRANSITIONS[S.FINISHED] == frozenset()
    for state in S:
        reachable, frontier = {state}, [state]
        while frontier:
            for following in TRANSITIONS[frontier.pop()]:
                if following not in reachable:
                    reachable.add(following)
                    frontier.append(following)
        assert S.FINISHED in reachable


def test_replace_cannot_change_the_state():
    with pytest.raises(TypeError, match="only through Machine.transition"):
        machine().replace(state=S.FINISHED)
    assert machine().replace(deadline=NOW).deadline == NOW


# -- reconcile ---------------------------------------------------------------------------------------


def test_running_machines_listed_active_record_their_cpu_and_others_are_gone():
    running, stopping, quiet = machine(0, heartbeat=NOW - 60), machine(1, S.STOPPING), machine(2)
    listed = [("vm", Seen(running.uuid, "d0", cpu_seconds=42.0)),
              ("vm", Seen(stopping.uuid, "d1", active=False))]
    actions = lifecycle.reconcile([running, stopping, quiet], set(), listed,
                                  {running.uuid, stopping.uuid, quiet.uuid},
                                  {stopping.uuid: NOW - 30, quiet.uuid: None}, NOW)
    assert actions == [
        lifecycle.RecordCpu(running.uuid, 42.0),
        lifecycle.MarkGone(stopping.uuid, NOW - 30, "f1-01 (lhcb) is no longer running"),
        lifecycle.MarkGone(quiet.uuid, NOW - 900, "f1-02 (lhcb) is no longer running"),
    ]


def test_the_estimated_end_is_the_last_sign_of_life_never_after_now():
    seen = machine(heartbeat=NOW - 100)
    assert lifecycle.estimated_end(seen, None, NOW) == NOW - 100
    assert lifecycle.estimated_end(seen, NOW - 10, NOW) == NOW - 10
    assert lifecycle.estimated_end(seen, NOW + 500, NOW) == NOW
    assert lifecycle.estimated_end(machine(started=None, state=S.STOPPING), None, NOW) == NOW - 1000


def test_creating_machines_after_a_restart_are_adopted_or_finished():
    alive, never = machine(0, S.CREATING), machine(1, S.CREATING)
    actions = lifecycle.reconcile([alive, never], set(), [("vm", Seen(alive.uuid, "d0"))],
                                  {alive.uuid, never.uuid}, {}, NOW)
    assert [type(action) for action in actions] == [lifecycle.Adopt, lifecycle.MarkGone]
    assert actions[1] == lifecycle.MarkGone(never.uuid, NOW, "f1-01 was never started: finishing it")


def test_busy_machines_are_left_to_their_step():
    busy = machine(0, S.STOPPING)
    assert lifecycle.reconcile([busy], {busy.uuid}, [], {busy.uuid}, {}, NOW) == []


def test_unknown_listed_machines_are_zombies_of_their_backend_active_or_not():
    live = machine(0)
    listed = [("vm", Seen(live.uuid, "d0")), ("vm", Seen("stray", "d9")),
              ("engine", Seen("exited", "vac-exited", active=False)),
              ("engine", Seen("last-finished", "vac-last", active=False))]
    actions = lifecycle.reconcile([live], set(), listed, {live.uuid, "last-finished"}, {}, NOW)
    assert [a for a in actions if isinstance(a, lifecycle.DestroyZombie)] == [
        lifecycle.DestroyZombie("vm", "stray", "d9", True),
        lifecycle.DestroyZombie("engine", "exited", "vac-exited", False)]


# -- finishing ---------------------------------------------------------------------------------------


def test_due_finishes_skip_busy_machines_and_wait_for_their_retry():
    first, busy, waiting, running = (machine(0, S.FINISHING), machine(1, S.FINISHING),
                                     machine(2, S.FINISHING), machine(3))
    found = lifecycle.due_finishes([running, waiting, busy, first], {busy.uuid},
                                   {waiting.uuid: NOW + 1}, NOW)
    assert found == [lifecycle.Finish(first.uuid)]
    assert lifecycle.due_finishes([waiting], set(), {waiting.uuid: NOW}, NOW) == [
        lifecycle.Finish(waiting.uuid)]


LHCB = Machinetype(name="lhcb", fizzle_seconds=600)


@pytest.mark.parametrize(("started", "vm_message", "accounted", "expected"), [
    (NOW - 900, "200 Done", False, lifecycle.FinishSteps("200 Done", False, True)),
    (NOW - 900, None, False, lifecycle.FinishSteps(None, False, True)),
    (NOW - 900, None, True, lifecycle.FinishSteps(None, False, False)),
    (NOW - 10, None, False, lifecycle.FinishSteps("300 Vac detects fizzle after 10 seconds",
                                                  True, False)),
    (None, None, False, lifecycle.FinishSteps("300 Vac detects fizzle after 0 seconds", True,
                                              False)),
])
def test_finish_steps_write_the_factorys_message_only_if_the_vm_wrote_none(
        started, vm_message, accounted, expected):
    ending = machine(state=S.FINISHING, started=started, accounted=accounted)
    assert lifecycle.finish_steps(ending, LHCB, vm_message, NOW) == expected


def test_a_machinetype_no_longer_configured_is_never_accounted():
    assert not lifecycle.finish_steps(machine(state=S.FINISHING), None, None, NOW).account


@pytest.mark.parametrize(("reading", "problem"), [
    (50.0, None), (30.0, None), (None, "it was gone before it could be read"),
    (0.0, "the reading came back short, 0 s")])
def test_a_final_cpu_reading_never_lowers_the_total(reading, problem):
    assert lifecycle.final_cpu_problem(machine(cpu_seconds=30.0), reading) == problem
