"""vcycle's configuration: classic files load unchanged, broken ones give located problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from vac.cli import vcycle as vcycle_cli
from vac.core.config import ConfigPaths
from vac.core.vcycleconfig import UNBOUNDED_PROCESSORS, load_vcycle_config

CLASSIC = """\
[space lhcb.cern.ch]
api = openstack
api_version = 3
url = https://keystone.example.org:5000/v3
tenancy_name = LHCb
username = vcycle
password_base64 = c2VjcmV0LXBhc3N3b3Jk
region = CERN
zones = az1 az2
flavor_names = m1.medium m1.large
max_processors = 100
glance_api = 2

[machinetype lhcb.cern.ch lhcbpilot]
root_image = cernvm.iso
user_data = user_data
target_share = 1
backoff_seconds = 600
fizzle_seconds = 600
heartbeat_file = heartbeat
heartbeat_seconds = 600
x509dn = /DC=ch/DC=cern
user_data_option_queue = default
processors_per_machine = 2
root_public_key = /root/.ssh/id_rsa.pub

[vacuum_pipe lhcb.cern.ch atlas]
vacuum_pipe_url = https://pipes.example.org/atlas.pipe
target_share = 2

[space aws.example.org]
api = ec2
url = https://ec2.eu-west-1.amazonaws.com
region = eu-west-1
access_key = AKIAEXAMPLE
secret_key = aws-secret-value
flavor_names = t2.micro

[machinetype aws.example.org test]
root_image = image:ami-1234
user_data = user_data
backoff_seconds = 10
fizzle_seconds = 10
"""


def load(tmp_path: Path, text: str, fragment: str = ""):
    conf_dir = tmp_path / "vcycle.d"
    conf_dir.mkdir(exist_ok=True)
    if fragment:
        (conf_dir / "10-site.conf").write_text(fragment)
    main = tmp_path / "vcycle.conf"
    main.write_text(text)
    return load_vcycle_config(ConfigPaths(str(conf_dir), str(main), ()), hostname="vcycle.example.org")


def test_classic_file_loads_unchanged(tmp_path: Path) -> None:
    config, problems = load(tmp_path, CLASSIC)
    assert config is not None, [str(p) for p in problems]
    assert all(not p.is_error for p in problems)
    warnings = {(p.line, p.option, p.message) for p in problems}
    assert (11, "max_processors", "deprecated: use processors_limit") in warnings
    assert (5, "tenancy_name", "deprecated: use project_name") in warnings

    space = config.spaces["lhcb.cern.ch"]
    assert (space.api, space.project_name, space.password, space.region) == ("openstack", "LHCb", "secret-password", "CERN")
    assert space.processors_limit == 100 and space.zones == ("az1", "az2")
    assert "secret-password" not in repr(space)
    pilot = space.machinetypes["lhcbpilot"]
    assert pilot.machinetype.min_processors == 2 and pilot.machinetype.max_processors == UNBOUNDED_PROCESSORS
    assert pilot.https_x509dn == "/DC=ch/DC=cern" and pilot.root_public_key == "/root/.ssh/id_rsa.pub"
    assert pilot.machinetype.user_data_options == (("queue", "default"),)
    assert pilot.machinetype.machinetype_path == "/var/lib/vcycle/spaces/lhcb.cern.ch/machinetypes/lhcbpilot"
    assert space.vacuum_pipes["atlas"].target_share == 2.0

    aws = config.spaces["aws.example.org"]
    assert (aws.api, aws.access_key, aws.secret_key, aws.flavor_names) == ("ec2", "AKIAEXAMPLE", "aws-secret-value", ("t2.micro",))
    assert aws.machinetypes["test"].machinetype.root_image == "image:ami-1234"


def test_fragments_are_read_first_and_the_main_file_wins(tmp_path: Path) -> None:
    fragment = "[space lhcb.cern.ch]\nregion = OTHER\nhttps_port = 8443\n"
    config, problems = load(tmp_path, CLASSIC, fragment)
    assert config is not None
    space = config.spaces["lhcb.cern.ch"]
    assert space.region == "CERN" and space.https_port == 8443


BROKEN = """\
[space s.example.org]
api = openstack
url = not-a-url
username = u
password_base64 = !!!
api_version = 2

[machinetype s.example.org a]
root_image = image:x
user_data = user_data
min_processors = 4
max_processors = 2
backoff_seconds = 10

[machinetype nospace.example.org b]
root_image = x
user_data = y

