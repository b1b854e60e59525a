"""Containers through vacd and its podman backend against bare ``podman run``s of the same image.

Targets (issue 15), all measured in the same run with the busybox image of
``tests/containerimage.py`` (imported locally):

1. **backend**: the backend's create-to-exit time of a container that exits at once, seen
   through its event stream (``on_stopped``) as vacd sees it, within 1.2x of a bare ``podman run
   --detach`` + ``podman wait`` of the same image and command;
2. **vacd creation**: a real vacd process (one slot, a podman machinetype whose user_data writes
   ``200 Success`` to its shutdown_message and exits after a second) creating each container:
   ``created`` -> ``started`` of its machine record (the directory, MJF, user_data and the engine's
   ``run``), within 1.2x of a bare ``podman run --detach`` alone;
3. **vacd turnaround**: the container's exit (the shutdown_message's modification time, its last
   act) -> the next container started in the slot (``started`` of the next record: the engine's
   ``run`` returned), p50 < 0.5 s.

Needs root and podman (runc). Run: ``python benchmarks/containers.py [--rounds 10] [--cycles 10]``.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.containerimage import busybox_image, remove_factory_containers  # noqa: E402
from tests.vacdprocess import machine_records  # noqa: E402
from vac.backends.container.cgroups import Cgroups  # noqa: E402
from vac.backends.container.engine import EngineBackend  # noqa: E402
from vac.core.config import Machinetype, Settings  # noqa: E402
from vac.core.model import Machine  # noqa: E402

RUNTIME = "runc"
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def bare_run(image: str) -> tuple[float, float]:
    """(``podman run --detach`` alone, run + ``podman wait``) in seconds."""
    start = time.perf_counter()
    name = f"vac-bench-{uuid.uuid4()}"
    subprocess.run(["podman", "run", "--detach", "--runtime", RUNTIME, "--network", "none",
                    *LIMITS, "--name", name, image, "/bin/sh", "-c", "exit 0"],
                   check=True, capture_output=True, timeout=120)
    started = time.perf_counter() - start
    subprocess.run(["podman", "wait", name], check=True, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - start
    subprocess.run(["podman", "rm", "--force", name], check=True, capture_output=True, timeout=120)
    return started, elapsed


def backend_run(backend: EngineBackend, stopped: queue.Queue, settings: Settings,
                machinetype: Machinetype, state: Path) -> float:
    now = time.time()
    machine = Machine(uuid=str(uuid.uuid4()), name="bench-00.bench.invalid", slot=0,
                      machinetype="bench", machine_model="podman", processors=1, created=now,
                      deadline=now + 3600)
    directory = state / machine.uuid
    for sub in ("machinefeatures", "jobfeatures", "joboutputs"):
        (directory / sub).mkdir(parents=True)
    (directory / "user_data").write_text("#!/bin/sh\nexit 0\n")
    start = time.perf_counter()
    backend.create(machine, machinetype, settings, directory)
    while stopped.get(timeout=120) != machine.uuid:
        pass
    elapsed = time.perf_counter() - start
    backend.release(machine, settings, directory)
    return elapsed


VACD_USER_DATA = """#!/bin/sh
sleep 1
echo "200 Success" > $JOBOUTPUTS/shutdown_message
"""


def vacd_cycles(image: str, cycles: int, root: Path) -> tuple[list[float], list[float]]:
    """(creation seconds, turnaround seconds) of ``cycles`` containers in one slot of a vacd."""
    factory = f"bench{uuid.uuid4().hex[:8]}.bench.invalid"
    state = root / "state"
    (root / "vac.d").mkdir()
    (root / "user_data").write_text(VACD_USER_DATA)
    (root / "vac.d" / "10-bench.conf").write_text(f"""
[settings]
vac_space = bench.invalid
factory_name = {factory}
state_dir = {state}
total_processors = 1
mb_per_processor = 128
http_port = 0
vacquery_address = 127.0.0.1
vacquery_port = 0
overload_per_processor = 1000
container_runtime = {RUNTIME}
container_network = none

