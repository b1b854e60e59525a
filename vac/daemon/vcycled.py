"""vcycled: the vacuum model on cloud tenancies (issue 16, VCYCLE.md §4).

One asyncio process: the HTTPS MJF service (vac.services.cloudmjf) on the loop, and every
``cycle_seconds`` one cycle per space in the thread pool (cloud calls block), spaces side by
side so that a cloud that fails or hangs delays no other. A space's cycle: list its machines
and quota through its backend (vac.backends.cloud), plan purely (vac.core.vcycleplan), execute.
A listing that fails (the cloud down, throttling past the client's retries, an answer that is
not what the API says) skips that space with one log line and backs it off (doubling up to
``MAX_SPACE_BACKOFF_SECONDS``); nothing is decided on a partial view.

State: ``<state_dir>/spaces/<space>/`` is a vac.records.store.Store (machine directories with
``machine.json``, MJF files, joboutputs, the machine's ``mjf_token``, APEL queues, finishes).
Records are read once at start and kept in memory; a vcycled killed at any moment finds its
machines again from them (and adopts listed machines it has no record of).

The executor here is deliberately thin (one method per planned action). vac.daemon's reusable
executor, once it takes actions of a quota planner, is meant to replace ``SpaceWorker.execute``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import signal
import socket
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Callable, Optional

from vac import __version__
from vac.backends.base import BackendError
from vac.core import cloud, vcycleplan
from vac.core.config import ConfigPaths, Machinetype, Settings
from vac.core.model import Finish, Machine, MachineState
from vac.core.scheduler import LowerDeadline
from vac.core.vcycleconfig import (
    API_EC2,
    DEFAULT_CONF_DIR,
    DEFAULT_MAIN_CONF,
    STATE_DIR,
    Space,
    VcycleConfig,
    load_vcycle_config,
    space_settings,
)
from vac.records import apel
from vac.records.store import Store, atomic_write
from vac.services import cloudmjf, metadata

log = logging.getLogger("vcycled")

TOKEN_FILE = "mjf_token"
MIN_SPACE_BACKOFF_SECONDS = 10.0
MAX_SPACE_BACKOFF_SECONDS = 600.0
DEFAULT_CYCLE_SECONDS = 60.0
DEFAULT_CERT = "/etc/grid-security/hostcert.pem"
DEFAULT_KEY = "/etc/grid-security/hostkey.pem"
DEFAULT_LOG = "/var/log/vcycle/vcycled"

Backend = Any  # vac.backends.cloud.openstack.OpenStackBackend or .ec2.EC2Backend
BackendFactory = Callable[[Space], Backend]


def cloud_backend(space: Space) -> Backend:
    """The space's backend; the client libraries are imported only for the clouds in use."""
    if space.api == API_EC2:
        from vac.backends.cloud.ec2 import EC2Backend

        return EC2Backend(space)
    from vac.backends.cloud.openstack import OpenStackBackend

    return OpenStackBackend(space)


def listed_of(machine: Any) -> vcycleplan.Listed:
    """The planner's view of a backend's CloudMachine."""
    return vcycleplan.Listed(uuid=machine.uuid, name=machine.name, state=machine.state,
                             machinetype=machine.machinetype, processors=machine.processors,
                             created=machine.created, started=machine.started, updated=machine.updated)


