"""Anthropic Messages in front, OpenAI chat completions behind: the Claude Code CLI on an open model.

::

    sandbox  POST /anthropic/v1/messages?beta=true  (Anthropic Messages, streamed or not)
      -> to_openai: litellm's adapter, then trimmed to what any OpenAI-compatible server accepts
      -> POST {base_url}/chat/completions  (stream_options.include_usage, the operator's model)
      <- SSE:  chunk by chunk into Anthropic events (litellm's stream wrapper), as they arrive
      <- JSON: translated whole (litellm's adapter)
      <- 4xx/5xx: an Anthropic error body with a matching status
    POST /anthropic/v1/messages/count_tokens -> an estimate, answered here (no upstream call)

The usage meter reads the upstream's own (OpenAI) bytes, so the ledger holds the
endpoint's token counts, not a translation of them. litellm is used only for its
pure translation functions: no litellm client, no network call, no callbacks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from codeevolver.gateway.forward import MAX_LLM_BODY, Outcome, Redactor, Upstream, UpstreamGone
from codeevolver.gateway.http1 import (
    BodySink,
    Headers,
    HttpError,
    Reader,
    RequestHead,
    ResponseHead,
    Writer,
    iter_body,
    parse_response,
    read_head,
    response_framing,
)
from codeevolver.gateway.usage import UsageMeter

_OPENAI_FIELDS = frozenset(
    {"model", "messages", "tools", "tool_choice", "max_tokens", "temperature", "top_p", "stop", "stream",
     "response_format", "parallel_tool_calls"}
)  # fmt: skip
"""What is sent upstream: the chat-completions fields every compatible server knows."""
_MESSAGE_FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id", "name"})
_IGNORED = ("thinking", "metadata", "output_config", "betas", "context_management", "container", "mcp_servers")
"""Anthropic-only request fields dropped before translation: they have no chat-completions meaning."""


class TranslationError(Exception):
    """A request or answer the translation cannot carry; ``status`` is what the client is told."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Call:
    """One translated request, and what its answer's translation needs to know."""

    client_model: str
    """The model the client named: the answer names it back, so the CLI sees what it asked for."""
    model: str
    """The model sent upstream (the route's ``model``, else the client's)."""
    stream: bool
    body: bytes
    tool_names: dict[str, str] = field(default_factory=dict)
    """Tool names shortened to OpenAI's 64 characters -> the client's names."""