[machinetype bench]
target_share = 1
machine_model = podman
root_image = docker://{image}
user_data = {root}/user_data
fizzle_seconds = 0
""")
    vacd = subprocess.Popen(
        [sys.executable, "-m", "vac.daemon.vacd", "--conf-dir", str(root / "vac.d"),
         "--conf", str(root / "absent.conf"), "--run-conf", str(root / "run.conf"),
         "--log-file", str(root / "vacd.log")], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60 + 10 * cycles
    records: list[dict] = []
    try:
        while time.monotonic() < deadline and vacd.poll() is None:
            records = machine_records(state / "machines")
            if sum(record["started"] is not None for record in records) > cycles:
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"vacd did not run {cycles + 1} containers in time; see "
                             f"{root / 'vacd.log'}")
    finally:
        vacd.send_signal(signal.SIGTERM)
        vacd.wait(timeout=60)
        remove_factory_containers(factory)
    records = sorted((r for r in records if r["started"] is not None), key=lambda r: r["created"])
    creations = [r["started"] - r["created"] for r in records]
    turnarounds = []
    for ended, following in zip(records, records[1:]):
        message = ended["dir"] / "joboutputs" / "shutdown_message"
        if message.exists():
            turnarounds.append(following["started"] - message.stat().st_mtime)
    return creations, turnarounds


def p50_ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:.0f} ms (n={len(values)}, " \
           f"min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=10, help="vacd turnarounds to measure")
    args = parser.parse_args()
    image = busybox_image("podman")
    factory = f"bench{uuid.uuid4().hex[:8]}.bench.invalid"
    cgroup_root = f"/vac-bench-{uuid.uuid4()}"
    settings = Settings(vac_space="bench.invalid", factory_name=factory, mb_per_processor=128,
                        container_runtime=RUNTIME, container_network="none")
    machinetype = Machinetype(name="bench", root_image=f"docker://{image}", machine_model="podman")
    stopped: queue.Queue = queue.Queue()
    backend = EngineBackend(factory, stopped.put, runtime=RUNTIME, network="none",
                            cgroup_root=cgroup_root)
    backend.connect()
    bare_runs, bare, ours = [], [], []
    try:
        with tempfile.TemporaryDirectory() as state:
            for _ in range(args.rounds):  # interleaved, so load changes hit both alike
                started, ended = bare_run(image)
                bare_runs.append(started)
                bare.append(ended)
                ours.append(backend_run(backend, stopped, settings, machinetype, Path(state)))
    finally:
        backend.close()
        detected = Cgroups.detect()
        if detected is not None:
            detected.remove(cgroup_root)
    # vacd's directories must be searchable by the container: not a 0700 temporary directory.
    root = Path(tempfile.mkdtemp(prefix="vac-bench-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        creations, turnarounds = vacd_cycles(image, args.cycles, root)
        for _ in range(args.rounds):  # bare runs again, after vacd, for the same conditions
            bare_runs.append(bare_run(image)[0])
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)
    print(f"bare podman run --detach: {p50_ms(bare_runs)}")
    print(f"bare podman run + wait: {p50_ms(bare)}")
    verdict = {True: "met", False: "NOT met"}
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"backend create -> on_stopped: {p50_ms(ours)}; ratio {ratio:.2f} (target <= 1.2): "
          f"{verdict[ratio <= 1.2]}")
    ratio = statistics.median(creations) / statistics.median(bare_runs)
    print(f"vacd creation (created -> started): {p50_ms(creations)}; ratio to a bare run "
          f"{ratio:.2f} (target <= 1.2): {verdict[ratio <= 1.2]}")
    turnaround = statistics.median(turnarounds)
    print(f"vacd turnaround (exit -> next container started): {p50_ms(turnarounds)} "
          f"(target p50 < 500 ms): {verdict[turnaround < 0.5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