[cloud s.example.org]
[space e.example.org]
api = ec2
url = https://ec2.example.org
access_key = a
secret_key = b
[machinetype e.example.org m]
root_image = /images/x.img
user_data = u
backoff_seconds = 1
fizzle_seconds = 1
[space empty.example.org]
api = azure
api = ec2
"""


def test_broken_file_gives_located_errors(tmp_path: Path) -> None:
    config, problems = load(tmp_path, BROKEN)
    assert config is None
    main = str(tmp_path / "vcycle.conf")
    errors = {(p.line, p.section, p.option, p.message) for p in problems if p.is_error}
    expected = {
        (3, "space s.example.org", "url", "'not-a-url' is not an http:// or https:// URL"),
        (5, "space s.example.org", "password_base64", "is not base64-encoded UTF-8 text"),
        (6, "space s.example.org", "api_version", "'2': Keystone v2 is not supported (clouds have removed it); use 3"),
        (1, "space s.example.org", "project_name", "required option not set"),
        (11, "machinetype s.example.org a", "min_processors", "4 is more than max_processors (2)"),
        (8, "machinetype s.example.org a", "fizzle_seconds", "required option not set"),
        (15, "machinetype nospace.example.org b", None, "no [space nospace.example.org] section"),
        (19, "cloud s.example.org", None, "unknown section: vcycle reads [space S], [machinetype S M] and [vacuum_pipe S P]"),
        (32, "space empty.example.org", "api", "already set at line 31 of this file"),
        (31, "space empty.example.org", "api", "'azure' is not supported by this version (use openstack or ec2)"),
        (30, "space empty.example.org", None, "a space needs at least one [machinetype SPACE NAME] or [vacuum_pipe SPACE PREFIX]"),
    }
    assert expected <= errors, sorted(map(str, expected - errors))
    assert all(p.file == main for p in problems if p.is_error)
    assert any(p.message.startswith("machinetype m: EC2 needs root_image = image:AMI-ID") for p in problems)


def test_vcycle_conf_check_reports_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "vcycle.conf").write_text(BROKEN)
    status = vcycle_cli.main(["--conf-dir", str(tmp_path / "none"), "--conf", str(tmp_path / "vcycle.conf"),
                              "conf", "--check"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert f"error: {tmp_path}/vcycle.conf:3: [space s.example.org] url: 'not-a-url' is not" in err


def test_vcycle_conf_shows_sources_and_hides_secrets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "vcycle.conf").write_text(CLASSIC)
    status = vcycle_cli.main(["--conf-dir", str(tmp_path / "none"), "--conf", str(tmp_path / "vcycle.conf"), "conf"])
    out, err = capsys.readouterr()
    assert status == 0
    assert "[machinetype lhcb.cern.ch lhcbpilot]" in out
    assert "region = CERN" in out and f"; {tmp_path}/vcycle.conf:8" in out
    assert "secret-password" not in out and "aws-secret-value" not in out and "password = (set)" in out
    assert "deprecated: use processors_limit" in err


def test_preemptible_machinetypes_need_grace_secs(tmp_path: Path) -> None:
    config, _ = load(tmp_path, CLASSIC + "preemptible = true\ngrace_secs = 120\n")
    test = config.spaces["aws.example.org"].machinetypes["test"]
    assert (test.preemptible, test.grace_secs) == (True, 120)
    config, problems = load(tmp_path, CLASSIC + "preemptible = true\n")
    assert config is None
    assert [(p.option, p.is_error) for p in problems if "grace_secs" in p.message] == [("grace_secs", True)]
    # unlike Vcycle 02, "false" is false
    config, _ = load(tmp_path, CLASSIC + "preemptible = false\n")
    assert config.spaces["aws.example.org"].machinetypes["test"].preemptible is False


def test_cvmfs_proxy_machinetype_names_a_heartbeating_machinetype_of_its_space(tmp_path: Path) -> None:
    squid = ("\n[machinetype lhcb.cern.ch squid]\nroot_image = squid.img\nuser_data = user_data\n"
             "backoff_seconds = 60\nfizzle_seconds = 60\nheartbeat_file = heartbeat\nheartbeat_seconds = 300\n")
    config, problems = load(tmp_path, CLASSIC.replace("processors_per_machine = 2\n", "processors_per_machine = 2\n"
                                                      "cvmfs_proxy_machinetype = squid\n") + squid)
    assert config is not None and not [p for p in problems if "cvmfs" in (p.option or "")]
    assert config.spaces["lhcb.cern.ch"].machinetypes["lhcbpilot"].cvmfs_proxy_source == ("squid", 280)

    # Another space's machinetype, a bad port, or one without heartbeats: located at the option.
    config, problems = load(tmp_path, CLASSIC + "cvmfs_proxy_machinetype = lhcbpilot:3128\n")
    assert config is None
    line = CLASSIC.count("\n") + 1
    assert [(p.line, p.section, p.option, p.message) for p in problems if p.is_error] == [
        (line, "machinetype aws.example.org test", "cvmfs_proxy_machinetype",
         "lhcbpilot is not a machinetype of space aws.example.org")]
    config, problems = load(tmp_path, CLASSIC + "cvmfs_proxy_machinetype = test:70000\n")
    assert config is None and any("70000" in p.message for p in problems if p.option == "cvmfs_proxy_machinetype")
    config, problems = load(tmp_path, CLASSIC + "cvmfs_proxy_machinetype = test:3128\n")
    assert config is not None
    assert [p.message for p in problems if p.option == "cvmfs_proxy_machinetype"] == [
        "machinetype test sets no heartbeat_file and heartbeat_seconds, so it never has machines to list: "
        "the configured user_data_option_cvmfs_proxy is used"]
    # A vacuum pipe's machinetype is known only once the pipe is read.
    config, problems = load(tmp_path, CLASSIC.replace("processors_per_machine = 2\n", "processors_per_machine = 2\n"
                                                      "cvmfs_proxy_machinetype = atlas-squid\n"))
    assert config is not None
