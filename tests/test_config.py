"""The configuration loader: layering, syntax, every option's type and default, deprecated and
obsolete names, located errors, the effective-configuration printer and ``vac conf``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import textwrap
from pathlib import Path
from typing import Optional

import pytest

from vac.cli import main as cli
from vac.core import config as configmod
from vac.core import schema
from vac.core.config import (
    DEPRECATED_OPTIONS,
    MACHINETYPE_OPTIONS,
    OBSOLETE_OPTIONS,
    SETTINGS_OPTIONS,
    Config,
    ConfigError,
    ConfigPaths,
    FactoryAddress,
    Machinetype,
    Settings,
    VacuumPipe,
    build_machinetype,
    format_effective_config,
    load_config,
    load_config_or_raise,
)
from vac.ops import configcli

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "config"
HOST = {"hostname": "wn001.example.org", "processor_count": 8}
SETTINGS = "[settings]\nvac_space = vac01.example.org\n"
LHCB = "[machinetype lhcb]\nroot_image = lhcb.iso\nuser_data = lhcb.user_data\n"


class Space:
    """A temporary set of configuration locations: vac.d/, vac.conf and run.conf."""

    def __init__(self, root: Path) -> None:
        self.conf_dir = root / "vac.d"
        self.conf_dir.mkdir()
        self.main = root / "vac.conf"
        self.run = root / "run.conf"
        self.paths = ConfigPaths(str(self.conf_dir), str(self.main), (str(self.run),))

    def fragment(self, name: str, text: str) -> str:
        return self.write(self.conf_dir / name, text)

    def write(self, path: Path, text: str) -> str:
        path.write_text(textwrap.dedent(text))
        return str(path)

    def load(self, **host) -> tuple[Optional[Config], list]:
        return load_config(self.paths, **{**HOST, **host})

    def cli_options(self) -> list[str]:
        return ["--conf-dir", str(self.conf_dir), "--conf", str(self.main), "--run-conf", str(self.run)]


@pytest.fixture
def space(tmp_path: Path) -> Space:
    return Space(tmp_path)


def errors(problems: list) -> list[str]:
    return [str(problem) for problem in problems if problem.level == "error"]


def warnings(problems: list) -> list[str]:
    return [str(problem) for problem in problems if problem.level == "warning"]


def line_of(path: str, needle: str) -> int:
    """1-based number of the first line of ``path`` containing ``needle``."""
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def load_ok(space: Space, **host) -> Config:
    config, problems = space.load(**host)
    assert config is not None, errors(problems)
    return config


# --- layering ------------------------------------------------------------------------------------


def test_fragments_in_name_order_then_main_then_run_file(space):
    # Written out of order: the name decides, not the creation time.
    late = space.fragment("20-late.conf", "[settings]\nmb_per_processor = 1500\nhs06_per_processor = 6\n")
    space.fragment("10-early.conf", SETTINGS + "mb_per_processor = 1000\nhs06_per_processor = 5\ndraining = yes\n")
    main = space.write(space.main, "[settings]\nmb_per_processor = 3000\ndraining = no\n")
    run = space.write(space.run, "[settings]\ndraining = yes\n")
    config = load_ok(space)
    assert config.settings.hs06_per_processor == 6.0
    assert config.settings.mb_per_processor == 3000
    assert config.settings.draining is True
    assert config.sources[("settings", "hs06_per_processor")] == f"{late}:3"
    assert config.sources[("settings", "mb_per_processor")] == f"{main}:2"
    assert config.sources[("settings", "draining")] == f"{run}:2"


def test_only_visible_conf_files_of_the_directory_are_read(space):
    space.fragment("10-settings.conf", SETTINGS)
    space.fragment("20-x.conf.rpmnew", "garbage without a section\n")
    space.fragment(".30-hidden.conf", "garbage without a section\n")
    space.fragment("README", "garbage without a section\n")
    (space.conf_dir / "40-dir.conf").mkdir()
    os.mkfifo(space.conf_dir / "50-fifo.conf")
    config, problems = space.load()
    assert config is not None
    assert warnings(problems) == [f"{space.conf_dir}/40-dir.conf: is a directory; ignored",
                                  f"{space.conf_dir}/50-fifo.conf: is not a regular file; ignored"]


def test_missing_locations_are_skipped(tmp_path):
    main = tmp_path / "vac.conf"
    main.write_text(SETTINGS)
    paths = ConfigPaths(str(tmp_path / "no-such-dir"), str(main), (str(tmp_path / "no-run.conf"),))
    config, problems = load_config(paths, **HOST)
    assert config is not None and problems == []


def test_run_file_reached_through_a_link_is_read_once(space, tmp_path):
    space.fragment("10-settings.conf", SETTINGS)
    space.write(space.run, "[settings]\nmb_per_cpu = 1000\n")
    link = tmp_path / "var-run-vac.conf"
    link.symlink_to(space.run)
    paths = dataclasses.replace(space.paths, run_confs=(str(space.run), str(link)))
    config, problems = load_config(paths, **HOST)
    assert config.settings.mb_per_processor == 1000
    assert len(warnings(problems)) == 1


def test_same_named_sections_merge_across_and_within_files(space):
    space.fragment("10-settings.conf", SETTINGS)
    space.fragment("20-lhcb.conf", LHCB + "target_share = 1\n\n[settings]\ndraining = yes\n")
    space.fragment("30-lhcb-more.conf", "[machinetype LHCb]\ntarget_share = 4\nbackoff_seconds = 60\n")
    config = load_ok(space)
    lhcb = config.machinetypes["lhcb"]
    assert (lhcb.root_image, lhcb.target_share, lhcb.backoff_seconds) == ("lhcb.iso", 4.0, 60)
    assert config.settings.draining is True


def test_an_empty_value_unsets_an_earlier_optional_value(space):
    space.write(space.main, SETTINGS + "shutdown_time = 1800000000\nhs06_per_processor = 10\n")
    run = space.write(space.run, "[settings]\nshutdown_time =\nhs06_per_processor = \"\"\n")
    config = load_ok(space)
    assert config.settings.shutdown_time is None and config.settings.hs06_per_processor is None
    assert config.sources[("settings", "shutdown_time")] == f"{run}:2"


# --- syntax --------------------------------------------------------------------------------------


def test_classic_ini_syntax(space):
    space.write(space.main, "\ufeff" + textwrap.dedent("""\
        # comment
        ; another comment
        [Settings]
        VAC_SPACE: vac01.example.org
        description = first line
          second line ; an inline comment
            # a comment inside a continuation
          third # not a comment
        factories =
            wn002
            wn003
        gocdb_sitename = a;b ; only the spaced semicolon starts a comment
        """).replace("\n", "\r\n"))
    config = load_ok(space)
    assert config.settings.vac_space == "vac01.example.org"
    assert config.settings.description == "first line\nsecond line\nthird # not a comment"
    assert [factory.name for factory in config.settings.factories] == ["wn002.example.org", "wn003.example.org"]
    assert config.settings.gocdb_sitename == "a;b"


@pytest.mark.parametrize("text, line, message", [
    ("vac_space = x.org\n[settings]\n", 1, "vac_space: option outside any [section]"),
    ("[settings\nvac_space = x.org\n", 1, "malformed section header '[settings'"),
    ("[settings]\nvac_space\n", 2, "expected 'option = value' or a [section] header, not 'vac_space'"),
    ("[settings]\n= x.org\n", 2, "expected 'option = value' or a [section] header, not '= x.org'"),
    ("[]\n", 1, "malformed section header '[]'"),
    ("[settings]\nvac_space = x.org\n[bad header\noption = dropped\n", 3, "malformed section header '[bad header'"),
])
def test_malformed_lines(space, text, line, message):
    path = space.write(space.main, text)
    _, problems = space.load()
    assert f"{path}:{line}: {message}" in errors(problems)
    assert not any("dropped" in str(problem) for problem in problems)


# --- defaults and every option's type ------------------------------------------------------------


def test_defaults(space):
    path = space.fragment("10.conf", SETTINGS + LHCB)
    config = load_ok(space)
    assert config.settings == Settings(vac_space="vac01.example.org", factory_name="wn001.example.org",
                                       total_processors=8)
    assert config.settings.version_logger == 0  # no phone-home unless asked
    assert config.machinetypes["lhcb"] == Machinetype(
        name="lhcb", root_image="lhcb.iso", user_data="lhcb.user_data",
        machinetype_path="/var/lib/vac/machinetypes/lhcb")
    lhcb = config.machinetypes["lhcb"]
    assert (lhcb.machine_model, lhcb.backoff_seconds, lhcb.fizzle_seconds) == ("cernvm3", 10, 600)
    assert lhcb.effective_min_wallclock_seconds == 86400 and lhcb.effective_machinegroup == "lhcb"
    assert config.sources[("settings", "udp_timeout_seconds")] == "default"
    assert config.sources[("settings", "factory_name")] == "default"
    assert config.sources[("machinetype lhcb", "fizzle_seconds")] == "default"
    assert config.sources[("machinetype lhcb", "root_image")] == f"{path}:4"


def test_factory_name_and_processors_come_from_the_host(space):
    space.fragment("10.conf", SETTINGS)
    config = load_ok(space, hostname="WN007.Example.ORG.", processor_count=64)
    assert config.settings.factory_name == "wn007.example.org"
    assert config.settings.total_processors == 64


def test_every_option_has_a_typed_value_test_and_a_type_error_test():
    free_text = {"description", "gocdb_sitename", "kernel_cmdline", "machinegroup"}
    assert {option for option, *_ in GOOD_SETTINGS} == set(SETTINGS_OPTIONS)
    assert {option for option, *_ in GOOD_MACHINETYPE} == set(MACHINETYPE_OPTIONS)
    assert {option for option, *_ in BAD_SETTINGS} == set(SETTINGS_OPTIONS) - free_text
    assert {option for option, *_ in BAD_MACHINETYPE} == set(MACHINETYPE_OPTIONS) - free_text


def test_option_tables_match_the_dataclasses():
    settings_fields = {field.name for field in dataclasses.fields(Settings)}
    machinetype_fields = {field.name for field in dataclasses.fields(Machinetype)}
    assert set(SETTINGS_OPTIONS) | set(configmod.SETTINGS_PREFIXES.values()) == settings_fields
    assert set(MACHINETYPE_OPTIONS) | set(configmod.MACHINETYPE_PREFIXES.values()) | {
        "name", "machinetype_path"} == machinetype_fields


def with_extra(cases: list) -> list:
    """Cases as (option, text, expected, extra lines), extra being optional in the tables."""
    return [(*case, "")[:4] for case in cases]


GOOD_SETTINGS = [
    ("vac_space", "VAC01.Example.org", "VAC01.Example.org"),
    ("factory_name", "WN002.Example.ORG.", "wn002.example.org"),
    ("description", "Our space", "Our space"),
    ("factories", ". wn002", (FactoryAddress("wn001.example.org"), FactoryAddress("wn002.example.org"))),
    ("udp_timeout_seconds", "2.5", 2.5),
    ("mb_per_processor", "4096", 4096),
    ("hs06_per_processor", "12.25", 12.25),
    ("processors_per_superslot", "8", 8),
    ("total_processors", "+8", 8),
    ("overload_per_processor", "2", 2.0),
    ("shutdown_time", "1800000000", 1800000000),
    ("draining", "YES", True),
    ("gocdb_sitename", "UKI-EXAMPLE", "UKI-EXAMPLE"),
    ("gocdb_cert_file", "/etc/cert.pem", "/etc/cert.pem", "gocdb_key_file = /etc/key.pem"),
    ("gocdb_key_file", "/etc/key.pem", "/etc/key.pem", "gocdb_cert_file = /etc/cert.pem"),
    ("version_logger", "3", 3),
    ("vacmon_hostport", "VacMon.example.org:8884 b.example.org:1", ("vacmon.example.org:8884", "b.example.org:1")),
    ("volume_group", "vac_vg", "vac_vg"),
    ("disk_gb_per_processor", "25", 25.0),
    ("root_public_key", "/etc/vac/key.pub", "/etc/vac/key.pub"),
    ("fix_networking", "off", False),
    ("forward_dev", "eth0", "eth0"),
    ("state_dir", "/srv/vac", "/srv/vac"),
    ("libvirt_uri", "test:///default", "test:///default"),
    ("domain_type", "qemu", "qemu"),
    ("vacquery_port", "9995", 9995),
    ("vacquery_address", "127.0.0.1", "127.0.0.1"),
    ("vacquery_secret_file", "/etc/vac/secret", "/etc/vac/secret"),
    ("vacquery_allow_unauthenticated", "false", False),
    ("metadata_address", "127.0.0.2", "127.0.0.2"),
    ("mjf_address", "::1", "::1"),
    ("http_port", "8080", 8080),
    ("network_name", "vactest-1", "vactest-1"),
    ("network_forward", "none", "none"),
    ("bridge_name", "vacbr0", "vacbr0"),
    ("max_creating", "1", 1),
    ("max_probes", "3", 3),
    ("reconcile_seconds", "5", 5.0),
    ("stop_grace_seconds", "0", 0.0),
    ("peer_cache_seconds", "0", 0.0),
    ("apel_version", "0.4", "0.4"),
    ("hepscore23_per_processor", "11", 11.0),
    ("metrics_port", "9100", 9100),
    ("joboutputs_file_max_bytes", "4194304", 4194304),
    ("joboutputs_total_max_bytes", "67108864", 67108864),
    ("joboutputs_max_files", "500", 500),
    ("kernel", "/boot/vmlinuz", "/boot/vmlinuz"),
    ("initrd", "/boot/initrd.img", "/boot/initrd.img", "kernel = /boot/vmlinuz"),
    ("kernel_cmdline", "console=ttyS0 quiet", "console=ttyS0 quiet", "kernel = /boot/vmlinuz"),
    ("container_engine", "docker", "docker"),
    ("container_runtime", "runc", "runc"),
    ("container_network", "none", "none"),
    ("singularity_user", "vacsing", "vacsing"),
]


@pytest.mark.parametrize("option, text, expected, extra", with_extra(GOOD_SETTINGS), ids=[case[0] for case in GOOD_SETTINGS])
def test_settings_values(space, option, text, expected, extra):
    space.fragment("10.conf", SETTINGS)
    space.write(space.run, f"[settings]\n{option} = {text}\n{extra}\n")
    config, problems = space.load()
    assert problems == []
    assert getattr(config.settings, option) == expected


GOOD_MACHINETYPE = [
    ("root_image", "https://images.example.org/cernvm.iso", "https://images.example.org/cernvm.iso"),
    ("user_data", "templates/lhcb.user_data", "templates/lhcb.user_data"),
    ("target_share", "2.5", 2.5),
    ("machine_model", "vm-raw", "vm-raw"),
    ("root_device", "hda", "hda"),
    ("scratch_device", "vdc", "vdc"),
    ("user_data_proxy", "True", True),
    ("legacy_proxy", "1", True),
    ("min_processors", "2", 2, "max_processors = 4"),
    ("max_processors", "4", 4),
    ("max_wallclock_seconds", "3600", 3600),
    ("min_wallclock_seconds", "0", 0),
    ("backoff_seconds", "0", 0),
    ("fizzle_seconds", "120", 120),
    ("heartbeat_file", "vm-heartbeat", "vm-heartbeat"),
    ("heartbeat_seconds", "300", 300, "heartbeat_file = hb"),
    ("accounting_fqan", "/lhcb/Role=pilot", "/lhcb/Role=pilot"),
    ("machinegroup", "lhcb group", "lhcb group"),
    ("machines_dir_days", "-1", -1.0),
    ("image_signing_dn", "^/DC=ch/DC=cern/.*$", "^/DC=ch/DC=cern/.*$"),
    ("disk_gb_per_processor", "12.5", 12.5),
    ("cvmfs_repositories", "lhcb.cern.ch  lhcb-condb.cern.ch", ("lhcb.cern.ch", "lhcb-condb.cern.ch")),
    ("container_command", "/bin/sh -c 'exec /user_data'", "/bin/sh -c 'exec /user_data'", "machine_model = podman\nroot_image = docker://lhcb/pilot"),
    ("tmp_binds", "/scratch  /home/pilot", ("/scratch", "/home/pilot"), "machine_model = podman\nroot_image = docker://lhcb/pilot"),
]


@pytest.mark.parametrize("option, text, expected, extra", with_extra(GOOD_MACHINETYPE), ids=[case[0] for case in GOOD_MACHINETYPE])
def test_machinetype_values(space, option, text, expected, extra):
    space.fragment("10.conf", SETTINGS + LHCB)
    space.write(space.run, f"[machinetype lhcb]\n{option} = {text}\n{extra}\n")
    config, problems = space.load()
    assert problems == []
    assert getattr(config.machinetypes["lhcb"], option) == expected


BAD_SETTINGS = [
    ("vac_space", "not a name!", "'not a name!' is not a valid DNS name (letters, digits, - and .)"),
    ("factory_name", "wn_1.example.org", "'wn_1.example.org' is not a valid DNS name (letters, digits, - and .)"),
    ("factories", "wn002@300.1.1.1", "'wn002@300.1.1.1': '300.1.1.1' is not an IP address"),
    ("udp_timeout_seconds", "ten", "'ten' is not a number"),
    ("mb_per_processor", "2G", "'2G' is not an integer"),
    ("hs06_per_processor", "0", "'0' must be greater than 0"),
    ("processors_per_superslot", "0", "'0' must be at least 1"),
    ("total_processors", "1.5", "'1.5' is not an integer"),
    ("overload_per_processor", "nan", "'nan' is not a finite number"),
    ("shutdown_time", "tomorrow", "'tomorrow' is not an integer"),
    ("draining", "maybe", "'maybe' is not a boolean (use yes/no, true/false, on/off or 1/0)"),
    ("gocdb_cert_file", "cert.pem", "'cert.pem' is not an absolute path"),
    ("gocdb_key_file", "key.pem", "'key.pem' is not an absolute path"),
    ("version_logger", "daily", "'daily' is not an integer (messages per day)"),
    ("vacmon_hostport", "vacmon.example.org", "'vacmon.example.org' is not host.domain:port"),
    ("volume_group", "-vg", "'-vg' is not an LVM volume group name"),
    ("disk_gb_per_processor", "-1", "'-1' must be greater than 0"),
    ("root_public_key", "id_rsa.pub", "'id_rsa.pub' is not an absolute path"),
    ("fix_networking", "perhaps", "'perhaps' is not a boolean (use yes/no, true/false, on/off or 1/0)"),
    ("forward_dev", "eth/0", "'eth/0' is not a network interface name"),
    ("state_dir", "var/lib/vac", "'var/lib/vac' is not an absolute path"),
    ("libvirt_uri", "system", "'system' is not a libvirt URI like qemu:///system"),
    ("domain_type", "xen", "'xen' is not one of kvm, qemu"),
    ("vacquery_port", "70000", "'70000' must be at most 65535"),
    ("vacquery_address", "localhost", "'localhost' is not an IP address"),
    ("vacquery_secret_file", "secret", "'secret' is not an absolute path"),
    ("vacquery_allow_unauthenticated", "sometimes", "'sometimes' is not a boolean (use yes/no, true/false, on/off or 1/0)"),
    ("metadata_address", "169.254.169.256", "'169.254.169.256' is not an IP address"),
    ("mjf_address", "", "'' is not an IP address"),
    ("http_port", "-1", "'-1' must be at least 0"),
    ("network_name", "vac/net", "'vac/net' is not a libvirt network name"),
    ("network_forward", "route", "'route' is not one of nat, none"),
    ("bridge_name", "averyverylongbridge", "'averyverylongbridge' is not a bridge name (at most 15 characters)"),
    ("max_creating", "0", "'0' must be at least 1"),
    ("max_probes", "-1", "'-1' must be at least 1"),
    ("reconcile_seconds", "0", "'0' must be greater than 0"),
    ("stop_grace_seconds", "-1", "'-1' must be at least 0"),
    ("peer_cache_seconds", "soon", "'soon' is not a number"),
    ("apel_version", "0.5", "'0.5' is not one of 0.3, 0.4"),
    ("hepscore23_per_processor", "x", "'x' is not a number"),
    ("metrics_port", "http", "'http' is not an integer"),
    ("joboutputs_file_max_bytes", "1M", "'1M' is not an integer"),
    ("joboutputs_total_max_bytes", "0", "'0' must be at least 1"),
    ("joboutputs_max_files", "many", "'many' is not an integer"),
    ("kernel", "vmlinuz", "'vmlinuz' is not an absolute path"),
    ("initrd", "initrd.img", "'initrd.img' is not an absolute path"),
    ("container_engine", "lxc", "'lxc' is not one of podman, docker"),
    ("container_runtime", "run c", "'run c' is not an OCI runtime name like runc or crun"),
    ("container_network", "host", "'host' would let containers reach the host's local services: "
     "use bridge, none or a network made for them"),
    ("singularity_user", "Vac!", "'Vac!' is not an account name"),
]


@pytest.mark.parametrize("option, text, message", BAD_SETTINGS, ids=[case[0] for case in BAD_SETTINGS])
def test_settings_type_errors(space, option, text, message):
    space.fragment("10-settings.conf", SETTINGS)
    path = space.write(space.run, f"[settings]\n{option} = {text}\n")
    config, problems = space.load()
    assert config is None
    assert errors(problems) == [f"{path}:2: [settings] {option}: {message}"]


BAD_MACHINETYPE = [
    ("root_image", "docker://", "'docker://' does not name an image after docker://"),
    ("user_data", "../secret", "'../secret' is not a path without .. or an http(s) URL"),
    ("target_share", "-1", "'-1' must be at least 0"),
    ("machine_model", "lxc", "'lxc' is not one of cernvm3, cernvm4, vm-raw, docker, podman, singularity, apptainer"),
    ("root_device", "/dev/vda", "'/dev/vda' is not a device name of a-z and 0-9 like vda"),
    ("scratch_device", "VDB", "'VDB' is not a device name of a-z and 0-9 like vdb"),
    ("user_data_proxy", "y", "'y' is not a boolean (use yes/no, true/false, on/off or 1/0)"),
    ("legacy_proxy", "n", "'n' is not a boolean (use yes/no, true/false, on/off or 1/0)"),
    ("min_processors", "0", "'0' must be at least 1"),
    ("max_processors", "two", "'two' is not an integer"),
    ("max_wallclock_seconds", "ten", "'ten' is not an integer"),
    ("min_wallclock_seconds", "-5", "'-5' must be at least 0"),
    ("backoff_seconds", "1.5", "'1.5' is not an integer"),
    ("fizzle_seconds", "10m", "'10m' is not an integer"),
    ("heartbeat_file", "logs/heartbeat", "'logs/heartbeat' is not a plain file name (no /)"),
    ("heartbeat_seconds", "-1", "'-1' must be at least 0"),
    ("accounting_fqan", "lhcb", "'lhcb' is not an FQAN like /lhcb/Role=pilot"),
    ("machines_dir_days", "forever", "'forever' is not a number"),
    ("image_signing_dn", "/CN=(unclosed",
     "'/CN=(unclosed' is not a valid regular expression (missing ), unterminated subpattern at position 4)"),
    ("disk_gb_per_processor", "0", "'0' must be greater than 0"),
    ("cvmfs_repositories", "lhcb.cern.ch /cvmfs/x", "'/cvmfs/x' is not a CernVM-FS repository name"),
    ("container_command", "'/user_data", "\"'/user_data\" is not a command line (No closing quotation)"),
    ("tmp_binds", "/scratch /a/../b", "'/a/../b' is not an absolute container path without .., : or ,"),
]


@pytest.mark.parametrize("option, text, message", BAD_MACHINETYPE, ids=[case[0] for case in BAD_MACHINETYPE])
def test_machinetype_type_errors(space, option, text, message):
    space.fragment("10.conf", SETTINGS + LHCB)
    path = space.write(space.run, f"[machinetype lhcb]\n{option} = {text}\n")
    config, problems = space.load()
    assert config is None
    assert errors(problems) == [f"{path}:2: [machinetype lhcb] {option}: {message}"]


def test_the_documented_example_error(space):
    space.fragment("10-settings.conf", SETTINGS)
    path = space.fragment("20-lhcb.conf", LHCB + "\n" * 10 + "max_wallclock_seconds = ten\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:14: [machinetype lhcb] max_wallclock_seconds: 'ten' is not an integer"]


@pytest.mark.parametrize("text, message", [
    ("bad@1.2.3.4:0", "'bad@1.2.3.4:0': port '0' must be at least 1"),
    ("bad@[::1", "'bad@[::1': write IPv6 addresses as [address]:port"),
    ("bad@wn9.example.org", "'bad@wn9.example.org': 'wn9.example.org' is not an IP address"),
    ("bad_name", "'bad_name': 'bad_name.example.org' is not a valid factory name"),
])
def test_factory_entry_errors(space, text, message):
    path = space.write(space.main, f"{SETTINGS}factories = {text}\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:3: [settings] factories: {message}"]


def test_factory_entries_with_addresses(space):
    path = space.write(space.main, SETTINGS + (
        "factories = . wn002 WN003.Other.org wn004@127.0.0.4 wn005@127.0.0.5:9995\n"
        "    wn006@[::1]:996 wn007@::1 wn002@127.0.0.9\n"))
    config, problems = space.load()
    assert config.settings.factories == (
        FactoryAddress("wn001.example.org"),
        FactoryAddress("wn002.example.org"),
        FactoryAddress("wn003.other.org"),
        FactoryAddress("wn004.example.org", "127.0.0.4"),
        FactoryAddress("wn005.example.org", "127.0.0.5", 9995),
        FactoryAddress("wn006.example.org", "::1", 996),
        FactoryAddress("wn007.example.org", "::1"),
    )
    assert [str(factory) for factory in config.settings.factories[3:]] == [
        "wn004.example.org@127.0.0.4", "wn005.example.org@127.0.0.5:9995",
        "wn006.example.org@[::1]:996", "wn007.example.org@::1"]
    assert warnings(problems) == [
        f"{path}:3: [settings] factories: wn002.example.org is listed twice; the first entry counts"]


def test_version_logger_accepts_the_old_booleans_with_a_warning(space):
    path = space.write(space.main, SETTINGS + "version_logger = True\n")
    config, problems = space.load()
    assert config.settings.version_logger == 1
    assert warnings(problems) == [
        f"{path}:3: [settings] version_logger: 'True' is deprecated: give messages per day, here 1"]


# --- user_data options, paths, pipes -------------------------------------------------------------


def test_user_data_options_are_inherited_and_overridden(space):
    settings = space.fragment("10-settings.conf", SETTINGS + (
        "user_data_option_site = UKI-EXAMPLE\nuser_data_option_queue = default\n"
        "user_data_file_hostcert = hostcert.pem\nmachinefeatures_option_contact = admins@example.org\n"))
    lhcb = space.fragment("20-lhcb.conf", LHCB + "user_data_option_queue = lhcb\nuser_data_option_extra = 1\n")
    space.fragment("30-atlas.conf", "[machinetype atlas]\nroot_image = a.iso\nuser_data = a.user_data\n")
    config = load_ok(space)
    assert config.settings.user_data_options == (("queue", "default"), ("site", "UKI-EXAMPLE"))
    assert config.settings.machinefeatures_options == (("contact", "admins@example.org"),)
    assert config.machinetypes["lhcb"].user_data_options == (("extra", "1"), ("queue", "lhcb"), ("site", "UKI-EXAMPLE"))
    assert config.machinetypes["lhcb"].user_data_files == (("hostcert", "hostcert.pem"),)
    assert config.machinetypes["atlas"].user_data_options == config.settings.user_data_options
    assert config.sources[("machinetype lhcb", "user_data_option_site")] == f"{settings}:3"
    assert config.sources[("machinetype lhcb", "user_data_option_queue")] == f"{lhcb}:4"


def test_prefixed_option_names_are_checked(space):
    path = space.write(space.main, SETTINGS + "user_data_option_Bad-Name = x\n")
    _, problems = space.load()
    assert errors(problems) == [
        f"{path}:3: [settings] user_data_option_bad-name: the part after user_data_option_ may only contain a-z, 0-9 and _"]


def test_machinetype_path_follows_state_dir(space):
    space.write(space.main, SETTINGS + "state_dir = /srv/vac\n" + LHCB)
    assert load_ok(space).machinetypes["lhcb"].machinetype_path == "/srv/vac/machinetypes/lhcb"


def test_vacuum_pipe_section(space):
    path = space.write(space.main, SETTINGS + textwrap.dedent("""\
        [vacuum_pipe lhcb]
        vacuum_pipe_url = https://lhcb.example.org/vac.pipe
        target_share = 5
        machineoutputs_days = 2
        heartbeat_seconds = 900
        user_data_option_queue = pipe

        [machinetype lhcb-prod]
        target_share = 1
        """))
    config, problems = space.load()
    assert config.vacuum_pipes == {"lhcb": VacuumPipe(
        "lhcb", "https://lhcb.example.org/vac.pipe", 5.0,
        (("heartbeat_seconds", "900"), ("machines_dir_days", "2"), ("user_data_option_queue", "pipe")))}
    # A local section of a pipe machinetype only overrides: it needs no image of its own.
    assert config.machinetypes["lhcb-prod"].target_share == 1.0
    assert warnings(problems) == [f"{path}:6: [vacuum_pipe lhcb] machineoutputs_days: deprecated: use machines_dir_days"]
    assert config.sources[("vacuum_pipe lhcb", "heartbeat_seconds")] == f"{path}:7"


@pytest.mark.parametrize("body, line, option, message", [
    ("vacuum_pipe_url = ftp://x.example.org/p", 2, "vacuum_pipe_url", "'ftp://x.example.org/p' is not an http:// or https:// URL"),
    ("target_share = 1", 1, "vacuum_pipe_url", "required option not set"),
    ("vacuum_pipe_url = https://x.example.org/p\nheartbeat_seconds = often", 3, "heartbeat_seconds", "'often' is not an integer"),
])
def test_vacuum_pipe_errors(space, body, line, option, message):
    path = space.fragment("40-pipe.conf", f"[vacuum_pipe lhcb]\n{body}\n\n{SETTINGS}")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:{line}: [vacuum_pipe lhcb] {option}: {message}"]


def test_build_machinetype_from_raw_options():
    settings = Settings(vac_space="vac01.example.org", factory_name="wn001.example.org",
                        user_data_options=(("site", "X"),))
    machinetype, problems = build_machinetype(
        "lhcb-prod", {"root_image": "a.iso", "user_data": "https://x.example.org/u", "vm_model": "cernvm4"},
        settings, origin="https://x.example.org/lhcb.pipe", machinetype_path="/var/lib/vac/machinetypes/lhcb")
    assert machinetype.machine_model == "cernvm4" and machinetype.user_data_options == (("site", "X"),)
    assert machinetype.machinetype_path == "/var/lib/vac/machinetypes/lhcb"
    assert [str(problem) for problem in problems] == [
        "https://x.example.org/lhcb.pipe: [machinetype lhcb-prod] vm_model: deprecated: use machine_model"]
    machinetype, problems = build_machinetype("lhcb-prod", {"root_image": "a.iso", "max_processors": "0"}, settings)
    assert machinetype is None
    assert errors(problems) == [
        "<options>: [machinetype lhcb-prod] max_processors: '0' must be at least 1",
        "<options>: [machinetype lhcb-prod] user_data: required option not set",
    ]


# --- deprecated and obsolete names ---------------------------------------------------------------

DEPRECATED = [(kind, old, new) for kind, names in DEPRECATED_OPTIONS.items() for old, new in names.items()]
OBSOLETE = [(kind, old, why) for kind, names in OBSOLETE_OPTIONS.items() for old, why in names.items()]
SAMPLE_VALUES = {"processors_per_superslot": "4", "total_processors": "4", "machine_model": "cernvm4",
                 "image_signing_dn": "/DC=ch/.*"}


@pytest.mark.parametrize("kind, old, new", DEPRECATED, ids=[old for _, old, _ in DEPRECATED])
def test_deprecated_names_map_to_the_new_ones_with_one_warning(space, kind, old, new):
    value = SAMPLE_VALUES.get(new, "3")
    section = SETTINGS if kind == "settings" else SETTINGS + LHCB
    path = space.fragment("10.conf", f"{section}{old} = {value}\n")
    config, problems = space.load()
    line = section.count("\n") + 1
    label = "settings" if kind == "settings" else "machinetype lhcb"
    assert [str(problem) for problem in problems] == [f"{path}:{line}: [{label}] {old}: deprecated: use {new}"]
    target = config.settings if kind == "settings" else config.machinetypes["lhcb"]
    assert getattr(target, new) == SETTINGS_OPTIONS.get(new, MACHINETYPE_OPTIONS.get(new))(value)
    assert config.sources[(label, new)] == f"{path}:{line}"


@pytest.mark.parametrize("kind, old, why", OBSOLETE, ids=[f"{kind}-{old}" for kind, old, _ in OBSOLETE])
def test_obsolete_names_are_ignored_with_a_warning(space, kind, old, why):
    section = SETTINGS if kind == "settings" else SETTINGS + LHCB
    path = space.fragment("10.conf", f"{section}{old} = 1\n")
    config, problems = space.load()
    label = "settings" if kind == "settings" else "machinetype lhcb"
    assert config is not None
    assert [str(problem) for problem in problems] == [f"{path}:{section.count(chr(10)) + 1}: [{label}] {old}: {why}"]


def test_domain_type_is_a_real_setting_now(space):
    space.write(space.main, SETTINGS + "domain_type = qemu\n")
    config, problems = space.load()
    assert problems == [] and config.settings.domain_type == "qemu"


def test_old_and_new_name_in_one_file_is_a_duplicate_but_across_files_the_later_wins(space):
    path = space.fragment("10.conf", SETTINGS + "mb_per_cpu = 1000\nmb_per_processor = 2000\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:4: [settings] mb_per_processor: already set (as mb_per_cpu) at line 3 of this file"]
    space.fragment("10.conf", SETTINGS + "mb_per_cpu = 1000\n")
    space.fragment("20.conf", "[settings]\nmb_per_processor = 2000\n")
    assert load_ok(space).settings.mb_per_processor == 2000


def test_vmtype_sections_are_machinetypes_with_a_warning(space):
    path = space.fragment("10.conf", SETTINGS + LHCB.replace("machinetype", "vmtype"))
    config, problems = space.load()
    assert "lhcb" in config.machinetypes
    assert warnings(problems) == [f"{path}:3: [vmtype lhcb]: deprecated: use [machinetype lhcb]"]


# --- error classes -------------------------------------------------------------------------------


def test_missing_settings_section(space):
    main = space.write(space.main, LHCB)
    config, problems = space.load()
    assert config is None
    assert errors(problems) == [f"no [settings] section (read: {main}; also looked in {space.conf_dir})"]


def test_missing_vac_space(space):
    path = space.fragment("10.conf", "# settings\n[settings]\ndraining = yes\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:2: [settings] vac_space: required option not set"]


def test_factory_name_without_a_dot(space):
    path = space.fragment("10.conf", SETTINGS + "factory_name = wn001\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:3: [settings] factory_name: 'wn001' has no dot: give the fully qualified name"]
    space.fragment("10.conf", SETTINGS)
    _, problems = space.load(hostname="wn001")
    assert errors(problems) == [
        f"{path}:1: [settings] factory_name: this host's name 'wn001' is not a fully qualified domain name: set factory_name"]


@pytest.mark.parametrize("header, name", [("machinetype lhcb_prod", "lhcb_prod"), ("vacuum_pipe lhcb.prod", "lhcb.prod"),
                                          ("vmtype lhcb prod", "lhcb prod")])
def test_names_with_illegal_characters(space, header, name):
    path = space.fragment("10.conf", f"{SETTINGS}\n[{header}]\ntarget_share = 1\n")
    config, problems = space.load()
    assert config is None
    assert errors(problems) == [f"{path}:4: [{header}]: name {name!r} may only contain a-z, 0-9 and -"]


def test_section_names_are_lower_cased_as_in_classic_vac(space):
    space.fragment("10.conf", SETTINGS + LHCB.replace("lhcb", "LHCb"))
    assert list(load_ok(space).machinetypes) == ["lhcb"]


@pytest.mark.parametrize("low, high, message", [
    ("min_processors = 4", "max_processors = 2", "min_processors: 4 is more than max_processors (2)"),
    ("min_wallclock_seconds = 7200", "max_wallclock_seconds = 3600",
     "min_wallclock_seconds: 7200 is more than max_wallclock_seconds (3600)"),
    ("min_processors = 2", "", "min_processors: 2 is more than max_processors (1)"),
])
def test_minimum_above_maximum(space, low, high, message):
    path = space.fragment("10.conf", f"{SETTINGS}{LHCB}{low}\n{high}\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:6: [machinetype lhcb] {message}"]


def test_total_processors_cannot_exceed_the_host(space):
    path = space.fragment("10.conf", SETTINGS + "cpu_total = 16\n")
    _, problems = space.load(processor_count=8)
    assert errors(problems) == [f"{path}:3: [settings] cpu_total: 16 is more than the 8 processors of this host"]


def test_root_image_and_user_data_are_required(space):
    path = space.fragment("10.conf", SETTINGS + "[machinetype lhcb]\ntarget_share = 1\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:3: [machinetype lhcb] root_image: required option not set",
                                f"{path}:3: [machinetype lhcb] user_data: required option not set"]


def test_options_that_need_another(space):
    path = space.fragment("10.conf", SETTINGS + "gocdb_cert_file = /etc/cert.pem\ninitrd = /boot/initrd\n")
    _, problems = space.load()
    assert errors(problems) == [
        f"{path}:1: [settings] gocdb_key_file: gocdb_cert_file and gocdb_key_file must be given together",
        f"{path}:4: [settings] initrd: only used with kernel, which is not set"]


def test_unreadable_files(space, tmp_path):
    space.fragment("10.conf", SETTINGS)
    (space.conf_dir / "20-dangling.conf").symlink_to(tmp_path / "nowhere")
    space.main.mkdir()
    config, problems = space.load()
    assert config is None
    assert errors(problems) == [f"{space.conf_dir}/20-dangling.conf: cannot read: no such file",
                                f"{space.main}: cannot read: Is a directory"]


def test_unlistable_directory(tmp_path):
    not_a_dir = tmp_path / "vac.d"
    not_a_dir.write_text("")
    _, problems = load_config(ConfigPaths(str(not_a_dir), str(tmp_path / "x"), ()), **HOST)
    assert errors(problems)[0] == f"{not_a_dir}: cannot list directory: Not a directory"


def test_non_utf8_file(space):
    path = space.conf_dir / "10.conf"
    path.write_bytes(b"[settings]\nvac_space = vac01.example.org\ndescription = caf\xe9\n")
    _, problems = space.load()
    assert errors(problems)[0] == f"{path}:3: not UTF-8 text (byte 0xe9)"


def test_duplicate_option_in_one_file(space):
    path = space.fragment("10.conf", SETTINGS + "draining = yes\n\n[settings]\ndraining = no\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:6: [settings] draining: already set at line 3 of this file"]


@pytest.mark.parametrize("section, advice", [
    ("factories", "list the factories in the factories option of [settings]"),
    ("targetshares", "give target_share in each [machinetype NAME] section"),
])
def test_removed_sections(space, section, advice):
    path = space.fragment("10.conf", f"{SETTINGS}[{section}]\nnames = wn001\n")
    _, problems = space.load()
    assert errors(problems) == [f"{path}:3: [{section}]: a [{section}] section is no longer read: {advice}"]


def test_unknown_options_and_sections_are_located_warnings(space):
    path = space.fragment("10.conf", SETTINGS + LHCB + textwrap.dedent("""\
        max_wallclock_second = 10
        mb_per_processor = 1000
        colour = blue
        [settings]
        target_share = 2
        [monitoring]
        url = x
        [settings extra]
        """))
    config, problems = space.load()
    assert config is None  # [settings extra] is an error
    assert [str(problem) for problem in problems] == [
        f"{path}:6: [machinetype lhcb] max_wallclock_second: unknown option ignored (did you mean max_wallclock_seconds?)",
        f"{path}:7: [machinetype lhcb] mb_per_processor: unknown option ignored (it is a [settings] option)",
        f"{path}:8: [machinetype lhcb] colour: unknown option ignored",
        f"{path}:10: [settings] target_share: unknown option ignored (it is a [machinetype NAME] option)",
        f"{path}:11: [monitoring]: unknown section ignored",
        f"{path}:13: [settings extra]: [settings] takes no name",
    ]


def test_all_errors_of_all_files_are_reported_in_reading_order(space):
    first = space.fragment("10.conf", SETTINGS + "mb_per_processor = lots\ndraining = perhaps\n")
    second = space.fragment("20.conf", LHCB + "max_wallclock_seconds = ten\n")
    main = space.write(space.main, "[machinetype atlas]\nroot_image = a.iso\nuser_data = u\nmin_processors = x\n")
    _, problems = space.load()
    assert [(problem.file, problem.line) for problem in problems] == [
        (first, 3), (first, 4), (second, 4), (main, 4)]


def test_problem_fields_and_config_error(space):
    path = space.fragment("10.conf", SETTINGS + "mb_per_processor = lots\n")
    with pytest.raises(ConfigError) as raised:
        load_config_or_raise(space.paths, **HOST)
    (problem,) = raised.value.problems
    assert (problem.level, problem.file, problem.line, problem.section, problem.option, problem.message) == (
        "error", path, 3, "settings", "mb_per_processor", "'lots' is not an integer")
    assert str(raised.value) == f"{path}:3: [settings] mb_per_processor: 'lots' is not an integer"
    space.fragment("10.conf", SETTINGS)
    assert load_config_or_raise(space.paths, **HOST).settings.vac_space == "vac01.example.org"


def test_config_objects_are_immutable(space):
    space.fragment("10.conf", SETTINGS + LHCB)
    config = load_ok(space)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.draining = True
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.machinetypes["lhcb"].target_share = 1.0


# --- paths ---------------------------------------------------------------------------------------


def test_config_paths_defaults_and_from_args():
    assert ConfigPaths() == ConfigPaths("/etc/vac.d", "/etc/vac.conf", ("/run/vac.conf", "/var/run/vac.conf"))
    parser = argparse.ArgumentParser()
    configcli.add_config_arguments(parser)
    assert ConfigPaths.from_args(parser.parse_args([])) == ConfigPaths()
    args = parser.parse_args(["--conf-dir", "/d", "--conf", "/m.conf", "--run-conf", "/r.conf"])
    assert ConfigPaths.from_args(args) == ConfigPaths("/d", "/m.conf", ("/r.conf",))
    assert ConfigPaths(run_confs="/r.conf").run_confs == ("/r.conf",)


# --- examples and round trips --------------------------------------------------------------------


def example_paths(conf_dir: Path, main: Optional[Path] = None) -> ConfigPaths:
    return ConfigPaths(str(conf_dir), str(main or conf_dir / "absent.conf"), ())


def assert_round_trip(config: Config, tmp_path: Path) -> str:
    text = format_effective_config(config)
    again_path = tmp_path / "effective.conf"
    again_path.write_text(text)
    again, problems = load_config(ConfigPaths(str(tmp_path / "none"), str(again_path), ()), **HOST)
    assert problems == []
    assert (again.settings, again.machinetypes, again.vacuum_pipes) == (
        config.settings, config.machinetypes, config.vacuum_pipes)
    return text


def test_the_example_configuration_is_accepted_and_round_trips(tmp_path):
    config, problems = load_config(example_paths(REPO / "etc" / "vac.d"), **HOST)
    assert problems == []
    assert sorted(config.machinetypes) == ["atlas", "lhcb"]
    assert config.machinetypes["atlas"].user_data_options == (
        ("cvmfs_proxy", "http://atlas-squid.example.org:3128"), ("queue", "UKI-EXAMPLE_VAC"), ("site", "UKI-EXAMPLE"))
    text = assert_round_trip(config, tmp_path)
    settings_file = REPO / "etc" / "vac.d" / "10-settings.conf"
    line = line_of(str(settings_file), "vac_space =")
    assert any(row.startswith("vac_space") and row.endswith(f"; {settings_file}:{line}") for row in text.splitlines())
    assert any(row.startswith("udp_timeout_seconds") and row.endswith("; default") for row in text.splitlines())


def test_the_classic_configuration_is_accepted():
    classic = FIXTURES / "classic"
    config, problems = load_config(example_paths(classic / "vac.d", classic / "vac.conf"),
                                   hostname="wn001.example.org", processor_count=64)
    assert errors(problems) == []
    deprecated_here = {old for _, old, _ in DEPRECATED}
    obsolete_here = {"total_machines", "delete_old_files", "mb_per_machine", "rootpublickey",
                     "root_public_key", "user_data_proxy_cert", "user_data_proxy_key", "log_machineoutputs",
                     "tmp_binds", "container_command"}
    warned = [problem.option for problem in problems if problem.option]
    assert sorted(warned) == sorted(deprecated_here | obsolete_here | {"version_logger"})
    assert [problem.section for problem in problems if not problem.option] == ["vmtype lhcb"]
    settings = config.settings
    assert (settings.mb_per_processor, settings.hs06_per_processor, settings.total_processors,
            settings.overload_per_processor, settings.version_logger) == (3000, 10.0, 48, 1.5, 0)
    # vac.conf is read after vac.d: its deprecated spellings win there.
    assert (settings.processors_per_superslot, settings.disk_gb_per_processor) == (8, 50.0)
    lhcb = config.machinetypes["lhcb"]
    assert (lhcb.machine_model, lhcb.machines_dir_days, lhcb.image_signing_dn) == (
        "cernvm3", 5.0, "/DC=ch/DC=cern/OU=computers/CN=cvm-sign01.cern.ch")
    assert config.machinetypes["atlas"].user_data_files == (("hostcert", "hostcert.pem"),)
    assert config.vacuum_pipes["gridpp"].target_share == 2.0


def test_round_trip_of_unusual_values(space, tmp_path):
    space.write(space.main, SETTINGS + textwrap.dedent("""\
        description = two
          lines
        factories = . wn002@127.0.0.2:9995 wn003@[::1]:1 wn004@::1
        shutdown_time = 1800000000
        vacquery_address = ::1
        [vacuum_pipe p]
        vacuum_pipe_url = https://p.example.org/p
        vm_model = cernvm4
        [machinetype lhcb]
        root_image = https://x.example.org/a.iso
        user_data = /u
        min_wallclock_seconds = 60
        heartbeat_file = hb
        cvmfs_repositories = a.cern.ch b.cern.ch
        """))
    assert_round_trip(load_ok(space), tmp_path)


def test_man_page_documents_every_option():
    page = (REPO / "man" / "vac.conf.5").read_text().replace("\\-", "-")
    names = [*SETTINGS_OPTIONS, *MACHINETYPE_OPTIONS, "vacuum_pipe_url",
             *configmod.SETTINGS_PREFIXES, *(old for _, old, _ in DEPRECATED), *(old for _, old, _ in OBSOLETE)]
    assert [name for name in names if name not in page] == []


# --- vac conf ------------------------------------------------------------------------------------


def test_vac_conf_prints_the_effective_configuration(space, capsys):
    path = space.fragment("10.conf", SETTINGS + "factory_name = wn001.example.org\nmb_per_cpu = 1000\n" + LHCB)
    assert cli.main([*space.cli_options(), "conf"]) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert any(row.startswith("mb_per_processor") and "= 1000" in row and row.endswith(f"; {path}:4") for row in rows)
    assert "[machinetype lhcb]" in rows
    assert err == f"warning: {path}:4: [settings] mb_per_cpu: deprecated: use mb_per_processor\n"


def test_vac_conf_check_reports_every_broken_fragment_and_fails(space, capsys):
    first = space.fragment("10-settings.conf", SETTINGS + "factory_name = wn001.example.org\nmb_per_processor = lots\n")
    second = space.fragment("20-lhcb.conf", LHCB + "max_wallclock_seconds = ten\n")
    third = space.fragment("30-atlas.conf", "# atlas\n[machinetype atlas_prod]\nroot_image = a.iso\n")
    assert cli.main([*space.cli_options(), "conf", "--check"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"error: {first}:4: [settings] mb_per_processor: 'lots' is not an integer",
        f"error: {second}:4: [machinetype lhcb] max_wallclock_seconds: 'ten' is not an integer",
        f"error: {third}:2: [machinetype atlas_prod]: name 'atlas_prod' may only contain a-z, 0-9 and -",
    ]


def test_vac_conf_check_passes_with_warnings_only(space, capsys):
    space.fragment("10.conf", SETTINGS + "factory_name = wn001.example.org\ntotal_machines = 4\n")
    assert cli.main([*space.cli_options(), "conf", "--check"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("warning: ") and err.count("\n") == 1


def test_vac_conf_on_the_example_fragments(capsys):
    # The host may have no FQDN: give factory_name in a run-time file read last.
    run = FIXTURES / "factory-name.conf"
    code = cli.main(["--conf-dir", str(REPO / "etc" / "vac.d"), "--conf", os.devnull + ".absent",
                     "--run-conf", str(run), "conf", "--check"])
    assert (code, capsys.readouterr()) == (0, ("", ""))


# --- one schema for files and vacuum pipes --------------------------------------------------------


def test_each_option_is_declared_once_and_pipes_use_the_same_schema():
    from vac.content import pipes

    assert MACHINETYPE_OPTIONS == {name: spec.convert for name, spec in schema.MACHINETYPE_SCHEMA.items()}
    assert not hasattr(pipes, "OPTIONS")  # no second table
    kinds = {name: spec.kind for name, spec in schema.MACHINETYPE_SCHEMA.items()}
    assert (kinds["max_processors"], kinds["target_share"], kinds["legacy_proxy"], kinds["root_image"]) == (
        "integer", "number", "boolean", "text")


REMOTE_STRICTER = {"user_data"}  # the GOOD_MACHINETYPE value is a path under the files directory


@pytest.mark.parametrize("option, text, expected, extra", with_extra(GOOD_MACHINETYPE), ids=[case[0] for case in GOOD_MACHINETYPE])
def test_good_values_from_the_network_mean_what_they_mean_in_files(option, text, expected, extra):
    spec = schema.MACHINETYPE_SCHEMA[option]
    if not spec.remote_allowed:
        with pytest.raises(KeyError):
            schema.remote_option_value(option, text)
    elif option in REMOTE_STRICTER:
        with pytest.raises(ValueError):
            schema.remote_option_value(option, text)
    else:
        assert schema.remote_option_value(option, text) == expected


# Where the network's own rules (its JSON types, its stricter checks) refuse a BAD_MACHINETYPE
# value before the files' rule does, in their own words.
NETWORK_REFUSALS = {
    "root_image": "docker:// must name an image like registry.example.org/vo/pilot:1, not ''",
    "user_data": "URL must be http or https: '../secret'",
    "target_share": "must be between 0 and 1000000000",
    "machine_model": "must be one of cernvm3, cernvm4, vm-raw, docker, podman, singularity, apptainer, not 'lxc'",
    "user_data_proxy": "must be true or false, not 'y'",
    "legacy_proxy": "must be true or false, not 'n'",
    "min_processors": "must be between 1 and 4096",
    "max_processors": "must be an integer, not a string",
    "max_wallclock_seconds": "must be an integer, not a string",
    "min_wallclock_seconds": "must be between 0 and 100000000",
    "backoff_seconds": "must be an integer, not a string",
    "fizzle_seconds": "must be an integer, not a string",
    "heartbeat_file": "must be a plain file name, not 'logs/heartbeat'",
    "heartbeat_seconds": "must be between 0 and 10000000",
    "disk_gb_per_processor": "must be between 0.001 and 100000",
    "cvmfs_repositories": "repository names must be like lhcb.cern.ch, not '/cvmfs/x'",
}


@pytest.mark.parametrize("option, text, message", BAD_MACHINETYPE, ids=[case[0] for case in BAD_MACHINETYPE])
def test_what_files_refuse_the_network_refuses_too(option, text, message):
    if not schema.MACHINETYPE_SCHEMA[option].remote_allowed:
        with pytest.raises(KeyError):
            schema.remote_option_value(option, text)
    else:
        with pytest.raises(ValueError) as refused:
            schema.remote_option_value(option, text)
        assert str(refused.value) == NETWORK_REFUSALS.get(option, message)


@pytest.mark.parametrize("option, text, message", [
    ("root_image", "/var/lib/images/cernvm.iso", "URL must be http or https"),
    ("root_image", "http://127.0.0.1/cernvm.iso", "local or link-local"),
    ("user_data", "/etc/shadow", "URL must be http or https"),
    ("heartbeat_file", ".hidden", "must be a plain file name"),
    ("max_processors", "5000", "must be between 1 and 4096"),
    ("max_wallclock_seconds", "100000001", "must be between 1 and 100000000"),
    ("target_share", "1e12", "must be a number, not a string"),
    ("accounting_fqan", "/lhcb" * 60, "longer than 256"),
    ("image_signing_dn", "/CN=Jos\u00e9", "control or non-ASCII"),
    ("disk_gb_per_processor", "0.0001", "must be between 0.001 and 100000"),
    ("root_image", "docker://localhost:5000/lhcb/pilot", "local or link-local"),
    ("root_image", "docker://169.254.169.254/pilot", "local or link-local"),
    ("root_image", "docker://LHCb/Pilot", "must name an image like"),
    ("container_command", "/user_data --site=Jos\u00e9", "control or non-ASCII"),
    ("tmp_binds", "/scratch /etc/jobfeatures", "may not bind"),
    ("tmp_binds", " ".join(f"/s{n}" for n in range(17)), "more than 16 paths"),
])
def test_the_remote_mode_is_stricter(option, text, message):
    text = text.encode().decode("unicode_escape")
    MACHINETYPE_OPTIONS[option](text)  # fine in a configuration file
    with pytest.raises(ValueError, match=re.escape(message)):
        schema.remote_option_value(option, text)


@pytest.mark.parametrize("option, text", [
    ("max_wallclock_seconds", "0"),  # pipes allowed 0; files never did
    ("root_device", "v" * 17),  # files allowed any length; pipes at most 16
    ("cvmfs_repositories", "a" * 129),  # likewise at most 128
    ("accounting_fqan", "/lhcb/Role=x;y"),  # files allowed any non-blank text after a /
])
def test_disagreements_between_files_and_pipes_are_settled_on_the_stricter_rule(option, text):
    with pytest.raises(ValueError):
        MACHINETYPE_OPTIONS[option](text)
    with pytest.raises(ValueError):
        schema.remote_option_value(option, text)


@pytest.mark.parametrize("option, value, expected", [
    ("max_processors", 4, 4), ("max_processors", 4.0, 4), ("max_processors", " 4 ", 4),
    ("target_share", 2, 2.0), ("target_share", "2.5", 2.5),
    ("user_data_proxy", True, True), ("user_data_proxy", "yes", True), ("legacy_proxy", False, False),
])
def test_json_values_of_the_right_type(option, value, expected):
    assert schema.remote_option_value(option, value) == expected


@pytest.mark.parametrize("option, value, message", [
    ("max_processors", True, "must be an integer, not a boolean"),
    ("max_processors", 2.5, "must be an integer, not 2.5"),
    ("max_processors", "lots", "must be an integer, not a string"),
    ("target_share", [1], "must be a number, not an array"),
    ("user_data_proxy", 1, "must be true or false, not an integer"),
    ("root_image", 42, "must be a string, not an integer"),
    ("root_image", "x" * 70000, "is longer than 65536 characters"),
])
def test_json_values_of_the_wrong_type(option, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schema.remote_option_value(option, value)


def test_option_families_from_the_network():
    assert schema.remote_pair_value("user_data_option_", "queue", "default") == "default"
    with pytest.raises(ValueError, match="contains a NUL character"):
        schema.remote_pair_value("user_data_option_", "queue", "a\0b")
    with pytest.raises(ValueError, match="must be a plain file name"):
        schema.remote_pair_value("user_data_file_", "hostkey", "/etc/grid-security/hostkey.pem")
    with pytest.raises(ValueError, match="followed by a-z, 0-9 or _"):
        schema.remote_pair_value("user_data_option_", "x" * 65, "v")

