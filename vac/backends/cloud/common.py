"""What the OpenStack and EC2 backends share: the listed machine, TLS, keys, images, answers."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

from vac.backends.base import BackendError, BackendMachine
from vac.core.cloud import CloudState
from vac.core.config import Machinetype, Settings
from vac.core.model import Machine
from vac.core.vcycleconfig import GRID_CA_PATH, CloudMachinetype, Space

MAX_PAGES = 1000  # bound on the pages of one listing (1000 items a page: 10^6)
MAX_PUBLIC_KEY_BYTES = 16 * 1024
_KEY_TYPES = ("ssh-rsa", "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521", "ssh-dss")


class CloudError(BackendError):
    """The cloud refused a call; ``code`` is its error code (EC2) or HTTP status (OpenStack)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class CloudMachine(BackendMachine):
    """A cloud machine as listed: the seam's fields plus what vcycled decides on.

    ``uuid`` is our metadata/tag when the machine has it, else (a classic Vcycle machine) the
    cloud's own ID, so that such machines can still be deleted. ``processors`` is None when the
    cloud cannot tell (vcycled then counts the machinetype's min_processors).
    """

    cloud_id: str = ""
    state: CloudState = CloudState.UNKNOWN
    machinetype: Optional[str] = None
    processors: Optional[int] = None
    created: Optional[float] = None
    started: Optional[float] = None
    updated: Optional[float] = None
    manager: Optional[str] = None  # the vcycled host that created it; None: a classic machine
    address: Optional[str] = None
    zone: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Quota:
    """The tenancy's core limit and use; None where the cloud has no such figure."""

    max_processors: Optional[int]
    used_processors: Optional[int]


class ReleasedByDeletion:
    """What the cloud backends do with machines vcycled is done with: a finished machine the
    last listing still showed (stopped, failed, or being deleted by vcycled) is deleted as it
    is released; one already gone needs nothing (and no listing to find out). A zombie is gone
    with ``destroy``: nothing else is kept to ``forget``."""

    def listed_ids(self) -> Mapping[str, str]:
        """Machine uuid -> cloud ID of the last listing (and creations since)."""
        raise NotImplementedError

    def list_machines(self) -> list[CloudMachine]:
        raise NotImplementedError

    def _cloud_id(self, uuid: str) -> Optional[str]:
        """The cloud ID of machine ``uuid``, listing again if it is not known; None if the
        cloud has no such machine."""
        if uuid not in self.listed_ids():
            self.list_machines()
        return self.listed_ids().get(uuid)

    def destroy(self, uuid: str) -> None:
        raise NotImplementedError

    def release(self, machine: Machine, settings: Settings, directory: Path) -> None:
        if machine.uuid in self.listed_ids():
            self.destroy(machine.uuid)

    def forget(self, uuid: str) -> None:
        """Nothing is kept beyond the machine itself."""


def space_machinetype(space: Space, machinetype: Machinetype) -> CloudMachinetype:
    """What ``space`` says of ``machinetype``; BackendError if the space does not run it."""
    extra = space.machinetypes.get(machinetype.name)
    if extra is None:
        raise BackendError(f"space {space.name}: machinetype {machinetype.name} is not configured")
    return extra


def read_user_data(directory: Path) -> bytes:
    """The user_data vcycled prepared in the machine's ``directory``."""
    try:
        return (directory / "user_data").read_bytes()
    except OSError as error:
        raise BackendError(f"{directory}/user_data: {error.strerror}") from None


def tls_verify(space: Space) -> Union[str, bool]:
    """What to verify server certificates against: never False.

    An explicit ``ca_certificates`` wins (``system`` = the system store); otherwise the grid CA
    directory when this host has one (as classic Vcycle), else the system store.
    """
    if space.ca_certificates == "system":
        return True
    if space.ca_certificates:
        return space.ca_certificates
    return GRID_CA_PATH if os.path.isdir(GRID_CA_PATH) else True


@dataclasses.dataclass(frozen=True)
class PublicKey:
    """One OpenSSH public key: ``kind`` and base64 ``blob``; ``line`` is what clouds store."""

    kind: str
    blob: str

    @property
    def line(self) -> str:
        return f"{self.kind} {self.blob} vcycle"

    @property
    def key_name(self) -> str:
        """A name derived from the key itself, so the same key is found again by name."""
        return "vcycle-" + hashlib.sha256(self.blob.encode()).hexdigest()[:16]


def read_public_key(path: str) -> PublicKey:
    """The first key of an OpenSSH public key file; BackendError (never a hang) if unusable."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_PUBLIC_KEY_BYTES + 1)
    except OSError as error:
        raise BackendError(f"root_public_key {path}: cannot read: {error.strerror}") from None
    if len(data) > MAX_PUBLIC_KEY_BYTES:
        raise BackendError(f"root_public_key {path}: larger than {MAX_PUBLIC_KEY_BYTES} bytes")
    for line in data.decode("ascii", "replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in _KEY_TYPES:
            try:
                base64.b64decode(words[1], validate=True)
            except (binascii.Error, ValueError):
                break
            return PublicKey(words[0], words[1])
    raise BackendError(f"root_public_key {path}: no OpenSSH public key line (TYPE BASE64 [COMMENT])")


def local_image_path(machinetype: Machinetype) -> Path:
    """The file a root_image names: an absolute path or ``<machinetype_path>/files/NAME``.

    URLs need the image cache, which is not the backend's business: vcycled passes its own
    resolver to the backends instead of this one.
    """
    root_image = machinetype.root_image or ""
    if root_image.startswith(("http://", "https://")):
        raise BackendError(f"machinetype {machinetype.name}: root_image {root_image} is a URL "
                           "and no image cache was given")
    if root_image.startswith("/"):
        return Path(root_image)
    return Path(machinetype.machinetype_path) / "files" / root_image


def field(obj: Any, key: str, kind: Union[type, tuple], where: str, *, optional: bool = False) -> Any:
    """``obj[key]`` checked to be a ``kind``; BackendError naming the answer if not."""
    if not isinstance(obj, dict):
        raise BackendError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind in (int, float):  # JSON true is not a number
        value = None
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        got = "missing" if key not in obj else type(value).__name__
        raise BackendError(f"{where}: field {key!r} is {got}, expected {names}")
    return value
