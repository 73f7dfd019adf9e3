"""Egress attempts from INSIDE a real sandbox, each checked on the host (upstream logs, audit, ledger).

The sandbox's only exit is the gateway session's socket, bridged to
127.0.0.1:3128 inside. Names resolve through the gateway's static resolver;
the local upstreams' exact ``(127.0.0.1, port)`` pairs are the only private
targets it lets through, so a name answering 127.0.0.1 or 169.254.169.254 on
any other pair meets the real refusal. Probes are the system Python's stdlib
and curl, as an AI-written program would use them. ``sandbox`` and ``work`` come
from the battery's conftest: one isolated sandbox per tier, counted per tier.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from codeevolver.gateway import EgressGateway, GatewaySession, LLMUpstream, Prices, static_resolver
from codeevolver.gateway.testing import EchoUpstream
from codeevolver.sandbox.base import Sandbox, SandboxPolicy
from codeevolver.store import AuditRow, Store
from codeevolver.testing.fake_anthropic import AnthropicReply, ScriptedAnthropicServer
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer

PYTHON = "/usr/bin/python3"
OPENAI_KEY = "sk-real-openai-key-0123456789"
ANTHROPIC_KEY = "sk-ant-real-key-9876543210"
TOKEN = "ghp_realsecrettoken1234567890"
PRICES = Prices(input=Decimal(1000), output=Decimal(2000))


PRELUDE = r'''
import http.client, json, os, socket, ssl, sys

PROXY = ("127.0.0.1", int(os.environ["HTTPS_PROXY"].rsplit(":", 1)[1]))

def out(value):
    print(json.dumps(value))

def read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data

def connect(target):
    """CONNECT through the proxy: (status, socket)."""
    sock = socket.create_connection(PROXY, timeout=15)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = read_head(sock)
    return (int(head.split()[1]) if head else 0), sock

def https(target, sni, host, path="/", cafile=None, headers=None, method="GET", body=None):
    """A request through a CONNECT tunnel: {"status", "body"} or {"error"}."""
    status, sock = connect(target)
    if status != 200:
        return {"connect": status}
    try:
        ctx = ssl.create_default_context(cafile=cafile)
        tls = ctx.wrap_socket(sock, server_hostname=sni)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        response = http.client.HTTPResponse(tls, method=method)
        response.begin()
        return {"status": response.status, "body": response.read().decode("utf-8", "replace")}
    except (OSError, ssl.SSLError) as exc:
        return {"error": type(exc).__name__ + ": " + str(exc)}

def proxied(method, url, headers=None, body=None):
    """A plain request to the proxy (absolute-form URL, or an origin-form gateway route)."""
    conn = http.client.HTTPConnection(*PROXY, timeout=30)
    conn.request(method, url, body=body, headers=headers or {})
    response = conn.getresponse()
    return {"status": response.status, "body": response.read().decode("utf-8", "replace")}

def tcp(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "open"
    except OSError as exc:
        return type(exc).__name__
'''


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_upstream() -> Iterator[EchoUpstream]:
    with EchoUpstream(tls_hosts=["secret.test", "allowed.test", "other.test"]) as up:
        yield up


@pytest.fixture(scope="module")
def openai_server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(
        lambda b: Reply(content="hi", prompt_tokens=11, completion_tokens=7), api_key=OPENAI_KEY
    ) as s:
        yield s


@pytest.fixture(scope="module")
def anthropic_server() -> Iterator[ScriptedAnthropicServer]:
    reply = AnthropicReply(text="hello", input_tokens=13, output_tokens=21, cache_read_input_tokens=100)
    with ScriptedAnthropicServer(lambda b: reply, api_key=ANTHROPIC_KEY) as s:
        yield s


@pytest.fixture
def limit() -> dict[str, Decimal | None]:
    return {"usd": None}


@pytest.fixture
def gateway(store: Store, https_upstream: EchoUpstream, limit: dict[str, Decimal | None]) -> Iterator[EgressGateway]:
    def over(run: str) -> str | None:
        spent, cap = store.usage_totals(run).cost_usd, limit["usd"]
        return f"spent ${spent} of ${cap}" if cap is not None and spent >= cap else None

    names = {
        "secret.test": ["127.0.0.1"],
        "allowed.test": ["127.0.0.1"],
        "other.test": ["127.0.0.1"],
        "loop.test": ["127.0.0.1"],
        "meta.test": ["169.254.169.254"],
        "rebind.test": ["93.184.216.34", "127.0.0.1"],
    }
    with EgressGateway(
        ledger=store.add_usage,
        audit=store.add_audit,
        budget_exceeded=over,
        resolver=static_resolver(names),
        upstream_ca_file=https_upstream.ca_file,
        trusted_targets=[("127.0.0.1", https_upstream.port)],
    ) as gw:
        yield gw


@pytest.fixture
def work(work: Path, https_upstream: EchoUpstream) -> Path:
    """The battery's work dir, holding the test upstream's CA so the sandbox can verify a tunnelled host."""
    assert https_upstream.ca_file is not None
    shutil.copy(https_upstream.ca_file, work / "upstream-ca.pem")
    return work


@pytest.fixture
def session(
    gateway: EgressGateway,
    run_id: str,
    https_upstream: EchoUpstream,
    openai_server: ScriptedOpenAIServer,
    anthropic_server: ScriptedAnthropicServer,
) -> Iterator[GatewaySession]:
    port = https_upstream.port
    s = gateway.open_session(
        "sbx-sec",
        run_id=run_id,
        candidate_id="c1",
        purpose="agent",
        allow=[f"allowed.test:{port}", f"other.test:{port}", f"secret.test:{port}", "loop.test", "meta.test",
               f"loop.test:{port + 1}", "rebind.test"],
        secrets={"secret.test": {"Authorization": f"token {TOKEN}"}},
        llm_routes={
            "openai": LLMUpstream(openai_server.url, OPENAI_KEY, "openai", prices=PRICES),
            "anthropic": LLMUpstream(anthropic_server.url, ANTHROPIC_KEY, "anthropic", prices=PRICES),
        },
    )  # fmt: skip
    yield s
    gateway.close_session(s)


def probe(sandbox: Sandbox, session: GatewaySession, work: Path, code: str, **env: str) -> Any:
    """Run ``code`` (after the prelude) inside the sandbox; its last stdout line, parsed as JSON."""
    script = work / "probe.py"
    script.write_text(PRELUDE + code)
    policy = session.apply(SandboxPolicy(workdir=work, env=env, timeout_s=60))
    result = sandbox.run([PYTHON, str(script)], policy)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows(gateway: EgressGateway, store: Store, run_id: str) -> list[AuditRow]:
    assert gateway.flush()
    return store.audit(run_id)


# -- the battery ---------------------------------------------------------------------------


def test_non_allowlisted_host_is_blocked_and_logged(
    sandbox: Sandbox, session: GatewaySession, work: Path, gateway: EgressGateway, store: Store, run_id: str
) -> None:
    got = probe(sandbox, session, work, 'out([connect("example.org:443")[0], connect("pypi.org:443")[0]])')
    assert got == [403, 403]
    curl = sandbox.run(["curl", "-sS", "-m", "10", "https://example.org/"], session.apply(SandboxPolicy(workdir=work)))
    assert curl.returncode != 0 and "403" in curl.stderr
    logged = rows(gateway, store, run_id)
    expected = [("example.org", "blocked", 403), ("pypi.org", "blocked", 403), ("example.org", "blocked", 403)]
    assert [(r.host, r.decision, r.status) for r in logged] == expected
    assert all("allowlist" in r.reason and r.sandbox_id == "sbx-sec" and r.candidate_id == "c1" for r in logged)


def test_raw_ip_via_connect_is_blocked(
    sandbox: Sandbox, session: GatewaySession, work: Path, gateway: EgressGateway, store: Store, run_id: str
) -> None:
    targets = ["93.184.216.34:443", "127.0.0.1:443", "[::1]:443", "169.254.169.254:80", "2130706433:443", "0x7f.1:443"]
    got = probe(sandbox, session, work, f"out([connect(t)[0] for t in {targets!r}])")
    assert got == [403] * len(targets)
    url = "http://169.254.169.254/latest/meta-data/"
    assert probe(sandbox, session, work, f'out(proxied("GET", "{url}")["status"])') == 403
    logged = rows(gateway, store, run_id)
    assert len(logged) == len(targets) + 1 and all("raw IP address" in r.reason for r in logged)


def test_allowlisted_host_on_another_port_is_blocked(
    sandbox: Sandbox, session: GatewaySession, work: Path, gateway: EgressGateway, store: Store, run_id: str,
    https_upstream: EchoUpstream,
) -> None:  # fmt: skip
    got = probe(sandbox, session, work, 'out([connect("allowed.test:443")[0], connect("allowed.test:8443")[0]])')
    assert got == [403, 403]
    # Plain HTTP obeys the same port rule: port 80 is refused by the allowlist, the allowlisted port
    # passes it and is dialed (its upstream speaks TLS only, so the answer is a gateway error, not 403).
    allowed = f"http://allowed.test:{https_upstream.port}/"
    code = f'out([proxied("GET", "http://allowed.test/")["status"], proxied("GET", "{allowed}")["status"]])'
    assert probe(sandbox, session, work, code) == [403, 502]
    logged = [(r.host, r.port, r.status, "allowlist" in r.reason) for r in rows(gateway, store, run_id)]
    assert logged == [
        ("allowed.test", 443, 403, True),
        ("allowed.test", 8443, 403, True),
        ("allowed.test", 80, 403, True),
        ("allowed.test", https_upstream.port, 502, False),
    ]


def test_allowlisted_names_resolving_to_loopback_or_metadata_are_blocked(
    sandbox: Sandbox, session: GatewaySession, work: Path, gateway: EgressGateway, store: Store, run_id: str,
    https_upstream: EchoUpstream,
) -> None:  # fmt: skip
    targets = ["loop.test:443", f"loop.test:{https_upstream.port + 1}", "meta.test:443", "rebind.test:443"]
    assert probe(sandbox, session, work, f"out([connect(t)[0] for t in {targets!r}])") == [403] * 4
    reasons = [r.reason for r in rows(gateway, store, run_id)]
    assert "loopback address 127.0.0.1" in reasons[0] and "loopback address 127.0.0.1" in reasons[1]
    assert "cloud metadata address 169.254.169.254" in reasons[2]
    assert "loopback address 127.0.0.1" in reasons[3]  # one bad answer among good ones refuses the name


def test_tunnel_to_an_allowlisted_host_works_and_is_not_intercepted(
    sandbox: Sandbox, session: GatewaySession, work: Path, https_upstream: EchoUpstream
) -> None:
    target = f"allowed.test:{https_upstream.port}"
    code = f'out(https("{target}", "allowed.test", "{target}", "/ok", cafile="upstream-ca.pem"))'
    got = probe(sandbox, session, work, code)
    assert got["status"] == 200, got
    seen = json.loads(got["body"])
    assert seen["path"] == "/ok" and "Authorization" not in seen["headers"]


def test_domain_fronting_is_refused(
    sandbox: Sandbox, session: GatewaySession, work: Path, https_upstream: EchoUpstream, gateway: EgressGateway,
    store: Store, run_id: str,
) -> None:  # fmt: skip
    port = https_upstream.port
    before = len(https_upstream.requests)
    code = f"""
