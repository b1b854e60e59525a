"""The quick start's configuration: the demo VM machinetype, and with --containers the demo
container machinetype beside it, as scripts/quickstart writes them (files only, no engine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vac.core import config as configmod

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "etc" / "quickstart"


def written(tmp_path: Path, containers: bool) -> configmod.ConfigPaths:
    """/etc/vac.d as scripts/quickstart leaves it (its substitutions; state_dir here)."""
    conf_dir = tmp_path / "vac.d"
    conf_dir.mkdir()
    text = (QUICKSTART / "00-quickstart.conf").read_text()
    text = text.replace("@FACTORY@", "demo.vac.localdomain").replace("@PROCESSORS@", "3")
    text = text.replace("[settings]\n", f"[settings]\nstate_dir = {tmp_path}\n", 1)
    (conf_dir / "00-quickstart.conf").write_text(text)
    if containers:
        text = (QUICKSTART / "10-quickstart-containers.conf").read_text()
        (conf_dir / "10-quickstart-containers.conf").write_text(
            text.replace("@IMAGE@", "localhost/vac-demo-busybox:0123456789ab"))
    return configmod.ConfigPaths(conf_dir=str(conf_dir), main_conf=str(tmp_path / "none.conf"),
                                 run_confs=())


@pytest.mark.parametrize("containers", [False, True])
def test_the_quick_start_configuration_loads_without_problems(tmp_path, containers):
    config, problems = configmod.load_config(written(tmp_path, containers), processor_count=4)
    assert config is not None and [p for p in problems if p.is_error] == [], problems
    models = {name: mt.machine_model for name, mt in config.machinetypes.items()}
    assert models == ({"demo": "cernvm3", "democt": "podman"} if containers else {"demo": "cernvm3"})
    if containers:
        assert config.machinetypes["democt"].root_image.startswith("docker://localhost/")
        assert config.settings.container_network == "none"


def test_quickstart_takes_the_containers_flag_and_refuses_unknown_ones():
    script = ROOT / "scripts" / "quickstart"
    assert "--containers) containers=yes" in script.read_text()
    # Arguments are read before the root check: an unknown one is refused with the usage.
    result = subprocess.run(["bash", str(script), "--frobnicate"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_the_demo_container_pilot_uses_only_what_vac_gives_a_container():
    pilot = (QUICKSTART / "democt.user_data").read_text()
    assert pilot.startswith("#!/bin/sh\n")
    for variable in ("$JOBOUTPUTS/heartbeat", "$JOBOUTPUTS/shutdown_message", "$JOBFEATURES/",
                     "$MACHINEFEATURES/"):
        assert variable in pilot
    assert "vac-put" not in pilot, "containers have no metadata service: files, not HTTP"
