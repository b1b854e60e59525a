"""The configuration schema: every option of vac.conf(5), declared once.

Each option is one field of ``Settings``, ``Machinetype`` or ``VacuumPipe``, declared with
``option(convert, default=..., remote=...)``: the field's type and default, the converter that
reads it from configuration text (``ValueError`` says what is wrong), and how a value that
arrived from the network (a vacuum pipe's JSON) is checked. Tables the loader and the pipes use
(``SETTINGS_OPTIONS``, ``MACHINETYPE_OPTIONS``, ``PIPE_OPTIONS``, the ``*_PREFIXES`` of option
families like ``user_data_option_XXX``) are derived from these fields, never written twice.

The remote mode (``remote_option_value``, ``remote_pair_value``) is the same schema, stricter:
first the JSON type the field needs (a boolean option takes true/false or a string saying so,
an integer option an integer or a string of digits, a text option only a string, at most
``MAX_REMOTE_CHARS``), then the option's remote check (``remote=``: http(s) URLs that cannot
point at this host, plain file names, /cvmfs/ paths, upper bounds), then the same converter as
for configuration files. ``remote=LOCAL_ONLY`` options are never taken from the network.

Pure: the standard library only. The generic converters are vac.core.values'; vac.core.config
reads files with this schema.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import shlex
import urllib.parse
from typing import Any, Callable, Optional

from vac.core.values import (
    BOOLEANS,
    Converter,
    WithWarning,
    absolute_path,
    any_number,
    any_text,
    boolean,
    dns_name,
    file_name,
    host_name,
    host_port,
    http_url,
    integer,
    ip_address,
    ip_address_or_all,
    listen_port,
    matching,
    number,
    one_of,
    words,
)

MACHINE_MODELS = ("cernvm3", "cernvm4", "vm-raw")
ENGINE_MODELS = ("docker", "podman")  # run by container_engine (podman or docker)
APPTAINER_MODELS = ("singularity", "apptainer")  # run by apptainer (or singularity)
CONTAINER_MODELS = ENGINE_MODELS + APPTAINER_MODELS
# What peers and VacMon are told: Vac 03 knows the container models only as docker/singularity.
CLASSIC_MODEL_NAMES = {"podman": "docker", "apptainer": "singularity"}


def classic_model_name(model: Optional[str]) -> Optional[str]:
    """``model`` as Vac 03 names it (podman -> docker, apptainer -> singularity)."""
    return CLASSIC_MODEL_NAMES.get(model, model) if model is not None else None

MAX_REMOTE_CHARS = 65536  # any text value from the network


# --- value converters of vac's own options: text -> typed value, or ValueError(message) ----------

SECTION_NAME = re.compile(r"[a-z0-9-]+\Z")
OPTION_SUFFIX = re.compile(r"[a-z0-9_]+\Z")
_DEVICE = re.compile(r"[a-z0-9]{1,16}\Z")
_INTERFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_VOLUME_GROUP = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*\Z")
_LIBVIRT_NAME = re.compile(r"[A-Za-z0-9_.+-]+\Z")
_LIBVIRT_URI = re.compile(r"[a-z][a-z0-9+.-]*:///?")
_REPOSITORY = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}\Z")
_ENGINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")  # podman/docker network, OCI runtime
_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]*[$]?\Z")
_FQAN = re.compile(r"/[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._=-]*)*\Z")


def _libvirt_uri(text: str) -> str:
    if not _LIBVIRT_URI.match(text):
        raise ValueError(f"{text!r} is not a libvirt URI like qemu:///system")
    return text


def _version_logger(text: str) -> Any:
    legacy = {"true": 1, "false": 0}.get(text.lower())
    if legacy is not None:
        return WithWarning(legacy, f"{text!r} is deprecated: give messages per day, here {legacy}")
    try:
        return integer(0)(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer (messages per day)") from None


def _machine_model(text: str) -> str:
    return one_of(*MACHINE_MODELS, *CONTAINER_MODELS)(text)


def _root_image(text: str) -> str:
    if text.startswith("docker://"):
        name = text[len("docker://"):]
        if not name or name.startswith("-") or any(c.isspace() or c == "\0" for c in name):
            raise ValueError(f"{text!r} does not name an image after docker://")
        return text
    if text.startswith(("http://", "https://")):
        return http_url(text)
    if text.startswith("/"):
        return absolute_path(text)
    try:
        return file_name(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an absolute path, an http(s) URL or a file name") from None


def _user_data(text: str) -> str:
    if text.startswith(("http://", "https://")):
        return http_url(text)
    if ".." in text.split("/") or "\0" in text or not text:
        raise ValueError(f"{text!r} is not a path without .. or an http(s) URL")
    return text


def _container_network(text: str) -> str:
    if text == "host":
        raise ValueError("'host' would let containers reach the host's local services: "
                         "use bridge, none or a network made for them")
    return matching(_ENGINE_NAME, "a network name")(text)


def _container_command(text: str) -> str:
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"{text!r} is not a command line ({error})") from None
    if not words:
        raise ValueError("is empty")
    return text


def _container_path(text: str) -> str:
    path = absolute_path(text)
    if path == "/" or ".." in path.split("/") or ":" in path or "," in path:
        raise ValueError(f"{text!r} is not an absolute container path without .., : or ,")
    return path


def _fqan(text: str) -> str:
    if not _FQAN.match(text):
        raise ValueError(f"{text!r} is not an FQAN like /lhcb/Role=pilot")
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise ValueError(f"{text!r} is not a valid regular expression ({error})") from None
    return text


# --- remote checks: a value from the network, as text, before its converter ---------------------

Check = Callable[[str], None]  # raises ValueError(message)

_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")
_CVMFS_PATH = re.compile(r"/cvmfs(?:/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)+\Z")
_URL_CHARACTERS = re.compile(r"[!-~]+\Z")  # printable ASCII, no space
_PRINTABLE = re.compile(r"[ -~]*\Z")
_IMAGE_REFERENCE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?(?::[0-9]{1,5})?/)?"  # registry[:port]/
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*){0,15}"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?\Z")
# Container paths a vacuum pipe's tmp_binds may not cover: MJF, joboutputs, user_data, CernVM-FS
# and the kernel's file systems.
_RESERVED_BINDS = ("/etc/machinefeatures", "/etc/jobfeatures", "/var/spool/joboutputs",
                   "/user_data", "/cvmfs", "/proc", "/sys", "/dev")
_URL_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?\Z")
_NUMERIC_HOST = re.compile(r"(?:[0-9.]+|0x[0-9a-fx.]*)\Z")  # 2130706433, 127.1, 0x7f.1: resolve to IPs
_REMOTE_SUFFIX = re.compile(r"[a-z0-9_]{1,64}\Z")


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut short: hostile values are never echoed in full."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _longest(max_chars: int) -> Check:
    def check(text: str) -> None:
        if len(text) > max_chars:
            raise ValueError(f"is longer than {max_chars} characters")

    return check


def _between(low: float, high: float) -> Check:
    def plain(number: float) -> str:
        return str(int(number)) if number == int(number) else f"{number:g}"

    def check(text: str) -> None:
        if not low <= float(text) <= high:
            raise ValueError(f"must be between {plain(low)} and {plain(high)}")

    return check


def _remote_file_name(text: str) -> None:
    if not _FILE_NAME.match(text):
        raise ValueError(f"must be a plain file name, not {show(text)}")


def _remote_url(text: str) -> None:
    """An http(s) URL that cannot point at this host or climb out of its path."""
    _longest(2048)(text)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL must be http or https: {show(text)}")
    if not _URL_CHARACTERS.match(text) or "\\" in text:
        raise ValueError(f"URL contains spaces, control or non-ASCII characters: {show(text)}")
    if not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"URL must have a host and no user name: {show(text)}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"URL has an invalid port: {show(text)}")
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        address = None
    if address is None and (not _URL_HOST.match(parts.hostname) or _NUMERIC_HOST.match(parts.hostname)):
        raise ValueError(f"URL host must be a DNS name or an IP address: {show(text)}")
    if parts.hostname == "localhost" or (address is not None and (
            address.is_loopback or address.is_link_local or address.is_unspecified or address.is_multicast)):
        raise ValueError(f"URL may not point at a local or link-local address: {show(text)}")
    if any(segment in (".", "..") for segment in urllib.parse.unquote(parts.path).split("/")):
        raise ValueError(f"URL path may not contain . or .. segments: {show(text)}")


def _remote_user_data(text: str) -> None:
    """A URL or a file of the machinetype directory, never a path on the factory."""
    _longest(2048)(text)
    if "/" in text:
        _remote_url(text)
    elif not _FILE_NAME.match(text):
        raise ValueError(f"must be an http(s) URL or a plain file name, not {show(text)}")


def _remote_root_image(text: str) -> None:
    """A URL, a plain /cvmfs/ path or a file of the machinetype directory; VM images only."""
    _longest(2048)(text)
    if text.startswith("/cvmfs/"):
        if not _CVMFS_PATH.match(text) or "/../" in text + "/" or "/./" in text + "/":
            raise ValueError(f"must be a plain /cvmfs/ path, not {show(text)}")
    elif text.startswith("docker://"):
        _remote_image_reference(text[len("docker://"):])
    elif "/" in text:
        _remote_url(text)
    elif not _FILE_NAME.match(text):
        raise ValueError(f"must be an http(s) URL, a /cvmfs/ path or a plain file name, not {show(text)}")


def _remote_image_reference(reference: str) -> None:
    """A docker/podman image reference, ``[REGISTRY/]PATH[:TAG][@sha256:DIGEST]``, whose
    registry (if named) could also be a pipe's URL host: never this host or a link-local one."""
    if not _IMAGE_REFERENCE.match(reference):
        raise ValueError(f"docker:// must name an image like registry.example.org/vo/pilot:1, "
                         f"not {show(reference)}")
    first, _, rest = reference.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        _remote_url(f"https://{first}/")


