"""Layered INI configuration: typed, immutable settings and machinetypes.

Interface used by every other module (stable; the loader below fills it):

* ``Config``: ``settings: Settings``, ``machinetypes: dict[str, Machinetype]`` (in name order,
  including pipe-derived ones once pipes are expanded), ``vacuum_pipes: dict[str, VacuumPipe]``,
  ``sources: dict[(section, option), "file:line" | "default"]``.
* ``load_config(paths: ConfigPaths, hostname: str | None = None) -> tuple[Config | None,
  list[Problem]]``: reads and validates; ``Config`` is None if any problem is an error.
* ``ConfigError(problems)`` raised by ``load_config_or_raise``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

DEFAULT_CONF_DIR = "/etc/vac.d"
DEFAULT_MAIN_CONF = "/etc/vac.conf"
DEFAULT_RUN_CONFS = ("/run/vac.conf", "/var/run/vac.conf")

MACHINE_MODELS = ("cernvm3", "cernvm4", "vm-raw")


@dataclasses.dataclass(frozen=True)
class FactoryAddress:
    """One entry of ``factories``: ``name`` or ``name@address[:port]``."""

    name: str
    address: Optional[str] = None  # None: resolve ``name`` (DNS)
    port: Optional[int] = None  # None: the space's ``vacquery_port``


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``[settings]`` section. Defaults are the classic ones (REFERENCE.md §1.2)."""

    vac_space: str
    factory_name: str  # default: the host's FQDN; must contain a dot
    description: Optional[str] = None
    factories: tuple[FactoryAddress, ...] = ()
    udp_timeout_seconds: float = 10.0
    mb_per_processor: int = 2048
    hs06_per_processor: Optional[float] = None
    processors_per_superslot: int = 1
    total_processors: Optional[int] = None  # None: all logical processors of the host
    overload_per_processor: float = 1.25
    shutdown_time: Optional[int] = None
    draining: bool = False
    gocdb_sitename: Optional[str] = None
    gocdb_cert_file: Optional[str] = None
    gocdb_key_file: Optional[str] = None
    version_logger: int = 0  # classic default 1 (phone-home); ours is off by default
    vacmon_hostport: tuple[str, ...] = ()
    volume_group: Optional[str] = None
    disk_gb_per_processor: Optional[float] = None
    root_public_key: str = "/root/.ssh/id_rsa.pub"
    fix_networking: bool = True
    forward_dev: Optional[str] = None
    machinefeatures_options: tuple[tuple[str, str], ...] = ()  # machinefeatures_option_XXX
    user_data_options: tuple[tuple[str, str], ...] = ()  # user_data_option_XXX
    user_data_files: tuple[tuple[str, str], ...] = ()  # user_data_file_XXX
    # New settings: classic values as defaults, every path overridable.
    state_dir: str = "/var/lib/vac"
    libvirt_uri: str = "qemu:///system"
    domain_type: str = "kvm"
    vacquery_port: int = 995
    vacquery_address: str = ""  # "" = all interfaces
    vacquery_secret_file: Optional[str] = None
    vacquery_allow_unauthenticated: bool = True
    metadata_address: str = "169.254.169.254"
    mjf_address: str = "169.254.169.253"
    http_port: int = 80
    network_name: str = "vac_169.254.0.0"
    network_forward: str = "nat"  # "nat" or "none" (isolated network, used by tests)
    bridge_name: Optional[str] = None  # None: libvirt chooses
    max_creating: int = 4  # creations in flight at once
    max_probes: int = 2  # VMs of a type with unproven work that may be young at once
    reconcile_seconds: float = 60.0
    stop_grace_seconds: float = 30.0
    peer_cache_seconds: float = 30.0
    apel_version: str = "0.3"  # "0.3" or "0.4"
    hepscore23_per_processor: Optional[float] = None
    metrics_port: Optional[int] = None  # Prometheus endpoint on 127.0.0.1, off by default
    kernel: Optional[str] = None  # direct kernel boot (test guests), absolute path
    initrd: Optional[str] = None
    kernel_cmdline: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Machinetype:
    """One ``[machinetype NAME]`` section (REFERENCE.md §1.3)."""

    name: str
    root_image: Optional[str] = None
    user_data: Optional[str] = None
    target_share: float = 0.0
    machine_model: str = "cernvm3"
    root_device: str = "vda"
    scratch_device: str = "vdb"
    user_data_options: tuple[tuple[str, str], ...] = ()  # merged with settings defaults
    user_data_files: tuple[tuple[str, str], ...] = ()
    user_data_proxy: bool = False
    legacy_proxy: bool = False
    min_processors: int = 1
    max_processors: int = 1
    max_wallclock_seconds: int = 86400
    min_wallclock_seconds: Optional[int] = None  # None: = max_wallclock_seconds
    backoff_seconds: int = 10
    fizzle_seconds: int = 600
    heartbeat_file: Optional[str] = None
    heartbeat_seconds: int = 0
    accounting_fqan: Optional[str] = None
    machinegroup: Optional[str] = None  # None: accounting_fqan, else the machinetype name
    machines_dir_days: float = 3.0
    image_signing_dn: Optional[str] = None
    disk_gb_per_processor: Optional[float] = None
    cvmfs_repositories: tuple[str, ...] = ()
    machinetype_path: str = ""  # <state_dir>/machinetypes/<name or pipe prefix>

    @property
    def effective_min_wallclock_seconds(self) -> int:
        if self.min_wallclock_seconds is None:
            return self.max_wallclock_seconds
        return self.min_wallclock_seconds

    @property
    def effective_machinegroup(self) -> str:
        return self.machinegroup or self.accounting_fqan or self.name


@dataclasses.dataclass(frozen=True)
class VacuumPipe:
    """One ``[vacuum_pipe PREFIX]`` section; expanded into machinetypes by vac.pipes."""

    prefix: str
    vacuum_pipe_url: str
    target_share: float = 0.0
    defaults: tuple[tuple[str, str], ...] = ()  # other options copied to each machinetype


@dataclasses.dataclass(frozen=True)
class Config:
    settings: Settings
    machinetypes: dict  # name -> Machinetype, in name order
    vacuum_pipes: dict = dataclasses.field(default_factory=dict)  # prefix -> VacuumPipe
    sources: dict = dataclasses.field(default_factory=dict)  # (section, option) -> "file:line"

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)
