"""vac simulate: scenario format, the simulated factories against the real planner, and outcomes
that are known analytically (share convergence, probes only without work, recovery)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from pathlib import Path

import pytest

from vac.cli import main as cli
from vac.cli import scenario as scenarios
from vac.cli import simulate
from vac.core import scheduler
from vac.core.model import MachineState

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "etc" / "simulate").glob("*.ini"))


def write_scenario(directory: Path, *, simulation: dict, hosts: dict, work: dict, machinetypes: dict,
                   settings: dict = None, name: str = "scenario.ini") -> str:
    """A scenario file with its configuration inline; values are written as given."""
    lines = ["[simulation]", *(f"{key} = {value}" for key, value in simulation.items())]
    for group, (count, processors) in hosts.items():
        lines += [f"[hosts {group}]", f"count = {count}", f"processors = {processors}"]
    for machinetype, options in work.items():
        lines += [f"[work {machinetype}]", *(f"{key} = {value}" for key, value in options.items())]
    lines += ["[settings]", "vac_space = sim.example.org", "factory_name = wn.sim.example.org"]
    lines += [f"{key} = {value}" for key, value in (settings or {}).items()]
    for machinetype, options in machinetypes.items():
        lines += [f"[machinetype {machinetype}]", "root_image = https://images.example.org/a.iso",
                  "user_data = https://vo.example.org/user_data",
                  *(f"{key} = {value}" for key, value in options.items())]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def two_types(directory: Path, *, beta_work: str = "always", duration: str = "12h", hosts: int = 20,
              processors: int = 8, settings: dict = None, **simulation) -> str:
    """alpha (share 2) always has work; beta (share 1) has ``beta_work``."""
    backoff = {"backoff_seconds": 900, "fizzle_seconds": 600}
    return write_scenario(
        directory,
        simulation={"duration": duration, "window": "1h", **simulation},
        hosts={"wn": (hosts, processors)},
        work={"alpha": {"run_time": "uniform 1h 3h"},
              "beta": {"work": beta_work, "run_time": "uniform 1h 3h"}},
        machinetypes={"alpha": {"target_share": 2, **backoff}, "beta": {"target_share": 1, **backoff}},
        settings=settings,
    )


# ---------------------------------------------------------------------------------------------
# Scenario values


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("90s", 90), ("15m", 900), ("6h", 21600), ("1d", 86400), ("1h30m", 5400),
    ("2.5h", 9000), ("10:00", 36000), ("10:30:15", 37815), ("26:00", 93600), (" 6H ", 21600),
])
def test_durations(text, seconds):
    assert scenarios.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "6x", "h", "-5", "1h 30m", "10:60", "inf", "nan", "5m6"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="duration"):
        scenarios.parse_duration(text)


def test_work_timelines():
    outage = scenarios.parse_work("always except 10:00-14:00")
    assert outage.intervals == ((0, 36000), (50400, math.inf))
    assert [outage.has_work(t) for t in (0, 35999, 36000, 50399, 50400, 10**6)] == [
        True, True, False, False, True, True]
    assert outage.returns() == (50400,)
    assert outage.describe() == "00:00-10:00, 14:00-"
    assert scenarios.parse_work("never").has_work(0) is False
    assert scenarios.parse_work("always").describe() == "always"
    # Unsorted and overlapping intervals are merged; an open end runs for ever.
    windows = scenarios.parse_work("14:00-, 2h-4h 3h-5h")
    assert windows.intervals == ((7200, 18000), (50400, math.inf))
    assert windows.returns() == (7200, 50400)
    assert scenarios.parse_work("always except 0-1h").intervals == ((3600, math.inf),)


@pytest.mark.parametrize("text, message", [
    ("sometimes", "not an interval"), ("4h-2h", "ends before it starts"), ("-4h", "not an interval"),
    ("1h-2x", "not a duration"),
])
def test_bad_work_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        scenarios.parse_work(text)


def test_run_time_distributions():
    rng = random.Random(3)
    assert scenarios.parse_run_time("fixed 2h").sample(rng) == 7200
    uniform = [scenarios.parse_run_time("uniform 1h 2h").sample(rng) for _ in range(500)]
    assert 3600 <= min(uniform) and max(uniform) <= 7200
    for text in ("exponential 6h", "lognormal 6h 3h"):
        draws = [scenarios.parse_run_time(text).sample(rng) for _ in range(4000)]
        assert min(draws) >= 1
        assert sum(draws) / len(draws) == pytest.approx(21600, rel=0.08), text


@pytest.mark.parametrize("text, message", [
    ("gamma 2h", "use fixed"), ("uniform 2h", "takes 2"), ("uniform 3h 2h", "MIN <= MAX"),
    ("fixed 0", "positive"), ("", "use fixed"),
])
def test_bad_run_times_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        scenarios.parse_run_time(text)


# ---------------------------------------------------------------------------------------------
# Loading scenarios


def test_scenario_with_inline_configuration(tmp_path):
    scenario = scenarios.load_scenario(two_types(tmp_path, beta_work="always except 1h-2h", seed=7))
    assert scenario.seed == 7 and scenario.duration == 43200 and scenario.window == 3600
    assert scenario.capacity == 160 and scenario.factory_count == 20
    assert set(scenario.work) == {"alpha", "beta"}
    assert scenario.work["beta"].work.returns() == (7200,)
    assert scenario.tick_seconds == scenario.config.settings.reconcile_seconds
    assert scenario.warnings == ()  # our own sections are not reported as unknown to vac


def test_scenario_referencing_a_configuration_directory(tmp_path):
    conf_dir = tmp_path / "vac.d"
    conf_dir.mkdir()
    (conf_dir / "10-settings.conf").write_text(
        "[settings]\nvac_space = prod.example.org\nfactory_name = wn1.prod.example.org\n")
    (conf_dir / "20-lhcb.conf").write_text(
        "[machinetype lhcb]\ntarget_share = 3\nroot_image = a.iso\nuser_data = u\n"
        "[machinetype idle]\nroot_image = a.iso\nuser_data = u\n")
    path = tmp_path / "s.ini"
    path.write_text("[simulation]\nconfig = vac.d\n[hosts a]\ncount = 2\n[work lhcb]\nwork = never\n"
                    "[work idle]\nwork = always\n")
    scenario = scenarios.load_scenario(str(path))
    assert scenario.config.settings.vac_space == "prod.example.org"
    assert list(scenario.work) == ["lhcb"] and not scenario.work["lhcb"].work.intervals
    assert scenario.groups == (scenarios.FactoryGroup("a", 2, 64),)
    assert any("idle has no target_share" in warning for warning in scenario.warnings)


def test_scenario_referencing_a_directory_and_a_file(tmp_path):
    (tmp_path / "vac.d").mkdir()
    (tmp_path / "vac.d" / "a.conf").write_text(
        "[settings]\nvac_space = prod.example.org\nfactory_name = wn1.prod.example.org\n"
        "[machinetype a]\ntarget_share = 3\nroot_image = a.iso\nuser_data = u\n")
    (tmp_path / "vac.conf").write_text("[machinetype a]\ntarget_share = 4\n")
    path = tmp_path / "s.ini"
    path.write_text("[simulation]\nconfig = vac.conf vac.d\n[hosts a]\n")
    assert scenarios.load_scenario(str(path)).config.machinetypes["a"].target_share == 4
    path.write_text("[simulation]\nconfig = vac.conf vac.conf\n[hosts a]\n")
    with pytest.raises(scenarios.ScenarioError, match="at most one directory and one file"):
        scenarios.load_scenario(str(path))


def test_the_scenario_overrides_a_referenced_configuration_file(tmp_path):
    (tmp_path / "vac.conf").write_text(
        "[settings]\nvac_space = prod.example.org\nfactory_name = wn1.prod.example.org\n"
        "[machinetype a]\ntarget_share = 3\nroot_image = a.iso\nuser_data = u\n")
    path = tmp_path / "s.ini"
    path.write_text("[simulation]\nconfig = vac.conf\n[hosts a]\n"
                    "[machinetype a]\ntarget_share = 5\n[settings]\ndraining = true\n")
    scenario = scenarios.load_scenario(str(path))
    assert scenario.config.machinetypes["a"].target_share == 5
    assert scenario.config.settings.draining is False
    assert any("draining and shutdown_time are not simulated" in w for w in scenario.warnings)


@pytest.mark.parametrize("text, message", [
    ("[hosts a]\n", "no \\[simulation\\] section"),
    ("[simulation]\n", "no \\[hosts NAME\\] section"),
    ("[simulation]\ndurashun = 1h\n[hosts a]\n", "unknown option 'durashun'"),
    ("[simulation]\nduration = soon\n[hosts a]\n", "\\[simulation\\] duration: 'soon' is not a duration"),
    ("[simulation]\nduration = 0\n[hosts a]\n", "duration must be greater than 0"),
    ("[simulation]\n[hosts a]\ncount = 0\n", "count and processors must be at least 1"),
    ("[simulation]\n[hosts a]\ncount = 2.5\n", "\\[hosts a\\] count: '2.5' is not an integer"),
    ("[simulation]\nprobe_seconds = 0\n[hosts a]\n", "probe_seconds must be greater than 0"),
    ("[simulation]\n[hosts a]\n[work a]\nprobe_seconds = 0\n", "\\[work a\\] probe_seconds must be greater"),
    ("[simulation]\n[hosts A_1]\n", "needs a name"),
    ("[simulation]\n[hosts a]\n[work b]\nrun_time = fixed 1h\n", "no machinetype b in the configuration"),
    ("[simulation]\n[hosts a]\n[work a]\nwork = 3h-1h\n", "\\[work a\\] work: interval '3h-1h' ends"),
    ("[simulation]\nconfig = nowhere\n[hosts a]\n", "config: no such file or directory"),
    ("[simulation]\n[hosts a]\n[settings]\nvac_space = x.org\n", "no machinetype has target_share > 0"),
    ("[simulation]\n[hosts a]\n[settings]\nmax_creating = many\n", "configuration errors"),
    ("[simulation]\n[simulation]\n", "already exists"),
    ("no section\n", "scenario .*: File contains no section headers"),
])
def test_bad_scenarios_are_refused_with_a_specific_message(tmp_path, text, message):
    path = tmp_path / "bad.ini"
    if "[settings]" not in text:
        text += "[settings]\nvac_space = sim.example.org\nfactory_name = f.sim.example.org\n"
        text += "[machinetype a]\ntarget_share = 1\nroot_image = a.iso\nuser_data = u\n"
    path.write_text(text)
    with pytest.raises(scenarios.ScenarioError, match=message):
        scenarios.load_scenario(str(path))


def test_missing_scenario_file(tmp_path):
    with pytest.raises(scenarios.ScenarioError, match="cannot read scenario .*No such file"):
        scenarios.load_scenario(str(tmp_path / "absent.ini"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_scenarios_load_cleanly(path):
    scenario = scenarios.load_scenario(str(path))
    assert scenario.description and scenario.warnings == ()


# ---------------------------------------------------------------------------------------------
# The simulated factories are the daemon's, as the planner sees them


def _per_peer_reports(simulation: simulate.Simulation, now: float) -> tuple:
    """One fresh report per factory, recomputed from its machines, as the daemon's cache holds."""
    reports = []
    for factory in simulation.factories:
        reports += scheduler.local_machinetype_reports(
            factory.config, tuple(factory.machines.values()), factory.finishes, factory.name, now)
    return tuple(reports)


