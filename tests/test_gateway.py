"""The egress gateway from the host side: real sockets, real upstream servers, the real store.

Each test talks to a session's unix socket directly (what a sandbox's bridge
would carry). Names resolve through a static resolver; the local upstreams'
exact ``(127.0.0.1, port)`` pairs are the only private targets let through
(``trusted_targets``), so every other loopback or private answer is refused
exactly as a real one would be.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from codeevolver.errors import ConfigError, RunNotFound
from codeevolver.gateway import (
    PACKAGE_INDEX_HOSTS,
    Allowlist,
    EgressGateway,
    GatewaySession,
    LLMUpstream,
    Prices,
    static_resolver,
)
from codeevolver.gateway.forward import Redactor
from codeevolver.gateway.policy import address_refusal, is_ip_literal
from codeevolver.gateway.testing import EchoUpstream
from codeevolver.gateway.tls import parse_sni
from codeevolver.gateway.usage import UsageMeter
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.store import AuditRow, Store
from codeevolver.testing.fake_anthropic import AnthropicReply, ScriptedAnthropicServer
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer

OPENAI_KEY = "sk-real-openai-key-0123456789"
ANTHROPIC_KEY = "sk-ant-real-key-9876543210"
GITHUB_TOKEN = "ghp_realsecrettoken1234567890"
PRICES = Prices(input=Decimal(1000), output=Decimal(2000))  # $ per million tokens: big, to reach budgets fast


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream(tls_hosts=["secret.test", "allowed.test", "other.test"]) as up:
        yield up


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def openai_server() -> Iterator[ScriptedOpenAIServer]:
    def answer(body: dict[str, Any]) -> Reply:
        return Reply(content="hello from openai", prompt_tokens=11, completion_tokens=7)

    with ScriptedOpenAIServer(answer, api_key=OPENAI_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[ScriptedAnthropicServer]:
    def answer(body: dict[str, Any]) -> AnthropicReply:
        if body.get("metadata", {}).get("slow"):
            return AnthropicReply(text="one two three", input_tokens=5, output_tokens=3, chunk_delay_s=0.2)
        return AnthropicReply(
            text="hello from claude",
            tool_uses=[("Bash", {"command": "ls -la"})],
            input_tokens=13,
            output_tokens=21,
            cache_read_input_tokens=100,
            cache_creation_input_tokens=40,
        )

    with ScriptedAnthropicServer(answer, api_key=ANTHROPIC_KEY) as server:
        yield server


class Budget:
    """A USD budget over the store's ledger, as the engine would wire it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.limit: Decimal | None = None

    def __call__(self, run_id: str) -> str | None:
        spent = self.store.usage_totals(run_id).cost_usd
        if self.limit is not None and spent >= self.limit:
            return f"spent ${spent} of ${self.limit}"
        return None


@pytest.fixture
def budget(store: Store) -> Budget:
    return Budget(store)


@pytest.fixture
def gateway(
    store: Store, budget: Budget, https_upstream: EchoUpstream, http_upstream: EchoUpstream, tmp_path: Path
) -> Iterator[EgressGateway]:
    names = {
        "secret.test": ["127.0.0.1"],
        "allowed.test": ["127.0.0.1"],
        "other.test": ["127.0.0.1"],
        "plain.test": ["127.0.0.1"],
        "loop.test": ["127.0.0.1"],
        "meta.test": ["169.254.169.254"],
        "meta6.test": ["fd00:ec2::254"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "mixed.test": ["93.184.216.34", "10.0.0.7"],
        "private.test": ["192.168.1.10"],
    }
    gw = EgressGateway(
        ledger=store.add_usage,
        audit=store.add_audit,
        budget_exceeded=budget,
        resolver=static_resolver(names),
        upstream_ca_file=https_upstream.ca_file,
        trusted_targets=[("127.0.0.1", https_upstream.port), ("127.0.0.1", http_upstream.port)],
    )
    with gw:
        yield gw


def open_default(
    gateway: EgressGateway,
    run_id: str,
    https_upstream: EchoUpstream,
    http_upstream: EchoUpstream,
    **kwargs: Any,
) -> GatewaySession:
    allow = [
        f"allowed.test:{https_upstream.port}",
        f"other.test:{https_upstream.port}",
        f"secret.test:{https_upstream.port}",
        f"plain.test:{http_upstream.port}",
        "loop.test",
        f"loop.test:{https_upstream.port + 1}",
        "meta.test",
        "meta6.test",
        "mapped.test",
        "mixed.test",
        "*.private.test",
        "private.test",
    ]
    return gateway.open_session("sbx-1", run_id=run_id, candidate_id="c1", allow=allow, **kwargs)


@pytest.fixture
def session(
    gateway: EgressGateway, run_id: str, https_upstream: EchoUpstream, http_upstream: EchoUpstream
) -> GatewaySession:
    return open_default(
        gateway,
        run_id,
        https_upstream,
        http_upstream,
        secrets={"secret.test": {"Authorization": f"token {GITHUB_TOKEN}"}},
    )


def audit_rows(gateway: EgressGateway, store: Store, run_id: str, at_least: int = 0) -> list[AuditRow]:
    """The run's audit log once written; ``at_least`` waits for tunnels, logged when they close."""
    deadline = time.monotonic() + 10
    while True:
        assert gateway.flush()
        rows = store.audit(run_id)
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


# -- raw client helpers --------------------------------------------------------------------


def uds(session: GatewaySession) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(session.socket_path))
    return sock


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def connect(session: GatewaySession, target: str) -> tuple[int, socket.socket, bytes]:
    """CONNECT through the session; (status, socket, the raw answer head and any body)."""
    sock = uds(session)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = read_head(sock)
    status = int(head.split(b" ", 2)[1]) if head else 0
    if status != 200:
        head += _read_rest(sock)
    return status, sock, head