def _litellm_adapters() -> tuple[Any, Any]:
    """litellm's Anthropic<->OpenAI adapters, imported on first use (in a worker thread: it takes seconds)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # litellm's TypedDicts make pydantic warn once per type on first use; it says nothing to an operator.
    warnings.filterwarnings(
        "ignore", r"Items? '.+' on TypedDict class '\w+' (is|are) using the `ReadOnly`", UserWarning
    )
    import litellm.anthropic_interface.exceptions.exception_mapping_utils  # noqa: F401 - used on the loop later
    from litellm.llms.anthropic.messages.adapters.transformation import (
        AnthropicAdapter,
        LiteLLMAnthropicMessagesAdapter,
    )

    return AnthropicAdapter, LiteLLMAnthropicMessagesAdapter


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TranslationError(400, f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise TranslationError(400, f"{what} is not a JSON object")
    return data


# -- the request ---------------------------------------------------------------------------


def to_openai(body: bytes, model: str | None) -> Call:
    """An Anthropic Messages request -> the chat-completions request for the upstream.

    litellm's adapter does the part that is easy to get wrong (tool_use/tool_result pairing and
    order, images, tool names over 64 characters, tool_choice, stop_sequences); its output is meant
    for litellm's own provider layer, so it is then cut down to plain chat-completions fields.
    """
    data = _json_object(body, "the request body")
    client_model = data.get("model")
    if not isinstance(client_model, str) or not client_model:
        raise TranslationError(400, "model: a model name is required")
    if not isinstance(data.get("messages"), list) or not data["messages"]:
        raise TranslationError(400, "messages: at least one message is required")
    target = model or client_model
    request = {k: v for k, v in data.items() if k not in _IGNORED} | {"model": target}
    _, adapter = _litellm_adapters()
    try:
        translated, tool_names = adapter().translate_anthropic_to_openai(
            anthropic_message_request=request, custom_llm_provider="openai"
        )
    except Exception as exc:  # litellm raises anything from KeyError to its own errors on odd input
        raise TranslationError(400, f"cannot translate this request: {type(exc).__name__}: {exc}") from None
    out = _plain_request(dict(translated), data)
    return Call(client_model, target, out.get("stream") is True, json.dumps(out).encode(), dict(tool_names or {}))


def _plain_request(translated: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """Only fields strict servers accept (llama-cpp-python validates every message), usage asked for."""
    out = {k: v for k, v in translated.items() if k in _OPENAI_FIELDS}
    out["messages"] = [_plain_message(m) for m in translated.get("messages") or [] if isinstance(m, dict)]
    tools = [
        {"type": "function", "function": t["function"]}
        for t in out.pop("tools", None) or []
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
    ]
    if tools:
        out["tools"] = tools
    else:
        out.pop("tool_choice", None)  # servers refuse a tool_choice without tools
    choice = original.get("tool_choice")
    if tools and isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    if out.get("stream") is True:
        out["stream_options"] = {"include_usage": True}  # else most servers send no usage in a stream
    return out


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """One message without litellm's extras (``thinking_blocks``, ``reasoning_content``, ``cache_control``).

    Content made only of text becomes one string: some servers take a system message only as a string.
    """
    out = {k: v for k, v in message.items() if k in _MESSAGE_FIELDS}
    content = out.get("content")
    if isinstance(content, list):
        parts = [{k: v for k, v in p.items() if k != "cache_control"} for p in content if isinstance(p, dict)]
        if all(p.get("type") == "text" for p in parts):
            out["content"] = "\n\n".join(str(p.get("text") or "") for p in parts)
        else:
            out["content"] = parts
    return out


def count_tokens(body: bytes) -> bytes:
    """``/v1/messages/count_tokens``: an estimate, one token per four characters of the prompt's JSON.

    An OpenAI-compatible endpoint has no counting API. The CLI itself falls back to this same
    estimate when counting fails; its answer steers context warnings and compaction, never billing.
    """
    data = _json_object(body, "the request body")
    prompt = {k: data.get(k) for k in ("system", "messages", "tools") if data.get(k) is not None}
    return json.dumps({"input_tokens": max(1, math.ceil(len(json.dumps(prompt)) / 4))}).encode()


# -- the answer ----------------------------------------------------------------------------


def to_anthropic(completion: dict[str, Any], call: Call) -> dict[str, Any]:
    """A whole chat completion -> an Anthropic message (content blocks, stop_reason, usage)."""
    from litellm.types.utils import ModelResponse

    _, adapter = _litellm_adapters()
    try:
        message = adapter().translate_openai_response_to_anthropic(
            response=ModelResponse(**completion), tool_name_mapping=call.tool_names
        )
    except Exception as exc:
        raise TranslationError(
            502, f"cannot translate the model endpoint's answer: {type(exc).__name__}: {exc}"
        ) from None
    out: dict[str, Any] = json.loads(json.dumps(message, default=_jsonable))
    out["model"] = call.client_model
    return out


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump() if callable(dump) else str(value)


def as_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole completion as the chunks a streaming server sends: for a server that ignored ``stream``."""
    base = {k: completion.get(k) for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    delta = dict(choice.get("message") or {})
    if isinstance(delta.get("tool_calls"), list):
        delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(delta["tool_calls"]) if isinstance(c, dict)]
    chunks = [
        base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        base | {"choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}]},
    ]
    if isinstance(completion.get("usage"), dict):
        chunks.append(base | {"choices": [], "usage": completion["usage"]})
    return chunks


def error_body(status: int, raw: bytes) -> tuple[int, bytes]:
    """An upstream error -> (status, Anthropic error body), so the CLI shows the endpoint's message.

    Statuses the CLI knows keep their meaning (429 and 5xx are retried, 4xx are not); a 422 from a
    validating server is a bad request (400). A 401/403 is the gateway's key, not the sandbox's.
    """
    from litellm.anthropic_interface.exceptions.exception_mapping_utils import (
        ANTHROPIC_ERROR_TYPE_MAP,
        AnthropicExceptionMapping,
    )

    message = _error_message(raw) or f"the model endpoint answered HTTP {status}"
    if status in (401, 403):
        message = f"the model endpoint refused the gateway's credentials (HTTP {status}): {message}"
    client_status = status if status in ANTHROPIC_ERROR_TYPE_MAP or status >= 500 else 400
    body = AnthropicExceptionMapping.create_error_response(client_status, message)
    return client_status, json.dumps(body).encode()


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI (``error.message``), FastAPI (``detail``) or plain-text error body."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:2000]
        for value in (error, data.get("message"), data.get("detail")):
            if value:
                return (value if isinstance(value, str) else json.dumps(value))[:2000]
    return text[:2000]


@dataclass
class _StreamState:
    error: BaseException | None = None
    complete: bool = False


async def _openai_chunks(body: AsyncIterator[bytes], meter: UsageMeter, state: _StreamState) -> AsyncIterator[Any]:
    """The upstream's SSE body as litellm stream chunks, metered byte for byte; ``state`` says how it ended."""
    from litellm.types.utils import ModelResponseStream

    pending = b""
    try:
        async for data in body:
            meter.feed(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if (chunk := _sse_data(line)) is not None:
                    yield ModelResponseStream(**chunk)
        meter.end()
        if (chunk := _sse_data(pending)) is not None:
            yield ModelResponseStream(**chunk)
        state.complete = True
    except TranslationError as exc:
        state.error = exc
        raise
    except Exception as exc:  # the client is told in an ``error`` event (litellm's wrapper sends it)
        state.error = exc
        raise TranslationError(502, f"the model endpoint's stream broke off: {type(exc).__name__}") from exc


async def _replay(chunks: Iterable[dict[str, Any]]) -> AsyncIterator[Any]:
    from litellm.types.utils import ModelResponseStream

    for chunk in chunks:
        yield ModelResponseStream(**chunk)


def _sse_data(line: bytes) -> dict[str, Any] | None:
    """One ``data:`` line's chunk; None for comments, blank lines and ``[DONE]``. An error event raises."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return None
    try:
        chunk = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise TranslationError(502, "the model endpoint sent a stream line that is not JSON") from None
    if not isinstance(chunk, dict):
        raise TranslationError(502, "the model endpoint sent a stream line that is not a JSON object")
    if chunk.get("error") and not chunk.get("choices"):
        raise TranslationError(502, f"the model endpoint failed mid-answer: {_error_message(payload)}")
    return chunk


# -- the exchange --------------------------------------------------------------------------


async def _response_head(reader: Reader) -> ResponseHead:
    """The final response head; informational ones are skipped (the request body is already sent)."""
    first = True
    while True:
        try:
            raw = await read_head(reader)
        except HttpError as exc:
            raise HttpError(502, f"the upstream sent a bad response head: {exc.message}") from None
        except (ConnectionError, OSError) as exc:
            if first:
                raise UpstreamGone(str(exc)) from exc
            raise
        if raw is None:
            if first:
                raise UpstreamGone("the upstream closed the connection")
            raise HttpError(502, "the upstream closed after an informational response")
        resp = parse_response(raw)
        if resp.status == 101:
            raise HttpError(502, "the upstream tried to switch protocols")
        if not 100 <= resp.status < 200:
            return resp
        first = False


async def _read_all(body: AsyncIterator[bytes]) -> bytes:
    data = bytearray()
    async for piece in body:
        data += piece
        if len(data) > MAX_LLM_BODY:
            raise HttpError(502, f"the model endpoint's answer is over {MAX_LLM_BODY} bytes")
    return bytes(data)


def _head(status: int, content_type: str, *, keep_alive: bool, length: int | None) -> ResponseHead:
    headers = Headers([("Content-Type", content_type), ("X-CodeEvolver-Gateway", "translated")])
    if length is not None:
        headers.set("Content-Length", str(length))
    elif keep_alive:
        headers.set("Transfer-Encoding", "chunked")
    if status == 200 and length is None:
        headers.set("Cache-Control", "no-cache")
    if not keep_alive:
        headers.set("Connection", "close")
    return ResponseHead("HTTP/1.1", status, HTTPStatus(status).phrase, headers)


async def exchange(
    client_writer: Writer,
    client_head: RequestHead,
    out_head: RequestHead,
    upstream: Upstream,
    *,
    call: Call,
    meter: UsageMeter,
    redactor: Redactor,
) -> Outcome:
    """Send the translated request, then answer the client in Anthropic's protocol.

    Raises :class:`UpstreamGone` when the upstream closed before answering (the caller may retry),
    and a ``ConnectionError`` after the client got an ``error`` event for a stream cut mid-answer
    (the caller meters what went past and closes the connection).
    """
    out_head.headers.set("Content-Length", str(len(call.body)))
    data = out_head.encode() + call.body
    upstream.writer.write(data)
    try:
        await upstream.writer.drain()
    except (ConnectionError, OSError) as exc:
        raise UpstreamGone(str(exc)) from exc
    resp = await _response_head(upstream.reader)
    framing = response_framing(resp, "POST")
    closes = "close" in ",".join(resp.headers.get_all("connection")).lower()
    reusable = framing.kind != "close" and not closes and resp.version == "HTTP/1.1"
    body = iter_body(upstream.reader, framing)
    sse = "text/event-stream" in (resp.headers.get("content-type") or "").lower()
    outcome = Outcome(resp.status, len(data), 0, client_head.keep_alive, reusable)

    if 200 <= resp.status < 300 and sse:
        state = _StreamState()
        await _stream(client_writer, client_head, _openai_chunks(body, meter, state), call, redactor, outcome)
        outcome.upstream_reusable = reusable and state.complete
        if state.error is not None:
            raise ConnectionError(f"the model endpoint's stream broke: {state.error}") from state.error
        return outcome
    whole = await _read_all(body)
    if not 200 <= resp.status < 300:
        status, payload = error_body(resp.status, whole)
        return await _send_whole(client_writer, status, payload, redactor, outcome)
    meter.feed(whole)
    meter.end()
    try:
        completion = _json_object(whole, "the model endpoint's answer")
        if call.stream:
            await _stream(client_writer, client_head, _replay(as_chunks(completion)), call, redactor, outcome)
            return outcome
        payload = json.dumps(to_anthropic(completion, call)).encode()
    except TranslationError as exc:
        status, payload = error_body(502, json.dumps({"error": {"message": exc.message}}).encode())
        return await _send_whole(client_writer, status, payload, redactor, outcome)
    return await _send_whole(client_writer, 200, payload, redactor, outcome)


async def _send_whole(writer: Writer, status: int, payload: bytes, redactor: Redactor, outcome: Outcome) -> Outcome:
    payload = redactor.mask(payload)
    head = _head(status, "application/json", keep_alive=outcome.client_keep_alive, length=len(payload)).encode()
    writer.write(head + payload)
    await writer.drain()
    outcome.status = status
    outcome.bytes_down += len(head) + len(payload)
    return outcome


async def _stream(
    writer: Writer, client_head: RequestHead, chunks: AsyncIterator[Any], call: Call, redactor: Redactor,
    outcome: Outcome,
) -> None:  # fmt: skip
    """Re-emit OpenAI chunks as Anthropic SSE events (litellm's wrapper), each as soon as it is made."""
    adapter, _ = _litellm_adapters()
    keep_alive = outcome.client_keep_alive and client_head.version == "HTTP/1.1"
    head = _head(200, "text/event-stream; charset=utf-8", keep_alive=keep_alive, length=None).encode()
    writer.write(head)
    sink = BodySink(writer, "chunked" if keep_alive else "close")
    events = adapter().translate_completion_output_params_streaming(
        chunks, model=call.client_model, tool_name_mapping=call.tool_names
    )
    try:
        async for event in events:
            await sink.send(redactor.feed(event if isinstance(event, bytes) else str(event).encode()))
        await sink.send(redactor.end())
        await sink.end()
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
    outcome.status = 200
    outcome.client_keep_alive = keep_alive
    outcome.bytes_down += len(head) + sink.wire_bytes
