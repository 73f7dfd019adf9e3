"""A scripted model server that speaks Anthropic's Messages API, streaming included.

Like :mod:`codeevolver.testing.fake_openai` it is a real HTTP server on
127.0.0.1: the Claude Code CLI, the Anthropic SDK, litellm and the egress
gateway talk to it exactly as to the real API. A ``responder`` sees each
request body and decides the answer.

    def responder(request: dict) -> AnthropicReply | str:
        return AnthropicReply(tool_uses=[("Bash", {"command": "ls"})])

    with ScriptedAnthropicServer(responder, api_key="sk-real") as server:
        ...  # ANTHROPIC_BASE_URL=server.url; read server.requests / server.headers afterwards

Streams are sent with chunked transfer encoding, as the real API does, as the
event sequence ``message_start`` (with usage) -> ``content_block_start`` /
``content_block_delta`` (``text_delta`` or ``input_json_delta``) / ``content_block_stop``
per block -> ``message_delta`` (stop reason, output usage) -> ``message_stop``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from codeevolver.testing._server import ScriptedServer


@dataclass
class AnthropicReply:
    """One scripted answer. ``status`` other than 200 sends an Anthropic-style error.

    ``chunk_delay_s`` pauses between streamed events (to see a proxy forward them as they come).
    """

    text: str | None = None
    tool_uses: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: int = 200
    error_type: str = "api_error"
    error_message: str = "scripted error"
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    stop_reason: str | None = None
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0


AnthropicResponder = Callable[[dict[str, Any]], "AnthropicReply | str"]


class ScriptedAnthropicServer(ScriptedServer):
    """Serves ``POST /v1/messages`` (JSON or SSE), ``POST /v1/messages/count_tokens`` and ``GET /v1/models``.

    ``requests`` holds each messages request body, ``headers`` its headers and
    ``paths`` its path with query, in arrival order. With ``api_key`` set, a
    request must carry it in ``x-api-key`` (or ``Authorization: Bearer``) or gets 401.
    """

    def __init__(
        self,
        responder: AnthropicResponder,
        *,
        latency_s: float = 0.0,
        api_key: str | None = None,
        model: str = "claude-scripted",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(responder, latency_s=latency_s, api_key=api_key, model=model, host=host, port=port)
        self.responder: AnthropicResponder = responder
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        """Base URL to use as ``ANTHROPIC_BASE_URL`` (no ``/v1``: clients add it)."""
        return self._address

    def _authorized(self, headers: Any) -> bool:
        if self.api_key is None:
            return True
        bearer = (headers.get("Authorization") or "").removeprefix("Bearer ").strip()
        return self.api_key in (headers.get("x-api-key"), bearer)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.split("?")[0].rstrip("/") == "/v1/models":
                    if not server._authorized(self.headers):
                        self._error(401, "authentication_error", "invalid x-api-key")
                        return
                    self._json(200, {"data": [{"type": "model", "id": server.model}], "has_more": False})
                else:
                    self._error(404, "not_found_error", f"no route {self.path}")

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                route = self.path.split("?")[0].rstrip("/")
                if route not in ("/v1/messages", "/v1/messages/count_tokens"):
                    self._error(404, "not_found_error", f"no route {self.path}")
                    return
                if not server._authorized(self.headers):
                    self._error(401, "authentication_error", "invalid x-api-key")
                    return
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._error(400, "invalid_request_error", "body is not JSON")
                    return
                if route.endswith("count_tokens"):
                    self._json(200, {"input_tokens": _approx_tokens(body.get("messages"))})
                    return
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.paths.append(self.path)
                reply = server.responder(body)
                if isinstance(reply, str):
                    reply = AnthropicReply(text=reply)
                time.sleep(server.latency_s + reply.delay_s)
                if reply.status != 200:
                    self._error(reply.status, reply.error_type, reply.error_message)
                    return
                message = _message(body, reply, server.model)
                if body.get("stream"):
                    self._stream(message, reply.chunk_delay_s)
                else:
                    self._json(200, message, {"request-id": f"req_{uuid.uuid4().hex[:24]}"})

            def _json(self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, kind: str, message: str) -> None:
                self._json(status, {"type": "error", "error": {"type": kind, "message": message}})

            def _stream(self, message: dict[str, Any], delay_s: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, (event, data) in enumerate(_events(message)):
                    if i and delay_s:
                        time.sleep(delay_s)
                    payload = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler


def _approx_tokens(value: Any) -> int:
    return max(1, len(json.dumps(value)) // 4)


def _message(body: dict[str, Any], reply: AnthropicReply, model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reply.text is not None:
        content.append({"type": "text", "text": reply.text})
    for name, args in reply.tool_uses:
        content.append({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": args})
    output = reply.output_tokens
    if output is None:
        output = _approx_tokens(reply.text or "") + 10 * len(reply.tool_uses)
    stop = reply.stop_reason or ("tool_use" if reply.tool_uses else "end_turn")
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", model),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": _approx_tokens(body.get("messages")) if reply.input_tokens is None else reply.input_tokens,
            "cache_creation_input_tokens": reply.cache_creation_input_tokens,
            "cache_read_input_tokens": reply.cache_read_input_tokens,
            "output_tokens": output,
        },
    }


def _pieces(text: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(text) // n))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _events(message: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    yield "message_start", {"type": "message_start", "message": start}
    yield "ping", {"type": "ping"}
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield "content_block_start", {
                "type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""},
            }  # fmt: skip
            for piece in _pieces(block["text"]):
                delta = {"type": "text_delta", "text": piece}
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        else:
            empty = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": empty}
            for piece in _pieces(json.dumps(block["input"])):
                delta = {"type": "input_json_delta", "partial_json": piece}
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield "message_stop", {"type": "message_stop"}
