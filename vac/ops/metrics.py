"""Optional Prometheus endpoint: a small metrics registry and its aiohttp server.

Off by default; ``metrics_port`` in ``[settings]`` turns it on, bound to 127.0.0.1 only (scrape it
through a local node_exporter proxy or an ssh tunnel; hypervisors should not grow open ports).

``Metrics`` holds counter and gauge families with fixed label names and renders the text
exposition format 0.0.4. ``VacMetrics`` declares the families vacd exports; the daemon updates
them and ``start_metrics_server`` serves ``GET /metrics``::

    registry = Metrics()
    vac_metrics = VacMetrics(registry)
    vac_metrics.creations.inc(machinetype="lhcb")
    vac_metrics.machines.replace({("lhcb", "running"): 3, ("atlas", "creating"): 1})
    runner = await start_metrics_server(registry, settings.metrics_port)
    ...
    await runner.cleanup()
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence

from aiohttp import web

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple  # label values in the family's label-name order


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], lock: threading.Lock):
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(labelnames)) != len(labelnames):
            raise ValueError(f"duplicate label names for {name}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = lock
        # An unlabelled family has one series, present from the start (value 0).
        self._samples: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}")
        return tuple(str(labels[label]) for label in self.labelnames)

    def value(self, **labels: object) -> float:
        """Current value of one series (0 if it was never set)."""
        with self._lock:
            return self._samples.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.documentation)}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            samples = sorted(self._samples.items())
        for values, value in samples:
            if values:
                pairs = ",".join(f'{label}="{_escape_label_value(text)}"' for label, text in zip(self.labelnames, values))
                lines.append(f"{self.name}{{{pairs}}} {_format_value(value)}")
            else:
                lines.append(f"{self.name} {_format_value(value)}")
        return lines


class Counter(_Family):
    """A monotonically increasing count; names end in ``_total``."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], lock: threading.Lock):
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        super().__init__(name, documentation, labelnames, lock)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: counters only go up (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._samples[key] = self._samples.get(key, 0.0) + amount


class Gauge(_Family):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._samples[key] = float(value)

    def replace(self, samples: Mapping[LabelValues, float]) -> None:
        """Replace every series at once; label combinations not given disappear."""
        checked = {}
        for values, value in samples.items():
            values = tuple(str(text) for text in values)
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, got {values}")
            checked[values] = float(value)
        with self._lock:
            self._samples = checked


class Metrics:
    """A registry of metric families, rendered in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._register(Counter(name, documentation, labelnames, self._lock))

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._register(Gauge(name, documentation, labelnames, self._lock))

    def _register(self, family):
        if family.name in self._families:
            raise ValueError(f"metric {family.name} registered twice")
        self._families[family.name] = family
        return family

    def render(self) -> str:
        """The whole registry in the Prometheus text exposition format 0.0.4."""
        lines = []
        for family in self._families.values():
            lines.extend(family.render())
        return "\n".join(lines) + "\n"


class VacMetrics:
    """The families vacd exports. Attribute names say what the daemon updates, and when."""

    def __init__(self, registry: Metrics):
        self.slots = registry.gauge("vac_slots", "Machine slots of this factory.")
        self.total_processors = registry.gauge("vac_total_processors", "Processors vacd may allocate to machines.")
        self.running_processors = registry.gauge("vac_running_processors", "Processors allocated to running machines.")
        self.machines = registry.gauge(
            "vac_machines", "Machines by machinetype and life-cycle state (creating, running, stopping, finishing).",
            ("machinetype", "state"),
        )
        self.creations = registry.counter("vac_creations_total", "Machines whose creation was started.", ("machinetype",))
        self.creation_failures = registry.counter(
            "vac_creation_failures_total", "Machine creations that failed.", ("machinetype",)
        )
        self.backoffs = registry.counter(
            "vac_backoffs_total", "Times a machinetype entered backoff after an abort.", ("machinetype",)
        )
        self.vacquery_queries = registry.counter(
            "vac_vacquery_queries_total", "VacQuery queries received, by query type.", ("query",)
        )


async def start_metrics_server(metrics: Metrics, port: int, address: str = "127.0.0.1") -> web.AppRunner:
    """Serve ``GET /metrics`` on ``address:port``; returns the aiohttp ``AppRunner``.

    Stop it with ``await runner.cleanup()``. ``port=0`` picks a free port (see
    ``runner.addresses``). Raises OSError if the address cannot be bound.
    """
    async def handle_metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
