"""The executor's runtime in vacd: the asyncio loop, a small thread pool and the clock.

Blocking work (libvirt, engines, disks, downloads, record writes of CPU samples) runs in the
pool so that the VacQuery responder and the HTTP services on the loop never stall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Coroutine
from typing import Any, Callable

EXECUTOR_THREADS = 8


class LoopEvent:
    """The executor's ``Event`` over asyncio.Event."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        return self._event.is_set()


class LoopRuntime:
    """The executor's ``Runtime``; ``tasks`` are its background steps in flight."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.pool = concurrent.futures.ThreadPoolExecutor(EXECUTOR_THREADS, "vacd-io")
        self.tasks: set[asyncio.Task] = set()

    def now(self) -> float:
        return self.clock()

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def spawn(self, coroutine: Coroutine, done: Callable[[], None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(lambda finished: (self.tasks.discard(finished), done()))

    def event(self) -> LoopEvent:
        return LoopEvent()

    async def cancel(self) -> None:
        """Cancel the steps in flight and stop the pool (vacd is stopping)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pool.shutdown(wait=False)
