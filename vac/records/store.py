"""The on-disk state under ``state_dir``: machine directories, records, finishes, status.

Layout (REFERENCE.md §9 for what admins and VMs see)::

    machines/<created>_<machinetype>_<name>/   one directory per machine
        machine.json        versioned Machine record (ours; the source of truth)
        machinefeatures/ jobfeatures/ joboutputs/ user_data console.log disks/
    slots/<name>            classic slot file "<created> <machinetype> <model>"
    finishes/<machinetype>  JSON of the most recent Finish of that type (drives backoff)
    status.json             liveness and counts for check-vacd
    tmp/                    scratch

Every write is atomic (temp file in the same directory, fsync, rename), so ``kill -9`` at any
instant leaves either the old or the new content, never a torn file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

from vac.core.model import Finish, Machine, MachineState

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
RECORD_NAME = "machine.json"
FORMAT_FILE = "format"  # the on-disk format of the whole state directory
# Upgrades of the on-disk format: MIGRATIONS[n] turns a format-n machine record into format n+1.
# Fields added with a default need no migration (Machine.from_dict fills them in).
MIGRATIONS: dict = {}
SUBDIRECTORIES = ("machines", "slots", "finishes", "tmp", "imagecache", "machinetypes",
                  "pipescache", "apel-archive", "apel-outgoing")


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def atomic_write(path: Union[str, Path], data: Union[str, bytes], mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` (set before the rename)."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


class StoreError(Exception):
    """The state directory cannot be used."""


class Store:
    """Reads and writes machine state under one state directory."""

    def __init__(self, state_dir: Union[str, Path]):
        self.root = Path(state_dir)

    # -- layout ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory tree (0755; the daemon runs with umask 022)."""
        try:
            for name in SUBDIRECTORIES:
                (self.root / name).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create state directory {self.root}: {error}") from error

    def upgrade(self) -> Optional[int]:
        """Bring the state directory to this version's format, migrating every machine record.

        Returns the format found (None for a new directory). Raises StoreError for a format
        newer than this version knows: a downgraded vacd must not misread, or kill, machines.
        """
        path = self.root / FORMAT_FILE
        try:
            found = int(path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            found = None
        except (OSError, ValueError) as error:
            raise StoreError(f"cannot read {path}: {error}") from error
        if found is not None and found > RECORD_FORMAT:
            raise StoreError(f"{self.root} was written by a newer vac (format {found}; this "
                             f"version knows up to {RECORD_FORMAT}): install that version again")
        if found is not None and found < RECORD_FORMAT:
            for directory in self.machine_dirs():
                self._migrate(directory / RECORD_NAME, found)
            log.info("migrated %s from format %d to %d", self.root, found, RECORD_FORMAT)
        if found != RECORD_FORMAT:
            atomic_write(path, f"{RECORD_FORMAT}\n")
        return found

    @staticmethod
    def _migrate(path: Path, found: int) -> None:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # load_record reports it
        version = record.get("format", found) if isinstance(record, dict) else None
        if not isinstance(version, int) or version >= RECORD_FORMAT:
            return
        for step in range(version, RECORD_FORMAT):
            record = MIGRATIONS[step](record)
        atomic_write(path, json.dumps(record, indent=1))

    def machine_dir(self, machine: Machine) -> Path:
        return self.root / "machines" / machine.directory_name

    # -- machine records ---------------------------------------------------------------------

    def create_machine_dir(self, machine: Machine) -> Path:
        """Create the machine's directory tree and write its first record and slot file."""
        directory = self.machine_dir(machine)
        for sub in ("machinefeatures", "jobfeatures", "joboutputs", "disks"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        self.save(machine)
        atomic_write(self.root / "slots" / machine.name,
                     f"{int(machine.created)} {machine.machinetype} {machine.machine_model}")
        return directory

    def save(self, machine: Machine) -> None:
        record = {"format": RECORD_FORMAT, "machine": machine.to_dict()}
        atomic_write(self.machine_dir(machine) / RECORD_NAME, json.dumps(record, indent=1))

    def write_file(self, machine: Machine, relative: str, data: Union[str, bytes],
                   mode: int = 0o644) -> None:
        atomic_write(self.machine_dir(machine) / relative, data, mode)

    def load_record(self, directory: Path) -> Optional[Machine]:
        """The Machine stored in ``directory``, or None (logged) if absent or unreadable."""
        path = directory / RECORD_NAME
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.error("ignoring unreadable machine record %s: %s", path, error)
            return None
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            log.error("ignoring machine record %s: unknown format %r", path,
                      record.get("format") if isinstance(record, dict) else None)
            return None
        try:
            return Machine.from_dict(record["machine"])
        except (KeyError, TypeError, ValueError) as error:
            log.error("ignoring malformed machine record %s: %s", path, error)
            return None

    def machine_dirs(self) -> Iterator[Path]:
        machines = self.root / "machines"
        if machines.is_dir():
            yield from sorted(entry for entry in machines.iterdir() if entry.is_dir())

    def live_machines(self) -> list[Machine]:
        """Machines not yet finished, for recovery after a restart."""
        live = []
        for directory in self.machine_dirs():
            machine = self.load_record(directory)
            if machine is not None and machine.state is not MachineState.FINISHED:
                live.append(machine)
        return live

    # -- what the VM wrote -------------------------------------------------------------------

    def joboutput_mtime(self, machine: Machine, name: str) -> Optional[float]:
        try:
            return (self.machine_dir(machine) / "joboutputs" / name).stat().st_mtime
        except OSError:
            return None

    def last_activity(self, machine: Machine) -> Optional[float]:
        """Newest mtime of what a running VM writes (its console log and joboutputs): the best
        estimate of when a VM ended while nobody was watching (vacd down)."""
        directory = self.machine_dir(machine)
        newest = None
        for path in [directory / "console.log", *_entries(directory / "joboutputs")]:
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            newest = mtime if newest is None else max(newest, mtime)
        return newest

    def vm_shutdown_message(self, machine: Machine, limit: int = 256) -> Optional[str]:
        """First line of ``joboutputs/shutdown_message`` (bounded, printable), or None."""
        path = self.machine_dir(machine) / "joboutputs" / "shutdown_message"
        try:
            with open(path, "rb") as handle:
                raw = handle.read(limit)
        except OSError:
            return None
        line = raw.decode("utf-8", "replace").splitlines()[0] if raw.strip() else ""
        line = "".join(char for char in line if char.isprintable()).strip()
        return line or None

    # -- finishes and slots ------------------------------------------------------------------

    def release_slot(self, machine: Machine) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "slots" / machine.name).unlink()

    def save_finish(self, finish: Finish) -> None:
        data = {"machinetype": finish.machinetype, "machine_name": finish.machine_name,
                "shutdown_message": finish.shutdown_message,
                "finished_time": finish.finished_time}
        atomic_write(self.root / "finishes" / finish.machinetype, json.dumps(data))

    def load_finishes(self) -> dict[str, Finish]:
        finishes = {}
        directory = self.root / "finishes"
        if not directory.is_dir():
            return finishes
        for path in directory.iterdir():
            if path.name.startswith("."):
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                finishes[path.name] = Finish(
                    machinetype=str(data["machinetype"]),
                    machine_name=str(data["machine_name"]),
                    shutdown_message=data.get("shutdown_message"),
                    finished_time=float(data["finished_time"]))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("ignoring unreadable finish record %s: %s", path, error)
        return finishes

    # -- housekeeping ------------------------------------------------------------------------

    def expire_machine_dirs(self, live_uuids: Iterable[str], days_for: dict[str, float],
                            default_days: float, now: float) -> list[Path]:
        """Delete finished machine directories older than their machinetype's
        ``machines_dir_days`` (never one of a live machine). Returns what was removed."""
        live = set(live_uuids)
        removed = []
        for directory in self.machine_dirs():
            machine = self.load_record(directory)
            if machine is None or machine.uuid in live:
                continue
            if machine.state is not MachineState.FINISHED or machine.finished is None:
                continue
            days = days_for.get(machine.machinetype, default_days)
            if days <= 0 or now - machine.finished < days * 86400:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
        return removed

    def write_status(self, status: dict) -> None:
        atomic_write(self.root / "status.json", json.dumps(status, sort_keys=True))
