"""VacMon: the status datagrams a factory sends to monitoring collectors (cookie ``0``)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Optional

from vac.core.config import Settings
from vac.services.vacquery.codec import (
    FACTORY_CLIENT,
    encode_factory_status,
    encode_machine_status,
    encode_machinetype_status,
)
from vac.services.vacquery.net import RESOLVE_TIMEOUT, resolve
from vac.services.vacquery.records import MachineStatus, StatusSnapshot

log = logging.getLogger(__name__)


VACMON_COOKIE = "0"
DEFAULT_VACMON_PORT = 8884


def vacmon_cycle_messages(settings: Settings, snapshot: StatusSnapshot,
                          time_sent: Optional[float] = None) -> list:
    """The per-cycle VacMon datagrams: ``factory_status`` and one ``machinetype_status`` each."""
    count = len(snapshot.machinetypes)
    messages = [encode_factory_status(snapshot.factory, settings, cookie=VACMON_COOKIE,
                                      client=FACTORY_CLIENT, time_sent=time_sent)]
    messages += [encode_machinetype_status(report, settings, num_machinetypes=count,
                                           cookie=VACMON_COOKIE, client=FACTORY_CLIENT,
                                           time_sent=time_sent)
                 for report in snapshot.machinetypes]
    return messages


def vacmon_finish_message(settings: Settings, machine: MachineStatus, num_machines: int,
                          time_sent: Optional[float] = None) -> bytes:
    """The ``machine_status`` VacMon gets when a machine finishes."""
    return encode_machine_status(machine, settings, num_machines=num_machines,
                                 cookie=VACMON_COOKIE, client=FACTORY_CLIENT, time_sent=time_sent)


def parse_hostport(hostport: str) -> tuple:
    """``host:port`` (port default 8884) -> (host, port); ValueError if the port is bad."""
    host, sep, port = hostport.strip().rpartition(":")
    if not sep:
        return hostport.strip(), DEFAULT_VACMON_PORT
    number = int(port)
    if not host or not 0 < number < 65536:
        raise ValueError(f"bad VacMon address {hostport!r}")
    return host, number


async def send_vacmon(settings: Settings, messages: Sequence[bytes]) -> int:
    """Send ``messages`` to every ``vacmon_hostport``; returns the datagrams sent. Problems
    (bad address, unresolvable name, socket errors) are logged, never raised."""
    if not settings.vacmon_hostport or not messages:
        return 0
    destinations = []
    for hostport in settings.vacmon_hostport:
        try:
            host, port = parse_hostport(hostport)
        except ValueError:
            log.warning("VacMon: bad vacmon_hostport %r", hostport)
            continue
        addresses = await resolve(host, RESOLVE_TIMEOUT)
        if not addresses:
            log.warning("VacMon: cannot resolve %s", host)
            continue
        destinations.append((addresses[0], port))
    sent = 0
    if not destinations:
        return sent
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for destination in destinations:
            for message in messages:
                try:
                    sock.sendto(message, destination)
                    sent += 1
                except OSError as error:
                    log.warning("VacMon: cannot send to %s:%d: %s", *destination, error)
                    break
    return sent
