import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vac.ops.metrics import CONTENT_TYPE, Counter, Metrics, VacMetrics, start_metrics_server


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value} of an exposition, as Prometheus parses it."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_vac_families_keep_their_names_types_and_labels():
    registry = Metrics()
    vac_metrics = VacMetrics(registry)
    vac_metrics.slots.set(8)
    vac_metrics.creations.inc(machinetype="lhcb")
    vac_metrics.creations.inc(2, machinetype="lhcb")
    vac_metrics.machines.replace({("lhcb", "running"): 3})
    vac_metrics.creation_failures.inc(machinetype="lhcb")
    vac_metrics.backoffs.inc(machinetype="lhcb")
    vac_metrics.vacquery_queries.inc(query="machines_query")
    text = registry.render()
    # The series dashboards were built on, unchanged by the move to prometheus_client.
    for line in (
        "# TYPE vac_slots gauge",
        "vac_slots 8.0",
        "# TYPE vac_creations_total counter",
        'vac_creations_total{machinetype="lhcb"} 3.0',
        'vac_machines{machinetype="lhcb",state="running"} 3.0',
        'vac_creation_failures_total{machinetype="lhcb"} 1.0',
        'vac_backoffs_total{machinetype="lhcb"} 1.0',
        'vac_vacquery_queries_total{query="machines_query"} 1.0',
        "vac_running_processors 0.0",
        "vac_total_processors 0.0",
    ):
        assert line in text.splitlines(), line
    assert vac_metrics.creations.value(machinetype="lhcb") == 3
    assert vac_metrics.creations.value(machinetype="cms") == 0
    assert vac_metrics.slots.value() == 8


def test_standard_process_metrics_are_exported():
    parsed = samples(Metrics().render())
    names = {name for name, _labels in parsed}
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds", "python_info"):
        assert name in names, name
    assert parsed[("process_open_fds", ())] > 0


def test_gauge_replace_drops_vanished_series():
    vac_metrics = VacMetrics(registry := Metrics())
    vac_metrics.machines.replace({("lhcb", "running"): 3, ("atlas", "creating"): 1})
    vac_metrics.machines.replace({("lhcb", "running"): 2})
    machines = {labels: value for (name, labels), value in samples(registry.render()).items()
                if name == "vac_machines"}
    assert machines == {(("machinetype", "lhcb"), ("state", "running")): 2}
    with pytest.raises(ValueError, match="takes 2 label values"):
        vac_metrics.machines.replace({("lhcb",): 1})
    # A refused replacement leaves the previous series in place.
    assert vac_metrics.machines.value(machinetype="lhcb", state="running") == 2


def test_label_values_are_escaped():
    vac_metrics = VacMetrics(registry := Metrics())
    vac_metrics.creations.inc(machinetype='a"b\\c\nd')
    assert 'vac_creations_total{machinetype="a\\"b\\\\c\\nd"} 1.0' in registry.render().splitlines()
    assert samples(registry.render())[("vac_creations_total", (("machinetype", 'a"b\\c\nd'),))] == 1


def test_misuse_is_rejected():
    registry = Metrics()
    vac_metrics = VacMetrics(registry)
    # The words are prometheus_client's, except the last (vac's own rule).
    with pytest.raises(ValueError, match="non-negative"):
        vac_metrics.creations.inc(-1, machinetype="x")
    with pytest.raises(ValueError, match="Incorrect label names"):
        vac_metrics.creations.inc(machinetype="x", state="y")
    with pytest.raises(ValueError, match="missing label values"):
        vac_metrics.creations.inc()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        VacMetrics(registry)  # every family registered twice
    with pytest.raises(ValueError, match="'vac_creations' must end in _total"):
        Counter(Metrics(), "vac_creations", "Creations.")


@pytest.mark.component
def test_scrape_over_loopback():
    registry = Metrics()
    VacMetrics(registry).slots.set(4)

    async def scrape():
        runner = await start_metrics_server(registry, 0)
        try:
            address, port = runner.addresses[0][:2]
            assert address == "127.0.0.1"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    metrics = (response.status, response.headers["Content-Type"], await response.text())
                async with session.get(f"http://127.0.0.1:{port}/other") as response:
                    other = response.status
                async with session.post(f"http://127.0.0.1:{port}/metrics") as response:
                    post = response.status
            return metrics, other, post
        finally:
            await runner.cleanup()

    (status, content_type, body), other, post = asyncio.run(scrape())
    assert status == 200
    assert content_type == CONTENT_TYPE
    parsed = samples(body)
    assert parsed[("vac_slots", ())] == 4
    assert ("process_resident_memory_bytes", ()) in parsed
    assert other == 404 and post == 405


@pytest.mark.component
def test_port_in_use_raises():
    async def clash():
        first = await start_metrics_server(Metrics(), 0)
        try:
            port = first.addresses[0][1]
            with pytest.raises(OSError):
                await start_metrics_server(Metrics(), port)
        finally:
            await first.cleanup()

    asyncio.run(clash())
