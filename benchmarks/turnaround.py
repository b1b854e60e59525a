"""Slot turnaround, creation overhead and resident memory of vacd on real libvirtd + QEMU (TCG).

Targets (ARCHITECTURE.md §8):

* slot turnaround: guest poweroff -> the next VM's ``createXML`` in that slot, p50 < 1 s;
* vacd's overhead per VM: creation through vacd vs a bare ``createXML`` of the same XML, <= 1.2x;
* vacd's resident memory with 64 running slots < 80 MB.

Run as root with libvirtd up (``scripts/testbed-up``) and the test guest built
(``scripts/build-guest.sh guest``)::

    .venv/bin/python benchmarks/turnaround.py [--cycles 8] [--slots 1] [--bare-samples 5]

What runs, in this order, on one isolated libvirt network ``vactest-<pid>-bench`` (only one
network on 169.254.0.0/16 can exist on a host, TESTBED.md P6: the benchmark waits while another
``vactest-`` network is active):

1. **bare**: the benchmark makes the factory network itself, then creates ``--bare-samples``
   domains with ``conn.createXML(xml, VIR_DOMAIN_START_VALIDATE)`` (vacd's call), where ``xml``
   comes from ``vac.backends.vm.disks.prepare_disks`` + ``vac.backends.vm.domain.machine_domain_spec`` for the same
   settings and machinetype vacd uses. It times the call, waits 1 s, and times ``destroy()``.
2. **vacd**: a real vacd process (``--log-file --log-format json --debug``) on that network
   with ``--slots`` slots, whose guests run ``vac-put shutdown_message "200 ok"`` and power off
   (so every machine ends by a guest poweroff), until ``--cycles`` slot turnarounds happened.
   vacd runs unmodified except for one hook installed by this script (``--run-vacd``): it logs
   ``createXML begin|end NAME UUID`` around ``vac.backends.vm.hypervisor.Hypervisor.create``, so the moment
   vacd calls ``createXML`` is known to the millisecond. Its VmRSS is sampled every 0.5 s.
3. **model**: a child process runs ``vac.daemon.vacd.Factory`` in-process with ``tests.fakes``'s
   FakeWorks (no libvirt) and 64 slots, and reports its VmRSS with the model empty, with 64
   RUNNING machines, after 3 complete turnovers of all 64, and the Python heap (tracemalloc)
   that filling 64 slots allocates.

Measured moments (wall clock; libvirt events by a separate connection with an event loop in this
process, vacd's log lines from its JSON log at 1 ms resolution):

* PUT:       vacd logs ``mjf NAME PUT|POST /joboutputs/shutdown_message STATUS``, the last such
             line before SHUTDOWN (the guest's last request; vac-put retries after 1 s when it
             gets no answer, then ``sync; poweroff -f`` follows);
* SHUTDOWN:  libvirt's SHUTDOWN lifecycle event of the domain = **guest poweroff**;
* STOPPED:   libvirt's STOPPED event (the transient domain is gone);
* off:       vacd logs ``NAME (TYPE) powered off`` (its STOPPED handler ran);
* finished:  vacd logs ``NAME (TYPE) finished after ...`` (accounted, disks released, slot free);
* creating:  vacd logs ``creating NAME (...)`` for the next machine of the slot (planned);
* xml-begin: the hook logs ``createXML begin`` = **the next VM's createXML** (the call starts);
* xml-end:   ``createXML end`` (the call returned);
* running:   vacd logs ``NAME (UUID) is running``.

Slot turnaround = xml-begin(next machine) - SHUTDOWN(previous machine) in the same slot.
vacd's creation time = running - creating (directory, MJF, user_data, disks, XML, createXML,
record); the overhead ratio is its median over the median bare ``createXML`` duration.

``--destroy-on-shutdown`` makes this process ``destroy()`` every factory domain on its SHUTDOWN
event, which simulates vacd reacting to SHUTDOWN with ``destroy()`` instead of waiting for STOPPED.
``--keep`` keeps the temporary directory (vacd's log, machine directories, guest consoles).

On the testbed, SHUTDOWN -> STOPPED includes ~1.3 s in which QEMU is an unreaped zombie:
libvirt daemonizes QEMU, so its parent is PID 1, and this host's PID 1 (not systemd) reaps
orphans only after ~1.7 s, while libvirt polls the PID until it disappears (TESTBED.md P8).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_TURNAROUND_P50_SECONDS = 1.0
TARGET_OVERHEAD_RATIO = 1.2
TARGET_RSS_64_MB = 80.0
MODEL_SLOTS = 64
MODEL_TURNOVERS = 3
MODEL_TIMEOUT_SECONDS = 120

URI = "qemu:///system"
TEST_NETWORK_PREFIX = "vactest-"  # scripts/testbed-down removes such networks of dead processes
NETWORK_WAIT_SECONDS = 600.0
NETWORK_POLL_SECONDS = 10.0
EVENT_TIMEOUT_SECONDS = 30.0
STATE_DIR_PARENT = "/var/tmp"  # noqa: S108 - QEMU (libvirt-qemu) must traverse the state dir
USER_DATA = '#!/bin/sh\nvac-put shutdown_message "200 ok"\n'
MACHINETYPE = "bench"


# -- the vacd child: unmodified vacd plus one timing hook ----------------------------------------


def run_hooked_vacd(argv: list[str]) -> int:
    """vac.daemon.vacd.main with ``createXML begin|end NAME UUID`` logged around Hypervisor.create."""
    import logging

    from vac.backends.vm import hypervisor
    from vac.daemon import vacd as daemon

    hook_log = logging.getLogger("bench.hook")
    create = hypervisor.Hypervisor.create

    def timed_create(self, spec):
        hook_log.info("createXML begin %s %s", spec.name, spec.uuid)
        try:
            create(self, spec)
        finally:
            hook_log.info("createXML end %s %s", spec.name, spec.uuid)

    hypervisor.Hypervisor.create = timed_create
    return daemon.main(argv)


# -- the model child: Factory with fake works and 64 slots ---------------------------------------


def memory_kb(pid: int | str = "self") -> Optional[dict[str, int]]:
    """VmRSS and its anonymous and file-backed parts (kB) from /proc/PID/status."""
    wanted = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    found = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key = wanted.get(line.split(maxsplit=1)[0] if line.strip() else "")
                if key:
                    found[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return found if len(found) == len(wanted) else None


MODEL_CONFIG = """
[settings]
vac_space = space.example.org
factory_name = model.example.org
state_dir = {state}
total_processors = {slots}
max_creating = {slots}
max_probes = {slots}
metadata_address = 127.0.0.1
mjf_address = 127.0.0.2
http_port = 0
vacquery_address = 127.0.0.1
vacquery_port = 0
hs06_per_processor = 10

