"""CPU time and limits of a container from its cgroup, on cgroup v1, v2 and hybrid hosts.

Classic Vac read ``cpuacct.usage`` of cgroup v1 only, so it reported no CPU time on EL9, which
mounts cgroup v2 alone (CONTAINERS.md §5). Here the layout is detected from the mount table:

* a v1 hierarchy carrying ``cpuacct`` (alone, as on this project's test hosts, or co-mounted as
  ``cpu,cpuacct`` on EL7/EL8) means v1: CPU time is ``cpuacct.usage`` (nanoseconds), limits are
  ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` and ``memory.limit_in_bytes``;
* otherwise a ``cgroup2`` mount means v2: CPU time is ``usage_usec`` of ``cpu.stat``
  (microseconds, present even without the cpu controller), limits are ``cpu.max`` and
  ``memory.max``. A hybrid host whose ``unified`` v2 mount carries no controllers is v1.

A cgroup's counters vanish with it, and engines remove a container's own cgroup when it exits.
The backends therefore put each machine under a parent cgroup of its own (``--cgroup-parent``):
the kernel charges CPU time to every ancestor, so the parent keeps the machine's total after the
container has gone, until the backend removes it in ``release``.

The parsers are pure and take file text; ``Cgroups`` is the thin reader of the live tree.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

MOUNTS_PATH = "/proc/self/mounts"
# v1 reports "no limit" as the largest page-aligned signed 64-bit value; anything this large is
# no limit at all (memory.limit_in_bytes = 9223372036854771712 on x86_64).
V1_UNLIMITED_BYTES = 1 << 62


class CgroupError(Exception):
    """The cgroup tree could not be read or changed; the message says which file and why."""


@dataclasses.dataclass(frozen=True)
class CgroupLayout:
    """Where this host's cgroups are mounted.

    ``version`` is 1 or 2. ``cpu_root`` holds CPU accounting (v1: the cpuacct hierarchy);
    ``quota_root`` the CPU quota (v1: the cpu hierarchy); ``memory_root`` the memory limit.
    ``roots`` are all hierarchies in which a machine's parent cgroup may appear (v1: every
    controller and named hierarchy, and a hybrid host's v2 tree, which runc also populates), so
    that ``release`` removes it everywhere.
    """

    version: int
    cpu_root: str
    quota_root: Optional[str]
    memory_root: Optional[str]
    roots: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Hard limits of one cgroup; None means unlimited (or not readable)."""

    cpus: Optional[float]
    memory_bytes: Optional[int]


def parse_mounts(text: str) -> Optional[CgroupLayout]:
    """The cgroup layout from ``/proc/self/mounts`` text, or None if no cgroup is mounted."""
    v1: dict[str, str] = {}  # controller or name=... -> mount point
    v1_points: list[str] = []
    v2_point = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if fields[2] == "cgroup2" and v2_point is None:
            v2_point = point
        elif fields[2] == "cgroup":
            v1_points.append(point)
            for option in fields[3].split(","):
                v1.setdefault(option, point)
    if "cpuacct" in v1:
        hybrid = (v2_point,) if v2_point is not None else ()
        return CgroupLayout(1, v1["cpuacct"], v1.get("cpu"), v1.get("memory"),
                            (*v1_points, *hybrid))
    if v2_point is not None:
        return CgroupLayout(2, v2_point, v2_point, v2_point, (v2_point,))
    return None


def parse_cpuacct_usage(text: str) -> float:
    """Seconds from v1 ``cpuacct.usage`` (nanoseconds)."""
    try:
        return int(text.strip()) / 1e9
    except ValueError:
        raise ValueError(f"cpuacct.usage {text.strip()[:40]!r} is not an integer") from None


def parse_cpu_stat_usage(text: str) -> float:
    """Seconds from v2 ``cpu.stat`` (its ``usage_usec`` line, microseconds)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            try:
                return int(value) / 1e6
            except ValueError:
                break
    raise ValueError("cpu.stat has no integer usage_usec line")


def parse_cpu_max(text: str) -> Optional[float]:
    """Processors allowed by v2 ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``)."""
    fields = text.split()
    if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) == 0:
        raise ValueError(f"cpu.max {text.strip()[:40]!r} is not 'QUOTA PERIOD'")
    if fields[0] == "max":
        return None
    if not fields[0].isdigit():
        raise ValueError(f"cpu.max quota {fields[0][:20]!r} is not an integer or max")
    return int(fields[0]) / int(fields[1])


def parse_cfs_quota(quota_text: str, period_text: str) -> Optional[float]:
    """Processors allowed by v1 ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us``."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        raise ValueError(f"cfs quota/period {quota_text.strip()[:20]!r}/{period_text.strip()[:20]!r} "
                         "are not integers") from None
    if quota < 0:
        return None
    if period <= 0:
        raise ValueError(f"cpu.cfs_period_us {period} is not positive")
    return quota / period


def parse_memory_limit(text: str) -> Optional[int]:
    """Bytes from v2 ``memory.max`` (``max``: none) or v1 ``memory.limit_in_bytes``."""
    value = text.strip()
    if value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"memory limit {value[:40]!r} is not an integer or max") from None
    return None if limit >= V1_UNLIMITED_BYTES else limit


def parse_proc_cgroup(text: str, version: int) -> Optional[str]:
    """A process's cgroup path from ``/proc/PID/cgroup`` text: the ``cpuacct`` line on v1, the
    ``0::`` line on v2."""
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if version == 2 and number == "0" and controllers == "":
            return path
        if version == 1 and "cpuacct" in controllers.split(","):
            return path
    return None


