"""The gateway's Anthropic -> OpenAI translating route, end to end over a session's unix socket.

A client speaking Anthropic Messages (as the Claude Code CLI does) talks to a real
EgressGateway; the upstream is a real OpenAI-compatible server on 127.0.0.1: the
package's ScriptedOpenAIServer, or, where the exact bytes matter (tool arguments
split across chunks, a stream cut short), a small raw HTTP server defined here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from codeevolver.errors import ConfigError
from codeevolver.gateway import EgressGateway, GatewaySession, LLMUpstream, Prices
from codeevolver.models.base import ModelSpec
from codeevolver.models.resolve import ModelPlan
from codeevolver.store import Store
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer
from codeevolver.types import UsageRecord

REAL_KEY = "sk-real-openai-compatible-key-0123456789"
SERVED = "served-model"
PRICES = Prices(input=Decimal(1000), output=Decimal(2000))
BASH = {
    "name": "Bash",
    "description": "Run a shell command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
    "cache_control": {"type": "ephemeral"},
}


# -- upstreams -----------------------------------------------------------------------------


def scripted(body: dict[str, Any]) -> Reply:
    """Text unless tools are offered; after a tool result, text that quotes it."""
    last = body["messages"][-1]
    if any(m["role"] == "tool" for m in body["messages"]):
        return Reply(content="the listing has a.txt", prompt_tokens=50, completion_tokens=6)
    if "fail" in str(last.get("content")):
        text = str(last["content"])
        return Reply(status=int(text.split()[-1]), error_message=f"upstream says no ({text})")
    if body.get("tools"):
        return Reply(tool_calls=[("Bash", {"command": "ls"})], prompt_tokens=30, completion_tokens=12)
    return Reply(content="hello from the open model", prompt_tokens=11, completion_tokens=7)


@pytest.fixture(scope="module")
def openai_server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(scripted, api_key=REAL_KEY) as server:
        yield server


@dataclass
class Answer:
    """What the raw upstream sends: a status, a content type and body pieces (each its own HTTP chunk)."""

    pieces: list[bytes]
    content_type: str = "text/event-stream"
    status: int = 200
    complete: bool = True
    """False: stop mid-body and close, as a crashed server would."""


@dataclass
class RawUpstream:
    """An OpenAI-compatible endpoint that sends exactly the bytes a test gives it, chunked."""

    answer: Callable[[dict[str, Any]], Answer]
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                upstream.requests.append(body)
                upstream.headers.append(dict(self.headers.items()))
                answer = upstream.answer(body)
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for piece in answer.pieces:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                if answer.complete:
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.close_connection = True

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def sse(*chunks: dict[str, Any] | str) -> list[bytes]:
    return [f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks]


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": SERVED}
    if usage is not None:
        return base | {"choices": [], "usage": usage}
    return base | {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}


def tool_delta(index: int, arguments: str, *, name: str | None = None, call_id: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    call: dict[str, Any] = {"index": index, "function": function}
    if name is not None:
        function["name"], call["id"], call["type"] = name, call_id, "function"
    return {"tool_calls": [call]}


# -- gateway, sessions, client -------------------------------------------------------------


@dataclass
class Ledger:
    store: Store
    records: list[UsageRecord] = field(default_factory=list)
    over: str | None = None

    def __call__(self, record: UsageRecord) -> None:
        self.records.append(record)
        self.store.add_usage(record)

    def budget(self, run_id: str) -> str | None:
        return self.over


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return Ledger(store)


@pytest.fixture
def gateway(store: Store, ledger: Ledger) -> Iterator[EgressGateway]:
    with EgressGateway(ledger=ledger, audit=store.add_audit, budget_exceeded=ledger.budget) as gw:
        yield gw


def translating(url: str, key: str = REAL_KEY) -> LLMUpstream:
    return LLMUpstream(url, key, "anthropic", prices=PRICES, upstream_protocol="openai", model=SERVED)


def open_session(gateway: EgressGateway, run_id: str, upstream: LLMUpstream) -> GatewaySession:
    return gateway.open_session("sbx-claude", run_id=run_id, purpose="agent", llm_routes={"anthropic": upstream})


def client(session: GatewaySession) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(session.socket_path)), timeout=30)


def messages(
    session: GatewaySession,
    *,
    stream: bool,
    key: str | None = None,
    path: str = "/v1/messages?beta=true",
    http: httpx.Client | None = None,
    **body: Any,
) -> httpx.Response:
    """One request the way the Claude Code CLI sends it (betas, thinking, metadata and all)."""
    payload = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "stream": stream,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be brief."},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}
        ],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "user_abc_session_1"},
        "output_config": {"effort": "high"},
        **body,
    }  # fmt: skip
    headers = {
        "x-api-key": key or session.placeholder_key,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    }
    if http is not None:  # a kept-alive connection
        return http.post(session.env["ANTHROPIC_BASE_URL"] + path, json=payload, headers=headers)
    with client(session) as own:
        return own.post(session.env["ANTHROPIC_BASE_URL"] + path, json=payload, headers=headers)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The SSE events of a response; each ``event:`` name must match its data's ``type``."""
    out = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.strip().splitlines() if ": " in line)
        if "data" in lines:
            data = json.loads(lines["data"])
            assert lines.get("event") == data["type"]
            out.append(data)
    return out


