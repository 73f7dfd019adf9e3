"""Code mutation: the reflection model writes a change request, a coding agent carries it out.

By default the change request comes from the read-only reflection agent
(:mod:`codeevolver.proposers.reflection_agent`) over the parent's cached export; a model that
cannot call tools falls back to the single reflection call below. With ``additional_instructions``
set, the request is checked against them before anything is exported or an agent starts.
The agent works in a fresh export of the parent's commit, inside the sandbox;
the orchestrator then commits the directory with git plumbing (no hooks), and the directory,
pruned to exactly the commit, becomes the child's evaluation export.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from codeevolver.agents.base import RUN_BUDGET_SPENT, AgentResult, AgentTask, CodingAgent
from codeevolver.models.base import LanguageModel
from codeevolver.proposers.reflection_agent import (
    MAX_STEPS,
    ReflectionAgent,
    check_constraints,
    choose_mode,
    task_prompt,
)
from codeevolver.proposers.reflective import render
from codeevolver.sandbox.base import Sandbox, SandboxPolicy
from codeevolver.workspace.git import GitWorkspace

log = logging.getLogger("codeevolver.reflection")

TEMPLATE = """You are the architect of an AI application that is being improved automatically.
It is run on examples and scored by a metric; below are its recent results. Propose ONE
concrete change to the application's CODE (not only its prompt wording) that should raise
the score: fix parsing or post-processing, add a step, change how the model is called.

## Files in the repository
{files}

## Current prompts (components)
{components}

## Recent results on a minibatch
{records}

## Earlier code changes in this run and how they did
{history}
{instructions}
## Rules
- Keep the program's entry point `{entry}` and the metric `{metric}` with their signatures.
- Do not touch the datasets or the metric.

