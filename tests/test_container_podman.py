"""The docker/podman machine models against real podman (``container`` tier).

podman runs here with runc (crun refuses this host's hybrid cgroup layout), on cgroup v1, with
a busybox image imported from a local root file system (no registry is reachable). Each test
uses its own factory label and cgroup root, so tests and other engineers' containers never mix.
Without podman or root the tier is skipped, or fails when VAC_REQUIRE_CONTAINER=1 (CI).
"""

from __future__ import annotations

import subprocess
import time
import uuid as uuidmod
from pathlib import Path

import pytest

from tests.containerimage import BackendHarness, podman_image
from vac.backends import scratch
from vac.backends.base import BackendError
from vac.backends.container.cgroups import Cgroups
from vac.backends.container.engine import EngineBackend, container_name
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine, slot_name

pytestmark = pytest.mark.container
RUNTIME = "runc"
WAIT_SECONDS = 60.0


@pytest.fixture(scope="module")
def image() -> str:
    return podman_image()


class Factory(BackendHarness):
    """A backend with its own factory label and cgroup root, and the machines it made."""

    def __init__(self, tmp_path: Path, image: str):
        self.name = f"ct{uuidmod.uuid4().hex[:10]}.test.invalid"
        self.cvmfs = tmp_path / "cvmfs"
        super().__init__(tmp_path / "state", Settings(
            vac_space="space.test.invalid", factory_name=self.name, mb_per_processor=128,
            container_runtime=RUNTIME, container_network="none", state_dir=str(tmp_path / "state")))
        self.image = image

    def backend(self) -> EngineBackend:
        return self.track(EngineBackend(self.name, self.stopped.put, engine="podman", runtime=RUNTIME,
                                        network="none", cgroup_root=self.cgroup_root,
                                        cvmfs_root=str(self.cvmfs)))

    def machinetype(self, **options) -> Machinetype:
        return Machinetype(name="ct", root_image=f"docker://{self.image}", machine_model="podman",
                           user_data="user_data", **options)

    def machine(self, slot: int = 0, processors: int = 1) -> Machine:
        now = time.time()
        return Machine(uuid=str(uuidmod.uuid4()), name=slot_name(self.name, slot), slot=slot,
                       machinetype="ct", machine_model="podman", processors=processors,
                       created=now, deadline=now + 3600)

    def start(self, backend: EngineBackend, script: str, processors: int = 1, **options):
        machinetype = self.machinetype(**options)
        machine = self.machine(processors=processors)
        directory = self.prepare(machine, machinetype, script)
        backend.create(machine, machinetype, self.settings, directory)
        return machine, machinetype, directory


@pytest.fixture
def factory(tmp_path, image):
    factory = Factory(tmp_path, image)
    yield factory
    factory.close()


def listed(backend: EngineBackend) -> dict:
    return {machine.uuid: machine for machine in backend.list_machines()}


def count_scratch_releases(monkeypatch) -> list:
    """The UUIDs ``scratch.release_scratch`` is called with from now on (it still runs)."""
    calls: list = []
    real = scratch.release_scratch

    def counted(uuid, *args, **kwargs):
        calls.append(uuid)
        real(uuid, *args, **kwargs)

    monkeypatch.setattr(scratch, "release_scratch", counted)
    return calls


