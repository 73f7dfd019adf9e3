"""The ``claude`` coding agent: the Claude Agent SDK here, the Claude Code CLI inside the sandbox.

::

    orchestrator (this process)                  sandbox (task.sandbox, task.policy)
    ───────────────────────────                  ───────────────────────────────────
    ClaudeSDKClient ── stdin/stdout (control ──▶ wrapper ▶ python -m codeevolver.sandbox.attach
      can_use_tool      protocol, stream-json)      ▶ bwrap ... claude --output-format stream-json ...
      (user proxy)                                    cwd = the worktree, uid 65534, no network but
                                                      the gateway: ANTHROPIC_BASE_URL + placeholder key

The SDK starts what it believes is the CLI binary; it is a wrapper
(``attach.prepare``) that runs the real binary in the sandbox with its pipes
attached. The CLI's environment is exactly the policy's: the gateway's
``ANTHROPIC_BASE_URL`` and placeholder ``ANTHROPIC_API_KEY`` (the real key never
enters the sandbox), ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` (otherwise it
calls api.anthropic.com itself), ``IS_SANDBOX=1`` (``bypassPermissions`` is refused
to root otherwise; inside bwrap it is uid 65534 anyway). ``bypassPermissions`` is
safe only because of the sandbox.

Usage is metered by the gateway's ledger, never from the CLI's ``total_cost_usd``
(list prices, even for models that are not Claude). The sandbox's own wall
timeout (``task.timeout_s``) kills the CLI and everything it started; a slightly
later timer here is the backstop.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import claude_agent_sdk as sdk

from codeevolver.agents.base import RUN_BUDGET_SPENT, AgentResult, AgentTask
from codeevolver.agents.task_prompt import render_task
from codeevolver.errors import CodeEvolverError, ConfigError, ModelError, SandboxError
from codeevolver.sandbox import attach

TOOLS = ("Read", "Write", "Edit", "Glob", "Grep", "Bash")
SDK_ENV = ("CLAUDE_CODE_ENTRYPOINT", "CLAUDE_AGENT_SDK_VERSION", "CLAUDE_CODE_SDK_READS_SESSION_STATE")
"""Variables the SDK adds to the CLI's environment itself; none can hold a secret."""
CLI_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "IS_SANDBOX": "1",
    "TMPDIR": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in the worktree the orchestrator commits
    "GIT_PAGER": "cat",
    "PAGER": "cat",
}
ATTACHED_TIERS = ("bwrap", "gvisor", "unsafe")
TRANSCRIPT_CHARS = 6000
"""Each transcript entry keeps at most this many characters (head and tail)."""
STDERR_LINES = 40
SYSTEM_APPEND = """\
You run non-interactively, inside a sandbox, as one step of an automatic optimizer: nobody will answer \
questions or review plans. Decide for yourself, act with the tools you have, and finish with a short summary."""
FINISHING = """
## Finishing

You have at most {max_steps} turns in all, so read only what you need. When you are done, reply with a short \
summary of what you changed and why (no tool call in that reply).
"""


