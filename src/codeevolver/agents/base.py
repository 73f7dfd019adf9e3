"""The CodingAgent interface: something that edits a worktree to carry out a change request.

Contract for implementations:

- ``run`` edits files under ``task.worktree`` only, and runs every shell
  command through ``task.sandbox`` with ``task.policy`` (never on the host).
- It never commits: the orchestrator commits the result with hooks disabled.
- It stops by itself after ``task.max_steps`` steps or ``task.timeout_s`` seconds
  and reports that as ``ok=False`` with the reason.
- It stops once it has spent ``task.max_usd`` (when set) and reports that as
  ``ok=False``; the run's budget running out under it (the gateway answers 402)
  is ``ok=False`` too, with a reason starting with :data:`RUN_BUDGET_SPENT`.
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

RUN_BUDGET_SPENT = "run budget spent"
"""How the reason of an agent stopped by the run's exhausted USD budget begins."""


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
    """What this agent may spend (``agent_max_usd``, capped at what is left of the run's budget); None: no cap.
    The backends stop at it by their own count; billing is always the ledger's."""


@dataclass
class AgentResult:
    ok: bool
    summary: str = ""
    reason: str | None = None
    transcript: list[dict[str, Any]] = field(default_factory=list)


class CodingAgent(Protocol):
    name: str

    def run(self, task: AgentTask) -> AgentResult: ...
