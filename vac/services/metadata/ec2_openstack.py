"""The metadata service (169.254.169.254), GET/HEAD only, at the paths cloud-init and the
pilots read (``V`` = ``latest``, ``1.0`` or a ``YYYY-MM-DD`` date; STANDARDS.md §A5, §A7):

* EC2: ``/V`` (listing), ``/V/user-data``, ``/V/meta-data[/]`` (listing), ``.../ami-id``,
  ``instance-id``, ``hostname``, ``local-hostname``, ``local-ipv4``,
  ``placement/availability-zone``, ``public-keys/`` (``0=root``), ``public-keys/0/openssh-key``;
  the classic ``/V/meta-data.json``.
* OpenStack: ``/openstack`` (version list), ``/openstack/V`` (listing), ``meta_data.json``,
  ``user_data``, ``vendor_data.json``, ``vendor_data2.json`` (empty objects),
  ``network_data.json`` (DHCP on the slot's MAC), and the classic hyphenated names
  ``meta-data.json``, ``user-data`` and ``meta-data/...`` under ``/openstack/V``.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from aiohttp import web

from vac.core.config import Settings
from vac.core.model import Machine, slot_for_ip
from vac.services.fairness import SlotForAddress
from vac.services.metadata.base import (
    MachineContext,
    Resolver,
    Service,
    bytes_response,
    json_response,
    read_document,
    read_request,
    status_response,
    text_response,
)
from vac.services.metadata.limits import DEFAULT_LIMITS, Limits

VERSION = re.compile(r"(latest|1\.0|[0-9]{4}-[0-9]{2}-[0-9]{2})\Z")
# Versions cloud-init and Nova know; cloud-init picks the newest it recognises from this list.
OPENSTACK_VERSIONS = ("2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
                      "2016-10-06", "2017-02-22", "2018-08-27", "latest")
EC2_KEY_NAME = "root"  # the name shown for key 0 in the EC2 public-keys/ listing


def _public_key(context: MachineContext) -> Optional[str]:
    data = read_document(context.directory / "root_public_key")
    return data.decode("utf-8", "replace").strip() if data else None


def openstack_meta_data(context: MachineContext, settings: Settings, mjf_url: str) -> dict:
    """``meta_data.json``: what cloud-init's OpenStack reader and the pilots (A7) use."""
    machine = context.machine
    document = {
        "uuid": machine.uuid,
        "name": machine.name,
        "hostname": machine.name,
        "availability_zone": settings.factory_name,
        "launch_index": 0,
        "meta": {
            "machinefeatures": f"{mjf_url}/machinefeatures",
            "jobfeatures": f"{mjf_url}/jobfeatures",
            "joboutputs": f"{mjf_url}/joboutputs",
            "machinetype": machine.machinetype,
        },
    }
    key = _public_key(context)
    if key:
        document["public_keys"] = {"0": key}
    return document


def network_data(machine: Machine) -> dict:
    """``network_data.json``: DHCP on the slot's NIC.

    An empty document would make cloud-init render a network configuration without any
    interface; describing the real (DHCP) set-up is both valid and harmless.
    """
    return {
        "links": [{"id": "vac0", "type": "phy", "ethernet_mac_address": machine.mac}],
        "networks": [{"id": "network0", "type": "ipv4_dhcp", "link": "vac0",
                      "network_id": "vac"}],
        "services": [],
    }


def ec2_meta_data(context: MachineContext, settings: Settings) -> dict:
    """The EC2 ``meta-data/`` tree: dicts are directories, strings are values."""
    machine = context.machine
    tree: dict = {
        "ami-id": machine.uuid,
        "hostname": machine.name,
        "instance-id": machine.uuid,
        "local-hostname": machine.name,
        "local-ipv4": machine.ip,
        "placement": {"availability-zone": settings.factory_name},
    }
    key = _public_key(context)
    if key:
        tree["public-keys"] = {"0": {"openssh-key": key + "\n"}}
    return tree