def assemble(evs: list[dict[str, Any]]) -> dict[str, Any]:
    """The message a client SDK builds from the events (text and tool inputs joined, JSON parsed)."""
    assert evs[0]["type"] == "message_start" and evs[-1]["type"] == "message_stop"
    message = dict(evs[0]["message"], content=[])
    partial: dict[int, str] = {}
    for ev in evs[1:-1]:
        if ev["type"] == "content_block_start":
            assert ev["index"] == len(message["content"])
            message["content"].append(dict(ev["content_block"]))
        elif ev["type"] == "content_block_delta":
            block, delta = message["content"][ev["index"]], ev["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                assert delta["type"] == "input_json_delta"
                partial[ev["index"]] = partial.get(ev["index"], "") + delta["partial_json"]
        elif ev["type"] == "content_block_stop":
            if ev["index"] in partial:
                message["content"][ev["index"]]["input"] = json.loads(partial[ev["index"]])
        elif ev["type"] == "message_delta":
            message.update(ev["delta"])
            message["usage"] = {**message["usage"], **ev["usage"]}
    return message


# -- tests ---------------------------------------------------------------------------------


def test_non_streaming_text_is_translated_both_ways_and_metered(
    gateway: EgressGateway, openai_server: ScriptedOpenAIServer, ledger: Ledger, run_id: str, store: Store
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url))
    before = len(openai_server.requests)
    response = messages(session, stream=False, temperature=0.5, stop_sequences=["END"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "hello from the open model"}]
    assert body["stop_reason"] == "end_turn" and body["model"] == "claude-sonnet-4-5"
    assert body["usage"]["input_tokens"] == 11 and body["usage"]["output_tokens"] == 7

    sent, headers = openai_server.requests[before], openai_server.headers[before]
    assert sent["model"] == SERVED  # the operator's model, not the CLI's claude name
    assert sent["messages"] == [
        {"role": "system", "content": "You are Claude Code.\n\nBe brief."},
        {"role": "user", "content": "hi"},
    ]
    assert (sent["max_tokens"], sent["temperature"], sent["stop"], sent["stream"]) == (32000, 0.5, ["END"], False)
    assert not {"thinking", "metadata", "output_config", "user", "reasoning_effort"} & set(sent)
    assert headers["Authorization"] == f"Bearer {REAL_KEY}"  # the real key, swapped in
    assert not {"x-api-key", "anthropic-beta", "anthropic-version"} & {k.lower() for k in headers}
    assert REAL_KEY not in response.text

    assert gateway.flush()
    [record] = ledger.records
    assert (record.model, record.purpose, record.input_tokens, record.output_tokens) == (SERVED, "agent", 11, 7)
    assert record.cost_usd == (11 * 1000 + 7 * 2000) / Decimal(1_000_000)
    [row] = store.audit(run_id)
    assert (row.decision, row.status, row.path) == ("allowed", 200, "/anthropic/v1/messages?beta=true")
    assert "in=11" in row.reason and "out=7" in row.reason


