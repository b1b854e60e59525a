"""Shared fixtures: golden files, libvirt test-driver connections and the system tier.

The system tier needs root, a reachable qemu:///system and the test guest built by
``scripts/build-guest.sh`` in ``$VAC_TEST_GUEST_DIR``. Without them its tests are skipped, or
fail when ``VAC_REQUIRE_SYSTEM=1`` (set by ``scripts/run-tests`` once it has set the tier up, so
CI can never pass by skipping it).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests import tiers

GOLDEN_DIR = Path(__file__).parent / "golden"
SYSTEM_URI = "qemu:///system"
GUEST_DIR_VARIABLE = "VAC_TEST_GUEST_DIR"
TEST_NETWORK_PREFIX = "vactest-"  # scripts/testbed-down removes leftovers of dead test runs
GUEST_MEMORY_MIB = 96  # the smallest that boots reliably under TCG (TESTBED.md §3)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate-output", action="store_true",
                     help="rewrite golden files under tests/golden from the current output")


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """``golden(relative_path, text)``: assert ``text`` equals the golden file (or rewrite it)."""
    regenerate = request.config.getoption("--regenerate-output")

    def compare(relative_path: str, text: str) -> None:
        path = GOLDEN_DIR / relative_path
        if regenerate:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"golden file {path} is missing; run pytest --regenerate-output")
        expected = path.read_text(encoding="utf-8")
        if text != expected:
            diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                                str(path), "actual"))
            pytest.fail(f"output differs from {path} (pytest --regenerate-output rewrites it):\n"
                        + diff)

    return compare


@pytest.fixture
def test_driver_uri(tmp_path: Path) -> str:
    """A private libvirt test-driver node: unlike test:///default, no state shared across tests."""
    node = tmp_path / "testnode.xml"
    node.write_text("<node/>\n", encoding="utf-8")
    return f"test://{node}"


# -- the system tier -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestGuest:
    """The tiny guest of scripts/build-guest.sh."""

    __test__ = False  # not a test class, despite the name

    kernel: str
    initrd: str
    iso: str
    cmdline: str


def _system_tier_problem() -> tuple[Optional[str], Optional[TestGuest]]:
    if os.geteuid() != 0:
        return "the system tier needs root", None
    guest_dir = os.environ.get(GUEST_DIR_VARIABLE)
    if not guest_dir:
        return f"{GUEST_DIR_VARIABLE} is not set (scripts/run-tests sets it)", None
    paths = {name: os.path.join(guest_dir, name)
             for name in ("vmlinuz", "initrd.gz", "guest.iso", "cmdline")}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        return f"test guest incomplete, missing {', '.join(missing)} (scripts/build-guest.sh)", None
    try:
        import libvirt

        libvirt.open(SYSTEM_URI).close()
    except Exception as error:  # any failure here means "no libvirtd", whatever its cause
        return f"cannot connect to {SYSTEM_URI}: {error} (scripts/testbed-up)", None
    with open(paths["cmdline"], encoding="ascii") as handle:
        cmdline = handle.read().strip()
    return None, TestGuest(kernel=paths["vmlinuz"], initrd=paths["initrd.gz"],
                           iso=paths["guest.iso"], cmdline=cmdline)


@pytest.fixture(scope="session")
def system_guest() -> TestGuest:
    """The test guest, once libvirtd is known to be reachable; skips (or fails) otherwise."""
    problem, guest = _system_tier_problem()
    tiers.require(tiers.SYSTEM, problem)
    return guest


_network_numbers = itertools.count()


@dataclasses.dataclass(frozen=True)
class TestNetworkNames:
    __test__ = False

    network: str
    bridge: str


def _remove_network(name: str) -> None:
    from vac.backends.vm.hypervisor import Hypervisor

    hypervisor = Hypervisor(SYSTEM_URI, lambda event: None)
    hypervisor.connect()
    try:
        hypervisor.remove_network(name)
    finally:
        hypervisor.close()


@pytest.fixture(scope="module")
def system_network_names(system_guest: TestGuest):
    """A unique network and bridge name for this process; the network is removed afterwards.

    Only one network on 169.254.0.0/16 can exist at a time (TESTBED.md P6), hence module scope:
    each test module gets its own, one after the other.
    """
    number = next(_network_numbers)
    names = TestNetworkNames(network=f"{TEST_NETWORK_PREFIX}{os.getpid()}-{number}",
                             bridge=f"vt{os.getpid()}n{number}"[:15])
    yield names
    _remove_network(names.network)


class EventRecorder:
    """An event sink for ``vac.backends.vm.hypervisor.Hypervisor`` that tests can wait on (thread-safe)."""

    __test__ = False

    def __init__(self) -> None:
        self._clock = time.monotonic
        self._condition = threading.Condition()
        self.events: list = []  # (monotonic time, DomainEvent)

    def __call__(self, event) -> None:
        with self._condition:
            self.events.append((self._clock(), event))
            self._condition.notify_all()

    def kinds(self, uuid: Optional[str] = None) -> list:
        with self._condition:
            return [event.kind for _, event in self.events if uuid is None or event.uuid == uuid]

    def wait_for(self, kind, uuid: Optional[str] = None, timeout: float = 10.0):
        """The time and event of the first ``kind`` event (for ``uuid``); fails on timeout."""
        deadline = self._clock() + timeout
        with self._condition:
            while True:
                for when, event in self.events:
                    if event.kind == kind and (uuid is None or event.uuid == uuid):
                        return when, event
                remaining = deadline - self._clock()
                if remaining <= 0:
                    pytest.fail(f"no {kind} event for {uuid} within {timeout} s; "
                                f"got {[event for _, event in self.events]}")
                self._condition.wait(remaining)


@pytest.fixture
def events() -> EventRecorder:
    return EventRecorder()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the measurements tests recorded with ``record_property("timing", text)``."""
    lines = [f"{report.nodeid}: {value}"
             for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == "timing"]
    if lines:
        terminalreporter.section("timings")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory):
    """moto's real EC2 server on loopback, one per test module (tests/cloudservers.py)."""
    from tests.cloudservers import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()