[machinetype {machinetype}]
target_share = 1
root_image = /images/bench.iso
user_data = /images/bench.user_data
fizzle_seconds = 1
"""


def run_model(slots: int) -> int:
    """Print JSON: VmRSS (kB) of an in-process Factory holding 0, then ``slots`` machines."""
    import gc
    import tracemalloc

    from tests.fakes import FAKE_BACKENDS, FakeClock, FakeWorks, settle
    from vac.core import config as configmod
    from vac.core.model import MachineState
    from vac.core.scheduler import HostFacts
    from vac.daemon.vacd import Factory

    host = HostFacts(processors=slots, load_averages=(0.0, 0.0, 0.0),
                     state_dir_free_bytes=1 << 40, free_memory_bytes=1 << 40)
    result: dict = {"slots": slots, "imported": memory_kb()}

    def running(factory: Factory) -> int:
        return sum(m.state is MachineState.RUNNING for m in factory.machines.values())

    async def fill(factory: Factory, clock: FakeClock) -> None:
        for _ in range(slots + 10):
            if running(factory) == slots:
                return
            clock.advance(5)
            await factory.cycle(reconcile=True)
            await settle(factory, 4 * slots + 10)
        states = sorted(m.state.value for m in factory.machines.values())
        raise RuntimeError(f"model: only {running(factory)} of {slots} machines running "
                           f"(states {states}); plan notes: {sorted(factory.last_notes)}")

    async def power_off_all(factory: Factory, works: FakeWorks, clock: FakeClock) -> None:
        # Draining until the next reloading cycle (fill's): the slots stay empty meanwhile.
        factory.config = factory.config.replace(settings=dataclasses.replace(
            factory.config.settings, draining=True))
        clock.advance(600)
        for machine in list(factory.machines.values()):
            works.power_off(machine.uuid)
        await asyncio.sleep(0)  # the events reach the loop through call_soon_threadsafe
        await settle(factory, 4 * slots + 10)

    async def scenario(root: Path) -> None:
        conf_dir = root / "vac.d"
        conf_dir.mkdir()
        (conf_dir / "10-model.conf").write_text(MODEL_CONFIG.format(
            state=root / "state", slots=slots, machinetype=MACHINETYPE))
        paths = configmod.ConfigPaths(conf_dir=str(conf_dir), main_conf=str(root / "none.conf"),
                                      run_confs=(str(root / "run.conf"),))
        clock = FakeClock()
        factory = Factory(paths, clock=clock, works_factory=FakeWorks, backend_makers=FAKE_BACKENDS,
                          host_facts=lambda _store: host, processor_count=slots)
        await factory.start()
        works = FakeWorks.instances[-1]
        gc.collect()
        result["empty"] = memory_kb()
        await fill(factory, clock)
        gc.collect()
        result["full"] = memory_kb()
        for _ in range(MODEL_TURNOVERS):
            await power_off_all(factory, works, clock)
            await fill(factory, clock)
        gc.collect()
        result["turned_over"] = memory_kb()
        result["finished_machines"] = len(works.named("release"))
        await power_off_all(factory, works, clock)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await fill(factory, clock)
        gc.collect()
        result["heap_fill_kb"] = (tracemalloc.get_traced_memory()[0] - before) // 1024
        tracemalloc.stop()
        factory.stopping.set()
        await factory.shutdown()

    async def bounded(root: Path) -> None:
        try:
            await asyncio.wait_for(scenario(root), MODEL_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            raise RuntimeError(f"model: not done within {MODEL_TIMEOUT_SECONDS} s; "
                               f"got as far as {sorted(result)}") from None

    with tempfile.TemporaryDirectory(prefix="vac-bench-model-") as root:
        asyncio.run(bounded(Path(root)))
    print(json.dumps(result))
    return 0


# -- the parent: libvirt events, bare samples, vacd run, analysis --------------------------------


@dataclasses.dataclass(frozen=True)
class Guest:
    kernel: str
    initrd: str
    iso: str
    cmdline: str

    @classmethod
    def from_dir(cls, directory: Path) -> Guest:
        paths = [directory / name for name in ("vmlinuz", "initrd.gz", "guest.iso", "cmdline")]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise SystemExit(f"turnaround: test guest incomplete, missing {', '.join(missing)} "
                             f"(run scripts/build-guest.sh {directory})")
        return cls(str(paths[0]), str(paths[1]), str(paths[2]), paths[3].read_text().strip())


class Lifecycle:
    """Lifecycle events of every domain, recorded with wall-clock times on arrival."""

    def __init__(self, destroy_prefix: Optional[str] = None):
        import libvirt

        from vac.backends.vm.hypervisor import start_event_loop

        self.libvirt = libvirt
        self.kinds = {libvirt.VIR_DOMAIN_EVENT_STARTED: "STARTED",
                      libvirt.VIR_DOMAIN_EVENT_RESUMED: "RESUMED",
                      libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "SHUTDOWN",
                      libvirt.VIR_DOMAIN_EVENT_STOPPED: "STOPPED"}
        self.destroy_prefix = destroy_prefix
        self.destroy_times: list[float] = []  # destroy() durations of --destroy-on-shutdown
        self.condition = threading.Condition()
        self.events: list[tuple[float, str, str, str]] = []  # (time, kind, uuid, name)
        start_event_loop()  # before open(): the connection needs it for events
        self.conn = libvirt.open(URI)
        self.callback = self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None)

    def _on_event(self, _conn, domain, event, _detail, _opaque) -> None:
        now = time.time()
        kind = self.kinds.get(event, str(event))
        uuid, name = domain.UUIDString(), domain.name()
        with self.condition:
            self.events.append((now, kind, uuid, name))
            self.condition.notify_all()
        if kind == "SHUTDOWN" and self.destroy_prefix and name.startswith(self.destroy_prefix):
            # No libvirt calls on the event thread: it must stay free to deliver the replies.
            threading.Thread(target=self._destroy, args=(uuid,), daemon=True).start()

    def _destroy(self, uuid: str) -> None:
        start = time.perf_counter()
        try:
            self.conn.lookupByUUIDString(uuid).destroy()
        except self.libvirt.libvirtError:
            return  # already gone
        self.destroy_times.append(time.perf_counter() - start)

    def first(self, kind: str, uuid: str) -> Optional[float]:
        with self.condition:
            return next((t for t, k, u, _ in self.events if k == kind and u == uuid), None)

    def wait(self, kind: str, uuid: str, timeout: float = EVENT_TIMEOUT_SECONDS) -> float:
        deadline = time.monotonic() + timeout
        with self.condition:
            while True:
                found = next((t for t, k, u, _ in self.events if k == kind and u == uuid), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {kind} event for {uuid} within {timeout} s")
                self.condition.wait(remaining)

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self.callback)
        finally:
            self.conn.close()


def active_test_networks() -> Optional[list[str]]:
    """Active ``vactest-`` networks, or None if libvirtd does not answer (e.g. restarting)."""
    try:
        result = subprocess.run(["virsh", "-c", URI, "net-list", "--name"], capture_output=True,
                                text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0:
        return None
    return [name for name in result.stdout.split() if name.startswith(TEST_NETWORK_PREFIX)]


def wait_for_free_subnet() -> None:
    """Only one network on 169.254.0.0/16 at a time (TESTBED.md P6): wait for others' tests."""
    deadline = time.monotonic() + NETWORK_WAIT_SECONDS
    while True:
        others = active_test_networks()
        if others == []:
            return
        if time.monotonic() >= deadline:
            raise SystemExit(f"turnaround: after {NETWORK_WAIT_SECONDS:.0f} s, "
                             + (f"test networks {others} are still active" if others
                                else f"{URI} still does not answer (scripts/testbed-up)"))
        print("waiting for " + (f"test network(s) {', '.join(others)} to go away" if others
                                else f"{URI} to answer") + " ...", flush=True)
        time.sleep(NETWORK_POLL_SECONDS)


