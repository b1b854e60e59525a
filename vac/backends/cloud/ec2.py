"""EC2 machines through boto3 (any EC2-compatible endpoint: AWS, OpenStack's EC2 API, moto).

boto3 signs (SigV4), retries throttled calls, paginates and parses; here every answer is still
checked, because an EC2-compatible cloud is not AWS.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import boto3
import botocore.config
import botocore.exceptions

from vac.backends.base import BackendError
from vac.backends.cloud.common import (
    MAX_PAGES,
    CloudError,
    CloudMachine,
    Quota,
    ReleasedByDeletion,
    field,
    read_public_key,
    read_user_data,
    space_machinetype,
    tls_verify,
)
from vac.core import cloud
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine
from vac.core.vcycleconfig import Space

log = logging.getLogger(__name__)

MAX_USER_DATA_BYTES = 16 * 1024  # EC2's limit, before base64
# What EC2-compatible clouds answer for an API call they do not implement.
_NO_SUCH_CALL = ("InvalidAction", "UnsupportedOperation", "NotImplemented", "UnknownOperation")
DESCRIBE_BATCH = 200  # EC2 takes at most 200 values in one filter
_TAG_NAME = "Name"  # the tag the EC2 console shows; classic Vcycle used "name"
# Terminated instances stay listed for about an hour: the cloud leaves them out of the answer
# (a busy account has many). Names are still checked here: classic machines only have "name".
_LIVE_STATES = {"Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped", "shutting-down"]}


class EC2Backend(ReleasedByDeletion):
    """One space's EC2 account and region. Implements vac.backends.base.MachineBackend."""

    kind = "cloud"

    def __init__(self, space: Space, *, timeout: float = 90.0, retries: int = 3) -> None:
        self.space = space
        self._timeout = timeout
        self._retries = retries
        self._client: Any = None
        self._instances: dict[str, str] = {}  # machine uuid -> instance id
        self._vcpus: dict[str, Optional[int]] = {}  # instance type -> vCPUs (None: unknown)
        self._key_names: dict[str, str] = {}
        self._described: dict[str, _Described] = {}  # instance id -> what does not change
        self._describe_all = False  # the cloud lacks DescribeInstanceStatus: list in full

    def connect(self) -> None:
        space = self.space
        config = botocore.config.Config(
            connect_timeout=self._timeout, read_timeout=self._timeout,
            retries={"max_attempts": self._retries, "mode": "standard"},
            user_agent_extra="vcycle")
        try:
            self._client = boto3.session.Session().client(
                "ec2", endpoint_url=space.url, region_name=space.region or "us-east-1",
                aws_access_key_id=space.access_key, aws_secret_access_key=space.secret_key,
                verify=tls_verify(space), config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as error:
            raise BackendError(f"space {space.name}: EC2 at {space.url}: {error}") from None
        self._vcpus = {}
        self._described = {}
        self._describe_all = False

    def close(self) -> None:
        self._client = None

    def _call(self, operation: str, what: str, **parameters: Any) -> dict:
        if self._client is None:
            raise BackendError(f"space {self.space.name}: not connected")
        try:
            answer = getattr(self._client, operation)(**parameters)
        except botocore.exceptions.ClientError as error:
            detail = error.response.get("Error", {})
            code = str(detail.get("Code", "?"))
            raise CloudError(f"space {self.space.name}: {what}: {code}: {detail.get('Message', '')}",
                             code) from None
        except botocore.exceptions.BotoCoreError as error:
            raise BackendError(f"space {self.space.name}: {what}: {error}") from None
        if not isinstance(answer, dict):
            raise BackendError(f"space {self.space.name}: {what}: unexpected answer")
        return answer

    # --- listing ---------------------------------------------------------------------------
    #
    # A full DescribeInstances answer carries some 10 kB per instance, and most of it never
    # changes while an instance lives. Each cycle lists only the states (DescribeInstanceStatus,
    # a few hundred bytes each) and describes just the instances not seen before, or seen
    # without an address yet; what is read once is kept in ``_described``. A cloud without
    # DescribeInstanceStatus (some EC2-compatible ones) is described in full each cycle.

    def _pages(self, operation: str, what: str, key: str, **parameters: Any) -> list:
        """Every item of a paginated answer's ``key`` list (an empty account may omit it)."""
        items: list = []
        for _ in range(MAX_PAGES):
            answer = self._call(operation, what, **parameters)
            items.extend(field(answer, key, list, what, optional=True) or [])
            token = answer.get("NextToken")
            if not token:
                return items
            parameters["NextToken"] = token
        raise BackendError(f"space {self.space.name}: {what}: more than {MAX_PAGES} pages")

    def list_machines(self) -> list[CloudMachine]:
        """Every vcycle instance of this space that is not yet terminated."""
        states = self._live_states()
        unread = [] if self._describe_all else [
            instance_id for instance_id in states
            if instance_id not in self._described or self._described[instance_id].incomplete]
        # A state read by the describe is the newer: an instance terminated meanwhile is left out.
        for instance_id, described in self._describe(unread).items():
            if instance_id in states:  # a cloud answering more than asked is not believed
                states[instance_id] = described
        states = {key: value for key, value in states.items() if value[0] != "terminated"}
        # Instances that are gone are forgotten; one not described yet (just created, and the
        # cloud's listings not yet consistent) is looked at again next cycle.
        self._described = {key: self._described[key] for key in states if key in self._described}
        machines = []
        for instance_id, (state_name, zone) in states.items():
            described = self._described.get(instance_id)
            if described is not None and described.name is not None:
                machines.append(described.machine(instance_id, cloud.ec2_state(state_name), zone,
                                                  self._type_vcpus))
        self._instances = {machine.uuid: machine.cloud_id for machine in machines}
        return machines

    def _live_states(self) -> dict[str, tuple[str, Optional[str]]]:
        """Instance id -> (state name, zone) of every instance not terminated."""
        if not self._describe_all:
            try:
                return self._instance_statuses()
            except CloudError as error:
                if error.code not in _NO_SUCH_CALL:
                    raise
                log.warning("space %s: the cloud has no DescribeInstanceStatus (%s): each cycle "
                            "describes every instance instead", self.space.name, error.code)
                self._describe_all = True
        return self._describe_where([_LIVE_STATES])

    def _instance_statuses(self) -> dict[str, tuple[str, Optional[str]]]:
        what = "DescribeInstanceStatus"
        states = {}
        for item in self._pages("describe_instance_status", what, "InstanceStatuses",
                                IncludeAllInstances=True, MaxResults=1000, Filters=[_LIVE_STATES]):
            instance_id = field(item, "InstanceId", str, what)
            where = f"{what}: instance {instance_id}"
            zone = item.get("AvailabilityZone")
            states[instance_id] = (field(field(item, "InstanceState", dict, where), "Name", str, where),
                                   zone if isinstance(zone, str) else None)
        return states

    def _describe(self, instance_ids: list[str]) -> dict[str, tuple[str, Optional[str]]]:
        """``_describe_where`` these instances, DESCRIBE_BATCH at a time. A filter, not
        InstanceIds: an instance gone since it was listed must not fail the call."""
        states = {}
        for start in range(0, len(instance_ids), DESCRIBE_BATCH):
            states.update(self._describe_where([{"Name": "instance-id",
                                                 "Values": instance_ids[start:start + DESCRIBE_BATCH]}]))
        return states

    def _describe_where(self, filters: list) -> dict[str, tuple[str, Optional[str]]]:
        """DescribeInstances with ``filters``: what each instance is goes into ``_described``;
        returned are their (state name, zone)."""
        what = "DescribeInstances"
        states = {}
        for reservation in self._pages("describe_instances", what, "Reservations", MaxResults=1000,
                                       Filters=filters):
            for item in field(reservation, "Instances", list, what, optional=True) or []:
                instance_id = field(item, "InstanceId", str, what)
                where = f"{what}: instance {instance_id}"
                self._described[instance_id] = self._read_instance(item, where)
                placement = item.get("Placement")
                zone = placement.get("AvailabilityZone") if isinstance(placement, dict) else None
                states[instance_id] = (field(field(item, "State", dict, where), "Name", str, where),
                                       zone if isinstance(zone, str) else None)
        return states

    def _read_instance(self, item: Any, what: str) -> _Described:
        tags = {}
        for tag in field(item, "Tags", list, what, optional=True) or []:
            tags[field(tag, "Key", str, what)] = field(tag, "Value", str, what)
        name = tags.get(_TAG_NAME) or tags.get(cloud.META_NAME)
        space = tags.get(cloud.META_SPACE)
        if not name or not cloud.is_vcycle_name(name) or (space is not None and space != self.space.name):
            return _NOT_OURS
        instance_type = item.get("InstanceType")
        address = item.get("PrivateIpAddress")
        return _Described(
            name=name, uuid=tags.get(cloud.META_UUID),
            machinetype=tags.get(cloud.META_MACHINETYPE) or cloud.parse_machine_name(name),
            instance_type=instance_type if isinstance(instance_type, str) else None,
            launched=cloud.parse_time(item.get("LaunchTime")), manager=tags.get(cloud.META_MANAGER),
            address=address if isinstance(address, str) else None)

    def _type_vcpus(self, instance_type: str) -> Optional[int]:
        """vCPUs of an instance type (DescribeInstanceTypes, cached); None where not offered."""
        if instance_type not in self._vcpus:
            try:
                answer = self._call("describe_instance_types", "DescribeInstanceTypes",
                                    InstanceTypes=[instance_type])
                types = field(answer, "InstanceTypes", list, "DescribeInstanceTypes")
                info = field(types[0], "VCpuInfo", dict, "DescribeInstanceTypes") if types else {}
                vcpus = info.get("DefaultVCpus")
                self._vcpus[instance_type] = vcpus if isinstance(vcpus, int) and vcpus > 0 else None
            except BackendError as error:
                # EC2-compatible clouds often lack the call: count min_processors instead.
                log.info("space %s: no vCPU count for %s (%s)", self.space.name, instance_type, error)
                self._vcpus[instance_type] = None
        return self._vcpus[instance_type]

    def quota(self) -> Quota:
        """EC2 has no core limit in its own API (vCPU limits are Service Quotas): none."""
        return Quota(None, None)

    def cpu_seconds(self, uuid: str) -> Optional[float]:
        return None  # EC2 reports no CPU time (CloudWatch gives percentages only)

    # --- creating --------------------------------------------------------------------------

    def create(self, machine: Machine, machinetype: Machinetype, settings: Settings,
               directory: Path) -> None:
        extra = space_machinetype(self.space, machinetype)
        flavors = extra.flavor_names or self.space.flavor_names
        if not flavors:
            raise BackendError(f"machine {machine.name}: EC2 needs flavor_names (instance types)")
        root_image = machinetype.root_image or ""
        if not root_image.startswith("image:"):
            raise BackendError(f"machine {machine.name}: EC2 root_image must be image:AMI-ID, not {root_image!r}")
        user_data = read_user_data(directory)
        if len(user_data) > MAX_USER_DATA_BYTES:
            raise BackendError(f"machine {machine.name}: user_data is {len(user_data)} bytes, "
                               f"more than EC2's {MAX_USER_DATA_BYTES}")
        tags = {_TAG_NAME: machine.name, **cloud.machine_metadata(
            machine.name, machinetype.name, machine.uuid, self.space.name, settings.factory_name)}
        parameters: dict[str, Any] = {
            "ImageId": root_image[len("image:"):], "InstanceType": flavors[0],
            "MinCount": 1, "MaxCount": 1,
            "UserData": user_data,  # bytes: boto3 base64-encodes them as they are
            "TagSpecifications": [{"ResourceType": "instance",
                                   "Tags": [{"Key": key, "Value": value} for key, value in tags.items()]}],
            # The machine's UUID makes a retried RunInstances idempotent: never two instances.
            "ClientToken": machine.uuid,
        }
        if extra.root_public_key:
            parameters["KeyName"] = self._key_pair(extra.root_public_key)
        what = f"RunInstances for {machine.name}"
        answer = self._call("run_instances", what, **parameters)
        instances = field(answer, "Instances", list, what)
        if len(instances) != 1:
            raise BackendError(f"space {self.space.name}: {what}: {len(instances)} instances, expected 1")
        instance_id = field(instances[0], "InstanceId", str, what)
        self._instances[machine.uuid] = instance_id
        log.info("space %s: created instance %s (%s) for machine %s, type %s", self.space.name,
                 machine.name, instance_id, machine.uuid, flavors[0])

    def _key_pair(self, path: str) -> str:
        if path in self._key_names:
            return self._key_names[path]
        key = read_public_key(path)
        try:
            self._call("describe_key_pairs", "DescribeKeyPairs", KeyNames=[key.key_name])
        except CloudError as error:
            if error.code != "InvalidKeyPair.NotFound":
                raise
            self._call("import_key_pair", f"ImportKeyPair {key.key_name}", KeyName=key.key_name,
                       PublicKeyMaterial=key.line.encode())
        self._key_names[path] = key.key_name
        return key.key_name

    # --- stopping --------------------------------------------------------------------------

    def stop(self, uuid: str) -> None:
        instance_id = self._cloud_id(uuid)
        if instance_id is not None:
            self._call("stop_instances", f"StopInstances {instance_id} (machine {uuid})",
                       InstanceIds=[instance_id])

    def destroy(self, uuid: str) -> None:
        instance_id = self._cloud_id(uuid)
        if instance_id is None:
            return
        self._call("terminate_instances", f"TerminateInstances {instance_id} (machine {uuid})",
                   InstanceIds=[instance_id])
        self._instances.pop(uuid, None)
        log.info("space %s: terminated instance %s (machine %s)", self.space.name, instance_id, uuid)

    def listed_ids(self) -> Mapping[str, str]:
        return self._instances


@dataclasses.dataclass(frozen=True)
class _Described:
    """What DescribeInstances said of an instance that stays the same while it lives.

    ``name`` None: not a vcycle machine of this space. ``uuid`` None: a classic Vcycle machine,
    known by its instance ID."""

    name: Optional[str]
    uuid: Optional[str] = None
    machinetype: Optional[str] = None
    instance_type: Optional[str] = None
    launched: Optional[float] = None
    manager: Optional[str] = None
    address: Optional[str] = None

    @property
    def incomplete(self) -> bool:
        """Ours but without an address yet (some clouds assign it after launch): read again."""
        return self.name is not None and self.address is None

    def machine(self, instance_id: str, state: cloud.CloudState, zone: Optional[str],
                vcpus: Callable[[str], Optional[int]]) -> CloudMachine:
        assert self.name is not None
        return CloudMachine(
            uuid=self.uuid or instance_id, name=self.name, active=state.active, cpu_seconds=None,
            cloud_id=instance_id, state=state, machinetype=self.machinetype,
            processors=vcpus(self.instance_type) if self.instance_type else None,
            created=self.launched,
            started=self.launched if state == cloud.CloudState.RUNNING else None,
            manager=self.manager, address=self.address, zone=zone)


_NOT_OURS = _Described(name=None)
