"""Starting the metadata and MJF services on vacd's event loop, each machine's share of them
sized for the slot count and the open file limit."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from aiohttp import web

from vac.core.config import Settings
from vac.core.model import slot_for_ip
from vac.core.values import http_base_url
from vac.services.fairness import (
    EVENT_LOG_SECONDS,
    ConnectionShares,
    FairListener,
    LogLimiter,
    SlotForAddress,
    descriptor_limit,
    limit_logger,
    serve_fairly,
)
from vac.services.metadata.base import Resolver, log
from vac.services.metadata.ec2_openstack import metadata_app
from vac.services.metadata.limits import (
    DEFAULT_LIMITS,
    Limits,
    sized_limits,
    upload_share_bytes,
)
from vac.services.metadata.mjf import mjf_app

# aiohttp's own protocol errors (malformed requests) go here, rate-limited like request lines.
http_log = logging.getLogger(log.name + ".http")
LINGER_SECONDS = 2.0  # after an early refusal, discard what the client still sends this long


@dataclasses.dataclass
class Services:
    """The two running services; ``close()`` stops them and their connections."""

    metadata_url: str
    mjf_url: str
    listeners: list
    limits: Limits  # as sized for the slot count and descriptor limit

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close()
        self.listeners = []


async def _serve(name: str, app: web.Application, address: str, port: int, limits: Limits,
                 shares: ConnectionShares, events: LogLimiter) -> FairListener:
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=limits.idle_timeout_seconds,
                           lingering_time=LINGER_SECONDS, handler_cancellation=True,
                           logger=http_log, shutdown_timeout=5.0)
    return await serve_fairly(name, runner, address, port, shares, events, log)


async def start_services(settings: Settings, resolve: Resolver, *,
                         metadata_address: Optional[str] = None,
                         mjf_address: Optional[str] = None, port: Optional[int] = None,
                         slot_for_address: SlotForAddress = slot_for_ip,
                         limits: Limits = DEFAULT_LIMITS, slots: Optional[int] = None,
                         descriptors: Optional[int] = None) -> Services:
    """Bind and start both services (defaults: the settings' addresses and ``http_port``).

    Each machine's share of connections is sized for ``slots`` (default: the settings'
    ``total_processors``, which the configuration loader fills in) and ``descriptors`` (default:
    this process's open file limit). Raises OSError if an address cannot be bound (e.g. not yet
    configured on the bridge); the caller retries. Port 0 picks free ports, and the metadata
    ``meta`` URLs follow the MJF one.
    """
    metadata_address = metadata_address or settings.metadata_address
    mjf_address = mjf_address or settings.mjf_address
    port = settings.http_port if port is None else port
    if metadata_address == mjf_address:
        raise ValueError(f"metadata and MJF services need different addresses, both are "
                         f"{metadata_address}")
    slots = slots or settings.total_processors
    if not slots:
        raise ValueError("the slot count is needed to size each machine's share of the services")
    if descriptors is None:
        descriptors = descriptor_limit()
    limits = sized_limits(limits, slots, descriptors, log)
    limit_logger(http_log, LogLimiter(limits.log_burst, limits.log_per_second))
    shares = ConnectionShares(limits.connections_per_machine, slot_for_address)
    events = LogLimiter(1, 1.0 / EVENT_LOG_SECONDS)
    mjf = await _serve("mjf", mjf_app(resolve, slot_for_address=slot_for_address,
                                      limits=limits), mjf_address, port, limits, shares, events)
    mjf_url = http_base_url("http", mjf_address, mjf.port)
    try:
        metadata = await _serve(
            "metadata", metadata_app(settings, resolve, mjf_url=mjf_url,
                                     slot_for_address=slot_for_address, limits=limits),
            metadata_address, port, limits, shares, events)
    except BaseException:
        await mjf.close()
        raise
    metadata_url = http_base_url("http", metadata_address, metadata.port)
    log.info("metadata service on %s, MJF service on %s; each of %d slots may hold %d "
             "connections and %d bytes of uploads in flight (open file limit %d)", metadata_url,
             mjf_url, slots, limits.connections_per_machine, upload_share_bytes(limits),
             descriptors)
    return Services(metadata_url, mjf_url, [metadata, mjf], limits)
