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

import base64
import binascii
import dataclasses
import re
from typing import Any, Optional

from vac.core import values
from vac.core.config import (
    DEPRECATED_OPTIONS,
    MACHINETYPE_OPTIONS,
    MACHINETYPE_PREFIXES,
    OBSOLETE_OPTIONS,
    PIPE_OPTIONS,
    ConfigPaths,
    Machinetype,
    Settings,
    machinetype_from_section,
    pipe_from_section,
)
from vac.core.ini import (
    ERROR,
    WARNING,
    Block,
    Builder,
    OptionRules,
    Problem,
    Section,
    Value,
    field_defaults,
    merge,
    read_layers,
    record_defaults,
    sort_problems,
)

DEFAULT_CONF_DIR = "/etc/vcycle.d"
DEFAULT_MAIN_CONF = "/etc/vcycle.conf"
STATE_DIR = "/var/lib/vcycle"
STATUS_FILE = "status.json"  # per space, written by vcycled after each cycle, read by vcycle
# Classic vcycle has no maximum unless max_processors is set: a flavor may have any number of
# vCPUs from min_processors up. vac's Machinetype needs a number.
UNBOUNDED_PROCESSORS = 4096

API_OPENSTACK = "openstack"
API_EC2 = "ec2"
APIS = (API_OPENSTACK, API_EC2)
GRID_CA_PATH = "/etc/grid-security/certificates"
CVMFS_PROXY_PORT = 280  # classic Vcycle's port when cvmfs_proxy_machinetype names none


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
    # Vcycle 02: the cloud may reclaim these machines (spot/preemptible instances), giving them
    # grace_secs to write their shutdown message; one reclaimed is finished without a backoff.
    preemptible: bool = False
    grace_secs: Optional[int] = None

    @property
    def name(self) -> str:
        return self.machinetype.name

    @property
    def cvmfs_proxy_source(self) -> Optional[tuple[str, int]]:
        """(machinetype, port) of ``cvmfs_proxy_machinetype``; the classic port is 280."""
        if not self.cvmfs_proxy_machinetype:
            return None
        name, _, port = self.cvmfs_proxy_machinetype.partition(":")
        return name, int(port) if port else CVMFS_PROXY_PORT


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
    vacuum_pipes: dict = dataclasses.field(default_factory=dict)  # prefix -> VacuumPipe


@dataclasses.dataclass(frozen=True)
class VcycleConfig:
    spaces: dict  # name -> Space, in name order
    sources: dict = dataclasses.field(default_factory=dict)  # (section label, option) -> "file:line"


def space_settings(space: Space, hostname: str) -> Settings:
    """The vac Settings the shared code (user_data, MJF, APEL) sees for one space."""
    return Settings(vac_space=space.name, factory_name=hostname, shutdown_time=space.shutdown_time,
                    gocdb_sitename=space.gocdb_sitename, vacmon_hostport=space.vacmon_hostport,
                    state_dir=f"{STATE_DIR}/spaces/{space.name}")


# --- options ---------------------------------------------------------------------------------------

_SPACE_NAME = re.compile(r"[a-z0-9.-]+\Z")
_MACHINETYPE_NAME = re.compile(r"[a-z0-9-]+\Z")
_WORD = re.compile(r"\S+\Z")


def _password_base64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ValueError("is not base64-encoded UTF-8 text") from None


def _api(text: str) -> str:
    if text in ("azure", "occi", "dbce", "google", "creamce"):
        raise ValueError(f"{text!r} is not supported by this version (use {' or '.join(APIS)})")
    return values.one_of(*APIS)(text)


def _api_version(text: str) -> str:
    if text == "3" or text.startswith("3."):
        return text
    if text == "2" or text.startswith("2."):
        raise ValueError(f"{text!r}: Keystone v2 is not supported (clouds have removed it); use 3")
    raise ValueError(f"{text!r} is not a Keystone version (3 or 3.x)")


def _glance_api(text: str) -> Any:
    """Classic files must say 1 or 2; v2 is used either way (Glance v1 is gone from clouds)."""
    value = values.one_of("1", "2")(text)
    return values.WithWarning(value, "Glance v1 is not supported: v2 is used") if value == "1" else value


def _machinetype_port(text: str) -> str:
    name, colon, port = text.partition(":")
    if not _MACHINETYPE_NAME.match(name):
        raise ValueError(f"{text!r}: give NAME or NAME:PORT, NAME of a machinetype of this space")
    if colon:
        values.parse_port(port)
    return text


def _ca_certificates(text: str) -> str:
    return text if text == "system" else values.absolute_path(text)


_words = values.words(values.matching(_WORD, "a word"))