VACD_CONFIG = """
[settings]
vac_space = space.example.org
factory_name = {factory}
gocdb_sitename = BENCH-SITE
hs06_per_processor = 10
state_dir = {state}
libvirt_uri = {uri}
domain_type = qemu
network_name = {network}
bridge_name = {bridge}
network_forward = none
vacquery_address = 127.0.0.1
vacquery_port = 0
total_processors = {slots}
mb_per_processor = 96
disk_gb_per_processor = 1
root_public_key = {root}/no-key.pub
stop_grace_seconds = 3
reconcile_seconds = 60
# The host's load comes from the guests of this benchmark, not from other work.
overload_per_processor = 1000
kernel = {guest.kernel}
initrd = {guest.initrd}
kernel_cmdline = {guest.cmdline}

[machinetype {machinetype}]
target_share = 1
machine_model = cernvm3
root_image = {guest.iso}
user_data = {root}/user_data
fizzle_seconds = 1
"""


@dataclasses.dataclass
class Bench:
    root: Path
    guest: Guest
    slots: int
    factory: str
    network: str
    bridge: str

    @property
    def conf_dir(self) -> Path:
        return self.root / "vac.d"

    @property
    def log_path(self) -> Path:
        return self.root / "vacd.log"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def write_config(self) -> None:
        self.conf_dir.mkdir()
        (self.root / "user_data").write_text(USER_DATA)
        (self.conf_dir / "10-bench.conf").write_text(VACD_CONFIG.format(
            factory=self.factory, state=self.state, uri=URI, network=self.network,
            bridge=self.bridge, slots=self.slots, root=self.root, guest=self.guest,
            machinetype=MACHINETYPE))

    def config_paths(self):
        from vac.core import config as configmod

        return configmod.ConfigPaths(conf_dir=str(self.conf_dir),
                                     main_conf=str(self.root / "absent.conf"),
                                     run_confs=(str(self.root / "run.conf"),))

    def load_config(self):
        from vac.core import config as configmod

        config, problems = configmod.load_config(self.config_paths(), processor_count=self.slots)
        if config is None:
            raise SystemExit("turnaround: bad benchmark config: "
                             + "; ".join(str(problem) for problem in problems))
        return config

    def vacd_argv(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--run-vacd",
                "--conf-dir", str(self.conf_dir), "--conf", str(self.root / "absent.conf"),
                "--run-conf", str(self.root / "run.conf"), "--log-file", str(self.log_path),
                "--log-format", "json", "--debug"]

    def records(self) -> list[dict]:
        # Imported here: this module is also vacd's main (--run-vacd), whose memory is measured.
        from tests.vacdprocess import machine_records

        return machine_records(self.state / "machines")


