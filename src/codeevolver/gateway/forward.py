"""One request/response exchange between the sandbox and an upstream, streamed both ways.

Used by every path that sees HTTP (plain-HTTP proxying, intercepted TLS, LLM
routes): the caller prepares the outgoing head (hop-by-hop headers gone, Host
and credentials set); this sends it, streams the body, relays the response
with filters (usage metering, secret redaction) applied on the fly, and reports
bytes, status and whether either connection can be reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from codeevolver.gateway.http1 import (
    BodySink,
    Filter,
    HttpError,
    Reader,
    RequestHead,
    Writer,
    iter_body,
    parse_response,
    pump,
    read_head,
    request_framing,
    response_framing,
)

MAX_LLM_BODY = 64 * 1024 * 1024
BROKEN = (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError)
"""A peer went away or sent garbage mid-exchange: the connection ends, the request is still audited."""


class UpstreamGone(Exception):
    """The upstream closed before answering; safe to retry on a fresh connection if the body can be replayed."""


@dataclass
class Upstream:
    """An open connection to one origin, reusable for the next request to the same ``key``."""

    key: tuple[str, str, int]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used: bool = False

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass
class Outcome:
    status: int
    bytes_up: int
    bytes_down: int
    client_keep_alive: bool
    upstream_reusable: bool


class Redactor:
    """Masks given secrets in a byte stream (same length, so framing holds), across chunk boundaries.

    Only a tail that could begin a secret is held back, so a stream is not delayed in practice.
    """

    def __init__(self, secrets: Iterable[bytes]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)
        self._held = b""

    def mask(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, b"*" * len(secret))
        return data

    def feed(self, data: bytes) -> bytes:
        if not self.secrets:
            return data
        buf = self.mask(self._held + data)
        hold = 0
        for k in range(min(len(buf), max(len(s) for s in self.secrets) - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.secrets):
                hold = k
                break
        self._held = buf[len(buf) - hold :] if hold else b""
        return buf[: len(buf) - hold]

    def end(self) -> bytes:
        held, self._held = self._held, b""
        return held


async def read_request_body(reader: Reader, writer: Writer, head: RequestHead, limit: int = MAX_LLM_BODY) -> bytes:
    """The whole request body (for routes that must read it), answering ``Expect: 100-continue`` first."""
    framing = request_framing(head)
    if framing.kind == "length" and framing.length > limit:
        raise HttpError(413, f"request body over {limit} bytes")
    await continue_if_expected(writer, head)
    body = bytearray()
    async for data in iter_body(reader, framing):
        body += data
        if len(body) > limit:
            raise HttpError(413, f"request body over {limit} bytes")
    return bytes(body)


async def _upstream_head(reader: Reader) -> bytes | None:
    """A response head; a malformed or cut one is the upstream's fault (502), not the client's (400)."""
    try:
        return await read_head(reader)
    except HttpError as exc:
        raise HttpError(502, f"the upstream sent a bad response head: {exc.message}") from None


async def continue_if_expected(writer: Writer, head: RequestHead) -> None:
    if (head.headers.get("expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()


async def exchange(
    client_reader: Reader,
    client_writer: Writer,
    client_head: RequestHead,
    out_head: RequestHead,
    upstream: Upstream,
    *,
    body: bytes | None,
    filters: Sequence[Filter] = (),
    redactor: Redactor | None = None,
) -> Outcome:
    """Send ``out_head`` (+ ``body``, or the client's body streamed) and relay the answer to the client.

    Raises :class:`UpstreamGone` when the upstream closed before sending a byte of its answer.
    """
    up_writer = upstream.writer
    bytes_up = 0
    if body is not None:
        out_head.headers.remove("transfer-encoding")
        out_head.headers.set("Content-Length", str(len(body)))
        data = out_head.encode() + body
        up_writer.write(data)
        bytes_up = len(data)
    else:
        framing = request_framing(client_head)
        out_head.headers.remove("transfer-encoding", "content-length")
        if framing.kind == "chunked":
            out_head.headers.set("Transfer-Encoding", "chunked")
        elif framing.length or client_head.method in ("POST", "PUT", "PATCH"):
            out_head.headers.set("Content-Length", str(framing.length))
        data = out_head.encode()
        up_writer.write(data)
        bytes_up = len(data)
        await continue_if_expected(client_writer, client_head)
        sink = BodySink(up_writer, "chunked" if framing.kind == "chunked" else "length")
        await pump(iter_body(client_reader, framing), sink)
        bytes_up += sink.wire_bytes
    try:
        await up_writer.drain()
        raw = await _upstream_head(upstream.reader)
    except (ConnectionError, OSError) as exc:
        raise UpstreamGone(str(exc)) from exc
    if raw is None:
        raise UpstreamGone("the upstream closed the connection")
    bytes_down = 0
    resp = parse_response(raw)
    while 100 <= resp.status < 200:
        if resp.status == 101:
            raise HttpError(502, "the upstream tried to switch protocols")
        informational = raw if redactor is None else redactor.mask(raw)
        client_writer.write(informational)
        bytes_down += len(informational)
        raw = await _upstream_head(upstream.reader)
        if raw is None:
            raise HttpError(502, "the upstream closed after an informational response")
        resp = parse_response(raw)

    framing = response_framing(resp, client_head.method)
    upstream_closes = "close" in ",".join(resp.headers.get_all("connection")).lower()
    headers = resp.headers.without_hop_by_hop()
    keep_alive = client_head.keep_alive
    if framing.kind == "length":
        kind = "length"
    elif client_head.version == "HTTP/1.1":
        kind = "chunked"
        headers.remove("content-length")
        headers.set("Transfer-Encoding", "chunked")
    else:
        kind, keep_alive = "close", False
    if not keep_alive:
        headers.set("Connection", "close")
    resp.headers = headers
    head_bytes = resp.encode()
    if redactor is not None:
        head_bytes = redactor.mask(head_bytes)
    client_writer.write(head_bytes)
    bytes_down += len(head_bytes)
    sink = BodySink(client_writer, kind)  # type: ignore[arg-type]
    chain = [*filters, redactor] if redactor is not None else list(filters)
    await pump(iter_body(upstream.reader, framing), sink, chain)
    bytes_down += sink.wire_bytes
    reusable = framing.kind != "close" and not upstream_closes and resp.version == "HTTP/1.1"
    return Outcome(resp.status, bytes_up, bytes_down, keep_alive, reusable)
