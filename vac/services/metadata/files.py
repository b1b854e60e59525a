"""The MJF files of a machine (REFERENCE.md §4.1): what they hold at creation, writing them,
and lowering the shutdown times when the factory drains. The MJF service serves them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

from vac.core.config import Machinetype, Settings
from vac.core.model import Machine
from vac.records.store import atomic_write

MJF_DIRECTORIES = ("machinefeatures", "jobfeatures")
MJF_KEY = re.compile(r"[A-Za-z0-9_]{1,64}\Z")  # B4: [a-z0-9_], plus the legacy mixed-case keys


def _decimal(value: float) -> str:
    return str(round(float(value), 3))


def mjf_features(machine: Machine, settings: Settings, machinetype: Machinetype,
                 now: float) -> tuple[dict[str, str], dict[str, str]]:
    """(machinefeatures, jobfeatures): key -> exact file content for a machine created at ``now``.

    ``machinefeatures_option_XXX`` values are written verbatim and may replace a standard key.
    """
    if machinetype.name != machine.machinetype:
        raise ValueError(f"machinetype {machinetype.name!r} given for a machine of type "
                         f"{machine.machinetype!r}")
    processors = machine.processors
    shutdown = int(machine.deadline)
    start = int(now)
    wall_seconds = max(0, shutdown - start)
    rss_bytes = settings.mb_per_processor * processors * 1048576

    machinefeatures = {
        "total_cpu": str(processors),
        "phys_cores": str(processors),
        "log_cores": str(processors),
        "jobslots": str(processors),
        "shutdowntime": str(shutdown),
    }
    jobfeatures = {
        "shutdowntime_job": str(shutdown),
        "cpufactor_lrms": "1.0",
        "cpu_limit_secs_lrms": str(wall_seconds * processors),
        "cpu_limit_secs": str(wall_seconds * processors),
        "wall_limit_secs_lrms": str(wall_seconds),
        "wall_limit_secs": str(wall_seconds),
        "jobstart_secs": str(start),
        "max_rss_bytes": str(rss_bytes),
        "mem_limit_MB": str(rss_bytes // 1000000),
        "allocated_cpu": f"{processors}\n",
        "allocated_CPU": f"{processors}\n",
        "job_id": machine.uuid,
    }
    if settings.hs06_per_processor is not None:
        machinefeatures["hs06"] = _decimal(settings.hs06_per_processor * processors)
        jobfeatures["hs06_job"] = _decimal(settings.hs06_per_processor * processors)
    for key, value in settings.machinefeatures_options:
        if not MJF_KEY.match(key):
            raise ValueError(f"machinefeatures_option_{key}: not a valid MJF key name")
        machinefeatures[key] = value
    return machinefeatures, jobfeatures


def write_mjf(directory: Union[str, Path], machinefeatures: dict[str, str],
              jobfeatures: dict[str, str]) -> None:
    """Write every key atomically (temp + fsync + rename) as 0644 files under ``directory``."""
    for subdirectory, features in (("machinefeatures", machinefeatures),
                                   ("jobfeatures", jobfeatures)):
        target = Path(directory) / subdirectory
        target.mkdir(mode=0o755, parents=True, exist_ok=True)
        for key, value in features.items():
            if not MJF_KEY.match(key):
                raise ValueError(f"{subdirectory}: not a valid MJF key name: {key!r}")
            atomic_write(target / key, value, 0o644)


def lower_deadline_files(directory: Union[str, Path], deadline: float) -> bool:
    """Lower ``shutdowntime`` and ``shutdowntime_job`` to ``deadline`` (never raise them).

    A missing or unreadable value is rewritten. Returns True if any file changed.
    """
    new = int(deadline)
    changed = False
    for relative in ("machinefeatures/shutdowntime", "jobfeatures/shutdowntime_job"):
        path = Path(directory) / relative
        try:
            current: Optional[int] = int(path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            current = None
        if current is None or new < current:
            atomic_write(path, str(new), 0o644)
            changed = True
    return changed
