"""Proxy generation and CernVM image signatures, checked with an independent parser
(``cryptography``) and, where available, the ``openssl`` command."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from vac.cli import main as cli
from vac.content import x509 as vx509
from vac.core.config import Machinetype

NOW = float(int(time.time()))
DAY = 86400.0
# proxyCertInfo = SEQUENCE { SEQUENCE { OID 1.3.6.1.4.1.3536.1.1.1.9 } }, written out by hand.
LIMITED_PROXY_CERT_INFO_DER = bytes.fromhex("300f300d060b2b060104019b5001010109")
PROXY_CERT_INFO = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")


def utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def make_name(*pairs: tuple) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def issue(subject, key, issuer_name, issuer_key, not_before, not_after, ca=False) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc(not_before))
        .not_valid_after(utc(not_after))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(issuer_key, hashes.SHA256())


def pem(*objects) -> bytes:
    out = b""
    for item in objects:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
    return out


@pytest.fixture(scope="module")
def keys():
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(4)]


@pytest.fixture(scope="module")
def pki(keys):
    """A root CA, an intermediate CA and a user certificate valid for 30 days."""
    ca_key, inter_key, user_key, _ = keys
    ca_name = make_name((NameOID.COUNTRY_NAME, "UK"), (NameOID.COMMON_NAME, "Test Root CA"))
    ca = issue(ca_name, ca_key, ca_name, ca_key, NOW - 30 * DAY, NOW + 365 * DAY, ca=True)
    inter_name = make_name((NameOID.COUNTRY_NAME, "UK"), (NameOID.COMMON_NAME, "Test Intermediate CA"))
    inter = issue(inter_name, inter_key, ca_name, ca_key, NOW - DAY, NOW + 300 * DAY, ca=True)
    user_name = make_name(
        (NameOID.COUNTRY_NAME, "UK"),
        (NameOID.ORGANIZATION_NAME, "eScience"),
        (NameOID.COMMON_NAME, "robot vac test"),
    )
    user = issue(user_name, user_key, inter_name, inter_key, NOW - DAY, NOW + 30 * DAY)
    return {"ca": ca, "ca_key": ca_key, "inter": inter, "inter_key": inter_key, "user": user, "user_key": user_key}


def split_pem(text: str) -> list[tuple[str, bytes]]:
    return [
        (match.group(1), match.group(0).encode())
        for match in re.finditer(r"-----BEGIN ([A-Z ]+)-----\n.*?-----END \1-----\n", text, re.DOTALL)
    ]


def rfc_proxy(pki, **overrides) -> str:
    arguments = {"expires": NOW + 12 * 3600, "now": NOW}
    arguments.update(overrides)
    return vx509.make_proxy(pem(pki["user"], pki["inter"]), pem(pki["user_key"]), **arguments)


# --- proxies -------------------------------------------------------------------------------------


def test_rfc_proxy_structure_key_extensions_and_chain(pki):
    blocks = split_pem(rfc_proxy(pki))
    assert [kind for kind, _ in blocks] == ["CERTIFICATE", "RSA PRIVATE KEY", "CERTIFICATE", "CERTIFICATE"]
    proxy = x509.load_pem_x509_certificate(blocks[0][1])
    proxy_key = serialization.load_pem_private_key(blocks[1][1], password=None)
    assert [x509.load_pem_x509_certificate(block) for _, block in blocks[2:]] == [pki["user"], pki["inter"]]

    assert proxy_key.key_size >= 2048
    assert proxy_key.public_key().public_numbers() == proxy.public_key().public_numbers()
    assert proxy.version == x509.Version.v3
    assert proxy.issuer == pki["user"].subject
    assert proxy.subject.rdns[:-1] == pki["user"].subject.rdns
    assert proxy.subject.rdns[-1] == x509.RelativeDistinguishedName(
        [x509.NameAttribute(NameOID.COMMON_NAME, str(proxy.serial_number))]
    )
    pki["user_key"].public_key().verify(
        proxy.signature, proxy.tbs_certificate_bytes, padding.PKCS1v15(), proxy.signature_hash_algorithm
    )
    assert isinstance(proxy.signature_hash_algorithm, hashes.SHA256)

    info = proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO)
    assert info.critical
    assert info.value.value == LIMITED_PROXY_CERT_INFO_DER
    usage = proxy.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_encipherment and usage.value.key_agreement
    assert not usage.value.key_cert_sign

    assert proxy.not_valid_after_utc == utc(NOW + 12 * 3600)
    assert utc(NOW - vx509.CLOCK_SKEW_SECONDS) == proxy.not_valid_before_utc


def test_proxy_cn_and_serial_are_unique(pki):
    first, second = (x509.load_pem_x509_certificate(split_pem(rfc_proxy(pki))[0][1]) for _ in range(2))
    assert first.subject != second.subject
    assert first.serial_number != second.serial_number


def test_legacy_proxy(pki):
    proxy = x509.load_pem_x509_certificate(split_pem(rfc_proxy(pki, legacy=True))[0][1])
    assert proxy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value == "limited proxy"
    assert proxy.subject.rdns[:-1] == pki["user"].subject.rdns
    with pytest.raises(x509.ExtensionNotFound):
        proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO)
    assert proxy.extensions.get_extension_for_class(x509.KeyUsage).critical


def test_larger_key_size_is_honoured_and_smaller_refused(pki):
    proxy_key = serialization.load_pem_private_key(split_pem(rfc_proxy(pki, key_bits=3072))[1][1], None)
    assert proxy_key.key_size == 3072
    with pytest.raises(vx509.ProxyError, match="below the minimum of 2048"):
        rfc_proxy(pki, key_bits=1024)


def test_validity_is_capped_by_deadline_and_start_by_certificate(keys, pki):
    deadline = NOW + 3 * 3600 + 0.7
    proxy = x509.load_pem_x509_certificate(split_pem(rfc_proxy(pki, expires=deadline))[0][1])
    assert proxy.not_valid_after_utc == utc(int(deadline))
    # A certificate issued a minute ago: the back-dated start stops at its notBefore.
    fresh = issue(pki["user"].subject, pki["user_key"], pki["inter"].subject, pki["inter_key"], NOW - 60, NOW + DAY)
    text = vx509.make_proxy(pem(fresh), pem(pki["user_key"]), expires=NOW + 3600, now=NOW)
    assert x509.load_pem_x509_certificate(split_pem(text)[0][1]).not_valid_before_utc == utc(NOW - 60)


def test_certificate_expiring_before_requested_expiry_is_an_error(pki):
    with pytest.raises(vx509.ProxyError, match="before the requested proxy expiry"):
        rfc_proxy(pki, expires=NOW + 31 * DAY)
    # Also when it is a later certificate of the chain that expires first.
    short_inter = issue(pki["inter"].subject, pki["inter_key"], pki["ca"].subject, pki["ca_key"], NOW - DAY, NOW + DAY)
    with pytest.raises(vx509.ProxyError, match="Test Intermediate CA.*expires"):
        vx509.make_proxy(
            pem(pki["user"], short_inter), pem(pki["user_key"]), expires=NOW + 2 * DAY, now=NOW
        )


@pytest.mark.parametrize(
    "cert_pem, key_pem, expires, message",
    [
        ("user", "other_key", NOW + 3600, "does not belong"),
        ("garbage", "user_key", NOW + 3600, "no PEM certificate"),
        ("user", "garbage", NOW + 3600, "no PEM private key"),
        ("user", "encrypted", NOW + 3600, "encrypted"),
        ("user", "user_key", NOW - 1, "not in the future"),
        ("not_yet_valid", "user_key", NOW + 3600, "not valid before"),
    ],
)
def test_bad_inputs_give_clear_errors(keys, pki, cert_pem, key_pem, expires, message):
    inputs = {
        "user": pem(pki["user"]),
        "not_yet_valid": pem(
            issue(pki["user"].subject, pki["user_key"], pki["inter"].subject, pki["inter_key"], NOW + 60, NOW + DAY)
        ),
        "other_key": pem(keys[3]),
        "user_key": pem(pki["user_key"]),
        "garbage": b"hello\n",
        "encrypted": pki["user_key"].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    }
    with pytest.raises(vx509.ProxyError, match=message):
        vx509.make_proxy(inputs[cert_pem], inputs[key_pem], expires=expires, now=NOW)


def test_certificate_and_key_in_one_file(pki):
    combined = pem(pki["user_key"], pki["user"], pki["inter"])
    blocks = split_pem(vx509.make_proxy(combined, combined, expires=NOW + 3600, now=NOW))
    assert x509.load_pem_x509_certificate(blocks[2][1]) == pki["user"]


def test_machinetype_proxy_reads_files_and_uses_deadline(tmp_path, pki):
    (tmp_path / "x509cert.pem").write_bytes(pem(pki["user"], pki["inter"]))
    (tmp_path / "x509key.pem").write_bytes(pem(pki["user_key"]))
    machinetype = Machinetype(name="lhcb-prod", machinetype_path=str(tmp_path), legacy_proxy=True)
    proxy = x509.load_pem_x509_certificate(
        split_pem(vx509.machinetype_proxy(machinetype, NOW + 7200, NOW))[0][1]
    )
    assert proxy.not_valid_after_utc == utc(NOW + 7200)
    assert proxy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value == "limited proxy"
    os.unlink(tmp_path / "x509key.pem")
    with pytest.raises(vx509.ProxyError, match=r"lhcb-prod: cannot read .*x509key\.pem"):
        vx509.machinetype_proxy(machinetype, NOW + 7200, NOW)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
def test_openssl_accepts_the_proxy_chain(tmp_path, pki):
    text = rfc_proxy(pki)
    blocks = split_pem(text)
    (tmp_path / "ca.pem").write_bytes(pem(pki["ca"]))
    (tmp_path / "untrusted.pem").write_bytes(blocks[2][1] + blocks[3][1])
    (tmp_path / "proxy.pem").write_bytes(blocks[0][1])
    result = subprocess.run(
        ["openssl", "verify", "-allow_proxy_certs", "-CAfile", str(tmp_path / "ca.pem"),
         "-untrusted", str(tmp_path / "untrusted.pem"), str(tmp_path / "proxy.pem")],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    shown = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "proxy.pem")],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "Proxy Certificate Information: critical" in shown
    assert "1.3.6.1.4.1.3536.1.1.1.9" in shown


def test_cli_proxy_init(tmp_path, pki, capsys):
    (tmp_path / "cert.pem").write_bytes(pem(pki["user"]))
    (tmp_path / "key.pem").write_bytes(pem(pki["user_key"]))
    before = time.time()
    assert cli.main(["proxy-init", "-c", str(tmp_path / "cert.pem"), "-k", str(tmp_path / "key.pem")]) == 0
    proxy = x509.load_pem_x509_certificate(split_pem(capsys.readouterr().out)[0][1])
    lifetime = proxy.not_valid_after_utc.timestamp() - before
    assert 12 * 3600 - 5 <= lifetime <= 12 * 3600 + 5
    assert proxy.extensions.get_extension_for_oid(PROXY_CERT_INFO).value.value == LIMITED_PROXY_CERT_INFO_DER

    assert cli.main(["proxy-init", "-c", str(tmp_path / "cert.pem"), "-k", str(tmp_path / "key.pem"), "-l"]) == 0
    legacy = x509.load_pem_x509_certificate(split_pem(capsys.readouterr().out)[0][1])
    assert legacy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[-1].value == "limited proxy"

    assert cli.main(["proxy-init", "-c", str(tmp_path / "missing.pem"), "-k", str(tmp_path / "key.pem")]) == 1
    assert "missing.pem" in capsys.readouterr().err


# --- CernVM image signatures ---------------------------------------------------------------------

CERNVM_DN = "/C=CH/O=CERN/CN=cvm-sign01.cern.ch"


def ca_directory(path, *cas) -> str:
    path.mkdir()
    for ca in cas:
        hashed = crypto.X509.from_cryptography(ca).subject_name_hash()
        (path / f"{hashed:08x}.0").write_bytes(pem(ca))
    return str(path)


def signer(pki, common_name="cvm-sign01.cern.ch", not_before=NOW - DAY, not_after=NOW + 100 * DAY, issuer="ca"):
    name = make_name(
        (NameOID.COUNTRY_NAME, "CH"), (NameOID.ORGANIZATION_NAME, "CERN"), (NameOID.COMMON_NAME, common_name)
    )
    issuer_cert, issuer_key = (pki["ca"], pki["ca_key"]) if issuer == "ca" else issuer
    return issue(name, pki["user_key"], issuer_cert.subject, issuer_key, not_before, not_after)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (vx509.CERNVM_BLOCK_BYTES - len(data))


def write_image(path, key, certificate, *, raw_pem_certificate=False) -> str:
    """A fake CernVM image: payload, metadata block, signature block over both."""
    signed = os.urandom(100 * 1024) + padded(json.dumps({"ucernvm-version": "2.7.7"}).encode())
    signature = key.sign(hashlib.sha256(signed).digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    if raw_pem_certificate:
        # Malformed JSON as found in real images: a PEM with raw newlines inside a string.
        block = b'{"certificate": "' + certificate_pem + b'", "signature": "' + base64.b64encode(signature) + b'",}'
    else:
        block = json.dumps(
            {"certificate": base64.b64encode(certificate_pem).decode(), "signature": base64.b64encode(signature).decode()}
        ).encode()
    path.write_bytes(signed + padded(block))
    return str(path)


@pytest.fixture()
def cas(tmp_path, pki):
    return ca_directory(tmp_path / "certificates", pki["ca"])


def test_good_signature_verifies_and_reports_dn_and_version(tmp_path, pki, cas):
    image = write_image(tmp_path / "cernvm.iso", pki["user_key"], signer(pki))
    result = vx509.read_cernvm_signature(image, cas)
    assert result.verified, result.reason
    assert result.dn == CERNVM_DN
    assert result.version == "2.7.7"
    assert vx509.verify_cernvm_image(image, vx509.CERNVM_DEFAULT_SIGNING_DN, cas) == result


def test_malformed_json_with_raw_pem_is_tolerated(tmp_path, pki, cas):
    image = write_image(tmp_path / "cernvm.iso", pki["user_key"], signer(pki), raw_pem_certificate=True)
    assert vx509.read_cernvm_signature(image, cas).verified


@pytest.mark.parametrize("offset", [10, -vx509.CERNVM_BLOCK_BYTES - 100])
def test_tampered_image_or_metadata_fails(tmp_path, pki, cas, offset):
    image = write_image(tmp_path / "cernvm.iso", pki["user_key"], signer(pki))
    with open(image, "r+b") as stream:
        stream.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))
    result = vx509.read_cernvm_signature(image, cas)
    assert not result.verified
    assert "does not match the image" in result.reason
    with pytest.raises(vx509.ImageSignatureError, match="signature not verified"):
        vx509.verify_cernvm_image(image, vx509.CERNVM_DEFAULT_SIGNING_DN, cas)


def test_wrong_dn_is_refused_only_when_enforced(tmp_path, pki, cas):
    image = write_image(tmp_path / "cernvm.iso", pki["user_key"], signer(pki, common_name="evil.example.org"))
    assert vx509.verify_cernvm_image(image, None, cas).verified
    with pytest.raises(vx509.ImageSignatureError, match="does not match image_signing_dn") as raised:
        vx509.verify_cernvm_image(image, vx509.CERNVM_DEFAULT_SIGNING_DN, cas)
    assert raised.value.result.dn == "/C=CH/O=CERN/CN=evil.example.org"


def test_expired_signer_fails_now_but_passes_within_its_validity(tmp_path, pki, cas):
    image = write_image(
        tmp_path / "cernvm.iso", pki["user_key"], signer(pki, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    )
    result = vx509.read_cernvm_signature(image, cas)
    assert not result.verified
    assert "expired" in result.reason
    assert vx509.read_cernvm_signature(image, cas, now=NOW - 5 * DAY).verified


def test_signer_from_unknown_ca_is_not_trusted(tmp_path, pki, cas):
    # Signed by the intermediate, which is not in the CA directory and not supplied.
    image = write_image(
        tmp_path / "cernvm.iso", pki["user_key"], signer(pki, issuer=(pki["inter"], pki["inter_key"]))
    )
    result = vx509.read_cernvm_signature(image, cas)
    assert not result.verified
    assert "not trusted" in result.reason


def test_unusable_images_and_settings(tmp_path, pki, cas):
    small = tmp_path / "small.iso"
    small.write_bytes(b"x" * 1000)
    assert "too small" in vx509.read_cernvm_signature(str(small), cas).reason
    unsigned = tmp_path / "unsigned.iso"
    unsigned.write_bytes(os.urandom(200 * 1024))
    assert not vx509.read_cernvm_signature(str(unsigned), cas).verified
    assert "cannot read" in vx509.read_cernvm_signature(str(tmp_path / "absent.iso"), cas).reason
    image = write_image(tmp_path / "cernvm.iso", pki["user_key"], signer(pki))
    assert "does not exist" in vx509.read_cernvm_signature(image, str(tmp_path / "nowhere")).reason
    with pytest.raises(vx509.ImageSignatureError, match="invalid image_signing_dn regex"):
        vx509.verify_cernvm_image(image, "/CN=(", cas)


def test_cli_cernvm_signature(tmp_path, pki, cas, capsys):
    image = write_image(tmp_path / "cernvm.iso", pki["user_key"], signer(pki))
    assert cli.main(["cernvm-signature", "--ca-dir", cas, "--json", image]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["verified"] is True and printed["dn"] == CERNVM_DN and printed["version"] == "2.7.7"
    assert cli.main(["cernvm-signature", "--ca-dir", str(tmp_path / "nowhere"), image]) == 1
    assert "verified: False" in capsys.readouterr().out
