"""vcycle configuration: spaces (cloud tenancies) and their machinetypes, in the classic format.

Interface:

* ``Space``: one ``[space NAME]`` section with its machinetypes (``CloudMachinetype``, each
  wrapping a vac ``Machinetype`` plus the cloud-only options). Credentials are kept out of
  ``repr`` so that logging a Space never shows them.
* ``load_vcycle_config(paths)``: reads ``conf_dir/*.conf`` then ``main_conf`` (default
  /etc/vcycle.d, /etc/vcycle.conf), returning ``(VcycleConfig | None, [Problem])`` with the
  same located problems as vac's configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from vac.core.config import Machinetype

API_OPENSTACK = "openstack"
API_EC2 = "ec2"
APIS = (API_OPENSTACK, API_EC2)
GRID_CA_PATH = "/etc/grid-security/certificates"


@dataclasses.dataclass(frozen=True)
class CloudMachinetype:
    """One ``[machinetype SPACE NAME]``: the vac machinetype plus what only a cloud needs."""

    machinetype: Machinetype
    flavor_names: tuple[str, ...] = ()
    processors_limit: Optional[int] = None  # this type's processors in any state
    max_machines: Optional[int] = None  # this type's machines in any state
    max_starting_processors: Optional[int] = None  # None: = processors_limit
    root_public_key: Optional[str] = None  # key pair put on the machines (absolute path)
    https_x509dn: Optional[str] = None
    cvmfs_proxy_machinetype: Optional[str] = None
    hs06_per_processor: Optional[float] = None
    mb_per_processor: int = 2048

    @property
    def name(self) -> str:
        return self.machinetype.name


@dataclasses.dataclass(frozen=True)
class Space:
    """One ``[space NAME]`` section: a tenancy on one cloud, and its machinetypes."""

    name: str
    api: str  # API_OPENSTACK or API_EC2
    url: str  # Keystone v3 base (…/v3) or the EC2 endpoint
    machinetypes: dict = dataclasses.field(default_factory=dict)  # name -> CloudMachinetype
    region: Optional[str] = None
    processors_limit: Optional[int] = None  # None: the cloud's core limit, if it has one
    flavor_names: tuple[str, ...] = ()
    shutdown_time: Optional[int] = None
    gocdb_sitename: Optional[str] = None
    vacmon_hostport: tuple[str, ...] = ()
    https_host: Optional[str] = None  # None: this host's name
    https_port: int = 443
    cleanup_hours: int = 72
    # TLS: a CA file or hashed directory, "system" for the system store; None: the grid CA
    # directory if this host has one, else the system store.
    ca_certificates: Optional[str] = None
    max_creations: Optional[int] = None  # creations per cycle; None: the classic tenth of the limit
    # OpenStack
    project_name: Optional[str] = None
    domain_name: str = "default"
    username: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    cred_id: Optional[str] = None
    cred_secret: Optional[str] = dataclasses.field(default=None, repr=False)
    zones: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    network_uuid: Optional[str] = None
    # EC2
    access_key: Optional[str] = None
    secret_key: Optional[str] = dataclasses.field(default=None, repr=False)