@pytest.mark.parametrize("duration", ["1h13m", "1h41m", "2h31m", "3h02m"])
def test_summed_peer_reports_give_the_planner_the_same_decisions(tmp_path, duration):
    # peer_cache_seconds = 0: every factory's view is the present, so it can be compared with
    # reports recomputed from all machines. beta never has work: it probes and aborts all the time.
    path = two_types(tmp_path, beta_work="never", duration=duration, hosts=12, processors=6,
                     settings={"peer_cache_seconds": 0, "hs06_per_processor": 10.5, "max_probes": 3},
                     probe_seconds="7m")
    simulation = simulate.Simulation(scenarios.load_scenario(path))
    simulation.run()
    now = simulation.end
    per_peer = _per_peer_reports(simulation, now)
    covered = {"creates": 0, "aborts": 0, "young": 0}
    for factory in simulation.factories:
        local = scheduler.local_machinetype_reports(
            factory.config, tuple(factory.machines.values()), factory.finishes, factory.name, now)
        own = simulation.own_reports(factory)
        assert [dataclasses.replace(report, running_hs06=0) for report in own] == [
            dataclasses.replace(report, running_hs06=0) for report in local]
        assert [report.running_hs06 for report in own] == pytest.approx([r.running_hs06 for r in local])

        ours = simulation.snapshot(factory, now)
        theirs = dataclasses.replace(ours, reports=per_peer)
        assert scheduler.standings(factory.config, ours.reports, now) == scheduler.standings(
            factory.config, theirs.reports, now)
        # Some machines gone from the slots: creation is planned from the reports, not vetoed.
        ours = dataclasses.replace(ours, machines=ours.machines[3:])
        theirs = dataclasses.replace(theirs, machines=ours.machines)
        seed = sum(map(ord, factory.name))
        ours_plan = scheduler.plan(ours, random.Random(seed))
        assert ours_plan.actions == scheduler.plan(theirs, random.Random(seed)).actions
        covered["creates"] += any(isinstance(a, scheduler.Create) for a in ours_plan.actions)
        beta = scheduler.standings(factory.config, ours.reports, now)["beta"]
        covered["aborts"] += beta.last_abort_time is not None
        covered["young"] += any(s.num_before_fizzle > 0 for s in scheduler.standings(
            factory.config, ours.reports, now).values())
    assert covered["creates"] > 0 and covered["aborts"] > 0 and covered["young"] > 0


