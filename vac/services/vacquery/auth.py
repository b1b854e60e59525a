"""VacQuery shared-secret authentication: an optional ``hmac`` key that classic peers ignore."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Optional

from vac.core.config import Settings
from vac.services.vacquery.codec import MAX_ITEMS

log = logging.getLogger(__name__)

SECRET_MIN_BYTES = 16
SECRET_MAX_BYTES = 4096


class SecretError(ValueError):
    """``vacquery_secret_file`` is unreadable or unusable."""


_HMAC_PREFIX = b',"hmac":"'
_HMAC_SUFFIX = b'"}'
HMAC_OVERHEAD = len(_HMAC_PREFIX) + 64 + len(_HMAC_SUFFIX)


def load_secret(settings: Settings) -> Optional[bytes]:
    """The shared secret of ``vacquery_secret_file`` (surrounding whitespace stripped), or None
    if none is configured. SecretError if it cannot be read or is shorter than 16 bytes."""
    path = settings.vacquery_secret_file
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            secret = handle.read(SECRET_MAX_BYTES + 1).strip()
    except OSError as error:
        raise SecretError(f"cannot read vacquery_secret_file {path}: {error.strerror}") from error
    if len(secret) > SECRET_MAX_BYTES:
        raise SecretError(f"vacquery_secret_file {path} is longer than {SECRET_MAX_BYTES} bytes")
    if len(secret) < SECRET_MIN_BYTES:
        raise SecretError(f"vacquery_secret_file {path} holds fewer than {SECRET_MIN_BYTES} bytes")
    return secret


def reload_secret(settings: Settings, previous: Optional[bytes]) -> Optional[bytes]:
    """The secret read again at a reload (None once ``vacquery_secret_file`` is unset). A file
    that cannot be used is logged and ``previous`` kept: a bad edit must not open the space to
    unsigned queries, nor lock the factory out of it."""
    try:
        return load_secret(settings)
    except SecretError as error:
        log.error("%s: keeping the secret in use", error)
        return previous


class Authenticator:
    """Signs outgoing messages and checks incoming ones against an optional shared secret.

    The tag is HMAC-SHA256 over the message without it, appended as the last key
    (``…,"hmac":"<hex>"}``) so the receiver checks exactly the bytes that were sent; classic
    peers ignore the extra key. Unsigned messages pass only when there is no secret or the site
    allows unauthenticated peers, and never from a peer already seen signing (``sticky`` names:
    a stripped tag is a downgrade, not a classic peer).
    """

    def __init__(self, secret: Optional[bytes], allow_unauthenticated: bool = True):
        self.secret = secret
        self.allow_unauthenticated = allow_unauthenticated
        self._signing_peers: set = set()

    def configure(self, secret: Optional[bytes], allow_unauthenticated: bool) -> None:
        """Use a reloaded secret and policy from the next message on. Peers seen signing stay
        known: a changed secret is a rotation, and they will sign with the new one."""
        self.secret = secret
        self.allow_unauthenticated = allow_unauthenticated

    def seal(self, body: bytes) -> bytes:
        if self.secret is None:
            return body
        tag = hmac.new(self.secret, body, hashlib.sha256).hexdigest().encode("ascii")
        return body[:-1] + _HMAC_PREFIX + tag + _HMAC_SUFFIX

    def check(self, data: bytes, message: dict, peer: Optional[str] = None) -> Optional[str]:
        """None if ``data`` is acceptable from ``peer``, else why not."""
        tag = message.get("hmac")
        if tag is None:
            if self.secret is None:
                return None
            if peer is not None and peer in self._signing_peers:
                return "unsigned message from a peer that signs"
            return None if self.allow_unauthenticated else "unsigned message"
        if not isinstance(tag, str) or len(tag) != 64:
            return "malformed hmac"
        if self.secret is None:
            return None  # we cannot check it: treat the peer like a classic one
        suffix = _HMAC_PREFIX + tag.encode("ascii", "replace") + _HMAC_SUFFIX
        data = data.rstrip(b" ")  # a datagram sent with segmentation offload may be padded
        if not data.endswith(suffix):
            return "hmac not the last key"
        body = data[:-len(suffix)] + b"}"
        expected = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, tag):
            return "wrong hmac"
        if peer is not None and len(self._signing_peers) < MAX_ITEMS:
            self._signing_peers.add(peer)
        return None
