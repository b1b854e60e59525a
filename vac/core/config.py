"""Layered INI configuration: typed, immutable settings and machinetypes.

Interface used by every other module:

* ``ConfigPaths(conf_dir, main_conf, run_confs)``: where to read; ``ConfigPaths.from_args(args)``
  builds it from the ``--conf-dir``/``--conf``/``--run-conf`` options of ``vac`` and ``vacd``.
* ``load_config(paths, *, hostname=None, processor_count=None) -> (Config | None, [Problem])``:
  reads every ``*.conf`` of ``conf_dir`` in name order, then ``main_conf``, then ``run_confs``;
  same-named sections merge and later values win. ``Config`` is None if any problem is an error.
  Host facts default to this host (FQDN, logical processors); tests pass them in.
* ``load_config_or_raise(...) -> Config``: the same, raising ``ConfigError(problems)`` on errors.
* ``Config``: ``settings: Settings``, ``machinetypes: dict[str, Machinetype]`` (in name order,
  including pipe-derived ones once vac.content.pipes has expanded them), ``vacuum_pipes: dict[str,
  VacuumPipe]``, ``sources: dict[(section, option), "file:line" | "default"]`` where section is
  ``settings``, ``machinetype NAME`` or ``vacuum_pipe PREFIX``. Treat all of it as read-only.
* ``Problem``: ``level`` (``"error"``/``"warning"``), ``message``, ``file``, ``line``, ``section``,
  ``option``; ``str()`` gives ``FILE:LINE: [SECTION] OPTION: MESSAGE``.
* ``format_effective_config(config) -> str``: the merged configuration as INI text, each value
  followed by ``; FILE:LINE`` or ``; default``; reading it back gives the same configuration.
* ``build_machinetype(name, options, settings, origin=...)``: one machinetype from raw option
  strings, checked exactly like a ``[machinetype]`` section.
* ``machinetype_from_section``, ``pipe_from_section``: the same checks on a merged
  ``vac.core.ini.Section`` (vcycle's configuration builds its machinetypes and pipes with them).

The options themselves (type, default, converter, and the stricter checks of values from the
network) are declared once, as the fields of ``Settings``, ``Machinetype`` and ``VacuumPipe`` in
vac.core.schema; their names are re-exported here. Reading and parsing the files, and the
located problems, are vac.core.ini's (the classic ``RawConfigParser`` syntax).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import socket
from collections.abc import Mapping
from typing import Any, Optional

from vac.core.ini import (
    ERROR,
    MAX_FILE_BYTES,
    WARNING,
    Block,
    Builder,
    ConfigError,
    OptionRules,
    Problem,
    Section,
    field_defaults,
    merge,
    read_layers,
    record_defaults,
    sort_problems,
)
from vac.core.schema import (
    APPTAINER_MODELS,
    CONTAINER_MODELS,
    ENGINE_MODELS,
    MACHINE_MODELS,
    MACHINETYPE_OPTIONS,
    MACHINETYPE_PREFIXES,
    PIPE_OPTIONS,
    SECTION_NAME,
    SETTINGS_OPTIONS,
    SETTINGS_PREFIXES,
    Config,
    FactoryAddress,
    Machinetype,
    Settings,
    VacuumPipe,
    container_model_problem,
    order_problems,
)
from vac.core.values import DNS_NAME, Converter, parse_port

# The schema's and the problems' names are this module's public interface too (most modules
# import them here).
__all__ = [
    "APPTAINER_MODELS", "CONTAINER_MODELS", "DEFAULT_CONF_DIR", "DEFAULT_MAIN_CONF", "DEFAULT_RUN_CONFS",
    "DEPRECATED_OPTIONS", "ENGINE_MODELS", "ERROR", "MACHINE_MODELS", "MACHINETYPE_OPTIONS",
    "MACHINETYPE_PREFIXES", "MAX_FILE_BYTES", "OBSOLETE_OPTIONS", "PIPE_OPTIONS", "SETTINGS_OPTIONS",
    "SETTINGS_PREFIXES", "WARNING", "Config", "ConfigError", "ConfigPaths", "FactoryAddress", "Machinetype",
    "Problem", "Settings", "VacuumPipe", "build_machinetype", "format_effective_config", "load_config",
    "load_config_or_raise", "machinetype_from_section", "pipe_from_section",
]

DEFAULT_CONF_DIR = "/etc/vac.d"
DEFAULT_MAIN_CONF = "/etc/vac.conf"
DEFAULT_RUN_CONFS = ("/run/vac.conf", "/var/run/vac.conf")


# --- where to read -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConfigPaths:
    """The three configuration locations, read in this order."""

    conf_dir: str = DEFAULT_CONF_DIR
    main_conf: str = DEFAULT_MAIN_CONF
    run_confs: tuple[str, ...] = DEFAULT_RUN_CONFS

    def __post_init__(self) -> None:
        if isinstance(self.run_confs, str):  # one file given where a sequence is expected
            object.__setattr__(self, "run_confs", (self.run_confs,))
        else:
            object.__setattr__(self, "run_confs", tuple(self.run_confs))

    @classmethod
    def from_args(cls, args: Any) -> ConfigPaths:
        """From the options added by ``vac.ops.configcli.add_config_arguments`` (missing ones: defaults)."""
        run_conf = getattr(args, "run_conf", None)
        return cls(
            conf_dir=getattr(args, "conf_dir", None) or DEFAULT_CONF_DIR,
            main_conf=getattr(args, "conf", None) or DEFAULT_MAIN_CONF,
            run_confs=(run_conf,) if run_conf else DEFAULT_RUN_CONFS,
        )


# --- names of the past ---------------------------------------------------------------------------

DEPRECATED_OPTIONS: dict[str, dict[str, str]] = {
    "settings": {
        "mb_per_cpu": "mb_per_processor",
        "hs06_per_cpu": "hs06_per_processor",
        "vcpu_per_machine": "processors_per_superslot",
        "cpu_per_machine": "processors_per_superslot",
        "cpu_total": "total_processors",
        "overload_per_cpu": "overload_per_processor",
        "scratch_gb": "disk_gb_per_processor",
        "disk_gb_per_cpu": "disk_gb_per_processor",
    },
    "machinetype": {
        "vm_model": "machine_model",
        "machineoutputs_days": "machines_dir_days",
        "cernvm_signing_dn": "image_signing_dn",
    },
}

OBSOLETE_OPTIONS: dict[str, dict[str, str]] = {
    "settings": {
        "total_machines": "obsolete and ignored: total_processors limits the number of machines",
        "delete_old_files": "obsolete and ignored: old files are always deleted",
        "mb_per_machine": "obsolete and ignored: use mb_per_processor",
    },
    "machinetype": {
        "rootpublickey": "ignored here: root_public_key is a [settings] option",
        "root_public_key": "ignored here: root_public_key is a [settings] option",
        "log_machineoutputs": "obsolete and ignored: machines_dir_days says how long machine directories are kept",
        "user_data_proxy_cert": "obsolete and ignored: set user_data_proxy = true and put x509cert.pem "
        "and x509key.pem in the machinetype directory",
        "user_data_proxy_key": "obsolete and ignored: set user_data_proxy = true and put x509cert.pem "
        "and x509key.pem in the machinetype directory",
        "machinetype_path": "ignored: always <state_dir>/machinetypes/<name>",
    },
}

_REMOVED_SECTIONS = {
    "factories": "a [factories] section is no longer read: list the factories in the factories option of [settings]",
    "targetshares": "a [targetshares] section is no longer read: give target_share in each [machinetype NAME] section",
}


def _rules(kind: str, known: Mapping[str, Converter], prefixes: Mapping[str, str]) -> OptionRules:
    deprecated = "settings" if kind == "settings" else "machinetype"
    other, where = (MACHINETYPE_OPTIONS, "[machinetype NAME]") if kind == "settings" else \
        (SETTINGS_OPTIONS, "[settings]")
    return OptionRules(known, tuple(prefixes), DEPRECATED_OPTIONS[deprecated],
                       OBSOLETE_OPTIONS[deprecated], dict.fromkeys(other, where))


# Known options and prefixes of each kind of section (a pipe takes any machinetype option too).
_RULES = {
    "settings": _rules("settings", SETTINGS_OPTIONS, SETTINGS_PREFIXES),
    "machinetype": _rules("machinetype", MACHINETYPE_OPTIONS, MACHINETYPE_PREFIXES),
    "vacuum_pipe": _rules("vacuum_pipe", {**MACHINETYPE_OPTIONS, **PIPE_OPTIONS}, MACHINETYPE_PREFIXES),
}


# --- merging files into sections -----------------------------------------------------------------


def _section_of(block: Block, problems: list[Problem]) -> Optional[Section]:
    """The (empty) section a header opens, or None (with a problem) when its options are not
    read."""
    words = block.header.lower().split(None, 1)
    kind, name = words[0], words[1].strip() if len(words) > 1 else ""

    def problem(level: str, message: str) -> None:
        problems.append(Problem(level, message, block.file, block.line, section=block.header))

    if kind in _REMOVED_SECTIONS:
        problem(ERROR, _REMOVED_SECTIONS[kind])
        return None
    if kind == "settings":
        if name:
            problem(ERROR, "[settings] takes no name")
            return None
        return Section(kind, "", block.file, block.line)
    if kind not in ("machinetype", "vmtype", "vacuum_pipe"):
        problem(WARNING, "unknown section ignored")
        return None
    if not name:
        problem(ERROR, f"[{kind} NAME] needs a name")
        return None
    if not SECTION_NAME.match(name):
        problem(ERROR, f"name {name!r} may only contain a-z, 0-9 and -")
        return None
    if kind == "vmtype":
        problem(WARNING, f"deprecated: use [machinetype {name}]")
        kind = "machinetype"
    return Section(kind, name, block.file, block.line)


def _merge(parsed: list[tuple[str, list[Block]]], problems: list[Problem]) -> dict[tuple, Section]:
    return merge(parsed, problems, _section_of, _RULES.__getitem__)


# --- building typed objects ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Host:
    """Facts about the factory host, detected only when the configuration needs them."""

    hostname: Optional[str]
    processor_count: Optional[int]

    def fqdn(self) -> str:
        return (self.hostname if self.hostname is not None else _detected_fqdn()).lower().rstrip(".")

    def processors(self) -> int:
        return self.processor_count if self.processor_count is not None else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _detected_fqdn() -> str:
    """The host name if it is qualified (as the classic factory required), else what DNS says.

    Asked once per process: getfqdn may query DNS, and the daemon reloads every cycle."""
    name = socket.gethostname()
    if "." in name:
        return name
    qualified = socket.getfqdn(name)
    return qualified if "." in qualified else name


def _parse_factory(entry: str, factory_name: str) -> FactoryAddress:
    name, _, address_text = entry.partition("@")
    if name == ".":
        name = factory_name
    elif "." not in name:
        name = f"{name}.{factory_name.split('.', 1)[1]}"
    if not DNS_NAME.match(name):
        raise ValueError(f"{entry!r}: {name!r} is not a valid factory name")
    if not _:
        return FactoryAddress(name)
    port_text = None
    if address_text.startswith("["):
        address_text, bracket, port_text = address_text[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"{entry!r}: write IPv6 addresses as [address]:port")
        port_text = port_text[1:] or None
    elif address_text.count(":") == 1:
        address_text, _, port_text = address_text.partition(":")
    try:
        address = str(ipaddress.ip_address(address_text))
    except ValueError:
        raise ValueError(f"{entry!r}: {address_text!r} is not an IP address") from None
    port = None
    if port_text is not None:
        try:
            port = parse_port(port_text)
        except ValueError as error:
            raise ValueError(f"{entry!r}: port {error}") from None
    return FactoryAddress(name, address, port)


def _build_settings(section: Section, host: _Host, problems: list[Problem], sources: dict) -> Optional[Settings]:
    builder = Builder(section, problems, sources)
    fields = builder.convert(SETTINGS_OPTIONS, field_defaults(Settings))
    fields.update(builder.pairs(SETTINGS_PREFIXES))
    builder.required(fields, "vac_space")

    factory_name = fields.get("factory_name")
    if factory_name is None and "factory_name" not in builder.bad:
        factory_name = host.fqdn()
        if "." not in factory_name or not DNS_NAME.match(factory_name):
            builder.problem(ERROR, f"this host's name {factory_name!r} is not a fully qualified domain name: "
                            "set factory_name", "factory_name")
    elif factory_name is not None and "." not in factory_name:
        builder.problem(ERROR, f"{factory_name!r} has no dot: give the fully qualified name",
                        "factory_name", builder.at("factory_name"))
    if factory_name:
        fields["factory_name"] = factory_name

    if "factories" in fields and factory_name and "." in factory_name:
        factories: dict[str, FactoryAddress] = {}
        for entry in fields["factories"]:
            try:
                factory = _parse_factory(entry, factory_name)
            except ValueError as error:
                builder.problem(ERROR, str(error), value=builder.at("factories"))
                continue
            if factory.name in factories:
                builder.problem(WARNING, f"{factory.name} is listed twice; the first entry counts", value=builder.at("factories"))
                continue
            factories[factory.name] = factory
        fields["factories"] = tuple(factories.values())

    processors = host.processors()
    if "total_processors" not in fields:
        fields["total_processors"] = processors
    elif fields["total_processors"] > processors:
        builder.problem(ERROR, f"{fields['total_processors']} is more than the {processors} processors of this host",
                        value=builder.at("total_processors"))
    if ("gocdb_cert_file" in fields) != ("gocdb_key_file" in fields):
        missing = "gocdb_key_file" if "gocdb_cert_file" in fields else "gocdb_cert_file"
        builder.problem(ERROR, "gocdb_cert_file and gocdb_key_file must be given together", missing)
    for needs_kernel in ("initrd", "kernel_cmdline"):
        if needs_kernel in fields and "kernel" not in fields:
            builder.problem(ERROR, "only used with kernel, which is not set", value=builder.at(needs_kernel))

    if builder.failed:
        return None
    record_defaults(Settings, section.label, sources, skip=tuple(SETTINGS_PREFIXES.values()))
    return Settings(**fields)


def machinetype_from_section(
    section: Section, settings: Settings, problems: list[Problem], sources: dict, *, require_images: bool
) -> Optional[Machinetype]:
    """The machinetype of a merged ``[machinetype NAME]`` section, or None (with problems);
    ``require_images``: root_image and user_data must be set (not for a pipe's override)."""
    builder = Builder(section, problems, sources)
    fields = builder.convert(MACHINETYPE_OPTIONS, field_defaults(Machinetype))
    inherited = {"user_data_options": settings.user_data_options, "user_data_files": settings.user_data_files}
    for field, pairs in inherited.items():
        for suffix, _value in pairs:
            option = f"{'user_data_option_' if field == 'user_data_options' else 'user_data_file_'}{suffix}"
            sources[(section.label, option)] = sources.get(("settings", option), "default")
    fields.update(builder.pairs(MACHINETYPE_PREFIXES, inherited))
    if require_images:
        builder.required(fields, "root_image")
        builder.required(fields, "user_data")

    defaults = field_defaults(Machinetype)
    for low, high, message in order_problems(lambda option: fields.get(option, defaults[option])):
        builder.problem(ERROR, message, low, builder.at(low) or builder.at(high))
    if fields.get("heartbeat_seconds", 0) > 0 and "heartbeat_file" not in fields:
        builder.problem(WARNING, "has no effect without heartbeat_file", value=builder.at("heartbeat_seconds"))
    _check_container_options(builder, fields, settings)
    if "disk_gb_per_processor" in fields and settings.disk_gb_per_processor is not None \
            and fields["disk_gb_per_processor"] > settings.disk_gb_per_processor:
        builder.problem(WARNING, f"more than the [settings] value {settings.disk_gb_per_processor:g}, which is used instead",
                        value=builder.at("disk_gb_per_processor"))

    if builder.failed:
        return None
    fields["machinetype_path"] = os.path.join(settings.state_dir, "machinetypes", section.name)
    record_defaults(Machinetype, section.label, sources, skip=("name", "machinetype_path", *MACHINETYPE_PREFIXES.values()))
    return Machinetype(name=section.name, **fields)


def _check_container_options(builder: Builder, fields: dict, settings: Settings) -> None:
    """The container models' rules (CONTAINERS.md §1): docker:// images for docker/podman only,
    singularity/apptainer need singularity_user, container options only for containers."""
    model = fields.get("machine_model", "cernvm3")
    problem = container_model_problem(model, fields.get("root_image"), settings.singularity_user)
    if problem is not None:
        builder.problem(ERROR, problem, value=builder.at(
            "machine_model" if "singularity_user" in problem else "root_image"))
    for option in ("container_command", "tmp_binds"):
        if fields.get(option) and model not in CONTAINER_MODELS:
            builder.problem(WARNING, f"ignored: only container machine models use it, not {model}",
                            value=builder.at(option))
    if fields.get("tmp_binds") and model in APPTAINER_MODELS:
        builder.problem(WARNING, f"ignored by machine_model {model}: its /tmp is the scratch space",
                        value=builder.at("tmp_binds"))


def pipe_from_section(section: Section, problems: list[Problem], sources: dict) -> Optional[VacuumPipe]:
    """The vacuum pipe of a merged ``[vacuum_pipe PREFIX]`` section, or None (with problems);
    its machinetype options are checked now and handed on as text."""
    builder = Builder(section, problems, sources)
    fields = builder.convert(PIPE_OPTIONS, field_defaults(VacuumPipe))
    builder.required(fields, "vacuum_pipe_url")
    # The other options are machinetype defaults: check them now, hand them on as text.
    machinetype_values = {option: value for option, value in section.values.items() if option not in PIPE_OPTIONS}
    check = Builder(dataclasses.replace(section, values=machinetype_values), problems, sources)
    check.convert(MACHINETYPE_OPTIONS, field_defaults(Machinetype))
    check.pairs(MACHINETYPE_PREFIXES)
    if builder.failed or check.failed:
        return None
    record_defaults(VacuumPipe, section.label, sources, skip=("prefix", "defaults"))
    defaults = tuple(sorted((option, value.text) for option, value in machinetype_values.items()))
    return VacuumPipe(prefix=section.name, defaults=defaults, **fields)


def build_machinetype(
    name: str,
    options: Mapping[str, str],
    settings: Settings,
    *,
    origin: str = "<options>",
    machinetype_path: Optional[str] = None,
) -> tuple[Optional[Machinetype], list[Problem]]:
    """One machinetype from raw option text, checked like a ``[machinetype NAME]`` section.

    ``origin`` names where the options came from in problems (a pipe URL, say); deprecated
    names are mapped, unknown ones warned about. ``machinetype_path`` overrides the default.
    """
    problems: list[Problem] = []
    section = Section("machinetype", name, origin, 0)
    if not SECTION_NAME.match(name):
        problems.append(Problem(ERROR, f"name {name!r} may only contain a-z, 0-9 and -", origin, section=section.label))
        return None, problems
    blocks = [Block(f"machinetype {name}", origin, 0, [[key.lower(), text, 0] for key, text in options.items()])]
    merged = _merge([(origin, blocks)], problems)
    section = merged.get(("machinetype", name), section)
    machinetype = machinetype_from_section(section, settings, problems, {}, require_images=True)
    if machinetype is not None and machinetype_path is not None:
        machinetype = dataclasses.replace(machinetype, machinetype_path=machinetype_path)
    if any(problem.is_error for problem in problems):
        machinetype = None
    return machinetype, problems


# --- loading -------------------------------------------------------------------------------------


_UNUSABLE_SETTINGS = Settings(vac_space="invalid.invalid", factory_name="invalid.invalid")


def load_config(
    paths: Optional[ConfigPaths] = None,
    *,
    hostname: Optional[str] = None,
    processor_count: Optional[int] = None,
) -> tuple[Optional[Config], list[Problem]]:
    """Read and check the configuration; the Config is None if any problem is an error.

    ``hostname`` (the default factory_name) and ``processor_count`` (the default and maximum
    total_processors) are this host's unless given. All problems of all files are returned,
    errors and warnings, sorted by file (in reading order) and line.
    """
    paths = paths or ConfigPaths()
    problems: list[Problem] = []
    files, parsed = read_layers(paths.conf_dir, paths.main_conf, paths.run_confs, problems)
    sections = _merge(parsed, problems)

    sources: dict[tuple[str, str], str] = {}
    settings_section = sections.get(("settings", ""))
    settings = None
    if settings_section is None:
        read = ", ".join(path for path, _ in parsed) or "no files"
        problems.append(Problem(ERROR, f"no [settings] section (read: {read}; also looked in {paths.conf_dir})"))
    else:
        settings = _build_settings(settings_section, _Host(hostname, processor_count), problems, sources)

    machinetypes: dict[str, Machinetype] = {}
    vacuum_pipes: dict[str, VacuumPipe] = {}
    pipe_prefixes = tuple(f"{name}-" for kind, name in sections if kind == "vacuum_pipe")
    for (kind, name), section in sorted(sections.items()):
        if kind == "vacuum_pipe":
            pipe = pipe_from_section(section, problems, sources)
            if pipe is not None:
                vacuum_pipes[name] = pipe
        elif kind == "machinetype":
            # A [machinetype PREFIX-SUFFIX] section may only override a pipe's values. Without
            # usable settings the section is still checked, so that all errors are reported.
            machinetype = machinetype_from_section(section, settings or _UNUSABLE_SETTINGS, problems, sources,
                                             require_images=not name.startswith(pipe_prefixes))
            if machinetype is not None:
                machinetypes[name] = machinetype

    sort_problems(problems, files, paths.conf_dir)
    if settings is None or any(problem.is_error for problem in problems):
        return None, problems
    return Config(settings, machinetypes, vacuum_pipes, sources), problems


def load_config_or_raise(
    paths: Optional[ConfigPaths] = None,
    *,
    hostname: Optional[str] = None,
    processor_count: Optional[int] = None,
) -> Config:
    """``load_config`` that raises ``ConfigError`` (carrying every problem) on any error."""
    config, problems = load_config(paths, hostname=hostname, processor_count=processor_count)
    if config is None:
        raise ConfigError(problems)
    return config


# --- showing the effective configuration ---------------------------------------------------------


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return " ".join(str(item) for item in value)
    return str(value)


_FROM_HOST = {"factory_name": "default: this host's name", "total_processors": "default: this host's processors"}


def _format_section(label: str, items: list[tuple[str, Any]], sources: Mapping, derived: Mapping[str, Any]) -> list[str]:
    lines = [f"[{label}]"]
    width = max((len(option) for option, _ in items), default=0)
    for option, value in items:
        first, *rest = _as_text(value).split("\n")
        setting = f"{option.ljust(width)} = {first}".rstrip()
        source = sources.get((label, option), "default")
        if source == "default" and label == "settings":
            source = _FROM_HOST.get(option, source)
        lines.append(f"{setting.ljust(width + 30)} ; {source}")
        lines.extend(f"    {more}" for more in rest)
    for option, value in derived.items():
        lines.append(f"# {option} = {value}  (derived)")
    return lines


def _dataclass_items(obj: Any, prefixes: Mapping[str, str], skip: tuple = ()) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    prefix_of = {field: prefix for prefix, field in prefixes.items()}
    for field in dataclasses.fields(obj):
        if field.name in skip:
            continue
        value = getattr(obj, field.name)
        if field.name in prefix_of:
            items.extend((f"{prefix_of[field.name]}{suffix}", text) for suffix, text in value)
        else:
            items.append((field.name, value))
    return items


def format_effective_config(config: Config) -> str:
    """The merged configuration as INI text; each value is followed by ``; FILE:LINE`` or
    ``; default``. An empty value means "not set"."""
    sources = config.sources
    blocks = [_format_section("settings", _dataclass_items(config.settings, SETTINGS_PREFIXES), sources, {})]
    for name, machinetype in config.machinetypes.items():
        items = _dataclass_items(machinetype, MACHINETYPE_PREFIXES, skip=("name", "machinetype_path"))
        blocks.append(_format_section(f"machinetype {name}", items, sources,
                                      {"machinetype_path": machinetype.machinetype_path}))
    for prefix, pipe in config.vacuum_pipes.items():
        items = [("vacuum_pipe_url", pipe.vacuum_pipe_url), ("target_share", pipe.target_share), *pipe.defaults]
        blocks.append(_format_section(f"vacuum_pipe {prefix}", items, sources, {}))
    heading = ["# Effective vac configuration. After each value: the file:line that set it, or default.",
               "# An empty value means the option is not set."]
    return "\n\n".join("\n".join(block) for block in [heading, *blocks]) + "\n"