def test_peer_cache_shows_peers_as_of_the_last_refresh(tmp_path):
    # One refresh at 00:00 (an empty space), the next only at 02:00: until then each factory
    # knows only its own machines, so each fills itself 2:1 by its own report.
    path = two_types(tmp_path, duration="1h", hosts=4, processors=9, peer_cache_phases=1,
                     settings={"peer_cache_seconds": 7200})
    simulation = simulate.Simulation(scenarios.load_scenario(path))
    simulation.run()
    for factory in simulation.factories:
        peers = simulation.peer_reports(factory)
        assert [(r.running_machines, r.num_before_fizzle) for r in peers] == [(0, 0), (0, 0)]
        own = {r.machinetype: r.running_processors for r in simulation.own_reports(factory)}
        assert own == {"alpha": 6, "beta": 3}
    # With refreshes every 30 s the same space sees its peers.
    simulation = simulate.Simulation(scenarios.load_scenario(two_types(tmp_path, duration="1h", hosts=4)))
    simulation.run()
    peers = simulation.peer_reports(simulation.factories[0])
    assert sum(r.running_machines for r in peers) == 24  # 3 other factories × 8 processors


def test_machines_past_their_deadline_are_shut_down_by_the_planner(tmp_path):
    path = write_scenario(
        tmp_path, simulation={"duration": "5h", "stop_seconds": 20}, hosts={"wn": (3, 4)},
        work={"long": {"run_time": "fixed 10h"}},
        machinetypes={"long": {"target_share": 1, "max_wallclock_seconds": 3600}})
    simulation = simulate.Simulation(scenarios.load_scenario(path))
    result = simulation.run()
    scenario = simulation.scenario
    limit = 3600 + scenario.tick_seconds + scenario.stop_seconds
    assert result.machinetypes["long"].vms >= 12 * 4  # replaced about every hour
    for factory in simulation.factories:
        assert all(simulation.end - machine.created <= limit + scenario.create_seconds
                   for machine in factory.machines.values())
        finish = factory.finishes["long"]
        assert finish.shutdown_message is None  # killed at its deadline after real work: no abort
    stopping = [m for f in simulation.factories for m in f.machines.values() if m.state is MachineState.STOPPING]
    assert all(simulation.end - machine.stop_requested <= scenario.stop_seconds for machine in stopping)


