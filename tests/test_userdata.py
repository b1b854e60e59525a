"""user_data: every §8.2 substitution, one-pass semantics, files and templates (local, and
remote from a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.localhttp import LocalHTTPServer, Route
from vac import __version__
from vac.content import userdata
from vac.content.userdata import UserDataError, build_user_data, fetch_template, fetch_url
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

SETTINGS = Settings(vac_space="vac01.example.com", factory_name="factory1.example.com",
                    gocdb_sitename="UKI-TEST")
MACHINE = Machine(uuid="0e1c7a4c-5f3b-4c1b-9a55-123456789abc", name="factory1-03.example.com", slot=3,
                  machinetype="lhcb", machine_model="cernvm3", processors=1, created=1.0, deadline=2.0)


def machinetype(tmp_path: Path, **changes) -> Machinetype:
    values = dict(name="lhcb", root_image="https://images.example.org/cernvm.iso",
                  machinetype_path=str(tmp_path / "machinetypes" / "lhcb"))
    values.update(changes)
    return Machinetype(**values)


def write_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "machinetypes" / "lhcb" / "files" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build(template: str, tmp_path: Path, *, url=None, proxy=None, files=None, settings=SETTINGS, **changes) -> str:
    return build_user_data(template, settings=settings, machinetype=machinetype(tmp_path, **changes),
                           machine=MACHINE, template_url=url, proxy_pem=proxy, files=files or {})


# -- substitutions (pure) ----------------------------------------------------------------------


def test_every_classic_substitution(tmp_path):
    names = ["url", "space", "machinetype", "machine_hostname", "manager_version", "manager_hostname",
             "machinefeatures_url", "jobfeatures_url", "joboutputs_url", "root_image_url",
             "heartbeat_machines_url", "vmtype", "vm_hostname", "vmlm_version", "vmlm_hostname", "uuid",
             "option_x509_proxy", "option_pilot", "file_motd", "option_motd", "site"]
    template = "".join(f"{name}=##user_data_{name}##\n" for name in names)
    text = build(template, tmp_path, url="https://vo.example.org/user_data", proxy="PROXY PEM",
                 files={"motd": "hello"}, user_data_options=(("pilot", "v2"),),
                 user_data_files=(("motd", "motd.txt"),))
    assert text == (
        "url=https://vo.example.org/user_data\n"
        "space=vac01.example.com\n"
        "machinetype=lhcb\n"
        "machine_hostname=factory1-03.example.com\n"
        f"manager_version=Vac {__version__}\n"
        "manager_hostname=factory1.example.com\n"
        "machinefeatures_url=http://169.254.169.253/machinefeatures\n"
        "jobfeatures_url=http://169.254.169.253/jobfeatures\n"
        "joboutputs_url=http://169.254.169.253/joboutputs\n"
        "root_image_url=https://images.example.org/cernvm.iso\n"
        "heartbeat_machines_url=\n"  # Vcycle only
        "vmtype=lhcb\n"
        "vm_hostname=factory1-03.example.com\n"
        f"vmlm_version=Vac {__version__}\n"
        "vmlm_hostname=factory1.example.com\n"
        "uuid=0e1c7a4c-5f3b-4c1b-9a55-123456789abc\n"  # blank in classic Vac
        "option_x509_proxy=PROXY PEM\n"
        "option_pilot=v2\n"
        "file_motd=hello\n"
        "option_motd=hello\n"
        "site=UKI-TEST\n"
    )


def test_values_that_only_some_machines_have(tmp_path):
    template = "[##user_data_url##][##user_data_root_image_url##][##user_data_site##][##user_data_option_x509_proxy##]"
    local = Settings(vac_space="s.example.com", factory_name="f.example.com")
    assert build(template, tmp_path, root_image="cernvm.iso", settings=local) == "[][][][]"


def test_mjf_urls_follow_the_configured_address_and_port(tmp_path):
    settings = Settings(vac_space="s.example.com", factory_name="f.example.com", mjf_address="10.0.0.1", http_port=8080)
    assert build("##user_data_jobfeatures_url##", tmp_path, settings=settings) == "http://10.0.0.1:8080/jobfeatures"


def test_an_ipv6_mjf_address_is_bracketed_and_port_80_left_out(tmp_path):
    settings = Settings(vac_space="s.example.com", factory_name="f.example.com", mjf_address="fd00::253", http_port=80)
    assert build("##user_data_machinefeatures_url##", tmp_path, settings=settings) == "http://[fd00::253]/machinefeatures"
    settings = Settings(vac_space="s.example.com", factory_name="f.example.com", mjf_address="fd00::253", http_port=8080)
    assert build("##user_data_joboutputs_url##", tmp_path, settings=settings) == "http://[fd00::253]:8080/joboutputs"


def test_unknown_patterns_are_removed_and_others_left(tmp_path):
    template = "a##user_data_option_unset##b##user_data_##c##user_data_Upper##d##other##e#"
    assert build(template, tmp_path) == "abc##user_data_Upper##d##other##e#"


def test_inserted_values_are_never_substituted_again(tmp_path):
    # Classic Vac replaced or removed patterns inside values depending on dictionary order.
    text = build("##user_data_option_a##|##user_data_option_b##|##user_data_file_f##", tmp_path,
                 user_data_options=(("a", "##user_data_option_b##"), ("b", "##user_data_uuid##")),
                 user_data_files=(("f", "f.txt"),), files={"f": "##user_data_space##"}, proxy=None)
    assert text == "##user_data_option_b##|##user_data_uuid##|##user_data_space##"


def test_earlier_sources_win_as_in_the_classic_order(tmp_path):
    text = build("##user_data_option_x509_proxy##|##user_data_option_motd##|##user_data_file_motd##", tmp_path,
                 proxy="PROXY", user_data_proxy=True,
                 user_data_options=(("x509_proxy", "option value"), ("motd", "option motd")),
                 user_data_files=(("motd", "motd.txt"),), files={"motd": "file motd"})
    assert text == "PROXY|option motd|file motd"


def test_proxy_required_when_configured(tmp_path):
    with pytest.raises(UserDataError, match="user_data_proxy = true but no proxy was made"):
        build("##user_data_option_x509_proxy##", tmp_path, user_data_proxy=True)


# -- files -------------------------------------------------------------------------------------


def test_user_data_files_are_read_when_not_given(tmp_path):
    write_file(tmp_path, "motd.txt", "héllo\n".encode())
    absolute = tmp_path / "elsewhere.txt"
    absolute.write_text("absolute")
    mt = machinetype(tmp_path, user_data_files=(("motd", "motd.txt"), ("abs", str(absolute))))
    text = build_user_data("##user_data_file_motd##|##user_data_option_abs##", settings=SETTINGS,
                           machinetype=mt, machine=MACHINE, template_url=None, proxy_pem=None)
    assert text == "héllo\n|absolute"


@pytest.mark.parametrize("name, data, message", [
    ("../../../../etc/passwd", None, "user_data_file_x '../../../../etc/passwd' is not a file name inside the files directory"),
    ("missing.txt", None, "cannot read user_data_file_x .*/files/missing.txt: No such file or directory"),
    ("binary.bin", b"\xff\xfe\x00", "user_data_file_x .*/binary.bin is not UTF-8 text"),
    ("big.txt", b"x" * (userdata.MAX_TEMPLATE_BYTES + 1), "user_data_file_x .*/big.txt is larger than 1048576 bytes"),
])
def test_unusable_user_data_files(tmp_path, name, data, message):
    if data is not None:
        write_file(tmp_path, name, data)
    with pytest.raises(UserDataError, match=message):
        userdata.read_user_data_files(machinetype(tmp_path, user_data_files=(("x", name),)))


def test_local_templates(tmp_path):
    write_file(tmp_path, "user_data", b"relative ##user_data_uuid##")
    assert fetch_template(machinetype(tmp_path, user_data="user_data"), SETTINGS) == ("relative ##user_data_uuid##", None)
    absolute = tmp_path / "template"
    absolute.write_text("absolute")
    assert fetch_template(machinetype(tmp_path, user_data=str(absolute)), SETTINGS) == ("absolute", None)
    with pytest.raises(UserDataError, match="machinetype lhcb has no user_data"):
        fetch_template(machinetype(tmp_path), SETTINGS)
    with pytest.raises(UserDataError, match="cannot read user_data .*/files/nothing: No such file"):
        fetch_template(machinetype(tmp_path, user_data="nothing"), SETTINGS)


# -- remote templates --------------------------------------------------------------------------


@pytest.fixture
def server():
    local = LocalHTTPServer()
    yield local
    local.close()


@pytest.mark.component
def test_remote_template_is_fetched_every_time(server, tmp_path):
    server.routes["/user_data"] = Route(body=b"url=##user_data_url##")
    url = server.url("/user_data")
    mt = machinetype(tmp_path, user_data=url)
    text, template_url = fetch_template(mt, SETTINGS)
    assert (text, template_url) == ("url=##user_data_url##", url)
    assert build_user_data(text, settings=SETTINGS, machinetype=mt, machine=MACHINE,
                           template_url=template_url, proxy_pem=None) == f"url={url}"
    fetch_template(mt, SETTINGS)
    assert server.paths() == ["/user_data", "/user_data"]  # never cached
    headers = server.requests[0][1]
    assert headers["User-Agent"] == f"Vac/{__version__}" and "If-Modified-Since" not in headers


@pytest.mark.component
def test_remote_template_redirect(server, tmp_path):
    server.routes["/old"] = Route(status=301, headers={"Location": "/new"}, last_modified=None)
    server.routes["/new"] = Route(body=b"moved")
    assert fetch_template(machinetype(tmp_path, user_data=server.url("/old")), SETTINGS) == ("moved", server.url("/old"))


@pytest.mark.component
@pytest.mark.parametrize("route, message", [
    (Route(status=404), "cannot fetch user_data template {url}: HTTP 404 Not Found"),
    (Route(status=500), "cannot fetch user_data template {url}: HTTP 500 Internal Server Error"),
    (Route(body=b"x" * (userdata.MAX_TEMPLATE_BYTES + 1)), "cannot fetch user_data template {url}: 1048577 bytes is more than the limit of 1048576"),
    (Route(body=b"\xff\xfe"), "user_data template {url} is not UTF-8 text: .*"),
    (Route(body=b"late", delay=5), "cannot fetch user_data template {url}: .*Read timed out.*"),
    (Route(body=b"x" * 1000, stall_after=10), "cannot fetch user_data template {url}: took more than 0.5 s"),
])
def test_remote_template_failures(server, route, message):
    server.routes["/t"] = route
    url = server.url("/t")
    with pytest.raises(UserDataError) as error:
        fetch_url(url, timeout=0.5)
    assert re.fullmatch(message.format(url=re.escape(url)), str(error.value))


@pytest.mark.component
def test_remote_template_total_time_is_capped(server):
    server.routes["/t"] = Route(body=b"x" * (512 * 1024), piece_delay=0.05)
    url = server.url("/t")
    with pytest.raises(UserDataError, match=f"cannot fetch user_data template {url}: took more than 0.2 s"):
        fetch_url(url, timeout=0.2)
