"""A scripted 'world' for end-to-end tests: the support_router example plus a model that plays
the task model, the reflection model and the coding agent, deterministically.

The task model answers tickets correctly but capitalised ("Billing urgent"), which the seed's
naive parser rejects; it answers in lowercase only when the system prompt carries
``GOOD_MARKER``. So a prompt rewrite that adds the marker, or a code change that lowercases
the text in the parser, each fix the program: both paths are real improvements.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codeevolver.testing.fake_openai import Reply

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "support_router"
GOOD_MARKER = "LABEL_RULES_V2"
GOOD_PROMPT = f"{GOOD_MARKER}: answer with the lowercase label, a space, then the priority."
BAD_PROMPT = "Answer in French, with a long explanation."
LOWERCASE_FIX = "sed -i 's/words = text.split()/words = text.lower().split()/' router/pipeline.py"


def load_truth() -> dict[str, dict[str, Any]]:
    truth = {}
    for name in ("train", "val"):
        for line in (EXAMPLE / "data" / f"{name}.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                truth[row["ticket"]] = row
    return truth


class RouterWorld:
    """The responder for ScriptedOpenAIServer; counts and times what each role asked."""

    def __init__(
        self,
        reflection_prompt: str = GOOD_PROMPT,
        agent_command: str = LOWERCASE_FIX,
        reflection_delay_s: float = 0.0,
        task_delay_s: float = 0.0,
    ) -> None:
        self.truth = load_truth()
        self.reflection_prompt = reflection_prompt
        self.agent_command = agent_command
        self.reflection_delay_s = reflection_delay_s
        self.task_delay_s = task_delay_s
        self.calls: dict[str, int] = {"task": 0, "reflection": 0, "agent": 0, "change_request": 0}
        self.reflection_in_flight = 0
        self.max_reflection_in_flight = 0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        messages = body["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        user = messages[-1]["content"] if isinstance(messages[-1].get("content"), str) else ""
        tools = [tool["function"]["name"] for tool in body.get("tools") or []]
        if "submit_change_request" in tools:  # the read-only reflection agent: submit at once
            self._count("change_request")
            return Reply(
                tool_calls=[
                    (
                        "submit_change_request",
                        {
                            "what": "lowercase the model's text in parse() before matching labels",
                            "where": ["router/pipeline.py"],
                            "why": "the model answers with capitalised labels",
                            "expected_effect": "every example matches its label",
                        },
                    )
                ]
            )
        if "Bash" in tools:  # the Claude Code CLI, through the gateway's Anthropic->OpenAI translation
            return self._claude(messages)
        if tools:
            return self._agent(messages)
        if user in self.truth:
            self._count("task")
            row = self.truth[user]
            if GOOD_MARKER in system:
                return Reply(f"{row['label']} {row['priority']}", delay_s=self.task_delay_s)
            return Reply(f"{row['label'].capitalize()} {row['priority']}", delay_s=self.task_delay_s)
        if "Reply with OK" in user:
            return "OK"
        if "architect" in user:
            self._count("change_request")
            return "In router/pipeline.py, lowercase the model's text in parse() before matching labels."
        return self._reflect()

    def _count(self, role: str) -> None:
        with self._lock:
            self.calls[role] += 1

    def _reflect(self) -> Reply:
        with self._lock:
            self.calls["reflection"] += 1
            self.reflection_in_flight += 1
            self.max_reflection_in_flight = max(self.max_reflection_in_flight, self.reflection_in_flight)
        try:
            time.sleep(self.reflection_delay_s)
            return Reply(f"Here is the new prompt:\n```\n{self.reflection_prompt}\n```")
        finally:
            with self._lock:
                self.reflection_in_flight -= 1

    def _agent(self, messages: list[dict[str, Any]]) -> Reply:
        self._count("agent")
        turns = sum(1 for m in messages if m["role"] == "assistant")
        if turns == 0:
            return Reply(
                tool_calls=[("bash", {"command": f"{self.agent_command} && grep -c lower router/pipeline.py"})]
            )
        return Reply(tool_calls=[("bash", {"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"})])

    def _claude(self, messages: list[dict[str, Any]]) -> Reply:
        self._count("agent")
        if not any(m["role"] == "assistant" for m in messages):
            command = f"{self.agent_command} && grep -c lower router/pipeline.py"
            return Reply(tool_calls=[("Bash", {"command": command, "description": "apply the fix"})])
        return Reply("Lowercased the model's text in parse() before matching labels.")


def make_repo(dest: Path, edit: Callable[[Path], None] | None = None) -> Path:
    """Copy the support_router example into ``dest`` as a fresh git repository."""
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    if edit is not None:
        edit(dest)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "seed"], cwd=dest, check=True
    )
    return dest


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codeevolver.cli.main", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
    )


def popen_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "codeevolver.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or cli_env(),
    )
