"""The executor's ``Runtime`` on a virtual clock, for ``vac simulate``.

vac.daemon.executor's steps are coroutines; vacd runs them as asyncio tasks. Here they are
driven by the simulation's event queue instead: a blocking call that takes time (``delays``)
suspends the step until the simulation reaches its end, an event wait until the event is set or
its timeout passes, and everything else runs at once. No asyncio, no threads: a thousand
simulated factories' steps cost only their own work.
"""

from __future__ import annotations

from typing import Any, Optional


class _Step:
    """What a step of the executor waits for: a blocking call that completes ``delay`` seconds
    later, or an event (with a timeout)."""

    def __init__(self, delay: float, function: Any = None, args: tuple = (), event: Any = None):
        self.delay = delay
        self.function = function
        self.args = args
        self.event = event

    def __await__(self):
        return (yield self)


class _Task:
    """A background step of an executor, driven by the simulation instead of asyncio."""

    def __init__(self, coroutine: Any, done: Any):
        self.coroutine = coroutine
        self.done = done
        self.token = 0  # the resumption that counts, while waiting for an event or its timeout


class VirtualEvent:
    def __init__(self, runtime: VirtualRuntime):
        self.runtime = runtime
        self.is_set = False
        self.waiter: Optional[tuple[_Task, int]] = None

    def set(self) -> None:
        self.is_set = True
        if self.waiter is not None:
            task, token = self.waiter
            self.waiter = None
            self.runtime.push_resume(0.0, task, token, True)

    async def wait(self, timeout: float) -> bool:
        if self.is_set:
            return True
        return await _Step(timeout, event=self)


class VirtualRuntime:
    """The executor's ``Runtime`` on a simulation's clock: a call to a function in ``delays``
    completes that many virtual seconds later, any other at once. ``simulation`` has ``now``
    and ``push_after(delay, handler, argument)``, which calls ``handler(argument, when)``
    ``delay`` virtual seconds from now."""

    def __init__(self, simulation: Any, delays: dict):
        self.simulation = simulation
        self.delays = delays

    def now(self) -> float:
        return self.simulation.now

    async def call(self, function: Any, *args: Any) -> Any:
        delay = self.delays.get(getattr(function, "__func__", function), 0.0)
        if delay <= 0:
            return function(*args)
        return await _Step(delay, function, args)

    def spawn(self, coroutine: Any, done: Any) -> None:
        self._advance(_Task(coroutine, done), None, None)

    def event(self) -> VirtualEvent:
        return VirtualEvent(self)

    def _advance(self, task: _Task, value: Any, error: Optional[BaseException]) -> None:
        try:
            step = task.coroutine.throw(error) if error is not None else task.coroutine.send(value)
        except StopIteration:
            task.done()
            return
        task.token += 1
        if step.event is not None:
            step.event.waiter = (task, task.token)
            self.push_resume(step.delay, task, task.token, False)
        else:
            self.simulation.push_after(step.delay, self._complete, (task, task.token, step))

    def push_resume(self, delay: float, task: _Task, token: int, value: Any) -> None:
        self.simulation.push_after(delay, self._resume, (task, token, value))

    def _resume(self, argument: tuple, _now: float) -> None:
        task, token, value = argument
        if token == task.token:  # not already resumed by the event or its timeout
            task.token += 1
            self._advance(task, value, None)

    def _complete(self, argument: tuple, _now: float) -> None:
        task, token, step = argument
        try:
            value = step.function(*step.args)
        except Exception as error:  # the executor handles it as vacd's would
            self._advance(task, None, error)
            return
        self._advance(task, value, None)
