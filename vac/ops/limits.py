"""Process resource limits vacd sets for itself at start.

Every connection a machine opens to the metadata and MJF services is a descriptor, and systemd
(like most login shells) starts services with a soft ``RLIMIT_NOFILE`` of 1,024 while allowing
far more as the hard limit. systemd's advice for a daemon that needs many descriptors is to
raise its own soft limit to the hard one, which is what ``raise_descriptor_limit`` does; the
services then size each machine's share of connections from the limit in force
(``vac.services.metadata.fair_limits``).
"""

from __future__ import annotations

import dataclasses
import resource
from typing import Optional

NR_OPEN_PATH = "/proc/sys/fs/nr_open"
# Linux refuses an unlimited RLIMIT_NOFILE; without /proc, settle for the kernel's default cap.
FALLBACK_NR_OPEN = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DescriptorLimit:
    """The soft limit before and after, the hard limit, and why the raise failed (if it did)."""

    before: int
    after: int
    hard: int
    error: Optional[str] = None

    def describe(self) -> str:
        if self.error:
            return (f"open file limit stays at {self.before} (hard limit {self.hard}): "
                    f"cannot raise it: {self.error}")
        if self.after == self.before:
            return f"open file limit {self.after} (already the hard limit)"
        return f"open file limit raised from {self.before} to {self.after} (the hard limit)"


def _kernel_cap(path: str) -> int:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return FALLBACK_NR_OPEN


def raise_descriptor_limit(nr_open_path: str = NR_OPEN_PATH) -> DescriptorLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (capped at the kernel's ``nr_open``
    when the hard limit is unlimited). Never raises: a failure is reported in ``error``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _kernel_cap(nr_open_path) if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return DescriptorLimit(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as error:
        return DescriptorLimit(soft, soft, hard, str(error))
    return DescriptorLimit(soft, target, hard)
