"""The egress gateway: the only way out of a sandbox, and the only holder of keys and secrets.

::

    sandbox (no network)                         host: EgressGateway (asyncio, one per worker)
    ───────────────────                          ─────────────────────────────────────────────
    HTTP(S)_PROXY=127.0.0.1:3128                 one unix socket per sandbox (0700 dir)
      │  (the tier bridges that port to  ──────▶ Connection (proxy.py), keep-alive
      │   the session's unix socket)                │
      │                                             ├─ CONNECT host:443 ─ name? allowlist? resolve,
      │                                             │    every address public? (policy.py)
      │                                             │    ─▶ 200 ─ ClientHello SNI == host?
      │                                             │       ├─ secret host: TLS with the session CA,
      │                                             │       │   Host == host?, inject headers, verify
      │                                             │       │   upstream cert, mask secrets in replies
      │                                             │       └─ else: opaque splice
      │                                             ├─ GET http://host/ ─ same checks, port 80
      │                                             │    only if allowed, Host == URL host
      │                                             ├─ /openai/v1/..., /anthropic/... (llm.py):
      │                                             │    placeholder key? budget? real key ─▶
      │                                             │    configured upstream; usage metered from
      │                                             │    JSON / SSE as it streams ─▶ ledger
      │                                             └─ anything else: 4xx
      │
      └── every request, allowed or blocked ──▶ audit queue ─▶ writer thread ─▶ Store.add_audit

Usage::

    with EgressGateway(ledger=store.add_usage, audit=store.add_audit, budget_exceeded=over) as gw:
        session = gw.open_session("sbx-1", run_id=run, allow=["api.github.com"],
                                  llm_routes={"anthropic": LLMUpstream(url, key, "anthropic")})
        sandbox.run(argv, session.apply(policy))
        gw.close_session(session)
"""

from codeevolver.gateway.core import LLMUpstream
from codeevolver.gateway.policy import PACKAGE_INDEX_HOSTS, Allowlist, SystemResolver, static_resolver
from codeevolver.gateway.service import DEFAULT_PROXY_PORT, EgressGateway, GatewaySession
from codeevolver.gateway.usage import Prices

__all__ = [
    "DEFAULT_PROXY_PORT",
    "PACKAGE_INDEX_HOSTS",
    "Allowlist",
    "EgressGateway",
    "GatewaySession",
    "LLMUpstream",
    "Prices",
    "SystemResolver",
    "static_resolver",
]