def make_network(config) -> None:
    """The factory network exactly as vacd makes it; vacd later finds it and keeps it."""
    from vac.backends.vm import hypervisor
    from vac.backends.vm.domain import factory_network

    adapter = hypervisor.Hypervisor(URI, lambda _event: None)
    adapter.connect()
    try:
        adapter.ensure_network(factory_network(config.settings))
    finally:
        adapter.close()


def bare_samples(bench: Bench, config, lifecycle: Lifecycle, count: int) -> tuple[list, list]:
    """Durations of bare createXML calls of vacd's XML for slot 0, and of destroy() 1 s later."""
    import libvirt

    from vac.backends.vm import disks
    from vac.backends.vm.domain import machine_domain_spec
    from vac.core.model import Machine, slot_name

    settings = config.settings
    machinetype = config.machinetypes[MACHINETYPE]
    creates, destroys = [], []
    for index in range(count):
        now = time.time()
        machine = Machine(uuid=str(uuidlib.uuid4()), name=slot_name(settings.factory_name, 0),
                          slot=0, machinetype=machinetype.name,
                          machine_model=machinetype.machine_model, processors=1, created=now,
                          deadline=now + 3600)
        directory = bench.root / "bare" / str(index)
        directory.mkdir(parents=True)
        machine_disks = disks.prepare_disks(settings, machinetype, machine,
                                            str(directory / "disks"), bench.guest.iso)
        xml = machine_domain_spec(machine, machinetype, settings, str(directory),
                                  machine_disks).to_xml()
        start = time.perf_counter()
        domain = lifecycle.conn.createXML(xml, libvirt.VIR_DOMAIN_START_VALIDATE)
        creates.append(time.perf_counter() - start)
        time.sleep(1.0)
        start = time.perf_counter()
        domain.destroy()
        destroys.append(time.perf_counter() - start)
        lifecycle.wait("STOPPED", machine.uuid)
        disks.release_disks(settings, machine, str(directory / "disks"))
    return creates, destroys


