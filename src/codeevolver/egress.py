"""A run's only way out: one egress gateway, a session for the program and one per code mutation.

The sandboxed program and the agent's commands reach their model through the
gateway's LLM routes with a placeholder key; the real key stays in this process.
Requests made while the seed is checked, before the run exists, are kept and
written to the run's audit log and ledger once it is created.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal

from codeevolver.errors import ConfigError
from codeevolver.gateway import EgressGateway, GatewaySession, LLMUpstream, Prices
from codeevolver.models.base import ModelSpec
from codeevolver.models.resolve import ModelPlan
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.store import Store
from codeevolver.store.rows import AuditRow
from codeevolver.types import UsageRecord

PREFLIGHT = "preflight"
OPENAI_URL = "https://api.openai.com/v1"
ANTHROPIC_URL = "https://api.anthropic.com"


def llm_routes(plan: ModelPlan, env: Mapping[str, str]) -> dict[str, LLMUpstream]:
    """The model endpoints a sandbox may reach, each with the real key the gateway swaps in."""
    task = plan.task
    routes: dict[str, LLMUpstream] = {}
    if task.api_base or not task.name.startswith("anthropic/"):
        key = task.api_key or env.get("OPENAI_API_KEY", "")
        base = task.api_base or env.get("OPENAI_BASE_URL") or OPENAI_URL
        routes["openai"] = LLMUpstream(base, key, "openai", prices=_prices(task))
    if env.get("ANTHROPIC_API_KEY"):
        base = env.get("ANTHROPIC_BASE_URL") or ANTHROPIC_URL
        routes["anthropic"] = LLMUpstream(base, env["ANTHROPIC_API_KEY"], "anthropic", prices=_anthropic_prices(plan))
    elif (translated := _anthropic_onto_openai(plan.agent, env)) is not None:
        routes["anthropic"] = translated
    return routes


def _anthropic_onto_openai(agent: ModelSpec, env: Mapping[str, str]) -> LLMUpstream | None:
    """An Anthropic route onto the agent model's OpenAI-compatible endpoint (None if it has none).

    The Claude Code CLI speaks only Anthropic Messages; the gateway translates its calls to
    chat completions, so the CLI in the sandbox can drive an open model (``--api-base``, the
    embedded llama.cpp server) or an OpenAI one. Its ``claude-…`` model name is replaced by
    the agent model the operator chose.
    """
    if not agent.api_base and "/" in agent.name and not agent.name.startswith("openai/"):
        return None  # another litellm provider (anthropic/, gemini/, bedrock/ …): no chat-completions URL here
    base = agent.api_base or env.get("OPENAI_BASE_URL") or OPENAI_URL
    key = agent.api_key or env.get("OPENAI_API_KEY", "")
    model = agent.name.removeprefix("openai/")
    return LLMUpstream(base, key, "anthropic", prices=_prices(agent), upstream_protocol="openai", model=model)


def _anthropic_prices(plan: ModelPlan) -> Prices | None:
    """Prices for the Anthropic route: its main caller's, the agent (the Claude Code CLI), else the task's.

    Only models that can be sent there count (``anthropic/…`` or a bare name); one route holds one price.
    """
    for spec in (plan.agent, plan.task, plan.reflection):
        if spec.name.startswith("anthropic/") or "/" not in spec.name:
            prices = _prices(spec)
            if prices is not None:
                return prices
    return None


def _prices(spec: ModelSpec) -> Prices | None:
    """The operator's prices for the model (``[optimize] model_prices``); None: litellm's table."""
    if spec.input_usd_per_m is None or spec.output_usd_per_m is None:
        return None
    return Prices(spec.input_usd_per_m, spec.output_usd_per_m)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def secret_headers(secrets: Mapping[str, str], env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``[sandbox] secrets`` as headers per host: ``"api.github.com" = "Authorization: Bearer ${GITHUB_TOKEN}"``.

    ``${NAME}`` is read from this process's environment when the run starts; the value only
    ever lives in the gateway, which adds the header to HTTPS requests to exactly that host.
    """
    headers: dict[str, dict[str, str]] = {}
    for host, template in secrets.items():
        name, sep, value = template.partition(":")
        if not sep or not name.strip() or " " in name.strip():
            raise ConfigError(
                f"[sandbox] secrets: {host!r} = {template!r} is not a header line",
                f'write it as "{host}" = "Header-Name: value with ${{ENV_VAR}}"',
            )
        missing = [ref for ref in _ENV_REF.findall(value) if not env.get(ref)]
        if missing:
            raise ConfigError(
                f"[sandbox] secrets for {host} need the environment variable {missing[0]}, which is not set",
                f"export {missing[0]}=... before running codeevolver",
            )
        filled = _ENV_REF.sub(lambda m: env[m.group(1)], value.strip())
        headers.setdefault(host, {})[name.strip()] = filled
    return headers