def test_streaming_text_becomes_anthropic_events(
    gateway: EgressGateway, openai_server: ScriptedOpenAIServer, ledger: Ledger, run_id: str
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url))
    response = messages(session, stream=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    evs = events(response)
    assert [e["type"] for e in evs] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop",
    ]  # fmt: skip
    message = assemble(evs)
    assert message["content"] == [{"type": "text", "text": "hello from the open model"}]
    assert message["stop_reason"] == "end_turn" and message["usage"]["output_tokens"] == 7
    assert message["model"] == "claude-sonnet-4-5"
    sent = openai_server.requests[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert gateway.flush()
    [record] = ledger.records
    assert (record.model, record.input_tokens, record.output_tokens) == (SERVED, 11, 7)


def test_streamed_tool_call_arguments_in_pieces_become_input_json_deltas(
    gateway: EgressGateway, ledger: Ledger, run_id: str
) -> None:
    line = sse(chunk({"role": "assistant", "content": "Let me look."}))[0]
    pieces = [
        line[:20], line[20:],  # one SSE line split across two HTTP chunks
        *sse(
            chunk(tool_delta(0, "", name="Bash", call_id="call_a")),
            chunk(tool_delta(0, '{"comm')),
            chunk(tool_delta(0, 'and": "ls -')),
            chunk(tool_delta(0, 'la"}')),
            chunk(tool_delta(1, '{"file_path": "a.txt"}', name="Read", call_id="call_b")),
            chunk(finish="tool_calls"),
            chunk(usage={"prompt_tokens": 100, "completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 40}}),
            "[DONE]",
        ),
    ]  # fmt: skip
    upstream = RawUpstream(lambda body: Answer(pieces))
    try:
        session = open_session(gateway, run_id, translating(upstream.url))
        response = messages(session, stream=True, tools=[BASH, {**BASH, "name": "Read"}])
    finally:
        upstream.stop()
    assert response.status_code == 200, response.text
    evs = events(response)
    json_deltas = [e["delta"]["partial_json"] for e in evs if e["type"] == "content_block_delta" and e["index"] == 1]
    assert len(json_deltas) >= 3  # streamed on as they came, not buffered into one
    message = assemble(evs)
    assert message["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_a", "name": "Bash", "input": {"command": "ls -la"}},
        {"type": "tool_use", "id": "call_b", "name": "Read", "input": {"file_path": "a.txt"}},
    ]
    assert message["stop_reason"] == "tool_use" and message["usage"]["output_tokens"] == 9
    sent = upstream.requests[0]
    assert [t["function"]["name"] for t in sent["tools"]] == ["Bash", "Read"]
    assert sent["tools"][0] == {
        "type": "function",
        "function": {"name": "Bash", "description": "Run a shell command", "parameters": BASH["input_schema"]},
    }  # cache_control gone
    assert gateway.flush()
    [record] = ledger.records  # the endpoint's own counts: OpenAI's prompt tokens include cached ones
    assert (record.input_tokens, record.cached_tokens, record.output_tokens) == (60, 40, 9)


def test_a_tool_result_turn_is_sent_back_as_tool_messages(
    gateway: EgressGateway, openai_server: ScriptedOpenAIServer, run_id: str
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url))
    first = messages(session, stream=False, tools=[BASH], tool_choice={"type": "any"})
    assert first.status_code == 200, first.text
    [tool_use] = first.json()["content"]
    assert tool_use["type"] == "tool_use" and tool_use["input"] == {"command": "ls"}
    assert first.json()["stop_reason"] == "tool_use"
    assert openai_server.requests[-1]["tool_choice"] == "required"

    turn = [
        {"role": "user", "content": "list the files"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should run ls.", "signature": "sig"},
            {"type": "text", "text": "Running ls."},
            tool_use,
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_use["id"], "content": [{"type": "text", "text": "a.txt"}]},
            {"type": "text", "text": "and now?"},
        ]},
    ]  # fmt: skip
    second = messages(session, stream=True, tools=[BASH], tool_choice={"type": "tool", "name": "Bash"}, messages=turn)
    assert second.status_code == 200, second.text
    assert assemble(events(second))["content"] == [{"type": "text", "text": "the listing has a.txt"}]
    sent = openai_server.requests[-1]
    assert sent["messages"][1:] == [
        {"role": "user", "content": "list the files"},
        {"role": "assistant", "content": "Running ls.", "tool_calls": [
            {"id": tool_use["id"], "type": "function", "function": {"name": "Bash", "arguments": '{"command": "ls"}'}}
        ]},
        {"role": "tool", "tool_call_id": tool_use["id"], "content": "a.txt"},
        {"role": "user", "content": "and now?"},
    ]  # fmt: skip
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Bash"}}