@dataclasses.dataclass
class VacdRun:
    memory_samples: list  # (memory_kb() of vacd, machines running then)
    records: list
    log: list  # (time, message)
    returncode: Optional[int]


def run_vacd(bench: Bench, cycles: int, timeout: float) -> VacdRun:
    """Run vacd until ``cycles`` turnarounds happened; sample its RSS; stop it (SIGTERM)."""
    wanted = cycles + bench.slots  # machines that must have started
    process = subprocess.Popen(bench.vacd_argv(), stdin=subprocess.DEVNULL, cwd=str(REPO))
    samples = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"turnaround: vacd exited with {process.returncode}; see "
                                 f"{bench.log_path}:\n{tail(bench.log_path)}")
            records = bench.records()
            running = sum(record["state"] == "running" for record in records)
            memory = memory_kb(process.pid)
            if memory is not None:
                samples.append((memory, running))
            if len([r for r in records if r.get("started")]) >= wanted:
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"turnaround: fewer than {wanted} machines started within "
                             f"{timeout:.0f} s; see {bench.log_path}:\n{tail(bench.log_path)}")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
    return VacdRun(samples, bench.records(), read_json_log(bench.log_path), process.returncode)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def read_json_log(path: Path) -> list[tuple[float, str]]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            # The JSON time is truncated to the millisecond: centre it on its millisecond.
            when = datetime.datetime.fromisoformat(entry["time"]).timestamp() + 0.0005
        except (ValueError, KeyError, TypeError):
            continue  # a traceback line or a foreign one
        lines.append((when, entry["message"]))
    return lines


# -- analysis ------------------------------------------------------------------------------------

STAGES = (("PUT", "SHUTDOWN", "guest: vac-put exits, sync, poweroff -f"),
          ("SHUTDOWN", "STOPPED", "libvirt: QEMU exit and teardown (vacd does not wait)"),
          ("SHUTDOWN", "off", "vacd: event to the loop, record saved"),
          ("off", "finished", "vacd: finish (APEL, release disks, slot)"),
          ("finished", "creating", "vacd: wake, reload-free cycle, plan"),
          ("creating", "xml-begin", "vacd: dir, MJF, user_data, disks, XML"),
          ("xml-begin", "xml-end", "libvirt: createXML"),
          ("xml-end", "running", "vacd: record the machine running"))