def _remote_machine_model(text: str) -> None:
    if text not in MACHINE_MODELS + CONTAINER_MODELS:
        raise ValueError(f"must be one of {', '.join(MACHINE_MODELS + CONTAINER_MODELS)}, "
                         f"not {show(text)}")


def _remote_container_command(text: str) -> None:
    """Printable and bounded: it runs inside the container, as the pipe's user_data does."""
    _longest(1024)(text)
    if not _PRINTABLE.match(text):
        raise ValueError("contains control or non-ASCII characters")


def _remote_tmp_binds(text: str) -> None:
    """At most 16 plain container paths, none where vac or the kernel binds something."""
    _longest(4096)(text)
    paths = text.split()
    if len(paths) > 16:
        raise ValueError("lists more than 16 paths")
    for path in paths:
        if not _PRINTABLE.match(path) or any(
                path == reserved or path.startswith(reserved + "/") for reserved in _RESERVED_BINDS):
            raise ValueError(f"may not bind {show(path)}")


ORDERED_OPTIONS = (("min_processors", "max_processors"), ("min_wallclock_seconds", "max_wallclock_seconds"))


def order_problems(value_of: Callable[[str], Any]) -> list[tuple[str, str, str]]:
    """(low option, high option, message) for each min/max pair of a machinetype whose min is
    larger than its max; ``value_of(option)`` gives the values (None: unset, no problem)."""
    found = []
    for low, high in ORDERED_OPTIONS:
        low_value, high_value = value_of(low), value_of(high)
        if low_value is not None and high_value is not None and low_value > high_value:
            found.append((low, high, f"{low_value} is more than {high} ({high_value})"))
    return found


