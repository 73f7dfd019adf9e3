"""What the scripted model servers share: a threaded HTTP server on 127.0.0.1 and its lifecycle."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class ScriptedServer:
    """Base of the scripted providers: subclasses give ``_handler_class`` (the protocol) and ``url``.

    ``requests`` and ``headers`` record each model request's body and headers in arrival order.
    """

    def __init__(
        self, responder: Any, *, latency_s: float, api_key: str | None, model: str, host: str, port: int
    ) -> None:
        self.responder = responder
        self.latency_s = latency_s
        self.api_key = api_key
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def _address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