@dataclass
class RunEgress:
    """The gateway of one run and the sessions its sandboxes use."""

    gateway: EgressGateway
    store: Store
    routes: dict[str, LLMUpstream]
    allow: list[str]
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    run_id: str = PREFLIGHT
    program: GatewaySession | None = None
    max_usd: Decimal | None = None
    _held_audit: list[AuditRow] = field(default_factory=list)
    _held_usage: list[UsageRecord] = field(default_factory=list)

    def open_sessions(self, run_id: str) -> None:
        """(Re)open the program's session for ``run_id``; agents get one per mutation."""
        self.close_sessions()
        self.run_id = run_id
        self.program = self.gateway.open_session(
            "program",
            run_id=run_id,
            purpose="task",
            allow=self.allow,
            llm_routes=self.routes,
            secrets=self.secrets,
        )

    def close_sessions(self) -> None:
        if self.program is not None:
            self.gateway.close_session(self.program)
        self.program = None

    def program_policy(self, policy: SandboxPolicy) -> SandboxPolicy:
        assert self.program is not None, "open_sessions first"
        return self.program.apply(policy)

    @contextlib.contextmanager
    def agent_session(self, policy: SandboxPolicy, candidate_id: str) -> Iterator[SandboxPolicy]:
        """A session of its own for one code mutation, so its model calls and requests are
        metered and audited under the candidate, and nothing outlives the agent."""
        session = self.gateway.open_session(
            f"agent-{candidate_id}",
            run_id=self.run_id,
            candidate_id=candidate_id,
            purpose="agent",
            allow=self.allow,
            llm_routes=self.routes,
            secrets=self.secrets,
        )
        try:
            yield session.apply(policy)
        finally:
            self.gateway.close_session(session)

    def adopt_preflight(self, run_id: str) -> None:
        """Write what the seed check sent, before the run existed, into the run's records."""
        self.gateway.flush()
        if self._held_audit:
            self.store.add_audit([replace(row, run_id=run_id) for row in self._held_audit])
        for record in self._held_usage:
            record.run_id = run_id
            self.store.add_usage(record)
        self._held_audit.clear()
        self._held_usage.clear()

    # ----- gateway callbacks --------------------------------------------------

    def audit(self, rows: AuditRow | Iterable[AuditRow]) -> None:
        batch = [rows] if isinstance(rows, AuditRow) else list(rows)
        self._held_audit.extend(r for r in batch if r.run_id == PREFLIGHT)
        known = [r for r in batch if r.run_id != PREFLIGHT]
        if known:
            self.store.add_audit(known)

    def ledger(self, record: UsageRecord) -> None:
        if record.run_id == PREFLIGHT:
            self._held_usage.append(record)
        else:
            self.store.add_usage(record)

    def over_budget(self, run_id: str) -> str | None:
        if self.max_usd is None or run_id == PREFLIGHT:
            return None
        spent = self.store.usage_totals(run_id).cost_usd
        return f"run {run_id} has spent ${spent} of its ${self.max_usd} budget" if spent >= self.max_usd else None


@contextlib.contextmanager
def run_egress(
    store: Store,
    plan: ModelPlan,
    env: Mapping[str, str],
    allow: list[str],
    max_usd: Decimal | None,
    secrets: Mapping[str, str] | None = None,
) -> Iterator[RunEgress]:
    """Start the gateway for a run; sessions start as PREFLIGHT until the run exists."""
    holder: list[RunEgress] = []
    gateway = EgressGateway(
        ledger=lambda record: holder[0].ledger(record),
        audit=lambda rows: holder[0].audit(rows),
        budget_exceeded=lambda run_id: holder[0].over_budget(run_id),
    )
    headers = secret_headers(secrets or {}, env)
    # A host with a secret is reachable (its own port 443 only) even if not listed in allow_domains.
    allowed = list(allow) + [host for host in headers if host not in allow]
    egress = RunEgress(gateway, store, llm_routes(plan, env), allowed, headers, max_usd=max_usd)
    holder.append(egress)
    with gateway:
        egress.open_sessions(PREFLIGHT)
        try:
            yield egress
        finally:
            egress.close_sessions()
            gateway.flush()
