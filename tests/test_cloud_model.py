"""Pure rules of the cloud side (vac.core.cloud)."""

from __future__ import annotations

import random

import pytest

from vac.core import cloud
from vac.core.cloud import CloudState, Flavor


def test_machine_names_round_trip() -> None:
    name = cloud.machine_name("lhcb-prod", random.Random(1))
    assert name.startswith("vcycle-lhcb-prod-") and len(name) == len("vcycle-lhcb-prod-") + 10
    assert cloud.parse_machine_name(name) == "lhcb-prod"
    for not_ours in ("vcycle-lhcb-short", "vcycle--0123456789", "web-0123456789", "vcycle-lhcb-ABCDEFGHIJ"):
        assert cloud.parse_machine_name(not_ours) is None
    assert cloud.is_vcycle_name("vcycle-anything") and not cloud.is_vcycle_name("vcyclex")


FLAVORS = [Flavor("1", "small", 1, 2048), Flavor("2", "medium", 2, 4096), Flavor("3", "medium-lowmem", 2, 1024),
           Flavor("8", "huge", 8, 32768)]


def test_flavor_is_the_first_configured_name_that_fits() -> None:
    assert cloud.choose_flavor(FLAVORS, ["huge", "medium", "small"], 1, 2).name == "medium"
    assert cloud.choose_flavor(FLAVORS, ["missing", "small"], 1, 1).name == "small"
    assert cloud.choose_flavor(FLAVORS, ["huge"], 1, 4) is None


def test_without_names_the_smallest_fitting_flavor() -> None:
    assert cloud.choose_flavor(FLAVORS, [], 2, 4).name == "medium-lowmem"
    assert cloud.choose_flavor(list(reversed(FLAVORS)), [], 2, 4).name == "medium-lowmem"
    assert cloud.choose_flavor(FLAVORS, [], 3, 4) is None


def test_image_marker_prefix_is_exact() -> None:
    marker = cloud.image_marker(1_700_000_000.9)
    assert marker == "1700000000"
    assert cloud.image_matches(marker, {"last_modified": marker}, [])
    assert cloud.image_matches(marker, {}, ["architecture: x86_64", f"last_modified: {marker}"])
    # Classic lstrip('last_modified: ') would accept all of these.
    for tag in (f"atom: {marker}", f"{marker}", f"last_modified:  {marker}", f"last_modified: {marker}0"):
        assert not cloud.image_matches(marker, {}, [tag]), tag
    assert not cloud.image_matches(marker, {"last_modified": "1"}, [None, 5])


@pytest.mark.parametrize(("status", "task", "power", "state"), [
    ("ACTIVE", None, 1, CloudState.RUNNING),
    ("ACTIVE", None, 0, CloudState.STARTING),
    ("ACTIVE", "deleting", 1, CloudState.DELETING),  # classic tested "Deleting": never matched
    ("BUILD", "spawning", 0, CloudState.STARTING),
    ("SHUTOFF", None, 4, CloudState.SHUT_DOWN),
    ("ERROR", None, 0, CloudState.FAILED),
    ("DELETED", None, 0, CloudState.DELETING),
    ("REBOOT", "rebooting", 1, CloudState.UNKNOWN),
])
def test_nova_states(status: str, task: str, power: int, state: CloudState) -> None:
    assert cloud.nova_state(status, task, power) == state


def test_ec2_states_and_activity() -> None:
    assert cloud.ec2_state("pending") == CloudState.STARTING and CloudState.STARTING.active
    assert cloud.ec2_state("stopped") == CloudState.SHUT_DOWN and not CloudState.SHUT_DOWN.active
    assert cloud.ec2_state("shutting-down") == CloudState.DELETING
    assert cloud.ec2_state("weird") == CloudState.FAILED


def test_parse_time_accepts_cloud_spellings() -> None:
    assert cloud.parse_time("2024-05-01T10:00:00Z") == 1714557600.0
    assert cloud.parse_time("2024-05-01T10:00:00.000000") == 1714557600.0
    assert cloud.parse_time("2024-05-01T12:00:00+02:00") == 1714557600.0
    for bad in (None, "", "yesterday", 5):
        assert cloud.parse_time(bad) is None


def test_creation_budget_is_a_tenth_rounded_up() -> None:
    assert [cloud.creation_budget(limit) for limit in (1, 10, 11, 100, 0)] == [1, 1, 2, 10, 1]