def container_model_problem(model: str, root_image: Optional[str],
                            singularity_user: Optional[str]) -> Optional[str]:
    """Why ``root_image`` cannot be run by ``model`` on this factory (CONTAINERS.md §1), or
    None: docker:// images are for docker/podman only, which need one; singularity/apptainer
    need ``[settings] singularity_user``."""
    docker = root_image is not None and root_image.startswith("docker://")
    if docker and model not in ENGINE_MODELS:
        return f"docker:// images are for machine_model docker or podman, not {model}"
    if root_image is not None and model in ENGINE_MODELS and not docker:
        return f"machine_model {model} needs root_image = docker://IMAGE"
    if model in APPTAINER_MODELS and singularity_user is None:
        return f"machine_model {model} needs [settings] singularity_user"
    return None


def _remote_fqan(text: str) -> None:
    _longest(256)(text)


def _remote_signing_dn(text: str) -> None:
    _longest(512)(text)
    if not _PRINTABLE.match(text):
        raise ValueError("contains control or non-ASCII characters")


def _remote_repositories(text: str) -> None:
    _longest(4096)(text)
    names = text.split()
    if len(names) > 32:
        raise ValueError("lists more than 32 repositories")
    for name in names:
        if not _REPOSITORY.match(name):
            raise ValueError(f"repository names must be like lhcb.cern.ch, not {show(name)}")


