"""Wall time of ``vac simulate`` for one simulated day of 1,000 factories × 64 processors × 10
machinetypes (etc/simulate/ten-types.ini), with a small space as baseline in the same run.

Run: .venv/bin/python benchmarks/simulate.py [--factories N] [--small N] [--duration D]

Printed per case: wall and CPU seconds, events, planner calls (and planning requests skipped
because a factory was full), the share of the time spent inside vac.core.scheduler.plan, microseconds
per planner call, and the ratio of wall time per factory against the small case (1.0 means the
simulation scales linearly with the number of factories).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vac.cli import simulate  # noqa: E402
from vac.cli.scenario import format_offset  # noqa: E402
from vac.core import scheduler  # noqa: E402

SCENARIO = ROOT / "etc" / "simulate" / "ten-types.ini"
TARGET_SECONDS = 300.0  # "a few minutes" on a 2-core machine


class PlannerClock:
    """Wraps scheduler.plan (which the simulation calls through the module) to time it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = scheduler.plan

    def __enter__(self) -> PlannerClock:
        def timed(snapshot, rng):
            started = time.perf_counter()
            try:
                return self.original(snapshot, rng)
            finally:
                self.seconds += time.perf_counter() - started

        scheduler.plan = timed
        return self

    def __exit__(self, *_) -> None:
        scheduler.plan = self.original


def run_case(scenario: simulate.Scenario, factories: int) -> dict:
    group = dataclasses.replace(scenario.groups[0], count=factories)
    scenario = scenario.replace(groups=(group,))
    started, started_cpu = time.perf_counter(), time.process_time()
    with PlannerClock() as planner:
        result = simulate.simulate(scenario)
    wall = time.perf_counter() - started
    return {
        "factories": factories, "wall": wall, "cpu": time.process_time() - started_cpu,
        "events": result.events, "plans": result.plans, "skipped": result.skipped_plans,
        "planner": planner.seconds, "vms": sum(outcome.vms for outcome in result.machinetypes.values()),
        "busy": result.whole.busy_fraction,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factories", type=int, default=1000, help="the large case (default %(default)s)")
    parser.add_argument("--small", type=int, default=10, help="the baseline case (default %(default)s)")
    parser.add_argument("--duration", default="24h", help="simulated time (default %(default)s)")
    args = parser.parse_args()
    scenario = simulate.load_scenario(str(SCENARIO))
    scenario = scenario.replace(duration=simulate.parse_duration(args.duration))
    processors = scenario.groups[0].processors
    print(f"scenario {SCENARIO.name}: {len(scenario.work)} machinetypes, {processors} processors per "
          f"factory, {format_offset(scenario.duration)} simulated")
    print(f"{'factories':>9} {'wall s':>8} {'cpu s':>8} {'events':>9} {'VMs':>8} {'plans':>8} "
          f"{'skipped':>9} {'planner':>8} {'us/plan':>8} {'in use':>7} {'ratio':>6}")
    baseline = None
    large = None
    for factories in (args.small, args.factories):
        case = run_case(scenario, factories)
        per_factory = case["wall"] / factories
        baseline = baseline or per_factory
        large = case
        print(f"{factories:>9} {case['wall']:>8.1f} {case['cpu']:>8.1f} {case['events']:>9} "
              f"{case['vms']:>8} {case['plans']:>8} {case['skipped']:>9} "
              f"{case['planner'] / case['wall']:>8.0%} {1e6 * case['planner'] / max(case['plans'], 1):>8.0f} "
              f"{case['busy']:>7.1%} {per_factory / baseline:>6.2f}")
    verdict = "meets" if large["wall"] < TARGET_SECONDS else "MISSES"
    print(f"{args.factories} factories: {large['wall']:.0f} s wall time: {verdict} the "
          f"{TARGET_SECONDS:.0f} s target")
    return 0 if large["wall"] < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
