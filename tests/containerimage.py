"""A busybox container image for the container tier and benchmarks, made without any registry,
and the harness the backend tests share (``BackendHarness``).

The root file system is busybox-static with a link per applet, packed into a tar file by Python
and given to ``podman import``. The tag carries a hash of the busybox binary, so the image is
built once per host and busybox version and reused afterwards (the cache is the engine's own
image store).
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import shutil
import subprocess
import tarfile
import time
import uuid as uuidmod
from pathlib import Path
from typing import Any, Optional

from tests import tiers
from vac.backends.container.engine import EngineBackend
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine
from vac.records.store import Store
from vac.services import metadata

BUSYBOX = "/bin/busybox"
IMAGE_REPOSITORY = "localhost/vac-test-busybox"


def engine_available(engine: str = "podman") -> Optional[str]:
    """None if ``engine`` answers, else why not."""
    if shutil.which(engine) is None:
        return f"{engine} is not installed"
    try:
        result = subprocess.run([engine, "version"], capture_output=True, text=True, timeout=60,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{engine} does not answer: {error}"
    if result.returncode != 0:
        return f"{engine} does not answer: {result.stderr.strip()[-200:]}"
    return None


def _rootfs_tar(busybox: bytes, applets: list) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "etc", "tmp", "var", "var/tmp", "proc", "sys", "dev", "run"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if "tmp" in directory else 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(busybox), 0o755
        tar.addfile(info, io.BytesIO(busybox))
        for applet in applets:
            if applet == "busybox" or "/" in applet:
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode = len(passwd), 0o644
        tar.addfile(info, io.BytesIO(passwd))
    return buffer.getvalue()


def busybox_image(engine: str = "podman", repository: str = IMAGE_REPOSITORY) -> str:
    """The image name (without docker://), imported on first use; scripts/quickstart uses it
    for its demo container machinetype under a repository name of its own."""
    with open(BUSYBOX, "rb") as handle:
        busybox = handle.read()
    image = f"{repository}:{hashlib.sha256(busybox).hexdigest()[:12]}"
    exists = subprocess.run([engine, "image", "inspect", image], capture_output=True, timeout=60,
                            check=False)
    if exists.returncode == 0:
        return image
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, timeout=60,
                             check=True).stdout.split()
    subprocess.run([engine, "import", "-", image], input=_rootfs_tar(busybox, applets),
                   capture_output=True, timeout=300, check=True)
    return image


def require_container_tier(reason: Optional[str]) -> None:
    """With a reason the tier cannot run: fail where it is required (CI, VAC_REQUIRE_CONTAINER=1),
    skip elsewhere."""
    tiers.require(tiers.CONTAINER, reason)


def remove_factory_containers(factory: str) -> None:
    """Remove the containers of ``factory`` that vacd left running when it stopped (it leaves
    machines running by design)."""
    backend = EngineBackend(factory, lambda uuid: None, engine="podman", runtime="runc",
                            network="none")
    backend.connect()
    try:
        for machine in backend.list_machines():
            backend.destroy(machine.uuid)
            backend.forget(machine.uuid)
    finally:
        backend.close()


def podman_image() -> str:
    """The busybox test image, once podman and root are known to be there."""
    require_container_tier(engine_available("podman") if os.geteuid() == 0 else "needs root")
    return busybox_image("podman")


def wait_reported(stopped: queue.Queue, uuid: str, seconds: float) -> None:
    """Until a backend's on_stopped has put ``uuid`` in ``stopped`` (others are passed over)."""
    import pytest

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if stopped.get(timeout=max(0.1, deadline - time.monotonic())) == uuid:
                return
        except queue.Empty:
            break
    pytest.fail(f"no stopped report for {uuid} within {seconds} s")


class BackendHarness:
    """A state directory, the settings, and container backends sharing a cgroup root, all
    removed by ``close``. Subclasses make the backends and pass them to ``track``."""

    def __init__(self, state: Path, settings: Settings):
        self.cgroup_root = f"/vac-test-{uuidmod.uuid4()}"
        self.store = Store(state)
        self.store.prepare()
        self.settings = settings
        self.stopped: queue.Queue = queue.Queue()
        self.backends: list = []

    def track(self, backend: Any) -> Any:
        backend.connect()
        self.backends.append(backend)
        return backend

    def prepare(self, machine: Machine, machinetype: Machinetype, script: str) -> Path:
        """What the daemon does before ``create``: directory, MJF, user_data (0600)."""
        directory = self.store.create_machine_dir(machine)
        features = metadata.mjf_features(machine, self.settings, machinetype, time.time())
        metadata.write_mjf(directory, *features)
        self.store.write_file(machine, "user_data", "#!/bin/sh\n" + script, mode=0o600)
        return directory

    def wait_stopped(self, uuid: str, seconds: float = 60.0) -> None:
        wait_reported(self.stopped, uuid, seconds)

    def close(self) -> None:
        for backend in self.backends:
            for machine in backend.list_machines():
                backend.destroy(machine.uuid)
            backend.close()
        cgroups = next((backend.cgroups for backend in self.backends if backend.cgroups is not None), None)
        if cgroups is not None:
            cgroups.remove(self.cgroup_root)