def _read_rest(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def request(sock: Any, raw: bytes, method: str = "GET") -> HTTPResponse:
    sock.sendall(raw)
    response = HTTPResponse(sock, method=method)
    response.begin()
    return response


def tls_client(sock: socket.socket, server_hostname: str, cafile: Path | str | None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    return ctx.wrap_socket(sock, server_hostname=server_hostname)


def llm_client(session: GatewaySession) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(session.socket_path)), timeout=30)


# -- policy units --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "169.254.1.1",
        "100.100.100.200", "100.64.0.1", "168.63.129.16", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1",
        "::1", "::", "fe80::1", "fd00:ec2::254", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "2002:a00:1::1",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d822::1"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "[::1]", "::1", "2130706433", "0x7f000001", "127.1", "0177.0.0.1", "10.0.0.1.", "1.2.3.04"]
)
def test_ip_literals_in_every_spelling_are_recognised(host: str) -> None:
    assert is_ip_literal(host)


def test_allowlist_matches_exact_suffix_and_port() -> None:
    allow = Allowlist(["api.github.com", "*.example.com", "example.com:8443"])
    assert allow.allows("api.github.com", 443)
    assert not allow.allows("api.github.com", 80)
    assert not allow.allows("github.com", 443)
    assert not allow.allows("evilapi.github.com", 443)
    assert allow.allows("a.example.com", 443) and allow.allows("a.b.example.com", 443)
    assert not allow.allows("example.com", 443)  # *.suffix means subdomains only
    assert not allow.allows("badexample.com", 443)
    assert allow.allows("example.com", 8443) and not allow.allows("a.example.com", 8443)
    for bad in ["10.0.0.1", "*", "exa mple.com", "host:99999", "[::1]"]:
        with pytest.raises(ConfigError):
            Allowlist([bad])
    assert PACKAGE_INDEX_HOSTS == ("pypi.org", "files.pythonhosted.org")
    assert Allowlist(PACKAGE_INDEX_HOSTS).allows("files.pythonhosted.org", 443)


def test_sni_is_read_from_a_real_client_hello() -> None:
    for name in ("api.github.com", None):
        ctx = ssl.create_default_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
        if name is None:
            ctx.check_hostname = False
            tls = ctx.wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        record = outgoing.read()
        assert record[0] == 0x16
        assert parse_sni(record[5 + 4 :]) == name


def test_redactor_masks_secrets_split_across_chunks() -> None:
    secret = b"ghp_realsecrettoken1234567890"
    data = b"a" * 50 + secret + b"b" * 10 + secret
    for size in (1, 3, 7, 29, 1000):
        redactor = Redactor([secret])
        out = b"".join(redactor.feed(data[i : i + size]) for i in range(0, len(data), size)) + redactor.end()
        assert len(out) == len(data)
        assert secret not in out and out.count(b"*" * len(secret)) == 2


def test_usage_meter_reads_every_dialect_byte_by_byte() -> None:
    def feed(meter: UsageMeter, data: bytes) -> UsageMeter:
        for i in range(len(data)):
            assert meter.feed(data[i : i + 1]) == data[i : i + 1]
        meter.end()
        return meter

    openai_json = json.dumps(
        {"id": "chatcmpl-1", "model": "gpt-x", "usage": {"prompt_tokens": 30, "completion_tokens": 5,
         "prompt_tokens_details": {"cached_tokens": 12}}}
    ).encode()  # fmt: skip
    m = feed(UsageMeter("openai"), openai_json)
    assert (m.tokens().uncached_input, m.tokens().cache_read, m.tokens().output) == (18, 12, 5)
    assert (m.request_id, m.model) == ("chatcmpl-1", "gpt-x")

    responses_sse = (
        b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1"}}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1","model":"o4",'
        b'"usage":{"input_tokens":40,"input_tokens_details":{"cached_tokens":10},"output_tokens":9}}}\n\n'
    )
    m = feed(UsageMeter("openai"), responses_sse)
    assert (m.tokens().uncached_input, m.tokens().cache_read, m.tokens().output, m.request_id) == (30, 10, 9, "resp_1")

    anthropic_sse = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","model":"claude-x",'
        b'"usage":{"input_tokens":7,"cache_read_input_tokens":50,"cache_creation_input_tokens":20,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{},"usage":{"output_tokens":33}}\n\n'
    )
    m = feed(UsageMeter("anthropic"), anthropic_sse)
    t = m.tokens()
    assert (t.uncached_input, t.cache_read, t.cache_write, t.output, m.request_id) == (7, 50, 20, 33, "msg_1")


