"""Cgroup layout detection, CPU time and limit parsers (pure, on real-format files), and the
reader on this host's real kernel cgroups (``container`` tier: needs root)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.containerimage import require_container_tier
from vac.backends.container.cgroups import (
    CgroupError,
    CgroupLayout,
    Cgroups,
    parse_cfs_quota,
    parse_cpu_max,
    parse_cpu_stat_usage,
    parse_cpuacct_usage,
    parse_memory_limit,
    parse_mounts,
    parse_proc_cgroup,
)

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_hybrid_host_with_separate_cpuacct_is_v1():
    layout = parse_mounts(fixture("mounts-hybrid-v1"))
    assert layout.version == 1
    assert (layout.cpu_root, layout.quota_root, layout.memory_root) == (
        "/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory")
    assert "/sys/fs/cgroup/systemd" in layout.roots
    assert "/sys/fs/cgroup/unified" in layout.roots  # runc makes the parent there too


def test_el8_comounted_cpu_cpuacct_is_v1():
    layout = parse_mounts(fixture("mounts-el8-v1"))
    assert layout == CgroupLayout(1, "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct",
                                  "/sys/fs/cgroup/memory",
                                  ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/cpu,cpuacct",
                                   "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"))


def test_el9_is_v2():
    layout = parse_mounts(fixture("mounts-el9-v2"))
    assert layout == CgroupLayout(2, "/sys/fs/cgroup", "/sys/fs/cgroup", "/sys/fs/cgroup",
                                  ("/sys/fs/cgroup",))


def test_no_cgroups_mounted():
    assert parse_mounts("proc /proc proc rw 0 0\n\nshort line\n") is None


def test_cpu_time_parsers():
    assert parse_cpuacct_usage(fixture("cpuacct.usage")) == int(fixture("cpuacct.usage")) / 1e9
    assert parse_cpuacct_usage("1500000000\n") == 1.5
    assert parse_cpu_stat_usage(fixture("cpu.stat-v2")) == 2.250717
    assert parse_cpu_stat_usage(fixture("cpu.stat-v2-nocontrollers")) > 0
    with pytest.raises(ValueError, match="not an integer"):
        parse_cpuacct_usage("lots")
    with pytest.raises(ValueError, match="usage_usec"):
        parse_cpu_stat_usage("user_usec 5\nusage_usec x\n")


def test_limit_parsers():
    assert parse_cpu_max("200000 100000\n") == 2.0
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cfs_quota("150000\n", "100000\n") == 1.5
    assert parse_cfs_quota("-1\n", "100000\n") is None
    assert parse_memory_limit("268435456\n") == 268435456
    assert parse_memory_limit("max\n") is None
    assert parse_memory_limit("9223372036854771712\n") is None  # v1's "unlimited"
    for bad in ("100000", "x 100000", "1 0"):
        with pytest.raises(ValueError):
            parse_cpu_max(bad)
    with pytest.raises(ValueError):
        parse_cfs_quota("1000", "0")
    with pytest.raises(ValueError):
        parse_memory_limit("lots")


def test_proc_cgroup_paths():
    assert parse_proc_cgroup(fixture("proc-cgroup-v2"), 2) == "/system.slice/vac.service"
    hybrid = "1:cpu:/a\n2:cpuacct:/vac/x/libpod-1\n0::/vac/x/libpod-1\n"
    assert parse_proc_cgroup(hybrid, 1) == "/vac/x/libpod-1"
    assert parse_proc_cgroup("3:cpu,cpuacct:/docker/9\n", 1) == "/docker/9"
    assert parse_proc_cgroup("1:memory:/m\n", 1) is None
    assert parse_proc_cgroup(fixture("proc-cgroup-hybrid"), 1) is not None


def test_paths_may_not_climb_out_of_the_hierarchy(tmp_path):
    cgroups = Cgroups(CgroupLayout(2, str(tmp_path), str(tmp_path), str(tmp_path), (str(tmp_path),)))
    with pytest.raises(CgroupError, match=r"\.\."):
        cgroups.cpu_seconds("/vac/../../etc")
    assert cgroups.cpu_seconds("/vac/missing") is None
    assert cgroups.procs("/vac/missing") == []


# -- the real kernel ----------------------------------------------------------------------------

BUSY = "import time\nend = time.process_time() + 1.5\nwhile time.process_time() < end: pass\n"


def real_layouts() -> list:
    """This host's layout, plus its cgroup2 mount read as v2 if it also has one (hybrid)."""
    host = Cgroups.detect()
    if host is None or os.geteuid() != 0:
        return []
    layouts = [host.layout]
    mounts = Path("/proc/self/mounts").read_text()
    for line in mounts.splitlines():
        fields = line.split()
        if fields[2] == "cgroup2" and host.layout.version == 1:
            layouts.append(CgroupLayout(2, fields[1], None, None, (fields[1],)))
    return layouts


@pytest.mark.container
@pytest.mark.parametrize("layout", real_layouts() or [None], ids=lambda layout: f"v{layout.version}"
                         if layout else "none")
def test_cpu_time_of_a_real_cgroup_outlives_its_processes(layout):
    if layout is None:
        # Where the tier is required (root, cgroups mounted) this is a detection bug.
        require_container_tier("needs root and a mounted cgroup file system")
    cgroups = Cgroups(layout)
    path = f"/vac-test-{uuid.uuid4()}"
    cgroups.create(path)
    try:
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(1)\n" + BUSY],
                                 stdin=subprocess.PIPE)
        cgroups.add_process(path, child.pid)
        assert cgroups.procs(path) == [child.pid]
        child.stdin.write(b"x")
        child.stdin.close()
        assert child.wait(timeout=60) == 0
        deadline = time.monotonic() + 5
        while cgroups.procs(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cgroups.procs(path) == []
        assert cgroups.cpu_seconds(path) >= 1.0
    finally:
        cgroups.remove(path)
    assert not cgroups.exists(path)
    cgroups.remove(path)  # idempotent