def moments(run: VacdRun, lifecycle: Lifecycle) -> dict[str, dict[str, float]]:
    """Per machine uuid: the moments named in the module docstring."""
    patterns = {
        "creating": re.compile(r"^creating (\S+) \("),
        "off": re.compile(r"^(\S+) \(\S+\) powered off$"),
        "finished": re.compile(r"^(\S+) \(\S+\) finished after "),
        "PUT": re.compile(r"^mjf (\S+) (?:PUT|POST) /joboutputs/shutdown_message (\d+)"),
    }
    by_uuid = {
        "xml-begin": re.compile(r"^createXML begin \S+ (\S+)$"),
        "xml-end": re.compile(r"^createXML end \S+ (\S+)$"),
        "running": re.compile(r"^\S+ \((\S+)\) is running$"),
    }
    result: dict[str, dict[str, float]] = {}
    for record in run.records:
        result[record["uuid"]] = {"name": record["name"], "slot": record["slot"]}
    for when, message in run.log:
        for key, pattern in by_uuid.items():
            match = pattern.match(message)
            if match and match.group(1) in result:
                result[match.group(1)].setdefault(key, when)
    for uuid, moment in result.items():
        for kind in ("SHUTDOWN", "STOPPED", "STARTED"):
            when = lifecycle.first(kind, uuid)
            if when is not None:
                moment[kind] = when
    # Names repeat in a slot: a name's line belongs to the machine of that slot in whose life it
    # falls. "creating" precedes its machine's createXML; the others follow it.
    for slot_machines in by_slot(result).values():
        for index, moment in enumerate(slot_machines):
            begin = moment.get("xml-begin", float("inf"))
            previous_begin = (slot_machines[index - 1].get("xml-begin", float("-inf"))
                              if index else float("-inf"))
            following = (slot_machines[index + 1].get("xml-begin", float("inf"))
                         if index + 1 < len(slot_machines) else float("inf"))
            for when, message in run.log:
                for key, pattern in patterns.items():
                    match = pattern.match(message)
                    if not match or match.group(1) != moment["name"]:
                        continue
                    if key == "PUT" and begin < when < moment.get("SHUTDOWN", following):
                        # The last attempt counts: vac-put retries when it sees no answer.
                        moment[key] = when
                        moment.setdefault("PUT statuses", []).append(match.group(2))
                    elif key in moment:
                        continue
                    elif key == "creating" and previous_begin < when <= begin:
                        moment[key] = when
                    elif key not in ("creating", "PUT") and begin < when < following:
                        moment[key] = when
    return result


def by_slot(result: dict) -> dict[int, list]:
    slots: dict[int, list] = {}
    for moment in result.values():
        if "xml-begin" in moment:
            slots.setdefault(moment["slot"], []).append(moment)
    for machines in slots.values():
        machines.sort(key=lambda moment: moment["xml-begin"])
    return slots


def turnarounds(result: dict) -> list[tuple[dict, dict]]:
    """(previous, next) machine pairs of a slot where the previous one ended by guest poweroff."""
    pairs = []
    for machines in by_slot(result).values():
        for previous, following in zip(machines, machines[1:]):
            if "SHUTDOWN" in previous:
                pairs.append((previous, following))
    return pairs


def describe(memory: dict[str, int]) -> str:
    return (f"VmRSS {memory['rss'] / 1024:6.1f} MB = anon {memory['anon'] / 1024:5.1f} + "
            f"file {memory['file'] / 1024:5.1f}")


def ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:8.0f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(args, bare_creates, bare_destroys, run: VacdRun, lifecycle: Lifecycle,
           model: dict) -> None:
    result = moments(run, lifecycle)
    pairs = turnarounds(result)
    print(f"\n== slot turnaround ({len(pairs)} cycles, {args.slots} slot(s)"
          f"{', destroy on SHUTDOWN' if args.destroy_on_shutdown else ''}) ==")
    print("cycle  slot  " + "  ".join(f"{a}->{b}"[:18].rjust(18) for a, b, _ in STAGES)
          + "  SHUTDOWN->xml-begin")
    totals, from_put = [], []
    stage_values: dict[tuple[str, str], list[float]] = {(a, b): [] for a, b, _ in STAGES}
    for number, (previous, following) in enumerate(pairs, 1):
        joined = {**previous, "creating": following.get("creating"),
                  "xml-begin": following["xml-begin"], "xml-end": following.get("xml-end"),
                  "running": following.get("running")}
        cells = []
        for a, b, _ in STAGES:
            value = (joined[b] - joined[a]) if joined.get(a) and joined.get(b) else None
            if value is not None:
                stage_values[(a, b)].append(value)
            cells.append(ms(value).rjust(18))
        total = following["xml-begin"] - previous["SHUTDOWN"]
        totals.append(total)
        if "PUT" in previous:
            from_put.append(following["xml-begin"] - previous["PUT"])
        print(f"{number:5d}  {previous['slot']:4d}  " + "  ".join(cells) + f"  {ms(total)}")
    statuses = [status for moment in result.values()
                for status in moment.get("PUT statuses", ())]
    if statuses:
        counts = ", ".join(f"{statuses.count(status)}x {status}" for status in sorted(set(statuses)))
        print(f"\nguests' PUTs of shutdown_message, as vacd logged them: {counts} "
              f"(vac-put retries after 1 s when it gets no answer; PUT = the last attempt)")
    print("\nmedian per stage (ms):")
    for a, b, what in STAGES:
        values = stage_values[(a, b)]
        print(f"  {a:>9} -> {b:<9} {ms(statistics.median(values)) if values else '       -'}"
              f"   {what}")

    vacd_creates = [m["running"] - m["creating"] for m in result.values()
                    if "running" in m and "creating" in m]
    vacd_xml = [m["xml-end"] - m["xml-begin"] for m in result.values()
                if "xml-end" in m and "xml-begin" in m]
    print("\n== creation: vacd vs bare createXML of the same XML ==")
    print(f"  bare createXML   n={len(bare_creates):2d}  p50 {ms(statistics.median(bare_creates))} ms"
          f"  max {ms(max(bare_creates))} ms")
    print(f"  bare destroy()   n={len(bare_destroys):2d}  p50 {ms(statistics.median(bare_destroys))} ms"
          f"  (a running guest, 1 s after createXML)")
    if vacd_xml:
        print(f"  createXML in vacd n={len(vacd_xml):2d}  p50 {ms(statistics.median(vacd_xml))} ms"
              f"  max {ms(max(vacd_xml))} ms")
    if vacd_creates:
        print(f"  vacd creating->running n={len(vacd_creates):2d}  p50 "
              f"{ms(statistics.median(vacd_creates))} ms  max {ms(max(vacd_creates))} ms")
    if lifecycle.destroy_times:
        print(f"  destroy() on SHUTDOWN n={len(lifecycle.destroy_times):2d}  p50 "
              f"{ms(statistics.median(lifecycle.destroy_times))} ms")

    print("\n== resident memory (kB: VmRSS = anonymous + file-backed) ==")
    busy = [(memory, running) for memory, running in run.memory_samples if running]
    real = None
    if busy:
        top_running = max(running for _, running in busy)
        real = max((memory for memory, running in busy if running == top_running),
                   key=lambda memory: memory["rss"])
        print(f"  real vacd, {top_running} guest(s) running (max of "
              f"{len(busy)} samples): {describe(real)}")
    print(f"  model (vacd's Factory in-process, FakeWorks, no libvirt connection), "
          f"{model['slots']} slots:")
    print(f"    after imports            {describe(model['imported'])}")
    print(f"    started, no machines     {describe(model['empty'])}")
    print(f"    {model['slots']} running               {describe(model['full'])}")
    print(f"    after {MODEL_TURNOVERS} turnovers         {describe(model['turned_over'])}"
          f"  ({model['finished_machines']} machines finished)")
    print(f"    Python heap that filling {model['slots']} slots allocates (tracemalloc): "
          f"{model['heap_fill_kb']} kB")
    model_delta_kb = model["turned_over"]["rss"] - model["empty"]["rss"]
    estimate_kb = real["rss"] + model_delta_kb if real is not None else None

    print("\n== summary ==")
    print(f"{'measure':58} {'value':>12} {'target':>10}  verdict")
    if totals:
        p50 = statistics.median(totals)
        print(f"{'slot turnaround p50, guest SHUTDOWN -> next createXML':58} {p50:11.3f}s "
              f"{'< 1 s':>10}  {verdict(p50 < TARGET_TURNAROUND_P50_SECONDS)}")
        print(f"{'slot turnaround max':58} {max(totals):11.3f}s {'':>10}")
        if from_put:
            print(f"{'  the same from the guest PUT of shutdown_message, p50':58} "
                  f"{statistics.median(from_put):11.3f}s")
    if vacd_creates and bare_creates:
        ratio = statistics.median(vacd_creates) / statistics.median(bare_creates)
        print(f"{'creation overhead, vacd creating->running / bare createXML':58} {ratio:11.2f}x "
              f"{'<= 1.2x':>10}  {verdict(ratio <= TARGET_OVERHEAD_RATIO)}")
    if estimate_kb is not None:
        print(f"{f'vacd VmRSS, {MODEL_SLOTS} slots (real run + model 64-slot delta)':58} "
              f"{estimate_kb / 1024:10.1f}MB {'< 80 MB':>10}  "
              f"{verdict(estimate_kb / 1024 < TARGET_RSS_64_MB)}")
    model_mb = model["turned_over"]["rss"] / 1024
    print(f"{f'model vacd VmRSS, {MODEL_SLOTS} slots after turnovers':58} "
          f"{model_mb:10.1f}MB {'< 80 MB':>10}  {verdict(model_mb < TARGET_RSS_64_MB)}")


