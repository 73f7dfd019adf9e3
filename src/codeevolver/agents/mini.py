"""The ``mini`` coding agent: mini-swe-agent's loop, our model, our sandbox.

mini-swe-agent's :class:`DefaultAgent` runs in the orchestrator; we plug in two
adapters so that its loop never touches the host or a provider directly:

- :class:`SandboxEnvironment` runs each bash command through ``task.sandbox``
  with ``task.policy`` (workdir = the worktree, a per-command timeout);
- :class:`MeteredModel` sends each step through ``task.model`` so it is priced
  in our ledger and a dead endpoint surfaces as our ``ModelError``.

Commands run as ``bash -c`` (not ``-lc``): a login shell sources
``/etc/profile``, which resets ``PATH`` and would break the contract that the
command sees exactly ``policy.env``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")  # its import prints a banner otherwise

from minisweagent.agents.default import DefaultAgent
from minisweagent.config import get_config_from_spec
from minisweagent.exceptions import FormatError, Submitted, TimeExceeded
from minisweagent.models.utils.actions_toolcall import (
    BASH_TOOL,
    format_toolcall_observation_messages,
    parse_toolcall_actions,
)

from codeevolver.agents.base import AgentResult, AgentTask
from codeevolver.agents.mini_prompts import MINI_INSTANCE_TEMPLATE, MINI_SYSTEM_TEMPLATE
from codeevolver.agents.task_prompt import render_task
from codeevolver.errors import ModelError
from codeevolver.models.base import LanguageModel
from codeevolver.sandbox.base import Sandbox, SandboxPolicy

SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
TRANSCRIPT_CHARS = 6000
"""Each transcript entry keeps at most this many characters (head and tail)."""
MAX_FORMAT_ERRORS = 3
"""Replies in a row without a valid bash tool call before the agent gives up."""

# mini-swe-agent's own templates. The tool-calling config ("mini") words the
# format-error feedback for tool calls, but renders outputs with Jinja's tojson,
# which turns ' < > & in code into \u0027-style escapes; the default config
# shows outputs verbatim (head and tail past 10,000 characters), so we take that.
_TOOLCALL_CONFIG: dict[str, Any] = get_config_from_spec("mini")
_DEFAULT_CONFIG: dict[str, Any] = get_config_from_spec("default")
OBSERVATION_TEMPLATE: str = _DEFAULT_CONFIG["model"]["observation_template"]
FORMAT_ERROR_TEMPLATE: str = _TOOLCALL_CONFIG["model"]["format_error_template"]
NONINTERACTIVE_ENV: dict[str, str] = {
    **{k: str(v) for k, v in _TOOLCALL_CONFIG["environment"]["env"].items()},
    "GIT_PAGER": "cat",
    "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in the worktree the orchestrator commits
}


class SandboxEnvironment:
    """mini-swe-agent Environment whose ``execute`` goes through our Sandbox."""

    def __init__(self, sandbox: Sandbox, policy: SandboxPolicy, command_timeout_s: float, deadline: float):
        self.sandbox = sandbox
        self.policy = policy
        self.command_timeout_s = command_timeout_s
        self.deadline = deadline
        self.config = SimpleNamespace(cwd=str(policy.workdir), timeout=command_timeout_s)

    def execute(self, action: dict, cwd: str = "", *, timeout: float | None = None) -> dict[str, Any]:
        """Run one command; raise ``Submitted`` when it prints the submit marker."""
        command = action.get("command", "")
        # Never let one command outlive the agent's wall-clock budget.
        limit = min(timeout or self.command_timeout_s, max(1.0, self.deadline - time.monotonic()))
        policy = dataclasses.replace(self.policy, timeout_s=limit)
        result = self.sandbox.run(["bash", "-c", command], policy)
        output = result.stdout + result.stderr
        out: dict[str, Any] = {"output": output, "returncode": result.returncode, "exception_info": ""}
        if result.timed_out:
            out["exception_info"] = f"the command timed out after {limit:.0f} s and was killed"
        _check_submitted(out)
        return out

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return {"cwd": str(self.policy.workdir), "command_timeout_s": int(self.command_timeout_s), **kwargs}

    def serialize(self) -> dict[str, Any]:
        return {"info": {"config": {"environment_type": f"codeevolver sandbox {self.sandbox.name}"}}}


def _check_submitted(output: dict[str, Any]) -> None:
    """Same rule as mini-swe-agent's LocalEnvironment: marker on the first line, exit 0."""
    lines = output["output"].lstrip().splitlines(keepends=True)
    if lines and lines[0].strip() == SUBMIT_MARKER and output["returncode"] == 0:
        submission = "".join(lines[1:])
        raise Submitted(
            {
                "role": "exit",
                "content": submission,
                "extra": {"exit_status": "Submitted", "submission": submission},
            }
        )