# -- sessions ------------------------------------------------------------------------------


def test_session_files_env_and_ca(gateway: EgressGateway, session: GatewaySession, tmp_path: Path) -> None:
    directory = session.socket_path.parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(gateway.directory.stat().st_mode) == 0o700  # type: ignore[union-attr]
    assert stat.S_ISSOCK(session.socket_path.stat().st_mode)
    env = session.env
    assert "OPENAI_API_KEY" not in env  # no LLM route in this session, so no placeholder either
    assert env["HTTPS_PROXY"] == f"http://127.0.0.1:{session.proxy_port}" and session.proxy_port == 3128
    assert session.ca_bundle_path is not None and session.readonly_paths == (session.ca_bundle_path,)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT"):
        assert env[var] == str(session.ca_bundle_path)
    pems = session.ca_bundle_path.read_bytes().split(b"-----BEGIN CERTIFICATE-----")
    assert len(pems) > 2  # the system CAs and the session's
    ca = x509.load_pem_x509_certificate(b"-----BEGIN CERTIFICATE-----" + pems[-1])
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical and [n.value for n in constraints.value.permitted_subtrees] == ["secret.test"]
    for path in gateway.directory.rglob("*"):  # type: ignore[union-attr]
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    assert GITHUB_TOKEN not in json.dumps(env)
    policy = session.apply(SandboxPolicy(workdir=tmp_path, env={"PATH": "/usr/bin"}))
    assert policy.gateway_socket == session.socket_path and policy.env["PATH"] == "/usr/bin"
    assert session.ca_bundle_path in policy.readonly_paths


def test_sessions_without_secrets_get_no_ca(
    gateway: EgressGateway, run_id: str, https_upstream: EchoUpstream, http_upstream: EchoUpstream
) -> None:
    s = open_default(gateway, run_id, https_upstream, http_upstream, proxy_port=8123)
    assert s.ca_bundle_path is None and "SSL_CERT_FILE" not in s.env
    assert s.env["HTTP_PROXY"] == "http://127.0.0.1:8123"


def test_close_session_removes_the_socket(gateway: EgressGateway, session: GatewaySession) -> None:
    sock = uds(session)
    gateway.close_session(session)
    assert not session.socket_path.exists()
    assert sock.recv(10) == b""  # open connections are ended too
    with pytest.raises(OSError):
        uds(session)


# -- CONNECT: what is refused --------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("example.org:443", "not in this sandbox's allowlist"),
        ("93.184.216.34:443", "raw IP address"),
        ("[::1]:443", "raw IP address"),
        ("2130706433:443", "raw IP address"),
        ("127.1:443", "raw IP address"),
        ("allowed.test:443", "not in this sandbox's allowlist"),  # allowlisted on another port only
        ("allowed.test:22", "not in this sandbox's allowlist"),
        ("loop.test:443", "loopback address 127.0.0.1"),
        ("meta.test:443", "cloud metadata address 169.254.169.254"),
        ("meta6.test:443", "cloud metadata address fd00:ec2::254"),
        ("mapped.test:443", "loopback address 127.0.0.1"),
        ("mixed.test:443", "private address 10.0.0.7"),
        ("a.private.test:443", "cannot resolve"),
        ("private.test:443", "private address 192.168.1.10"),
        ("bad_host!:443", "not a valid host name"),
    ],
)
def test_connect_refusals_are_answered_and_audited(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, target: str, reason: str
) -> None:
    status, _sock, answer = connect(session, target)
    assert status in (400, 403, 502), answer
    assert reason in answer.decode()
    rows = audit_rows(gateway, store, run_id)
    assert len(rows) == 1
    row = rows[0]
    assert (row.decision, row.method, row.status, row.sandbox_id, row.candidate_id) == (
        "blocked", "CONNECT", status, "sbx-1", "c1",
    )  # fmt: skip
    assert reason in row.reason


def test_loopback_on_an_allowlisted_port_is_refused_even_next_to_a_trusted_target(
    gateway: EgressGateway, session: GatewaySession, https_upstream: EchoUpstream
) -> None:
    status, _, answer = connect(session, f"loop.test:{https_upstream.port + 1}")
    assert status == 403 and b"loopback" in answer


