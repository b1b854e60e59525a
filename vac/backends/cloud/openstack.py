"""OpenStack machines: Keystone v3 through keystoneauth1, Nova and Glance v2 REST calls.

keystoneauth1 does what is easy to get wrong (password and application-credential auth, token
renewal, the service catalog, TLS, retries, redacted logging); the handful of Nova and Glance
calls vcycle needs are made on its session and every answer is checked here, so a cloud that
answers something unexpected gives a BackendError naming the call, never a crash.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from keystoneauth1 import exceptions as ks_exceptions
from keystoneauth1 import session as ks_session
from keystoneauth1.identity import v3

from vac import __version__
from vac.backends.base import BackendError
from vac.backends.cloud.common import (
    MAX_PAGES,
    CloudError,
    CloudMachine,
    Quota,
    ReleasedByDeletion,
    field,
    local_image_path,
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

MAX_USER_DATA_BYTES = 65535  # Nova's limit on the base64 text
RETRIED_STATUSES = [429, 502, 503, 504]
_IMAGE_FORMATS = {".iso": "iso", ".qcow2": "qcow2", ".img": "raw", ".raw": "raw"}

ImageResolver = Callable[[Machinetype], Path]


class OpenStackBackend(ReleasedByDeletion):
    """One space's OpenStack project. Implements vac.backends.base.MachineBackend."""

    kind = "cloud"

    def __init__(self, space: Space, *, image_path: ImageResolver = local_image_path,
                 rng: Optional[random.Random] = None, timeout: float = 90.0, retries: int = 2) -> None:
        self.space = space
        self._image_path = image_path
        self._rng = rng or random.SystemRandom()
        self._timeout = timeout
        self._retries = retries
        self._session: Optional[ks_session.Session] = None
        self._compute = ""
        self._image = ""
        self._flavors: dict[str, cloud.Flavor] = {}  # id -> Flavor
        self._servers: dict[str, str] = {}  # machine uuid -> server id
        self._images: dict[tuple[str, str], str] = {}  # (root_image, marker) -> image id
        self._key_names: dict[str, str] = {}  # key file -> key pair name

    # --- connection ------------------------------------------------------------------------

    def connect(self) -> None:
        space = self.space
        if space.cred_id:
            auth = v3.ApplicationCredential(auth_url=space.url, application_credential_id=space.cred_id,
                                            application_credential_secret=space.cred_secret)
        else:
            auth = v3.Password(auth_url=space.url, username=space.username, password=space.password,
                               user_domain_name=space.domain_name, project_name=space.project_name,
                               project_domain_name=space.domain_name)
        session = ks_session.Session(auth=auth, verify=tls_verify(space), timeout=self._timeout,
                                     app_name="vcycle", app_version=__version__)
        try:
            session.get_token()
            compute = session.get_endpoint(service_type="compute", interface="public",
                                           region_name=space.region)
            image = session.get_endpoint(service_type="image", interface="public",
                                         region_name=space.region)
        except ks_exceptions.ClientException as error:
            raise BackendError(f"space {space.name}: Keystone at {space.url}: {_describe(error)}") from None
        where = f" in region {space.region}" if space.region else ""
        for service, endpoint in (("compute", compute), ("image", image)):
            if not endpoint:
                raise BackendError(f"space {space.name}: the service catalog has no public {service} endpoint{where}")
        self._session = session
        self._compute = compute.rstrip("/")
        self._image = image.rstrip("/")
        self._flavors = {}
        self._images = {}  # images may have been deleted while we were away

    def close(self) -> None:
        self._session = None

    def _call(self, method: str, url: str, what: str, *, json: Any = None, expect_json: bool = True,
              tolerate: tuple = (), log_body: bool = True, **kwargs: Any) -> Any:
        """One REST call; its JSON answer (None for a status in ``tolerate``, or no body)."""
        if self._session is None:
            raise BackendError(f"space {self.space.name}: not connected")
        try:
            response = self._session.request(
                url, method, json=json, raise_exc=False, log=log_body, redirect=False,
                connect_retries=self._retries, status_code_retries=self._retries,
                retriable_status_codes=RETRIED_STATUSES, **kwargs)
        except ks_exceptions.ClientException as error:
            raise BackendError(f"space {self.space.name}: {what}: {_describe(error)}") from None
        if response.status_code in tolerate:
            return None
        if not 200 <= response.status_code < 300:
            raise CloudError(f"space {self.space.name}: {what}: HTTP {response.status_code} "
                             f"{_error_text(response)}", str(response.status_code))
        if not expect_json or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise BackendError(f"space {self.space.name}: {what}: the answer is not JSON") from None

    # --- listing ---------------------------------------------------------------------------

    def _paged(self, url: str, key: str, what: str) -> list:
        """All items of a paginated Nova/Glance list (``<key>_links`` or ``next``), bounded."""
        items: list = []
        seen: set = set()
        for _ in range(MAX_PAGES):
            answer = self._call("GET", url, what)
            page = field(answer, key, list, what)
            items.extend(page)
            next_url = _next_link(answer, key, url)
            if not next_url or not page or next_url in seen:
                return items
            seen.add(next_url)
            url = next_url
        raise BackendError(f"space {self.space.name}: {what}: more than {MAX_PAGES} pages")

    def _flavor_table(self) -> dict[str, cloud.Flavor]:
        if not self._flavors:
            what = "listing flavors"
            flavors = {}
            for item in self._paged(f"{self._compute}/flavors/detail", "flavors", what):
                flavor = cloud.Flavor(id=str(field(item, "id", (str, int), what)),
                                      name=field(item, "name", str, what),
                                      vcpus=field(item, "vcpus", int, what),
                                      ram_mb=field(item, "ram", int, what, optional=True) or 0)
                flavors[flavor.id] = flavor
            self._flavors = flavors
        return self._flavors

    def list_machines(self) -> list[CloudMachine]:
        """Every vcycle machine of this space in the project (paginated ``servers/detail``)."""
        what = "listing servers"
        machines = []
        for item in self._paged(f"{self._compute}/servers/detail", "servers", what):
            machine = self._machine_of(item, what)
            if machine is not None:
                machines.append(machine)
        self._servers = {machine.uuid: machine.cloud_id for machine in machines}
        return machines

    def _server_vcpus(self, item: dict, what: str) -> Optional[int]:
        flavor = field(item, "flavor", dict, what)
        if isinstance(flavor.get("vcpus"), int):  # embedded since microversion 2.47
            return flavor["vcpus"]
        known = self._flavor_table().get(str(flavor.get("id")))
        return known.vcpus if known else None

    def _machine_of(self, item: Any, what: str) -> Optional[CloudMachine]:
        server_id = field(item, "id", str, what)
        what = f"{what}: server {server_id}"
        metadata = field(item, "metadata", dict, what, optional=True) or {}
        name = metadata.get(cloud.META_NAME) or field(item, "name", str, what)
        if not isinstance(name, str) or not cloud.is_vcycle_name(name):
            return None
        space = metadata.get(cloud.META_SPACE)
        if space is not None and space != self.space.name:
            return None  # another space sharing this project
        state = cloud.nova_state(field(item, "status", str, what),
                                 item.get("OS-EXT-STS:task_state"), item.get("OS-EXT-STS:power_state"))
        machinetype = metadata.get(cloud.META_MACHINETYPE) or cloud.parse_machine_name(name)
        uuid = metadata.get(cloud.META_UUID) or server_id
        return CloudMachine(
            uuid=str(uuid), name=name, active=state.active, cpu_seconds=None, cloud_id=server_id,
            state=state, machinetype=machinetype if isinstance(machinetype, str) else None,
            processors=self._server_vcpus(item, what),
            created=cloud.parse_time(item.get("created")),
            started=cloud.parse_time(item.get("OS-SRV-USG:launched_at")),
            updated=cloud.parse_time(item.get("updated")),
            manager=metadata.get(cloud.META_MANAGER) if isinstance(metadata.get(cloud.META_MANAGER), str) else None,
            address=_first_address(item.get("addresses")),
            zone=item.get("OS-EXT-AZ:availability_zone") if isinstance(item.get("OS-EXT-AZ:availability_zone"), str) else None,
        )

    def quota(self) -> Quota:
        """The project's core limit and use (``limits.absolute``); -1 (unlimited) is None."""
        what = "reading limits"
        absolute = field(field(self._call("GET", f"{self._compute}/limits", what), "limits", dict, what),
                         "absolute", dict, what)
        limit = absolute.get("maxTotalCores")
        used = absolute.get("totalCoresUsed")
        return Quota(limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else None,
                     used if isinstance(used, int) and not isinstance(used, bool) and used >= 0 else None)

    def cpu_seconds(self, uuid: str) -> Optional[float]:
        return None  # Nova reports no CPU time to project users

    # --- creating --------------------------------------------------------------------------

    def create(self, machine: Machine, machinetype: Machinetype, settings: Settings,
               directory: Path) -> None:
        extra = space_machinetype(self.space, machinetype)
        flavor = cloud.choose_flavor(list(self._flavor_table().values()),
                                     extra.flavor_names or self.space.flavor_names,
                                     machinetype.min_processors, machinetype.max_processors)
        if flavor is None:
            raise BackendError(f"machine {machine.name}: no flavor with {machinetype.min_processors} to "
                               f"{machinetype.max_processors} vCPUs among "
                               f"{' '.join(extra.flavor_names or self.space.flavor_names) or 'the project flavors'}")
        user_data = base64.b64encode(read_user_data(directory))
        if len(user_data) > MAX_USER_DATA_BYTES:
            raise BackendError(f"machine {machine.name}: user_data is {len(user_data)} bytes in base64, "
                               f"more than Nova's {MAX_USER_DATA_BYTES}")
        server: dict[str, Any] = {
            "name": machine.name,
            "imageRef": self._image_id(machinetype),
            "flavorRef": flavor.id,
            "user_data": user_data.decode("ascii"),
            "metadata": {"cern-services": "false", **cloud.machine_metadata(
                machine.name, machinetype.name, machine.uuid, self.space.name, settings.factory_name)},
        }
        if extra.root_public_key:
            server["key_name"] = self._key_pair(extra.root_public_key)
        if self.space.zones:
            server["availability_zone"] = self._rng.choice(self.space.zones)
        if self.space.security_groups:
            server["security_groups"] = [{"name": group} for group in self.space.security_groups]
        if self.space.network_uuid:
            server["networks"] = [{"uuid": self.space.network_uuid}]
        what = f"creating server {machine.name}"
        # user_data may carry a proxy: never in keystoneauth's debug log.
        answer = self._call("POST", f"{self._compute}/servers", what, json={"server": server}, log_body=False)
        server_id = field(field(answer, "server", dict, what), "id", str, what)
        self._servers[machine.uuid] = server_id
        log.info("space %s: created server %s (%s) for machine %s, flavor %s", self.space.name,
                 machine.name, server_id, machine.uuid, flavor.name)

    def _key_pair(self, path: str) -> str:
        """The key pair holding the key in ``path``, imported under a name derived from it."""
        if path in self._key_names:
            return self._key_names[path]
        key = read_public_key(path)
        what = f"key pair {key.key_name}"
        answer = self._call("GET", f"{self._compute}/os-keypairs/{key.key_name}", what, tolerate=(404,))
        if answer is None:
            self._call("POST", f"{self._compute}/os-keypairs", f"importing {what}",
                       json={"keypair": {"name": key.key_name, "public_key": key.line}})
        else:
            stored = field(field(answer, "keypair", dict, what), "public_key", str, what).split()
            if stored[:2] != [key.kind, key.blob]:
                raise BackendError(f"space {self.space.name}: {what} exists with another key")
        self._key_names[path] = key.key_name
        return key.key_name

    def _image_id(self, machinetype: Machinetype) -> str:
        """The Glance image for a machinetype's root_image, uploaded when its file changed."""
        root_image = machinetype.root_image or ""
        if root_image.startswith("image:"):
            name = root_image[len("image:"):]
            image_id = self._find_image(name, None)
            if image_id is None:
                raise BackendError(f"space {self.space.name}: no active image named {name}")
            return image_id
        path = self._image_path(machinetype)
        try:
            marker = cloud.image_marker(os.stat(path).st_mtime)
        except OSError as error:
            raise BackendError(f"machinetype {machinetype.name}: root_image {path}: {error.strerror}") from None
        cached = self._images.get((root_image, marker))
        if cached:
            return cached
        image_id = self._find_image(root_image, marker) or self._upload_image(root_image, path, marker)
        self._images[(root_image, marker)] = image_id
        return image_id

    def _find_image(self, name: str, marker: Optional[str]) -> Optional[str]:
        """The newest active image called ``name`` (carrying ``marker``, if given), or None."""
        what = f"listing images named {name}"
        query = urllib.parse.urlencode({"name": name, "status": "active", "sort": "created_at:desc"})
        for item in self._paged(f"{self._image}/v2/images?{query}", "images", what):
            image_id = field(item, "id", str, what)
            # Filters are a request; a cloud ignoring one must not make us boot the wrong image.
            if item.get("name") != name or item.get("status") != "active":
                continue
            tags = item.get("tags") if isinstance(item.get("tags"), list) else []
            if marker is None or cloud.image_matches(marker, item, tags):
                return image_id
        return None

    def _upload_image(self, name: str, path: Path, marker: str) -> str:
        what = f"uploading image {name}"
        disk_format = _IMAGE_FORMATS.get(path.suffix.lower(), "raw")
        answer = self._call("POST", f"{self._image}/v2/images", what, json={
            "name": name, "disk_format": disk_format, "container_format": "bare",
            "visibility": "private", "architecture": "x86_64",
            cloud.IMAGE_MARKER_PROPERTY: marker,
        })
        image_id = field(answer, "id", str, what)
        log.info("space %s: uploading %s as image %s (%s)", self.space.name, path, name, image_id)
        try:
            with open(path, "rb") as stream:
                self._call("PUT", f"{self._image}/v2/images/{image_id}/file", what, data=stream,
                           headers={"Content-Type": "application/octet-stream"},
                           expect_json=False, log_body=False)
        except OSError as error:
            raise BackendError(f"{what}: {path}: {error.strerror}") from None
        return image_id

    # --- stopping --------------------------------------------------------------------------

    def stop(self, uuid: str) -> None:
        server_id = self._cloud_id(uuid)
        if server_id is None:
            return
        what = f"stopping server {server_id} (machine {uuid})"
        # 409: already stopped or stopping; 404: gone. Both are what was asked.
        self._call("POST", f"{self._compute}/servers/{server_id}/action", what,
                   json={"os-stop": None}, tolerate=(404, 409))

    def destroy(self, uuid: str) -> None:
        server_id = self._cloud_id(uuid)
        if server_id is None:
            return
        self._call("DELETE", f"{self._compute}/servers/{server_id}",
                   f"deleting server {server_id} (machine {uuid})", tolerate=(404,))
        log.info("space %s: deleted server %s (machine %s)", self.space.name, server_id, uuid)

    def listed_ids(self) -> Mapping[str, str]:
        return self._servers


