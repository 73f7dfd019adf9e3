"""Just enough HTTP/1.1 for a proxy: heads, body framing, relaying without buffering.

Strict on purpose. A proxy that parses loosely is a request-smuggling bug: both
Content-Length and Transfer-Encoding, differing lengths, folded or nameless
header lines and odd chunk sizes are refused with 400. Bodies are always
re-framed by us on the way out (a length stays a length, anything else becomes
chunked), so what reaches the upstream is framed the way we read it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

MAX_HEAD = 64 * 1024
READ_SIZE = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "expect",
    }
)  # fmt: skip
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CHUNK_SIZE = re.compile(rb"^[0-9a-fA-F]{1,12}$")


class Reader(Protocol):
    """The part of ``asyncio.StreamReader`` the parser uses (the TLS interceptor has its own)."""

    async def readuntil(self, separator: bytes = b"\n") -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...
    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...


class HttpError(Exception):
    """A malformed message: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Headers:
    """Header lines in arrival order, names compared without case."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.items if k.lower() == name), None)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.items if k.lower() == name]

    def remove(self, *names: str) -> None:
        drop = {n.lower() for n in names}
        self.items = [(k, v) for k, v in self.items if k.lower() not in drop]

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.items.append((name, value))

    def without_hop_by_hop(self) -> Headers:
        """A copy without hop-by-hop headers, including those the Connection header names."""
        named = {t.strip().lower() for v in self.get_all("connection") for t in v.split(",")}
        drop = HOP_BY_HOP | named
        return Headers([(k, v) for k, v in self.items if k.lower() not in drop])

    def encode(self) -> bytes:
        return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in self.items)


@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    headers: Headers

    def encode(self) -> bytes:
        return f"{self.method} {self.target} {self.version}\r\n".encode("latin-1") + self.headers.encode() + b"\r\n"

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for v in self.headers.get_all("connection") for t in v.split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return False


@dataclass
class ResponseHead:
    version: str
    status: int
    reason: str
    headers: Headers

    def encode(self) -> bytes:
        return f"HTTP/1.1 {self.status} {self.reason}\r\n".encode("latin-1") + self.headers.encode() + b"\r\n"


@dataclass(frozen=True)
class Framing:
    """How a body ends: after ``length`` bytes, at the zero chunk, or when the peer closes."""

    kind: Literal["length", "chunked", "close"]
    length: int = 0


NO_BODY = Framing("length", 0)


async def read_head(reader: Reader) -> bytes | None:
    """The bytes up to the blank line; None on a clean EOF before any byte."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpError(400, "the message head was cut short") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"the message head is over {MAX_HEAD} bytes") from None


def _parse_headers(lines: list[bytes]) -> Headers:
    headers = Headers()
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "malformed header line")
        headers.items.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    if len(headers.items) > 200:
        raise HttpError(431, "too many header lines")
    return headers


def parse_request(data: bytes) -> RequestHead:
    lines = data[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(400, "malformed request line")
    if any(ch in parts[1] for ch in b"\x00\r\n\t"):
        raise HttpError(400, "malformed request target")
    method, target, version = (p.decode("latin-1") for p in parts)
    return RequestHead(method, target, version, _parse_headers(lines[1:]))


def parse_response(data: bytes) -> ResponseHead:
    lines = data[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status_text, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or not status_text.isdigit() or len(status_text) != 3:
        raise HttpError(502, "the upstream sent a malformed status line")
    return ResponseHead(version.decode(), int(status_text), reason.decode("latin-1"), _parse_headers(lines[1:]))


def _content_length(headers: Headers) -> int | None:
    values = {v.strip() for raw in headers.get_all("content-length") for v in raw.split(",")}
    if not values:
        return None
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise HttpError(400, "conflicting or malformed Content-Length")
    return int(values.pop())


def request_framing(head: RequestHead) -> Framing:
    te = [t.strip().lower() for v in head.headers.get_all("transfer-encoding") for t in v.split(",")]
    length = _content_length(head.headers)
    if te:
        if length is not None:
            raise HttpError(400, "both Content-Length and Transfer-Encoding")
        if te != ["chunked"]:
            raise HttpError(501, f"unsupported Transfer-Encoding {', '.join(te)}")
        return Framing("chunked")
    return Framing("length", length or 0)


def response_framing(head: ResponseHead, method: str) -> Framing:
    if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return NO_BODY
    te = [t.strip().lower() for v in head.headers.get_all("transfer-encoding") for t in v.split(",")]
    if te:
        if te[-1] != "chunked":
            return Framing("close")
        return Framing("chunked")
    length = _content_length(head.headers)
    return Framing("close") if length is None else Framing("length", length)


async def iter_body(reader: Reader, framing: Framing) -> AsyncIterator[bytes]:
    """Yield a body's payload as it arrives (chunk framing removed); errors if it is cut short."""
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            data = await reader.read(min(remaining, READ_SIZE))
            if not data:
                raise ConnectionError("the body ended early")
            remaining -= len(data)
            yield data
    elif framing.kind == "chunked":
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise HttpError(400, "chunk size line too long") from None
            size_text = line[:-2].split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.match(size_text):
                raise HttpError(400, "malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers are dropped
                return
            while size:
                data = await reader.read(min(size, READ_SIZE))
                if not data:
                    raise ConnectionError("the body ended early")
                size -= len(data)
                yield data
            if await reader.readexactly(2) != b"\r\n":
                raise HttpError(400, "malformed chunk")
    else:
        while data := await reader.read(READ_SIZE):
            yield data


class BodySink:
    """Writes a payload to ``writer`` framed as ``kind``; counts the bytes it put on the wire."""

    def __init__(self, writer: Writer, kind: Literal["length", "chunked", "close"]) -> None:
        self.writer = writer
        self.kind = kind
        self.wire_bytes = 0

    async def send(self, data: bytes) -> None:
        if not data:
            return
        wire = b"%x\r\n%s\r\n" % (len(data), data) if self.kind == "chunked" else data
        self.writer.write(wire)
        self.wire_bytes += len(wire)
        await self.writer.drain()

    async def end(self) -> None:
        if self.kind == "chunked":
            self.writer.write(b"0\r\n\r\n")
            self.wire_bytes += 5
            await self.writer.drain()


class Filter(Protocol):
    """Sees (and may rewrite, length-preserving) a body as it passes; ``end`` returns what it held back."""

    def feed(self, data: bytes) -> bytes: ...
    def end(self) -> bytes: ...


async def pump(source: AsyncIterator[bytes], sink: BodySink, filters: Iterable[Filter] = ()) -> int:
    """Copy a body from ``source`` to ``sink`` piece by piece (never buffered whole); returns payload bytes."""
    chain = list(filters)
    total = 0
    async for data in source:
        for f in chain:
            data = f.feed(data)
        total += len(data)
        await sink.send(data)
    tail = b""
    for f in chain:
        tail = f.feed(tail) + f.end()
    total += len(tail)
    await sink.send(tail)
    await sink.end()
    return total


def simple_response(
    status: int, reason: str, body: bytes, content_type: str, extra: Iterable[tuple[str, str]] = ()
) -> bytes:
    """A complete response that closes the connection."""
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")])
    headers.items.extend(extra)
    return ResponseHead("HTTP/1.1", status, reason, headers).encode() + body
