"""What a libvirt domain's QEMU process really used: its utime + stime, read from /proc.

The system tier compares vacd's accounting with this. The kernel keeps a process's times in
/proc/PID/stat until it is reaped (as a zombie too, TESTBED.md P8), so the last value seen
before it disappears is its total, give or take one polling interval of CPU.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Optional

QEMU_PID_DIR = Path("/run/libvirt/qemu")  # libvirtd's pid file of each running domain
POLL_SECONDS = 0.05


def process_cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of the whole process ``pid`` (all its threads), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class QemuCpuWatcher:
    """Follows the QEMU process of the domain ``domain_name`` until it is gone (or ``timeout``)."""

    def __init__(self, domain_name: str, timeout: float):
        self.pid_file = QEMU_PID_DIR / f"{domain_name}.pid"
        self.timeout = timeout
        self.pid: Optional[int] = None
        self.seconds: Optional[float] = None  # the last reading
        self.ended = False  # the process was seen and then disappeared
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch-{domain_name}",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.pid is None:
                try:
                    self.pid = int(self.pid_file.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pass  # not started yet (or being written)
            else:
                seconds = process_cpu_seconds(self.pid)
                if seconds is None:
                    self.ended = True
                    break
                self.seconds = seconds
            time.sleep(POLL_SECONDS)
        self.done.set()

    def total(self) -> float:
        """The process's CPU seconds once it has gone; AssertionError if it never ran or stays."""
        self.done.wait(self.timeout + 5)
        assert self.ended and self.seconds is not None, \
            f"QEMU of {self.pid_file.stem} (pid {self.pid}) was not seen running and ending"
        return self.seconds
