"""Heartbeat lists (VCYCLE.md §5, §6.3): for each machinetype of a space, its running machines
whose heartbeat is fresh, newest first.

A machine reads its space's lists to find its peers (``##user_data_heartbeat_machines_url##``
plus ``/<machinetype>``), and ``cvmfs_proxy_machinetype`` turns one machinetype's list into the
cvmfs proxies of the machines created next. Pure: the daemon gives the heartbeat times and
addresses it has read and writes the lists it gets back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Optional

from vac.core.model import Machine, MachineState
from vac.core.vcycleconfig import CloudMachinetype, Space


@dataclasses.dataclass(frozen=True)
class Beating:
    """One line of a heartbeat list: ``<heartbeat time> <name> <address>``."""

    heartbeat: int
    name: str
    address: str


def heartbeat_lists(space: Space, machines: Iterable[Machine], heartbeats: Mapping[str, Optional[float]],
                    addresses: Mapping[str, str], now: float) -> dict[str, tuple[Beating, ...]]:
    """Machinetype -> its list, for every machinetype of ``space``.

    A machine is listed while it is Running, its machinetype sets heartbeat_file and
    heartbeat_seconds, its heartbeat (``heartbeats``: uuid -> time) is younger than
    heartbeat_seconds, and the cloud gave it an address (a line without one is of no use to
    the machines that read it). Newest heartbeat first; names break ties, so a list only
    changes when the machines or their heartbeats do.
    """
    lists: dict[str, list[Beating]] = {name: [] for name in space.machinetypes}
    for machine in machines:
        cloud_type = space.machinetypes.get(machine.machinetype)
        if cloud_type is None or machine.state is not MachineState.RUNNING:
            continue
        seconds = cloud_type.machinetype.heartbeat_seconds
        beat, address = heartbeats.get(machine.uuid), addresses.get(machine.uuid)
        if not (cloud_type.machinetype.heartbeat_file and seconds) or beat is None or not address:
            continue
        if beat > now - seconds:
            lists[machine.machinetype].append(Beating(int(beat), machine.name, address))
    return {name: tuple(sorted(entries, key=lambda b: (b.heartbeat, b.name), reverse=True))
            for name, entries in lists.items()}


def list_text(entries: Iterable[Beating]) -> str:
    """A list as served and written: one ``<time> <name> <address>`` line each."""
    return "".join(f"{entry.heartbeat} {entry.name} {entry.address}\n" for entry in entries)


def cvmfs_proxy(cloud_type: CloudMachinetype, lists: Mapping[str, tuple[Beating, ...]]) -> Optional[str]:
    """The ``user_data_option_cvmfs_proxy`` for a new machine of ``cloud_type``: the listed
    machines of its ``cvmfs_proxy_machinetype`` as ``http://ADDRESS:PORT`` joined by ``|``,
    then ``;`` and the configured value as the fallback group. None (the configured value
    stays) when the machinetype has no such option or nothing is listed."""
    source = cloud_type.cvmfs_proxy_source
    if source is None:
        return None
    name, port = source
    urls = [f"http://{_url_host(entry.address)}:{port}" for entry in lists.get(name, ())]
    if not urls:
        return None
    configured = dict(cloud_type.machinetype.user_data_options).get("cvmfs_proxy")
    return "|".join(urls) + (f";{configured}" if configured else "")


def cvmfs_proxies(space: Space, lists: Mapping[str, tuple[Beating, ...]]) -> dict[str, str]:
    """Machinetype -> its ``cvmfs_proxy``, for the machinetypes of ``space`` that get one now."""
    proxies = {name: cvmfs_proxy(cloud_type, lists) for name, cloud_type in space.machinetypes.items()}
    return {name: proxy for name, proxy in proxies.items() if proxy is not None}


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
