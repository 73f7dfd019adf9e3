"""State shared by the request handlers: the gateway's settings and each session's policy."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from codeevolver.errors import ConfigError
from codeevolver.gateway.audit import AuditWriter
from codeevolver.gateway.policy import Allowlist, Resolver, address_refusal
from codeevolver.gateway.tls import SessionCA, upstream_context
from codeevolver.gateway.usage import Prices, Provider
from codeevolver.store.rows import AuditRow
from codeevolver.types import Purpose, UsageRecord

Ledger = Callable[[UsageRecord], object]
BudgetCheck = Callable[[str], "bool | str | None"]
"""``budget_exceeded(run_id)``: falsy while the run may spend; True, or a text naming the budget, once over."""


@dataclass(frozen=True)
class LLMUpstream:
    """A model endpoint configured by the operator: the only thing an LLM route can reach.

    ``base_url`` is what a client would use as its base URL: ``https://api.openai.com/v1``
    or ``http://127.0.0.1:8080/v1`` for ``provider="openai"``, ``https://api.anthropic.com``
    for ``provider="anthropic"``. It may be a private or loopback address: the operator
    trusts it, the sandbox cannot name it. ``ca_file`` adds a CA for a private endpoint.
    Without ``prices`` the cost comes from litellm's table (zero for unknown models).

    ``provider`` is the protocol the sandbox speaks (and where the route is mounted);
    ``upstream_protocol`` the one ``base_url`` speaks, the same unless set. The one
    translation served is ``provider="anthropic", upstream_protocol="openai"``: a client
    of Anthropic Messages (the Claude Code CLI) in front of an OpenAI chat-completions
    endpoint (``base_url`` then ends in ``/v1``). ``model``, on such a route, replaces the
    model the client names (``claude-sonnet-4-5``) with the one the endpoint serves.
    """

    base_url: str
    api_key: str = ""
    provider: Provider = "openai"
    prices: Prices | None = None
    ca_file: str | None = None
    upstream_protocol: Provider | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.upstream_protocol not in (None, self.provider) and not self.translates:
            raise ConfigError(
                f"no translation from {self.provider} clients to an {self.upstream_protocol} upstream",
                'the one served is provider="anthropic", upstream_protocol="openai"',
            )

    @property
    def upstream_speaks(self) -> Provider:
        """The protocol of ``base_url``: what the key header, usage and error bodies follow."""
        return self.upstream_protocol or self.provider

    @property
    def translates(self) -> bool:
        """Anthropic Messages in front, OpenAI chat completions behind (gateway/translate.py)."""
        return self.provider == "anthropic" and self.upstream_protocol == "openai"


@dataclass
class Core:
    """Gateway-wide settings and services every connection handler uses."""

    resolver: Resolver
    audit: AuditWriter
    ledger: Ledger | None = None
    budget_exceeded: BudgetCheck | None = None
    upstream_ssl: ssl.SSLContext = field(default_factory=upstream_context)
    trusted_targets: frozenset[tuple[str, int]] = frozenset()
    connect_timeout_s: float = 15.0
    idle_timeout_s: float = 300.0
    handshake_timeout_s: float = 30.0
    max_connections: int = 256
    """Open connections per session: a sandbox cannot exhaust the host's file descriptors."""
    _llm_ssl: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def refusal(self, address: str, port: int) -> str | None:
        """Why the proxy may not dial ``address:port`` (None when it may)."""
        if (address, port) in self.trusted_targets:
            return None
        try:
            return address_refusal(address.split("%", 1)[0])
        except ValueError:
            return f"unparseable address {address!r}"

    def llm_ssl(self, upstream: LLMUpstream) -> ssl.SSLContext:
        if upstream.ca_file is None:
            return self.upstream_ssl
        ctx = self._llm_ssl.get(upstream.ca_file)
        if ctx is None:
            ctx = self._llm_ssl[upstream.ca_file] = upstream_context(upstream.ca_file)
        return ctx


@dataclass
class SessionState:
    """One sandbox's policy and its socket, as the handlers see them."""

    sandbox_id: str
    run_id: str
    candidate_id: str | None
    purpose: Purpose
    allow: Allowlist
    secrets: Mapping[str, Mapping[str, str]]
    llm_routes: Mapping[str, LLMUpstream]
    placeholder: str
    proxy_port: int
    directory: Path
    socket_path: Path
    ca: SessionCA | None = None
    trusted_hosts: frozenset[str] = frozenset()
    """Allowlisted names the operator vouches for (the package index of a setup phase): their
    addresses skip the public-address check, which every other name still meets."""
    listener: socket.socket | None = None
    accepting: asyncio.Task[None] | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closed: bool = False
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    """Usage records still being priced and written (awaited before a budget check and at close)."""

    def audit_row(
        self,
        started: datetime,
        host: str,
        port: int | None,
        decision: Literal["allowed", "blocked"],
        reason: str,
        *,
        method: str | None = None,
        path: str | None = None,
        status: int | None = None,
        bytes_up: int = 0,
        bytes_down: int = 0,
    ) -> AuditRow:
        return AuditRow(
            time=started, run_id=self.run_id, candidate_id=self.candidate_id, sandbox_id=self.sandbox_id,
            host=host, port=port, method=method, path=path[:2048] if path else path, status=status,
            bytes_up=bytes_up, bytes_down=bytes_down, decision=decision, reason=reason,
        )  # fmt: skip


def utcnow() -> datetime:
    return datetime.now(UTC)
