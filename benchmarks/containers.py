"""Per-container cost of the podman backend against a bare ``podman run`` of the same image.

Target (issue 15): the backend's create-to-exit time within 1.2x of a bare ``podman run
--detach`` of the same image and command, measured in the same run. Both start a busybox
container (``tests/containerimage.py``, imported locally) that exits at once, then wait for it to
end: the bare side with ``podman wait``, the backend side through its event stream
(``on_stopped``), as vacd would. The daemon's own turnaround (exit -> next container in the slot)
is to be added to ``benchmarks/turnaround.py`` once vacd drives containers through the seam.
Needs root and podman (runc). Run: ``python benchmarks/containers.py [--rounds 10]``.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.containerimage import busybox_image  # noqa: E402
from vac.backends.container.cgroups import Cgroups  # noqa: E402
from vac.backends.container.engine import EngineBackend  # noqa: E402
from vac.core.config import Machinetype, Settings  # noqa: E402
from vac.core.model import Machine  # noqa: E402

RUNTIME = "runc"
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def bare_run(image: str) -> float:
    start = time.perf_counter()
    name = f"vac-bench-{uuid.uuid4()}"
    subprocess.run(["podman", "run", "--detach", "--runtime", RUNTIME, "--network", "none",
                    *LIMITS, "--name", name, image, "/bin/sh", "-c", "exit 0"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run(["podman", "wait", name], check=True, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - start
    subprocess.run(["podman", "rm", "--force", name], check=True, capture_output=True, timeout=120)
    return elapsed


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
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
    bare, ours = [], []
    try:
        with tempfile.TemporaryDirectory() as state:
            for _ in range(args.rounds):  # interleaved, so load changes hit both alike
                bare.append(bare_run(image))
                ours.append(backend_run(backend, stopped, settings, machinetype, Path(state)))
    finally:
        backend.close()
        detected = Cgroups.detect()
        if detected is not None:
            detected.remove(cgroup_root)
    bare_p50, ours_p50 = statistics.median(bare), statistics.median(ours)
    print(f"bare podman run + wait: p50 {bare_p50 * 1000:.0f} ms over {args.rounds} rounds")
    print(f"backend create -> on_stopped: p50 {ours_p50 * 1000:.0f} ms")
    ratio = ours_p50 / bare_p50
    print(f"ratio {ratio:.2f} (target <= 1.2): {'met' if ratio <= 1.2 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