def _next_link(answer: dict, key: str, url: str) -> Optional[str]:
    """The next page: Nova's ``<key>_links`` rel=next, or Glance's relative ``next``."""
    links = answer.get(f"{key}_links")
    if isinstance(links, list):
        for link in links:
            if isinstance(link, dict) and link.get("rel") == "next" and isinstance(link.get("href"), str):
                return link["href"]
    following = answer.get("next")
    if isinstance(following, str) and following:
        # Glance gives "/v2/images?marker=…" relative to the endpoint root.
        parts = urllib.parse.urlsplit(url)
        base = url[: url.index("/v2/")] if "/v2/" in url else f"{parts.scheme}://{parts.netloc}"
        return base + following
    return None


def _first_address(addresses: Any) -> Optional[str]:
    """First address of the alphabetically first network (as classic Vcycle)."""
    if not isinstance(addresses, dict):
        return None
    for network in sorted(addresses):
        entries = addresses[network]
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("addr"), str):
                    return entry["addr"]
    return None


def _describe(error: Exception) -> str:
    """An exception as one line, without credentials (keystoneauth messages carry none)."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _error_text(response: Any) -> str:
    """The cloud's own explanation of an error, short."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and len(body) == 1:
        inner = next(iter(body.values()))
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:200]
    return str(body)[:200]
