"""The machine-backend seam: what the daemon needs from one kind of machine.

Every backend (libvirt VMs, containers, cloud tenancies) implements ``MachineBackend``. The
daemon prepares a machine's directory (MJF keys, user_data, joboutputs) *before* it calls
``create``, and finishes and accounts it *after* the backend says it ended; the backend only
starts, stops, lists and measures machines. Every method may block: the daemon calls them in its
thread pool, never on the event loop. ``on_stopped`` may be called from any thread and must only
hand the news over (the daemon wraps it with ``loop.call_soon_threadsafe``).

The planner knows nothing of backends: it sees ``Machine`` records only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Protocol

from vac.core.config import Machinetype, Settings
from vac.core.model import Machine


class BackendError(Exception):
    """A backend operation failed; the message says what and for which machine."""


class BackendUnavailableError(BackendError):
    """The engine, hypervisor or cloud cannot be reached at all (yet): no other call on this
    backend can succeed now, so callers stop asking until it is back."""


@dataclasses.dataclass(frozen=True)
class BackendMachine:
    """One machine as its backend sees it, for adoption, zombies and "gone" decisions.

    ``uuid`` is the vac machine UUID the backend stored with the machine (libvirt domain UUID,
    container label, cloud metadata/tag); ``active`` is False once it has stopped running but is
    still listed (a dying domain, an exited container, a cloud server in SHUTOFF/ERROR).
    """

    uuid: str
    name: str
    active: bool
    cpu_seconds: Optional[float] = None


StoppedCallback = Callable[[str], None]


class MachineBackend(Protocol):
    """One kind of machine. ``kind`` names it in logs and status ("vm", "container", "cloud").

    The daemon's stop is ``stop``, a grace period, then ``destroy``; a machine has ended when
    it is listed inactive, is no longer listed, or ``on_stopped`` named it (which may repeat,
    and may name UUIDs the daemon does not know). An ended machine stays listed, inactive,
    until ``release`` (an exited container, a stopped cloud server), or is no longer listed at
    all (a transient VM, a terminated EC2 instance).
    """

    kind: str

    def connect(self) -> None:
        """Connect to the engine/hypervisor/cloud and make shared resources (networks)."""

    def close(self) -> None:
        """Release connections; running machines keep running."""

    def create(self, machine: Machine, machinetype: Machinetype, settings: Settings,
               directory: Path) -> None:
        """Start ``machine`` from its prepared ``directory``; BackendError if it cannot."""

    def stop(self, uuid: str) -> None:
        """Ask the machine to stop gracefully (ACPI, SIGTERM, cloud stop). Idempotent."""

    def destroy(self, uuid: str) -> None:
        """Stop the machine at once and remove it from the backend. Idempotent."""

    def list_machines(self) -> list[BackendMachine]:
        """Every machine of this factory the backend knows, active or not."""

    def cpu_seconds(self, uuid: str) -> Optional[float]:
        """CPU time used so far (or in total, once ended), None when the backend cannot tell."""

    def release(self, machine: Machine, settings: Settings, directory: Path) -> None:
        """Free what ``create`` allocated for a finished machine (disks, volumes, an exited
        container and its cgroup). The daemon reads ``cpu_seconds`` for accounting first."""

    def forget(self, uuid: str) -> None:
        """Free what the backend holds for a listed machine vac has no record of (a zombie,
        after ``destroy``): an exited container, its cgroup, a kept CPU reading. Idempotent."""
