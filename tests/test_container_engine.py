"""The docker/podman container policy and the engines' answers (pure: no engine runs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vac.backends.base import BackendError
from vac.backends.container import common
from vac.backends.container.engine import (
    ENGINES,
    ContainerInfo,
    container_spec,
    parse_event,
    parse_ps,
    run_argv,
)
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine

UUID = "0f0e0d0c-0b0a-4908-8706-050403020100"
SETTINGS = Settings(vac_space="vac01.example.org", factory_name="wn001.example.org",
                    mb_per_processor=2048)
MACHINE = Machine(uuid=UUID, name="wn001-03.example.org", slot=3, machinetype="lhcb",
                  machine_model="docker", processors=2, created=1700000000.0,
                  deadline=1700086400.0)
LHCB = Machinetype(name="lhcb", root_image="docker://registry.example.org:5000/lhcb/pilot:7",
                   machine_model="docker", container_command="/user_data --site 'UKI EXAMPLE'",
                   cvmfs_repositories=("lhcb.cern.ch",), tmp_binds=("/scratch", "/home/pilot"))
DIRECTORY = Path("/var/lib/vac/machines/1700000000_lhcb_wn001-03.example.org")


def spec(**changes):
    return container_spec(MACHINE, dataclasses.replace(LHCB, **changes), SETTINGS,
                          DIRECTORY, engine="podman", network="bridge", runtime="runc",
                          cgroup_root="/vac", ulimits=(1048576, 32768),
                          cvmfs=["/cvmfs/lhcb.cern.ch"])


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_run_argv_golden(engine, golden):
    argv = run_argv(ENGINES[engine], engine, spec())
    golden(f"containers/{engine}-run.argv", "\n".join(argv) + "\n")


def test_the_classic_contract_inside():
    made = spec()
    binds = {bind.target: (bind.source, bind.read_only) for bind in made.binds}
    assert binds["/etc/machinefeatures"] == (f"{DIRECTORY}/machinefeatures", True)
    assert binds["/etc/jobfeatures"] == (f"{DIRECTORY}/jobfeatures", True)
    assert binds["/var/spool/joboutputs"] == (f"{DIRECTORY}/joboutputs", False)
    assert binds["/user_data"] == (f"{DIRECTORY}/user_data", True)
    assert binds["/cvmfs/lhcb.cern.ch"] == ("/cvmfs/lhcb.cern.ch", True)
    assert binds["/home/pilot"] == (f"{DIRECTORY}/mnt/tmp_binds/%2Fhome%2Fpilot", False)
    assert binds["/tmp"] == (f"{DIRECTORY}/mnt/tmp", False)  # noqa: S108 (container path)
    assert made.command == ("/user_data", "--site", "UKI EXAMPLE")
    assert made.image == "registry.example.org:5000/lhcb/pilot:7"
    assert (made.cpus, made.memory_bytes) == (2, 2 * 2048 << 20)
    assert made.cgroup_parent == f"/vac/podman-{UUID}"
    assert dict(made.labels)["vac.machine_uuid"] == UUID
    assert dict(made.labels)["vac.factory"] == "wn001.example.org"


def test_default_command_is_user_data():
    assert spec(container_command=None).command == ("/user_data",)


@pytest.mark.parametrize("image, message", [
    ("lhcb-pilot.img", "must be docker://IMAGE"), ("docker://", "does not name an image"),
    ("docker://--privileged", "does not name an image"), (None, "must be docker://IMAGE")])
def test_bad_images_are_refused(image, message):
    with pytest.raises(BackendError, match=message):
        spec(root_image=image)


def test_bad_commands_are_refused():
    with pytest.raises(BackendError, match="No closing quotation"):
        common.command_argv("/user_data 'x")
    with pytest.raises(BackendError, match="empty"):
        common.command_argv("  ")


def test_limits_never_exceed_the_hard_limits(tmp_path):
    assert common.clamp_limit(20000, common.MAX_NOFILE) == 20000
    assert common.clamp_limit(-1, 7) == 7  # RLIM_INFINITY
    pid_max = tmp_path / "pid_max"
    pid_max.write_text("4096\n")
    nofile, nproc = common.process_ulimits(str(pid_max))
    assert nproc <= 4096 and nofile >= 1


def test_podman_ps_json():
    text = json.dumps([
        {"Id": "7bd6", "Names": [f"vac-{UUID}"], "State": "exited", "ExitCode": 3,
         "Labels": {"vac.machine_uuid": UUID, "vac.factory": "wn001.example.org"}},
        {"Id": "8ce7", "Names": ["other"], "State": "running", "Labels": None},
    ])
    assert parse_ps(text) == [ContainerInfo(UUID, f"vac-{UUID}", False, 3)]
    assert parse_ps("[]\n") == [] and parse_ps("") == []


def test_docker_ps_json_lines():
    line = json.dumps({"ID": "7bd6", "Names": f"vac-{UUID}", "State": "running",
                       "Labels": f"vac.factory=wn001.example.org,vac.machine_uuid={UUID}"})
    assert parse_ps(line + "\n") == [ContainerInfo(UUID, f"vac-{UUID}", True, None)]
    with pytest.raises(BackendError, match="cannot parse"):
        parse_ps("Error: not json")


def test_died_events_of_both_engines():
    podman = {"ContainerExitCode": 3, "ID": "7bd6", "Name": "c15ev", "Status": "died",
              "Type": "container", "Attributes": {"vac.machine_uuid": UUID}}
    docker = {"status": "die", "id": "7bd6", "Type": "container", "Action": "die",
              "Actor": {"ID": "7bd6", "Attributes": {"exitCode": "3", "vac.machine_uuid": UUID}}}
    assert parse_event(json.dumps(podman)) == UUID
    assert parse_event(json.dumps(docker)) == UUID
    assert parse_event(json.dumps({**podman, "Status": "start"})) is None
    assert parse_event(json.dumps({**podman, "Attributes": {}})) is None
    assert parse_event("not json") is None
    assert parse_event("[1]") is None


@pytest.mark.parametrize("model, reported", [("podman", "docker"), ("docker", "docker"),
                                             ("apptainer", "singularity"),
                                             ("singularity", "singularity"),
                                             ("cernvm3", "cernvm3")])
def test_vacquery_reports_the_classic_model_names(model, reported):
    from vac.services.vacquery import MachineStatus

    machine = dataclasses.replace(MACHINE, machine_model=model)
    assert MachineStatus.from_machine(SETTINGS.factory_name, machine).machine_model == reported