class Cgroups:
    """Reads (and removes) cgroups below the mount points of one ``CgroupLayout``.

    Paths are cgroup paths such as ``/vac/podman-<uuid>``, relative to each hierarchy's root.
    """

    def __init__(self, layout: CgroupLayout):
        self.layout = layout

    @classmethod
    def detect(cls, mounts_path: str = MOUNTS_PATH) -> Optional[Cgroups]:
        """This host's cgroups, or None (logged by the caller) if none are mounted."""
        try:
            text = Path(mounts_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        layout = parse_mounts(text)
        return cls(layout) if layout is not None else None

    @staticmethod
    def _join(root: str, path: str) -> Path:
        relative = path.strip("/")
        if ".." in relative.split("/"):
            raise CgroupError(f"cgroup path {path!r} contains ..")
        return Path(root, relative) if relative else Path(root)

    def exists(self, path: str) -> bool:
        return self._join(self.layout.cpu_root, path).is_dir()

    def cpu_seconds(self, path: str) -> Optional[float]:
        """CPU time charged to ``path`` and its descendants (living or removed), or None if it
        does not exist."""
        directory = self._join(self.layout.cpu_root, path)
        name = "cpuacct.usage" if self.layout.version == 1 else "cpu.stat"
        parse = parse_cpuacct_usage if self.layout.version == 1 else parse_cpu_stat_usage
        try:
            text = (directory / name).read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            raise CgroupError(f"cannot read {directory / name}: {error}") from error
        try:
            return parse(text)
        except ValueError as error:
            raise CgroupError(f"{directory / name}: {error}") from error

    def _read(self, root: Optional[str], path: str, name: str) -> Optional[str]:
        if root is None:
            return None
        try:
            return (self._join(root, path) / name).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return None

    def limits(self, path: str) -> Limits:
        """The CPU and memory limits set on ``path`` itself (unreadable: None)."""
        layout = self.layout
        try:
            if layout.version == 1:
                quota = self._read(layout.quota_root, path, "cpu.cfs_quota_us")
                period = self._read(layout.quota_root, path, "cpu.cfs_period_us")
                cpus = parse_cfs_quota(quota, period) if quota and period else None
                memory = self._read(layout.memory_root, path, "memory.limit_in_bytes")
            else:
                cpu_max = self._read(layout.quota_root, path, "cpu.max")
                cpus = parse_cpu_max(cpu_max) if cpu_max else None
                memory = self._read(layout.memory_root, path, "memory.max")
            return Limits(cpus, parse_memory_limit(memory) if memory else None)
        except ValueError as error:
            raise CgroupError(f"cgroup {path}: {error}") from error

    def procs(self, path: str) -> list[int]:
        """PIDs in ``path`` itself (not its descendants); empty if it does not exist."""
        text = self._read(self.layout.cpu_root, path, "cgroup.procs") or ""
        return [int(word) for word in text.split() if word.isdigit()]

    @property
    def accounting_roots(self) -> tuple[str, ...]:
        """The hierarchies that account and limit CPU and memory (a new v1 cpuset cgroup would
        have no CPUs until configured, so vac never makes its own there)."""
        layout = self.layout
        return tuple(dict.fromkeys(root for root in (layout.cpu_root, layout.quota_root,
                                                     layout.memory_root) if root))

    def create(self, path: str) -> None:
        """Make ``path`` in the accounting hierarchies."""
        for root in self.accounting_roots:
            try:
                self._join(root, path).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise CgroupError(f"cannot create cgroup {path} under {root}: {error}") from error

    def set_limits(self, path: str, cpus: int, memory_bytes: int) -> None:
        """Hard CPU (quota over the period) and memory limits on ``path``, made by ``create``.
        On v2 the cpu and memory controllers are first enabled down the path from the root."""
        layout = self.layout
        try:
            if layout.version == 1:
                if layout.quota_root is not None:
                    directory = self._join(layout.quota_root, path)
                    period = int((directory / "cpu.cfs_period_us").read_text(encoding="ascii"))
                    (directory / "cpu.cfs_quota_us").write_text(f"{cpus * period}\n", encoding="ascii")
                if layout.memory_root is not None:
                    (self._join(layout.memory_root, path) / "memory.limit_in_bytes").write_text(
                        f"{memory_bytes}\n", encoding="ascii")
                return
            parts = path.strip("/").split("/")
            for depth in range(len(parts)):
                parent = self._join(layout.cpu_root, "/".join(parts[:depth]))
                (parent / "cgroup.subtree_control").write_text("+cpu +memory\n", encoding="ascii")
            directory = self._join(layout.cpu_root, path)
            (directory / "cpu.max").write_text(f"{cpus * 100000} 100000\n", encoding="ascii")
            (directory / "memory.max").write_text(f"{memory_bytes}\n", encoding="ascii")
        except (OSError, ValueError) as error:
            raise CgroupError(f"cannot set the limits of cgroup {path}: {error}") from error

    def add_process(self, path: str, pid: int) -> None:
        """Move ``pid`` into ``path`` in the accounting hierarchies."""
        for root in self.accounting_roots:
            try:
                (self._join(root, path) / "cgroup.procs").write_text(f"{pid}\n", encoding="ascii")
            except OSError as error:
                raise CgroupError(f"cannot move process {pid} into {root}{path}: {error}") from error

    def remove(self, path: str) -> None:
        """Remove ``path`` and its (empty) descendants everywhere. Idempotent; a cgroup that still
        has processes raises CgroupError."""
        for root in self.layout.roots:
            top = self._join(root, path)
            if not top.is_dir():
                continue
            # cgroupfs directories hold only control files, which rmdir ignores: remove the
            # directories bottom-up; the kernel refuses any that still has processes.
            for directory, subdirectories, _files in os.walk(top, topdown=False):
                for name in subdirectories:
                    _rmdir(Path(directory, name))
            _rmdir(top)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise CgroupError(f"cannot remove cgroup {path}: {error}") from error
