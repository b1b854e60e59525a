"""The Machine/Job Features service (169.254.169.253).

* GET/HEAD ``/machinefeatures[/]``, ``/jobfeatures[/]``: the classic HTML list of keys;
  ``/machinefeatures/KEY``, ``/jobfeatures/KEY``: the value, 404 if absent. ``/joboutputs``: 403.
  (``mjf_get``, also vcycle's HTTPS MJF's, below its per-machine prefix.)
* PUT (or POST) ``/joboutputs/NAME``: vac.services.metadata.joboutputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from aiohttp import web

from vac.core.model import slot_for_ip
from vac.services.fairness import SlotForAddress
from vac.services.metadata.base import (
    MachineContext,
    Resolver,
    Service,
    bytes_response,
    read_document,
    read_request,
    status_response,
    text_response,
)
from vac.services.metadata.files import MJF_DIRECTORIES, MJF_KEY
from vac.services.metadata.joboutputs import Uploads
from vac.services.metadata.limits import DEFAULT_LIMITS, Limits


def mjf_listing(directory: Path) -> str:
    """The classic HTML list of the MJF keys in ``directory`` (empty if it is absent)."""
    try:
        keys = sorted(entry.name for entry in os.scandir(directory)
                      if MJF_KEY.match(entry.name) and entry.is_file(follow_symlinks=False))
    except FileNotFoundError:
        keys = []
    items = "".join(f'<li><a href="{key}">{key}</a></li>' for key in keys)
    return f"<html><body><ul>{items}</ul></body></html>"


def mjf_get(directory: Path, segments: list[str]) -> web.Response:
    """The answer to a GET of ``segments`` (a path's, already decoded) from the machine whose
    MJF files are in ``directory``: a key list, a value, or the refusal."""
    if segments[:1] == ["joboutputs"]:
        return status_response(403, "joboutputs are write-only")
    if not segments or segments[0] not in MJF_DIRECTORIES or len(segments) > 2:
        return status_response(404, "not found")
    features = directory / segments[0]
    if len(segments) == 1:
        return text_response(mjf_listing(features), "text/html")
    if not MJF_KEY.match(segments[1]):
        return status_response(404, "not a valid MJF key name")
    data = read_document(features / segments[1])
    if data is None:
        return status_response(404, f"no {segments[0]} key {segments[1]}")
    return bytes_response(data, "text/plain")


class MjfService(Service):
    name = "mjf"

    def __init__(self, resolve: Resolver, slot_for_address: SlotForAddress, limits: Limits):
        super().__init__(resolve, slot_for_address, limits)
        self.uploads = Uploads(limits)

    async def handle(self, request: web.Request, context: Optional[MachineContext]
                     ) -> web.StreamResponse:
        if request.method in ("PUT", "POST"):
            return await self.uploads.put(request, context)
        segments = read_request(request, context, "GET, HEAD, PUT, POST")
        if isinstance(segments, web.Response):
            return segments
        return mjf_get(context.directory, segments)


def mjf_app(resolve: Resolver, *, slot_for_address: SlotForAddress = slot_for_ip,
            limits: Limits = DEFAULT_LIMITS) -> web.Application:
    """The MJF service as an aiohttp application."""
    return MjfService(resolve, slot_for_address, limits).application()