class SpaceWorker:
    """One space: its backend, records, and the execution of its plans."""

    def __init__(self, space: Space, factory: str, state_root: Path, https: tuple[str, int],
                 backend_factory: BackendFactory, started: float, rng: random.Random):
        self.space = space
        self.factory = factory
        self.https_host, self.https_port = https
        self.backend = backend_factory(space)
        self.connected = False
        self.store = Store(state_root / "spaces" / space.name)
        self.store.prepare()
        self.settings = dataclasses.replace(space_settings(space, factory), state_dir=str(self.store.root))
        self.started = started
        self.rng = rng
        self.records: dict[str, Machine] = {}
        self.tokens: dict[str, str] = {}  # machine name -> MJF token
        self.dirs: dict[str, Path] = {}  # machine name -> directory
        self.last_seen: dict[str, float] = {}
        self.backoff_until = 0.0
        self.backoff = MIN_SPACE_BACKOFF_SECONDS
        self.last_plan: Optional[vcycleplan.Plan] = None
        self._load()

    # --- records ------------------------------------------------------------------------

    def _load(self) -> None:
        for directory in self.store.machine_dirs():
            machine = self.store.load_record(directory)
            if machine is None:
                continue
            self.records[machine.uuid] = machine
            if machine.state != MachineState.FINISHED:
                self._index(machine, directory)
        live = sum(1 for m in self.records.values() if m.state != MachineState.FINISHED)
        log.info("space %s: %d machine records, %d not finished", self.space.name, len(self.records), live)

    def _index(self, machine: Machine, directory: Path) -> None:
        try:
            self.tokens[machine.name] = (directory / TOKEN_FILE).read_text(encoding="ascii").strip()
            self.dirs[machine.name] = directory
        except OSError:
            log.warning("space %s: %s has no MJF token: its MJF URLs cannot be served", self.space.name, machine.name)

    def _save(self, machine: Machine) -> None:
        self.records[machine.uuid] = machine
        self.store.save(machine)

    def mjf_files(self, name: str) -> Optional[cloudmjf.CloudMachineFiles]:
        token, directory = self.tokens.get(name), self.dirs.get(name)
        return cloudmjf.CloudMachineFiles(directory, token) if token and directory else None

    def settings_for(self, name: str) -> Settings:
        """MJF and APEL see the machinetype's HS06 and memory per processor."""
        cloud_type = self.space.machinetypes.get(name)
        if cloud_type is None:
            return self.settings
        return dataclasses.replace(self.settings, hs06_per_processor=cloud_type.hs06_per_processor,
                                   mb_per_processor=cloud_type.mb_per_processor)

    def machinetype(self, name: str) -> Optional[Machinetype]:
        cloud_type = self.space.machinetypes.get(name)
        return cloud_type.machinetype if cloud_type else None

    # --- the cycle ----------------------------------------------------------------------

    def cycle(self, now: float) -> Optional[vcycleplan.Plan]:
        """List, plan, execute; None if the space is backed off or its cloud failed."""
        if now < self.backoff_until:
            return None
        try:
            if not self.connected:
                self.backend.connect()
                self.connected = True
            machines = self.backend.list_machines()
            quota = self.backend.quota()
        except BackendError as error:
            self.connected = False
            self.backoff_until = now + self.backoff
            log.error("space %s: %s; next attempt in %.0f s", self.space.name, error, self.backoff)
            self.backoff = min(2 * self.backoff, MAX_SPACE_BACKOFF_SECONDS)
            return None
        self.backoff = MIN_SPACE_BACKOFF_SECONDS
        listed = tuple(listed_of(machine) for machine in machines)
        for machine in listed:
            if machine.state.active:
                self.last_seen[machine.uuid] = now
        listed_uuids = {machine.uuid for machine in listed}
        for uuid, record in list(self.records.items()):
            if record.state == MachineState.FINISHED and uuid not in listed_uuids:
                del self.records[uuid]  # done with: only its directory remains
                self.last_seen.pop(uuid, None)
            elif uuid not in listed_uuids and uuid not in self.last_seen:
                activity = self.store.last_activity(record)  # vcycled was down when it went
                if activity is not None:
                    self.last_seen[uuid] = activity
        snapshot = vcycleplan.SpaceSnapshot(
            space=self.space, factory=self.factory, listed=listed, records=dict(self.records),
            finishes=self.store.load_finishes(), heartbeats=self._heartbeats(), last_seen=dict(self.last_seen),
            cloud_limit=quota.max_processors, cloud_used=quota.used_processors, now=now,
            daemon_started=self.started)
        plan = vcycleplan.plan(snapshot, self.rng)
        for note in plan.notes:
            log.debug("space %s: %s", self.space.name, note)
        for action in plan.actions:
            try:
                self.execute(action, now)
            except (BackendError, OSError, ValueError, apel.ApelError) as error:
                log.error("space %s: %s failed: %s", self.space.name, type(action).__name__, error)
        self.last_plan = plan
        return plan

    def _heartbeats(self) -> dict[str, Optional[float]]:
        found: dict[str, Optional[float]] = {}
        for uuid, record in self.records.items():
            machinetype = self.machinetype(record.machinetype)
            if record.state != MachineState.RUNNING or machinetype is None or not machinetype.heartbeat_file:
                continue
            found[uuid] = self.store.joboutput_mtime(record, machinetype.heartbeat_file)
        return found

    # --- execution ----------------------------------------------------------------------

    def execute(self, action: vcycleplan.Action, now: float) -> None:
        if isinstance(action, vcycleplan.Create):
            self.create(action, now)
        elif isinstance(action, vcycleplan.Delete):
            record = self.records[action.uuid]
            log.info("space %s: deleting %s: %s", self.space.name, action.name, action.reason)
            message = record.shutdown_message if record.shutdown_message else action.message
            self._save(record.replace(stop_requested=now, shutdown_message=message))
            self.backend.destroy(action.uuid)
        elif isinstance(action, vcycleplan.Started):
            log.info("space %s: %s is running", self.space.name, action.machine.name)
            self._save(action.machine)
        elif isinstance(action, vcycleplan.Finished):
            self.finish(action)
        elif isinstance(action, vcycleplan.Adopt):
            log.warning("space %s: %s", self.space.name, action.reason)
            directory = self.store.create_machine_dir(action.machine)
            self.records[action.machine.uuid] = action.machine
            self._index(action.machine, directory)
        elif isinstance(action, LowerDeadline):
            record = self.records[action.uuid].replace(deadline=action.deadline)
            metadata.lower_deadline_files(self.store.machine_dir(record), action.deadline)
            self._save(record)

    def create(self, action: vcycleplan.Create, now: float) -> None:
        from vac.content import userdata

        cloud_type = self.space.machinetypes[action.machinetype]
        machinetype = cloud_type.machinetype
        settings = self.settings_for(machinetype.name)
        machine = Machine(uuid=str(uuidlib.uuid4()), name=cloud.machine_name(machinetype.name, self.rng), slot=0,
                          machinetype=machinetype.name, machine_model=vcycleplan.MACHINE_MODEL,
                          processors=action.processors, created=now, deadline=action.deadline,
                          hs06=action.hs06, fqan=machinetype.accounting_fqan)
        token = secrets.token_urlsafe(24)
        directory = self.store.create_machine_dir(machine)
        self.records[machine.uuid] = machine
        try:
            atomic_write(directory / TOKEN_FILE, token, 0o600)
            machinefeatures, jobfeatures = metadata.mjf_features(machine, settings, machinetype, now)
            metadata.write_mjf(directory, machinefeatures, jobfeatures)
            template, url = userdata.fetch_template(machinetype, settings)
            proxy = None
            if machinetype.user_data_proxy:
                from vac.content import x509

                proxy = x509.machinetype_proxy(machinetype, machine.deadline, now)
            base = cloudmjf.machine_url(self.https_host, self.https_port, self.space.name, machine.name, token)
            manager = f"Vcycle {__version__}"
            overrides = {"user_data_machinefeatures_url": f"{base}/machinefeatures",
                         "user_data_jobfeatures_url": f"{base}/jobfeatures",
                         "user_data_joboutputs_url": f"{base}/joboutputs",
                         "user_data_manager_version": manager, "user_data_vmlm_version": manager}
            text = userdata.build_user_data(template, settings=settings, machinetype=machinetype, machine=machine,
                                            template_url=url, proxy_pem=proxy, overrides=overrides)
            self.store.write_file(machine, "user_data", text, mode=0o600)
            self.tokens[machine.name], self.dirs[machine.name] = token, directory
            self.backend.create(machine, machinetype, settings, directory)
        except Exception as error:  # noqa: BLE001 - any failure: the record is finished, the cycle goes on
            log.error("space %s: creating %s failed: %s", self.space.name, machine.name, error)
            self._close(dataclasses.replace(machine, state=MachineState.FINISHED, finished=now,
                                            shutdown_message=None))
            return
        log.info("space %s: created %s (%s): %s", self.space.name, machine.name, machine.uuid, action.reason)

    def _close(self, machine: Machine) -> None:
        self._save(machine)
        self.store.release_slot(machine)
        self.tokens.pop(machine.name, None)
        self.dirs.pop(machine.name, None)

    def finish(self, action: vcycleplan.Finished) -> None:
        record = self.records[action.uuid]
        machinetype = self.machinetype(record.machinetype)
        outcome = vcycleplan.finish_outcome(record, machinetype, self.store.vm_shutdown_message(record), action.end)
        finished = outcome.machine
        if outcome.account:
            # Clouds report no CPU time: CpuDuration is the wall time (classic Vcycle).
            wall = (finished.finished or action.end) - (finished.started or finished.created)
            result = apel.write_accounting(self.settings_for(record.machinetype),
                                           machinetype or Machinetype(name=record.machinetype), finished,
                                           action.end, max(0.0, wall), apel.VCYCLE)
            log.info("space %s: %s", self.space.name, result)
        if outcome.abort and finished.shutdown_message:
            self.store.save_finish(Finish(record.machinetype, record.name, finished.shutdown_message,
                                          finished.finished or action.end))
        if action.delete:
            finished = finished.replace(stop_requested=action.end)
        self._close(finished)
        log.info("space %s: finished %s (%s): %s", self.space.name, record.name,
                 finished.shutdown_message or "no message", action.reason)
        if action.delete:
            self.backend.destroy(action.uuid)

    def status(self) -> dict:
        machines = [m for m in self.records.values() if m.state != MachineState.FINISHED]
        plan = self.last_plan
        return {
            "space": self.space.name, "api": self.space.api, "manager": self.factory,
            "backed_off_until": self.backoff_until or None,
            "machines": [{"name": m.name, "machinetype": m.machinetype, "state": m.state.value,
                          "processors": m.processors, "created": m.created, "started": m.started,
                          "shutdown_message": m.shutdown_message} for m in sorted(machines, key=lambda m: m.name)],
            "machinetypes": {name: {"score": s.score, "blocked_by": s.blocked_by}
                             for name, s in (plan.standings.items() if plan else ())},
        }


