"""Machine/Job Features over HTTPS for cloud machines (vcycled): VCYCLE.md §5's layout, with a
per-machine secret in the path.

A cloud gives no source address to identify a machine by (NAT, floating IPs, other tenants), so
each machine's URLs carry a secret token that vcycled puts into its user_data::

    GET  /machines/<space>/<name>/<token>/machinefeatures[/KEY]
    GET  /machines/<space>/<name>/<token>/jobfeatures[/KEY]
    PUT  /machines/<space>/<name>/<token>/joboutputs/<FILE>     (POST too, for busybox wget)
    GET  /machines/<space>/<name>/<token>/heartbeatlists/<MACHINETYPE>

A wrong or missing token is answered exactly as an unknown machine (404), so names cannot be
probed; the classic Apache layout's unauthenticated GETs and prefix-matched DNs are gone
(VCYCLE.md §8 #11): the space's heartbeat lists, which name machines and their addresses, are
served only to the space's own machines, under their tokens. Uploads have vac's caps and per-machine upload share
(vac.services.metadata.joboutputs); connections are shared per source address through
vac.services.fairness (a machine's address: a machine's share; a NAT gateway's: more), and TLS is at least v1.2 with the configured certificate and key.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import re
import ssl
from pathlib import Path
from typing import Callable, Optional, Union

from aiohttp import web

from vac.core.values import http_base_url
from vac.services.fairness import (
    EVENT_LOG_SECONDS,
    ConnectionShares,
    FairListener,
    LogLimiter,
    descriptor_limit,
    reserved_descriptors,
    serve_fairly,
)
from vac.services.metadata import DEFAULT_LIMITS, BadPath, Limits, path_segments, read_document
from vac.services.metadata.base import (
    RequestLog,
    bytes_response,
    catch_all_application,
    status_response,
)
from vac.services.metadata.joboutputs import Uploads
from vac.services.metadata.limits import sized_limits
from vac.services.metadata.mjf import mjf_get

log = logging.getLogger(__name__)

PREFIX = "machines"
HEARTBEAT_LISTS = "heartbeatlists"
MACHINETYPE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\Z")
MIN_TLS = ssl.TLSVersion.TLSv1_2


@dataclasses.dataclass(frozen=True)
class CloudMachineFiles:
    """Where one machine's MJF files are, the token its URLs must carry, and the directory of
    its space's heartbeat lists (one file per machinetype)."""

    directory: Path
    token: str
    heartbeat_lists: Optional[Path] = None


# (space, machine name) -> its files, or None for an unknown machine
CloudResolver = Callable[[str, str], Optional[CloudMachineFiles]]
# A request's machine (its files) and the rest of its path after the token, or the 404 refusing it
Attribution = Union[web.Response, tuple[CloudMachineFiles, list[str]]]


def machine_url(host: str, port: int, space: str, name: str, token: str) -> str:
    """The base of a machine's MJF URLs (``<base>/machinefeatures`` etc.)."""
    return f"{http_base_url('https', host, port)}/{PREFIX}/{space}/{name}/{token}"


def address_key(address: str) -> Optional[int]:
    """Connections are shared per source address (no slot plan on a cloud)."""
    try:
        return int(ipaddress.ip_address(address))
    except ValueError:
        return None


class AddressShares(ConnectionShares):
    """Connections per source address. An address the cloud lists for one of the machines gets
    a machine's share; any other is taken for a NAT gateway in front of many machines (a tenancy
    without floating IPs reaches vcycled through its router's one address) and gets
    ``gateway_share``, so that those machines are not squeezed into one machine's share."""

    def __init__(self, per_machine: int, gateway_share: int, is_machine_address: Callable[[int], bool]):
        super().__init__(per_machine, address_key)
        self.gateway_share = gateway_share
        self.is_machine_address = is_machine_address

    def _machine(self, key: Optional[int]) -> bool:
        return key is not None and self.is_machine_address(key)

    def limit(self, key: Optional[int]) -> int:
        return self.per_machine if self._machine(key) else self.gateway_share

    def describe(self, key: Optional[int], address: str) -> str:
        return f"machine {address}" if self._machine(key) else f"address {address} (not a machine's: NAT?)"


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS server context (v1.2 or later) from a PEM certificate (chain) and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS
    context.load_cert_chain(cert_file, key_file)
    return context


