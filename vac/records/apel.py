"""APEL accounting: individual job records, sync records and the queue ssmsend publishes from.

Formats (STANDARDS.md B1-B3, REFERENCE.md §7): ``APEL-individual-job-message: v0.3`` (or v0.4,
which adds HEPscore23), ``APEL-sync-message: v0.1``; ASCII ``Key: Value`` lines ending with ``%%``.

Directories under ``Settings.state_dir``, every one in the python-dirq QueueSimple layout that
ssmsend reads (``<8 hex>/<14 hex>``; our intermediate directories are ``YYYYMMDD`` of the UTC day
the machine ended, which are valid hex, as in the classic factory):

* ``apel-archive/``: every record, kept for republishing (copy files to ``apel-outgoing/``).
* ``apel-outgoing/``: what ssmsend sends and then deletes. A record goes here only if
  ``gocdb_sitename`` is set and the machine's HS06 is known (classic rule); sync records too.
* ``apel-queued/``: a hard link to each archived record that was queued for ssmsend; sync
  records count these, so they agree with what the APEL server received.
* ``apel-pending/``: outgoing copies decided but not yet moved into ``apel-outgoing/``.

Exactly once, keyed by machine UUID: a record's file name is a hash of the UUID, the archive
link is the commit point (its existence means "accounted"), the outgoing copy is written to
``apel-pending/`` *before* that commit and moved into the queue by one atomic rename after it.
Whatever step a crash interrupts, calling ``write_accounting`` again (or ``complete_pending``)
finishes the job without writing anything twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Optional

from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

log = logging.getLogger(__name__)

ARCHIVE = "apel-archive"
OUTGOING = "apel-outgoing"
QUEUED = "apel-queued"
PENDING = "apel-pending"

INDIVIDUAL_HEADERS = {
    "0.3": "APEL-individual-job-message: v0.3",
    "0.4": "APEL-individual-job-message: v0.4",
}
SYNC_HEADER = "APEL-sync-message: v0.1"
RECORD_END = "%%"

DAY_RE = re.compile(r"^[0-9]{8}$")  # YYYYMMDD: a subset of dirq's ^[0-9a-f]{8}$
ELEMENT_RE = re.compile(r"^[0-9a-f]{14}$")  # dirq element names
MONTH_RE = re.compile(r"^([0-9]{4})(0[1-9]|1[0-2])$")

MAX_RECORD_READ = 64 * 1024  # our records are < 1 KiB; anything bigger is not ours
QUEUE_ATTEMPTS = 20


class ApelError(Exception):
    """A record cannot be made or written; the message says which and why."""


class Outcome(str, enum.Enum):
    WRITTEN = "written"
    ALREADY_WRITTEN = "already written"
    FIZZLED = "fizzled"
    NOT_STARTED = "not started"


@dataclasses.dataclass(frozen=True)
class AccountingResult:
    """What ``write_accounting`` did; ``str()`` is a log-ready sentence."""

    outcome: Outcome
    detail: str
    archive_path: Optional[Path] = None
    outgoing_path: Optional[Path] = None  # set when this call queued the copy for ssmsend

    @property
    def written(self) -> bool:
        return self.outcome is Outcome.WRITTEN

    def __str__(self) -> str:
        return self.detail


@dataclasses.dataclass(frozen=True)
class SyncCount:
    site: str
    submit_host: str
    number_of_jobs: int


@dataclasses.dataclass(frozen=True)
class SyncResult:
    year: int
    month: int
    counts: tuple[SyncCount, ...]
    path: Path  # the message in apel-outgoing/


# -- record text (pure) -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Infrastructure:
    """What a record says about the system that ran the machine: vac's factories or vcycle's
    cloud tenancies (REFERENCE.md §10: SubmitHost ``<space>/vcycle-<host>``, LocalUserId the
    machine's name, InfrastructureDescription ``APEL-VCYCLE``)."""

    description: str
    manager: str  # SubmitHost is <space>/<manager>-<host>
    local_user_is_machine: bool


VAC = Infrastructure("APEL-VAC", "vac", False)
VCYCLE = Infrastructure("APEL-VCYCLE", "vcycle", True)


def site_name(settings: Settings) -> str:
    """``gocdb_sitename``, else the space name without its first label (classic placeholder)."""
    if settings.gocdb_sitename:
        return settings.gocdb_sitename
    _, dot, rest = settings.vac_space.partition(".")
    return rest if dot else settings.vac_space


def submit_host(settings: Settings, infrastructure: Infrastructure = VAC) -> str:
    return f"{settings.vac_space}/{infrastructure.manager}-{settings.factory_name}"


def global_user_name(space: str) -> str:
    """The space as DC components in the classic order: vac01.example.com -> /DC=com/DC=example/DC=vac01.

    HSF-TN-2016-04 shows the opposite order; the classic one is kept so that the accounting
    series of existing spaces continues unchanged.
    """
    return "".join(f"/DC={label}" for label in reversed(space.split(".")))


def decimal_text(value: float) -> str:
    """A float as plain decimal text with at most 3 places (the server's DECIMAL(10,3)), never an exponent."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def is_publishable(settings: Settings, machine: Machine) -> bool:
    """Classic rule: records are sent only if the site is known to GOCDB and the HS06 is known."""
    return bool(settings.gocdb_sitename) and machine.hs06 is not None


def record_fields(settings: Settings, machinetype: Machinetype, machine: Machine,
                  end_time: float, cpu_seconds: float,
                  infrastructure: Infrastructure = VAC) -> list[tuple[str, str]]:
    """The record's ``(key, value)`` pairs in message order; raises ApelError on unusable input."""
    if settings.apel_version not in INDIVIDUAL_HEADERS:
        raise ApelError(f"apel_version {settings.apel_version!r} is not one of {', '.join(INDIVIDUAL_HEADERS)}")
    if machine.started is None:
        raise ApelError(f"machine {machine.uuid} never started")
    if machine.processors < 1:
        raise ApelError(f"machine {machine.uuid} has {machine.processors} processors")
    for label, value in (("end time", end_time), ("start time", machine.started), ("CPU seconds", cpu_seconds)):
        if not math.isfinite(value) or value < 0:
            raise ApelError(f"machine {machine.uuid}: {label} {value!r} is not a non-negative number")
    start, end = int(machine.started), int(end_time)
    if end < start:
        raise ApelError(f"machine {machine.uuid}: end time {end} is before start time {start}")
    processors = machine.processors
    hs06_per_processor = machine.hs06 / processors if machine.hs06 is not None else 1.0
    fields = [
        ("Site", site_name(settings)),
        ("SubmitHost", submit_host(settings, infrastructure)),
        ("LocalJobId", machine.uuid),
        ("LocalUserId", machine.name if infrastructure.local_user_is_machine else settings.factory_name),
        ("Queue", machinetype.name),
        ("GlobalUserName", global_user_name(settings.vac_space)),
    ]
    fqan = machine.fqan or machinetype.accounting_fqan
    if fqan:
        fields.append(("FQAN", fqan))
    memory_kib = settings.mb_per_processor * processors * 1024
    fields += [
        ("WallDuration", str(end - start)),
        ("CpuDuration", str(int(cpu_seconds))),
        ("Processors", str(processors)),
        ("NodeCount", "1"),
        ("InfrastructureDescription", infrastructure.description),
        ("InfrastructureType", "grid"),
        ("StartTime", str(start)),
        ("EndTime", str(end)),
        ("MemoryReal", str(memory_kib)),
        ("MemoryVirtual", str(memory_kib)),
    ]
    if settings.apel_version == "0.3":
        fields += [("ServiceLevelType", "HEPSPEC"), ("ServiceLevel", decimal_text(hs06_per_processor))]
    else:
        # v0.4: one dict; the server prefers HEPscore23, then hepspec (apel record.py).
        levels = [f"hepspec: {decimal_text(hs06_per_processor)}"]
        if settings.hepscore23_per_processor is not None:
            levels.append(f"HEPscore23: {decimal_text(settings.hepscore23_per_processor)}")
        fields.append(("ServiceLevel", "{" + ", ".join(levels) + "}"))
    for key, value in fields:
        _check_value(key, value)
    return fields


def record_text(settings: Settings, machinetype: Machinetype, machine: Machine,
                end_time: float, cpu_seconds: float, infrastructure: Infrastructure = VAC) -> str:
    """The complete individual job message for one machine (pure)."""
    fields = record_fields(settings, machinetype, machine, end_time, cpu_seconds, infrastructure)
    return _message(INDIVIDUAL_HEADERS[settings.apel_version], [fields])


def sync_text(counts: Sequence[SyncCount], year: int, month: int) -> str:
    """A sync message with one record per (Site, SubmitHost) pair (pure)."""
    records = []
    for count in counts:
        fields = [("Site", count.site), ("SubmitHost", count.submit_host),
                  ("NumberOfJobs", str(count.number_of_jobs)), ("Month", str(month)), ("Year", str(year))]
        for key, value in fields:
            _check_value(key, value)
        records.append(fields)
    return _message(SYNC_HEADER, records)


def _message(header: str, records: Sequence[Sequence[tuple[str, str]]]) -> str:
    lines = [header]
    for fields in records:
        lines += [f"{key}: {value}" for key, value in fields]
        lines.append(RECORD_END)
    return "\n".join(lines) + "\n"


def _check_value(key: str, value: str) -> None:
    # ssmsend decodes messages as ASCII and the server splits lines and records on "%%".
    if not value or not value.isascii() or not value.isprintable() or RECORD_END in value:
        raise ApelError(f"APEL field {key} has an unusable value {value!r} (printable ASCII required)")


def parse_record(text: str) -> dict[str, str]:
    """The ``Key: Value`` fields of the first record of a message (header and ``%%`` dropped)."""
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if line.strip() == RECORD_END:
            break
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    return fields


# -- the queue layout ---------------------------------------------------------------------------


def record_name(uuid: str) -> str:
    """The 14-hex-digit file name of a machine's record: fixed per UUID, so writes are idempotent."""
    return hashlib.sha256(uuid.encode("utf-8")).hexdigest()[:14]


def utc_day(timestamp: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(timestamp))


def dirq_name(now: float) -> str:
    """A fresh dirq element name: seconds, microseconds and one random hex digit (as dirq does)."""
    seconds = int(now)
    return f"{seconds:08x}{int((now - seconds) * 1_000_000):05x}{secrets.randbelow(16):01x}"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directory(directory: Path) -> None:
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)