SPACE_OPTIONS: dict[str, Any] = {
    "api": _api,
    "api_version": _api_version,
    "url": values.http_url,
    "region": values.any_text,
    "processors_limit": values.integer(0),
    "flavor_names": _words,
    "shutdown_time": values.integer(0),
    "gocdb_sitename": values.any_text,
    "vacmon_hostport": values.words(values.host_port),
    "https_host": values.host_name,
    "https_port": values.parse_port,
    "cleanup_hours": values.integer(0),
    "ca_certificates": _ca_certificates,
    "max_creations": values.integer(1),
    "glance_api": _glance_api,
    "project_name": values.any_text,
    "domain_name": values.any_text,
    "username": values.any_text,
    "password_base64": _password_base64,  # Space.password, decoded
    "cred_id": values.any_text,
    "cred_secret": values.any_text,
    "zones": _words,
    "security_groups": _words,
    "network_uuid": values.any_text,
    "access_key": values.any_text,
    "secret_key": values.any_text,
}
_OPENSTACK_ONLY = ("project_name", "username", "password_base64", "cred_id", "cred_secret", "zones",
                   "security_groups", "network_uuid", "glance_api", "api_version")
_EC2_ONLY = ("access_key", "secret_key")

CLOUD_MACHINETYPE_OPTIONS: dict[str, Any] = {
    "flavor_names": _words,
    "processors_limit": values.integer(0),
    "max_machines": values.integer(0),
    "max_starting_processors": values.integer(0),
    "root_public_key": values.absolute_path,
    "https_x509dn": values.any_text,
    "cvmfs_proxy_machinetype": _machinetype_port,
    "hs06_per_processor": values.number(0.0),
    "mb_per_processor": values.integer(1),
    "preemptible": values.boolean,
    "grace_secs": values.integer(0),
}

RENAMED: dict[str, dict[str, str]] = {
    "space": {"max_processors": "processors_limit", "tenancy_name": "project_name"},
    "machinetype": {**DEPRECATED_OPTIONS["machinetype"], "flavor_name": "flavor_names",
                    "cpu_per_machine": "min_processors", "processors_per_machine": "min_processors",
                    "x509dn": "https_x509dn"},
}
_IGNORED_MT = "accepted for compatibility and ignored"
IGNORED: dict[str, dict[str, str]] = {
    "space": {"volume_gb_per_processor": "ignored: machines boot from images, not volumes",
              "version": "ignored: boto3 knows the EC2 API version",
              "service": "ignored: boto3 signs for the ec2 service",
              "gocdb_cert_file": "obsolete and ignored", "gocdb_key_file": "obsolete and ignored",
              "os_shutdown_timeout": "ignored"},
    "machinetype": {
        **{option: message for option, message in OBSOLETE_OPTIONS["machinetype"].items()
           if option not in CLOUD_MACHINETYPE_OPTIONS},
        "log_joboutputs": _IGNORED_MT, "joboutputs_days": _IGNORED_MT,
        "remote_joboutputs_url": _IGNORED_MT, "remote_joboutputs_cert": _IGNORED_MT,
        "remote_joboutputs_key": _IGNORED_MT, "disk_gb_per_processor": _IGNORED_MT,
    },
}


def _rules(kind: str, known: dict[str, Any]) -> OptionRules:
    tables = "space" if kind == "space" else "machinetype"
    # classic vcycle takes the machinetype option families in every section
    return OptionRules(known, tuple(MACHINETYPE_PREFIXES), RENAMED[tables], IGNORED[tables])


_RULES = {
    "space": _rules("space", SPACE_OPTIONS),
    "machinetype": _rules("machinetype", {**MACHINETYPE_OPTIONS, **CLOUD_MACHINETYPE_OPTIONS}),
    "vacuum_pipe": _rules("vacuum_pipe", {**MACHINETYPE_OPTIONS, **CLOUD_MACHINETYPE_OPTIONS, **PIPE_OPTIONS}),
}


@dataclasses.dataclass
class _Section(Section):
    """A vac section with the space in its label: ``[machinetype SPACE NAME]``."""

    space: str = ""

    @property
    def key(self) -> tuple:
        return self.kind, self.space, self.name

    @property
    def label(self) -> str:
        return " ".join(part for part in (self.kind, self.space, self.name) if part)


def _section_of(block: Block, problems: list[Problem]) -> Optional[_Section]:
    """The (empty) section a header opens, or None (with an error): classic vcycle refuses the
    rest."""
    words = block.header.lower().split()
    kind, names = words[0], words[1:]

    def error(message: str) -> None:
        problems.append(Problem(ERROR, message, block.file, block.line, section=block.header))

    if kind not in ("space", "machinetype", "vacuum_pipe"):
        error("unknown section: vcycle reads [space S], [machinetype S M] and [vacuum_pipe S P]")
        return None
    wanted = 1 if kind == "space" else 2
    if len(names) != wanted:
        error(f"[{kind} {'SPACE' if wanted == 1 else 'SPACE NAME'}] needs {wanted} name{'s' if wanted > 1 else ''}")
        return None
    if not _SPACE_NAME.match(names[0]):
        error(f"space name {names[0]!r} may only contain a-z, 0-9, . and -")
        return None
    if wanted == 2 and not _MACHINETYPE_NAME.match(names[1]):
        error(f"name {names[1]!r} may only contain a-z, 0-9 and -")
        return None
    return _Section(kind, names[1] if wanted == 2 else "", block.file, block.line, space=names[0])


