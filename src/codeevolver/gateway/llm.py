"""LLM routes: the sandbox holds a placeholder key; the gateway holds the real one and the meter.

    sandbox  POST /anthropic/v1/messages  x-api-key: <placeholder>
      -> placeholder checked (401 otherwise) -> budget checked (402 once spent)
      -> real key swapped in -> operator-configured upstream (TLS for https)
      -> response streamed back as it arrives, real key masked, usage read on the way
      -> UsageRecord to the ledger, one audit row

The mount of a route is ``/{name}/v1`` for the OpenAI protocol (a base URL ends in
``/v1`` there) and ``/{name}`` for Anthropic's (its SDK and CLI add ``/v1`` themselves).
A route whose upstream speaks another protocol than its clients is translated on the
way (``LLMUpstream.translates``, translate.py); key checks, budget and metering are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from codeevolver.gateway import translate
from codeevolver.gateway.core import LLMUpstream
from codeevolver.gateway.forward import (
    BROKEN,
    Outcome,
    Redactor,
    Upstream,
    UpstreamGone,
    exchange,
    read_request_body,
)
from codeevolver.gateway.http1 import Headers, HttpError, RequestHead, simple_response
from codeevolver.gateway.usage import UsageMeter, litellm_prices, price
from codeevolver.types import UsageRecord

if TYPE_CHECKING:
    from codeevolver.gateway.proxy import Connection

log = logging.getLogger("codeevolver.gateway")
_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
_METERED = ("/chat/completions", "/completions", "/responses", "/embeddings", "/v1/messages")


def mount(name: str, upstream: LLMUpstream) -> str:
    return f"/{name}/v1" if upstream.provider == "openai" else f"/{name}"


def find_route(routes: Mapping[str, LLMUpstream], path: str) -> tuple[str, LLMUpstream, str] | None:
    """(route name, upstream, the rest of the path after the mount) for an origin-form path."""
    for name, upstream in routes.items():
        prefix = mount(name, upstream)
        if path == prefix or path.startswith((prefix + "/", prefix + "?")):
            return name, upstream, path[len(prefix) :] or "/"
    return None


def error_response(status: int, message: str, *, kind: str = "egress") -> bytes:
    """An error body both SDKs parse: OpenAI's ``error.message`` and Anthropic's ``type: error``."""
    error_type = {401: "authentication_error", 402: "budget_exceeded", 404: "not_found_error"}.get(
        status, "egress_blocked" if kind == "egress" else "gateway_error"
    )
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message, "code": error_type}}
    return simple_response(
        status,
        HTTPStatus(status).phrase,
        json.dumps(body).encode(),
        "application/json",
        [("X-CodeEvolver-Gateway", "blocked")],
    )


def placeholder_ok(headers: Headers, provider: str, placeholder: str) -> bool:
    """The sandbox must present its placeholder, and nothing else, in the provider's key header(s)."""
    presented = []
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        presented.append(token.strip() if scheme.lower() == "bearer" else auth)
    if provider == "anthropic" and headers.get("x-api-key") is not None:
        presented.append((headers.get("x-api-key") or "").strip())
    return bool(presented) and all(hmac.compare_digest(p.encode(), placeholder.encode()) for p in presented)


def _metered(suffix: str) -> bool:
    """Calls that generate (and bill) tokens; listing models or counting tokens does not."""
    return suffix.split("?", 1)[0].rstrip("/").endswith(_METERED)


def _safe_path(suffix: str) -> bool:
    path = unquote(suffix.split("?", 1)[0])
    return "\\" not in path and not any(seg in (".", "..") for seg in path.split("/"))