class Vcycled:
    """The daemon: configuration, workers per space, the HTTPS MJF service and the loop."""

    def __init__(self, args: argparse.Namespace, backend_factory: BackendFactory = cloud_backend):
        self.args = args
        self.paths = ConfigPaths(args.conf_dir, args.conf, ())
        self.factory = args.hostname or socket.getfqdn()
        self.state_root = Path(args.state_dir)
        self.backend_factory = backend_factory
        self.workers: dict[str, SpaceWorker] = {}
        self.config: Optional[VcycleConfig] = None
        self.started = time.time()
        self.rng = random.SystemRandom()
        self.stopping = asyncio.Event()

    def reload(self) -> None:
        """Re-read the configuration; on errors keep the one in force (and say so)."""
        config, problems = load_vcycle_config(self.paths, hostname=self.factory)
        for problem in problems:
            log.log(logging.ERROR if problem.is_error else logging.WARNING, "%s", problem)
        if config is None:
            if self.config is None:
                raise SystemExit("vcycled: the configuration has errors (vcycle conf --check)")
            log.error("configuration has errors: keeping the previous one")
            return
        if config == self.config:
            return
        self.config = config
        for name, space in config.spaces.items():
            worker = self.workers.get(name)
            if worker is None or worker.space != space:
                https = (space.https_host or self.factory, space.https_port)
                self.workers[name] = SpaceWorker(space, self.factory, self.state_root, https,
                                                 self.backend_factory, self.started, self.rng)
        for name in set(self.workers) - set(config.spaces):
            log.warning("space %s is no longer configured: its machines are left alone", name)
            del self.workers[name]

    def resolve(self, space: str, name: str) -> Optional[cloudmjf.CloudMachineFiles]:
        worker = self.workers.get(space)
        return worker.mjf_files(name) if worker else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.reload()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        machines = sum(s.processors_limit or 1000 for s in self.config.spaces.values())
        listener = await cloudmjf.start_cloud_mjf(
            self.resolve, address=self.args.https_address, port=self.args.https_port,
            cert_file=self.args.https_cert, key_file=self.args.https_key, machines=machines)
        log.info("vcycled %s started on %s: spaces %s", __version__, self.factory, ", ".join(self.workers))
        try:
            while not self.stopping.is_set():
                started = time.time()
                await self.cycle()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(),
                                           max(0.0, self.args.cycle_seconds - (time.time() - started)))
        finally:
            await listener.close()
            log.info("vcycled stopping; machines keep running")

    async def cycle(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.reload)
        except SystemExit as error:
            log.error("%s", error)
        now = time.time()
        workers = list(self.workers.values())
        results = await asyncio.gather(*(loop.run_in_executor(None, worker.cycle, now) for worker in workers),
                                       return_exceptions=True)
        for worker, result in zip(workers, results):
            if isinstance(result, BaseException):
                log.error("space %s: cycle failed: %s: %s", worker.space.name, type(result).__name__, result)
            else:
                self._write_status(worker)

    def _write_status(self, worker: SpaceWorker) -> None:
        import json

        try:
            atomic_write(worker.store.root / "status.json", json.dumps(
                {**worker.status(), "updated": time.time()}, sort_keys=True))
        except OSError as error:
            log.error("space %s: cannot write status: %s", worker.space.name, error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcycled", description="vcycle daemon: the vacuum model on clouds")
    parser.add_argument("--version", action="version", version=f"vcycled {__version__}")
    parser.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="fragment directory (default %(default)s)")
    parser.add_argument("--conf", default=DEFAULT_MAIN_CONF, help="main file (default %(default)s)")
    parser.add_argument("--state-dir", default=STATE_DIR, help="state directory (default %(default)s)")
    parser.add_argument("--hostname", default=None, help="this host's name (default: its FQDN)")
    parser.add_argument("--https-address", default="", help="address of the HTTPS MJF service (default: all)")
    parser.add_argument("--https-port", type=int, default=443, help="its port (default %(default)s)")
    parser.add_argument("--https-cert", default=DEFAULT_CERT, help="its certificate (default %(default)s)")
    parser.add_argument("--https-key", default=DEFAULT_KEY, help="its key (default %(default)s)")
    parser.add_argument("--cycle-seconds", type=float, default=DEFAULT_CYCLE_SECONDS,
                        help="seconds between cycles (default %(default)s)")
    parser.add_argument("--log-file", default=None, help="log here instead of stderr")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--debug", action="store_true", help="log planner notes")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from vac.ops.logsetup import setup_logging

    try:
        setup_logging(args.log_file, logging.DEBUG if args.debug else logging.INFO, args.log_format)
    except OSError as error:
        print(f"vcycled: cannot open log file: {error}", file=sys.stderr)
        return 1
    os.umask(0o022)
    try:
        asyncio.run(Vcycled(args).run())
    except SystemExit as error:
        log.error("%s", error)
        return 1
    except (OSError, ValueError) as error:  # the HTTPS service: address in use, unusable certificate
        log.error("vcycled cannot start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