def _build_space(section: _Section, machinetypes: dict, pipes: dict, problems: list[Problem],
                 sources: dict) -> Optional[Space]:
    builder = Builder(section, problems, sources)
    fields = builder.convert(SPACE_OPTIONS, field_defaults(Space))
    builder.required(fields, "api")
    api = fields.get("api")
    builder.required(fields, "url")
    if api == API_OPENSTACK:
        builder.required(fields, "project_name")
        has_password = "username" in fields or "password_base64" in fields
        if "cred_id" in fields or "cred_secret" in fields:
            builder.required(fields, "cred_id")
            builder.required(fields, "cred_secret")
            if has_password:
                builder.problem(ERROR, "give username and password_base64 or cred_id and cred_secret, not both",
                                value=builder.at("cred_id"))
        else:
            builder.required(fields, "username")
            builder.required(fields, "password_base64")
    elif api == API_EC2:
        builder.required(fields, "access_key")
        builder.required(fields, "secret_key")
    for option in (_EC2_ONLY if api == API_OPENSTACK else _OPENSTACK_ONLY if api == API_EC2 else ()):
        if option in fields:
            builder.problem(WARNING, f"ignored: not an option of api = {api}", value=builder.at(option))
            del fields[option]
    if not machinetypes and not pipes:
        builder.problem(ERROR, "a space needs at least one [machinetype SPACE NAME] or [vacuum_pipe SPACE PREFIX]")
    if api == API_EC2:
        for name, machinetype in machinetypes.items():
            if not (machinetype.machinetype.root_image or "").startswith("image:"):
                builder.problem(ERROR, f"machinetype {name}: EC2 needs root_image = image:AMI-ID")
            if not (machinetype.flavor_names or fields.get("flavor_names")):
                builder.problem(ERROR, f"machinetype {name}: EC2 needs flavor_names (instance types)")
    if builder.failed:
        return None
    for checked_only in ("api_version", "glance_api"):  # only Keystone v3 and Glance v2 are used
        fields.pop(checked_only, None)
    if "password_base64" in fields:
        fields["password"] = fields.pop("password_base64")
    record_defaults(Space, section.label, sources, skip=("name", "machinetypes", "vacuum_pipes"))
    return Space(name=section.space, machinetypes=machinetypes, vacuum_pipes=pipes, **fields)


def _check_cvmfs_proxy_sources(sections: dict, machinetypes: dict, pipes: dict,
                               problems: list[Problem]) -> None:
    """``cvmfs_proxy_machinetype`` names a machinetype of the same space whose heartbeat lists
    are kept (classic Vcycle found out only when creating machines, failing each creation)."""
    for space, built in machinetypes.items():
        for name, machinetype in built.items():
            source = machinetype.cvmfs_proxy_source
            if source is None:
                continue
            proxies = built.get(source[0])
            if proxies is None:
                if any(source[0].startswith(f"{prefix}-") for prefix in pipes.get(space, {})):
                    continue  # a vacuum pipe's machinetype: known once the pipe is read
                level, message = ERROR, f"{source[0]} is not a machinetype of space {space}"
            elif not (proxies.machinetype.heartbeat_file and proxies.machinetype.heartbeat_seconds):
                level, message = WARNING, (
                    f"machinetype {source[0]} sets no heartbeat_file and heartbeat_seconds, so it never "
                    "has machines to list: the configured user_data_option_cvmfs_proxy is used")
            else:
                continue
            value = sections[("machinetype", space, name)].values["cvmfs_proxy_machinetype"]
            problems.append(Problem(level, message, value.file, value.line, f"machinetype {space} {name}",
                                    value.written_as))


