import configparser
import datetime
import os
import stat

import pytest

from vac.cli import main as cli
from vac.cli.operator import (
    OpsError,
    clear_draining,
    edit_settings,
    parse_time,
    resolve_factory,
    set_draining,
    squid_conf,
    unique_paths,
    write_if_changed,
)
from vac.core.config import FactoryAddress

NOW = 1_800_000_000


def settings_of(text: str) -> dict:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(text)
    return dict(parser["settings"]) if parser.has_section("settings") else {}


# --- times ---------------------------------------------------------------------------------------

def test_parse_time_forms():
    assert parse_time(str(NOW + 60), NOW) == NOW + 60
    assert parse_time("+90", NOW) == NOW + 90
    assert parse_time("+90m", NOW) == NOW + 5400
    assert parse_time("+2h", NOW) == NOW + 7200
    assert parse_time("+1d", NOW) == NOW + 86400
    assert parse_time("2027-01-15T12:00:00+00:00", NOW) == 1800014400
    assert parse_time("2027-01-15 13:00+01:00", NOW) == 1800014400
    local = datetime.datetime(2027, 1, 15, 12, 0).timestamp()
    assert parse_time("2027-01-15 12:00", NOW) == int(local)


@pytest.mark.parametrize("text", ["tomorrow", "+5y", "15/01/2027", ""])
def test_parse_time_rejects_garbage(text):
    with pytest.raises(OpsError, match="cannot understand time"):
        parse_time(text, NOW)


@pytest.mark.parametrize("text", [str(NOW), "+0h", "2020-01-01 00:00"])
def test_parse_time_rejects_the_past(text):
    with pytest.raises(OpsError, match="not in the future"):
        parse_time(text, NOW)


# --- editing the run-time file -------------------------------------------------------------------

def test_edit_empty_file():
    assert edit_settings("", {"draining": "yes"}) == "[settings]\ndraining = yes\n"


def test_edit_preserves_other_content_and_replaces_old_values():
    text = (
        "# pre-reboot drain, ask Ann\n"
        "[settings]\n"
        "total_processors = 4\n"
        "Draining: no\n"
        "shutdown_time = 1\n"
        "  continued\n"
        "\n"
        "[machinetype lhcb]\n"
        "draining = kept, not a settings option\n"
        "[settings]\n"
        "draining = no\n"
    )
    edited = edit_settings(text, {"draining": "yes", "shutdown_time": "1800003600"})
    assert edited == (
        "# pre-reboot drain, ask Ann\n"
        "[settings]\n"
        "draining = yes\n"
        "shutdown_time = 1800003600\n"
        "total_processors = 4\n"
        "\n"
        "[machinetype lhcb]\n"
        "draining = kept, not a settings option\n"
        "[settings]\n"
    )
    assert settings_of(edited) == {"draining": "yes", "shutdown_time": "1800003600", "total_processors": "4"}


def test_edit_appends_a_settings_section_when_there_is_none():
    edited = edit_settings("[machinetype lhcb]\ntarget_share = 1\n", {"draining": "yes"})
    assert edited == "[machinetype lhcb]\ntarget_share = 1\n\n[settings]\ndraining = yes\n"


