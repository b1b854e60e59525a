import asyncio
import math

import aiohttp
import pytest

from vac.ops.metrics import CONTENT_TYPE, Metrics, VacMetrics, start_metrics_server


def test_exposition_format():
    registry = Metrics()
    slots = registry.gauge("vac_slots", "Machine slots.")
    creations = registry.counter("vac_creations_total", "Creations.", ("machinetype",))
    slots.set(8)
    creations.inc(machinetype="lhcb")
    creations.inc(2, machinetype="lhcb")
    creations.inc(machinetype="atlas")
    assert registry.render() == (
        "# HELP vac_slots Machine slots.\n"
        "# TYPE vac_slots gauge\n"
        "vac_slots 8\n"
        "# HELP vac_creations_total Creations.\n"
        "# TYPE vac_creations_total counter\n"
        'vac_creations_total{machinetype="atlas"} 1\n'
        'vac_creations_total{machinetype="lhcb"} 3\n'
    )
    assert creations.value(machinetype="lhcb") == 3
    assert creations.value(machinetype="cms") == 0


def test_unlabelled_series_exist_from_the_start_and_labelled_ones_do_not():
    registry = Metrics()
    registry.counter("a_total", "A.")
    registry.gauge("b", "B.", ("x",))
    assert registry.render().splitlines()[2] == "a_total 0"
    assert registry.render().splitlines()[-1] == "# TYPE b gauge"


def test_escaping_of_label_values_and_help():
    registry = Metrics()
    gauge = registry.gauge("g", 'Help with \\ and\nnewline.', ("name",))
    gauge.set(1.5, name='a"b\\c\nd')
    lines = registry.render().splitlines()
    assert lines[0] == "# HELP g Help with \\\\ and\\nnewline."
    assert lines[2] == 'g{name="a\\"b\\\\c\\nd"} 1.5'


def test_special_float_values():
    registry = Metrics()
    gauge = registry.gauge("g", "G.", ("v",))
    gauge.set(math.inf, v="inf")
    gauge.set(-math.inf, v="minf")
    gauge.set(math.nan, v="nan")
    assert registry.render().splitlines()[2:] == ['g{v="inf"} +Inf', 'g{v="minf"} -Inf', 'g{v="nan"} NaN']


def test_gauge_replace_drops_vanished_series():
    registry = Metrics()
    machines = registry.gauge("vac_machines", "M.", ("machinetype", "state"))
    machines.replace({("lhcb", "running"): 3, ("atlas", "creating"): 1})
    machines.replace({("lhcb", "running"): 2})
    assert registry.render().splitlines()[2:] == ['vac_machines{machinetype="lhcb",state="running"} 2']
    with pytest.raises(ValueError, match="takes 2 label values"):
        machines.replace({("lhcb",): 1})


def test_misuse_is_rejected():
    registry = Metrics()
    counter = registry.counter("c_total", "C.", ("machinetype",))
    with pytest.raises(ValueError, match="only go up"):
        counter.inc(-1, machinetype="x")
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(machinetype="x", state="y")
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc()
    with pytest.raises(ValueError, match="registered twice"):
        registry.counter("c_total", "again")
    with pytest.raises(ValueError, match="must end in _total"):
        registry.counter("creations", "C.")
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.gauge("1bad", "B.")
    with pytest.raises(ValueError, match="invalid label name"):
        registry.gauge("g", "G.", ("bad-label",))
    with pytest.raises(ValueError, match="invalid label name"):
        registry.gauge("g2", "G.", ("__reserved",))


def test_vac_metrics_families():
    registry = Metrics()
    vac_metrics = VacMetrics(registry)
    vac_metrics.slots.set(8)
    vac_metrics.machines.replace({("lhcb", "running"): 3})
    vac_metrics.creation_failures.inc(machinetype="lhcb")
    vac_metrics.backoffs.inc(machinetype="lhcb")
    vac_metrics.vacquery_queries.inc(query="machines_query")
    text = registry.render()
    for line in (
        "vac_slots 8",
        'vac_machines{machinetype="lhcb",state="running"} 3',
        'vac_creation_failures_total{machinetype="lhcb"} 1',
        'vac_backoffs_total{machinetype="lhcb"} 1',
        'vac_vacquery_queries_total{query="machines_query"} 1',
        "# TYPE vac_creations_total counter",
        "vac_running_processors 0",
        "vac_total_processors 0",
    ):
        assert line in text.splitlines()


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
    assert "vac_slots 4" in body.splitlines()
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
