"""X.509 proxy certificates and CernVM image signatures (REFERENCE.md §8.3, §6.7).

Proxies are built with the ``cryptography`` package (a dependency of pyOpenSSL anyway):
pyOpenSSL's certificate-building API is deprecated and cannot add the proxyCertInfo extension,
whose DER we encode here by hand. The CernVM signing certificate is checked with pyOpenSSL's
``X509Store`` against a hashed CA directory, like ``openssl verify -CApath``.

Differences from the classic implementation, on purpose:

* proxy keys are RSA with at least 2048 bits (classic: 1024, refused by EL9 crypto policies);
* every RFC 3820 proxy gets its own CN, the decimal of its random serial number (classic: the
  machinetype name, so all proxies from one certificate shared a subject);
* every certificate of the input chain, not just the first, must be valid until the proxy
  expires;
* ``image_signing_dn`` is enforced by :func:`verify_cernvm_image` whenever it is set.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import json
import os
import re
from typing import Any, Optional, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

# The grid CAs that fetch's TLS also trusts.
from vac.content.fetch import GRID_CA_DIR as DEFAULT_CA_DIR

MIN_KEY_BITS = 2048
CLI_PROXY_SECONDS = 12 * 3600  # `vac proxy-init`
CLOCK_SKEW_SECONDS = 300  # proxies are back-dated this much, as grid tools do

PROXY_CERT_INFO_OID = "1.3.6.1.5.5.7.1.14"
LIMITED_PROXY_POLICY_OID = "1.3.6.1.4.1.3536.1.1.1.9"  # Globus limited-proxy policy language
LEGACY_LIMITED_PROXY_CN = "limited proxy"

CERNVM_BLOCK_BYTES = 32768  # metadata block, then signature block, at the end of the image
CERNVM_DEFAULT_SIGNING_DN = r"/CN=cvm-sign01\.cern\.ch$"
_OPENSSL_NAMES = {"1.2.840.113549.1.9.1": "emailAddress"}  # where RFC 4514 has no short name

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL
)


class ProxyError(Exception):
    """A proxy cannot be made from the given certificate and key."""


class ImageSignatureError(Exception):
    """A root image failed the signature check that its machinetype requires."""

    def __init__(self, message: str, result: SignatureResult) -> None:
        super().__init__(message)
        self.result = result


# --- proxies ---------------------------------------------------------------------------------


def _pem_blocks(data: bytes, kinds: tuple[bytes, ...]) -> list[bytes]:
    return [match.group(0) for match in _PEM_BLOCK.finditer(data) if match.group(1) in kinds]


def _load_certificates(cert_pem: bytes) -> list[x509.Certificate]:
    certificates = []
    for block in _pem_blocks(cert_pem, (b"CERTIFICATE",)):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError as error:
            raise ProxyError(f"unreadable certificate in chain: {error}") from None
    if not certificates:
        raise ProxyError("no PEM certificate found")
    return certificates


def _load_private_key(key_pem: bytes) -> Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]:
    blocks = _pem_blocks(key_pem, (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"))
    if not blocks:
        if _pem_blocks(key_pem, (b"ENCRYPTED PRIVATE KEY",)):
            raise ProxyError("the private key is encrypted; an unencrypted key is needed")
        raise ProxyError("no PEM private key found")
    try:
        key = serialization.load_pem_private_key(blocks[0], password=None)
    except TypeError:
        raise ProxyError("the private key is encrypted; an unencrypted key is needed") from None
    except ValueError as error:
        raise ProxyError(f"unreadable private key: {error}") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ProxyError(f"unsupported private key type {type(key).__name__}; RSA or EC needed")
    return key


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        encoded_length = bytes([length])
    else:
        octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
        encoded_length = bytes([0x80 | len(octets)]) + octets
    return bytes([tag]) + encoded_length + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    content = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        content.extend(reversed(chunk))
    return _der(0x06, bytes(content))


def proxy_cert_info_der(policy_language_oid: str = LIMITED_PROXY_POLICY_OID) -> bytes:
    """RFC 3820 ProxyCertInfo: SEQUENCE { ProxyPolicy SEQUENCE { policyLanguage OID } }.

    No path length constraint (the RFC's default: unlimited) and no policy body.
    """
    return _der(0x30, _der(0x30, _der_oid(policy_language_oid)))


def _describe(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def make_proxy(
    cert_pem: bytes,
    key_pem: bytes,
    *,
    expires: float,
    now: float,
    legacy: bool = False,
    key_bits: int = MIN_KEY_BITS,
) -> str:
    """A limited proxy of the certificate that ``key_pem`` belongs to, as PEM text.

    The result is the proxy certificate, its unencrypted private key (PKCS#1, as grid tools
    expect), then the signing certificate and the other certificates of ``cert_pem`` in order.
    ``cert_pem`` and ``key_pem`` may be the same file. The proxy is valid from ``now`` (minus a
    small clock-skew allowance) until ``expires``; every certificate of the chain must be valid
    until then, else :class:`ProxyError`, as is any unreadable input.
    RFC 3820 proxies (default) carry a critical proxyCertInfo with the Globus limited-proxy policy
    and a unique CN; ``legacy=True`` makes a Globus legacy proxy with CN ``limited proxy``.
    """
    if key_bits < MIN_KEY_BITS:
        raise ProxyError(f"proxy key size {key_bits} is below the minimum of {MIN_KEY_BITS} bits")
    not_after = int(expires)
    if not_after <= now:
        raise ProxyError(f"requested proxy expiry {_utc(expires):%Y-%m-%d %H:%M:%S}Z is not in the future")
    chain = _load_certificates(cert_pem)
    signing_key = _load_private_key(key_pem)
    signing_public = _public_der(signing_key.public_key())
    signers = [cert for cert in chain if _public_der(cert.public_key()) == signing_public]
    if not signers:
        raise ProxyError("the private key does not belong to any certificate in the chain")
    signer = signers[0]
    for certificate in chain:
        if certificate.not_valid_after_utc < _utc(not_after):
            raise ProxyError(
                f"certificate {_describe(certificate)} expires at "
                f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z, before the requested "
                f"proxy expiry {_utc(not_after):%Y-%m-%d %H:%M:%S}Z"
            )
        if certificate.not_valid_before_utc > _utc(now):
            raise ProxyError(
                f"certificate {_describe(certificate)} is not valid before "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z"
            )

    proxy_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    serial = x509.random_serial_number()
    common_name = LEGACY_LIMITED_PROXY_CN if legacy else str(serial)
    subject = x509.Name(
        list(signer.subject.rdns)
        + [x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])]
    )
    not_before = max(_utc(now - CLOCK_SKEW_SECONDS), signer.not_valid_before_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.subject)
        .public_key(proxy_key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(_utc(not_after))
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if not legacy:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(PROXY_CERT_INFO_OID), proxy_cert_info_der()),
            critical=True,
        )
    proxy = builder.sign(signing_key, hashes.SHA256())

    parts = [
        proxy.public_bytes(serialization.Encoding.PEM),
        proxy_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        signer.public_bytes(serialization.Encoding.PEM),
    ]
    parts += [cert.public_bytes(serialization.Encoding.PEM) for cert in chain if cert is not signer]
    return b"".join(parts).decode("ascii")


def machinetype_proxy(machinetype: Any, deadline: float, now: float) -> str:
    """The proxy embedded in a machine's user_data: from ``<machinetype_path>/x509cert.pem`` and
    ``x509key.pem``, expiring at the machine's ``deadline``, legacy if the machinetype says so."""
    contents = []
    for file_name in ("x509cert.pem", "x509key.pem"):
        path = os.path.join(machinetype.machinetype_path, file_name)
        try:
            with open(path, "rb") as stream:
                contents.append(stream.read())
        except OSError as error:
            raise ProxyError(f"machinetype {machinetype.name}: cannot read {path}: {error.strerror}") from None
    try:
        return make_proxy(
            contents[0], contents[1], expires=deadline, now=now, legacy=machinetype.legacy_proxy
        )
    except ProxyError as error:
        raise ProxyError(f"machinetype {machinetype.name}: {error}") from None


# --- CernVM image signatures -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SignatureResult:
    """Outcome of checking a CernVM image: ``verified`` with the signer's ``dn`` (OpenSSL
    ``/C=../CN=..`` form), the ``version`` from the metadata block, and ``reason`` when not
    verified."""

    verified: bool
    dn: Optional[str] = None
    version: Optional[str] = None
    reason: Optional[str] = None
    metadata: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_block(block: bytes, name: str) -> dict:
    """A NUL-padded JSON object. Tolerates the malformations seen in CernVM images: raw
    newlines inside strings (embedded PEM) and a trailing comma before the closing brace."""
    text = block.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()
    text = re.sub(r",\s*}\s*$", "}", text)
    try:
        value = json.loads(text, strict=False)
    except ValueError as error:
        raise ValueError(f"{name} block is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} block is not a JSON object")
    return value


def _signing_certificate(value: Any) -> x509.Certificate:
    if not isinstance(value, str) or not value:
        raise ValueError("signature block has no certificate")
    data = value.encode("ascii", errors="replace")
    if not data.lstrip().startswith(b"-----BEGIN"):
        try:
            data = base64.b64decode(data, validate=False)
        except binascii.Error:
            raise ValueError("signature block certificate is not base64") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data.strip())
        return x509.load_der_x509_certificate(data)
    except ValueError as error:
        raise ValueError(f"signature block certificate is unreadable ({error})") from None


