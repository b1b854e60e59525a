"""Status publishing: what vacd tells the outside about itself after every cycle.

Four sinks from one model: ``status.json`` (check-vacd's contract), the sd_notify status line
(``systemctl status``), the optional Prometheus metrics, and the snapshot the VacQuery responder
answers from until the next cycle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from vac import __version__
from vac.core import scheduler
from vac.core.config import Config
from vac.core.model import Finish, Machine, MachineState, slot_name
from vac.records.store import Store
from vac.services import vacquery

log = logging.getLogger("vacd")

RUNNING_STATES = (MachineState.RUNNING, MachineState.STOPPING)


@dataclasses.dataclass
class DaemonStatus:
    """Liveness and outcome facts published in status.json for check-vacd."""

    loop_time: float = 0.0
    responder_time: float = 0.0
    metadata_time: float = 0.0
    mjf_time: float = 0.0
    last_creation_error: Optional[str] = None
    last_creation_error_time: Optional[float] = None


class StatusPublisher:
    """Publishes the factory's status; the daemon sets the sinks it has (notifier, metrics,
    responder, services) as they start."""

    def __init__(self, store: Optional[Store] = None):
        self.store = store
        self.status = DaemonStatus()
        self.notifier = None
        self.metrics = None
        self.responder = None
        self.services_up = False
        self.snapshot: Optional[vacquery.StatusSnapshot] = None
        self.backed_off: set[str] = set()  # machinetypes in backoff at the last plan (metrics)
        self.queries_counted: dict[str, int] = {}  # responder answers already in the metrics

    def publish(self, now: float, config: Config, live: list[Machine],
                last_in_slot: dict[int, Machine], finishes: dict[str, Finish], slots: int,
                host_status: dict) -> None:
        status = self.status
        status.loop_time = now
        if self.services_up:
            # The services run on the daemon's loop: a cycle that completes proves they are served.
            status.metadata_time = status.mjf_time = now
        if self.responder is not None:
            status.responder_time = now
        running = [m for m in live if m.state in RUNNING_STATES]
        running_processors = sum(m.processors for m in running)
        document = {
            "format": 1, "pid": os.getpid(), "time": now, "version": __version__,
            "loop_time": status.loop_time, "responder_time": status.responder_time,
            "metadata_time": status.metadata_time, "mjf_time": status.mjf_time,
            "running_machines": len(running), "slots": slots,
            "running_processors": running_processors, "total_processors": slots,
            "last_creation_error": status.last_creation_error,
            "last_creation_error_time": status.last_creation_error_time,
        }
        try:
            self.store.write_status(document)
        except OSError as error:
            log.error("cannot write status file: %s", error)
        if self.notifier is not None:
            self.notifier.status(f"{len(running)}/{slots} machines running, "
                                 f"{running_processors}/{slots} processors")
        reports = scheduler.local_machinetype_reports(config, tuple(live), finishes,
                                                      config.settings.factory_name, now)
        self.snapshot = self.build_snapshot(config, live, last_in_slot, reports, slots,
                                            host_status)
        if self.metrics is not None:
            self.update_metrics(live, slots, running_processors)

    def update_metrics(self, live: list[Machine], slots: int, running_processors: int) -> None:
        metrics = self.metrics
        metrics.slots.set(slots)
        metrics.total_processors.set(slots)
        metrics.running_processors.set(running_processors)
        counts: dict = {}
        for machine in live:
            key = (machine.machinetype, machine.state.value)
            counts[key] = counts.get(key, 0) + 1
        metrics.machines.replace(counts)
        if self.responder is not None:
            for kind, answered in self.responder.answered.items():
                new = answered - self.queries_counted.get(kind, 0)
                if new:
                    metrics.vacquery_queries.inc(new, query=kind)
                self.queries_counted[kind] = answered

    def build_snapshot(self, config: Config, live: list[Machine], last_in_slot: dict[int, Machine],
                       reports: tuple, slots: int, host_status: dict) -> vacquery.StatusSnapshot:
        """What the VacQuery responder reports until the next cycle."""
        settings = config.settings
        factory = settings.factory_name
        by_slot = {machine.slot: machine for machine in live}
        machines = []
        for slot in range(slots):
            machine = by_slot.get(slot) or last_in_slot.get(slot)
            if machine is None:
                machines.append(vacquery.MachineStatus.empty_slot(factory, slot_name(factory, slot)))
            else:
                machines.append(vacquery.MachineStatus.from_machine(factory, machine))
        running = [m for m in live if m.state in RUNNING_STATES]
        hs06_per_processor = settings.hs06_per_processor or 1.0
        status = self.status
        factory_status = vacquery.FactoryStatus(
            factory=factory, running_processors=sum(m.processors for m in running),
            running_machines=len(running),
            running_hs06=sum(report.running_hs06 for report in reports),
            max_processors=slots, max_machines=slots, max_hs06=slots * hs06_per_processor,
            factory_heartbeat_time=int(status.loop_time),
            responder_heartbeat_time=int(status.responder_time) or None,
            mjf_heartbeat_time=int(status.mjf_time) or None,
            metadata_heartbeat_time=int(status.metadata_time) or None,
            **host_status)
        return vacquery.StatusSnapshot(machines=machines, machinetypes=reports,
                                       factory=factory_status)

    def count_backoffs(self, config: Config, reports: tuple, now: float) -> None:
        """Count each machinetype's entries into backoff (for metrics only: it costs a second
        look at the space's standings)."""
        if self.metrics is None:
            return
        in_backoff = {name for name, standing in scheduler.standings(config, reports, now).items()
                      if scheduler.in_backoff(standing)}
        for name in in_backoff - self.backed_off:
            self.metrics.backoffs.inc(machinetype=name)
        self.backed_off = in_backoff

    def creation_failed(self, error: str, now: float) -> None:
        self.status.last_creation_error = error
        self.status.last_creation_error_time = now

    def creation_succeeded(self) -> None:
        self.status.last_creation_error = None