def _ec2_listing(path: list[str], directory: dict) -> str:
    if path == ["public-keys"]:  # EC2 lists keys as INDEX=NAME; cloud-init depends on it
        return "\n".join(f"{index}={EC2_KEY_NAME}" for index in directory)
    return "\n".join(name + "/" if isinstance(value, dict) else name
                     for name, value in sorted(directory.items()))


class MetadataService(Service):
    name = "metadata"

    def __init__(self, settings: Settings, resolve: Resolver, mjf_url: str,
                 slot_for_address: SlotForAddress, limits: Limits):
        super().__init__(resolve, slot_for_address, limits)
        self.settings = settings
        self.mjf_url = mjf_url.rstrip("/")

    async def handle(self, request: web.Request, context: Optional[MachineContext]
                     ) -> web.StreamResponse:
        segments = read_request(request, context, "GET, HEAD")
        if isinstance(segments, web.Response):
            return segments
        if segments[:1] == ["openstack"]:
            return self._openstack(context, segments[1:])
        return self._ec2(context, segments)

    def _openstack(self, context: MachineContext, segments: list[str]) -> web.Response:
        if not segments:
            return text_response("\n".join(OPENSTACK_VERSIONS))
        if not VERSION.match(segments[0]):
            return status_response(404, "unknown OpenStack metadata version")
        rest = segments[1:]
        if not rest:
            names = ["meta_data.json", "network_data.json", "vendor_data.json",
                     "vendor_data2.json"]
            if (context.directory / "user_data").exists():
                names.append("user_data")
            return text_response("\n".join(sorted(names)))
        if rest[0] == "meta-data":  # classic: the EC2 tree under /openstack/V/ as well
            return self._ec2_tree(context, rest[1:])
        if len(rest) != 1:
            return status_response(404, "not found")
        name = rest[0]
        if name in ("meta_data.json", "meta-data.json"):
            return json_response(openstack_meta_data(context, self.settings, self.mjf_url))
        if name in ("user_data", "user-data"):
            return self._user_data(context)
        if name in ("vendor_data.json", "vendor_data2.json"):
            return json_response({})
        if name == "network_data.json":
            return json_response(network_data(context.machine))
        return status_response(404, "not found")

    def _ec2(self, context: MachineContext, segments: list[str]) -> web.Response:
        if not segments or not VERSION.match(segments[0]):
            return status_response(404, "not found")
        rest = segments[1:]
        if not rest:
            return text_response("meta-data\nuser-data")
        if rest == ["user-data"]:
            return self._user_data(context)
        if rest == ["meta-data.json"]:  # classic Vac: the OpenStack document at EC2 paths
            return json_response(openstack_meta_data(context, self.settings, self.mjf_url))
        if rest[0] == "meta-data":
            return self._ec2_tree(context, rest[1:])
        return status_response(404, "not found")

    def _ec2_tree(self, context: MachineContext, path: list[str]) -> web.Response:
        node: Union[dict, str] = ec2_meta_data(context, self.settings)
        for segment in path:
            if not isinstance(node, dict) or segment not in node:
                return status_response(404, "no such metadata item")
            node = node[segment]
        return text_response(_ec2_listing(path, node) if isinstance(node, dict) else node)

    def _user_data(self, context: MachineContext) -> web.Response:
        data = read_document(context.directory / "user_data")
        if data is None:
            return status_response(404, "this machine has no user_data")
        return bytes_response(data, "application/octet-stream")


def metadata_app(settings: Settings, resolve: Resolver, *, mjf_url: str,
                 slot_for_address: SlotForAddress = slot_for_ip,
                 limits: Limits = DEFAULT_LIMITS) -> web.Application:
    """The metadata service as an aiohttp application; ``mjf_url`` goes into ``meta``."""
    return MetadataService(settings, resolve, mjf_url, slot_for_address, limits).application()