def _remote_option_text(text: str) -> None:
    if "\0" in text:
        raise ValueError("contains a NUL character")


# --- declaring options ---------------------------------------------------------------------------

_SPEC = "vac.option"  # field metadata keys
_FAMILY = "vac.family"


class _LocalOnly:
    def __repr__(self) -> str:
        return "LOCAL_ONLY"


LOCAL_ONLY: Any = _LocalOnly()  # remote=LOCAL_ONLY: the option is never taken from the network


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How one option is read: ``convert`` from configuration text; ``remote`` the extra check
    of a value from the network (None: none beyond the JSON type); ``kind`` the JSON type a
    remote value needs (from the field's type: integer, number, boolean or text)."""

    convert: Converter
    remote: Any = None  # a Check, None or LOCAL_ONLY
    kind: str = "text"

    @property
    def remote_allowed(self) -> bool:
        return self.remote is not LOCAL_ONLY


def option(convert: Converter, *, default: Any = dataclasses.MISSING, remote: Any = None) -> Any:
    """A dataclass field that is a configuration option (see the module documentation)."""
    return dataclasses.field(default=default, metadata={_SPEC: OptionSpec(convert, remote)})


def family(prefix: str, *, remote: Optional[Check] = None) -> Any:
    """A field collecting the ``(XXX, text)`` pairs of the options named ``<prefix>XXX``."""
    return dataclasses.field(default=(), metadata={_FAMILY: (prefix, remote)})


_share = number(0.0, allow_minimum=True)


# --- the options ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FactoryAddress:
    """One entry of ``factories``: ``name`` or ``name@address[:port]``."""

    name: str
    address: Optional[str] = None  # None: resolve ``name`` (DNS)
    port: Optional[int] = None  # None: the space's ``vacquery_port``

    def __str__(self) -> str:
        if self.address is None:
            return self.name
        address = self.address
        if self.port is None:
            return f"{self.name}@{address}"
        if ":" in address:
            address = f"[{address}]"
        return f"{self.name}@{address}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``[settings]`` section. Defaults are the classic ones (REFERENCE.md §1.2)."""

    vac_space: str = option(dns_name)
    factory_name: str = option(host_name)  # default: the host's FQDN; must contain a dot
    description: Optional[str] = option(any_text, default=None)
    # entries checked once factory_name is known
    factories: tuple[FactoryAddress, ...] = option(words(str.lower), default=())
    udp_timeout_seconds: float = option(number(0.0), default=10.0)
    mb_per_processor: int = option(integer(1), default=2048)
    hs06_per_processor: Optional[float] = option(number(0.0), default=None)
    processors_per_superslot: int = option(integer(1), default=1)
    # load_config fills in the host's logical processors
    total_processors: Optional[int] = option(integer(1), default=None)
    overload_per_processor: float = option(number(0.0), default=1.25)
    shutdown_time: Optional[int] = option(integer(0), default=None)
    draining: bool = option(boolean, default=False)
    gocdb_sitename: Optional[str] = option(any_text, default=None)
    gocdb_cert_file: Optional[str] = option(absolute_path, default=None)
    gocdb_key_file: Optional[str] = option(absolute_path, default=None)
    # classic default 1 (phone-home); ours is off by default
    version_logger: int = option(_version_logger, default=0)
    vacmon_hostport: tuple[str, ...] = option(words(host_port), default=())
    volume_group: Optional[str] = option(matching(_VOLUME_GROUP, "an LVM volume group name"), default=None)
    disk_gb_per_processor: Optional[float] = option(number(0.0), default=None)
    root_public_key: str = option(absolute_path, default="/root/.ssh/id_rsa.pub")
    fix_networking: bool = option(boolean, default=True)
    forward_dev: Optional[str] = option(matching(_INTERFACE, "a network interface name"), default=None)
    # (XXX, value) pairs sorted by XXX, from the options named machinefeatures_option_XXX etc.
    machinefeatures_options: tuple[tuple[str, str], ...] = family("machinefeatures_option_")
    user_data_options: tuple[tuple[str, str], ...] = family("user_data_option_")
    user_data_files: tuple[tuple[str, str], ...] = family("user_data_file_")
    # New settings: classic values as defaults, every path overridable.
    state_dir: str = option(absolute_path, default="/var/lib/vac")
    libvirt_uri: str = option(_libvirt_uri, default="qemu:///system")
    domain_type: str = option(one_of("kvm", "qemu"), default="kvm")
    vacquery_port: int = option(listen_port, default=995)
    vacquery_address: str = option(ip_address_or_all, default="")  # "" = all interfaces
    vacquery_secret_file: Optional[str] = option(absolute_path, default=None)
    vacquery_allow_unauthenticated: bool = option(boolean, default=True)
    metadata_address: str = option(ip_address, default="169.254.169.254")
    mjf_address: str = option(ip_address, default="169.254.169.253")
    http_port: int = option(listen_port, default=80)
    network_name: str = option(matching(_LIBVIRT_NAME, "a libvirt network name"), default="vac_169.254.0.0")
    # "nat" or "none" (isolated network, used by tests)
    network_forward: str = option(one_of("nat", "none"), default="nat")
    bridge_name: Optional[str] = option(matching(_INTERFACE, "a bridge name (at most 15 characters)"),
                                        default=None)  # None: libvirt chooses
    max_creating: int = option(integer(1), default=4)  # creations in flight at once
    # VMs of a type with unproven work that may be young at once
    max_probes: int = option(integer(1), default=2)
    reconcile_seconds: float = option(number(0.0), default=60.0)
    stop_grace_seconds: float = option(number(0.0, allow_minimum=True), default=30.0)
    peer_cache_seconds: float = option(number(0.0, allow_minimum=True), default=30.0)
    apel_version: str = option(one_of("0.3", "0.4"), default="0.3")
    hepscore23_per_processor: Optional[float] = option(number(0.0), default=None)
    # Prometheus endpoint on 127.0.0.1, off by default
    metrics_port: Optional[int] = option(listen_port, default=None)
    joboutputs_file_max_bytes: int = option(integer(1), default=1024 * 1024)  # one upload to joboutputs
    # all of one machine's joboutputs
    joboutputs_total_max_bytes: int = option(integer(1), default=10 * 1024 * 1024)
    joboutputs_max_files: int = option(integer(1), default=100)
    kernel: Optional[str] = option(absolute_path, default=None)  # direct kernel boot (test guests)
    initrd: Optional[str] = option(absolute_path, default=None)
    kernel_cmdline: Optional[str] = option(any_text, default=None)
    # Container machine models (docker/podman, singularity/apptainer).
    # runs the docker and podman models: podman or docker
    container_engine: str = option(one_of("podman", "docker"), default="podman")
    # OCI runtime (runc, crun); None: the engine's
    container_runtime: Optional[str] = option(matching(_ENGINE_NAME, "an OCI runtime name like runc or crun"),
                                              default=None)
    # the engine's network for docker/podman containers
    container_network: str = option(_container_network, default="bridge")
    # account running singularity/apptainer containers
    singularity_user: Optional[str] = option(matching(_ACCOUNT, "an account name"), default=None)


@dataclasses.dataclass(frozen=True)
class Machinetype:
    """One ``[machinetype NAME]`` section (REFERENCE.md §1.3), or one entry of a vacuum pipe."""

    name: str
    root_image: Optional[str] = option(_root_image, default=None, remote=_remote_root_image)
    user_data: Optional[str] = option(_user_data, default=None, remote=_remote_user_data)
    target_share: float = option(_share, default=0.0, remote=_between(0, 10**9))
    machine_model: str = option(_machine_model, default="cernvm3", remote=_remote_machine_model)
    root_device: str = option(matching(_DEVICE, "a device name of a-z and 0-9 like vda"), default="vda")
    scratch_device: str = option(matching(_DEVICE, "a device name of a-z and 0-9 like vdb"), default="vdb")
    # (XXX, value) sorted by XXX: [settings] user_data_option_XXX overridden by this section's
    user_data_options: tuple[tuple[str, str], ...] = family("user_data_option_", remote=_remote_option_text)
    user_data_files: tuple[tuple[str, str], ...] = family("user_data_file_", remote=_remote_file_name)
    user_data_proxy: bool = option(boolean, default=False)
    legacy_proxy: bool = option(boolean, default=False)
    min_processors: int = option(integer(1), default=1, remote=_between(1, 4096))
    max_processors: int = option(integer(1), default=1, remote=_between(1, 4096))
    max_wallclock_seconds: int = option(integer(1), default=86400, remote=_between(1, 10**8))
    # None: = max_wallclock_seconds
    min_wallclock_seconds: Optional[int] = option(integer(0), default=None, remote=_between(0, 10**8))
    backoff_seconds: int = option(integer(0), default=10, remote=_between(0, 10**7))
    fizzle_seconds: int = option(integer(0), default=600, remote=_between(0, 10**7))
    heartbeat_file: Optional[str] = option(file_name, default=None, remote=_remote_file_name)
    heartbeat_seconds: int = option(integer(0), default=0, remote=_between(0, 10**7))
    accounting_fqan: Optional[str] = option(_fqan, default=None, remote=_remote_fqan)
    # None: accounting_fqan, else the machinetype name
    machinegroup: Optional[str] = option(any_text, default=None, remote=LOCAL_ONLY)
    machines_dir_days: float = option(any_number, default=3.0, remote=LOCAL_ONLY)  # <= 0: never expire
    image_signing_dn: Optional[str] = option(_regex, default=None, remote=_remote_signing_dn)
    disk_gb_per_processor: Optional[float] = option(number(0.0), default=None, remote=_between(0.001, 10**5))
    cvmfs_repositories: tuple[str, ...] = option(
        words(matching(_REPOSITORY, "a CernVM-FS repository name")), default=(), remote=_remote_repositories)
    # None: /user_data (container models only)
    container_command: Optional[str] = option(_container_command, default=None,
                                              remote=_remote_container_command)
    # container paths given fresh scratch directories
    tmp_binds: tuple[str, ...] = option(words(_container_path), default=(), remote=_remote_tmp_binds)
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
    """One ``[vacuum_pipe PREFIX]`` section; expanded into machinetypes by vac.content.pipes."""

    prefix: str
    vacuum_pipe_url: str = option(http_url)
    target_share: float = option(_share, default=0.0)
    # other options (machinetype option names, raw text) copied to each machinetype, sorted
    defaults: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Config:
    settings: Settings
    machinetypes: dict  # name -> Machinetype, in name order
    vacuum_pipes: dict = dataclasses.field(default_factory=dict)  # prefix -> VacuumPipe
    sources: dict = dataclasses.field(default_factory=dict)  # (section, option) -> "file:line"

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


# --- tables derived from the declarations --------------------------------------------------------

_KINDS = {"int": "integer", "float": "number", "bool": "boolean"}


def _kind(annotation: Any) -> str:
    text = str(annotation)  # a string: this module uses postponed annotations
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1]
    return _KINDS.get(text, "text")