def test_images_reach_the_upstream_as_data_urls(gateway: EgressGateway, run_id: str) -> None:
    upstream = RawUpstream(lambda body: Answer(sse(chunk({"content": "a cat"}), chunk(finish="stop"))))
    try:
        session = open_session(gateway, run_id, translating(upstream.url))
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
        content = [{"type": "text", "text": "what is this?"}, image]
        response = messages(session, stream=True, messages=[{"role": "user", "content": content}])
    finally:
        upstream.stop()
    assert assemble(events(response))["content"] == [{"type": "text", "text": "a cat"}]
    assert upstream.requests[0]["messages"][-1]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]


def test_length_finish_is_max_tokens_and_a_json_answer_to_a_stream_is_streamed_on_one_connection(
    gateway: EgressGateway, run_id: str
) -> None:
    completion = {
        "id": "chatcmpl-json", "object": "chat.completion", "created": 1, "model": SERVED,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "cut sh"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }  # fmt: skip
    upstream = RawUpstream(lambda body: Answer([json.dumps(completion).encode()], "application/json"))
    try:
        session = open_session(gateway, run_id, translating(upstream.url))
        with client(session) as http:  # one connection: each answer's framing must be right for the next
            plain = messages(session, stream=False, http=http)
            streamed = messages(session, stream=True, http=http)  # this server ignores ``stream``
            again = messages(session, stream=False, http=http)
    finally:
        upstream.stop()
    assert again.json() == plain.json() | {"id": again.json()["id"]}
    assert plain.json()["stop_reason"] == "max_tokens" and plain.json()["content"] == [
        {"type": "text", "text": "cut sh"}
    ]
    message = assemble(events(streamed))
    assert message["stop_reason"] == "max_tokens" and message["content"] == [{"type": "text", "text": "cut sh"}]


def test_the_placeholder_key_is_required(
    gateway: EgressGateway, openai_server: ScriptedOpenAIServer, run_id: str
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url))
    before = len(openai_server.requests)
    response = messages(session, stream=True, key="sk-ant-guessed-key")
    assert response.status_code == 401
    assert response.json()["type"] == "error" and "placeholder" in response.json()["error"]["message"]
    assert len(openai_server.requests) == before  # never forwarded


@pytest.mark.parametrize(
    ("upstream_status", "status", "kind"),
    [(400, 400, "invalid_request_error"), (422, 400, "invalid_request_error"), (429, 429, "rate_limit_error"),
     (500, 500, "api_error"), (503, 503, "api_error")],
)  # fmt: skip
def test_upstream_errors_become_anthropic_errors(
    gateway: EgressGateway,
    openai_server: ScriptedOpenAIServer,
    ledger: Ledger,
    run_id: str,
    upstream_status: int,
    status: int,
    kind: str,
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url))
    turn = [{"role": "user", "content": f"fail {upstream_status}"}]
    response = messages(session, stream=True, messages=turn)
    assert response.status_code == status
    assert response.json() == {
        "type": "error",
        "error": {"type": kind, "message": f"upstream says no (fail {upstream_status})"},
    }
    assert gateway.flush() and ledger.records == []


def test_a_wrong_real_key_is_reported_as_the_gateways(
    gateway: EgressGateway, openai_server: ScriptedOpenAIServer, run_id: str
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url, key="sk-stale-operator-key-000000"))
    response = messages(session, stream=False)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and "refused the gateway's credentials" in error["message"]


def test_a_stream_cut_mid_answer_ends_with_an_error_event(gateway: EgressGateway, run_id: str, store: Store) -> None:
    upstream = RawUpstream(lambda body: Answer(sse(chunk({"content": "partial"})), complete=False))
    try:
        session = open_session(gateway, run_id, translating(upstream.url))
        response = messages(session, stream=True)
    finally:
        upstream.stop()
    assert response.status_code == 200
    evs = events(response)
    assert [e["type"] for e in evs][-3:] == ["content_block_start", "content_block_delta", "error"]
    assert evs[-2]["delta"]["text"] == "partial"
    assert evs[-1]["error"]["type"] == "api_error" and "broke off" in evs[-1]["error"]["message"]
    [row] = store.audit(run_id) if gateway.flush() else []
    assert row.decision == "allowed" and "interrupted" in row.reason


