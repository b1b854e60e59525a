"""Packaging: the RPM built from this tree, the systemd units, tmpfiles, logrotate, Puppet module."""

import configparser
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests import tiers
from tests.packages import REPO, SPEC, build_rpms
from vac import __version__
from vac.records.store import SUBDIRECTORIES

UNIT_DIR = REPO / "etc" / "systemd"
UNITS = sorted(path.name for path in UNIT_DIR.iterdir() if path.suffix in (".service", ".timer"))


def run(argv: list, **options) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **options)


def spec_value(name: str) -> str:
    return re.search(rf"^%global {name} (.+)$", SPEC.read_text(), re.MULTILINE).group(1).strip()


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT_DIR / name)
    return parser


# --- pure checks of the sources -----------------------------------------------------------------

def test_spec_version_is_the_package_version():
    version = re.search(r"^Version:\s*(\S+)$", SPEC.read_text(), re.MULTILINE).group(1)
    assert version == __version__


def test_spec_installs_every_unit_and_state_directory():
    assert sorted(spec_value("units").split() + spec_value("vcycle_units").split()) == UNITS
    assert sorted(spec_value("statedirs").split()) == sorted(SUBDIRECTORIES)


def test_vacd_unit_matches_the_daemon():
    service = read_unit("vacd.service")["Service"]
    assert service["Type"] == "notify"
    assert service["KillMode"] == "process"  # VMs and helpers survive restarts
    assert reload_commands("vacd.service") == ["/usr/sbin/vacd --check-config $VACD_OPTIONS",
                                               "/bin/kill -HUP $MAINPID"]
    assert int(service["WatchdogSec"].rstrip("s")) >= 120
    assert service["ExecStart"].startswith("/usr/sbin/vacd ")
    assert "--daemon" not in service["ExecStart"]


def reload_commands(name: str) -> list:
    """A unit's ExecReload= lines in order (configparser would keep only the last)."""
    return re.findall(r"^ExecReload=(.*)$", (UNIT_DIR / name).read_text(), re.MULTILINE)


def test_a_reload_checks_the_configuration_before_signalling():
    assert reload_commands("vcycled.service") == ["/usr/sbin/vcycled --check-config $VCYCLED_OPTIONS",
                                                  "/bin/kill -HUP $MAINPID"]


def test_timers_replace_the_cron_file():
    assert read_unit("vac-apel-sync.timer")["Timer"]["OnCalendar"] == "*-*-* 12:00:00"
    ssmsend = read_unit("vac-ssmsend.timer")["Timer"]
    assert ssmsend["OnCalendar"] == "hourly" and ssmsend["RandomizedDelaySec"] == "3600"
    assert read_unit("vac-ssmsend.service")["Service"]["ExecStart"] == "/usr/bin/ssmsend -c /etc/apel/vac-ssmsend-prod.cfg"


def test_ssmsend_configuration_reads_our_queue():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "etc" / "apel" / "vac-ssmsend-prod.cfg")
    assert parser["sender"]["protocol"] == "AMS"
    assert parser["messaging"]["path"] == "/var/lib/vac/apel-outgoing"
    assert parser["messaging"]["path_type"] == "dirq"
    assert parser["messaging"]["destination"] == "gLite-APEL"


# --- tools that check the files for real ---------------------------------------------------------

@pytest.mark.component
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    # verify insists that executables exist: point the units at stand-ins.
    stand_ins = {}
    for command in ("/usr/sbin/vacd", "/usr/sbin/vcycled", "/usr/bin/vac", "/usr/bin/ssmsend"):
        stand_in = tmp_path / "bin" / Path(command).name
        stand_in.parent.mkdir(exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        stand_ins[command] = str(stand_in)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        for command, stand_in in stand_ins.items():
            text = re.sub(rf"{re.escape(command)}(?=\s|$)", stand_in, text)
        (units / name).write_text(text)
    done = run(["systemd-analyze", "verify", "--man=no", *(f"./{name}" for name in UNITS)], cwd=units)
    # verify exits 0 on unknown keys and bad values; any message at all is a defect.
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


@pytest.mark.component
@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles not installed")
def test_tmpfiles_create_the_state_layout(tmp_path):
    done = run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(REPO / "etc" / "tmpfiles.d" / "vac.conf")])
    assert done.returncode == 0, done.stderr
    for directory in ["run/vac", "var/lib/vac", *(f"var/lib/vac/{name}" for name in SUBDIRECTORIES)]:
        mode = (tmp_path / directory).stat().st_mode
        assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o755, directory


@pytest.mark.component
@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate not installed")
def test_logrotate_configuration_parses(tmp_path):
    done = run(["logrotate", "--debug", "--state", str(tmp_path / "state"), str(REPO / "etc" / "logrotate.d" / "vac")])
    assert done.returncode == 0, done.stderr
    assert "error" not in (done.stdout + done.stderr).lower()


PUPPET_MODULE = REPO / "etc" / "puppet" / "vac"


@pytest.fixture
def puppet() -> str:
    """The puppet command; CI installs it with the systemd tier's tools, which must not skip."""
    found = shutil.which("puppet")
    if found is None:
        tiers.require(tiers.SYSTEMD, "puppet not installed")
    return found