by_sni = https("allowed.test:{port}", "other.test", "other.test:{port}", "/fronted", cafile="upstream-ca.pem")
bundle = os.environ["SSL_CERT_FILE"]
by_host = https("secret.test:{port}", "secret.test", "other.test:{port}", "/fronted", cafile=bundle)
out([by_sni, by_host])
"""
    by_sni, by_host = probe(sandbox, session, work, code)
    assert "error" in by_sni
    assert by_host["status"] == 421
    assert len(https_upstream.requests) == before  # neither reached the upstream
    logged = rows(gateway, store, run_id)
    assert [r.decision for r in logged] == ["blocked", "blocked"]
    assert all("domain fronting refused" in r.reason for r in logged)


def test_secret_goes_only_to_its_own_host_and_never_into_the_sandbox(
    sandbox: Sandbox, session: GatewaySession, work: Path, https_upstream: EchoUpstream, gateway: EgressGateway,
    store: Store, run_id: str,
) -> None:  # fmt: skip
    port = https_upstream.port
    before = len(https_upstream.requests)
    policy = session.apply(SandboxPolicy(workdir=work, timeout_s=60))
    # curl trusts the session CA through SSL_CERT_FILE / CURL_CA_BUNDLE and goes through HTTPS_PROXY.
    curl = sandbox.run(["curl", "-sS", "-m", "20", f"https://secret.test:{port}/user"], policy)
    assert curl.returncode == 0, curl.stderr
    echoed = json.loads(curl.stdout)
    assert TOKEN not in curl.stdout and set(echoed["headers"]["Authorization"]) == {"*"}  # the echo came back masked
    other = sandbox.run(
        ["curl", "-sS", "-m", "20", "--cacert", "upstream-ca.pem", f"https://other.test:{port}/o"], policy
    )
    assert other.returncode == 0, other.stderr
    seen = https_upstream.requests[before:]
    assert [s["path"] for s in seen] == ["/user", "/o"]
    assert seen[0]["headers"]["Authorization"] == f"token {TOKEN}"
    assert "Authorization" not in seen[1]["headers"]
    search = sandbox.run(
        [
            "/bin/sh",
            "-c",
            "env; cat /proc/self/environ /proc/self/cmdline; "
            "grep -rls --exclude-dir=usr --exclude-dir=proc --exclude-dir=sys 'ghp_' / 2>/dev/null; true",
        ],
        policy,
    )
    assert TOKEN not in search.stdout and "ghp_" not in search.stdout
    assert [r.decision for r in rows(gateway, store, run_id)] == ["allowed", "allowed"]


def test_ca_key_is_unreadable_and_gateway_files_are_absent(
    sandbox: Sandbox, session: GatewaySession, work: Path, gateway: EgressGateway
) -> None:
    assert session.ca_bundle_path is not None and gateway.directory is not None
    code = f"""