def test_drain_and_undrain_round_trip(tmp_path):
    path = tmp_path / "vac.conf"
    path.write_text("[settings]\ntotal_processors = 4\n")
    set_draining(str(path), NOW + 3600)
    assert settings_of(path.read_text()) == {"draining": "yes", "shutdown_time": str(NOW + 3600), "total_processors": "4"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    set_draining(str(path))  # draining again keeps an earlier deadline
    assert settings_of(path.read_text())["shutdown_time"] == str(NOW + 3600)
    assert clear_draining(str(path)) is True
    assert path.read_text() == "[settings]\ntotal_processors = 4\n"
    assert clear_draining(str(path)) is False


def test_undrain_removes_a_file_left_empty(tmp_path):
    path = tmp_path / "vac.conf"
    set_draining(str(path))
    assert path.read_text() == "[settings]\ndraining = yes\n"
    assert clear_draining(str(path)) is True
    assert not path.exists()
    assert clear_draining(str(path)) is False


def test_unwritable_location_is_a_clear_error(tmp_path):
    with pytest.raises(OpsError, match="cannot write"):
        set_draining(str(tmp_path / "missing" / "vac.conf"))


def test_unique_paths_follows_symlinks(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "var-run").symlink_to(tmp_path / "run")
    paths = [str(tmp_path / "run" / "vac.conf"), str(tmp_path / "var-run" / "vac.conf")]
    assert unique_paths(paths) == paths[:1]


def test_cli_drain_until_and_undrain(tmp_path, capsys):
    path = tmp_path / "vac.conf"
    assert cli.main(["--run-conf", str(path), "drain", "--until", "+2h"]) == 0
    values = settings_of(path.read_text())
    assert values["draining"] == "yes"
    assert 7000 < int(values["shutdown_time"]) - datetime.datetime.now().timestamp() <= 7200
    assert f"shutdown_time = {values['shutdown_time']}" in capsys.readouterr().out
    assert cli.main(["--run-conf", str(path), "undrain"]) == 0
    assert not path.exists()
    assert "No longer draining" in capsys.readouterr().out
    assert cli.main(["--run-conf", str(path), "undrain"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_cli_drain_with_bad_time_writes_nothing(tmp_path, capsys):
    path = tmp_path / "vac.conf"
    assert cli.main(["--run-conf", str(path), "drain", "--until", "yesterday"]) == 1
    assert "vac drain: cannot understand time 'yesterday'" in capsys.readouterr().err
    assert not path.exists()


# --- squid-conf ----------------------------------------------------------------------------------

TEMPLATE = "http_port 3128\nacl localnet src 169.254.169.0/24\n"


def test_squid_conf_lists_every_factory_and_peers_with_the_others():
    factories = [("f1.example.org", "127.0.0.11"), ("F2.example.org", "127.0.0.12"), ("f3.example.org", "::1")]
    assert squid_conf(TEMPLATE, factories, "f2.example.org") == (
        TEMPLATE
        + "\n# Added by vac squid-conf: the factories of this space\n"
        "acl localnet src 127.0.0.11/32\n"
        "acl localnet src 127.0.0.12/32\n"
        "acl localnet src ::1/128\n"
        "cache_peer 127.0.0.11 sibling 3128 3130 default\n"
        "cache_peer ::1 sibling 3128 3130 default\n"
    )


def test_write_if_changed(tmp_path):
    path = tmp_path / "squid.conf"
    assert write_if_changed(str(path), "a\n") is True
    os.utime(path, (1, 1))
    assert write_if_changed(str(path), "a\n") is False
    assert path.stat().st_mtime == 1
    assert write_if_changed(str(path), "b\n") is True
    assert path.read_text() == "b\n"


def test_resolve_factory():
    assert resolve_factory(FactoryAddress("f1.example.org", "127.0.0.11")) == "127.0.0.11"
    assert resolve_factory(FactoryAddress("localhost")) == "127.0.0.1"
    with pytest.raises(OpsError, match="cannot resolve factory bad..name"):
        resolve_factory(FactoryAddress("bad..name"))  # invalid label: fails before any lookup


def write_space_config(tmp_path, factories: str):
    conf = tmp_path / "vac.conf"
    conf.write_text(f"[settings]\nvac_space = vac01.example.org\nfactory_name = f1.example.org\nfactories = {factories}\n")
    return ["--conf", str(conf), "--conf-dir", str(tmp_path / "vac.d"), "--run-conf", str(tmp_path / "run.conf")]


def test_cli_squid_conf_unreadable_template(tmp_path, capsys):
    assert cli.main(["squid-conf", str(tmp_path / "absent"), str(tmp_path / "out")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_squid_conf_writes_only_when_changed(tmp_path, capsys):
    options = write_space_config(tmp_path, "f1.example.org@127.0.0.11 f2.example.org@127.0.0.12")
    template, output = tmp_path / "squid.conf.vac", tmp_path / "squid.conf"
    template.write_text(TEMPLATE)
    assert cli.main([*options, "squid-conf", str(template), str(output)]) == 0, capsys.readouterr().err
    text = output.read_text()
    assert "acl localnet src 127.0.0.11/32" in text and "cache_peer 127.0.0.12 sibling 3128 3130 default" in text
    assert "cache_peer 127.0.0.11" not in text
    os.utime(output, (1, 1))
    assert cli.main([*options, "squid-conf", str(template), str(output)]) == 0
    assert output.stat().st_mtime == 1


def test_cli_squid_conf_output_not_writable(tmp_path, capsys):
    options = write_space_config(tmp_path, "f1.example.org@127.0.0.11")
    template = tmp_path / "squid.conf.vac"
    template.write_text(TEMPLATE)
    assert cli.main([*options, "squid-conf", str(template), str(tmp_path / "no" / "squid.conf")]) == 2
    assert "cannot write" in capsys.readouterr().err
