"""The handler behind one session socket: a forward proxy that says no by default.

Per connection it reads requests (keep-alive) and sends each one down one path:

- ``CONNECT host:port``  -> destination check -> 200 -> read the ClientHello; SNI must equal
  ``host`` -> a secret host is intercepted (our TLS on both sides, Host checked,
  headers injected, secrets masked in replies); any other host is spliced as opaque bytes;
- ``GET http://host/...`` -> destination check (port 80 only if allowed), Host must equal
  the URL's host -> forwarded; secrets are never added to plain HTTP;
- ``/openai/...``, ``/anthropic/...`` (or ``http://127.0.0.1:<proxy_port>/...``) -> LLM route;
- anything else -> 4xx. Every request, either way, becomes one audit row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from codeevolver.gateway import llm
from codeevolver.gateway.core import Core, SessionState, utcnow
from codeevolver.gateway.forward import BROKEN, Redactor, Upstream, UpstreamGone, exchange
from codeevolver.gateway.http1 import (
    HttpError,
    Reader,
    RequestHead,
    Writer,
    parse_request,
    read_head,
    request_framing,
)
from codeevolver.gateway.policy import is_ip_literal, normalize_host
from codeevolver.gateway.tls import NotTLS, TLSServerStream, read_client_hello

LOCAL_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
log = logging.getLogger("codeevolver.gateway")


@dataclass
class InFlight:
    """The request being served, so that it is audited even if the connection dies under it."""

    started: datetime
    host: str
    port: int | None
    method: str | None
    path: str | None
    reason: str = ""
    forwarded: bool = False
    bytes_up: int = 0
    bytes_down: int = 0


class Blocked(Exception):
    """A request the policy refuses: answer ``status`` with ``reason``, and audit it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (host, port); HttpError 400 when malformed."""
    try:
        parts = urlsplit("//" + authority)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise HttpError(400, f"malformed authority {authority!r}") from None
    if not host or parts.username is not None or parts.path:
        raise HttpError(400, f"malformed authority {authority!r}")
    return host, port or default_port


class Connection:
    """One accepted connection on a session socket."""

    def __init__(
        self, core: Core, session: SessionState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.core = core
        self.session = session
        self.reader = reader
        self.writer = writer
        self.upstream: Upstream | None = None
        self.inflight: InFlight | None = None

    # -- helpers ----------------------------------------------------------------------------

    def audit(
        self,
        started: datetime,
        host: str,
        port: int | None,
        decision: Literal["allowed", "blocked"],
        reason: str,
        **fields: object,
    ) -> None:
        self.inflight = None
        self.core.audit.put(self.session.audit_row(started, host, port, decision, reason, **fields))  # type: ignore[arg-type]

    def forwarding(self, started: datetime, host: str, port: int | None, reason: str, **where: str | None) -> InFlight:
        """Mark the request as allowed and on its way; ``abandon`` audits it if it never finishes."""
        self.inflight = InFlight(started, host, port, where.get("method"), where.get("path"), reason, forwarded=True)
        return self.inflight

    def abandon(self, why: str) -> None:
        """Audit the request in flight, if any, that the connection's end interrupted."""
        f = self.inflight
        if f is not None:
            reason = f"{f.reason}; interrupted: {why}" if f.reason else f"interrupted: {why}"
            self.audit(
                f.started, f.host, f.port, "allowed" if f.forwarded else "blocked", reason, method=f.method,
                path=f.path, bytes_up=f.bytes_up, bytes_down=f.bytes_down,
            )  # fmt: skip

    async def reply(self, status: int, message: str, writer: Writer | None = None, *, kind: str = "egress") -> None:
        """A JSON error that names the reason, then the connection closes."""
        out = writer or self.writer
        with contextlib.suppress(ConnectionError, OSError):
            out.write(llm.error_response(status, message, kind=kind))
            await out.drain()

    async def check_destination(self, raw_host: str, port: int) -> tuple[str, list[str]]:
        """Policy checks 1-3 of ``policy.py``; returns the normalised host and its checked addresses."""
        try:
            host = normalize_host(raw_host)
        except ValueError:
            raise Blocked(400, f"{raw_host!r} is not a valid host name") from None
        if is_ip_literal(host):
            raise Blocked(403, f"raw IP address {host} refused: name an allowlisted host")
        if not self.session.allow.allows(host, port):
            raise Blocked(403, f"{host}:{port} is not in this sandbox's allowlist")
        try:
            addresses = list(await asyncio.wait_for(self.core.resolver(host, port), self.core.connect_timeout_s))
        except (OSError, TimeoutError) as exc:
            raise Blocked(502, f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise Blocked(502, f"{host} has no addresses")
        if host in self.session.trusted_hosts:
            return host, addresses  # an operator-trusted upstream of this session (e.g. an index mirror)
        for address in addresses:
            refusal = self.core.refusal(address, port)
            if refusal:
                raise Blocked(403, f"{host} resolves to a {refusal}: refused")
        return host, addresses

    async def dial(self, addresses: list[str], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the first checked address that answers (never re-resolving)."""
        error: Exception | None = None
        for address in addresses:
            try:
                return await asyncio.wait_for(asyncio.open_connection(address, port), self.core.connect_timeout_s)
            except (OSError, TimeoutError) as exc:
                error = exc
        raise Blocked(502, f"cannot connect to port {port}: {error}")

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    # -- the request loop -------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(read_head(self.reader), self.core.idle_timeout_s)
                except TimeoutError:
                    break
                except HttpError as exc:
                    self.audit(utcnow(), "", None, "blocked", exc.message, status=exc.status)
                    await self.reply(exc.status, exc.message)
                    break
                if raw is None:
                    break
                started = utcnow()
                try:
                    head = parse_request(raw)
                except HttpError as exc:
                    self.audit(started, "", None, "blocked", exc.message, status=exc.status)
                    await self.reply(exc.status, exc.message)
                    break
                self.inflight = InFlight(started, "", None, head.method, head.target[:2048])
                if not await self.dispatch(head, started):
                    break
        except asyncio.CancelledError:
            self.abandon("the sandbox's gateway session was closed")
            raise
        except BROKEN as exc:
            self.abandon(f"connection broke ({type(exc).__name__})")
        except Exception as exc:
            log.exception("egress gateway failed on a request of sandbox %s", self.session.sandbox_id)
            self.abandon(f"gateway error {type(exc).__name__}")
        finally:
            self.drop_upstream()
            with contextlib.suppress(Exception):
                self.writer.close()

    async def dispatch(self, head: RequestHead, started: datetime) -> bool:
        """Handle one request; True if the connection can take another."""
        if head.method == "CONNECT":
            await self.tunnel(head, started)
            return False
        if head.target.startswith("/"):
            return await self.route(head, head.target, started)
        if head.target[:7].lower() == "http://":
            try:
                url = urlsplit(head.target)
                host, port = url.hostname or "", url.port or 80
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                userinfo = url.username is not None
            except ValueError:
                host, port, path, userinfo = "", 0, "", False
            if not host or userinfo or not 0 < port < 65536:
                self.audit(started, host, port or None, "blocked", "malformed URL", method=head.method, status=400)
                await self.reply(400, f"malformed URL {head.target[:200]!r}")
                return False
            if host in LOCAL_NAMES and port == self.session.proxy_port:
                return await self.route(head, path, started)
            return await self.forward_plain(head, host, port, path, started)
        reason = "only CONNECT, http:// URLs and the gateway's /openai and /anthropic routes are served"
        self.audit(started, "", None, "blocked", reason, method=head.method, path=head.target, status=400)
        await self.reply(400, reason)
        return False

    async def route(self, head: RequestHead, path: str, started: datetime) -> bool:
        found = llm.find_route(self.session.llm_routes, path)
        if found is None:
            reason = f"no gateway route {path.split('?')[0][:200]!r}"
            where = {"method": head.method, "path": path, "status": 404}
            self.audit(started, "gateway", self.session.proxy_port, "blocked", reason, **where)
            await self.reply(404, reason)
            return False
        name, upstream, suffix = found
        return await llm.handle(self, head, name, upstream, suffix, started)

    # -- plain HTTP -------------------------------------------------------------------------

    async def forward_plain(self, head: RequestHead, raw_host: str, port: int, path: str, started: datetime) -> bool:
        where = dict(method=head.method, path=path)
        try:
            host, addresses = await self.check_destination(raw_host, port)
            given = head.headers.get("host")
            if given is not None:
                given_host, given_port = split_authority(given, 80)
                if normalize_host(given_host) != host or given_port != port:
                    raise Blocked(403, f"Host header {given!r} differs from the URL's host {host}: refused")
        except (Blocked, HttpError, ValueError) as exc:
            status, reason = _status_reason(exc)
            self.audit(started, raw_host, port, "blocked", reason, status=status, **where)
            await self.reply(status, reason)
            return False
        out = RequestHead(head.method, path, "HTTP/1.1", head.headers.without_hop_by_hop())
        out.headers.set("Host", host if port == 80 else f"{host}:{port}")
        key = ("http", host, port)
        self.forwarding(started, host, port, "allowlisted", **where)
        if self.upstream is not None and (self.upstream.key != key or not self.upstream.usable()):
            self.drop_upstream()
        try:
            outcome = None
            for attempt in (0, 1):
                if self.upstream is None:
                    reader, writer = await self.dial(addresses, port)
                    self.upstream = Upstream(key, reader, writer)
                try:
                    outcome = await exchange(self.reader, self.writer, head, out, self.upstream, body=None)
                    break
                except UpstreamGone:
                    replayable = self.upstream.used and request_framing(head).length == 0 and attempt == 0
                    self.drop_upstream()
                    if not replayable:
                        raise
            assert outcome is not None
        except (Blocked, UpstreamGone, HttpError) as exc:
            self.drop_upstream()
            status, reason = _status_reason(exc)
            self.audit(started, host, port, "blocked", reason, status=status, **where)
            await self.reply(status, reason)
            return False
        assert self.upstream is not None
        self.upstream.used = True
        if not outcome.upstream_reusable:
            self.drop_upstream()
        self.audit(
            started, host, port, "allowed", "allowlisted", status=outcome.status,
            bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down, **where,
        )  # fmt: skip
        return outcome.client_keep_alive

    # -- CONNECT ----------------------------------------------------------------------------

    async def tunnel(self, head: RequestHead, started: datetime) -> None:
        raw_host, port = "", None
        try:
            raw_host, port = split_authority(head.target, 443)
            host, addresses = await self.check_destination(raw_host, port)
            up_reader, up_writer = await self.dial(addresses, port)
        except (Blocked, HttpError) as exc:
            status, reason = _status_reason(exc)
            self.audit(started, raw_host or head.target[:200], port, "blocked", reason, method="CONNECT", status=status)
            await self.reply(status, reason)
            return
        try:
            self.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await self.writer.drain()
            try:
                hello, sni = await asyncio.wait_for(read_client_hello(self.reader), self.core.handshake_timeout_s)
            except (NotTLS, asyncio.IncompleteReadError, TimeoutError) as exc:
                reason = f"tunnel refused: {exc or 'no TLS ClientHello'} (only TLS may cross a tunnel)"
                self.audit(started, host, port, "blocked", reason, method="CONNECT", status=200)
                return
            if sni is None or _norm(sni) != host:
                what = f"SNI {sni!r}" if sni else "a ClientHello without SNI"
                reason = f"{what} does not match the CONNECT host {host}: domain fronting refused"
                self.audit(started, host, port, "blocked", reason, method="CONNECT", status=200)
                return
            if self.session.ca is not None and host in self.session.secrets:
                await self.intercept(host, port, hello, up_reader, up_writer, started)
                return
            flight = self.forwarding(started, host, port, "allowlisted; TLS tunnel", method="CONNECT")
            up_writer.write(hello)
            flight.bytes_up = len(hello)
            await splice(self.reader, self.writer, up_reader, up_writer, flight)
            self.audit(
                started, host, port, "allowed", "allowlisted; TLS tunnel", method="CONNECT", status=200,
                bytes_up=flight.bytes_up, bytes_down=flight.bytes_down,
            )  # fmt: skip
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()

    # -- TLS interception for secret hosts --------------------------------------------------

    async def intercept(
        self,
        host: str,
        port: int,
        hello: bytes,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        started: datetime,
    ) -> None:
        assert self.session.ca is not None
        secrets = dict(self.session.secrets[host])
        upstream_error: str | None = None
        try:
            await asyncio.wait_for(
                up_writer.start_tls(self.core.upstream_ssl, server_hostname=host), self.core.handshake_timeout_s
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            upstream_error = f"upstream TLS to {host} failed: {exc}"
        tls = TLSServerStream(self.session.ca.server_context(host), self.reader, self.writer, hello)
        try:
            await asyncio.wait_for(tls.handshake(), self.core.handshake_timeout_s)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            reason = f"the sandbox's TLS handshake for {host} failed: {exc}"
            self.audit(started, host, port, "blocked", reason, method="CONNECT", status=200)
            return
        upstream: Upstream | None = None
        if upstream_error is None:
            upstream = Upstream(("https", host, port), up_reader, up_writer)
        redactor_secrets = _secret_values(secrets)
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(read_head(tls), self.core.idle_timeout_s)
                except TimeoutError:
                    return
                if raw is None:
                    return
                keep, upstream = await self._intercepted_request(
                    tls, raw, host, port, secrets, redactor_secrets, upstream, upstream_error, utcnow()
                )
                if not keep:
                    if upstream is not None:
                        upstream.close()
                    return
        finally:
            tls.close()

    async def _intercepted_request(
        self,
        tls: TLSServerStream,
        raw: bytes,
        host: str,
        port: int,
        secrets: dict[str, str],
        redactor_secrets: list[bytes],
        upstream: Upstream | None,
        upstream_error: str | None,
        started: datetime,
    ) -> tuple[bool, Upstream | None]:
        """One request inside an intercepted tunnel; returns (serve another?, the upstream to reuse)."""
        method, path = None, None
        try:
            head = parse_request(raw)
            method, path = head.method, head.target
            if head.target[:8].lower() == "https://":
                url = urlsplit(head.target)
                authority = url.netloc
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            elif head.target.startswith("/"):
                authority = head.headers.get("host") or ""
            else:
                raise Blocked(400, "only origin-form requests are served inside a tunnel")
            given_host, given_port = split_authority(authority, port)
            if _norm(given_host) != host or given_port != port or head.headers.get_all("host")[1:]:
                raise Blocked(421, f"Host {authority!r} differs from the TLS host {host}: domain fronting refused")
            if upstream_error is not None:
                raise Blocked(502, upstream_error)
        except (Blocked, HttpError, ValueError) as exc:
            status, reason = _status_reason(exc)
            self.audit(started, host, port, "blocked", reason, method=method, path=path, status=status)
            await self.reply(status, reason, tls)
            return False, upstream
        out = RequestHead(head.method, path, "HTTP/1.1", head.headers.without_hop_by_hop())
        out.headers.set("Host", host if port == 443 else f"{host}:{port}")
        out.headers.set("Accept-Encoding", "identity")  # so secrets echoed back can be masked
        for name, value in secrets.items():
            out.headers.set(name, value)
        reason = f"secret host; injected {', '.join(sorted(secrets))}"
        self.forwarding(started, host, port, reason, method=head.method, path=path)
        try:
            outcome = None
            for attempt in (0, 1):
                if upstream is None or not upstream.usable():
                    if upstream is not None:
                        upstream.close()
                    _, addresses = await self.check_destination(host, port)
                    reader, writer = await self.dial(addresses, port)
                    await asyncio.wait_for(
                        writer.start_tls(self.core.upstream_ssl, server_hostname=host), self.core.handshake_timeout_s
                    )
                    upstream = Upstream(("https", host, port), reader, writer)
                try:
                    outcome = await exchange(
                        tls, tls, head, out, upstream, body=None, redactor=Redactor(redactor_secrets)
                    )
                    break
                except UpstreamGone:
                    replayable = upstream.used and request_framing(head).length == 0 and attempt == 0
                    upstream.close()
                    upstream = None
                    if not replayable:
                        raise
            assert outcome is not None and upstream is not None
        except (Blocked, UpstreamGone, HttpError, ssl.SSLError, TimeoutError) as exc:
            if upstream is not None:
                upstream.close()
            status, why = _status_reason(exc)
            self.audit(started, host, port, "blocked", why, method=head.method, path=path, status=status)
            await self.reply(status, why, tls)
            return False, None
        upstream.used = True
        self.audit(
            started, host, port, "allowed", reason, method=head.method, path=path, status=outcome.status,
            bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down,
        )  # fmt: skip
        if not outcome.upstream_reusable:
            upstream.close()
            upstream = None
        return outcome.client_keep_alive, upstream


def _norm(host: str) -> str:
    try:
        return normalize_host(host)
    except ValueError:
        return ""


def _status_reason(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, Blocked):
        return exc.status, exc.reason
    if isinstance(exc, HttpError):
        return exc.status, exc.message
    if isinstance(exc, UpstreamGone):
        return 502, f"the upstream closed the connection: {exc}"
    if isinstance(exc, TimeoutError):
        return 504, "the upstream timed out"
    if isinstance(exc, ssl.SSLError):
        return 502, f"upstream TLS failed: {exc}"
    return 400, str(exc)


def _secret_values(headers: dict[str, str]) -> list[bytes]:
    """What to mask in replies: each injected value and the token part of ``Scheme token`` values."""
    values: list[bytes] = []
    for value in headers.values():
        values.append(value.encode("latin-1"))
        if " " in value:
            values.append(value.split(" ", 1)[1].strip().encode("latin-1"))
    return values


async def _copy(reader: Reader, writer: asyncio.StreamWriter, flight: InFlight, field: str) -> bool:
    """Copy until EOF (then half-close) or an error, counting into ``flight``; True if it ended cleanly."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            setattr(flight, field, getattr(flight, field) + len(data))
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return True
    except (ConnectionError, OSError):
        return False


async def splice(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    flight: InFlight,
) -> None:
    """Relay both ways until both sides are done; a broken side tears down the other."""
    up = asyncio.create_task(_copy(client_reader, up_writer, flight, "bytes_up"))
    down = asyncio.create_task(_copy(up_reader, client_writer, flight, "bytes_down"))
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if not all(task.result() for task in done):
            for w in (client_writer, up_writer):
                w.close()
        await asyncio.wait({up, down})
    finally:
        for task in (up, down):
            task.cancel()