def _openssl_dn(certificate: x509.Certificate) -> str:
    """The subject in OpenSSL's one-line ``/C=CH/O=CERN/CN=name`` form that DN regexes expect."""
    return "".join(
        f"/{_OPENSSL_NAMES.get(attribute.oid.dotted_string, attribute.rfc4514_attribute_name)}={attribute.value}"
        for rdn in certificate.subject.rdns
        for attribute in rdn
    )


def _sha256_prefix(path: str, length: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        remaining = length
        while remaining:
            chunk = stream.read(min(remaining, 1 << 20))
            if not chunk:
                raise ValueError("image shrank while being read")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.digest()


def _verify_chain(certificate: x509.Certificate, ca_dir: str, now: Optional[float]) -> Optional[str]:
    """None if ``certificate`` chains to a CA in the hashed directory ``ca_dir``, else why not."""
    if not os.path.isdir(ca_dir):
        return f"CA directory {ca_dir} does not exist"
    store = crypto.X509Store()
    store.load_locations(None, ca_dir)
    if now is not None:
        store.set_time(_utc(now))
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(certificate))
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as error:
        return f"signing certificate not trusted: {error}"
    return None


def read_cernvm_signature(path: str, ca_dir: str = DEFAULT_CA_DIR, *, now: Optional[float] = None) -> SignatureResult:
    """Check the signature a CernVM image carries in its last 64 KiB (REFERENCE.md §6.7).

    Never raises for a bad image: the result says ``verified=False`` and why. The signer's
    certificate must chain to a CA in ``ca_dir`` at time ``now`` (default: the current time).
    """
    try:
        size = os.path.getsize(path)
        if size <= 2 * CERNVM_BLOCK_BYTES:
            return SignatureResult(False, reason=f"image is too small ({size} bytes) to carry a CernVM signature")
        with open(path, "rb") as stream:
            stream.seek(size - 2 * CERNVM_BLOCK_BYTES)
            metadata_block = stream.read(CERNVM_BLOCK_BYTES)
            signature_block = stream.read(CERNVM_BLOCK_BYTES)
    except OSError as error:
        return SignatureResult(False, reason=f"cannot read {path}: {error.strerror}")

    try:
        metadata = _parse_block(metadata_block, "metadata")
        signature_fields = _parse_block(signature_block, "signature")
        certificate = _signing_certificate(signature_fields.get("certificate"))
        signature_text = signature_fields.get("signature")
        if not isinstance(signature_text, str) or not signature_text:
            raise ValueError("signature block has no signature")
        signature = base64.b64decode(signature_text.encode("ascii", errors="replace"))
    except (ValueError, binascii.Error) as error:
        return SignatureResult(False, reason=str(error))
    version = metadata.get("ucernvm-version")
    version = str(version) if version is not None else None
    dn = _openssl_dn(certificate)

    def failed(reason: str) -> SignatureResult:
        return SignatureResult(False, dn=dn, version=version, reason=reason, metadata=metadata)

    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        return failed("signing certificate does not hold an RSA key")
    try:
        digest = _sha256_prefix(path, size - CERNVM_BLOCK_BYTES)
    except (OSError, ValueError) as error:
        return failed(f"cannot hash {path}: {error}")
    try:
        public_key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    except InvalidSignature:
        return failed("signature does not match the image contents")
    untrusted = _verify_chain(certificate, ca_dir, now)
    if untrusted:
        return failed(untrusted)
    return SignatureResult(True, dn=dn, version=version, metadata=metadata)


def verify_cernvm_image(
    path: str,
    signing_dn_regex: Optional[str],
    ca_dir: str = DEFAULT_CA_DIR,
    *,
    now: Optional[float] = None,
) -> SignatureResult:
    """Check a root image; with ``signing_dn_regex`` (a machinetype's ``image_signing_dn``) set,
    enforce it: raise :class:`ImageSignatureError` unless the signature verifies and the signer
    DN matches the regex (``re.search``). Without it, just return the result."""
    pattern = None
    if signing_dn_regex is not None:
        try:
            pattern = re.compile(signing_dn_regex)
        except re.error as error:
            result = SignatureResult(False, reason=f"invalid image_signing_dn regex: {error}")
            raise ImageSignatureError(f"image {path}: {result.reason}", result) from None
    result = read_cernvm_signature(path, ca_dir, now=now)
    if pattern is None:
        return result
    if not result.verified:
        raise ImageSignatureError(f"image {path}: signature not verified: {result.reason}", result)
    if not pattern.search(result.dn or ""):
        raise ImageSignatureError(
            f"image {path}: signed by {result.dn}, which does not match image_signing_dn {signing_dn_regex!r}",
            result,
        )
    return result
