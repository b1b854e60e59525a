"""A whole vacd run as its own process, as the scenario tiers (containers, real VMs) drive it.

Subclasses write the configuration fragments into ``conf_dir``; this class starts and kills the
process and reads what it leaves: machine records, the log, archived APEL records.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from tests.waiting import wait_until

WAIT_SECONDS = 120.0  # generous: TCG boots take ~5-10 s, slower when the machine is busy


def machine_records(machines_dir: Path) -> list[dict]:
    """Every machine record in ``machines_dir`` (a state directory's ``machines``, vacd's or a
    vcycled space's), with its directory as ``dir``."""
    found = []
    for path in sorted(machines_dir.glob("*/machine.json")):
        try:
            found.append(json.loads(path.read_text())["machine"] | {"dir": path.parent})
        except (OSError, ValueError):
            continue  # being replaced, or expired, right now
    return found


class VacdProcess:
    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.conf_dir = root / "vac.d"
        self.conf_dir.mkdir(exist_ok=True)
        self.log = root / "vacd.log"
        self.process: Optional[subprocess.Popen] = None

    def config_options(self) -> list[str]:
        return ["--conf-dir", str(self.conf_dir), "--conf", str(self.root / "absent.conf"),
                "--run-conf", str(self.root / "run.conf")]

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vac.daemon.vacd", *self.config_options(),
             "--log-file", str(self.log), "--debug"], stdin=subprocess.DEVNULL)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)
        self.process = None

    def destroy_domains(self) -> None:
        """Destroy the libvirt domains of this vacd's records that are still there (after the
        test stopped it: they must not outlive the test)."""
        import libvirt  # only the real-VM tier has it

        conn = libvirt.open("qemu:///system")
        try:
            for record in self.records():
                try:
                    conn.lookupByUUIDString(record["uuid"]).destroy()
                except libvirt.libvirtError:
                    pass
        finally:
            conn.close()

    def records(self) -> list[dict]:
        """Every machine record, with its directory as ``dir``."""
        return machine_records(self.state / "machines")

    def machines_in(self, state: str, uuid: Optional[str] = None) -> list[dict]:
        return [record for record in self.records()
                if record["state"] == state and uuid in (None, record["uuid"])]

    def wait_for(self, what: str, predicate: Callable, timeout: float = WAIT_SECONDS):
        """The first true value of ``predicate``; fails at once if vacd exits meanwhile."""
        return wait_until(what, predicate, timeout, process=self.process, name="vacd",
                          details=lambda: self.log_text(6000))

    def log_text(self, tail: int = 0) -> str:
        try:
            text = self.log.read_text()
        except OSError:
            return "(no log)"
        return text[-tail:] if tail else text

    def apel_paths(self) -> list[str]:
        """Every archived APEL record file."""
        return sorted(str(path) for path in (self.state / "apel-archive").rglob("*") if path.is_file())

    def apel_records(self, uuid: str) -> list[dict]:
        """The ``Key: value`` fields of every archived APEL record of machine ``uuid``."""
        found = []
        for path in self.apel_paths():
            text = Path(path).read_text()
            if uuid in text:
                found.append(dict(line.split(": ", 1) for line in text.splitlines() if ": " in line))
        return found
