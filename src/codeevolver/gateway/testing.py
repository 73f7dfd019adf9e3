"""Test parts for the gateway: a local upstream (HTTP or HTTPS with its own test CA), an in-memory ledger.

Tests and the security battery point the gateway at it through a static
resolver and ``trusted_targets``. By default it answers every request with a
JSON echo of what it received, headers included, which is what a hostile
"echo" endpoint would do with an injected secret; ``body`` fixes the answer.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
import tempfile
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from codeevolver.store.rows import AuditRow
from codeevolver.types import UsageRecord


class MemoryLedger:
    """The gateway's ``ledger`` and ``audit`` callbacks, kept in memory for tests and benchmarks."""

    def __init__(self) -> None:
        self.usage: list[UsageRecord] = []
        self.audit: list[AuditRow] = []

    def add_usage(self, record: UsageRecord) -> None:
        self.usage.append(record)

    def add_audit(self, rows: AuditRow | Sequence[AuditRow]) -> None:
        self.audit.extend([rows] if isinstance(rows, AuditRow) else rows)


def make_test_ca(hosts: Sequence[str], directory: Path) -> tuple[Path, Path, Path]:
    """A CA and one leaf for ``hosts``; returns (CA cert, leaf chain, leaf key) PEM paths."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CodeEvolver test upstream CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, chain_path, key_path = directory / "ca.pem", directory / "leaf.pem", directory / "leaf.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    chain_path.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, chain_path, key_path


class EchoUpstream:
    """A recording HTTP(S) server on 127.0.0.1; HTTPS when ``tls_hosts`` names the hosts its certificate covers."""

    def __init__(self, *, tls_hosts: Sequence[str] = (), body: bytes | None = None) -> None:
        self.body = body
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="codeevolver-echo-"))
        self.ca_file: Path | None = None
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        if tls_hosts:
            self.ca_file, chain, key = make_test_ca(tls_hosts, self._dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(chain, key)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> EchoUpstream:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EchoUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen = {
                    "method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                    "body": body.decode("utf-8", "replace"),
                }  # fmt: skip
                with upstream._lock:
                    upstream.requests.append(seen)
                out = upstream.body if upstream.body is not None else json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

        return Handler