def test_user_data_reads_mjf_and_reports_through_joboutputs(factory, monkeypatch):
    backend = factory.backend()
    factory.cvmfs.joinpath("lhcb.cern.ch").mkdir(parents=True)
    factory.cvmfs.joinpath("lhcb.cern.ch", "README").write_text("cvmfs\n")
    script = """\
out=$JOBOUTPUTS
echo "$MACHINEFEATURES $JOBFEATURES $JOBOUTPUTS" > $out/env
cat $JOBFEATURES/allocated_cpu > $out/allocated_cpu
hostname > $out/hostname
cat /cvmfs/lhcb.cern.ch/README > $out/cvmfs
touch /cvmfs/lhcb.cern.ch/x 2>/dev/null || echo ro > $out/cvmfs_write
touch /root-write 2>/dev/null || echo ro > $out/root_write
touch $JOBFEATURES/x 2>/dev/null || echo ro > $out/jobfeatures_write
echo scratch > /tmp/t && echo scratch > /scratch/t && cat /tmp/t /scratch/t > $out/scratch
grep CapEff /proc/self/status > $out/caps
date > $out/heartbeat
echo "300 No more work" > $out/shutdown_message
"""
    machine, _, directory = factory.start(backend, script, tmp_binds=("/scratch",),
                                          cvmfs_repositories=("lhcb.cern.ch",))
    factory.wait_stopped(machine.uuid)
    outputs = directory / "joboutputs"
    assert (outputs / "env").read_text() == \
        "/etc/machinefeatures /etc/jobfeatures /var/spool/joboutputs\n"
    assert (outputs / "allocated_cpu").read_text() == "1\n"
    assert (outputs / "hostname").read_text() == machine.name + "\n"
    assert (outputs / "cvmfs").read_text() == "cvmfs\n"
    for name in ("cvmfs_write", "root_write", "jobfeatures_write"):
        assert (outputs / name).read_text() == "ro\n", name
    assert (outputs / "scratch").read_text() == "scratch\nscratch\n"
    assert (directory / "mnt" / "tmp" / "t").exists()
    assert (outputs / "heartbeat").stat().st_size > 0
    assert factory.store.vm_shutdown_message(machine) == "300 No more work"
    assert int((outputs / "caps").read_text().split()[1], 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN
    assert listed(backend)[machine.uuid].active is False
    assert backend.exit_code(machine.uuid) == 0

    released = count_scratch_releases(monkeypatch)
    backend.release(machine, factory.settings, directory)
    assert released == [machine.uuid]  # the kernel's tables and LVM are read once, not twice
    assert machine.uuid not in listed(backend)
    assert not (directory / "mnt").exists()
    assert not backend.cgroups.exists(f"{factory.cgroup_root}/podman-{machine.uuid}")
    backend.release(machine, factory.settings, directory)  # idempotent


def test_stop_sends_sigterm_to_user_data(factory):
    backend = factory.backend()
    script = """\
trap 'echo terminated > $JOBOUTPUTS/term; exit 0' TERM
touch $JOBOUTPUTS/started
while :; do sleep 1; done
"""
    machine, _, directory = factory.start(backend, script)
    started = directory / "joboutputs" / "started"
    deadline = time.monotonic() + WAIT_SECONDS
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listed(backend)[machine.uuid].active
    backend.stop(machine.uuid)
    factory.wait_stopped(machine.uuid)
    assert (directory / "joboutputs" / "term").read_text() == "terminated\n"
    backend.stop(machine.uuid)  # idempotent once exited


def test_destroy_kills_what_ignores_sigterm(factory):
    backend = factory.backend()
    machine, _, _ = factory.start(backend, "trap '' TERM\nwhile :; do sleep 1; done\n")
    backend.stop(machine.uuid)
    time.sleep(1.0)  # a grace period: SIGTERM is ignored
    assert listed(backend)[machine.uuid].active
    backend.destroy(machine.uuid)
    assert machine.uuid not in listed(backend)
    backend.destroy(machine.uuid)  # idempotent
    backend.stop(machine.uuid)


def test_cpu_time_and_limits_come_from_the_cgroup(factory):
    backend = factory.backend()
    script = """\
touch $JOBOUTPUTS/started
end=$(( $(date +%s) + 3 ))
while [ $(date +%s) -lt $end ]; do :; done
"""
    machine, _, directory = factory.start(backend, script, processors=1)
    started = directory / "joboutputs" / "started"
    deadline = time.monotonic() + WAIT_SECONDS
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    limits = backend.limits(machine.uuid)
    assert limits is not None
    assert (limits.cpus, limits.memory_bytes) == (1.0, 128 << 20)
    factory.wait_stopped(machine.uuid)
    assert backend.limits(machine.uuid) is None  # not running
    cpu = backend.cpu_seconds(machine.uuid)
    assert cpu is not None and cpu >= 1.0
    assert listed(backend)[machine.uuid].cpu_seconds == cpu  # exited: the total stays put


def test_a_new_backend_adopts_running_containers(factory):
    first = factory.backend()
    machine, _, directory = factory.start(first, "trap 'exit 0' TERM\nwhile :; do sleep 1; done\n")
    first.close()  # vacd stops (or dies): the container keeps running

    second = factory.backend()
    assert listed(second)[machine.uuid].active
    assert listed(second)[machine.uuid].name == container_name(machine.uuid)
    second.stop(machine.uuid)
    factory.wait_stopped(machine.uuid)  # the new backend's event stream reports the end
    assert listed(second)[machine.uuid].active is False


def test_a_container_that_ended_while_vacd_was_down_is_reported(factory):
    first = factory.backend()
    machine, _, _ = factory.start(first, "sleep 1\n")
    first.close()
    deadline = time.monotonic() + WAIT_SECONDS
    while listed(first)[machine.uuid].active and time.monotonic() < deadline:
        time.sleep(0.2)
    while not factory.stopped.empty():
        factory.stopped.get_nowait()
    factory.backend()
    factory.wait_stopped(machine.uuid)


def test_a_labelled_container_without_record_is_listed_and_destroyed(factory):
    backend = factory.backend()
    zombie = str(uuidmod.uuid4())
    subprocess.run(["podman", "run", "--detach", "--runtime", RUNTIME, "--network", "none",
                    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                    "--label", f"vac.factory={factory.name}", "--label", f"vac.machine_uuid={zombie}",
                    "--name", container_name(zombie), factory.image, "sleep", "600"],
                   check=True, capture_output=True, timeout=120)
    assert listed(backend)[zombie].active
    backend.destroy(zombie)
    assert zombie not in listed(backend)


def test_a_failed_creation_leaves_no_container(factory):
    backend = factory.backend()
    # No registry is reachable (a pull from localhost is refused at once).
    machinetype = Machinetype(name="ct", root_image="docker://localhost/vac-test-absent:0",
                              machine_model="podman")
    machine = factory.machine()
    directory = factory.prepare(machine, machinetype, "true\n")
    with pytest.raises(BackendError, match=machine.name):
        backend.create(machine, machinetype, factory.settings, directory)
    assert machine.uuid not in listed(backend)


def test_a_missing_cvmfs_repository_fails_before_anything_starts(factory):
    backend = factory.backend()
    machinetype = factory.machinetype(cvmfs_repositories=("absent.cern.ch",))
    machine = factory.machine()
    directory = factory.prepare(machine, machinetype, "true\n")
    with pytest.raises(BackendError, match="absent.cern.ch is not available"):
        backend.create(machine, machinetype, factory.settings, directory)
    assert machine.uuid not in listed(backend)


def test_cgroups_are_detected_on_this_host(factory):
    assert factory.backend().cgroups.layout == Cgroups.detect().layout