# -- main ----------------------------------------------------------------------------------------


def clean_up(uuids: set[str], prefix: str, network_name: str) -> None:
    """Destroy the benchmark's domains and its network, on a fresh connection (the events'
    connection may have died with a libvirtd restart)."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                if domain.UUIDString() in uuids or domain.name().startswith(prefix):
                    domain.destroy()
            except libvirt.libvirtError:
                pass  # gone meanwhile
    finally:
        conn.close()
    from vac.backends.vm.hypervisor import Hypervisor

    connection = Hypervisor(URI, lambda event: None)
    connection.connect()
    try:
        connection.remove_network(network_name)
    finally:
        connection.close()


def run_model_child() -> dict:
    try:
        completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--model",
                                    str(MODEL_SLOTS)], capture_output=True, text=True,
                                   timeout=MODEL_TIMEOUT_SECONDS + 60, cwd=str(REPO), check=False)
    except subprocess.TimeoutExpired as error:
        raise SystemExit(f"turnaround: model run hung; killed after {error.timeout:.0f} s:\n"
                         f"{(error.stderr or b'').decode(errors='replace')[-4000:]}") from None
    if completed.returncode != 0:
        raise SystemExit(f"turnaround: model run failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-vacd"]:
        return run_hooked_vacd(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=8, help="slot turnarounds to measure")
    parser.add_argument("--slots", type=int, choices=(1, 2), default=1,
                        help="vacd slots (guests at once; this 2-core host runs at most 2)")
    parser.add_argument("--bare-samples", type=int, default=5, help="bare createXML calls")
    parser.add_argument("--guest-dir", type=Path,
                        default=Path(os.environ.get("VAC_TEST_GUEST_DIR", REPO / "guest")))
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="bound of the vacd phase in seconds")
    parser.add_argument("--destroy-on-shutdown", action="store_true",
                        help="destroy() factory domains on SHUTDOWN (simulates vacd doing it)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (vacd's log, machine dirs, consoles)")
    parser.add_argument("--model", type=int, metavar="SLOTS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model:
        return run_model(args.model)
    if os.geteuid() != 0:
        raise SystemExit("turnaround: run as root (libvirt qemu:///system, network setup)")
    guest = Guest.from_dir(args.guest_dir)
    pid = os.getpid()
    root = Path(tempfile.mkdtemp(prefix="vac-bench-turnaround-", dir=STATE_DIR_PARENT))
    try:
        root.chmod(0o755)  # QEMU runs as libvirt-qemu and opens the disks by path
        bench = Bench(root=root, guest=guest, slots=args.slots,
                      factory=f"bench{pid}.example.org",
                      network=f"{TEST_NETWORK_PREFIX}{pid}-bench", bridge=f"vtb{pid}"[:15])
        bench.write_config()
        print(f"model: {MODEL_SLOTS}-slot in-process Factory ...", flush=True)
        model = run_model_child()
        measure(args, bench, model)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def measure(args, bench: Bench, model: dict) -> None:
    """The libvirt phases (bare, vacd) on the benchmark's network, then the report."""
    from vac.backends.vm.hypervisor import start_event_loop

    config = bench.load_config()
    wait_for_free_subnet()
    start_event_loop()  # also silences libvirt's printing of errors it raises anyway
    prefix = slot_prefix(bench.factory)
    lifecycle = Lifecycle(destroy_prefix=prefix if args.destroy_on_shutdown else None)
    known: set[str] = set()
    try:
        make_network(config)
        print(f"bare: {args.bare_samples} createXML calls on {bench.network} ...", flush=True)
        bare_creates, bare_destroys = bare_samples(bench, config, lifecycle, args.bare_samples)
        print(f"vacd: {args.cycles} turnarounds with {args.slots} slot(s) ...", flush=True)
        run = run_vacd(bench, args.cycles, args.timeout)
        report(args, bare_creates, bare_destroys, run, lifecycle, model)
    finally:
        known.update(record["uuid"] for record in bench.records())
        try:
            clean_up(known, prefix, bench.network)
        finally:
            with contextlib.suppress(Exception):
                lifecycle.close()


def slot_prefix(factory: str) -> str:
    """What every slot name of ``factory`` starts with (vac.core.model.slot_name: host-NN.domain)."""
    return factory.partition(".")[0] + "-"

if __name__ == "__main__":
    sys.exit(main())
