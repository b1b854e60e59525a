"""Real cloud-side servers for the ``cloud`` tests: moto's EC2 server as a subprocess.

``MotoServer`` runs ``moto_server`` (from ``moto[server]``) on 127.0.0.1 at a free port and
stops it by its PID.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from pathlib import Path

from vac.core.cloud import machine_name
from vac.core.model import Machine

START_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """``moto_server`` on loopback; ``url`` is its endpoint."""

    def __init__(self, log_path: Path) -> None:
        executable = Path(sys.executable).with_name("moto_server")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        # No AWS configuration of the host may leak into the server.
        environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        # Refuse unknown images and key pairs, as EC2 does (moto accepts anything by default).
        environment.update(MOTO_ENABLE_AMI_VALIDATION="true", MOTO_ENABLE_KEYPAIR_VALIDATION="true")
        self.process = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not answer in {START_SECONDS:g} s") from None
                time.sleep(0.2)

    def reset(self) -> None:
        """Forget every resource (moto's own reset call), so each test starts empty."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


USER_DATA = b"#!/bin/sh\necho hello\n"


def new_machine(directory: Path, user_data: bytes = USER_DATA) -> tuple[Machine, Path]:
    """A vcycle machine record with its directory holding ``user_data``, as vcycled prepares it."""
    name = machine_name("lhcb")
    machine = Machine(uuid=str(uuidlib.uuid4()), name=name, slot=0, machinetype="lhcb",
                      machine_model="vm-raw", processors=1, created=1.8e9, deadline=1.8e9 + 86400)
    machine_dir = directory / name
    machine_dir.mkdir()
    (machine_dir / "user_data").write_bytes(user_data)
    return machine, machine_dir
