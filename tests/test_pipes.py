"""Vacuum pipes: expansion, precedence, hostile documents, cache, last-good-copy fallback, and
the default fetcher against a real server on 127.0.0.1 (its limits are tested in test_fetch)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.localhttp import LocalHTTPServer, Route
from vac import __version__
from vac.content import pipes
from vac.content.fetch import FetchError
from vac.core.config import Config, Machinetype, Settings, VacuumPipe

NOW = 1_800_000_000.0
URL = "https://pipes.example.org/lhcb.json"
GOOD_ENTRY = {
    "suffix": "prod",
    "root_image": "https://images.example.org/cernvm4.iso",
    "user_data": "https://pipes.example.org/user_data",
    "target_share": 3,
    "max_processors": 8,
    "min_processors": "2",
    "heartbeat_file": "heartbeat",
    "heartbeat_seconds": 300,
    "accounting_fqan": "/lhcb/Role=production",
    "cvmfs_repositories": "lhcb.cern.ch lhcb-condb.cern.ch",
    "user_data_proxy": True,
    "user_data_option_queue": "default",
    "user_data_file_hostcert": "hostcert.pem",
}
SECOND_ENTRY = {
    "suffix": "test",
    "root_image": "cernvm4.iso",
    "user_data": "user_data_test",
    "target_share": 1.0,
}


def document(*entries, **top) -> bytes:
    return json.dumps({"machinetypes": list(entries), **top}).encode()


class FakeFetcher:
    """Serves a queue of results: bytes to return, or exceptions to raise."""

    def __init__(self, *results) -> None:
        self.results = list(results)
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        result = self.results.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result


def make_config(tmp_path, *, defaults=(), pipes_=None, machinetypes=None, sources=None, share=10.0) -> Config:
    settings = Settings(
        vac_space="vac01.example.org",
        factory_name="factory1.example.org",
        state_dir=str(tmp_path),
        user_data_options=(("site", "UKI-TEST"), ("queue", "site-queue")),
    )
    if pipes_ is None:
        pipes_ = {"lhcb": VacuumPipe("lhcb", URL, target_share=share, defaults=tuple(defaults))}
    return Config(settings=settings, machinetypes=machinetypes or {}, vacuum_pipes=pipes_, sources=sources or {})


def cache_file(tmp_path, prefix="lhcb"):
    return tmp_path / "pipescache" / f"{prefix}.pipe"


# --- expansion ----------------------------------------------------------------------------------


def test_entries_become_typed_machinetypes_with_split_shares(tmp_path):
    body = document(GOOD_ENTRY, SECOND_ENTRY, cache_seconds=600)
    config, problems = pipes.expand_pipes(make_config(tmp_path), FakeFetcher(body), now=NOW)
    assert problems == []
    assert list(config.machinetypes) == ["lhcb-prod", "lhcb-test"]
    prod = config.machinetypes["lhcb-prod"]
    assert prod.target_share == pytest.approx(7.5)
    assert config.machinetypes["lhcb-test"].target_share == pytest.approx(2.5)
    assert prod.machinetype_path == str(tmp_path / "machinetypes" / "lhcb")
    assert (prod.max_processors, prod.min_processors, prod.heartbeat_seconds) == (8, 2, 300)
    assert prod.cvmfs_repositories == ("lhcb.cern.ch", "lhcb-condb.cern.ch")
    assert prod.user_data_proxy is True
    assert dict(prod.user_data_options) == {"site": "UKI-TEST", "queue": "default"}
    assert prod.user_data_files == (("hostcert", "hostcert.pem"),)
    assert cache_file(tmp_path).read_bytes() == body
    assert stat.S_IMODE(os.stat(cache_file(tmp_path)).st_mode) == 0o644


def test_local_sections_win_over_pipe_section_which_wins_over_entries(tmp_path):
    local = Machinetype(name="lhcb-prod", root_image="local.iso", target_share=0.0,
                        user_data_options=(("queue", "local-queue"),))
    config = make_config(
        tmp_path,
        defaults=[("heartbeat_seconds", "900"), ("user_data_option_queue", "pipe-section"),
                  ("machines_dir_days", "7"), ("user_data_proxy", "false")],
        machinetypes={"lhcb-prod": local, "other": Machinetype(name="other")},
        sources={("machinetype lhcb-prod", "target_share"): "/etc/vac.d/lhcb.conf:3"},
    )
    expanded, problems = pipes.expand_pipes(config, FakeFetcher(document(GOOD_ENTRY, SECOND_ENTRY)), now=NOW)
    assert problems == []
    prod = expanded.machinetypes["lhcb-prod"]
    assert prod.target_share == 0.0  # set locally to its default value: still wins
    assert prod.root_image == "local.iso"
    assert prod.user_data == GOOD_ENTRY["user_data"]
    assert prod.heartbeat_seconds == 900
    assert prod.machines_dir_days == 7.0
    assert prod.user_data_proxy is False
    assert dict(prod.user_data_options)["queue"] == "local-queue"
    assert expanded.machinetypes["lhcb-test"].user_data_options == (("queue", "pipe-section"), ("site", "UKI-TEST"))
    assert expanded.machinetypes["other"] == Machinetype(name="other")


HOSTILE = [
    ("root_image", "../../etc/passwd", "http or https"),
    ("root_image", "img;reboot", "plain file name"),
    ("root_image", "img; rm -rf /", "http or https"),
    ("root_image", "-o=backing_file", "plain file name"),
    ("root_image", "http://example.org/a/../../b", ".. segments"),
    ("root_image", "http://example.org/%2e%2e/b", ".. segments"),
    ("root_image", "http://127.0.0.1/cernvm.iso", "local or link-local"),
    ("root_image", "http://169.254.169.254/latest", "local or link-local"),
    ("root_image", "http://[::1]/x", "local or link-local"),
    ("root_image", "http://2130706433/x", "DNS name or an IP"),
    ("root_image", "http://ex;ample.org/x", "DNS name or an IP"),
    ("root_image", "http://user@example.org/x", "no user name"),
    ("root_image", "http://example.org:99999/x", "invalid port"),
    ("root_image", "/cvmfs/cernvm-prod.cern.ch/../../etc/shadow", "plain /cvmfs/ path"),
    ("root_image", "docker://centos:7", "docker:// images are for machine_model docker or podman"),
    ("root_image", "a" * 5000, "longer than 2048"),
    ("root_image", 42, "must be a string, not an integer"),
    ("root_image", None, "must be a string, not null"),
    ("user_data", "/etc/shadow", "http or https"),
    ("user_data", "file:///etc/shadow", "http or https"),
    ("user_data", "https://example.org/a b", "spaces"),
    ("user_data_file_hostkey", "../hostkey.pem", "plain file name"),
    ("user_data_file_hostkey", "/etc/grid-security/hostkey.pem", "plain file name"),
    ("user_data_option_cvmfs_proxy", "x" * 100000, "longer than 65536"),
    ("user_data_option_cvmfs_proxy", ["a"], "must be a string, not an array"),
    ("user_data_option_Bad-Name", "x", "followed by a-z"),
    ("heartbeat_file", "a/b", "plain file name"),
    ("heartbeat_file", ".hidden", "plain file name"),
    ("cvmfs_repositories", "lhcb.cern.ch ../x", "repository names"),
    ("cvmfs_repositories", ["lhcb.cern.ch"], "must be a string"),
    ("root_device", "vda; ls", "device name"),
    ("accounting_fqan", "/lhcb/Role=x;y", "an FQAN"),
    ("image_signing_dn", "/CN=(", "not a valid regular expression"),
    ("machine_model", "lxc", "must be one of"),
    ("machine_model", "docker", "machine_model docker needs root_image = docker://IMAGE"),
    ("root_image", "docker://127.0.0.1:5000/lhcb/pilot", "local or link-local"),
    ("max_processors", "lots", "must be an integer, not a string"),
    ("max_processors", True, "must be an integer, not a boolean"),
    ("max_processors", [1], "must be an integer, not an array"),
    ("max_processors", 10**9, "between 1 and 4096"),
    ("heartbeat_seconds", -1, "between 0"),
    ("target_share", {"a": 1}, "must be a number, not an object"),
    ("user_data_proxy", "maybe", "true or false"),
    ("suffix", "../x", "suffix must be"),
    ("suffix", "Prod", "suffix must be"),
    ("suffix", "a_b", "suffix must be"),
    ("suffix", 7, "suffix must be"),
    ("suffix", "x" * 40, "suffix must be"),
]


@pytest.mark.parametrize("key, value, message", HOSTILE)
def test_hostile_value_rejects_its_entry_with_a_clear_reason(tmp_path, caplog, key, value, message):
    bad = {**GOOD_ENTRY, key: value}
    config, problems = pipes.expand_pipes(make_config(tmp_path), FakeFetcher(document(bad, SECOND_ENTRY)), now=NOW)
    assert list(config.machinetypes) == ["lhcb-test"]
    assert len(problems) == 1
    assert "entry 0" in problems[0] and "rejected" in problems[0]
    assert message in problems[0]
    assert key in problems[0]
    assert len(problems[0]) < 400  # hostile long values are not echoed in full
    assert problems[0] in caplog.text


def test_wrong_entry_types_duplicates_and_incomplete_entries(tmp_path):
    entries = ["lhcb-prod", [1, 2], None, GOOD_ENTRY, {**GOOD_ENTRY, "root_image": "other.iso"},
               {"suffix": "noimage", "user_data": "u"},
               {**SECOND_ENTRY, "suffix": "wide", "min_processors": 4, "max_processors": 2},
               {**SECOND_ENTRY, "suffix": "long", "min_wallclock_seconds": 90000, "max_wallclock_seconds": 3600}]
    config, problems = pipes.expand_pipes(make_config(tmp_path), FakeFetcher(document(*entries)), now=NOW)
    assert list(config.machinetypes) == ["lhcb-prod"]
    assert config.machinetypes["lhcb-prod"].root_image == GOOD_ENTRY["root_image"]
    assert [problem.split(" rejected: ")[1] for problem in problems] == [
        "is a string, not an object",
        "is an array, not an object",
        "is null, not an object",
        "repeats an earlier suffix",
        "no root_image given",
        "min_processors: 4 is more than max_processors (2)",
        # checked by the same rule as a local section (a pipe once let this one through)
        "min_wallclock_seconds: 90000 is more than max_wallclock_seconds (3600)",
    ]


def test_unknown_and_local_only_keys_are_ignored_with_a_note(tmp_path):
    entry = {**GOOD_ENTRY, "frobnicate": 1, "machinegroup": "x"}
    config, problems = pipes.expand_pipes(make_config(tmp_path), FakeFetcher(document(entry)), now=NOW)
    assert list(config.machinetypes) == ["lhcb-prod"]
    assert config.machinetypes["lhcb-prod"].machinegroup is None
    assert len(problems) == 2
    assert any("'frobnicate'" in problem for problem in problems)
    assert any("'machinegroup': not accepted from a vacuum pipe" in problem for problem in problems)


CONTAINER_ENTRY = {
    "suffix": "ct",
    "machine_model": "podman",
    "root_image": "docker://registry.example.org:5000/lhcb/pilot:7",
    "user_data": "https://pipes.example.org/user_data",
    "target_share": 1,
    "container_command": "/user_data --queue 'long queue'",
    "tmp_binds": "/scratch /home/pilot",
    "cvmfs_repositories": "lhcb.cern.ch",
}


def test_pipes_define_container_machinetypes(tmp_path):
    apptainer = {**CONTAINER_ENTRY, "suffix": "sg", "machine_model": "apptainer",
                 "root_image": "/cvmfs/unpacked.cern.ch/lhcb/pilot"}
    config, problems = pipes.expand_pipes(
        make_config(tmp_path), FakeFetcher(document(CONTAINER_ENTRY, apptainer)), now=NOW)
    assert list(config.machinetypes) == ["lhcb-ct"]
    container = config.machinetypes["lhcb-ct"]
    assert (container.machine_model, container.root_image) == ("podman", CONTAINER_ENTRY["root_image"])
    assert container.container_command == CONTAINER_ENTRY["container_command"]
    assert container.tmp_binds == ("/scratch", "/home/pilot")
    assert problems == ["vacuum pipe lhcb entry 1 (sg) rejected: machine_model and root_image: "
                        "machine_model apptainer needs [settings] singularity_user"]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"not json", "not valid JSON"),
        (b"[]", "is an array, not a JSON object"),
        (b"{}", "no \"machinetypes\" array"),
        (b'{"machinetypes": {"a": 1}}', "is an object, not an array"),
        (b'{"machinetypes": [], "cache_seconds": "soon"}', "not a number"),
        (b'{"machinetypes": [], "cache_seconds": NaN}', "NaN is not allowed"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b" " * (pipes.MAX_DOCUMENT_BYTES + 1), "larger than"),
        (document(*[{"suffix": f"s{n}"} for n in range(pipes.MAX_ENTRIES + 1)]), "more than 100"),
    ],
)
def test_bad_documents_are_refused_whole(tmp_path, body, message):
    config, problems = pipes.expand_pipes(make_config(tmp_path), FakeFetcher(body), now=NOW)
    assert config.machinetypes == {}
    assert len(problems) == 1 and message in problems[0] and "left out" in problems[0]
    assert not cache_file(tmp_path).exists()


def test_pipe_section_problems(tmp_path):
    config, problems = pipes.expand_pipes(
        make_config(tmp_path, defaults=[("root_image", "a;b")]), FakeFetcher(document(GOOD_ENTRY)), now=NOW
    )
    assert config.machinetypes == {}
    assert problems == ["[vacuum_pipe lhcb]: root_image must be an http(s) URL, a /cvmfs/ path or a plain file "
                        "name, not 'a;b'; pipe skipped"]
    no_shares = {key: value for key, value in GOOD_ENTRY.items() if key != "target_share"}
    config, problems = pipes.expand_pipes(make_config(tmp_path), FakeFetcher(document(no_shares)), now=NOW + 4000)
    assert config.machinetypes["lhcb-prod"].target_share == 0.0
    assert problems == ["vacuum pipe lhcb: no entry has a positive target_share, so none will be created"]


def test_pipes_cannot_define_the_same_machinetype_twice_and_prefixes_are_checked(tmp_path):
    config = make_config(tmp_path, pipes_={
        "a": VacuumPipe("a", "https://x.example.org/a", 1.0),
        "a-b": VacuumPipe("a-b", "https://x.example.org/ab", 1.0),
        "../x": VacuumPipe("../x", "https://x.example.org/x", 1.0),
    })
    fetcher = FakeFetcher(document({**GOOD_ENTRY, "suffix": "b-c"}), document({**GOOD_ENTRY, "suffix": "c"}))
    expanded, problems = pipes.expand_pipes(config, fetcher, now=NOW)
    assert list(expanded.machinetypes) == ["a-b-c"]
    assert expanded.machinetypes["a-b-c"].machinetype_path.endswith("/machinetypes/a")
    assert any("already defined by vacuum pipe a" in problem for problem in problems)
    assert any(problem.startswith("vacuum pipe '../x': prefix must be") for problem in problems)
    assert not (tmp_path / "x.pipe").exists() and sorted(os.listdir(tmp_path / "pipescache")) == ["a-b.pipe", "a.pipe"]


def test_no_pipes_means_no_work(tmp_path):
    config = make_config(tmp_path, pipes_={})
    assert pipes.expand_pipes(config, FakeFetcher()) == (config, [])


# --- cache and fallback -------------------------------------------------------------------------


def test_cache_is_used_until_cache_seconds_then_refreshed(tmp_path):
    first = document(GOOD_ENTRY, cache_seconds=600)
    second = document(SECOND_ENTRY, cache_seconds=600)
    fetcher = FakeFetcher(first, second)
    config = make_config(tmp_path)
    assert list(pipes.expand_pipes(config, fetcher, now=NOW)[0].machinetypes) == ["lhcb-prod"]
    assert list(pipes.expand_pipes(config, fetcher, now=NOW + 599)[0].machinetypes) == ["lhcb-prod"]
    assert len(fetcher.calls) == 1
    assert list(pipes.expand_pipes(config, fetcher, now=NOW + 601)[0].machinetypes) == ["lhcb-test"]
    assert fetcher.calls == [URL, URL]
    assert cache_file(tmp_path).read_bytes() == second


def test_cache_seconds_has_a_floor_and_a_default(tmp_path):
    fetcher = FakeFetcher(document(GOOD_ENTRY, cache_seconds=0), document(GOOD_ENTRY))
    config = make_config(tmp_path)
    pipes.expand_pipes(config, fetcher, now=NOW)
    pipes.expand_pipes(config, fetcher, now=NOW + pipes.MIN_CACHE_SECONDS - 1)
    assert len(fetcher.calls) == 1
    pipes.expand_pipes(config, fetcher, now=NOW + pipes.MIN_CACHE_SECONDS + 1)
    pipes.expand_pipes(config, fetcher, now=NOW + pipes.MIN_CACHE_SECONDS + 3599)
    assert len(fetcher.calls) == 2


@pytest.mark.parametrize(
    "failure",
    [FetchError(URL, "HTTP 503 Service Unavailable"), OSError("network down"),
     RuntimeError("fetcher bug"), b"<html>oops</html>"],
)
def test_last_good_copy_is_kept_when_a_refresh_fails(tmp_path, failure):
    good = document(GOOD_ENTRY, SECOND_ENTRY, cache_seconds=600)
    fetcher = FakeFetcher(good, failure)
    config = make_config(tmp_path)
    fresh, problems = pipes.expand_pipes(config, fetcher, now=NOW)
    assert problems == []
    stale, problems = pipes.expand_pipes(config, fetcher, now=NOW + 7 * 86400)
    assert stale.machinetypes == fresh.machinetypes
    assert len(problems) == 1
    assert "still using the copy cached at 2027-01-15 08:00:00Z" in problems[0]
    assert cache_file(tmp_path).read_bytes() == good


def test_corrupt_cache_forces_a_fetch(tmp_path):
    cache_file(tmp_path).parent.mkdir()
    cache_file(tmp_path).write_text("{truncated")
    os.utime(cache_file(tmp_path), (NOW, NOW))
    fetcher = FakeFetcher(document(GOOD_ENTRY))
    config, problems = pipes.expand_pipes(make_config(tmp_path), fetcher, now=NOW + 1)
    assert list(config.machinetypes) == ["lhcb-prod"]
    assert len(fetcher.calls) == 1
    assert len(problems) == 1 and "ignoring corrupt cache" in problems[0]
    assert json.loads(cache_file(tmp_path).read_bytes())["machinetypes"][0]["suffix"] == "prod"


def test_unwritable_cache_is_reported_and_the_fresh_document_still_used(tmp_path):
    (tmp_path / "pipescache").write_text("a file where the directory should be")
    config, problems = pipes.expand_pipes(make_config(tmp_path), FakeFetcher(document(GOOD_ENTRY)), now=NOW)
    assert list(config.machinetypes) == ["lhcb-prod"]
    assert len(problems) == 2
    assert "cannot read cache" in problems[0] and "cannot write cache" in problems[1]


# --- the default fetcher against a real local server ---------------------------------------------


@pytest.mark.component
def test_pipe_from_a_real_server_then_the_last_good_copy_when_it_is_gone(tmp_path):
    server = LocalHTTPServer()
    try:
        server.routes["/lhcb.json"] = Route(body=document(GOOD_ENTRY, cache_seconds=60))
        url = server.url("/lhcb.json")
        config = make_config(tmp_path, pipes_={"lhcb": VacuumPipe("lhcb", url, 5.0)})
        fresh, problems = pipes.expand_pipes(config, now=NOW)  # the default: pipes.fetch_document
        assert problems == [] and list(fresh.machinetypes) == ["lhcb-prod"]
        assert server.requests[0][1]["User-Agent"] == f"Vac/{__version__}"
        server.routes["/lhcb.json"] = Route(status=404)
        missing, problems = pipes.expand_pipes(config, now=NOW + 3600)
        assert missing.machinetypes == fresh.machinetypes
        assert len(problems) == 1 and f"cannot fetch {url}: HTTP 404 Not Found" in problems[0]
    finally:
        server.close()
    # The server is gone now: the cached copy carries on.
    stale, problems = pipes.expand_pipes(config, now=NOW + 7200)
    assert stale.machinetypes == fresh.machinetypes
    assert len(problems) == 1 and "Connection refused" in problems[0] and "still using the copy" in problems[0]
