"""The EC2 backend against moto's real EC2 server on loopback (``cloud`` tier)."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import boto3
import botocore.awsrequest
import pytest

from tests.cloudservers import USER_DATA, MotoServer, free_port, new_machine
from vac.backends.base import BackendError
from vac.backends.cloud.common import Quota
from vac.backends.cloud.ec2 import EC2Backend
from vac.core.cloud import CloudState
from vac.core.config import Machinetype, Settings
from vac.core.vcycleconfig import CloudMachinetype, Space

pytestmark = pytest.mark.cloud

ACCESS_KEY = "AKIAVCYCLETEST000001"
SECRET_KEY = "vcycle-secret-key-never-logged-3f9a"
SETTINGS = Settings(vac_space="ec2.example.org", factory_name="vcycle.example.org")
PUBLIC_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq6kK0kJcsV0m0x3E3XhZbqzJ8fQvH7k4q5Jb1n2t3r "
              "root@vcycle\n")


@pytest.fixture
def endpoint(moto: MotoServer) -> str:
    moto.reset()
    return moto.url


def ec2_client(url: str):
    return boto3.client("ec2", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def an_image(url: str) -> str:
    return ec2_client(url).describe_images(MaxResults=5)["Images"][0]["ImageId"]


def make_space(url: str, tmp_path: Path, *, image: str, name: str = "ec2.example.org",
               key: bool = True) -> Space:
    key_path = None
    if key:
        key_path = tmp_path / "id.pub"
        key_path.write_text(PUBLIC_KEY)
    machinetype = Machinetype(name="lhcb", root_image=f"image:{image}", user_data="user_data",
                              machinetype_path=str(tmp_path))
    return Space(name=name, api="ec2", url=url, region="us-east-1", access_key=ACCESS_KEY,
                 secret_key=SECRET_KEY, flavor_names=("t2.micro",),
                 machinetypes={"lhcb": CloudMachinetype(machinetype, root_public_key=str(key_path) if key else None)})


def test_life_cycle_create_list_user_data_and_terminate(endpoint: str, tmp_path: Path) -> None:
    space = make_space(endpoint, tmp_path, image=an_image(endpoint))
    backend = EC2Backend(space)
    backend.connect()
    assert backend.list_machines() == []  # an empty account is no error (classic crash)

    machine, directory = new_machine(tmp_path)
    backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    machine2, directory2 = new_machine(tmp_path)
    backend.create(machine2, space.machinetypes["lhcb"].machinetype, SETTINGS, directory2)

    listed = {found.uuid: found for found in backend.list_machines()}
    assert set(listed) == {machine.uuid, machine2.uuid}
    found = listed[machine.uuid]
    assert found.name == machine.name and found.machinetype == "lhcb"
    assert found.active and found.state in (CloudState.STARTING, CloudState.RUNNING)
    assert found.cpu_seconds is None and backend.cpu_seconds(machine.uuid) is None
    assert found.processors == 1  # t2.micro, from DescribeInstanceTypes

    client = ec2_client(endpoint)
    attribute = client.describe_instance_attribute(InstanceId=found.cloud_id, Attribute="userData")
    assert base64.b64decode(attribute["UserData"]["Value"]) == USER_DATA
    instance = client.describe_instances(InstanceIds=[found.cloud_id])["Reservations"][0]["Instances"][0]
    tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
    assert tags["Name"] == machine.name and tags["vcycle_space"] == space.name
    assert tags["vcycle_uuid"] == machine.uuid and tags["machinetype"] == "lhcb"
    assert tags["vcycle_manager"] == SETTINGS.factory_name == found.manager
    # One key pair, imported once, named after the key itself.
    pairs = client.describe_key_pairs()["KeyPairs"]
    assert [pair["KeyName"] for pair in pairs] == [instance["KeyName"]]
    assert instance["KeyName"].startswith("vcycle-")

    backend.destroy(machine.uuid)
    backend.destroy(machine.uuid)  # idempotent
    assert [found.uuid for found in backend.list_machines()] == [machine2.uuid]
    backend.stop(machine2.uuid)
    stopped = backend.list_machines()[0]
    assert stopped.state == CloudState.SHUT_DOWN and not stopped.active
    assert backend.quota() == Quota(None, None)  # no core limit: no crash, just none
    backend.close()


def test_lists_only_this_spaces_and_classic_machines(endpoint: str, tmp_path: Path) -> None:
    image = an_image(endpoint)
    client = ec2_client(endpoint)

    def run(tags: dict) -> str:
        answer = client.run_instances(ImageId=image, InstanceType="t2.micro", MinCount=1, MaxCount=1,
                                      TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                          {"Key": key, "Value": value} for key, value in tags.items()]}])
        return answer["Instances"][0]["InstanceId"]

    classic = run({"name": "vcycle-lhcb-abcdefghij", "machinetype": "lhcb"})
    run({"Name": "vcycle-lhcb-0123456789", "vcycle_space": "other.example.org", "vcycle_uuid": "x"})
    run({"Name": "somebody-elses-vm"})
    backend = EC2Backend(make_space(endpoint, tmp_path, image=image))
    backend.connect()
    listed = backend.list_machines()
    assert [(found.uuid, found.name, found.machinetype) for found in listed] == [
        (classic, "vcycle-lhcb-abcdefghij", "lhcb")]
    backend.destroy(classic)  # classic machines without a directory can still be deleted
    assert backend.list_machines() == []


def described_ids(backend: EC2Backend) -> list:
    """The instance IDs of each DescribeInstances call the backend's own client makes."""
    calls: list = []

    def record(params: dict, **_: object) -> None:
        calls.append([value for each in params.get("Filters", []) if each["Name"] == "instance-id"
                      for value in each["Values"]])

    backend._client.meta.events.register("before-parameter-build.ec2.DescribeInstances", record)
    return calls