def test_tunnel_to_an_allowlisted_host_is_opaque(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, https_upstream: EchoUpstream
) -> None:
    status, sock, _ = connect(session, f"allowed.test:{https_upstream.port}")
    assert status == 200
    tls = tls_client(sock, "allowed.test", https_upstream.ca_file)  # the upstream's own certificate: no interception
    response = request(tls, f"GET /hello HTTP/1.1\r\nHost: allowed.test:{https_upstream.port}\r\n\r\n".encode())
    seen = json.loads(response.read())
    assert response.status == 200 and seen["path"] == "/hello"
    assert "Authorization" not in seen["headers"]  # the secret belongs to secret.test only
    tls.close()
    rows = audit_rows(gateway, store, run_id, at_least=1)
    assert [(r.decision, r.host, r.port, r.status) for r in rows] == [
        ("allowed", "allowed.test", https_upstream.port, 200)
    ]
    assert rows[0].bytes_up > 200 and rows[0].bytes_down > 200


@pytest.mark.parametrize("sni", ["other.test", "evil.example", None])
def test_domain_fronting_by_sni_is_refused(
    gateway: EgressGateway,
    session: GatewaySession,
    store: Store,
    run_id: str,
    https_upstream: EchoUpstream,
    sni: str | None,
) -> None:
    status, sock, _ = connect(session, f"allowed.test:{https_upstream.port}")
    assert status == 200
    ctx = ssl.create_default_context(cafile=str(https_upstream.ca_file))
    if sni is None:
        ctx.check_hostname = False
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(sock, server_hostname=sni)
    rows = audit_rows(gateway, store, run_id)
    assert len(rows) == 1 and rows[0].decision == "blocked" and "domain fronting refused" in rows[0].reason
    assert https_upstream.requests == [] or all(r["path"] != "/fronted" for r in https_upstream.requests)


def test_non_tls_bytes_through_a_tunnel_are_refused(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, https_upstream: EchoUpstream
) -> None:
    status, sock, _ = connect(session, f"allowed.test:{https_upstream.port}")
    assert status == 200
    sock.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert _read_rest(sock) == b""
    (row,) = audit_rows(gateway, store, run_id)
    assert row.decision == "blocked" and "only TLS may cross a tunnel" in row.reason


# -- TLS interception for secrets ----------------------------------------------------------