class MeteredModel:
    """mini-swe-agent Model that calls our LanguageModel with the bash tool."""

    def __init__(self, model: LanguageModel, candidate_id: str | None):
        self.model = model
        self.candidate_id = candidate_id
        self.config = SimpleNamespace(model_name=model.spec.name)
        self.observation_template = OBSERVATION_TEMPLATE
        self.format_error_template = FORMAT_ERROR_TEMPLATE

    def query(self, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        """One metered call; the reply as a message dict with parsed ``extra.actions``."""
        prepared = [{k: v for k, v in m.items() if k != "extra"} for m in messages]
        completion = self.model.complete(prepared, purpose="agent", tools=[BASH_TOOL], candidate_id=self.candidate_id)
        # The agent adds only float costs; the Decimal stays in our ledger.
        cost = float(completion.usage.cost_usd) if completion.usage else 0.0
        message = dict(completion.message)
        calls = [
            SimpleNamespace(id=c["id"], function=SimpleNamespace(name=c["name"], arguments=c["arguments"]))
            for c in completion.tool_calls
        ]
        try:
            actions = parse_toolcall_actions(calls, format_error_template=self.format_error_template)
        except FormatError as exc:
            # Keep the reply in the conversation (and the transcript) before the feedback;
            # DefaultAgent reads the call's cost from the first message.
            message["extra"] = {"cost": cost, "format_error": True}
            exc.messages = (message, *exc.messages)
            raise
        message["extra"] = {"actions": actions, "cost": cost, "timestamp": time.time()}
        return message

    def format_message(self, **kwargs: Any) -> dict[str, Any]:
        return dict(kwargs)

    def format_observation_messages(
        self, message: dict[str, Any], outputs: list[dict[str, Any]], template_vars: dict | None = None
    ) -> list[dict[str, Any]]:
        return format_toolcall_observation_messages(
            actions=message.get("extra", {}).get("actions", []),
            outputs=outputs,
            observation_template=self.observation_template,
            template_vars=template_vars,
        )

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        return {"model_name": self.model.spec.name, **kwargs}

    def serialize(self) -> dict[str, Any]:
        return {"info": {"config": {"model": {"model_name": self.model.spec.name}}}}


class _DeadlineAgent(DefaultAgent):
    """DefaultAgent with a float, monotonic wall-clock limit checked before each step."""

    def __init__(self, model: MeteredModel, env: SandboxEnvironment, deadline: float, **kwargs: Any):
        super().__init__(model, env, **kwargs)
        self.deadline = deadline

    def query(self) -> dict:
        if time.monotonic() >= self.deadline:
            raise TimeExceeded({"role": "exit", "content": "TimeExceeded", "extra": {"exit_status": "TimeExceeded"}})
        return super().query()


class MiniSweAgent:
    """Coding agent for OpenAI-compatible endpoints: its loop here, its shell in the sandbox."""

    name = "mini"

    def __init__(self, command_timeout_s: float = 120.0) -> None:
        self.command_timeout_s = command_timeout_s

    def run(self, task: AgentTask) -> AgentResult:
        deadline = time.monotonic() + task.timeout_s
        policy = dataclasses.replace(task.policy, workdir=task.worktree, env={**NONINTERACTIVE_ENV, **task.policy.env})
        command_timeout = min(self.command_timeout_s, task.policy.timeout_s or self.command_timeout_s)
        env = SandboxEnvironment(task.sandbox, policy, command_timeout, deadline)
        agent = _DeadlineAgent(
            MeteredModel(task.model, task.candidate_id),
            env,
            deadline,
            system_template=MINI_SYSTEM_TEMPLATE,
            instance_template=MINI_INSTANCE_TEMPLATE,
            step_limit=task.max_steps,
            cost_limit=task.max_usd or 0.0,  # by the ledger's prices; 0 is no limit (the run's is the engine's)
            max_consecutive_format_errors=MAX_FORMAT_ERRORS,
        )
        try:
            info = agent.run(render_task(task))
        except ModelError as exc:
            if _context_overflow(exc):
                return _result(agent, task, {"exit_status": "ContextWindowExceeded"})
            raise
        return _result(agent, task, info)


def _context_overflow(exc: ModelError) -> bool:
    """A conversation too long for the model is the agent's failure, not a dead endpoint."""
    cause = exc.__cause__
    return cause is not None and any(c.__name__ == "ContextWindowExceededError" for c in type(cause).__mro__)


def _result(agent: DefaultAgent, task: AgentTask, info: dict[str, Any]) -> AgentResult:
    status = info.get("exit_status", "")
    transcript = [_transcript_entry(m) for m in agent.messages]
    summary = _final_text(agent.messages) or str(info.get("submission", "")).strip()
    if status == "Submitted":
        return AgentResult(ok=True, summary=summary, transcript=transcript)
    if status == "LimitsExceeded" and task.max_usd is not None and agent.cost >= task.max_usd:
        reason = f"agent stopped: spent ${agent.cost:.4g} of its ${task.max_usd:.4g} budget"
        return AgentResult(ok=False, summary=summary, reason=reason, transcript=transcript)
    reasons = {
        "LimitsExceeded": f"agent stopped: exceeded {task.max_steps} steps",
        "TimeExceeded": f"agent stopped: exceeded the {task.timeout_s:g} s timeout",
        "RepeatedFormatError": (f"agent stopped: {MAX_FORMAT_ERRORS} replies in a row without a bash tool call"),
        "ContextWindowExceeded": "agent stopped: the conversation exceeded the model's context window",
    }
    reason = reasons.get(status, f"agent stopped: {status or 'unknown reason'}")
    return AgentResult(ok=False, summary=summary, reason=reason, transcript=transcript)


def _final_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "assistant" and (message.get("content") or "").strip():
            return str(message["content"]).strip()
    return ""


def _transcript_entry(message: dict[str, Any]) -> dict[str, Any]:
    """``{"role", "content"}``: commands spelled out as ``$ cmd``, outputs verbatim."""
    extra = message.get("extra", {})
    content = str(message.get("content") or "")
    commands = [a["command"] for a in extra.get("actions", [])]
    if commands:
        content = "\n".join([content, *(f"$ {c}" for c in commands)]).strip()
    elif message.get("role") == "tool":
        content = str(extra.get("raw_output", content))
        if extra.get("returncode") not in (0, None):
            content += f"\n[exit status {extra['returncode']}]"
        if extra.get("exception_info"):
            content += f"\n[{extra['exception_info']}]"
    return {"role": message.get("role", ""), "content": _clip(content, TRANSCRIPT_CHARS)}


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters elided ...]\n{text[-half:]}"