found = []
for root in ("/", ):
    for dirpath, dirnames, filenames in os.walk(root):
        skip = ("/proc", "/sys", "/dev", "/usr")
        dirnames[:] = [d for d in dirnames if not os.path.join(dirpath, d).startswith(skip)]
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    data = fh.read(4_000_000)
            except OSError:
                continue
            if b"PRIVATE" b" KEY" in data:
                found.append(path)
bundle = open(os.environ["SSL_CERT_FILE"]).read()
listing = sorted(os.listdir({str(session.ca_bundle_path.parent)!r}))
out({{"keys": found, "bundle_has_ca": "BEGIN CERTIFICATE" in bundle, "listing": listing,
     "socket": os.path.exists({str(session.socket_path)!r}), "host_pid": os.path.exists("/proc/{os.getpid()}/mem")}})
"""
    got = probe(sandbox, session, work, code)
    assert got["keys"] == []  # no private key anywhere the sandbox can read
    assert got["bundle_has_ca"] and got["listing"] == ["ca-bundle.pem"]  # only the bundle, bound read-only
    assert got["socket"] is False  # the gateway socket itself is not inside
    host_pid_cmd = Path(f"/proc/{os.getpid()}/cmdline").read_bytes()
    assert b"python" in host_pid_cmd  # the host pid is real ...
    cmdline = f"/proc/{os.getpid()}/cmdline"
    code = f'out(open("{cmdline}", "rb").read().decode(errors="replace") if os.path.exists("{cmdline}") else None)'
    inside = probe(sandbox, session, work, code)
    assert inside is None or "pytest" not in inside  # ... but not visible from inside


def test_proxy_admin_and_other_host_ports_are_unreachable(
    sandbox: Sandbox,
    session: GatewaySession,
    work: Path,
    https_upstream: EchoUpstream,
    openai_server: ScriptedOpenAIServer,
) -> None:
    port = https_upstream.port
    openai_port = int(openai_server.url.rsplit(":", 1)[1].split("/")[0])
    code = f"""