def _write_synced(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.fchmod(fd, 0o644)  # whatever the umask: ssmsend and admins read these
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_element(directory: Path, name: str, data: bytes, *, fresh_temporary: bool) -> bool:
    """Write ``<name>.tmp`` then hard-link it to ``<name>`` (B3); False if ``<name>`` exists.

    ``fresh_temporary`` (names chosen at random): the temporary must not exist (O_EXCL).
    Otherwise (names fixed per record, written under our lock) a leftover from a crash is reused.
    FileNotFoundError means ssmsend purged the directory meanwhile: the caller starts again.
    """
    final, temporary = directory / name, directory / f"{name}.tmp"
    _write_synced(temporary, data, os.O_EXCL if fresh_temporary else os.O_TRUNC)
    try:
        os.link(temporary, final)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _fsync_directory(directory)
    return True


def enqueue(queue: Path, day: str, text: str, clock: Callable[[], float] = time.time) -> Path:
    """Add a new element with ``text`` to the dirq queue ``queue`` under ``day``; its path."""
    data = text.encode("ascii")
    for _ in range(QUEUE_ATTEMPTS):
        directory = queue / day
        try:
            _make_directory(directory)
            name = dirq_name(clock())
            if _link_element(directory, name, data, fresh_temporary=True):
                return directory / name
        except (FileExistsError, FileNotFoundError):
            continue  # name taken or directory purged: new name / directory
    raise ApelError(f"cannot add a message to {queue / day} after {QUEUE_ATTEMPTS} attempts")


def _move_into_queue(pending: Path, queue: Path, day: str) -> Path:
    """Atomically move the finished file ``pending`` into the queue (the directory may be purged)."""
    for _ in range(QUEUE_ATTEMPTS):
        directory = queue / day
        _make_directory(directory)
        try:
            os.rename(pending, directory / pending.name)
        except FileNotFoundError:
            if not pending.exists():
                raise
            continue  # ssmsend removed the empty directory between mkdir and rename
        _fsync_directory(directory)
        return directory / pending.name
    raise ApelError(f"cannot move {pending} into {queue / day} after {QUEUE_ATTEMPTS} attempts")


@contextlib.contextmanager
def _apel_lock(state_dir: Path) -> Iterator[None]:
    """Serialise APEL writers: threads of vacd and ``vac apel-sync`` (flock per open file)."""
    pending = state_dir / PENDING
    _make_directory(pending)
    with open(pending / ".lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _find_archived(archive: Path, name: str, since_day: str) -> Optional[Path]:
    """The archived record called ``name`` in a day directory from ``since_day`` on, if any."""
    with contextlib.suppress(FileNotFoundError):
        for day in sorted(os.listdir(archive)):
            if DAY_RE.match(day) and day >= since_day and (archive / day / name).is_file():
                return archive / day / name
    return None


def _after_commit(state_dir: Path, archived: Path) -> Optional[Path]:
    """After the commit: tidy up, index the record as queued and move its pending copy into
    the queue; the outgoing path if this call queued it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(archived.parent / f"{archived.name}.tmp")  # a crash came before its unlink
    pending = state_dir / PENDING / archived.name
    if not pending.exists():
        return None  # not publishable, or already moved
    day = archived.parent.name
    queued_dir = state_dir / QUEUED / day
    _make_directory(queued_dir)
    with contextlib.suppress(FileExistsError):
        os.link(archived, queued_dir / archived.name)
    try:
        return _move_into_queue(pending, state_dir / OUTGOING, day)
    except FileNotFoundError:
        return None  # another process moved it just now


# -- the operations -----------------------------------------------------------------------------


def write_accounting(settings: Settings, machinetype: Machinetype, machine: Machine,
                     end_time: float, cpu_seconds: float,
                     infrastructure: Infrastructure = VAC) -> AccountingResult:
    """Archive (and, if publishable, queue for ssmsend) the record of a finished machine.

    Idempotent per ``machine.uuid``: a second call writes nothing and says so (and completes
    an outgoing copy a crash left pending). Machines that never started or ran less than
    ``fizzle_seconds`` get no record. Raises ApelError for unusable data or unwritable files.
    """
    state_dir = Path(settings.state_dir)
    archive = state_dir / ARCHIVE
    name = record_name(machine.uuid)
    earliest = min(machine.created, machine.started or machine.created) - 86400
    try:
        with _apel_lock(state_dir):
            archived = _find_archived(archive, name, utc_day(max(earliest, 0)))
            if archived is not None:
                queued = _after_commit(state_dir, archived)
                detail = f"APEL record of {machine.uuid} already written ({archived})"
                if queued is not None:
                    detail += f"; its outgoing copy was left pending and is now queued ({queued})"
                return AccountingResult(Outcome.ALREADY_WRITTEN, detail, archived, queued)
            if machine.started is None:
                return AccountingResult(Outcome.NOT_STARTED, f"no APEL record: {machine.uuid} never started")
            wall = end_time - machine.started
            if wall < machinetype.fizzle_seconds:
                return AccountingResult(
                    Outcome.FIZZLED, f"no APEL record: {machine.uuid} ran {int(wall)} s, "
                    f"less than fizzle_seconds = {machinetype.fizzle_seconds}")
            data = record_text(settings, machinetype, machine, end_time, cpu_seconds,
                               infrastructure).encode("ascii")
            day = utc_day(end_time)
            pending = state_dir / PENDING / name
            if is_publishable(settings, machine):
                _write_synced(pending, data, os.O_TRUNC)  # decided before the commit, see module doc
            else:
                with contextlib.suppress(FileNotFoundError):
                    pending.unlink()  # left by an earlier attempt under another configuration
            _make_directory(archive / day)
            archived = archive / day / name
            if not _link_element(archive / day, name, data, fresh_temporary=False):  # the commit
                raise ApelError(f"{archived} exists but was not found before: another record has "
                                f"the same name as {machine.uuid}'s")
            queued = _after_commit(state_dir, archived)
    except OSError as error:
        raise ApelError(f"cannot write the APEL record of {machine.uuid}: {error}") from error
    if queued is not None:
        detail = f"APEL record of {machine.uuid} written ({archived}) and queued for ssmsend ({queued})"
    else:
        reason = "gocdb_sitename is not set" if not settings.gocdb_sitename else "its HS06 is unknown"
        detail = f"APEL record of {machine.uuid} written ({archived}), not sent: {reason}"
    return AccountingResult(Outcome.WRITTEN, detail, archived, queued)


def complete_pending(settings: Settings) -> int:
    """Queue every outgoing copy whose record was archived before a crash; how many."""
    state_dir = Path(settings.state_dir)
    moved = 0
    try:
        with _apel_lock(state_dir):
            for name in sorted(os.listdir(state_dir / PENDING)):
                if not ELEMENT_RE.match(name):
                    continue
                archived = _find_archived(state_dir / ARCHIVE, name, "")
                if archived is None:
                    continue  # not committed: the machine's next write_accounting decides
                queued = _after_commit(state_dir, archived)
                if queued is not None:
                    log.info("queued the pending APEL record %s for ssmsend (%s)", archived, queued)
                    moved += 1
    except OSError as error:
        raise ApelError(f"cannot complete pending APEL records: {error}") from error
    return moved


def parse_month(text: str) -> tuple[int, int]:
    """``YYYYMM`` -> (year, month), or ValueError with a clear message."""
    match = MONTH_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a month in the form YYYYMM")
    return int(match.group(1)), int(match.group(2))


def default_month(now: float) -> str:
    """The month containing now - 24 h: a daily run also closes the previous month on the 1st."""
    return time.strftime("%Y%m", time.gmtime(now - 86400))


def count_queued(settings: Settings, year: int, month: int) -> dict[tuple[str, str], int]:
    """Records queued for ssmsend that ended in the month, by (Site, SubmitHost)."""
    queued = Path(settings.state_dir) / QUEUED
    prefix = f"{year:04d}{month:02d}"
    counts: dict[tuple[str, str], int] = {}
    try:
        days = sorted(day for day in os.listdir(queued) if DAY_RE.match(day) and day.startswith(prefix))
    except FileNotFoundError:
        return counts
    for day in days:
        for name in sorted(os.listdir(queued / day)):
            if not ELEMENT_RE.match(name):
                continue
            path = queued / day / name
            try:
                with open(path, "rb") as record_file:
                    fields = parse_record(record_file.read(MAX_RECORD_READ).decode("ascii"))
            except (OSError, UnicodeDecodeError) as error:
                log.warning("APEL sync: skipping unreadable record %s: %s", path, error)
                continue
            if not fields.get("Site") or not fields.get("SubmitHost"):
                log.warning("APEL sync: skipping %s: it has no Site or no SubmitHost", path)
                continue
            key = (fields["Site"], fields["SubmitHost"])
            counts[key] = counts.get(key, 0) + 1
    return counts


def sync_records(settings: Settings, months: Sequence[str] = (),
                 now: Optional[float] = None) -> list[SyncResult]:
    """Write one sync message per month (default: the month of now - 24 h) to ``apel-outgoing/``.

    Each message has a record for this factory's (Site, SubmitHost), possibly with 0 jobs, and
    one for any other pair found among that month's queued records (for example after a
    rename). Raises ApelError if ``gocdb_sitename`` is not set (nothing is published then) and
    ValueError for a malformed month.
    """
    if not settings.gocdb_sitename:
        raise ApelError("gocdb_sitename is not set, so no records are sent and no sync record is written")
    now = time.time() if now is None else now
    parsed = [parse_month(month) for month in (months or [default_month(now)])]
    complete_pending(settings)
    results = []
    own = (site_name(settings), submit_host(settings))
    for year, month in parsed:
        found = count_queued(settings, year, month)
        pairs = [own] + sorted(pair for pair in found if pair != own)
        counts = tuple(SyncCount(site, host, found.get((site, host), 0)) for site, host in pairs)
        for count in counts[1:]:
            log.warning("APEL sync %04d-%02d: %d records have Site %s and SubmitHost %s, not this "
                        "factory's; they get their own sync record", year, month,
                        count.number_of_jobs, count.site, count.submit_host)
        try:
            path = enqueue(Path(settings.state_dir) / OUTGOING, utc_day(now), sync_text(counts, year, month))
        except OSError as error:
            raise ApelError(f"cannot write the APEL sync record for {year:04d}{month:02d}: {error}") from error
        results.append(SyncResult(year, month, counts, path))
    return results
