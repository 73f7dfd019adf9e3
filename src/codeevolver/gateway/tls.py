"""TLS for the gateway: reading SNI, the per-session CA, and serving TLS on a proxied stream.

Interception exists only to put a secret header on requests to the one host the
secret belongs to. So the CA is made per session, is name-constrained to that
session's secret hosts (even its own key could not mint a certificate for any
other name), and its private key lives only in this process's memory. Leaf keys
reach OpenSSL through a memfd, never a file on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from codeevolver.gateway.http1 import MAX_HEAD, Reader

_MAX_HELLO = 64 * 1024
_VALIDITY = dt.timedelta(days=30)
_SKEW = dt.timedelta(hours=1)
_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


class NotTLS(Exception):
    """The first bytes of a tunnel are not a TLS ClientHello."""


async def read_client_hello(reader: Reader) -> tuple[bytes, str | None]:
    """Read the client's first handshake message; return the raw bytes read and the SNI host name."""
    raw = bytearray()
    handshake = bytearray()
    while True:
        header = await reader.readexactly(5)
        raw += header
        if header[0] != 0x16 or header[1] != 3:
            raise NotTLS("not a TLS handshake")
        body = await reader.readexactly(int.from_bytes(header[3:5], "big"))
        raw += body
        handshake += body
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotTLS("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > _MAX_HELLO:
                raise NotTLS("ClientHello too large")
            if len(handshake) >= need:
                return bytes(raw), parse_sni(bytes(handshake[4:need]))


def parse_sni(hello: bytes) -> str | None:
    """The host_name of a ClientHello body's server_name extension (None when absent)."""
    try:
        pos = 2 + 32  # client_version, random
        pos += 1 + hello[pos]  # session_id
        pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher_suites
        pos += 1 + hello[pos]  # compression_methods
        if pos >= len(hello):
            return None
        end = pos + 2 + int.from_bytes(hello[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(hello[pos : pos + 2], "big")
            size = int.from_bytes(hello[pos + 2 : pos + 4], "big")
            data = hello[pos + 4 : pos + 4 + size]
            pos += 4 + size
            if kind != 0:
                continue
            at = 2  # server_name_list length
            while at + 3 <= len(data):
                name_type, length = data[at], int.from_bytes(data[at + 1 : at + 3], "big")
                name = data[at + 3 : at + 3 + length]
                if name_type == 0:
                    return name.decode("ascii")
                at += 3 + length
            return None
    except (IndexError, UnicodeDecodeError) as exc:
        raise NotTLS("malformed ClientHello") from exc
    return None


def upstream_context(extra_ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """Client context for upstreams: the system CAs (plus ``extra_ca_file``), hostname checked, HTTP/1.1."""
    ctx = ssl.create_default_context()
    if extra_ca_file is not None:
        ctx.load_verify_locations(cafile=str(extra_ca_file))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def system_ca_pem() -> bytes:
    """The host's trusted CA certificates as PEM, to which a session's CA is appended."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    with contextlib.suppress(ImportError):
        import certifi

        return Path(certifi.where()).read_bytes()
    return b""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class SessionCA:
    """A throwaway CA for one sandbox, able to sign only the given host names."""

    def __init__(self, hosts: Iterable[str], *, scratch_dir: Path | None = None) -> None:
        self.hosts = sorted(set(hosts))
        self._scratch_dir = scratch_dir
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CodeEvolver"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"CodeEvolver sandbox CA {os.urandom(4).hex()}"),
            ]
        )
        public = self._key.public_key()
        self._name = name
        self._ski = x509.SubjectKeyIdentifier.from_public_key(public)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _SKEW)
            .not_valid_after(_now() + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_KEY_USAGE, critical=True)
            .add_extension(
                x509.NameConstraints(permitted_subtrees=[x509.DNSName(h) for h in self.hosts], excluded_subtrees=None),
                critical=True,
            )
            .add_extension(self._ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self._contexts: dict[str, ssl.SSLContext] = {}

    def leaf_pem(self, host: str) -> tuple[bytes, bytes]:
        """A fresh certificate and key for ``host`` signed by this CA, as PEM."""
        if host not in self.hosts:
            raise ValueError(f"{host} is not a secret host of this session")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _SKEW)
            .not_valid_after(_now() + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def server_context(self, host: str) -> ssl.SSLContext:
        """The TLS server context that impersonates ``host`` to the sandbox (cached per host)."""
        ctx = self._contexts.get(host)
        if ctx is None:
            cert_pem, key_pem = self.leaf_pem(host)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.options |= ssl.OP_NO_RENEGOTIATION
            ctx.set_alpn_protocols(["http/1.1"])
            _load_chain(ctx, cert_pem + self.cert_pem + key_pem, self._scratch_dir)
            self._contexts[host] = ctx
        return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes, scratch_dir: Path | None) -> None:
    """``load_cert_chain`` wants a path: hand it a memfd, or a 0600 file deleted at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("codeevolver-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass
        finally:
            os.close(fd)
    fd, path = tempfile.mkstemp(dir=scratch_dir)
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


class TLSServerStream:
    """The server end of TLS over an already-open stream whose ClientHello was read to check SNI.

    ``loop.start_tls`` cannot take back bytes already read, so the handshake
    runs through an ``SSLObject`` over memory BIOs, fed the ClientHello first.
    Reading is pull-based (nothing is decrypted until asked for), which gives
    back-pressure for free.
    """

    def __init__(
        self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(first)
        self._buffer = bytearray()
        self._eof = False

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)

    async def _receive(self) -> bool:
        data = await self._reader.read(65536)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                await self._writer.drain()
                if not await self._receive():
                    raise ConnectionError("the client closed during the TLS handshake") from None
        self._flush()
        await self._writer.drain()

    async def _fill(self) -> bool:
        """Decrypt at least one more byte into the buffer; False at the end of the stream."""
        while not self._eof:
            try:
                data = self._tls.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                if not await self._receive():
                    self._eof = True
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            if not data:
                self._eof = True
                break
            self._buffer += data
            return True
        return False

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        while True:
            index = self._buffer.find(separator)
            if index >= 0:
                end = index + len(separator)
                out = bytes(self._buffer[:end])
                del self._buffer[:end]
                return out
            if len(self._buffer) > MAX_HEAD:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(self._buffer))
            if not await self._fill():
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(partial, None)

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer and not await self._fill():
            return b""
        n = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    def write(self, data: bytes) -> None:
        self._tls.write(data)
        self._flush()

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            self._flush()
        self._writer.close()
