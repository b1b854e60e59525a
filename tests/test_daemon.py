"""The daemon's cycle with the real planner and store, and a recording fake for libvirt."""

import asyncio
import json

import pytest

from tests.fakes import FAKE_BACKENDS, FakeClock, FakeDomain, FakeWorks, settle
from vac.core import config as configmod
from vac.core.model import MachineState
from vac.core.scheduler import HostFacts
from vac.daemon.vacd import Factory, config_stamp

pytestmark = pytest.mark.component  # binds the metadata services on loopback

BASE_CONFIG = """
[settings]
vac_space = space.example.org
factory_name = f1.example.org
state_dir = {state}
total_processors = {processors}
stop_grace_seconds = 0.5
metadata_address = 127.0.0.1
mjf_address = 127.0.0.2
http_port = 0
vacquery_address = 127.0.0.1
vacquery_port = 0
{extra}

[machinetype lhcb]
target_share = 1
root_image = /images/lhcb.iso
user_data = /images/lhcb.user_data
max_wallclock_seconds = 3600
fizzle_seconds = 60
backoff_seconds = 600
{machinetype_extra}
"""


def write_config(tmp_path, processors=2, extra="", machinetype_extra=""):
    conf_dir = tmp_path / "vac.d"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / "10-test.conf").write_text(
        BASE_CONFIG.format(state=tmp_path / "state", processors=processors, extra=extra,
                           machinetype_extra=machinetype_extra))
    return configmod.ConfigPaths(conf_dir=str(conf_dir), main_conf=str(tmp_path / "none.conf"),
                                 run_confs=(str(tmp_path / "run.conf"),))


@pytest.fixture
def clock():
    return FakeClock()


IDLE_HOST = HostFacts(processors=8, load_averages=(0.0, 0.0, 0.0),
                      state_dir_free_bytes=100 << 30, free_memory_bytes=100 << 30)


def idle_host(_store):
    return IDLE_HOST


def make_factory(tmp_path, clock, **kwargs):
    FakeWorks.instances.clear()
    return Factory(write_config(tmp_path, **kwargs), clock=clock, works_factory=FakeWorks,
                   backend_makers=FAKE_BACKENDS, host_facts=idle_host, processor_count=8)


def run(coroutine):
    return asyncio.run(coroutine)


async def cycle(factory, reconcile=True):
    await factory.cycle(reconcile=reconcile)
    await settle(factory)


async def started(tmp_path, clock, prepare=None, **kwargs):
    """A factory after its start and first cycle, and its recording fake (``prepare(works)``
    runs before that cycle)."""
    factory = make_factory(tmp_path, clock, **kwargs)
    await factory.start()
    works = FakeWorks.instances[-1]
    if prepare is not None:
        prepare(works)
    await cycle(factory)
    return factory, works


async def power_off(factory, works, uuid):
    works.power_off(uuid)
    await asyncio.sleep(0)  # the event reaches the loop through call_soon_threadsafe
    await settle(factory)


def test_fills_free_processors_and_refills_a_slot_after_poweroff(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock)
        assert sorted(call[1] for call in works.named("create")) == ["f1-00.example.org",
                                                                     "f1-01.example.org"]
        assert all(m.state is MachineState.RUNNING for m in factory.machines.values())
        first = next(m for m in factory.machines.values() if m.slot == 0)
        clock.advance(120)
        await power_off(factory, works, first.uuid)
        assert works.named("account") == [("account", first.uuid, clock.now, 0.0)]
        assert ("release", first.name) in works.calls
        record = json.loads((factory.store.machine_dir(first) / "machine.json").read_text())
        assert record["machine"]["state"] == "finished"
        # The freed slot 0 is used again by a new machine.
        creates = [call[1] for call in works.named("create")]
        assert creates[-1] == "f1-00.example.org" and len(creates) == 3
        await factory.shutdown()

    run(scenario())