# ---------------------------------------------------------------------------------------------
# Outcomes known analytically


def test_shares_converge_to_their_targets(tmp_path):
    result = simulate.simulate(scenarios.load_scenario(two_types(tmp_path, duration="12h")))
    assert result.machinetypes["alpha"].target == pytest.approx(2 / 3)
    # Run times of 1-3 h: after the first 3 h every machine has been replaced at least once, by
    # the planner choosing the type furthest below its share. Tolerance: one machine in 40 of
    # the 160 processors may be on the "wrong" type while reports are up to 30 s old.
    for window in result.windows[3:]:
        assert window.busy_fraction > 0.99
        assert window.shares()["alpha"] == pytest.approx(2 / 3, abs=0.025)
    assert result.fill_seconds is not None and result.fill_seconds < 1800
    assert result.machinetypes["beta"].probe_vms == 0


@pytest.mark.parametrize("peer_cache_seconds", [0, 30])
def test_a_type_without_work_only_probes(tmp_path, peer_cache_seconds):
    scenario = scenarios.load_scenario(two_types(tmp_path, beta_work="never", duration="12h",
                                                settings={"peer_cache_seconds": peer_cache_seconds}))
    result = simulate.simulate(scenario)
    beta = result.machinetypes["beta"]
    assert beta.vms == beta.probe_vms > 0  # every beta VM found no work
    assert beta.probe_processor_hours == pytest.approx(beta.probe_vms * 300 / 3600)
    # Probes run 300 s: beta holds a small fraction of the space, alpha the rest.
    assert result.whole.shares()["beta"] < 0.03
    assert result.whole.busy_fraction > 0.95
    if peer_cache_seconds == 0:
        # Views are never stale: at most max_probes (2) young probes exist space-wide, and after
        # each abort nothing starts for backoff_seconds (900 s); a probe lives 300 s. So at most 2
        # probes per 1,200 s, never more than 2 at once.
        assert beta.probe_vms <= 2 * (scenario.duration / 1200 + 1)
        assert max(result.sample_processors["beta"]) <= 2
    else:
        # Factories whose cache does not yet show the others' probes start probes too.
        assert max(result.sample_processors["beta"]) > 2