def prepare_body(upstream: LLMUpstream, suffix: str, body: bytes) -> tuple[str | None, bytes]:
    """The request's model, and the body to send (OpenAI streams are asked to report usage)."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None, body
    if not isinstance(data, dict):
        return None, body
    model = data.get("model") if isinstance(data.get("model"), str) else None
    path = suffix.split("?", 1)[0].rstrip("/")
    if upstream.provider == "openai" and data.get("stream") is True and path.endswith("completions"):
        options = data.get("stream_options")
        if not isinstance(options, dict) or not options.get("include_usage"):
            data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            return model, json.dumps(data).encode()
    return model, body


async def handle(
    conn: Connection, head: RequestHead, name: str, upstream: LLMUpstream, suffix: str, started: datetime
) -> bool:
    """Serve one LLM-route request; True if the client connection can take another."""
    session, core = conn.session, conn.core
    base = urlsplit(upstream.base_url)
    host, tls = base.hostname or "", base.scheme == "https"
    port = base.port or (443 if tls else 80)
    where: dict[str, Any] = {"method": head.method, "path": (mount(name, upstream) + suffix)[:2048]}

    async def refuse(status: int, reason: str) -> bool:
        conn.audit(started, host, port, "blocked", f"llm route {name}: {reason}", status=status, **where)
        await conn.reply(status, reason, kind="llm")
        return False

    if not _safe_path(suffix):
        return await refuse(400, "dot segments and backslashes are not allowed in route paths")
    if not placeholder_ok(head.headers, upstream.provider, session.placeholder):
        header = "x-api-key" if upstream.provider == "anthropic" else "Authorization: Bearer"
        return await refuse(401, f"wrong or missing API key: send this sandbox's placeholder key in {header}")
    try:
        body = await read_request_body(conn.reader, conn.writer, head)
    except HttpError as exc:
        return await refuse(exc.status, exc.message)
    if upstream.translates:
        path = suffix.split("?", 1)[0].rstrip("/")
        if head.method == "POST" and path == "/v1/messages/count_tokens":
            return await _count_tokens(conn, body, name, started, where)
        if head.method != "POST" or path != "/v1/messages":
            return await refuse(404, f"route {name} translates POST /v1/messages (and count_tokens) only")
    if core.budget_exceeded is not None:
        if session.pending:
            await asyncio.wait(list(session.pending))
        over = await asyncio.get_running_loop().run_in_executor(None, core.budget_exceeded, session.run_id)
        if over:
            detail = f" ({over})" if isinstance(over, str) else ""
            return await refuse(
                402,
                f"run {session.run_id} has spent its USD budget{detail}; the gateway refuses further model calls. "
                "Raise the run's budget to continue.",
            )
    call: translate.Call | None = None
    if upstream.translates:
        try:
            call = await asyncio.get_running_loop().run_in_executor(None, translate.to_openai, body, upstream.model)
        except translate.TranslationError as exc:
            return await refuse(exc.status, exc.message)
        model: str | None = call.model
        headers = Headers([("Content-Type", "application/json"), ("Accept", "*/*")])
        out = RequestHead("POST", base.path.rstrip("/") + "/chat/completions", "HTTP/1.1", headers)
    else:
        model, body = prepare_body(upstream, suffix, body)
        headers = head.headers.without_hop_by_hop()
        headers.remove(*_KEY_HEADERS, "cookie")
        out = RequestHead(head.method, base.path.rstrip("/") + suffix, "HTTP/1.1", headers)
    headers.set("Host", base.netloc.rpartition("@")[2])
    headers.set("Accept-Encoding", "identity")
    if upstream.api_key:
        if upstream.upstream_speaks == "anthropic":
            headers.set("x-api-key", upstream.api_key)
        else:
            headers.set("Authorization", f"Bearer {upstream.api_key}")
    meter = UsageMeter(upstream.upstream_speaks)
    redactor = Redactor([upstream.api_key.encode()])
    key = ("llm:" + name, host, port)
    conn.forwarding(started, host, port, f"llm route {name}", **where)
    if conn.upstream is not None and (conn.upstream.key != key or not conn.upstream.usable()):
        conn.drop_upstream()
    outcome = None
    for attempt in (0, 1):
        if conn.upstream is None:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        host, port, ssl=core.llm_ssl(upstream) if tls else None, server_hostname=host if tls else None
                    ),
                    core.connect_timeout_s,
                )
            except (OSError, TimeoutError) as exc:
                return await refuse(502, f"model endpoint {host}:{port} unreachable: {type(exc).__name__}: {exc}")
            conn.upstream = Upstream(key, reader, writer)
        try:
            if call is None:
                outcome = await exchange(
                    conn.reader, conn.writer, head, out, conn.upstream, body=body, filters=[meter], redactor=redactor
                )
            else:
                outcome = await translate.exchange(
                    conn.writer, head, out, conn.upstream, call=call, meter=meter, redactor=redactor
                )
            break
        except UpstreamGone as exc:
            retry = conn.upstream.used and attempt == 0
            conn.drop_upstream()
            if not retry:
                return await refuse(502, f"model endpoint {host}:{port} closed the connection: {exc}")
        except HttpError as exc:
            conn.drop_upstream()
            return await refuse(exc.status, exc.message)
        except BROKEN:
            # Cut mid-answer: the provider bills what it generated, so meter what went past.
            if meter.found:
                meter.end()
                partial = Outcome(200, 0, 0, False, False)
                _schedule(conn, upstream, meter, model, started, host, port, partial, where)
            raise
    assert outcome is not None and conn.upstream is not None
    conn.upstream.used = True
    if not outcome.upstream_reusable:
        conn.drop_upstream()
    if head.method == "POST" and 200 <= outcome.status < 300 and _metered(suffix):
        _schedule(conn, upstream, meter, model, started, host, port, outcome, where)
    else:
        conn.audit(
            started, host, port, "allowed", f"llm route {name}", status=outcome.status,
            bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down, **where,
        )  # fmt: skip
    return outcome.client_keep_alive


async def _count_tokens(conn: Connection, body: bytes, name: str, started: datetime, where: dict[str, Any]) -> bool:
    """A translated route answers token counts itself (an estimate): its upstream has no such call."""
    try:
        answer, status = translate.count_tokens(body), 200
    except translate.TranslationError as exc:
        answer, status = (
            json.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": exc.message}}).encode(),
            exc.status,
        )
    reason = f"llm route {name}: count_tokens estimated by the gateway"
    conn.audit(started, "gateway", conn.session.proxy_port, "allowed", reason, status=status, **where)
    with contextlib.suppress(ConnectionError, OSError):
        conn.writer.write(simple_response(status, HTTPStatus(status).phrase, answer, "application/json"))
        await conn.writer.drain()
    return False


def _schedule(
    conn: Connection,
    upstream: LLMUpstream,
    meter: UsageMeter,
    model: str | None,
    started: datetime,
    host: str,
    port: int,
    outcome: Outcome,
    where: dict[str, Any],
) -> None:
    """Meter and audit the call off the connection's path (pricing may import litellm; the ledger
    is a DB write); the session's next budget check, and closing it, wait for this."""
    conn.inflight = None  # the metering task writes this request's audit row
    record = _record(conn, upstream, meter, model or "unknown", started, host, port, outcome, where)
    task = asyncio.create_task(record)
    conn.session.pending.add(task)
    task.add_done_callback(conn.session.pending.discard)