class ClaudeCodeAgent:
    """Coding agent for Anthropic-compatible endpoints: the SDK here, the Claude Code CLI in the sandbox."""

    name = "claude"

    def __init__(self, cli_path: str | Path | None = None, max_retries: int = 2, stop_grace_s: float = 15.0) -> None:
        """``cli_path`` overrides the CLI bundled with the SDK; ``max_retries`` is the CLI's per-request retries."""
        self.cli_path = Path(cli_path) if cli_path is not None else None
        self.max_retries = max_retries
        self.stop_grace_s = stop_grace_s

    def run(self, task: AgentTask) -> AgentResult:
        if task.sandbox.name not in ATTACHED_TIERS:
            raise SandboxError(
                f"the claude coding agent cannot run in the {task.sandbox.name} tier yet",
                f'use a tier among {", ".join(ATTACHED_TIERS)}, or coding_agent = "mini"',
            )
        env = task.policy.env
        if "ANTHROPIC_BASE_URL" not in env and "ANTHROPIC_API_KEY" not in env:
            raise ConfigError(
                "the claude coding agent has no Anthropic endpoint in its sandbox",
                'set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for another endpoint), or coding_agent = "mini"',
            )
        directory = Path(tempfile.mkdtemp(prefix="codeevolver-claude-"))
        try:
            return anyio.run(self._run, task, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    async def _run(self, task: AgentTask, directory: Path) -> AgentResult:
        cli = self._cli()
        command_timeout_ms = str(int((task.policy.timeout_s or 120.0) * 1000))
        policy = dataclasses.replace(
            task.policy,
            workdir=task.worktree,
            env={
                **task.policy.env,
                **CLI_ENV,
                "CLAUDE_CODE_MAX_RETRIES": str(self.max_retries),
                "BASH_DEFAULT_TIMEOUT_MS": command_timeout_ms,
                "BASH_MAX_TIMEOUT_MS": command_timeout_ms,
            },
            readonly_paths=(*task.policy.readonly_paths, cli),
            timeout_s=task.timeout_s,
        )
        attached = attach.prepare(directory / "attach", task.sandbox.name, policy, [str(cli)], inherit=SDK_ENV)
        stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        options = sdk.ClaudeAgentOptions(
            cwd=str(task.worktree),
            cli_path=str(attached.script),
            env=attached.env,
            model=_cli_model(task.model.spec.name),
            system_prompt={"type": "preset", "preset": "claude_code", "append": SYSTEM_APPEND},
            tools=list(TOOLS),
            allowed_tools=list(TOOLS),
            permission_mode="bypassPermissions",
            hooks={"PreToolUse": [sdk.HookMatcher(matcher=None, hooks=[_user_proxy])]},
            max_turns=task.max_steps or None,
            max_budget_usd=task.max_usd,
            stderr=stderr.append,
        )
        prompt = render_task(task) + FINISHING.format(max_steps=task.max_steps)
        transcript = _Transcript()
        transcript.step("user", prompt)
        started = time.monotonic()
        try:
            with anyio.fail_after(task.timeout_s + self.stop_grace_s):
                async with sdk.ClaudeSDKClient(options) as client:
                    await client.query(prompt)
                    async for message in client.receive_response():
                        transcript.add(message)
        except TimeoutError:
            return transcript.failed(_timeout_reason(task))
        except sdk.ProcessError as exc:
            if exc.exit_code == attach.TIMED_OUT or time.monotonic() - started >= task.timeout_s:
                return transcript.failed(_timeout_reason(task))
            if exc.exit_code == attach.CANNOT_START:
                raise SandboxError(f"the claude agent's sandbox did not start: {_last(stderr)}", None) from exc
            return transcript.failed(f"the Claude Code CLI exited with status {exc.exit_code}: {_last(stderr)}")
        except Exception as exc:  # the SDK reports some CLI deaths as a bare Exception
            if isinstance(exc, CodeEvolverError):
                raise
            return transcript.failed(f"the Claude Code CLI failed: {exc}; {_last(stderr)}")
        return transcript.result(task)

    def _cli(self) -> Path:
        """The CLI binary: given, bundled with the SDK wheel, or on PATH."""
        if self.cli_path is not None:
            return self.cli_path.resolve()
        bundled = Path(sdk.__file__).parent / "_bundled" / "claude"
        if bundled.is_file():
            return bundled.resolve()
        found = shutil.which("claude")
        if found is None:
            raise ConfigError(
                "the Claude Code CLI was not found (the claude-agent-sdk wheel bundles it)",
                "pip install the claude-agent-sdk wheel for this platform, or pass cli_path",
            )
        return Path(found).resolve()


async def _user_proxy(
    hook_input: sdk.HookInput, tool_use_id: str | None, context: sdk.HookContext
) -> sdk.HookJSONOutput:
    """PreToolUse hook standing in for the absent user: approve plans, answer questions with the first option.

    A hook, not ``can_use_tool``: under ``bypassPermissions`` the CLI never consults that callback,
    while hooks run before every tool call in every mode. Tools outside :data:`TOOLS` are refused.
    """
    tool = str(hook_input.get("tool_name", ""))
    raw: Any = hook_input.get("tool_input") or {}
    tool_input: dict[str, Any] = dict(raw)
    if tool in TOOLS:
        return {}
    decision: sdk.PreToolUseHookSpecificOutput = {"hookEventName": "PreToolUse", "permissionDecision": "allow"}
    if tool == "AskUserQuestion":
        answers = {}
        for question in tool_input.get("questions") or []:
            options = question.get("options") or []
            if options:
                answers[str(question.get("question", ""))] = str(options[0].get("label", ""))
        decision["updatedInput"] = {**tool_input, "answers": answers}
        decision["permissionDecisionReason"] = "no user here: the first option was chosen"
    elif tool != "ExitPlanMode":
        decision["permissionDecision"] = "deny"
        decision["permissionDecisionReason"] = f"{tool} is not available here; use one of {', '.join(TOOLS)}"
    return {"hookSpecificOutput": decision}


class _Transcript:
    """The SDK's messages as ``{"role", "content"}`` steps, and how the session ended."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.outcome: sdk.ResultMessage | None = None
        self.api_error: str | None = None
        self.last_text = ""

    def add(self, message: Any) -> None:
        if isinstance(message, sdk.AssistantMessage):
            if message.error is not None:
                text = " ".join(b.text for b in message.content if isinstance(b, sdk.TextBlock))
                self.api_error = f"{message.error}: {text}".strip()
            for block in message.content:
                if isinstance(block, sdk.TextBlock) and block.text.strip():
                    self.last_text = block.text.strip()
                    self.step("assistant", block.text)
                elif isinstance(block, sdk.ToolUseBlock):
                    self.step("assistant", _tool_call(block))
        elif isinstance(message, sdk.UserMessage) and isinstance(message.content, list):
            for block in message.content:
                if isinstance(block, sdk.ToolResultBlock):
                    text = _tool_output(block.content)
                    self.step("tool", text + ("\n[tool error]" if block.is_error else ""))
        elif isinstance(message, sdk.ResultMessage):
            self.outcome = message
            self.step("exit", f"{message.subtype}: {message.result or ''}".strip())

    def step(self, role: str, content: str) -> None:
        self.steps.append({"role": role, "content": _clip(content, TRANSCRIPT_CHARS)})

    def failed(self, reason: str) -> AgentResult:
        return AgentResult(ok=False, summary=self.last_text, reason=reason, transcript=self.steps)

    def result(self, task: AgentTask) -> AgentResult:
        outcome = self.outcome
        if outcome is None:
            return self.failed("the Claude Code CLI ended without a result")
        if outcome.subtype == "error_max_turns":
            return self.failed(f"agent stopped: exceeded {task.max_steps} steps")
        if outcome.subtype == "error_max_budget_usd":
            return self.failed(f"agent stopped: exceeded its ${task.max_usd} safety budget")
        if outcome.is_error and (self.api_error is not None or outcome.api_error_status is not None):
            detail = self.api_error or f"status {outcome.api_error_status}: {outcome.result or ''}"
            lowered = detail.lower()
            if outcome.api_error_status == 402 or "budget_exceeded" in lowered or "spent its usd budget" in lowered:
                # The gateway refuses calls once the run's budget is spent: this change ends, the run goes on.
                return self.failed(f"{RUN_BUDGET_SPENT}: {_clip(detail, 300)}")
            if "prompt is too long" in lowered or ("context" in lowered and "exceed" in lowered):
                return self.failed("agent stopped: the conversation exceeded the model's context window")
            raise ModelError(
                f"the claude coding agent's model call failed: {detail}",
                "check the Anthropic endpoint, key and model name (`codeevolver doctor`)",
            )
        if outcome.is_error or outcome.subtype != "success":
            return self.failed(f"agent stopped: {outcome.subtype} {outcome.result or ''}".strip())
        return AgentResult(ok=True, summary=(outcome.result or self.last_text).strip(), transcript=self.steps)


def _tool_call(block: sdk.ToolUseBlock) -> str:
    if block.name == "Bash":
        return f"$ {block.input.get('command', '')}"
    return f"{block.name} {json.dumps(block.input, ensure_ascii=False)}"


def _tool_output(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", part)) if isinstance(part, dict) else str(part) for part in content)


def _cli_model(name: str) -> str:
    """litellm's ``anthropic/claude-…`` is the CLI's ``claude-…``; other names pass unchanged."""
    return name.removeprefix("anthropic/")


def _timeout_reason(task: AgentTask) -> str:
    return f"agent stopped: exceeded the {task.timeout_s:g} s timeout"


def _last(lines: collections.deque[str]) -> str:
    return " | ".join(list(lines)[-5:]) or "no output on stderr"


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters elided ...]\n{text[-half:]}"
