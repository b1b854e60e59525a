"""Pure decisions of the cloud side (vcycle): machine names, flavor choice, image markers, states.

No I/O: the cloud backends (vac.backends.cloud) and vcycled share these rules, and tests check
them without a cloud.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import random
import re
import string
from collections.abc import Iterable, Sequence
from typing import Optional

NAME_PREFIX = "vcycle-"
NAME_ID_LENGTH = 10
_NAME = re.compile(rf"{NAME_PREFIX}([a-z0-9](?:[a-z0-9-]*[a-z0-9])?)-([a-z0-9]{{{NAME_ID_LENGTH}}})\Z")
_ID_ALPHABET = string.ascii_lowercase + string.digits

# Server metadata (OpenStack) and instance tags (EC2) written on every machine. ``name`` and
# ``machinetype`` are the classic Vcycle keys; the UUID and space are ours, so that two spaces
# sharing one tenancy never touch each other's machines.
META_NAME = "name"
META_MACHINETYPE = "machinetype"
META_UUID = "vcycle_uuid"
META_SPACE = "vcycle_space"
META_MANAGER = "vcycle_manager"  # the vcycled host that created the machine (classic: a file)


def machine_metadata(name: str, machinetype: str, uuid: str, space: str, manager: str) -> dict[str, str]:
    """The metadata (OpenStack) or tags (EC2) every new machine carries."""
    return {META_NAME: name, META_MACHINETYPE: machinetype, META_UUID: uuid, META_SPACE: space,
            META_MANAGER: manager}

# Glance image property recording the modification time of the file an image was uploaded from.
IMAGE_MARKER_PROPERTY = "last_modified"
# Classic Vcycle recorded it as a tag "last_modified: <mtime>" instead; such images are reused.
_CLASSIC_MARKER_TAG_PREFIX = "last_modified: "


def machine_name(machinetype: str, rng: Optional[random.Random] = None) -> str:
    """A new classic machine name, ``vcycle-<machinetype>-<10 × [a-z0-9]>``."""
    choose = (rng or random.SystemRandom()).choice
    return f"{NAME_PREFIX}{machinetype}-{''.join(choose(_ID_ALPHABET) for _ in range(NAME_ID_LENGTH))}"


def parse_machine_name(name: str) -> Optional[str]:
    """The machinetype named in a vcycle machine name, or None if ``name`` is not one."""
    match = _NAME.match(name)
    return match.group(1) if match else None


def is_vcycle_name(name: str) -> bool:
    """Classic rule: every server whose name starts ``vcycle-`` is a vcycle machine."""
    return name.startswith(NAME_PREFIX)


@dataclasses.dataclass(frozen=True)
class Flavor:
    """One cloud flavor (OpenStack flavor, EC2 instance type)."""

    id: str
    name: str
    vcpus: int
    ram_mb: int = 0


def choose_flavor(flavors: Sequence[Flavor], names: Sequence[str], min_processors: int,
                  max_processors: int) -> Optional[Flavor]:
    """The flavor for a machinetype, or None if none fits.

    Configured ``names``: the first of them (in configuration order) that exists with vCPUs in
    [min_processors, max_processors], as in classic Vcycle. No names: the smallest fitting flavor
    (fewest vCPUs, then least RAM, then name), so that a choice never depends on listing order.
    """
    fits = [flavor for flavor in flavors if min_processors <= flavor.vcpus <= max_processors]
    if names:
        by_name = {flavor.name: flavor for flavor in fits}
        return next((by_name[name] for name in names if name in by_name), None)
    return min(fits, key=lambda flavor: (flavor.vcpus, flavor.ram_mb, flavor.name), default=None)


def image_marker(mtime: float) -> str:
    """The ``last_modified`` value recorded on an image uploaded from a file of this mtime."""
    return str(int(mtime))


def image_matches(marker: str, properties: dict, tags: Iterable[str]) -> bool:
    """Whether an image carries ``marker``: as our property, or as the classic tag.

    The classic code compared ``tag.lstrip('last_modified: ')``, which strips a *set* of
    characters, so "aeiou: 1234" matched 1234. Here the prefix must be exactly there and the rest
    must equal the marker.
    """
    if properties.get(IMAGE_MARKER_PROPERTY) == marker:
        return True
    for tag in tags:
        if isinstance(tag, str) and tag.startswith(_CLASSIC_MARKER_TAG_PREFIX) \
                and tag[len(_CLASSIC_MARKER_TAG_PREFIX):] == marker:
            return True
    return False


class CloudState(str, enum.Enum):
    """A cloud machine's state in the classic Vcycle vocabulary (REFERENCE.md §10)."""

    STARTING = "Starting"
    RUNNING = "Running"
    SHUT_DOWN = "Shut down"
    FAILED = "Failed"
    DELETING = "Deleting"
    UNKNOWN = "Unknown"

    @property
    def active(self) -> bool:
        """Still running or about to (the daemon waits); the others have ended."""
        return self in (CloudState.STARTING, CloudState.RUNNING, CloudState.UNKNOWN)


def nova_state(status: str, task_state: Optional[str], power_state: Optional[int]) -> CloudState:
    """Classic mapping of a Nova server, with the ``deleting`` task state Nova really uses."""
    if (task_state or "").lower() == "deleting" or status in ("DELETED", "SOFT_DELETED"):
        return CloudState.DELETING
    if status == "ACTIVE":
        return CloudState.RUNNING if power_state == 1 else CloudState.STARTING
    if status == "BUILD":
        return CloudState.STARTING
    if status == "SHUTOFF":
        return CloudState.SHUT_DOWN
    if status == "ERROR":
        return CloudState.FAILED
    return CloudState.UNKNOWN  # REBOOT, RESIZE, MIGRATING, ...: transient, still there


_EC2_STATES = {
    "pending": CloudState.STARTING,
    "running": CloudState.RUNNING,
    "stopping": CloudState.SHUT_DOWN,
    "stopped": CloudState.SHUT_DOWN,
    "shutting-down": CloudState.DELETING,
    "terminated": CloudState.DELETING,
}


def ec2_state(name: str) -> CloudState:
    """Mapping of an EC2 ``InstanceState.Name``; anything else is Failed (classic ``error``)."""
    return _EC2_STATES.get(name, CloudState.FAILED)


def parse_time(text: object) -> Optional[float]:
    """Unix time of an ISO 8601 cloud timestamp; a missing zone means UTC; None if unusable.

    Nova gives ``2024-05-01T10:00:00Z`` and ``2024-05-01T10:00:00.000000`` (no zone);
    Python 3.9's ``fromisoformat`` does not accept ``Z``.
    """
    if isinstance(text, datetime.datetime):
        moment = text
    elif isinstance(text, str) and text:
        try:
            moment = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def creation_budget(processors_limit: int) -> int:
    """Processors' worth of creations per cycle: a tenth of the limit, rounded up (classic)."""
    return max(1, -(-processors_limit // 10))
