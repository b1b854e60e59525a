"""vcycled's cycle time with 1,000 machines in one space, cloud calls against moto's EC2 server.

Target (ARCHITECTURE.md §8, issue 16): < 2 s per cycle. The space holds ``--machines`` running
instances tagged as vcycle machines of the space (started with RunInstances directly); the first
cycle takes them over (writing their records), the measured cycles are the steady state: list
(DescribeInstanceStatus, describing only instances not seen before), quota, plan, heartbeat
checks, nothing to create (the quota is full). Also prints the resident memory of the process
afterwards, and the time of one more listing (``list_machines()``) made on its own after the
cycles. The cycle is vcycled's own: ``SpaceWorker.cycle`` on vac's Executor, one listing per
cycle (``Executor.reconcile``).

The first cycle describes every instance once (DescribeInstances, 200 IDs a call) and writes
the records; the steady cycles list only states (DescribeInstanceStatus) and describe nothing
new. Before that split, one full DescribeInstances of 1,000 instances each cycle took ~3 s here
(moto generating ~2 s, botocore parsing ~1 s).
Run: ``python benchmarks/vcycle.py [--machines 1000] [--cycles 5] [--profile 25]``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import boto3  # noqa: E402

from tests.cloudservers import MotoServer  # noqa: E402
from vac.core import cloud  # noqa: E402
from vac.core.config import Machinetype  # noqa: E402
from vac.core.vcycleconfig import CloudMachinetype, Space  # noqa: E402
from vac.daemon.runtime import LoopRuntime  # noqa: E402
from vac.daemon.vcycled import SpaceWorker, cloud_backend  # noqa: E402

SPACE = "bench.example.org"
KEY, SECRET = "AKIAVCYCLEBENCH00001", "vcycle-bench-secret"
TARGET_SECONDS = 2.0


async def measure(space: Space, root: Path, args: argparse.Namespace) -> tuple:
    runtime = LoopRuntime(time.time)
    worker = SpaceWorker(space, "vcycle.example.org", root / "state", ("127.0.0.1", 8443),
                         cloud_backend, time.time(), random.Random(1), runtime)
    start = time.perf_counter()
    await worker.cycle(time.time())  # takes the machines over
    first = time.perf_counter() - start
    profile = cProfile.Profile() if args.profile else None
    times = []
    for _ in range(args.cycles):
        start = time.perf_counter()
        if profile:
            profile.enable()
        plan = await worker.cycle(time.time())
        if profile:
            profile.disable()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    worker.backends.backend.list_machines()
    listing = time.perf_counter() - start
    await runtime.cancel()
    if profile:
        # The calls in the runtime's threads are not profiled from here: profile the listing alone.
        listing_profile = cProfile.Profile()
        listing_profile.runcall(worker.backends.backend.list_machines)
        pstats.Stats(listing_profile).sort_stats("cumulative").print_stats(args.profile)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)
    return first, times, plan, listing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N functions of vcycled's process taking most time in the cycles")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        moto = MotoServer(root / "moto.log")
        try:
            ec2 = boto3.client("ec2", endpoint_url=moto.url, region_name="us-east-1",
                               aws_access_key_id=KEY, aws_secret_access_key=SECRET)
            image = ec2.describe_images(MaxResults=5)["Images"][0]["ImageId"]
            for start in range(0, args.machines, 250):
                count = min(250, args.machines - start)
                for _ in range(count):
                    name = cloud.machine_name("lhcb")
                    tags = [{"Key": "Name", "Value": name}, {"Key": cloud.META_MACHINETYPE, "Value": "lhcb"},
                            {"Key": cloud.META_SPACE, "Value": SPACE}]
                    ec2.run_instances(ImageId=image, InstanceType="t2.micro", MinCount=1, MaxCount=1,
                                      TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
            machinetype = Machinetype(name="lhcb", target_share=1.0, root_image=f"image:{image}",
                                      user_data=str(root / "user_data"), max_processors=1,
                                      heartbeat_file="heartbeat", heartbeat_seconds=3600)
            space = Space(name=SPACE, api="ec2", url=moto.url, region="us-east-1", access_key=KEY,
                          secret_key=SECRET, flavor_names=("t2.micro",), processors_limit=args.machines,
                          machinetypes={"lhcb": CloudMachinetype(machinetype)})
            first, times, plan, listing = asyncio.run(measure(space, root, args))
            creates = sum(1 for action in plan.actions if type(action).__name__ == "Create")
        finally:
            moto.stop()
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    slowest = max(times)
    print(f"vcycled cycle, {args.machines} machines (moto EC2): median {statistics.median(times):.3f} s, "
          f"max {slowest:.3f} s over {args.cycles} cycles (target < {TARGET_SECONDS:g} s each: "
          f"{'PASS' if slowest < TARGET_SECONDS else 'MISS'}); a separate listing after the cycles "
          f"(list_machines() alone) {listing:.3f} s; first cycle (takeover of all) {first:.3f} s; "
          f"{creates} creations in the last; peak RSS {rss_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