def _build_machinetype(section: _Section, problems: list[Problem], sources: dict,
                       hostname: str) -> Optional[CloudMachinetype]:
    values = dict(section.values)
    if "max_processors" not in values:
        values["max_processors"] = Value(str(UNBOUNDED_PROCESSORS), "default", 0, "max_processors")
    vac_section = dataclasses.replace(section, values=values)
    for required in ("backoff_seconds", "fizzle_seconds"):  # required by classic vcycle
        if required not in values:
            problems.append(Problem(ERROR, "required option not set", section.file, section.line,
                                    section.label, required))
    settings = Settings(vac_space=section.space, factory_name=hostname, state_dir=STATE_DIR)
    machinetype = machinetype_from_section(vac_section, settings, problems, sources, require_images=True)
    builder = Builder(section, problems, sources)
    fields = builder.convert(CLOUD_MACHINETYPE_OPTIONS, field_defaults(CloudMachinetype))
    if fields.get("preemptible") and fields.get("grace_secs") is None:
        problems.append(Problem(ERROR, "a preemptible machinetype needs grace_secs (seconds the cloud gives "
                                "a reclaimed machine)", section.file, section.line, section.label, "grace_secs"))
    if machinetype is None or builder.failed or any(p.is_error and p.section == section.label for p in problems):
        return None
    path = f"{STATE_DIR}/spaces/{section.space}/machinetypes/{section.name}"
    return CloudMachinetype(dataclasses.replace(machinetype, machinetype_path=path), **fields)


def load_vcycle_config(paths: Optional[ConfigPaths] = None, *,
                       hostname: str = "localhost.localdomain") -> tuple[Optional[VcycleConfig], list[Problem]]:
    """Read and check vcycle's configuration; the VcycleConfig is None if any problem is an error."""
    paths = paths or ConfigPaths(DEFAULT_CONF_DIR, DEFAULT_MAIN_CONF, ())
    problems: list[Problem] = []
    files, parsed = read_layers(paths.conf_dir, paths.main_conf, paths.run_confs, problems)
    sections = merge(parsed, problems, _section_of, _RULES.__getitem__)
    sources: dict = {}
    machinetypes: dict[str, dict] = {}
    pipes: dict[str, dict] = {}
    for (kind, space, name), section in sorted(sections.items()):
        if ("space", space, "") not in sections and kind != "space":
            problems.append(Problem(ERROR, f"no [space {space}] section", section.file, section.line, section.label))
            continue
        if kind == "machinetype":
            built = _build_machinetype(section, problems, sources, hostname)
            if built is not None:
                machinetypes.setdefault(space, {})[name] = built
        elif kind == "vacuum_pipe":
            pipe = pipe_from_section(section, problems, sources)
            if pipe is not None:
                pipes.setdefault(space, {})[name] = pipe
    _check_cvmfs_proxy_sources(sections, machinetypes, pipes, problems)
    spaces = {}
    for (kind, space, _), section in sorted(sections.items()):
        if kind == "space":
            built_space = _build_space(section, machinetypes.get(space, {}), pipes.get(space, {}), problems, sources)
            if built_space is not None:
                spaces[space] = built_space
    if not sections:
        read = ", ".join(path for path, _ in parsed) or "no files"
        problems.append(Problem(ERROR, f"no [space NAME] section (read: {read}; also looked in {paths.conf_dir})"))
    sort_problems(problems, files, paths.conf_dir)
    if any(problem.is_error for problem in problems):
        return None, problems
    return VcycleConfig(spaces, sources), problems


def format_vcycle_config(config: VcycleConfig) -> str:
    """The effective configuration as classic INI text, each value followed by its source.
    Secrets are shown as ``(set)``."""
    lines = ["# Effective vcycle configuration. After each value: the file:line that set it, or default."]
    secret = {"password", "cred_secret", "secret_key"}

    def section(label: str, items: list) -> None:
        lines.append("")
        lines.append(f"[{label}]")
        for option, value in items:
            if option in secret and value is not None:
                value = "(set)"
            text = "" if value is None else " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
            source = config.sources.get((label, "password_base64" if option == "password" else option), "default")
            lines.append(f"{option} = {text}".ljust(50) + f" ; {source}")

    for space in config.spaces.values():
        section(f"space {space.name}", [(f.name, getattr(space, f.name)) for f in dataclasses.fields(space)
                                        if f.name not in ("name", "machinetypes", "vacuum_pipes")])
        for name, cloud_type in space.machinetypes.items():
            items = [(f.name, getattr(cloud_type.machinetype, f.name)) for f in dataclasses.fields(Machinetype)
                     if f.name not in ("name", "machinetype_path", "user_data_options", "user_data_files")]
            items += [(f"user_data_option_{k}", v) for k, v in cloud_type.machinetype.user_data_options]
            items += [(f"user_data_file_{k}", v) for k, v in cloud_type.machinetype.user_data_files]
            items += [(f.name, getattr(cloud_type, f.name)) for f in dataclasses.fields(CloudMachinetype)
                      if f.name != "machinetype"]
            section(f"machinetype {space.name} {name}", items)
        for prefix, pipe in space.vacuum_pipes.items():
            section(f"vacuum_pipe {space.name} {prefix}",
                    [("vacuum_pipe_url", pipe.vacuum_pipe_url), ("target_share", pipe.target_share), *pipe.defaults])
    return "\n".join(lines) + "\n"