out({{
    "admin": [proxied("GET", p)["status"] for p in ("/", "/admin", "/metrics", "/stats")],
    "direct": [tcp("127.0.0.1", p) for p in ({port}, {openai_port}, 22, 80)],
    "via_proxy": [proxied("GET", "http://127.0.0.1:{openai_port}/v1/models")["status"],
                  proxied("GET", "http://localhost:{openai_port}/v1/models")["status"],
                  connect("localhost:{port}")[0]],
    "dns": tcp("example.org", 443),
}})
"""
    got = probe(sandbox, session, work, code)
    assert got["admin"] == [404] * 4
    assert all(r != "open" for r in got["direct"]), got["direct"]
    assert got["via_proxy"] == [403, 403, 403]
    assert got["dns"] != "open"


LLM_CALLS = """
def post(url, headers, payload):
    return proxied("POST", url, headers={"Content-Type": "application/json", **headers}, body=json.dumps(payload))

oa = os.environ["OPENAI_BASE_URL"].split("127.0.0.1:3128", 1)[1] + "/chat/completions"
an = os.environ["ANTHROPIC_BASE_URL"].split("127.0.0.1:3128", 1)[1] + "/v1/messages?beta=true"
key = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
akey = {"x-api-key": os.environ["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"}
msgs = [{"role": "user", "content": "hi"}]
"""


def test_llm_routes_swap_keys_and_meter_every_dialect(
    sandbox: Sandbox, session: GatewaySession, work: Path, gateway: EgressGateway, store: Store, run_id: str,
    openai_server: ScriptedOpenAIServer, anthropic_server: ScriptedAnthropicServer,
) -> None:  # fmt: skip
    o_before, a_before = len(openai_server.headers), len(anthropic_server.headers)
    code = (
        LLM_CALLS
        + """
answers = [
    post(oa, key, {"model": "gpt-t", "messages": msgs}),
    post(oa, key, {"model": "gpt-t", "messages": msgs, "stream": True}),
    post(an, akey, {"model": "claude-t", "max_tokens": 9, "messages": msgs}),
    post(an, akey, {"model": "claude-t", "max_tokens": 9, "messages": msgs, "stream": True}),
]
out({"status": [a["status"] for a in answers], "bodies": "".join(a["body"] for a in answers),
     "env": dict(os.environ)})
"""
    )
    got = probe(sandbox, session, work, code)
    assert got["status"] == [200] * 4
    assert "event: message_stop" in got["bodies"] and "[DONE]" in got["bodies"]
    for leaked in (OPENAI_KEY, ANTHROPIC_KEY):
        assert leaked not in got["bodies"] and leaked not in json.dumps(got["env"])
    assert got["env"]["OPENAI_API_KEY"] == got["env"]["ANTHROPIC_API_KEY"] == session.placeholder_key
    assert [h["Authorization"] for h in openai_server.headers[o_before:]] == [f"Bearer {OPENAI_KEY}"] * 2
    assert [h["x-api-key"] for h in anthropic_server.headers[a_before:]] == [ANTHROPIC_KEY] * 2
    logged = rows(gateway, store, run_id)
    totals = store.usage_totals(run_id)
    assert totals.calls == 4 and set(totals.by_purpose) == {"agent"}
    assert (totals.input_tokens, totals.cached_tokens, totals.output_tokens) == (2 * 11 + 2 * 13, 200, 2 * 7 + 2 * 21)
    assert [r.decision for r in logged] == ["allowed"] * 4 and all(r.candidate_id == "c1" for r in logged)


def test_wrong_placeholder_401_and_over_budget_402(
    sandbox: Sandbox, session: GatewaySession, work: Path, gateway: EgressGateway, store: Store, run_id: str,
    openai_server: ScriptedOpenAIServer, limit: dict[str, Decimal | None],
) -> None:  # fmt: skip
    limit["usd"] = Decimal("0.02")  # one call costs $0.025
    code = (
        LLM_CALLS
        + """
statuses = [
    post(oa, {"Authorization": "Bearer sk-guessed"}, {"model": "g", "messages": msgs})["status"],
    post(an, {"x-api-key": "sk-ant-guessed"}, {"model": "c", "max_tokens": 5, "messages": msgs})["status"],
    post(oa, key, {"model": "g", "messages": msgs})["status"],
]
over = post(oa, key, {"model": "g", "messages": msgs})
over_anthropic = post(an, akey, {"model": "c", "max_tokens": 5, "messages": msgs, "stream": True})
out({"statuses": statuses + [over["status"], over_anthropic["status"]], "body": json.loads(over["body"])})
"""
    )
    got = probe(sandbox, session, work, code)
    assert got["statuses"] == [401, 401, 200, 402, 402]
    message = got["body"]["error"]["message"]
    assert got["body"]["error"]["type"] == "budget_exceeded" and run_id in message and "of $0.02" in message
    assert store.usage_totals(run_id).calls == 1
    assert [r.status for r in rows(gateway, store, run_id)] == [401, 401, 200, 402, 402]


def test_setup_phase_policy_only_adds_the_package_index(
    sandbox: Sandbox, gateway: EgressGateway, run_id: str, work: Path
) -> None:
    from codeevolver.gateway import PACKAGE_INDEX_HOSTS

    setup = gateway.open_session("sbx-setup", run_id=run_id, allow=PACKAGE_INDEX_HOSTS)
    evaluation = gateway.open_session("sbx-eval", run_id=run_id)
    # No internet here: an allowed name that does not resolve is a 502 (tried), a refused one a 403 (never tried).
    assert probe(sandbox, setup, work, 'out(connect("pypi.org:443")[0])') in (200, 502)
    assert probe(sandbox, evaluation, work, 'out(connect("pypi.org:443")[0])') == 403
