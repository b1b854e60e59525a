"""Optional Prometheus endpoint: vacd's metric families on ``prometheus_client``, served by aiohttp.

Off by default; ``metrics_port`` in ``[settings]`` turns it on, bound to 127.0.0.1 only (scrape it
through a local node_exporter proxy or an ssh tunnel; hypervisors should not grow open ports).

``Metrics`` is a ``prometheus_client`` registry that also carries the library's standard process,
platform and garbage-collector metrics (``process_resident_memory_bytes``, ``python_info``, ...).
``VacMetrics`` declares the families vacd exports, behind the small interface the daemon uses
(keyword labels, and ``replace`` for a gauge whose label combinations come and go)::

    registry = Metrics()
    vac_metrics = VacMetrics(registry)
    vac_metrics.creations.inc(machinetype="lhcb")
    vac_metrics.machines.replace({("lhcb", "running"): 3, ("atlas", "creating"): 1})
    runner = await start_metrics_server(registry, settings.metrics_port)
    ...
    await runner.cleanup()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import prometheus_client
from aiohttp import web

# The type that matches what generate_latest writes, in whichever library version is installed.
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class Metrics(prometheus_client.CollectorRegistry):
    """A registry with the standard process, platform and GC collectors already registered."""

    def __init__(self) -> None:
        super().__init__()
        prometheus_client.ProcessCollector(registry=self)
        prometheus_client.PlatformCollector(registry=self)
        prometheus_client.GCCollector(registry=self)

    def render(self) -> str:
        """The whole registry in the text exposition format."""
        return prometheus_client.generate_latest(self).decode()


_Metric = Union[prometheus_client.Counter, prometheus_client.Gauge]


class _Family:
    """One metric family with keyword labels (none for an unlabelled family)."""

    def __init__(self, metric: _Metric, sample_name: str, registry: Metrics):
        self._metric = metric
        self._sample_name = sample_name
        self._registry = registry

    def _series(self, labels: Mapping[str, object]):
        if not labels:
            return self._metric
        # prometheus_client raises ValueError for missing or unknown label names.
        return self._metric.labels(**{name: str(value) for name, value in labels.items()})

    def value(self, **labels: object) -> float:
        """Current value of one series (0 if it was never set)."""
        value = self._registry.get_sample_value(
            self._sample_name, {name: str(text) for name, text in labels.items()})
        return 0.0 if value is None else value


class Counter(_Family):
    """A count that only goes up; its name ends in ``_total``."""

    def __init__(self, registry: Metrics, name: str, documentation: str,
                 labelnames: Sequence[str] = ()):
        if not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        # prometheus_client appends _total itself.
        metric = prometheus_client.Counter(name[:-len("_total")], documentation, labelnames,
                                           registry=registry)
        super().__init__(metric, name, registry)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._series(labels).inc(amount)


class Gauge(_Family):
    """A value that goes up and down."""

    def __init__(self, registry: Metrics, name: str, documentation: str,
                 labelnames: Sequence[str] = ()):
        self._labelnames = tuple(labelnames)
        metric = prometheus_client.Gauge(name, documentation, labelnames, registry=registry)
        super().__init__(metric, name, registry)

    def set(self, value: float, **labels: object) -> None:
        self._series(labels).set(value)

    def replace(self, samples: Mapping[tuple, float]) -> None:
        """Replace every series at once; label combinations not given disappear.

        Runs on vacd's event loop, as the scrapes do, so a scrape never sees half of it.
        """
        for values in samples:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._sample_name} takes {len(self._labelnames)} label "
                                 f"values, got {values}")
        self._metric.clear()
        for values, value in samples.items():
            self._metric.labels(*(str(text) for text in values)).set(value)


class VacMetrics:
    """The families vacd exports. Attribute names say what the daemon updates, and when."""

    def __init__(self, registry: Metrics):
        self.slots = Gauge(registry, "vac_slots", "Machine slots of this factory.")
        self.total_processors = Gauge(registry, "vac_total_processors",
                                      "Processors vacd may allocate to machines.")
        self.running_processors = Gauge(registry, "vac_running_processors",
                                        "Processors allocated to running machines.")
        self.machines = Gauge(
            registry, "vac_machines",
            "Machines by machinetype and life-cycle state (creating, running, stopping, finishing).",
            ("machinetype", "state"))
        self.creations = Counter(registry, "vac_creations_total",
                                 "Machines whose creation was started.", ("machinetype",))
        self.creation_failures = Counter(registry, "vac_creation_failures_total",
                                         "Machine creations that failed.", ("machinetype",))
        self.backoffs = Counter(registry, "vac_backoffs_total",
                                "Times a machinetype entered backoff after an abort.",
                                ("machinetype",))
        self.vacquery_queries = Counter(registry, "vac_vacquery_queries_total",
                                        "VacQuery queries received, by query type.", ("query",))


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
