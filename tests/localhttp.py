"""A real HTTP(S) server on 127.0.0.1 for the fetch, image cache, user_data and pipe tests.

``LocalHTTPServer`` serves ``routes`` (path -> ``Route``) from a thread and records every request;
``make_tls_files`` makes a CA in a hashed directory and a server certificate for 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import http.server
import ipaddress
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Optional

LAST_MODIFIED = 1_700_000_000.0


@dataclasses.dataclass
class Route:
    """What the server answers on one path."""

    status: int = 200
    body: bytes = b""
    last_modified: Optional[float] = LAST_MODIFIED  # None: no Last-Modified header
    honour_ims: bool = True  # 304 when If-Modified-Since >= Last-Modified
    headers: dict = dataclasses.field(default_factory=dict)
    declared_length: Optional[int] = None  # Content-Length to send if not len(body); -1: none
    delay: float = 0.0  # before the status line
    stall_after: Optional[int] = None  # send this many body bytes, then stall until released
    piece_bytes: int = 65536  # the body is written in pieces of this size ...
    piece_delay: float = 0.0  # ... with this pause after each


class LocalHTTPServer:
    """A threaded HTTP/1.0 server on 127.0.0.1 serving ``routes``; it records every request
    and counts the body bytes it has written (``sent``) and the bodies it finished (``finished``)."""

    def __init__(self, tls_context: Optional[ssl.SSLContext] = None) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict]] = []
        self.release = threading.Event()  # ends stalls and pauses
        self.sent = 0
        self.finished = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.requests.append((self.path, dict(self.headers)))
                route = server.routes.get(self.path, Route(status=404))
                if route.delay:
                    server.release.wait(route.delay)
                ims = email.utils.parsedate_to_datetime(self.headers["If-Modified-Since"]).timestamp() \
                    if self.headers.get("If-Modified-Since") else None
                if (route.honour_ims and ims is not None and route.last_modified is not None
                        and ims >= route.last_modified and route.status == 200):
                    self.send_response(304)
                    self.end_headers()
                    return
                self.send_response(route.status)
                if route.last_modified is not None:
                    self.send_header("Last-Modified", email.utils.formatdate(route.last_modified, usegmt=True))
                length = len(route.body) if route.declared_length is None else route.declared_length
                if length >= 0:
                    self.send_header("Content-Length", str(length))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    if route.stall_after is not None:
                        self.wfile.write(route.body[:route.stall_after])
                        self.wfile.flush()
                        server.release.wait(30)
                        return
                    for start in range(0, len(route.body), route.piece_bytes):
                        self.wfile.write(route.body[start:start + route.piece_bytes])
                        self.wfile.flush()
                        server.sent += len(route.body[start:start + route.piece_bytes])
                        if route.piece_delay and server.release.wait(route.piece_delay):
                            return
                    server.finished += 1
                except OSError:
                    pass  # the client hung up: that is what several tests want

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls_context is not None:
            self.httpd.socket = tls_context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls_context is not None else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA (in a hashed directory) and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Vac Test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(1)
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
                   .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(2)
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    ca_dir = directory / "certificates"
    ca_dir.mkdir()
    (ca_dir / "vac-test-ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    subprocess.run(["openssl", "rehash", str(ca_dir)], check=True, capture_output=True, timeout=30)
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return ca_dir, cert_file, key_file


def tls_server_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server TLS context for 127.0.0.1 and the hashed CA directory that trusts it."""
    ca_dir, cert_file, key_file = make_tls_files(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, ca_dir