class CloudMjf:
    """The request handler: attribution by (space, name, token), then MJF GETs or uploads."""

    def __init__(self, resolve: CloudResolver, limits: Limits):
        self.resolve = resolve
        self.uploads = Uploads(limits)
        self.request_log = RequestLog(log, limits)

    def application(self) -> web.Application:
        return catch_all_application(self._entry)

    def _attribute(self, request: web.Request) -> tuple[str, Attribution]:
        """Who sent ``request`` (for the log), and what it asks of which machine."""
        try:
            segments = path_segments(request.rel_url.raw_path)
        except BadPath as error:
            return "?", status_response(404, str(error))
        if len(segments) < 5 or segments[0] != PREFIX:
            return "?", status_response(404, "no such machine")
        space, name, token = segments[1:4]
        files = self.resolve(space, name)
        if files is None or not hmac.compare_digest(files.token.encode(), token.encode()):
            return f"unknown({space}/{name})", status_response(404, "no such machine")
        return f"{space}/{name}", (files, segments[4:])

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        who, target = self._attribute(request)
        # Never the raw path in the log: it holds the machine's token.
        return await self.request_log.answer(who, f"cloud MJF {who} {request.method}",
                                             self._handle(request, target))

    async def _handle(self, request: web.Request, target: Attribution) -> web.Response:
        if isinstance(target, web.Response):
            return target
        files, rest = target
        if request.method in ("PUT", "POST"):
            if len(rest) != 2 or rest[0] != "joboutputs":
                return status_response(403, "only joboutputs/NAME can be written")
            joboutputs = files.directory / "joboutputs"
            joboutputs.mkdir(mode=0o755, exist_ok=True)
            return await self.uploads.store(request, joboutputs, rest[1])
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="405 only GET, HEAD, PUT and POST\n",
                                headers={"Allow": "GET, HEAD, PUT, POST"})
        if rest[:1] == [HEARTBEAT_LISTS]:
            return self._heartbeat_list(files, rest[1:])
        return mjf_get(files.directory, rest)

    @staticmethod
    def _heartbeat_list(files: CloudMachineFiles, rest: list[str]) -> web.Response:
        if len(rest) != 1 or not MACHINETYPE_NAME.match(rest[0]) or files.heartbeat_lists is None:
            return status_response(404, "not found")
        data = read_document(files.heartbeat_lists / rest[0])
        if data is None:
            return status_response(404, f"no heartbeat list for machinetype {rest[0]}")
        return bytes_response(data, "text/plain")


async def start_cloud_mjf(resolve: CloudResolver, *, address: str, port: int, cert_file: str,
                          key_file: str, machines: int, limits: Limits = DEFAULT_LIMITS,
                          descriptors: Optional[int] = None,
                          is_machine_address: Callable[[int], bool] = lambda key: True) -> FairListener:
    """Serve cloud MJF over HTTPS on ``address``:``port`` (port 0: a free one). A machine's
    address (``is_machine_address`` of its integer form) holds a share of connections sized for
    ``machines`` in the descriptor limit; any other address half the descriptors' room.
    Raises OSError (cannot bind) or ssl.SSLError (unusable certificate or key)."""
    context = server_context(cert_file, key_file)
    descriptors = descriptor_limit() if descriptors is None else descriptors
    limits = sized_limits(limits, max(1, machines), descriptors, log, "machines")
    runner = web.AppRunner(CloudMjf(resolve, limits).application(), access_log=None,
                           handle_signals=False, keepalive_timeout=limits.idle_timeout_seconds,
                           handler_cancellation=True, shutdown_timeout=5.0)
    room = descriptors - reserved_descriptors(descriptors)
    shares = AddressShares(limits.connections_per_machine, max(limits.connections_per_machine, room // 2),
                           is_machine_address)
    listener = await serve_fairly("cloud-mjf", runner, address, port, shares,
                                  LogLimiter(1, 1.0 / EVENT_LOG_SECONDS), log, context)
    log.info("cloud MJF on https://%s:%d; a machine's address may hold %d connections, any other "
             "address (NAT) %d", address or "*", listener.port, shares.per_machine, shares.gateway_share)
    return listener


__all__ = ["AddressShares", "CloudMachineFiles", "CloudMjf", "CloudResolver", "address_key", "machine_url",
           "server_context", "start_cloud_mjf"]
