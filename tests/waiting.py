"""The bounded wait of the scenario tiers: a condition polled until it holds or time is up."""

from __future__ import annotations

import subprocess
import time
from typing import Callable, Optional, TypeVar

import pytest

T = TypeVar("T")


def wait_until(what: str, predicate: Callable[[], T], timeout: float, *, poll: float = 0.2,
               process: Optional[subprocess.Popen] = None, name: str = "the process",
               details: Callable[[], str] = lambda: "") -> T:
    """The first true value of ``predicate``, tried every ``poll`` s; fails after ``timeout`` s,
    or at once if ``process`` (called ``name``) exits meanwhile: then nothing would come.
    ``details()`` (a log's tail, a journal) ends the failure message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode} while waiting for {what}:\n"
                        f"{details()}")
        result = predicate()
        if result:
            return result
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{details()}")