def _schema(cls: type) -> dict[str, OptionSpec]:
    return {field.name: dataclasses.replace(field.metadata[_SPEC], kind=_kind(field.type))
            for field in dataclasses.fields(cls) if _SPEC in field.metadata}


def _families(cls: type) -> dict[str, tuple[str, Optional[Check]]]:
    """Option name prefix -> (the tuple field collecting the pairs, its remote check)."""
    return {field.metadata[_FAMILY][0]: (field.name, field.metadata[_FAMILY][1])
            for field in dataclasses.fields(cls) if _FAMILY in field.metadata}


SETTINGS_SCHEMA = _schema(Settings)
MACHINETYPE_SCHEMA = _schema(Machinetype)
SETTINGS_OPTIONS: dict[str, Converter] = {name: spec.convert for name, spec in SETTINGS_SCHEMA.items()}
MACHINETYPE_OPTIONS: dict[str, Converter] = {name: spec.convert for name, spec in MACHINETYPE_SCHEMA.items()}
PIPE_OPTIONS: dict[str, Converter] = {name: spec.convert for name, spec in _schema(VacuumPipe).items()}
# option name prefix -> tuple field collecting (suffix, value) pairs
SETTINGS_PREFIXES = {prefix: name for prefix, (name, _) in _families(Settings).items()}
MACHINETYPE_PREFIXES = {prefix: name for prefix, (name, _) in _families(Machinetype).items()}
_MACHINETYPE_FAMILIES = _families(Machinetype)


