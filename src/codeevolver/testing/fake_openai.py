"""A scripted model server that speaks the OpenAI chat-completions protocol.

It is a real HTTP server on 127.0.0.1, so tests (and users trying CodeEvolver
offline) exercise the same code path as a real provider: litellm, DSPy and
mini-swe-agent talk to it over HTTP. A test decides every answer with a
``responder`` function that sees the request body.

    def responder(request: dict) -> Reply | str:
        return Reply(tool_calls=[("bash", {"command": "ls"})])

    with ScriptedOpenAIServer(responder, latency_s=0.5) as server:
        ...  # point the client at server.url, read server.requests afterwards
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from codeevolver.testing._server import ScriptedServer


@dataclass
class Reply:
    """One scripted answer. ``status`` other than 200 sends an OpenAI-style error."""

    content: str | None = None
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: int = 200
    error_message: str = "scripted error"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    delay_s: float = 0.0


Responder = Callable[[dict[str, Any]], "Reply | str"]


class ScriptedOpenAIServer(ScriptedServer):
    """Serves ``/v1/chat/completions`` (streaming too) and ``/v1/models``.

    ``requests`` records every chat request body in arrival order;
    ``max_concurrent`` is the largest number of requests seen in flight at once.
    With ``api_key`` set, other keys get a 401 like OpenAI's.
    """

    def __init__(
        self,
        responder: Responder,
        *,
        latency_s: float = 0.0,
        api_key: str | None = None,
        model: str = "scripted",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(responder, latency_s=latency_s, api_key=api_key, model=model, host=host, port=port)
        self.responder: Responder = responder
        self.max_concurrent = 0
        self._in_flight = 0

    @property
    def url(self) -> str:
        """Base URL to use as ``api_base`` / ``OPENAI_BASE_URL``."""
        return f"{self._address}/v1"

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send_json(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send_json(404, _error("not found", "not_found_error"))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send_json(404, _error(f"no route {self.path}", "not_found_error"))
                    return
                if server.api_key is not None:
                    given = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                    if given != server.api_key:
                        self._send_json(401, _error("Incorrect API key provided", "invalid_api_key"))
                        return
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send_json(400, _error("body is not JSON", "invalid_request_error"))
                    return
                server._enter()
                try:
                    with server._lock:
                        server.requests.append(body)
                        server.headers.append(dict(self.headers))
                    reply = server.responder(body)
                    if isinstance(reply, str):
                        reply = Reply(content=reply)
                    time.sleep(server.latency_s + reply.delay_s)
                    self._answer(body, reply)
                finally:
                    server._leave()

            def _answer(self, body: dict[str, Any], reply: Reply) -> None:
                if reply.status != 200:
                    self._send_json(reply.status, _error(reply.error_message, "scripted_error"))
                    return
                completion = _completion(body, reply, server.model)
                if body.get("stream"):
                    self._send_stream(completion)
                else:
                    self._send_json(200, completion)

            def _send_json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _send_stream(self, completion: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in _stream_chunks(completion):
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        return Handler


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": kind}}


def _approx_tokens(value: Any) -> int:
    return max(1, len(json.dumps(value)) // 4)


def _completion(body: dict[str, Any], reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": f"call_{uuid.uuid4().hex[:12]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            for name, args in reply.tool_calls
        ]
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else _approx_tokens(body.get("messages"))
    completion = (
        reply.completion_tokens
        if reply.completion_tokens is not None
        else _approx_tokens(reply.content or "") + 10 * len(reply.tool_calls)
    )
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", model),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _stream_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    message = completion["choices"][0]["message"]
    base = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]
    finish = completion["choices"][0]["finish_reason"]
    return [
        base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        base | {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
        base | {"choices": [], "usage": completion["usage"]},
    ]