@pytest.mark.component
def test_puppet_module_validates(puppet):
    manifests = sorted(str(path) for path in PUPPET_MODULE.rglob("*.pp"))
    done = run([puppet, "parser", "validate", *manifests])
    assert done.returncode == 0, done.stdout + done.stderr
    templates = sorted(str(path) for path in PUPPET_MODULE.rglob("*.epp"))
    done = run([puppet, "epp", "validate", *templates])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.component
def test_puppet_templates_render_valid_fragments(puppet):
    settings = run([puppet, "epp", "render", str(PUPPET_MODULE / "templates" / "settings.conf.epp"), "--values",
                    "{space => 'vac01.example.org', factories => ['f1.example.org', 'f2.example.org@127.0.0.2'],"
                    " settings => {'total_processors' => 4, 'gocdb_sitename' => 'UKI-X'}}"])
    machinetype = run([puppet, "epp", "render", str(PUPPET_MODULE / "templates" / "machinetype.conf.epp"), "--values",
                       "{name => 'lhcb', options => {'target_share' => 1.5, 'user_data' => 'https://example.org/u'}}"])
    assert settings.returncode == 0 and machinetype.returncode == 0, settings.stderr + machinetype.stderr
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(settings.stdout + "\n" + machinetype.stdout)
    assert dict(parser["settings"]) == {
        "vac_space": "vac01.example.org", "factories": "f1.example.org f2.example.org@127.0.0.2",
        "gocdb_sitename": "UKI-X", "total_processors": "4",
    }
    assert dict(parser["machinetype lhcb"]) == {"target_share": "1.5", "user_data": "https://example.org/u"}


# --- the RPM ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rpms(tmp_path_factory) -> dict:
    if shutil.which("rpmbuild") is None:
        # .ci/run installs rpm with the systemd tier's tools, whose tier builds these RPMs too.
        tiers.require(tiers.SYSTEMD, "rpmbuild not installed")
    built = build_rpms(tmp_path_factory.mktemp("rpmbuild"))
    assert set(built) == {"vac", "vac-command", "vac-vcycle"}, built
    return built


def query(rpm: Path, *options: str) -> str:
    done = run(["rpm", "-qp", *options, str(rpm)])
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.component
def test_rpm_metadata(rpms):
    info = query(rpms["vac"], "-i")
    fields = dict(re.findall(r"^(\w[\w ]*?)\s*: (.*)$", info, re.MULTILINE))
    assert fields["Name"] == "vac"
    assert fields["Version"] == __version__
    assert fields["Architecture"] == "noarch"
    assert fields["License"] == "BSD-2-Clause"
    requires = set(query(rpms["vac"], "--requires").split("\n"))
    for package in ("python3-libvirt", "python3-requests", "python3-pyOpenSSL", "python3-daemon",
                    "python3-aiohttp", "python3dist(prometheus-client)", "libvirt", "qemu-kvm", "dnsmasq", f"vac-command = {__version__}-1"):
        assert package in requires
    assert "apel-ssm" in query(rpms["vac"], "--recommends")
    assert "python3-cryptography" in query(rpms["vac-command"], "--requires")


@pytest.mark.component
def test_rpm_file_lists(rpms):
    daemon_files = set(query(rpms["vac"], "-l").split())
    for path in ["/usr/sbin/vacd", "/usr/sbin/check-vacd", "/etc/apel/vac-ssmsend-prod.cfg",
                 "/etc/logrotate.d/vac", "/etc/sysconfig/vacd", "/var/lib/vac", "/var/lib/vac/machines",
                 "/var/lib/vac/apel-outgoing", "/usr/share/vac/puppet/vac/manifests/init.pp",
                 "/usr/lib/systemd/system-preset/50-vac.preset",
                 *(f"/usr/lib/systemd/system/{unit}" for unit in UNITS if unit != "vcycled.service")]:
        assert path in daemon_files
    assert any(re.fullmatch(r"/usr/share/man/man8/vacd\.8(\.gz)?", path) for path in daemon_files)
    assert any(re.fullmatch(r"/usr/share/man/man8/check-vacd\.8(\.gz)?", path) for path in daemon_files)

    command_files = set(query(rpms["vac-command"], "-l").split())
    assert "/usr/bin/vac" in command_files and "/usr/bin/vacd" not in command_files
    assert "/usr/lib/tmpfiles.d/vac.conf" in command_files and "/etc/vac.d" in command_files
    assert any(re.fullmatch(r"/usr/lib/python3[.\d]*/site-packages/vac/cli/check\.py", path) for path in command_files)
    assert any(re.fullmatch(r"/usr/share/man/man1/vac\.1(\.gz)?", path) for path in command_files)
    assert not daemon_files & command_files
    vcycle_files = set(query(rpms["vac-vcycle"], "-l").split())
    assert {"/usr/sbin/vcycled", "/usr/lib/systemd/system/vcycled.service", "/etc/vcycle.d",
            "/var/lib/vcycle"} <= vcycle_files
    assert not vcycle_files & (daemon_files | command_files)


@pytest.mark.component
def test_rpm_configuration_and_scriptlets(rpms):
    config_files = set(query(rpms["vac"], "-c").split())
    assert {"/etc/apel/vac-ssmsend-prod.cfg", "/etc/logrotate.d/vac", "/etc/sysconfig/vacd"} <= config_files
    scripts = query(rpms["vac"], "--scripts")
    assert "systemctl" in scripts and "vacd.service" in scripts and "systemd-tmpfiles" in scripts