async def _record(
    conn: Connection,
    upstream: LLMUpstream,
    meter: UsageMeter,
    model: str,
    started: datetime,
    host: str,
    port: int,
    outcome: Outcome,
    where: dict[str, Any],
) -> None:
    record = await asyncio.get_running_loop().run_in_executor(None, _meter, conn, upstream, meter, model)
    summary = (
        f"llm route: {record.model} in={record.input_tokens} cached={record.cached_tokens} out={record.output_tokens}"
    )
    row = conn.session.audit_row(
        started, host, port, "allowed", summary, status=outcome.status, bytes_up=outcome.bytes_up,
        bytes_down=outcome.bytes_down, **where,
    )  # fmt: skip
    conn.core.audit.put(row)


def _meter(conn: Connection, upstream: LLMUpstream, meter: UsageMeter, request_model: str) -> UsageRecord:
    """Price the call and hand it to the ledger (runs in a worker thread: pricing may import litellm)."""
    session = conn.session
    model = meter.model or request_model
    tokens = meter.tokens()
    if not meter.found:
        log.warning("no usage in the response of %s for model %s: recorded with zero tokens", upstream.base_url, model)
    try:
        cost = price(tokens, upstream.prices or litellm_prices(meter.provider, model))
    except Exception:
        log.exception("pricing %s failed: recorded at zero cost", model)
        cost = Decimal(0)
    record = UsageRecord(
        model=model, purpose=session.purpose, input_tokens=tokens.uncached_input + tokens.cache_write,
        output_tokens=tokens.output, cached_tokens=tokens.cache_read, cost_usd=cost, request_id=meter.request_id,
        run_id=session.run_id, candidate_id=session.candidate_id,
    )  # fmt: skip
    if conn.core.ledger is not None:
        try:
            conn.core.ledger(record)
        except Exception:
            log.exception("usage ledger refused a record; it is lost: %r", record)
    return record
