"""Heartbeat lists and the cvmfs proxies made of them (vac.core.heartbeatlists), with injected time."""

from __future__ import annotations

from tests.test_vcycle_plan import NOW, cloud_type, make_space, record
from vac.core.heartbeatlists import Beating, cvmfs_proxies, cvmfs_proxy, heartbeat_lists, list_text
from vac.core.model import MachineState

SQUID = cloud_type("squid", heartbeat_file="heartbeat", heartbeat_seconds=300)
PILOT = cloud_type("lhcb", cvmfs_proxy_machinetype="squid:3128",
                   user_data_options=(("cvmfs_proxy", "http://site-squid.example.org:3128"),))


def test_lists_running_machines_with_a_fresh_heartbeat_newest_first() -> None:
    space = make_space(SQUID, PILOT)
    old, new, tie, stale, no_address, unknown = (
        record(n, "squid") for n in ("old", "new", "tie", "stale", "noaddr", "unknown"))
    stopping = record("stopping", "squid", state=MachineState.FINISHING)
    beats = {old.uuid: NOW - 200, new.uuid: NOW - 10, tie.uuid: NOW - 10, stale.uuid: NOW - 300,
             stopping.uuid: NOW - 5, no_address.uuid: NOW - 5}
    addresses = {m.uuid: f"10.0.0.{i}" for i, m in enumerate((old, new, tie, stale, stopping, unknown), 1)}
    lists = heartbeat_lists(space, [old, new, tie, stale, stopping, no_address, unknown], beats, addresses, NOW)
    # Exactly heartbeat_seconds old is stale; a machine without a heartbeat or address is left out.
    assert lists == {"lhcb": (), "squid": (
        Beating(int(NOW - 10), tie.name, "10.0.0.3"), Beating(int(NOW - 10), new.name, "10.0.0.2"),
        Beating(int(NOW - 200), old.name, "10.0.0.1"))}
    assert list_text(lists["squid"]).splitlines()[2] == f"{int(NOW - 200)} {old.name} 10.0.0.1"


def test_machinetypes_without_heartbeat_settings_list_nobody() -> None:
    space = make_space(cloud_type("squid", heartbeat_file="heartbeat"), PILOT)
    machine = record("a", "squid")
    assert heartbeat_lists(space, [machine], {machine.uuid: NOW}, {machine.uuid: "10.0.0.1"}, NOW) == {
        "squid": (), "lhcb": ()}


def test_cvmfs_proxy_from_the_list_then_the_configured_fallback() -> None:
    lists = {"squid": (Beating(5, "vcycle-squid-a", "10.0.0.2"), Beating(3, "vcycle-squid-b", "fd00::2"))}
    assert cvmfs_proxy(PILOT, lists) == \
        "http://10.0.0.2:3128|http://[fd00::2]:3128;http://site-squid.example.org:3128"
    # Nothing listed: the configured value stays; none configured: the list alone; default port 280.
    assert cvmfs_proxy(PILOT, {"squid": ()}) is None
    bare = cloud_type("lhcb", cvmfs_proxy_machinetype="squid")
    assert cvmfs_proxy(bare, lists) == "http://10.0.0.2:280|http://[fd00::2]:280"
    assert cvmfs_proxy(SQUID, lists) is None
    assert cvmfs_proxies(make_space(SQUID, PILOT), lists) == {"lhcb": cvmfs_proxy(PILOT, lists)}