def test_steady_listing_describes_only_new_instances(endpoint: str, tmp_path: Path) -> None:
    space = make_space(endpoint, tmp_path, image=an_image(endpoint), key=False)
    backend = EC2Backend(space)
    backend.connect()
    calls = described_ids(backend)
    machinetype = space.machinetypes["lhcb"].machinetype
    first, first_directory = new_machine(tmp_path)
    backend.create(first, machinetype, SETTINGS, first_directory)
    [listed] = backend.list_machines()
    assert listed.uuid == first.uuid and listed.address and listed.zone == "us-east-1a"
    assert calls == [[listed.cloud_id]]

    assert [found.uuid for found in backend.list_machines()] == [first.uuid]
    assert len(calls) == 1  # states only: nothing new to describe
    second, second_directory = new_machine(tmp_path)
    backend.create(second, machinetype, SETTINGS, second_directory)
    listed = {found.uuid: found for found in backend.list_machines()}
    assert set(listed) == {first.uuid, second.uuid} and calls[1] == [listed[second.uuid].cloud_id]

    # Terminated behind vcycled's back: gone from the listing and from what is remembered.
    ec2_client(endpoint).terminate_instances(InstanceIds=[listed[first.uuid].cloud_id])
    assert [found.uuid for found in backend.list_machines()] == [second.uuid]
    assert len(calls) == 2


def test_a_cloud_without_describe_instance_status_is_described_in_full(
        endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    space = make_space(endpoint, tmp_path, image=an_image(endpoint), key=False)
    backend = EC2Backend(space)
    backend.connect()
    machine, directory = new_machine(tmp_path)
    backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    # The edge this cloud cannot show: an EC2-compatible cloud answering the call as unknown.
    status_calls = []

    def unknown_call(**_: object) -> tuple:
        status_calls.append(1)
        answer = {"Error": {"Code": "InvalidAction", "Message": "not implemented"},
                  "ResponseMetadata": {"HTTPStatusCode": 400}}
        return botocore.awsrequest.AWSResponse(endpoint, 400, {}, None), answer

    backend._client.meta.events.register("before-call.ec2.DescribeInstanceStatus", unknown_call)
    calls = described_ids(backend)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            [found] = backend.list_machines()
            assert found.uuid == machine.uuid and found.address and found.zone == "us-east-1a"
    assert status_calls == [1] and calls == [[], []]  # asked once; then full listings, no filter by ID
    assert sum("no DescribeInstanceStatus (InvalidAction)" in r.getMessage() for r in caplog.records) == 1
    # Any other refusal is the cloud failing, not a missing call.
    backend.connect()
    backend._client.meta.events.register("before-call.ec2.DescribeInstanceStatus", lambda **_: (
        botocore.awsrequest.AWSResponse(endpoint, 503, {}, None),
        {"Error": {"Code": "Unavailable", "Message": "busy"}, "ResponseMetadata": {"HTTPStatusCode": 503}}))
    with pytest.raises(BackendError, match="DescribeInstanceStatus: Unavailable"):
        backend.list_machines()


def test_instance_terminated_between_status_and_describe(endpoint: str, tmp_path: Path) -> None:
    space = make_space(endpoint, tmp_path, image=an_image(endpoint), key=False)
    backend = EC2Backend(space)
    backend.connect()
    machine, directory = new_machine(tmp_path)
    backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    backend2 = EC2Backend(space)
    backend2.connect()
    instance_id = backend.listed_ids()[machine.uuid]

    def terminate_first(params: dict, **_: object) -> None:
        ec2_client(endpoint).terminate_instances(InstanceIds=[instance_id])

    backend2._client.meta.events.register("before-parameter-build.ec2.DescribeInstances", terminate_first)
    assert backend2.list_machines() == []  # no InvalidInstanceID.NotFound for the whole listing


def test_cloud_refusals_are_backend_errors(endpoint: str, tmp_path: Path) -> None:
    space = make_space(endpoint, tmp_path, image="ami-00000000")
    backend = EC2Backend(space)
    backend.connect()
    machine, directory = new_machine(tmp_path)
    with pytest.raises(BackendError, match="RunInstances .*InvalidAMIID"):
        backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)

    big, big_directory = new_machine(tmp_path, b"x" * (16 * 1024 + 1))
    with pytest.raises(BackendError, match="user_data is 16385 bytes"):
        backend.create(big, space.machinetypes["lhcb"].machinetype, SETTINGS, big_directory)

    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\n")
    broken = Space(**{**space.__dict__, "machinetypes": {"lhcb": CloudMachinetype(
        space.machinetypes["lhcb"].machinetype, root_public_key=str(bad_key))}})
    backend = EC2Backend(broken)
    backend.connect()
    with pytest.raises(BackendError, match="no OpenSSH public key line"):
        backend.create(machine, broken.machinetypes["lhcb"].machinetype, SETTINGS, directory)


def test_unreachable_endpoint_is_a_backend_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    backend = EC2Backend(make_space(url, tmp_path, image="ami-1", key=False), timeout=2, retries=1)
    backend.connect()
    with pytest.raises(BackendError, match="DescribeInstanceStatus"):
        backend.list_machines()


def test_credentials_are_never_logged(endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    space = make_space(endpoint, tmp_path, image=an_image(endpoint))
    assert SECRET_KEY not in repr(space)
    backend = EC2Backend(space)
    backend.connect()
    machine, directory = new_machine(tmp_path)
    backend.create(machine, space.machinetypes["lhcb"].machinetype, SETTINGS, directory)
    backend.list_machines()
    backend.destroy(machine.uuid)
    assert caplog.records
    assert all(SECRET_KEY not in record.getMessage() for record in caplog.records)