def test_a_type_recovers_when_its_work_returns(tmp_path):
    scenario = scenarios.load_scenario(two_types(tmp_path, beta_work="4h-", duration="10h"))
    result = simulate.simulate(scenario)
    beta = result.machinetypes["beta"]
    assert beta.probe_vms > 0
    (returned, after), = beta.recoveries
    assert returned == 4 * 3600
    # The last probe without work may start just before 04:00 and ends probe_seconds later; then
    # backoff_seconds (+ fizzle_seconds while probes are young), the factory's next tick, its
    # next cache refresh and the creation time pass before a VM starts and finds work.
    settings = scenario.config.settings
    machinetype = scenario.config.machinetypes["beta"]
    bound = (scenario.work["beta"].probe_seconds + machinetype.backoff_seconds + machinetype.fizzle_seconds
             + scenario.tick_seconds + settings.peer_cache_seconds + scenario.create_seconds)
    assert 0 <= after <= bound
    # Then beta takes processors as alpha's machines end (1-3 h) until it has its share.
    assert result.windows[3].shares()["beta"] < 0.05
    assert result.windows[-1].shares()["beta"] == pytest.approx(1 / 3, abs=0.03)


def test_the_same_seed_gives_the_same_run(tmp_path):
    scenario = scenarios.load_scenario(two_types(tmp_path, beta_work="always except 1h-2h", duration="4h"))
    first, second = (simulate.simulate(scenario).to_dict() for _ in range(2))
    other = simulate.simulate(scenario.replace(seed=2)).to_dict()
    for run in (first, second, other):
        run.pop("wall_seconds")
    assert first == second and first != other


# ---------------------------------------------------------------------------------------------
# Output and command line


def test_summary_and_json(tmp_path):
    scenario = scenarios.load_scenario(two_types(tmp_path, beta_work="always except 1h-2h",
                                                duration="3h", description="outage"))
    result = simulate.simulate(scenario)
    text = simulate.format_summary(result)
    assert text.startswith(f"Scenario {scenario.path}: outage\n20 factories, 160 processors")
    assert "00:00-01:00" in text and "whole run" in text and "02:00-03:00" in text
    assert "(66.7%)" in text and "(33.3%)" in text
    assert "beta         33.3%" in text and "02:00: 00:" in text  # recovery after work returned
    assert "Idle: " in text and "Filled to 95.0% of the processors: after 00:" in text
    data = json.loads(simulate.format_json(result))
    assert data["scenario"]["capacity"] == 160
    assert data["machinetypes"]["beta"]["recoveries"][0]["work_returned"] == 7200
    assert data["scenario"]["work"]["beta"]["work"] == "00:00-01:00, 02:00-"
    assert len(data["windows"]) == 3 and data["windows"][0]["end"] == 3600
    assert len(data["samples"]["times"]) == len(data["samples"]["processors"]["alpha"]) == 37
    assert data["idle_processor_hours"] == pytest.approx(result.idle_processor_hours)


def test_command_line(tmp_path, capsys):
    path = two_types(tmp_path, duration="2h")
    assert cli.main(["simulate", path, "--json", "--duration", "90m", "--seed", "5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scenario"]["duration"] == 5400 and data["scenario"]["seed"] == 5
    assert cli.main(["simulate", path]) == 0
    assert "Share of processors in use" in capsys.readouterr().out
    assert cli.main(["simulate", str(tmp_path / "absent.ini")]) == 1
    assert "vac simulate: cannot read scenario" in capsys.readouterr().err
    assert cli.main(["simulate", path, "--duration", "0"]) == 1
    assert "--duration must be greater than 0" in capsys.readouterr().err


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = two_types(tmp_path, beta_work="always except 1h-2h", duration="3h")
    png = tmp_path / "out.png"
    assert cli.main(["simulate", path, "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10000
    with pytest.raises(simulate.PlotError, match="cannot write"):
        simulate.plot(simulate.simulate(scenarios.load_scenario(path)), str(tmp_path / "no" / "x.png"))


def test_plot_without_matplotlib_fails_before_simulating(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(simulate, "simulate", lambda scenario: pytest.fail("simulated anyway"))
    assert cli.main(["simulate", two_types(tmp_path), "--plot", str(tmp_path / "x.png")]) == 1
    assert "plots need matplotlib: pip install 'vac[plots]'" in capsys.readouterr().err
