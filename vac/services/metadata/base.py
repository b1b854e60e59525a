"""What the metadata and MJF services share: attributing a request to a machine, request paths
that are always plain file names, reading a machine's files, responses and the request log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import urllib.parse
from collections.abc import Awaitable
from pathlib import Path
from typing import Callable, Optional, Union

from aiohttp import web

from vac.core.model import Machine
from vac.services.fairness import LogLimiter, SlotForAddress
from vac.services.metadata.limits import Limits

# One logger for the whole package: operators filter on it, whichever module logs.
log = logging.getLogger(__package__)

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # user_data and MJF values larger than this are a bug
CLIENT_GONE = 499  # logged (nginx's convention) when a client leaves before the answer


@dataclasses.dataclass(frozen=True)
class MachineContext:
    """The machine currently in a slot and its directory (``<state_dir>/machines/<dir name>``)."""

    machine: Machine
    directory: Path


Resolver = Callable[[int], Optional[MachineContext]]


# ---------------------------------------------------------------------------------------------
# Request paths


class BadPath(ValueError):
    """A request path that could name something outside the served tree."""


def path_segments(raw_path: str) -> list[str]:
    """The percent-decoded, non-empty segments of a raw request path.

    ``//`` folds and a trailing ``/`` vanishes. Dot segments, separators or control characters
    inside a segment (even percent-encoded) and invalid UTF-8 raise ``BadPath``, so a segment is
    always a plain file name.
    """
    if not raw_path.startswith("/"):
        raise BadPath(f"path does not start with '/': {raw_path[:80]!r}")
    segments = []
    for raw in raw_path.split("/"):
        if not raw:
            continue
        try:
            segment = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError as error:
            raise BadPath(f"invalid UTF-8 in {raw[:80]!r}") from error
        if segment in (".", "..") or not segment.isprintable() or "/" in segment \
                or "\\" in segment:
            raise BadPath(f"forbidden path segment {raw[:80]!r}")
        segments.append(segment)
    return segments


# ---------------------------------------------------------------------------------------------
# Documents


def read_document(path: Path) -> Optional[bytes]:
    """Contents of a regular file, or None if it is absent. Symbolic links are not followed."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:  # plain os calls: this runs for every request, a buffered file object costs 3x more
        chunk_bytes = min(os.fstat(descriptor).st_size + 1, MAX_DOCUMENT_BYTES + 1)
        chunks = []
        size = 0
        while size <= MAX_DOCUMENT_BYTES:
            chunk = os.read(descriptor, chunk_bytes)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise OSError(f"{path} is larger than {MAX_DOCUMENT_BYTES} bytes")
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------
# Responses


def text_response(text: str, content_type: str = "text/plain") -> web.Response:
    return web.Response(text=text, content_type=content_type,
                        headers={"Cache-Control": "no-cache"})


def bytes_response(body: bytes, content_type: str) -> web.Response:
    return web.Response(body=body, content_type=content_type,
                        headers={"Cache-Control": "no-cache"})


def status_response(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=f"{status} {reason}\n")


def json_response(document: dict) -> web.Response:
    return text_response(json.dumps(document, sort_keys=True), "application/json")


def read_request(request: web.Request, context: Optional[MachineContext], allowed: str
                 ) -> Union[web.Response, list[str]]:
    """The path segments of a GET/HEAD from a known machine, or the response refusing it."""
    if request.method not in ("GET", "HEAD"):
        methods = allowed.rsplit(", ", 1)
        return web.Response(status=405, text=f"405 only {' and '.join(methods)}\n",
                            headers={"Allow": allowed})
    if context is None:
        return status_response(404, "no machine at this source address")
    try:
        return path_segments(request.rel_url.raw_path)
    except BadPath as error:
        return status_response(404, str(error))


# ---------------------------------------------------------------------------------------------
# Services


def catch_all_application(entry: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.Application:
    """An application sending every request to ``entry``: paths are parsed from the raw path
    there, never by the router. ``Expect: 100-continue`` is left to the upload code, which
    answers it only after its checks."""
    app = web.Application()
    app.router.add_route("*", r"/{path:[\s\S]*}", entry, expect_handler=_no_expect)
    return app


async def _no_expect(request: web.Request) -> None:
    """See ``catch_all_application``."""


class RequestLog:
    """A service's request log, rate-limited per machine, and its answers when the client goes
    away or a machine's files cannot be used."""

    def __init__(self, logger: logging.Logger, limits: Limits):
        self.log = logger
        self.limiter = LogLimiter(limits.log_burst, limits.log_per_second)

    async def answer(self, who: str, line: str, handling: Awaitable[web.StreamResponse]
                     ) -> web.StreamResponse:
        """The response ``handling`` gives; one line ``<line> <status>[: problem]`` for it,
        ERROR for a 5xx, with ``who``'s rate limit."""
        status, problem = 500, ""
        try:
            try:
                response = await handling
            except asyncio.CancelledError:
                # The client went away and aiohttp cancelled the handler. A joboutput whose
                # body had arrived is still written (the write is shielded).
                status, problem = CLIENT_GONE, ": client closed the connection"
                raise
            except ConnectionError:
                # The client went away while we read its request: nobody gets this answer,
                # but returning one keeps aiohttp from logging a traceback for it.
                status, problem = CLIENT_GONE, ": client closed the connection"
                return web.Response(status=CLIENT_GONE)
            except OSError as error:  # the machine's files: unreadable, too big, disk trouble
                problem = f": {error}"
                response = status_response(500, "this machine's files cannot be used")
            status = response.status
            return response
        finally:
            dropped = self.limiter.admit(who)
            if dropped is not None:
                note = f" ({dropped} lines from {who} suppressed)" if dropped else ""
                self.log.log(logging.ERROR if 500 <= status < 600 else logging.INFO,
                             "%s %d%s%s", line, status, problem, note)


class Service:
    """What both services share: attribution of a request to a machine and the request log."""

    name = ""

    def __init__(self, resolve: Resolver, slot_for_address: SlotForAddress, limits: Limits):
        self.resolve = resolve
        self.slot_for_address = slot_for_address
        self.limits = limits
        self.request_log = RequestLog(log, limits)

    def application(self) -> web.Application:
        return catch_all_application(self._entry)

    def _identify(self, request: web.Request) -> tuple[str, Optional[MachineContext]]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        address = peer[0] if peer else "?"
        slot = self.slot_for_address(address)
        context = self.resolve(slot) if slot is not None else None
        if context is not None and context.machine.slot != slot:
            log.error("%s: resolver returned %s (slot %d) for slot %d; refusing %s", self.name,
                      context.machine.name, context.machine.slot, slot, address)
            context = None
        return (context.machine.name if context else f"unknown({address})"), context

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        who, context = self._identify(request)
        line = f"{self.name} {who} {request.method} {repr(request.raw_path[:200])[1:-1]}"
        return await self.request_log.answer(who, line, self.handle(request, context))

    async def handle(self, request: web.Request, context: Optional[MachineContext]
                     ) -> web.StreamResponse:
        raise NotImplementedError