Reply with a change request for a coding agent: which file(s) to change, what to change,
why, and the effect on the metric you expect. Be specific and brief (under 250 words).
"""


@dataclass
class CodeChange:
    commit: str | None
    change_request: str
    reason: str | None = None
    summary: str = ""
    transcript: list[dict[str, Any]] = field(default_factory=list)


class CodeProposer:
    def __init__(
        self,
        reflection_lm: LanguageModel,
        agent_lm: LanguageModel,
        agent: CodingAgent,
        sandbox: Sandbox,
        workspace: GitWorkspace,
        *,
        entry: str,
        metric: str,
        agent_env: dict[str, str],
        additional_instructions: str = "",
        max_steps: int = 30,
        timeout_s: float = 900.0,
        readonly_paths: tuple[Path, ...] = (),
        agent_session: Callable[[SandboxPolicy, str], AbstractContextManager[SandboxPolicy]] | None = None,
        reflection_agent: bool = True,
        reflection_steps: int = MAX_STEPS,
        agent_max_usd: float | None = None,
        budget_left: Callable[[], Decimal | None] | None = None,
    ) -> None:
        """``readonly_paths`` (the user's interpreter) and ``agent_session`` (a gateway session
        per candidate) shape the agent's sandbox.

        ``reflection_agent`` picks the read-only tool loop over the single reflection call
        (``[optimize] reflection_agent``); ``reflection_steps`` caps its tool calls.

        Each agent may spend ``agent_max_usd`` (``[optimize] agent_max_usd``; None: no cap of its own)
        and never more than ``budget_left()``, what is left of the run's ``max_usd`` (None: no run budget).
        """
        self.reflection_agent = ReflectionAgent(reflection_lm, reflection_steps) if reflection_agent else None
        self.readonly_paths = readonly_paths
        self.agent_session = agent_session
        self.reflection_lm = reflection_lm
        self.agent_lm = agent_lm
        self.agent = agent
        self.sandbox = sandbox
        self.workspace = workspace
        self.entry = entry
        self.metric = metric
        self.agent_env = agent_env
        self.additional_instructions = additional_instructions.strip()
        self.max_steps = max_steps
        self.timeout_s = timeout_s
        self.agent_max_usd = agent_max_usd
        self.budget_left = budget_left

    def change_request(
        self,
        parent_commit: str,
        components: dict[str, str],
        records: list[dict[str, str]],
        history: list[str],
        candidate_id: str,
    ) -> str:
        """The change request text: from the reflection agent, else from one reflection call."""
        if self.reflection_agent is not None:
            prompt = task_prompt(
                files=self.workspace.list_files(parent_commit),
                components=components,
                records=records,
                history=history,
                additional_instructions=self.additional_instructions,
                entry=self.entry,
                metric=self.metric,
                mode=choose_mode(history),
            )
            root = self.workspace.evaluation_dir(parent_commit)
            result = self.reflection_agent.run(root, prompt, candidate_id)
            if result.request is not None:
                return result.request.render()
            log.info("reflection agent for %s fell back to one call: %s", candidate_id, result.fallback_reason)
        return self.single_call_request(parent_commit, components, records, history, candidate_id)

    def single_call_request(
        self,
        parent_commit: str,
        components: dict[str, str],
        records: list[dict[str, str]],
        history: list[str],
        candidate_id: str,
    ) -> str:
        """One reflection call over the file list: the path for models that cannot call tools."""
        instructions = (
            f"\n## Constraints and ideas from the user\n{self.additional_instructions}\n"
            if self.additional_instructions
            else ""
        )
        prompt = TEMPLATE.format(
            files="\n".join(self.workspace.list_files(parent_commit)),
            components="\n".join(f"### {k}\n{v}" for k, v in components.items()) or "(none)",
            records=render(records),
            history="\n".join(f"- {h}" for h in history[-10:]) or "(none yet)",
            instructions=instructions,
            entry=self.entry,
            metric=self.metric,
        )
        reply = self.reflection_lm.complete(
            [{"role": "user", "content": prompt}], purpose="reflection", candidate_id=candidate_id
        )
        return reply.text.strip()

    def propose(
        self,
        parent_commit: str,
        components: dict[str, str],
        records: list[dict[str, str]],
        history: list[str],
        candidate_id: str,
        worktree: Path,
    ) -> CodeChange:
        request = self.change_request(parent_commit, components, records, history, candidate_id)
        if not request:
            return CodeChange(None, "", reason="the reflection model returned an empty change request")
        if self.additional_instructions:
            verdict = check_constraints(self.reflection_lm, request, self.additional_instructions, candidate_id)
            if verdict.violates:
                why = f"{verdict.constraint}: {verdict.why}" if verdict.constraint else verdict.why
                return CodeChange(
                    None, request, reason=f"the change request violates a stated constraint: {why or 'unspecified'}"
                )
        self.workspace.export(parent_commit, worktree)
        policy = SandboxPolicy(
            workdir=worktree,
            env=self.agent_env,
            readonly_paths=self.readonly_paths,
            timeout_s=min(120.0, self.timeout_s),
        )
        session = self.agent_session(policy, candidate_id) if self.agent_session else contextlib.nullcontext(policy)
        with session as policy:
            result = self._run_agent(request, worktree, policy, candidate_id)
        if not result.ok:
            return CodeChange(
                None,
                request,
                reason=result.reason or "the coding agent failed",
                summary=result.summary,
                transcript=result.transcript,
            )
        commit = self.workspace.commit_dir(worktree, parent_commit, f"codeevolver {candidate_id}: {request[:60]}")
        if commit is None:
            return CodeChange(
                None,
                request,
                reason="the coding agent changed nothing",
                summary=result.summary,
                transcript=result.transcript,
            )
        # The agent's tree becomes the child's evaluation export: the tree is written once, not twice.
        self.workspace.adopt(worktree, commit)
        return CodeChange(commit, request, summary=result.summary, transcript=result.transcript)

    def agent_budget(self) -> float | None:
        """What one agent may spend now: ``agent_max_usd``, capped at what is left of the run's budget."""
        caps = [self.agent_max_usd] if self.agent_max_usd is not None else []
        left = self.budget_left() if self.budget_left is not None else None
        if left is not None:
            caps.append(float(left))
        return min(caps) if caps else None

    def _run_agent(self, request: str, worktree: Path, policy: SandboxPolicy, candidate_id: str) -> AgentResult:
        max_usd = self.agent_budget()
        if max_usd is not None and max_usd <= 0:
            return AgentResult(ok=False, reason=RUN_BUDGET_SPENT + ": nothing was left for the coding agent")
        task = AgentTask(
            change_request=request,
            worktree=worktree,
            sandbox=self.sandbox,
            policy=policy,
            model=self.agent_lm,
            candidate_id=candidate_id,
            max_steps=self.max_steps,
            timeout_s=self.timeout_s,
            entry=self.entry,
            metric=self.metric,
            python=self.agent_env.get("PYTHON", "python3"),
            max_usd=max_usd,
        )
        return self.agent.run(task)