# --- the remote mode -----------------------------------------------------------------------------

_KIND_NAMES = {"integer": "an integer", "number": "a number", "boolean": "true or false", "text": "a string"}
_REMOTE_INTEGER = re.compile(r"-?[0-9]{1,15}\Z")
_REMOTE_NUMBER = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?\Z")


def json_type(value: Any) -> str:
    """What a JSON value is, in words."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _remote_text(kind: str, value: Any) -> str:
    """A JSON value as option text, if it has the JSON type that ``kind`` needs."""
    if isinstance(value, str):
        _longest(MAX_REMOTE_CHARS)(value)
        text = value if kind == "text" else value.strip()
        if kind == "boolean" and text.lower() not in BOOLEANS:
            raise ValueError(f"must be true or false, not {show(value)}")
        if (kind == "integer" and not _REMOTE_INTEGER.match(text)) or (
                kind == "number" and not _REMOTE_NUMBER.match(text)):
            raise ValueError(f"must be {_KIND_NAMES[kind]}, not a string")
        return text
    if kind == "boolean" and isinstance(value, bool):
        return "true" if value else "false"
    if kind in ("integer", "number") and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"must be {_KIND_NAMES[kind]}, not {show(value)}")
        if kind == "integer" and value != math.floor(value):
            raise ValueError(f"must be an integer, not {show(value)}")
        return str(int(value)) if kind == "integer" else repr(float(value))
    raise ValueError(f"must be {_KIND_NAMES[kind]}, not {json_type(value)}")


def remote_option_value(option: str, value: Any, *, local_only: bool = False) -> Any:
    """A machinetype option's typed value from a JSON value that came from the network.

    ``KeyError`` if ``option`` is not a machinetype option, or is one never taken from the
    network unless ``local_only`` (the value is the local configuration's, held to the same
    stricter rules: a ``[vacuum_pipe]`` section); ``ValueError`` says what is wrong.
    """
    spec = MACHINETYPE_SCHEMA[option]
    if not spec.remote_allowed and not local_only:
        raise KeyError(option)
    text = _remote_text(spec.kind, value)
    if spec.remote is not None and spec.remote_allowed:
        spec.remote(text)
    converted = spec.convert(text)
    if isinstance(converted, WithWarning):
        converted = converted.value
    return converted


def remote_pair_value(prefix: str, suffix: str, value: Any) -> str:
    """The text of ``<prefix><suffix>`` (``user_data_option_XXX`` ...) from the network."""
    if not _REMOTE_SUFFIX.match(suffix):
        raise ValueError(f"must be {prefix} followed by a-z, 0-9 or _ (at most 64)")
    text = _remote_text("text", value)
    check = _MACHINETYPE_FAMILIES[prefix][1]
    if check is not None:
        check(text)
    return text
