"""A reload of vacd's configuration, seen from the network: the VacQuery responder, the peer
cache and the authenticator follow the reloaded settings at the next cycle; a setting that
needs a restart is logged once and left as it was (real UDP on loopback)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.fakes import FAKE_BACKENDS, FakeClock, FakeWorks, settle
from vac.core import config as configmod
from vac.core.config import FactoryAddress, Settings
from vac.core.model import MachinetypeReport
from vac.core.scheduler import HostFacts
from vac.daemon.vacd import Factory
from vac.services import vacquery

pytestmark = pytest.mark.component

SPACE = "space.example.org"
SECRET = b"a-secret-shared-by-the-space"
CONFIG = """
[settings]
vac_space = {space}
factory_name = f1.example.org
factories = f1.example.org@127.0.0.1 peer.example.org@127.0.0.3:{peer_port}
state_dir = {state}
total_processors = 1
metadata_address = 127.0.0.1
mjf_address = 127.0.0.2
http_port = 0
vacquery_address = 127.0.0.1
vacquery_port = 0
udp_timeout_seconds = 1
peer_cache_seconds = 3600
gocdb_sitename = SITE-ONE

[machinetype lhcb]
target_share = 1
root_image = /images/lhcb.iso
user_data = /images/lhcb.user_data
"""
# Only this factory's own queries of itself: a name outside the space's list of factories.
CLIENT = Settings(vac_space=SPACE, factory_name="client.example.org", vacquery_address="127.0.0.1")


def idle_host(_state_dir):
    return HostFacts(processors=8, load_averages=(0.0, 0.0, 0.0),
                     state_dir_free_bytes=100 << 30, free_memory_bytes=100 << 30)


async def start_factory(tmp_path, peer_port: int = 9) -> Factory:
    conf_dir = tmp_path / "vac.d"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / "10-test.conf").write_text(
        CONFIG.format(space=SPACE, peer_port=peer_port, state=tmp_path / "state"))
    paths = configmod.ConfigPaths(conf_dir=str(conf_dir), main_conf=str(tmp_path / "none.conf"),
                                  run_confs=(str(tmp_path / "run.conf"),))
    factory = Factory(paths, clock=FakeClock(), works_factory=FakeWorks,
                      backend_makers=FAKE_BACKENDS, host_facts=idle_host, processor_count=8)
    await factory.start()
    await factory.cycle(reconcile=True)
    await settle(factory)
    return factory


async def reload(factory: Factory, tmp_path, run_conf: str) -> None:
    """Write the run-time file and reload as SIGHUP does (the next cycle reads it)."""
    (tmp_path / "run.conf").write_text("[settings]\n" + run_conf)
    factory.request_reload()
    await factory.cycle(reconcile=False)
    await settle(factory)


async def eventually(condition, what: str) -> None:
    for _ in range(200):  # at most about 10 s
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def itself(factory: Factory, port=None) -> list:
    return [FactoryAddress("f1.example.org", "127.0.0.1", port or factory.responder.address[1])]


def test_reloaded_secret_policy_period_and_site_reach_the_responder_and_the_peer_cache(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")

    async def scenario():
        peer_settings = Settings(vac_space=SPACE, factory_name="peer.example.org",
                                 vacquery_address="127.0.0.3", vacquery_port=0,
                                 vacquery_allow_unauthenticated=False)
        snapshot = vacquery.StatusSnapshot(
            [], [MachinetypeReport("peer.example.org", "atlas", running_machines=2)],
            vacquery.FactoryStatus("peer.example.org"))
        peer = await vacquery.start_responder(peer_settings, lambda: snapshot, SECRET)
        factory = await start_factory(tmp_path, peer.address[1])
        try:
            before = await vacquery.query_factories(CLIENT, itself(factory), timeout=2)
            assert [status.site for status in before.reports] == ["SITE-ONE"]
            await eventually(lambda: factory.peer_cache.last_result is not None, "a first refresh")
            assert factory.peer_cache.reports() == (), "the peer answers signed queries only"

            assert "127.0.0.9" not in factory.responder.factory_addresses
            await reload(factory, tmp_path, f"vacquery_secret_file = {secret_file}\n"
                         "vacquery_allow_unauthenticated = no\npeer_cache_seconds = 5\n"
                         "gocdb_sitename = SITE-TWO\nfactories = f1.example.org@127.0.0.1 "
                         f"peer.example.org@127.0.0.3:{peer.address[1]} new.example.org@127.0.0.9\n")
            # A factory added to the space is inside it for the amplification rule at once.
            await eventually(lambda: "127.0.0.9" in factory.responder.factory_addresses,
                             "the new factory's address known to the responder")
            # The peer cache signs with the new secret, and its new period starts with a
            # refresh now instead of after the old hour.
            await eventually(lambda: factory.peer_cache.reports(), "reports from the peer")
            (report,) = factory.peer_cache.reports()
            assert (report.factory, report.machinetype, report.running_machines) == \
                ("peer.example.org", "atlas", 2)
            assert factory.peer_cache.refresh_seconds == 5
            # The responder now refuses unsigned queries and answers with the new site name.
            unsigned = await vacquery.query_factories(CLIENT, itself(factory), timeout=0.5)
            assert unsigned.silent == ["f1.example.org"]
            signed = await vacquery.query_factories(CLIENT, itself(factory), timeout=2,
                                                    secret=SECRET)
            assert [status.site for status in signed.reports] == ["SITE-TWO"]
            assert factory.works.settings is factory.config.settings
        finally:
            await factory.shutdown()
            peer.close()

    asyncio.run(scenario())


def test_an_unusable_secret_file_at_a_reload_keeps_the_secret_in_use(tmp_path, caplog):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)

    async def scenario():
        factory = await start_factory(tmp_path)
        try:
            await reload(factory, tmp_path, f"vacquery_secret_file = {secret_file}\n"
                         "vacquery_allow_unauthenticated = no\n")
            secret_file.write_bytes(b"short")
            await reload(factory, tmp_path, f"vacquery_secret_file = {secret_file}\n"
                         "vacquery_allow_unauthenticated = no\n")
            assert "fewer than 16 bytes: keeping the secret in use" in caplog.text
            unsigned = await vacquery.query_factories(CLIENT, itself(factory), timeout=0.5)
            assert unsigned.silent == ["f1.example.org"], "still strict, with the old secret"
            signed = await vacquery.query_factories(CLIENT, itself(factory), timeout=2,
                                                    secret=SECRET)
            assert signed.complete
        finally:
            await factory.shutdown()

    asyncio.run(scenario())


def test_a_restart_needed_setting_is_logged_once_per_change_and_not_applied(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    def restart_lines() -> list:
        return [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING and "needs a restart" in record.getMessage()]

    async def scenario():
        factory = await start_factory(tmp_path)
        port = factory.responder.address[1]
        try:
            for _ in range(3):  # every reload reads the same change again
                await reload(factory, tmp_path, "vacquery_port = 19993\ndraining = yes\n")
            assert restart_lines() == [
                "vacquery_port changed from 0 to 19993: this needs a restart of vacd; "
                "keeping 0 until then"]
            settings = factory.config.settings
            assert settings.vacquery_port == 0 and settings.draining, "the live one is applied"
            assert factory.responder.settings.vacquery_port == 0
            answer = await vacquery.query_factories(CLIENT, itself(factory, port), timeout=2)
            assert answer.complete, "still answering where it was bound"

            await reload(factory, tmp_path, "vacquery_port = 19994\n")  # another change
            assert len(restart_lines()) == 2 and "to 19994" in restart_lines()[-1]
            await reload(factory, tmp_path, "")  # back to the running value: nothing to say
            await reload(factory, tmp_path, "vacquery_port = 19994\n")  # a new change again
            assert len(restart_lines()) == 3
        finally:
            await factory.shutdown()

    asyncio.run(scenario())