def test_count_tokens_is_estimated_by_the_gateway(
    gateway: EgressGateway, openai_server: ScriptedOpenAIServer, ledger: Ledger, run_id: str, store: Store
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url))
    before = len(openai_server.requests)
    response = messages(session, stream=False, path="/v1/messages/count_tokens?beta=true", tools=[BASH])
    assert response.status_code == 200
    assert 20 < response.json()["input_tokens"] < 200
    assert len(openai_server.requests) == before
    assert gateway.flush() and ledger.records == []
    [row] = store.audit(run_id)
    assert row.decision == "allowed" and "count_tokens" in row.reason
    with client(session) as http:
        other = http.get(
            session.env["ANTHROPIC_BASE_URL"] + "/v1/models", headers={"x-api-key": session.placeholder_key}
        )
    assert other.status_code == 404 and other.json()["type"] == "error"


def test_a_spent_budget_is_refused_before_translation(
    gateway: EgressGateway, openai_server: ScriptedOpenAIServer, ledger: Ledger, run_id: str
) -> None:
    session = open_session(gateway, run_id, translating(openai_server.url))
    ledger.over = "spent $5 of $5"
    before = len(openai_server.requests)
    response = messages(session, stream=True)
    assert response.status_code == 402 and "spent $5 of $5" in response.json()["error"]["message"]
    assert len(openai_server.requests) == before


def test_only_anthropic_clients_onto_openai_upstreams_are_translated() -> None:
    assert translating("http://127.0.0.1:1/v1").translates
    assert not LLMUpstream("https://api.anthropic.com", "k", "anthropic").translates
    with pytest.raises(ConfigError):
        LLMUpstream("https://api.anthropic.com", "k", "openai", upstream_protocol="anthropic")


def test_run_routes_translate_for_an_openai_compatible_agent_model() -> None:
    from codeevolver.egress import llm_routes

    local = ModelSpec("openai/smollm2", api_base="http://127.0.0.1:8080/v1", api_key="local",
                      input_usd_per_m=Decimal(0), output_usd_per_m=Decimal(0))  # fmt: skip
    routes = llm_routes(ModelPlan(task=local, reflection=local, agent=local, embedded=True), {})
    route = routes["anthropic"]
    assert route.translates and route.base_url == local.api_base and route.model == "smollm2"
    assert route.api_key == "local" and route.prices == Prices(Decimal(0), Decimal(0))
    assert not routes["openai"].translates

    hosted = ModelSpec("openai/gpt-4.1-mini")
    route = llm_routes(ModelPlan(task=hosted, reflection=hosted, agent=hosted), {"OPENAI_API_KEY": "sk-o"})["anthropic"]
    assert route.translates and route.model == "gpt-4.1-mini" and route.api_key == "sk-o"

    with_claude = llm_routes(ModelPlan(task=local, reflection=local, agent=local), {"ANTHROPIC_API_KEY": "sk-a"})
    assert not with_claude["anthropic"].translates  # a real Anthropic key: passed through, unchanged

    claude = ModelSpec("anthropic/claude-sonnet-4-5")
    assert "anthropic" not in llm_routes(ModelPlan(task=claude, reflection=claude, agent=claude), {})


def test_the_anthropic_key_route_bills_at_the_configured_model_prices(
    gateway: EgressGateway, ledger: Ledger, run_id: str
) -> None:
    from codeevolver.egress import llm_routes
    from codeevolver.models.resolve import plan_models, with_prices
    from codeevolver.testing.fake_anthropic import AnthropicReply, ScriptedAnthropicServer

    def reply(body: dict[str, Any]) -> AnthropicReply:
        return AnthropicReply(text="ok", input_tokens=1000, output_tokens=500)

    with ScriptedAnthropicServer(reply, api_key="sk-ant") as server:
        env = {"ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_BASE_URL": server.url}
        plan = plan_models(model="anthropic/house-claude", reflection_model=None, agent_model=None, api_base=None,
                           env=env)  # fmt: skip
        assert plan is not None
        routes = llm_routes(with_prices(plan, {"house-claude": (Decimal(2), Decimal(8))}), env)
        assert routes["anthropic"].prices == Prices(Decimal(2), Decimal(8))
        session = gateway.open_session("sbx", run_id=run_id, purpose="agent", llm_routes=routes)
        assert messages(session, stream=False, model="house-claude").status_code == 200
        assert gateway.flush()
    (record,) = ledger.records
    assert record.cost_usd == (Decimal(2) * 1000 + Decimal(8) * 500) / 10**6
