"""Uploads to ``$JOBOUTPUTS`` (PUT, or POST for busybox ``wget --post-data``) on the MJF service.

``PUT /joboutputs/NAME`` stores the body atomically; 201 on success. NAME must match
``JOBOUTPUT_NAME``; a Content-Length is required (411), bodies are capped per file and per
machine (413), as is the number of files (403); a second upload of a name still being received
gets 409. Bodies being received are capped per machine (``upload_share_bytes``: one largest file
plus room for heartbeats), so the memory they can hold is bounded by the slot count and one
machine's uploads never delay another's (503 with ``Retry-After`` for the machine over its
share).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Optional, Union

from aiohttp import web

from vac.records.store import atomic_write
from vac.services.metadata.base import BadPath, MachineContext, path_segments, status_response
from vac.services.metadata.limits import Limits, upload_share_bytes

# Joboutput names: E3 allow-list. A leading "." is refused too, so VM files can never collide
# with the hidden temporary files of atomic writes (and a leading "-" cannot look like an option).
JOBOUTPUT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")


def joboutputs_usage(directory: Path, excluding: str) -> tuple[int, int]:
    """Bytes and number of files in ``directory``, not counting ``excluding`` (being replaced).

    Hidden names are the temporary files of uploads being written, already counted as pending;
    a file that vanishes between listing and ``stat`` (renamed over, or the machine finishing)
    no longer counts.
    """
    total = files = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name == excluding or entry.name.startswith(".") \
                    or not entry.is_file(follow_symlinks=False):
                continue
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
            files += 1
    return total, files


class Uploads:
    """The joboutputs uploads of all machines, and those being received."""

    def __init__(self, limits: Limits):
        self.limits = limits
        # Uploads being received, per joboutputs directory: name -> Content-Length, so that
        # concurrent PUTs cannot together exceed the caps or the machine's upload share.
        self._pending: dict[Path, dict[str, int]] = {}

    def _refusal(self, request: web.Request, directory: Path, name: str
                 ) -> Union[web.Response, int]:
        """An error response, or the length of an acceptable upload of ``directory/name``."""
        if not JOBOUTPUT_NAME.match(name):
            return status_response(403, f"joboutput name not allowed (must match "
                                        f"{JOBOUTPUT_NAME.pattern})")
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            return status_response(417, "only Expect: 100-continue is supported")
        length = request.content_length
        if length is None:
            return status_response(411, "a Content-Length is required")
        limits = self.limits
        if length > limits.joboutput_file_bytes:
            return status_response(413, f"joboutput larger than {limits.joboutput_file_bytes} "
                                        f"bytes")
        pending = self._pending.get(directory, {})
        if name in pending:  # one winner: the upload already under way
            return web.Response(status=409, text=f"409 {name} is already being uploaded\n",
                                headers={"Retry-After": "1"})
        # An OSError here (disk trouble, the machine's directory removed as it finishes) is
        # answered 500 and logged, rate-limited, by RequestLog.answer.
        directory.mkdir(mode=0o755, exist_ok=True)
        used_bytes, used_files = joboutputs_usage(directory, excluding=name)
        pending_bytes = sum(pending.values())
        if used_bytes + pending_bytes + length > limits.joboutputs_total_bytes:
            return status_response(413, f"joboutputs of this machine would exceed "
                                        f"{limits.joboutputs_total_bytes} bytes")
        if used_files + len(pending) >= limits.joboutputs_max_files:
            return status_response(403, f"this machine already has "
                                        f"{limits.joboutputs_max_files} joboutputs")
        share = upload_share_bytes(limits)
        if pending_bytes + length > share:
            return web.Response(status=503, text=f"503 this machine already has "
                                f"{pending_bytes} bytes of uploads under way (at most {share})\n",
                                headers={"Retry-After": "5"})
        return length

    async def put(self, request: web.Request, context: Optional[MachineContext]
                  ) -> web.Response:
        """Receive and store one upload to ``/joboutputs/NAME``, or refuse it."""
        if context is None:
            return status_response(403, "no machine at this source address")
        try:
            segments = path_segments(request.rel_url.raw_path)
        except BadPath as error:
            return status_response(403, str(error))
        if len(segments) != 2 or segments[0] != "joboutputs":
            return status_response(403, "only joboutputs/NAME can be written")
        return await self.store(request, context.directory / "joboutputs", segments[1])

    async def store(self, request: web.Request, directory: Path, name: str) -> web.Response:
        """Receive the request's body as ``directory/name`` (a machine's joboutputs directory,
        already attributed by the caller) within the caps, or refuse it."""
        verdict = self._refusal(request, directory, name)
        if isinstance(verdict, web.Response):
            return verdict
        length = verdict
        pending = self._pending.setdefault(directory, {})
        pending[name] = length
        try:
            if request.headers.get("Expect"):
                # As aiohttp's default expect handler does, but only once the checks passed.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0
            body = await self._read_body(request, length)
            if body is None:
                return status_response(408, f"body not received within "
                                            f"{self.limits.body_timeout_seconds:g} seconds")
            if len(body) != length:
                return status_response(400, f"body has {len(body)} bytes, Content-Length says "
                                            f"{length}")
            # fsync can take a while on a busy disk: off the loop, and finished even if the
            # client goes away meanwhile (the body is complete by then).
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(
                None, atomic_write, directory / name, bytes(body), 0o644))
        finally:
            del pending[name]
            if not pending:
                self._pending.pop(directory, None)
        return status_response(201, "Created")

    async def _read_body(self, request: web.Request, length: int) -> Optional[bytearray]:
        """The body (at most ``length`` bytes), or None if it is not complete in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_seconds
        body = bytearray()
        while len(body) < length:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                chunk = await asyncio.wait_for(request.content.read(length - len(body)),
                                               remaining)
            except asyncio.TimeoutError:
                return None
            if not chunk:
                break
            body += chunk
        return body