def test_secret_is_injected_for_its_own_host_and_masked_in_replies(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, https_upstream: EchoUpstream
) -> None:
    before = len(https_upstream.requests)
    status, sock, _ = connect(session, f"secret.test:{https_upstream.port}")
    assert status == 200
    tls = tls_client(sock, "secret.test", session.ca_bundle_path)  # trusts the session CA only
    host = f"secret.test:{https_upstream.port}"
    for i in range(2):  # keep-alive inside the tunnel
        body = b'{"n": %d}' % i
        raw = (
            f"POST /repos/{i} HTTP/1.1\r\nHost: {host}\r\nAuthorization: token sandbox-guess\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        response = request(tls, raw, "POST")
        text = response.read()
        assert response.status == 200
        assert GITHUB_TOKEN.encode() not in text  # the echo of the header came back masked
        assert b"*" * len(GITHUB_TOKEN) in text
    seen = https_upstream.requests[before:]
    assert [s["path"] for s in seen] == ["/repos/0", "/repos/1"]
    assert all(s["headers"]["Authorization"] == f"token {GITHUB_TOKEN}" for s in seen)
    assert seen[1]["body"] == '{"n": 1}'
    tls.close()
    rows = audit_rows(gateway, store, run_id)
    assert [(r.decision, r.method, r.path, r.status) for r in rows] == [
        ("allowed", "POST", "/repos/0", 200),
        ("allowed", "POST", "/repos/1", 200),
    ]
    assert "injected Authorization" in rows[0].reason


def test_chunked_upload_through_interception(
    gateway: EgressGateway, session: GatewaySession, https_upstream: EchoUpstream
) -> None:
    _status, sock, _ = connect(session, f"secret.test:{https_upstream.port}")
    tls = tls_client(sock, "secret.test", session.ca_bundle_path)
    raw = (
        f"PUT /upload HTTP/1.1\r\nHost: secret.test:{https_upstream.port}\r\nTransfer-Encoding: chunked\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    tls.sendall(raw)
    assert read_head(tls).startswith(b"HTTP/1.1 100")  # type: ignore[arg-type]
    response = request(tls, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", "PUT")
    assert json.loads(response.read())["body"] == "hello world"


def test_host_header_fronting_inside_an_intercepted_tunnel_is_refused(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, https_upstream: EchoUpstream
) -> None:
    before = len(https_upstream.requests)
    _status, sock, _ = connect(session, f"secret.test:{https_upstream.port}")
    tls = tls_client(sock, "secret.test", session.ca_bundle_path)
    response = request(tls, f"GET /x HTTP/1.1\r\nHost: other.test:{https_upstream.port}\r\n\r\n".encode())
    assert response.status == 421
    assert len(https_upstream.requests) == before  # nothing reached the upstream, least of all the secret
    (row,) = audit_rows(gateway, store, run_id)
    assert row.decision == "blocked" and "domain fronting refused" in row.reason


def test_secret_never_goes_to_another_host(
    gateway: EgressGateway, session: GatewaySession, https_upstream: EchoUpstream, http_upstream: EchoUpstream
) -> None:
    before_tls, before_plain = len(https_upstream.requests), len(http_upstream.requests)
    _status, sock, _ = connect(session, f"other.test:{https_upstream.port}")
    tls = tls_client(sock, "other.test", https_upstream.ca_file)
    request(tls, f"GET /o HTTP/1.1\r\nHost: other.test:{https_upstream.port}\r\n\r\n".encode()).read()
    # plain HTTP to any host never carries it either
    plain = uds(session)
    url = f"http://plain.test:{http_upstream.port}/p"
    request(plain, f"GET {url} HTTP/1.1\r\nHost: plain.test:{http_upstream.port}\r\n\r\n".encode()).read()
    for seen in https_upstream.requests[before_tls:] + http_upstream.requests[before_plain:]:
        assert GITHUB_TOKEN not in json.dumps(seen)
    assert len(https_upstream.requests) == before_tls + 1 and len(http_upstream.requests) == before_plain + 1


def test_a_client_not_trusting_the_session_ca_cannot_be_intercepted(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, https_upstream: EchoUpstream
) -> None:
    _status, sock, _ = connect(session, f"secret.test:{https_upstream.port}")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(sock, "secret.test", https_upstream.ca_file)
    (row,) = audit_rows(gateway, store, run_id)
    assert row.decision == "blocked" and "TLS handshake" in row.reason


def test_upstream_certificates_are_always_verified(
    store: Store, run_id: str, https_upstream: EchoUpstream, tmp_path: Path
) -> None:
    gw = EgressGateway(
        audit=store.add_audit,
        resolver=static_resolver({"secret.test": ["127.0.0.1"]}),
        trusted_targets=[("127.0.0.1", https_upstream.port)],  # no upstream_ca_file: the test CA is unknown
    )
    with gw:
        s = gw.open_session(
            "sbx",
            run_id=run_id,
            allow=[f"secret.test:{https_upstream.port}"],
            secrets={"secret.test": {"X-K": "v" * 9}},
        )
        _status, sock, _ = connect(s, f"secret.test:{https_upstream.port}")
        tls = tls_client(sock, "secret.test", s.ca_bundle_path)
        response = request(tls, f"GET / HTTP/1.1\r\nHost: secret.test:{https_upstream.port}\r\n\r\n".encode())
        assert response.status == 502 and b"certificate verify failed" in response.read()
        rows = audit_rows(gw, store, run_id)
    assert rows[-1].decision == "blocked" and "upstream TLS" in rows[-1].reason


# -- plain HTTP ----------------------------------------------------------------------------


def test_plain_http_follows_the_same_rules(
    gateway: EgressGateway,
    session: GatewaySession,
    store: Store,
    run_id: str,
    http_upstream: EchoUpstream,
) -> None:
    port = http_upstream.port
    sock = uds(session)
    for i in range(3):  # keep-alive, one upstream connection reused
        raw = f"GET http://plain.test:{port}/a{i}?q=1 HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n".encode()
        response = request(sock, raw)
        assert response.status == 200 and json.loads(response.read())["path"] == f"/a{i}?q=1"
    refused = {
        f"http://plain.test:{port}/x": f"Host: other.test:{port}",  # Host differs from the URL
        "http://plain.test/x": "Host: plain.test",  # port 80 not allowed
        "http://127.0.0.1:9/x": "Host: 127.0.0.1:9",
        "http://loop.test:443/x": "Host: loop.test:443",
        "https://plain.test/x": "Host: plain.test",
    }
    for url, host in refused.items():
        response = request(uds(session), f"GET {url} HTTP/1.1\r\n{host}\r\n\r\n".encode())
        assert response.status in (400, 403), url
    rows = audit_rows(gateway, store, run_id)
    assert [r.decision for r in rows] == ["allowed"] * 3 + ["blocked"] * 5
    assert rows[0].path == "/a0?q=1" and rows[0].method == "GET" and rows[0].bytes_down > 0
    assert "Host header" in rows[3].reason and "allowlist" in rows[4].reason and "raw IP" in rows[5].reason


def test_malformed_and_smuggling_requests_are_refused(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, http_upstream: EchoUpstream
) -> None:
    port = http_upstream.port
    cases = [
        f"POST http://plain.test:{port}/ HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 3\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        f"POST http://plain.test:{port}/ HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 3\r\n"
        "Content-Length: 4\r\n\r\nabcd",
        "GET / HTTP/1.1\r\nHost: x\r\n folded: header\r\n\r\n",
        "GET /\r\n\r\n",
        "GET / HTTP/1.1\r\nX: " + "a" * 70_000 + "\r\n\r\n",
    ]
    for raw in cases:
        sock = uds(session)
        sock.sendall(raw.encode())
        answer = _read_rest(sock)
        assert answer.split(b" ")[1] in (b"400", b"431", b"404"), answer[:200]
    rows = audit_rows(gateway, store, run_id)
    assert len(rows) == len(cases) and all(r.decision == "blocked" for r in rows)


def test_the_gateway_serves_no_admin_or_other_routes(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str
) -> None:
    for path in ("/", "/admin", "/metrics", "/openai/v1/chat/completions"):  # no openai route in this session
        response = request(uds(session), f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\r\n".encode())
        assert response.status == 404
    rows = audit_rows(gateway, store, run_id)
    assert len(rows) == 4 and all(r.decision == "blocked" and r.host == "gateway" for r in rows)


# -- LLM routes ----------------------------------------------------------------------------


@pytest.fixture
def llm_session(
    gateway: EgressGateway,
    run_id: str,
    openai_server: ScriptedOpenAIServer,
    anthropic_server: ScriptedAnthropicServer,
) -> GatewaySession:
    routes = {
        "openai": LLMUpstream(openai_server.url, OPENAI_KEY, "openai", prices=PRICES),
        "anthropic": LLMUpstream(anthropic_server.url, ANTHROPIC_KEY, "anthropic", prices=PRICES),
    }
    return gateway.open_session("sbx-llm", run_id=run_id, candidate_id="c7", purpose="agent", llm_routes=routes)


def chat(client: httpx.Client, session: GatewaySession, *, stream: bool, key: str | None = None) -> httpx.Response:
    return client.post(
        session.env["OPENAI_BASE_URL"] + "/chat/completions",
        json={"model": "gpt-test", "stream": stream, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {key or session.placeholder_key}"},
    )


def messages(client: httpx.Client, session: GatewaySession, *, stream: bool, **extra: Any) -> httpx.Response:
    return client.post(
        session.env["ANTHROPIC_BASE_URL"] + "/v1/messages?beta=true",
        json={"model": "claude-test", "stream": stream, "max_tokens": 100,
              "messages": [{"role": "user", "content": "hi"}], **extra},
        headers={"x-api-key": session.placeholder_key, "anthropic-version": "2023-06-01"},
    )  # fmt: skip


def test_openai_route_swaps_the_key_and_meters_json_and_streams(
    gateway: EgressGateway,
    llm_session: GatewaySession,
    store: Store,
    run_id: str,
    openai_server: ScriptedOpenAIServer,
) -> None:
    before = len(openai_server.headers)
    with llm_client(llm_session) as client:
        plain = chat(client, llm_session, stream=False)
        streamed = chat(client, llm_session, stream=True)
    assert plain.status_code == streamed.status_code == 200
    assert plain.json()["choices"][0]["message"]["content"] == "hello from openai"
    assert '"usage"' in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    for text in (plain.text, streamed.text):
        assert OPENAI_KEY not in text
    sent = openai_server.headers[before:]
    assert [h["Authorization"] for h in sent] == [f"Bearer {OPENAI_KEY}"] * 2  # the upstream sees the real key
    assert openai_server.requests[-1]["stream_options"] == {"include_usage": True}
    assert gateway.flush()
    totals = store.usage_totals(run_id)
    assert (totals.calls, totals.input_tokens, totals.output_tokens) == (2, 22, 14)
    assert totals.cost_usd == 2 * (11 * Decimal(1000) + 7 * Decimal(2000)) / 1_000_000
    assert set(totals.by_purpose) == {"agent"}
    rows = store.audit(run_id)
    assert [(r.decision, r.status, r.path) for r in rows] == [("allowed", 200, "/openai/v1/chat/completions")] * 2
    assert rows[0].host == "127.0.0.1" and rows[0].candidate_id == "c7" and "in=11" in rows[0].reason


def test_openai_sdk_streams_through_the_gateway(
    gateway: EgressGateway, llm_session: GatewaySession, store: Store, run_id: str
) -> None:
    openai = pytest.importorskip("openai")
    with llm_client(llm_session) as http:
        client = openai.OpenAI(
            base_url=llm_session.env["OPENAI_BASE_URL"], api_key=llm_session.env["OPENAI_API_KEY"], http_client=http
        )
        stream = client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "hello from openai"
    assert gateway.flush()
    assert store.usage_totals(run_id).output_tokens == 7


def test_anthropic_route_meters_streams_with_cache_tokens(
    gateway: EgressGateway,
    llm_session: GatewaySession,
    store: Store,
    run_id: str,
    anthropic_server: ScriptedAnthropicServer,
) -> None:
    before = len(anthropic_server.headers)
    with llm_client(llm_session) as client:
        streamed = messages(client, llm_session, stream=True)
        plain = messages(client, llm_session, stream=False)
    assert streamed.status_code == plain.status_code == 200
    events = [line.split(": ", 1)[1] for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert '"input_json_delta"' in streamed.text
    assert plain.json()["content"][1]["input"] == {"command": "ls -la"}
    sent = anthropic_server.headers[before:]
    assert [h["x-api-key"] for h in sent] == [ANTHROPIC_KEY] * 2 and all("Authorization" not in h for h in sent)
    assert anthropic_server.paths[-2] == "/v1/messages?beta=true"
    assert ANTHROPIC_KEY not in streamed.text + plain.text
    assert gateway.flush()
    totals = store.usage_totals(run_id)
    # Anthropic's input excludes the cache: 13 uncached + 40 cache writes counted as input, 100 cache reads.
    assert (totals.calls, totals.input_tokens, totals.cached_tokens, totals.output_tokens) == (2, 106, 200, 42)
    per_call = (13 * 1000 + 40 * 1000 + 100 * 1000 + 21 * 2000) / Decimal(1_000_000)
    assert totals.cost_usd == 2 * per_call


def test_streams_are_forwarded_as_they_arrive(llm_session: GatewaySession) -> None:
    with llm_client(llm_session) as client:
        start = time.monotonic()
        arrivals = []
        with client.stream(
            "POST",
            llm_session.env["ANTHROPIC_BASE_URL"] + "/v1/messages",
            json={"model": "m", "stream": True, "max_tokens": 5, "metadata": {"slow": True},
                  "messages": [{"role": "user", "content": "x"}]},
            headers={"x-api-key": llm_session.placeholder_key},
        ) as response:  # fmt: skip
            for chunk in response.iter_raw():
                if chunk:
                    arrivals.append(time.monotonic() - start)
    assert len(arrivals) >= 5
    assert arrivals[0] < 0.5 and arrivals[-1] > 1.2  # the first events came long before the last


@pytest.mark.parametrize("route", ["openai", "anthropic"])
def test_wrong_placeholder_gets_401_and_reaches_nothing(
    gateway: EgressGateway,
    llm_session: GatewaySession,
    store: Store,
    run_id: str,
    openai_server: ScriptedOpenAIServer,
    anthropic_server: ScriptedAnthropicServer,
    route: str,
) -> None:
    before = len(openai_server.requests) + len(anthropic_server.requests)
    with llm_client(llm_session) as client:
        if route == "openai":
            answers = [
                chat(client, llm_session, stream=False, key="sk-wrong"),
                chat(client, llm_session, stream=False, key=OPENAI_KEY),  # even the real key is not accepted
                client.post(llm_session.env["OPENAI_BASE_URL"] + "/chat/completions", json={}),
            ]
        else:
            base = llm_session.env["ANTHROPIC_BASE_URL"] + "/v1/messages"
            answers = [
                client.post(base, json={}, headers={"x-api-key": "sk-ant-wrong"}),
                client.post(
                    base, json={}, headers={"x-api-key": llm_session.placeholder_key, "Authorization": "Bearer x"}
                ),
                client.post(base, json={}),
            ]
    assert [a.status_code for a in answers] == [401, 401, 401]
    assert answers[0].json()["error"]["type"] == "authentication_error"
    assert len(openai_server.requests) + len(anthropic_server.requests) == before
    rows = audit_rows(gateway, store, run_id)
    assert len(rows) == 3 and all(r.decision == "blocked" and r.status == 401 for r in rows)


def test_placeholder_of_one_session_is_refused_by_another(
    gateway: EgressGateway, llm_session: GatewaySession, run_id: str, openai_server: ScriptedOpenAIServer
) -> None:
    other = gateway.open_session(
        "sbx-2", run_id=run_id, llm_routes={"openai": LLMUpstream(openai_server.url, OPENAI_KEY)}
    )
    assert other.placeholder_key != llm_session.placeholder_key
    with llm_client(other) as client:
        assert chat(client, other, stream=False, key=llm_session.placeholder_key).status_code == 401
        assert chat(client, other, stream=False).status_code == 200


def test_402_once_the_run_is_over_budget(
    gateway: EgressGateway, llm_session: GatewaySession, store: Store, run_id: str, budget: Budget
) -> None:
    budget.limit = Decimal("0.02")  # one OpenAI call costs $0.025
    with llm_client(llm_session) as client:
        first = chat(client, llm_session, stream=True)
        second = chat(client, llm_session, stream=False)
        third = messages(client, llm_session, stream=True)
    assert first.status_code == 200
    assert second.status_code == third.status_code == 402
    body = second.json()
    assert body["error"]["type"] == "budget_exceeded"
    assert run_id in body["error"]["message"] and "of $0.02" in body["error"]["message"]
    assert store.usage_totals(run_id).calls == 1
    rows = audit_rows(gateway, store, run_id)
    assert [r.status for r in rows] == [200, 402, 402]


def test_llm_route_through_http_proxy_and_path_tricks(
    gateway: EgressGateway, llm_session: GatewaySession, openai_server: ScriptedOpenAIServer
) -> None:
    sock = uds(llm_session)
    body = b'{"model": "m", "messages": []}'
    raw = (
        f"POST http://127.0.0.1:3128/openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n"
        f"Authorization: Bearer {llm_session.placeholder_key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    response = request(sock, raw, "POST")  # what a client does when it ignores NO_PROXY
    assert response.status == 200 and b"hello from openai" in response.read()
    for path in ("/openai/v1/../../admin", "/openai/v1/%2e%2e/x", "/openai/v1/a\\b"):
        raw = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {llm_session.placeholder_key}\r\n\r\n"
        assert request(uds(llm_session), raw.encode()).status == 400


def test_unreachable_model_endpoint_is_a_502(gateway: EgressGateway, run_id: str) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    s = gateway.open_session(
        "sbx", run_id=run_id, llm_routes={"openai": LLMUpstream(f"http://127.0.0.1:{port}/v1", "k")}
    )
    with llm_client(s) as client:
        answer = chat(client, s, stream=False)
    assert answer.status_code == 502 and "unreachable" in answer.json()["error"]["message"]


# -- audit ---------------------------------------------------------------------------------


def test_store_audit_round_trip(store: Store, run_id: str) -> None:
    t = datetime.now(UTC)
    rows = [
        AuditRow(t, run_id, "s1", "api.github.com", 443, "allowed", "ok", "c1", "GET", "/x", 200, 10, 20),
        AuditRow(t, run_id, "s2", "evil.com", 443, "blocked", "not allowlisted", method="CONNECT", status=403),
    ]
    assert store.add_audit(rows) == 2
    got = store.audit(run_id)
    assert [(r.host, r.decision, r.bytes_down, r.candidate_id) for r in got] == [
        ("api.github.com", "allowed", 20, "c1"),
        ("evil.com", "blocked", 0, None),
    ]
    assert got[0].id is not None and got[0].time == t
    assert [r.host for r in store.audit(run_id, decision="blocked")] == ["evil.com"]
    assert [r.host for r in store.audit(run_id, sandbox_id="s1")] == ["api.github.com"]
    assert store.audit(run_id, after_id=got[0].id or 0) == got[1:]
    with pytest.raises(RunNotFound):
        store.add_audit(AuditRow(t, "r-nope", "s", "h", 1, "blocked"))
    with pytest.raises(ValueError, match="decision"):
        store.add_audit(AuditRow(t, run_id, "s", "h", 1, "maybe"))


def test_audit_rows_the_sink_refuses_are_logged_not_dropped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written: list[AuditRow] = []

    def sink(rows: Any) -> None:
        if any(r.run_id == "bad" for r in rows):
            raise RuntimeError("db down")
        written.extend(rows)

    gw = EgressGateway(audit=sink)
    with gw, caplog.at_level(logging.ERROR, logger="codeevolver.gateway.audit"):
        for rid in ("good", "bad", "good"):
            s = gw.open_session("sbx", run_id=rid)
            request(uds(s), b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").read()
        assert gw.flush()
        assert gw.audit_failures == 1
    assert [r.run_id for r in written] == ["good", "good"]
    assert "egress audit row could not be written" in caplog.text and "db down" in caplog.text


def test_many_concurrent_connections(
    gateway: EgressGateway, session: GatewaySession, store: Store, run_id: str, http_upstream: EchoUpstream
) -> None:
    import concurrent.futures

    port = http_upstream.port

    def fetch(i: int) -> int:
        raw = f"GET http://plain.test:{port}/n{i} HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n"
        with uds(session) as sock:
            response = request(sock, raw.encode())
            response.read()
            return response.status

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(fetch, range(64))) == [200] * 64
    rows = audit_rows(gateway, store, run_id)
    assert len(rows) == 64 and {r.path for r in rows} == {f"/n{i}" for i in range(64)}


def test_open_connections_per_session_are_capped(store: Store, run_id: str) -> None:
    with EgressGateway(audit=store.add_audit, max_connections_per_session=3) as gw:
        s = gw.open_session("sbx", run_id=run_id)
        held = [uds(s) for _ in range(3)]
        time.sleep(0.3)  # let the gateway accept them
        assert b" 503 " in _read_rest(uds(s))
        for sock in held:
            sock.close()
        rows = audit_rows(gw, store, run_id, at_least=1)
    assert [(r.decision, r.status) for r in rows] == [("blocked", 503)] and "open connections" in rows[0].reason


def test_stop_flushes_the_audit_and_removes_the_private_dir(store: Store, run_id: str, tmp_path: Path) -> None:
    gw = EgressGateway(audit=store.add_audit).start()
    directory = gw.directory
    s = gw.open_session("sbx", run_id=run_id)
    for _ in range(5):
        request(uds(s), b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").read()
    gw.stop()
    assert len(store.audit(run_id)) == 5
    assert directory is not None and not directory.exists()
    assert not os.path.exists(s.socket_path)