def test_no_more_work_backs_off_the_machinetype(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        factory.store.write_file(machine, "joboutputs/shutdown_message", "300 No more work")
        clock.advance(120)
        await power_off(factory, works, machine.uuid)
        assert len(works.named("create")) == 1, "in backoff: nothing new"
        assert factory.finishes["lhcb"].shutdown_message == "300 No more work"
        clock.advance(601)
        await cycle(factory)
        assert len(works.named("create")) == 2, "backoff over"
        await factory.shutdown()

    run(scenario())


def test_fizzled_machine_without_message_is_not_accounted_and_backs_off(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        clock.advance(10)
        await power_off(factory, works, machine.uuid)
        assert works.named("account") == []
        message = (factory.store.machine_dir(machine) / "joboutputs" / "shutdown_message").read_text()
        assert message.startswith("300 Vac detects fizzle after 10 seconds")
        assert len(works.named("create")) == 1
        await factory.shutdown()

    run(scenario())


def test_stalled_heartbeat_is_killed_with_700(tmp_path, clock):
    async def scenario():
        factory, works = await started(
            tmp_path, clock, processors=1,
            machinetype_extra="heartbeat_file = heartbeat\nheartbeat_seconds = 300")
        machine = next(iter(factory.machines.values()))
        clock.advance(400)  # past fizzle_seconds and heartbeat_seconds: no heartbeat file at all
        await cycle(factory)
        assert ("shutdown", machine.uuid) in works.calls
        message = (factory.store.machine_dir(machine) / "joboutputs" / "shutdown_message").read_text()
        assert message.startswith("700 Heartbeat file not")
        assert machine.uuid not in factory.machines
        await factory.shutdown()

    run(scenario())


def test_deadline_destroys_after_grace_when_acpi_is_ignored(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1,
                                       prepare=lambda works: setattr(works, "acpi_works", False))
        machine = next(iter(factory.machines.values()))
        factory.store.write_file(machine, "joboutputs/heartbeat", "ok")
        clock.advance(3601)
        await factory.cycle(reconcile=False)
        await asyncio.wait_for(settle(factory), 20)
        assert ("shutdown", machine.uuid) in works.calls
        assert ("destroy", machine.uuid) in works.calls
        assert machine.uuid not in factory.machines
        await factory.shutdown()

    run(scenario())


def test_restart_adopts_running_and_finishes_vanished_exactly_once(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock)
        clock.advance(120)
        await factory.cycle(reconcile=True)  # records a heartbeat: they ran 120 s
        survivor, vanished = sorted(factory.machines.values(), key=lambda m: m.slot)
        domains = dict(works.domains)
        await factory.shutdown()  # as after kill -9: nothing finished, nothing cleaned
        clock.advance(300)

        restarted = Factory(factory.paths, clock=clock, works_factory=FakeWorks,
                            backend_makers=FAKE_BACKENDS, host_facts=idle_host, processor_count=8)
        FakeWorks.instances.clear()
        original_init = FakeWorks.__init__

        def with_domains(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self.domains = domains

        FakeWorks.__init__ = with_domains
        try:
            domains[vanished.uuid].active = False
            await restarted.start()
        finally:
            FakeWorks.__init__ = original_init
        works = FakeWorks.instances[-1]
        assert restarted.machines[survivor.uuid].state is MachineState.RUNNING
        await cycle(restarted)
        assert [call[1] for call in works.named("account")] == [vanished.uuid]
        await cycle(restarted)
        assert [call[1] for call in works.named("account")] == [vanished.uuid]
        await restarted.shutdown()

    run(scenario())


def test_zombies_are_destroyed_and_forgotten_exited_ones_only_forgotten(tmp_path, clock):
    async def scenario():
        def add_zombies(works):
            works.domains["zombie"] = FakeDomain("zombie", "f1-07.example.org")
            works.domains["exited"] = FakeDomain("exited", "vac-exited", active=False)

        factory, works = await started(tmp_path, clock, processors=1, prepare=add_zombies)
        assert works.named("destroy") == [("destroy", "zombie")]
        assert sorted(works.named("forget")) == [("forget", "exited"), ("forget", "zombie")]
        await factory.shutdown()

    run(scenario())


def test_creation_failure_is_reported_and_backs_off(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1,
                                       prepare=lambda works: setattr(works, "fail_creates", 1))
        status = json.loads((tmp_path / "state" / "status.json").read_text())
        assert "fake creation failure" in status["last_creation_error"]
        assert factory.finishes["lhcb"].shutdown_message.startswith("500 Vac could not create")
        assert works.named("account") == []
        assert len(works.named("create")) == 1
        await factory.shutdown()

    run(scenario())


def test_finished_machine_directories_expire_but_live_ones_stay(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock)
        first, second = sorted(factory.machines.values(), key=lambda m: m.slot)
        clock.advance(120)
        await power_off(factory, works, first.uuid)
        clock.advance(3.5 * 86400)  # machines_dir_days defaults to 3
        await factory.cycle(reconcile=True)
        await asyncio.gather(*list(factory.tasks), return_exceptions=True)
        assert not factory.store.machine_dir(first).exists()
        assert factory.store.machine_dir(second).exists(), "still running: never removed"
        await factory.shutdown()

    run(scenario())


def test_the_responder_reports_the_factory_from_its_model(tmp_path, clock):
    from vac.core.config import FactoryAddress
    from vac.services import vacquery

    async def scenario():
        factory, works = await started(tmp_path, clock)
        first = next(m for m in factory.machines.values() if m.slot == 0)
        clock.advance(120)
        factory.store.write_file(first, "joboutputs/shutdown_message", "300 No more work")
        await power_off(factory, works, first.uuid)
        port = factory.responder.address[1]
        me = [FactoryAddress("f1.example.org", "127.0.0.1", port)]
        settings = factory.config.settings
        machines = await vacquery.query_machines(settings, me, timeout=5)
        assert machines.silent == []
        by_name = {status.machine: status for status in machines.reports}
        assert sorted(by_name) == ["f1-00.example.org", "f1-01.example.org"]
        assert by_name["f1-01.example.org"].state == "Running"
        types = await vacquery.query_machinetypes(settings, me, timeout=5)
        (lhcb,) = types.reports
        assert lhcb.machinetype == "lhcb" and lhcb.shutdown_message == "300 No more work"
        (status,) = (await vacquery.query_factories(settings, me, timeout=5)).reports
        assert status.max_processors == 2 and status.running_machines == 1
        await factory.shutdown()

    run(scenario())


def test_start_waits_for_libvirtd_and_then_works(tmp_path, clock, caplog):
    async def scenario():
        FakeWorks.fail_connects_at_start = 1
        try:
            factory, works = await started(tmp_path, clock)
        finally:
            FakeWorks.fail_connects_at_start = 0
        assert works.named("connect") == [("connect",), ("connect",)]
        assert "cannot use libvirt: fake libvirtd is down; retrying in 1 s" in caplog.text
        assert len(works.named("create")) == 2
        await factory.shutdown()

    run(scenario())


def test_unusable_service_address_is_a_clear_startup_error(tmp_path, clock):
    from vac.daemon.vacd import StartupError

    async def scenario():
        factory = make_factory(tmp_path, clock, extra="vacquery_secret_file = /nonexistent/secret")
        with pytest.raises(StartupError, match="cannot read vacquery_secret_file /nonexistent/secret"):
            await factory.start()
        await factory.shutdown()

    run(scenario())


def test_status_file_meets_the_check_vacd_contract(tmp_path, clock):
    from vac.cli.check import evaluate, read_status, validate_status

    async def scenario():
        factory, works = await started(tmp_path, clock)
        status = read_status(tmp_path / "state" / "status.json")
        assert validate_status(status) == status
        assert (status["running_machines"], status["slots"], status["last_creation_error"]) == (2, 2, None)
        await factory.shutdown()
        return status

    status = run(scenario())
    result = evaluate(status, now=clock.now + 5, warning=300, critical=600)
    assert result.state == 0, result.line  # OK: this very process is the "vacd" pid


def test_a_failed_finish_is_retried_later_and_accounts_once(tmp_path, clock, caplog):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        clock.advance(120)
        works.fail_accounts = 1
        await power_off(factory, works, machine.uuid)
        assert "finishing f1-00.example.org failed" in caplog.text
        assert factory.machines[machine.uuid].state is MachineState.FINISHING
        await cycle(factory, reconcile=False)
        assert len(works.named("account")) == 1, "not retried at once"
        clock.advance(31)
        await cycle(factory, reconcile=False)
        assert machine.uuid not in factory.machines
        assert len(works.named("account")) == 2  # the failed attempt, then the one that worked
        await factory.shutdown()

    run(scenario())


def test_sighup_reload_applies_a_run_time_drain(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        (tmp_path / "run.conf").write_text("[settings]\ndraining = yes\n")
        # The edit changed the files' stamp, which alone makes the next cycle reload: take it
        # as seen, so that only the reload request can.
        factory.config_stamp = config_stamp(factory.paths)
        factory.request_reload()
        clock.advance(120)
        await power_off(factory, works, machine.uuid)
        assert factory.config.settings.draining
        assert len(works.named("create")) == 1, "draining: the freed slot stays empty"
        await factory.shutdown()

    run(scenario())


def test_vacd_check_config_reports_located_errors(tmp_path, capsys):
    from vac.daemon.vacd import main

    paths = write_config(tmp_path, extra="udp_timeout_seconds = soon")
    status = main(["--check-config", "--conf-dir", paths.conf_dir, "--conf", paths.main_conf,
                   "--run-conf", paths.run_confs[0]])
    assert status == 1
    errors = capsys.readouterr().err
    assert "10-test.conf:" in errors and "udp_timeout_seconds: 'soon'" in errors


def test_check_config_under_systemd_gives_each_problem_its_priority(tmp_path, monkeypatch):
    """ExecReload= runs ``--check-config`` with the journal as stderr: errors at priority 3."""
    import os

    from vac.core.ini import ERROR, WARNING, Problem
    from vac.ops.configcli import print_problems

    with open(tmp_path / "journal", "w+") as journal:
        status = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        print_problems([Problem(ERROR, "bad", "/etc/vac.d/x.conf", 2), Problem(WARNING, "odd", "/etc/vac.conf", 3)],
                       journal)
        journal.seek(0)
        lines = journal.read().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>"]
    assert "/etc/vac.d/x.conf:2" in lines[0] and "bad" in lines[0]


def test_vcycled_check_config_reports_located_errors(tmp_path, capsys):
    from vac.daemon.vcycled import main

    (tmp_path / "vcycle.conf").write_text("[space s.example.org]\napi = azure\n")
    assert main(["--check-config", "--conf-dir", str(tmp_path / "none"), "--conf", str(tmp_path / "vcycle.conf")]) == 1
    assert f"{tmp_path}/vcycle.conf:2: [space s.example.org] api: 'azure' is not supported" in capsys.readouterr().err


def test_a_missing_volume_group_is_a_clear_startup_error(tmp_path, clock):
    from vac.daemon.vacd import StartupError

    async def scenario():
        factory = make_factory(tmp_path, clock, extra="volume_group = missing")
        with pytest.raises(StartupError, match='volume_group missing: Volume group "missing" not found'):
            await factory.start()
        await factory.shutdown()

    run(scenario())


def test_configured_upload_caps_reach_the_mjf_service(tmp_path):
    from vac.daemon.vacd import service_limits

    extra = "joboutputs_file_max_bytes = 4096\njoboutputs_total_max_bytes = 8192\njoboutputs_max_files = 7"
    config = configmod.load_config_or_raise(write_config(tmp_path, extra=extra), processor_count=8)
    limits = service_limits(config.settings)
    assert (limits.joboutput_file_bytes, limits.joboutputs_total_bytes,
            limits.joboutputs_max_files) == (4096, 8192, 7)


def test_metrics_count_creations_backoffs_and_queries(tmp_path, clock):
    import socket

    from vac.core.config import FactoryAddress
    from vac.services import vacquery

    with socket.socket() as probe:  # a free port for the metrics endpoint
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1, extra=f"metrics_port = {port}")
        machine = next(iter(factory.machines.values()))
        factory.store.write_file(machine, "joboutputs/shutdown_message", "300 No more work")
        clock.advance(120)
        await power_off(factory, works, machine.uuid)
        me = [FactoryAddress("f1.example.org", "127.0.0.1", factory.responder.address[1])]
        await vacquery.query_machinetypes(factory.config.settings, me, timeout=5)
        await cycle(factory, reconcile=False)
        metrics = factory.metrics
        assert metrics.creations.value(machinetype="lhcb") == 1
        assert metrics.backoffs.value(machinetype="lhcb") == 1
        await cycle(factory)  # still in backoff: not counted again
        assert metrics.backoffs.value(machinetype="lhcb") == 1
        assert metrics.vacquery_queries.value(query=vacquery.MACHINETYPES) == 1
        await factory.shutdown()

    run(scenario())


# -- CPU time up to the end, deadlines on time, configuration at the next plan ----------------


async def sample_once(factory, monkeypatch):
    """Run the CPU sampler for one round (its period shortened), then stop it."""
    from vac.daemon import vacd

    monkeypatch.setattr(vacd, "CPU_SAMPLE_SECONDS", 0.01)
    before = {uuid: m.heartbeat for uuid, m in factory.machines.items()}
    task = asyncio.get_running_loop().create_task(factory.sample_cpu())
    try:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if any(m.heartbeat != before.get(uuid) for uuid, m in factory.machines.items()):
                break
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(("at_end", "accounted"), [(95.0, 95.0), (0.0, 30.0)])
def test_cpu_time_is_read_at_the_end_and_never_goes_down(tmp_path, clock, caplog, at_end,
                                                          accounted):
    """The reading at the guest's poweroff counts; one that comes back short (libvirt says 0
    once QEMU is gone) does not lower the earlier readings."""
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        works.domains[machine.uuid].cpu_seconds = 30.0
        clock.advance(60)
        await cycle(factory)  # the reconcile reads 30 s
        assert factory.machines[machine.uuid].cpu_seconds == 30.0
        works.domains[machine.uuid].cpu_seconds = at_end
        clock.advance(60)
        await power_off(factory, works, machine.uuid)
        assert works.named("account") == [("account", machine.uuid, clock.now, accounted)]
        record = json.loads((factory.store.machine_dir(machine) / "machine.json").read_text())
        assert record["machine"]["cpu_seconds"] == accounted
        assert ("the reading came back short, 0 s" in caplog.text) is (at_end < accounted)
        await factory.shutdown()

    run(scenario())


def test_cpu_is_sampled_between_cycles_and_persisted(tmp_path, clock, monkeypatch):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        works.domains[machine.uuid].cpu_seconds = 12.5
        clock.advance(10)
        await sample_once(factory, monkeypatch)
        sampled = factory.machines[machine.uuid]
        assert (sampled.cpu_seconds, sampled.cpu_percentage, sampled.heartbeat) == \
            (12.5, 125.0, clock.now)
        record = json.loads((factory.store.machine_dir(machine) / "machine.json").read_text())
        assert record["machine"]["cpu_seconds"] == 12.5
        await factory.shutdown()

    run(scenario())


def test_a_machine_that_ended_unseen_keeps_its_last_reading_and_the_log_says_so(
        tmp_path, clock, monkeypatch, caplog):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        works.domains[machine.uuid].cpu_seconds = 20.0
        clock.advance(100)
        await sample_once(factory, monkeypatch)
        works.vanish(machine.uuid)  # e.g. while libvirtd restarted: no event, no final reading
        clock.advance(30)
        await cycle(factory)
        assert [call[3] for call in works.named("account")] == [20.0]
        assert ("no CPU reading at its end (it was gone before it could be read): CPU "
                "time 20 s is its last reading") in caplog.text
        await factory.shutdown()

    run(scenario())


def test_the_next_deadline_arms_one_timer_that_wakes_the_cycle(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        loop = asyncio.get_running_loop()
        assert factory.wake_timer.when() - loop.time() == pytest.approx(3600, abs=1)
        clock.advance(3600 - 0.05)  # 50 ms before its deadline
        await cycle(factory, reconcile=False)
        assert ("shutdown", machine.uuid) not in works.calls
        await asyncio.wait_for(factory.wake.wait(), 10)  # the timer, nothing else, sets it
        clock.advance(0.06)
        await cycle(factory, reconcile=False)
        assert ("shutdown", machine.uuid) in works.calls
        await factory.shutdown()

    run(scenario())


def test_no_timer_while_nothing_is_due(tmp_path, clock):
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1, extra="draining = yes")
        assert works.named("create") == [] and factory.wake_timer is None
        await factory.shutdown()

    run(scenario())


def test_a_reconcile_reads_file_times_only_of_machines_found_gone(tmp_path, clock):
    """The newest file a machine wrote estimates when it ended: needed only for one found gone,
    not read for every running machine at every reconcile."""
    async def scenario():
        factory, works = await started(tmp_path, clock)
        running = list(factory.machines)
        works.calls.clear()
        await cycle(factory, reconcile=True)
        assert works.named("last_activity") == []
        gone = running[0]
        works.vanish(gone)  # gone from the listing without an event (vacd missed it)
        await cycle(factory, reconcile=True)
        assert works.named("last_activity") == [("last_activity", gone)]
        await factory.shutdown()

    run(scenario())


def test_reading_the_configuration_leaves_the_loop_free(tmp_path, clock, monkeypatch):
    """Vacuum pipes may be fetched over HTTP while the configuration is read: that happens in
    the thread pool, and the loop (metadata, MJF, VacQuery) goes on meanwhile."""
    import threading
    import time

    async def scenario():
        factory, _ = await started(tmp_path, clock)
        reading = threading.Event()
        real = factory.read_config

        def slow_read():
            reading.set()
            time.sleep(0.5)  # a pipe server answering slowly
            return real()

        monkeypatch.setattr(factory, "read_config", slow_read)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not reading.is_set():
                await asyncio.sleep(0.01)
            for _ in range(20):
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        await factory.load_config()
        assert ticks >= 10, "the loop stood still while the configuration was read"
        await ticking
        await factory.shutdown()

    run(scenario())


def test_a_changed_configuration_file_applies_to_the_next_plan(tmp_path, clock):
    """No SIGHUP, no reconcile: the next plan after an edit sees it."""
    async def scenario():
        factory, works = await started(tmp_path, clock, processors=1)
        machine = next(iter(factory.machines.values()))
        (tmp_path / "run.conf").write_text("[settings]\ndraining = yes\n")
        clock.advance(120)
        await power_off(factory, works, machine.uuid)  # cycles without reconcile
        assert factory.config.settings.draining
        assert len(works.named("create")) == 1, "draining: the freed slot stays empty"
        await factory.shutdown()

    run(scenario())


def test_config_stamp_sees_edits_new_and_removed_files(tmp_path):
    import os

    from vac.daemon.vacd import config_stamp

    paths = write_config(tmp_path)
    fragment = tmp_path / "vac.d" / "10-test.conf"
    stamp = config_stamp(paths)
    assert config_stamp(paths) == stamp
    text = fragment.read_text()
    fragment.write_text(text.replace("total_processors = 2", "total_processors = 1"))
    info = fragment.stat()
    os.utime(fragment, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))  # same size
    edited = config_stamp(paths)
    assert edited != stamp
    (tmp_path / "vac.d" / "20-more.conf").write_text("[settings]\n")
    added = config_stamp(paths)
    assert added != edited
    (tmp_path / "vac.d" / "20-more.conf").unlink()
    (tmp_path / "run.conf").write_text("[settings]\ndraining = yes\n")
    assert config_stamp(paths) not in (stamp, edited, added)


def test_a_backend_that_cannot_connect_refuses_only_its_machinetypes(tmp_path, clock, caplog):
    """podman missing: its machinetype is logged once and never created; the VMs go on, and a
    later reconcile that finds podman creates the container machinetype again."""
    import logging

    from vac.backends.base import BackendError

    caplog.set_level(logging.INFO, logger="vacd")

    class MissingEngine:
        """podman, not installed until ``installed``; then the recording fake."""

        kind = "container"
        installed = False

        def attach(self, settings, on_stopped, on_reconnected, works):
            self.works = works
            return self

        def connect(self):
            if not self.installed:
                raise BackendError("podman is not installed")

        def __getattr__(self, name):
            return getattr(self.works, name)

    engine = MissingEngine()
    podman = ("[machinetype ct]\ntarget_share = 1\nmachine_model = podman\n"
              "root_image = docker://example.org/ct\nuser_data = /images/ct.user_data\n")

    async def scenario():
        factory = Factory(write_config(tmp_path, processors=4, extra="", machinetype_extra=podman),
                          clock=clock, works_factory=FakeWorks, backend_makers={
                              **FAKE_BACKENDS, "engine": engine.attach},
                          host_facts=idle_host, processor_count=8)
        await factory.start()
        works = FakeWorks.instances[-1]
        await cycle(factory)
        assert {call[2] for call in works.named("create")} == {"lhcb"}
        assert caplog.text.count("the engine backend cannot be used: podman is not installed") == 1
        await cycle(factory)  # the reconcile tries again: still missing, not logged again
        assert caplog.text.count("the engine backend cannot be used") == 1
        assert factory.backends.for_model("podman") is None
        engine.installed = True
        await cycle(factory)
        assert "the engine backend is connected" in caplog.text
        assert factory.backends.for_model("podman") is engine
        assert "ct" in {call[2] for call in works.named("create")}
        await factory.shutdown()

    FakeWorks.instances.clear()
    run(scenario())
