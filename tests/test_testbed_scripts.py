"""The test-bed scripts: scripts/testbed-preflight finds what holds 169.254.0.0/16 (a libvirt
network through libvirt's test:/// driver, an interface address) in a network namespace of its
own, so neither the host's networks nor other test runs disturb it; and the ownership rules of
scripts/testbed-up/-down and scripts/run-tests, read from the scripts themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import tiers

ROOT = Path(__file__).resolve().parent.parent
PREFLIGHT = ROOT / "scripts" / "testbed-preflight"

FACTORY_NODE = """<node>
  <network>
    <name>vac_169.254.0.0</name>
    <bridge name='virbr1'/>
    <forward mode='nat'/>
    <ip address='169.254.169.253' netmask='255.255.0.0'/>
  </network>
</node>
"""

pytestmark = pytest.mark.component


def in_own_netns(script: str, uri: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a new network namespace that only this test uses."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("virsh") is None:
        tiers.require(tiers.SYSTEM, "needs root, unshare and virsh")
    return subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, VAC_TESTBED_URI=uri), check=False)


def test_a_free_range_passes_quietly():
    result = in_own_netns(str(PREFLIGHT), "test:///default")  # its one network is 192.168.122.0/24
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_factory_network_on_the_range_is_named_in_one_line(tmp_path):
    node = tmp_path / "node.xml"
    node.write_text(FACTORY_NODE)
    result = in_own_netns(str(PREFLIGHT), f"test://{node}")
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "held by libvirt network vac_169.254.0.0 (bridge virbr1)" in line
    assert "VAC_NO_TESTBED=1" in line and "virsh net-destroy" in line


def test_an_interface_address_on_the_range_is_named():
    result = in_own_netns(f"ip link add v0 type veth peer name v1 && ip address add 169.254.7.7/16 dev v0 "
                          f"&& exec {PREFLIGHT}", "test:///default")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "held by interface v0 (169.254.7.7/16)" in line


def test_run_tests_checks_the_range_before_the_system_tier_and_keeps_its_own_state():
    text = (ROOT / "scripts" / "run-tests").read_text()
    assert text.index("scripts/testbed-preflight") < text.index('-m pytest')
    # testbed-down stops only what the same run's testbed-up recorded: a per-run state directory.
    assert 'VAC_TESTBED_STATE=/run/vac-testbed/run-tests.$$' in text


def test_quickstart_does_not_share_its_daemons_with_test_runs():
    text = (ROOT / "scripts" / "quickstart").read_text()
    assert 'VAC_TESTBED_STATE=/run/vac-quickstart' in text
