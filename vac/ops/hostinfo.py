"""Facts about this host that the planner and the VacQuery ``factory_status`` report need.

Read with plain files and system calls, once per cycle, off the event loop.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from vac.core.scheduler import HostFacts


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` in kB, by field name; empty if unreadable."""
    values = {}
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    values[name] = int(fields[0])
    except OSError:
        pass
    return values


def read_host_facts(state_dir: str) -> HostFacts:
    """Processor count, load averages, free space in the state directory and free memory."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3  # unknown: the planner then refuses to create
    stats = os.statvfs(state_dir)
    return HostFacts(processors=os.cpu_count() or 1, load_averages=tuple(load),
                     state_dir_free_bytes=stats.f_bavail * stats.f_frsize,
                     free_memory_bytes=read_meminfo().get("MemAvailable", 0) * 1024)


def _disk(path: str) -> tuple[Optional[int], Optional[int]]:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None, None
    return stats.f_bavail * stats.f_frsize // 1024, stats.f_favail


def _os_issue() -> Optional[str]:
    try:
        with open("/etc/os-release", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')[:100]
    except OSError:
        pass
    return None


def _boot_time() -> Optional[int]:
    try:
        with open("/proc/uptime", encoding="ascii") as handle:
            return int(time.time() - float(handle.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def factory_facts(state_dir: str) -> dict:
    """The host part of VacQuery ``factory_status`` (classic key names, kB)."""
    meminfo = read_meminfo()
    root_kb, root_inodes = _disk("/tmp")  # noqa: S108 - classic: the root filesystem via /tmp
    vac_kb, vac_inodes = _disk(state_dir)
    try:
        load = os.getloadavg()[2]
    except OSError:
        load = None
    total, free = meminfo.get("MemTotal"), meminfo.get("MemFree")
    swap_total, swap_free = meminfo.get("SwapTotal"), meminfo.get("SwapFree")
    return {
        "root_disk_avail_kb": root_kb, "root_disk_avail_inodes": root_inodes,
        "vac_disk_avail_kb": vac_kb, "vac_disk_avail_inodes": vac_inodes,
        "load_average": load, "kernel_version": os.uname().release,
        "os_issue": _os_issue() or os.uname().release, "boot_time": _boot_time(),
        "mem_total_kb": total,
        "mem_used_kb": total - free if total is not None and free is not None else None,
        "swap_free_kb": swap_free,
        "swap_used_kb": swap_total - swap_free if swap_total is not None and swap_free is not None else None,
    }
