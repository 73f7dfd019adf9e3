"""The CodingAgent interface: something that edits a worktree to carry out a change request.

Contract for implementations:

- ``run`` edits files under ``task.worktree`` only, and runs every shell
  command through ``task.sandbox`` with ``task.policy`` (never on the host).
- It never commits: the orchestrator commits the result with hooks disabled.
- It stops by itself after ``task.max_steps`` steps or ``task.timeout_s`` seconds
  and reports that as ``ok=False`` with the reason.
- It raises only for systemic failures (:class:`~codeevolver.errors.ModelError`
  when the model endpoint is unreachable); an agent that fails at the task
  returns ``ok=False``.
- Every model call is metered through ``task.model`` (a LanguageModel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from codeevolver.models.base import LanguageModel
from codeevolver.sandbox.base import Sandbox, SandboxPolicy


@dataclass
class AgentTask:
    change_request: str
    worktree: Path
    sandbox: Sandbox
    policy: SandboxPolicy
    model: LanguageModel
    candidate_id: str | None = None
    max_steps: int = 30
    timeout_s: float = 600.0
    entry: str = ""
    """The program's entry point (``module:attr``) the agent must keep callable; "" if unknown."""
    metric: str = ""
    """The metric (``module:attr``) the agent must leave alone; "" if unknown."""
    python: str = "python3"
    """The interpreter that runs the user's program inside the sandbox (for the agent's self-check)."""
    max_usd: float | None = None
    """A safety stop for backends that track their own spend; billing is always the gateway's ledger."""


@dataclass
class AgentResult:
    ok: bool
    summary: str = ""
    reason: str | None = None
    transcript: list[dict[str, Any]] = field(default_factory=list)


class CodingAgent(Protocol):
    name: str

    def run(self, task: AgentTask) -> AgentResult: ...
