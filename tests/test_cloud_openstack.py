"""The OpenStack backend against the Keystone/Nova/Glance emulator (``cloud`` tier).

The emulator is first proved against openstacksdk itself (the reference client, unmodified),
so that the backend's tests run against answers shaped as a real cloud shapes them.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
from pathlib import Path

import openstack
import pytest

from tests import openstack_emulator as emu
from tests.cloudservers import USER_DATA, free_port, new_machine
from tests.localhttp import LocalHTTPServer, Route, tls_server_context
from tests.openstack_emulator import OpenStackEmulator
from vac.backends.base import BackendError
from vac.backends.cloud.common import Quota
from vac.backends.cloud.openstack import OpenStackBackend
from vac.core.cloud import CloudState
from vac.core.config import Machinetype, Settings
from vac.core.vcycleconfig import CloudMachinetype, Space
from vac.daemon.machines import MachineWorks
from vac.records.store import Store

pytestmark = pytest.mark.cloud

SETTINGS = Settings(vac_space="os.example.org", factory_name="vcycle.example.org")
PUBLIC_KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 root@vcycle\n"


@pytest.fixture
def emulator():
    server = OpenStackEmulator()
    yield server
    server.close()


def test_emulator_serves_openstacksdk(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    """openstacksdk, unmodified, authenticates, reads the catalog and makes every call vcycle makes."""
    conn = openstack.connection.Connection(
        auth_url=emulator.auth_url, username=emu.USER, password=emu.PASSWORD,
        project_name=emu.PROJECT, user_domain_name=emu.DOMAIN, project_domain_name=emu.DOMAIN,
        region_name=emu.REGION, identity_api_version="3")
    try:
        assert sorted((f.name, f.vcpus) for f in conn.compute.flavors()) == [
            ("m1.large", 4), ("m1.medium", 2), ("m1.small", 1)]
        assert conn.compute.get_limits().absolute.total_cores == 20

        image_file = tmp_path / "root.img"
        image_file.write_bytes(b"\0" * 4096)
        image = conn.image.create_image(name="root.img", filename=str(image_file), disk_format="raw",
                                        container_format="bare", visibility="private",
                                        last_modified="1700000000", wait=True, validate_checksum=False,
                                        use_import=False)
        assert emulator.image_data[image.id] == b"\0" * 4096
        found = list(conn.image.images(name="root.img"))
        assert [i.id for i in found] == [image.id] and found[0].status == "active"
        assert found[0].properties.get("last_modified") == "1700000000"

        conn.compute.create_keypair(name="k", public_key=PUBLIC_KEY.strip())
        assert conn.compute.get_keypair("k").public_key == PUBLIC_KEY.strip()

        server = conn.compute.create_server(
            name="vcycle-lhcb-0123456789", image_id=image.id, flavor_id="2", key_name="k",
            user_data=base64.b64encode(b"hello").decode(), metadata={"machinetype": "lhcb"})
        emulator.set_server(server.id, "ACTIVE")
        listed = list(conn.compute.servers(details=True))
        assert [(s.name, s.status, s.metadata) for s in listed] == [
            ("vcycle-lhcb-0123456789", "ACTIVE", {"machinetype": "lhcb"})]
        assert listed[0].power_state == 1 and listed[0].launched_at
        conn.compute.stop_server(server)
        assert conn.compute.get_server(server.id).status == "SHUTOFF"
        conn.compute.delete_server(server)
        assert list(conn.compute.servers()) == []
    finally:
        conn.close()


def make_space(emulator: OpenStackEmulator, tmp_path: Path, **changes) -> Space:
    key = tmp_path / "id_rsa.pub"
    key.write_text(PUBLIC_KEY)
    (tmp_path / "files").mkdir(exist_ok=True)
    (tmp_path / "files" / "root.img").write_bytes(b"\1" * 1000)
    machinetype = Machinetype(name="lhcb", root_image="root.img", user_data="user_data",
                              min_processors=1, max_processors=2, machinetype_path=str(tmp_path))
    values = dict(name="os.example.org", api="openstack", url=emulator.auth_url, region=emu.REGION,
                  project_name=emu.PROJECT, domain_name=emu.DOMAIN, username=emu.USER,
                  password=emu.PASSWORD, flavor_names=("m1.medium", "m1.small"),
                  machinetypes={"lhcb": CloudMachinetype(machinetype, root_public_key=str(key))})
    values.update(changes)
    return Space(**values)


def test_life_cycle(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    space = make_space(emulator, tmp_path, zones=("az1",), security_groups=("vcycle",),
                       network_uuid="net-1")
    backend = OpenStackBackend(space)
    backend.connect()
    assert backend.list_machines() == []
    machinetype = space.machinetypes["lhcb"].machinetype
    machine, directory = new_machine(tmp_path)
    backend.create(machine, machinetype, SETTINGS, directory)

    [server] = emulator.servers.values()
    assert server["name"] == machine.name and server["flavor"]["id"] == "2"  # first fitting name
    assert emulator.user_data[server["id"]] == USER_DATA
    assert server["metadata"] == {"cern-services": "false", "name": machine.name, "machinetype": "lhcb",
                                  "vcycle_uuid": machine.uuid, "vcycle_space": space.name,
                                  "vcycle_manager": SETTINGS.factory_name}
    assert server["OS-EXT-AZ:availability_zone"] == "az1"
    create_body = next(body for body in emulator.bodies if "server" in body)["server"]
    assert create_body["security_groups"] == [{"name": "vcycle"}]
    assert create_body["networks"] == [{"uuid": "net-1"}]
    assert server["key_name"] in emulator.keypairs
    [image] = emulator.images.values()
    assert image["name"] == "root.img" and image["last_modified"] == str(int(os.stat(tmp_path / "files/root.img").st_mtime))
    assert emulator.image_data[image["id"]] == b"\1" * 1000

    [found] = backend.list_machines()
    assert (found.uuid, found.name, found.machinetype, found.processors) == (machine.uuid, machine.name, "lhcb", 2)
    assert found.manager == SETTINGS.factory_name
    assert found.state == CloudState.STARTING and found.active and found.cpu_seconds is None
    emulator.set_server(found.cloud_id, "ACTIVE")
    [found] = backend.list_machines()
    assert found.state == CloudState.RUNNING and found.started is not None
    assert backend.quota() == Quota(20, 2)

    # A second machine reuses the image and the key pair: no second upload, no second import.
    second, second_directory = new_machine(tmp_path)
    fresh = OpenStackBackend(space)  # a restarted vcycled finds them again in the cloud
    fresh.connect()
    fresh.create(second, machinetype, SETTINGS, second_directory)
    assert len(emulator.images) == 1 and len(emulator.keypairs) == 1

    backend.stop(machine.uuid)
    backend.stop(machine.uuid)  # 409 from Nova: already stopped, fine
    assert {m.uuid: m.state for m in backend.list_machines()}[machine.uuid] == CloudState.SHUT_DOWN
    backend.destroy(machine.uuid)
    backend.destroy(machine.uuid)
    assert [m.uuid for m in backend.list_machines()] == [second.uuid]

    # A changed image file is uploaded again, and the new image is used.
    os.utime(tmp_path / "files/root.img", (1_900_000_000, 1_900_000_000))
    third, third_directory = new_machine(tmp_path)
    fresh.create(third, machinetype, SETTINGS, third_directory)
    assert len(emulator.images) == 2
    newest = next(i for i in emulator.images.values() if i["last_modified"] == "1900000000")
    assert emulator.servers[fresh._servers[third.uuid]]["image"]["id"] == newest["id"]


def test_url_root_image_goes_through_the_image_cache_into_glance(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    images = LocalHTTPServer()
    try:
        images.routes["/cernvm.iso"] = Route(body=b"\2" * 2048)
        url = images.url("/cernvm.iso")
        space = make_space(emulator, tmp_path)
        cloud_type = space.machinetypes["lhcb"]
        machinetype = dataclasses.replace(cloud_type.machinetype, root_image=url)
        space = dataclasses.replace(space, machinetypes={"lhcb": dataclasses.replace(cloud_type, machinetype=machinetype)})
        works = MachineWorks(Store(tmp_path / "state"), dataclasses.replace(SETTINGS, state_dir=str(tmp_path / "state")))
        backend = OpenStackBackend(space, image_path=works.vm_root_image)
        backend.connect()
        for _ in range(2):  # the second machine finds the image again: one download, one upload
            machine, directory = new_machine(tmp_path)
            backend.create(machine, machinetype, SETTINGS, directory)
        [image] = emulator.images.values()
        assert image["name"] == url and emulator.image_data[image["id"]] == b"\2" * 2048
        assert images.paths().count("/cernvm.iso") >= 1 and images.finished == 1
        assert (tmp_path / "state" / "imagecache").is_dir()
    finally:
        images.close()


def test_application_credential_and_region(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    space = make_space(emulator, tmp_path, username=None, password=None,
                       cred_id=emu.CRED_ID, cred_secret=emu.CRED_SECRET)
    backend = OpenStackBackend(space)
    backend.connect()
    assert backend.list_machines() == []
    wrong = OpenStackBackend(make_space(emulator, tmp_path, region="Nowhere"))
    with pytest.raises(BackendError, match="EndpointNotFound: public endpoint for compute service in Nowhere region"):
        wrong.connect()
    bad = OpenStackBackend(make_space(emulator, tmp_path, password="wrong"))
    with pytest.raises(BackendError, match="Keystone .*Unauthorized"):
        bad.connect()


def test_classic_tag_prefix_is_matched_exactly(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    space = make_space(emulator, tmp_path)
    mtime = str(int(os.stat(tmp_path / "files/root.img").st_mtime))
    # Classic lstrip matched "aeiou: <mtime>"; a correct match needs "last_modified: <mtime>".
    emulator.images["a"] = {"id": "a", "name": "root.img", "status": "active", "tags": [f"atom: {mtime}"],
                            "disk_format": "raw", "container_format": "bare"}
    emulator.images["b"] = {"id": "b", "name": "root.img", "status": "active",
                            "tags": [f"last_modified: {mtime}"], "disk_format": "raw", "container_format": "bare"}
    backend = OpenStackBackend(space)
    backend.connect()
    machine, directory = new_machine(tmp_path)
    backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    assert len(emulator.images) == 2  # the classic image was reused, not uploaded again
    assert next(iter(emulator.servers.values()))["image"]["id"] == "b"


def test_pagination(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    emulator.page_size = 2
    emulator.max_total_cores = 100
    space = make_space(emulator, tmp_path)
    backend = OpenStackBackend(space)
    backend.connect()
    machines = [new_machine(tmp_path) for _ in range(5)]
    for machine, directory in machines:
        backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    assert sorted(m.uuid for m in backend.list_machines()) == sorted(m.uuid for m, _ in machines)


def test_other_spaces_and_foreign_servers_are_left_alone(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    space = make_space(emulator, tmp_path)
    backend = OpenStackBackend(space)
    backend.connect()
    machine, directory = new_machine(tmp_path)
    backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    template = next(iter(emulator.servers.values()))
    emulator.servers["other"] = {**template, "id": "other", "name": "vcycle-lhcb-zzzzzzzzzz",
                                 "metadata": {"vcycle_space": "elsewhere.org", "vcycle_uuid": "u2"}}
    emulator.servers["classic"] = {**template, "id": "classic", "name": "vcycle-lhcb-cccccccccc",
                                   "metadata": {"machinetype": "lhcb"}}
    emulator.servers["mine"] = {**template, "id": "mine", "name": "web-server", "metadata": {}}
    assert sorted(m.uuid for m in backend.list_machines()) == sorted([machine.uuid, "classic"])


def test_cloud_failures_are_backend_errors(emulator: OpenStackEmulator, tmp_path: Path) -> None:
    space = make_space(emulator, tmp_path)
    backend = OpenStackBackend(space, retries=1)
    backend.connect()
    emulator.faults = [429, 500]  # the 429 is retried, the 500 is not
    with pytest.raises(BackendError, match="listing servers: HTTP 500 injected 500"):
        backend.list_machines()
    assert backend.list_machines() == []  # the cloud recovered

    for answer, message in (({"servers": "no"}, "field 'servers' is str, expected list"),
                            ({"servers": [{"id": "x", "name": "vcycle-a-0123456789"}]}, "field 'status' is missing"),
                            ([1, 2], "expected a JSON object")):
        emulator.answers[("GET", "/compute/v2.1/servers/detail")] = (200, answer)
        with pytest.raises(BackendError, match=message):
            backend.list_machines()
    emulator.answers.clear()

    emulator.answers[("GET", "/compute/v2.1/limits")] = (200, {"limits": {"absolute": {}}})
    assert backend.quota() == Quota(None, None)  # no core limit: no crash
    emulator.answers[("GET", "/compute/v2.1/limits")] = (200, {"limits": {"absolute": {"maxTotalCores": -1}}})
    assert backend.quota().max_processors is None  # -1 is "unlimited"
    emulator.answers.clear()

    emulator.max_total_cores = 1
    machine, directory = new_machine(tmp_path)
    with pytest.raises(BackendError, match="HTTP 403 Quota exceeded for cores"):
        backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    big = Machinetype(name="lhcb", root_image="root.img", min_processors=8, max_processors=8,
                      machinetype_path=str(tmp_path))
    with pytest.raises(BackendError, match="no flavor with 8 to 8 vCPUs"):
        backend.create(machine, big, SETTINGS, directory)
    closed = OpenStackBackend(make_space(emulator, tmp_path, url=f"http://127.0.0.1:{free_port()}/v3"),
                              retries=0)
    with pytest.raises(BackendError, match="Keystone .*ConnectFailure"):
        closed.connect()


def test_tls_is_verified_against_the_configured_ca(tmp_path: Path) -> None:
    context, ca_dir = tls_server_context(tmp_path)
    emulator = OpenStackEmulator(tls_context=context)
    try:
        trusting = OpenStackBackend(make_space(emulator, tmp_path, ca_certificates=str(ca_dir)))
        trusting.connect()
        assert trusting.list_machines() == []
        # The system store does not know the test CA: refused, never an unverified fallback.
        system = OpenStackBackend(make_space(emulator, tmp_path, ca_certificates="system"), retries=0)
        with pytest.raises(BackendError, match="Keystone .*SSL"):
            system.connect()
    finally:
        emulator.close()


def test_credentials_are_never_logged(emulator: OpenStackEmulator, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    space = make_space(emulator, tmp_path)
    assert emu.PASSWORD not in repr(space)
    backend = OpenStackBackend(space)
    backend.connect()
    machine, directory = new_machine(tmp_path, b"secret-proxy-in-user-data")
    backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    backend.list_machines()
    backend.destroy(machine.uuid)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "servers/detail" in text  # keystoneauth's request log was captured ...
    assert emu.PASSWORD not in text  # ... without the password
    assert base64.b64encode(b"secret-proxy-in-user-data").decode() not in text
