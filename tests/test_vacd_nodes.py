"""Container-only nodes: vacd binds the metadata/MJF services only where VMs run.

The services' default addresses (169.254.169.254/.253) exist only on the libvirt network's
bridge, which vacd sets up only for VM machinetypes; containers read Machine/Job Features
through bind mounts. The factory runs with the real planner, store and asyncio services and the
recording fake of tests/fakes.py as every backend.
"""

import asyncio

import pytest

from tests.fakes import FAKE_BACKENDS, FakeClock, FakeWorks, settle
from vac.core import config as configmod
from vac.core.scheduler import HostFacts
from vac.daemon.vacd import Factory

pytestmark = pytest.mark.component  # binds VacQuery (and later the services) on loopback

SETTINGS = """
[settings]
vac_space = space.example.org
factory_name = f1.example.org
state_dir = {state}
total_processors = 1
http_port = 0
vacquery_address = 127.0.0.1
vacquery_port = 0
{extra}

[machinetype ct]
target_share = 1
machine_model = podman
root_image = docker://example.org/ct
user_data = /images/ct.user_data
"""
VM_MACHINETYPE = """
[machinetype vm]
target_share = 1
root_image = /images/vm.iso
user_data = /images/vm.user_data
"""
IDLE_HOST = HostFacts(processors=8, load_averages=(0.0, 0.0, 0.0),
                      state_dir_free_bytes=100 << 30, free_memory_bytes=100 << 30)


def factory_for(tmp_path, extra=""):
    conf_dir = tmp_path / "vac.d"
    conf_dir.mkdir()
    (conf_dir / "10-test.conf").write_text(SETTINGS.format(state=tmp_path / "state", extra=extra))
    paths = configmod.ConfigPaths(conf_dir=str(conf_dir), main_conf=str(tmp_path / "none.conf"),
                                  run_confs=(str(tmp_path / "run.conf"),))
    FakeWorks.instances.clear()
    return Factory(paths, clock=FakeClock(), works_factory=FakeWorks,
                   backend_makers=FAKE_BACKENDS, host_facts=lambda _state: IDLE_HOST,
                   processor_count=8)


def test_a_container_only_node_starts_with_the_default_service_addresses(tmp_path, caplog):
    """169.254.169.254 is not on this host: binding it would fail vacd's start."""
    async def scenario():
        factory = factory_for(tmp_path)
        await factory.start()
        await factory.cycle(reconcile=True)
        await settle(factory)
        works = FakeWorks.instances[-1]
        assert factory.http_services is None and not factory.publisher.services_up
        assert set(factory.backends.connected) == {"engine"}
        assert factory.responder is not None
        assert {call[2] for call in works.named("create")} == {"ct"}
        assert "no VM machinetype: the metadata and MJF services are not started" in caplog.text
        await factory.shutdown()

    caplog.set_level("INFO")
    asyncio.run(scenario())


def test_a_reload_adding_a_vm_machinetype_connects_libvirt_and_starts_the_services(tmp_path):
    async def scenario():
        factory = factory_for(tmp_path, "metadata_address = 127.0.0.1\nmjf_address = 127.0.0.2")
        await factory.start()
        await factory.cycle(reconcile=True)
        await settle(factory)
        assert factory.http_services is None
        # The slot goes to the VM machinetype the reload adds once the container ends.
        (tmp_path / "vac.d" / "20-vm.conf").write_text("[machinetype ct]\ntarget_share = 0\n"
                                                       + VM_MACHINETYPE)
        await factory.cycle(reconcile=True)
        await settle(factory)
        works = FakeWorks.instances[-1]
        works.power_off(next(iter(factory.machines)))
        await asyncio.sleep(0)  # the event reaches the loop through call_soon_threadsafe
        await settle(factory)
        assert set(factory.backends.connected) == {"engine", "libvirt"}
        assert factory.http_services is not None and factory.publisher.services_up
        assert factory.http_services.mjf_url.startswith("http://127.0.0.2:")
        assert {call[2] for call in works.named("create")} == {"ct", "vm"}
        await factory.shutdown()

    asyncio.run(scenario())
