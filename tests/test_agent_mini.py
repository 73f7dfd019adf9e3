"""The ``mini`` coding agent against a real scripted OpenAI server and the real unsafe sandbox."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from codeevolver.agents import AGENTS, get_agent
from codeevolver.agents.base import AgentTask
from codeevolver.agents.mini import MiniSweAgent
from codeevolver.errors import ConfigError, ModelError
from codeevolver.models.base import LanguageModel, ModelSpec
from codeevolver.sandbox.base import CommandResult, SandboxPolicy
from codeevolver.sandbox.unsafe import UnsafeSandbox
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer
from codeevolver.types import UsageRecord

CHANGE_REQUEST = "Make parse() strip whitespace around each field (ticket CE-4711)."
SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
EDIT = """python - <<'EOF'
from pathlib import Path
p = Path("parse.py")
p.write_text(p.read_text().replace('text.split(",")', '[t.strip() for t in text.split(",")]'))
EOF"""
SELF_CHECK = "python -c \"from parse import parse; print(parse('a, b'))\""


def bash(command: str, content: str | None = None) -> Reply:
    return Reply(content=content, tool_calls=[("bash", {"command": command})])


def scripted(replies: Sequence[Reply]) -> Callable[[dict[str, Any]], Reply]:
    """Answer the n-th request with the n-th reply (the last one repeats)."""
    seen: list[dict[str, Any]] = []

    def responder(body: dict[str, Any]) -> Reply:
        seen.append(body)
        return replies[min(len(seen), len(replies)) - 1]

    return responder


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "parse.py").write_text('def parse(text):\n    return text.split(",")\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "seed"], cwd=root, check=True)
    return root


def policy_env() -> dict[str, str]:
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}


def make_task(
    repo: Path, server_url: str, usage: list[UsageRecord], *, sandbox: Any = None, **overrides: Any
) -> AgentTask:
    model = LanguageModel(
        ModelSpec(name="openai/scripted", api_base=server_url, api_key="sk-test"),
        on_usage=usage.append,
        num_retries=0,
    )
    fields: dict[str, Any] = {
        "change_request": CHANGE_REQUEST,
        "worktree": repo,
        "sandbox": sandbox or UnsafeSandbox(),
        "policy": SandboxPolicy(workdir=Path("/nonexistent"), env=policy_env()),
        "model": model,
        "candidate_id": "cand-1",
        "max_steps": 10,
        "timeout_s": 60.0,
    }
    fields.update(overrides)
    return AgentTask(**fields)


def tool_outputs(request: dict[str, Any]) -> list[str]:
    """The command outputs the model was shown."""
    return [m["content"] for m in request["messages"] if m.get("role") == "tool"]


def test_edits_the_worktree_and_submits(repo: Path) -> None:
    replies = [
        bash("cat parse.py", "Let me read the parser."),
        bash(EDIT),
        bash(SELF_CHECK),
        bash(SUBMIT, "Made parse() strip whitespace around each field."),
    ]
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(scripted(replies)) as server:
        result = MiniSweAgent().run(make_task(repo, server.url, usage))

    assert result.ok, result.reason
    assert result.reason is None
    assert '[t.strip() for t in text.split(",")]' in (repo / "parse.py").read_text()
    assert result.summary == "Made parse() strip whitespace around each field."

    first = server.requests[0]
    assert [t["function"]["name"] for t in first["tools"]] == ["bash"]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["command"]
    assert CHANGE_REQUEST in first["messages"][1]["content"]
    assert "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT" in first["messages"][1]["content"]
    assert 'text.split(",")' in tool_outputs(server.requests[1])[0]
    assert "['a', 'b']" in tool_outputs(server.requests[3])[-1]

    assert len(server.requests) == 4
    assert len(usage) == 4
    assert {(u.purpose, u.candidate_id, u.model) for u in usage} == {("agent", "cand-1", "openai/scripted")}
    assert all(u.input_tokens > 0 and u.output_tokens > 0 for u in usage)

    text = json.dumps(result.transcript)
    assert all(set(entry) == {"role", "content"} for entry in result.transcript)
    assert "$ cat parse.py" in text and "['a', 'b']" in text
    assert result.transcript[-1]["role"] == "exit"
    # The agent left its change uncommitted: the orchestrator commits.
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True)
    assert status.stdout.strip() == "M parse.py"


def test_stops_after_max_steps(repo: Path) -> None:
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(scripted([bash("ls")])) as server:
        result = MiniSweAgent().run(make_task(repo, server.url, usage, max_steps=3))

    assert not result.ok
    assert result.reason == "agent stopped: exceeded 3 steps"
    assert len(server.requests) == 3
    assert len(usage) == 3


def test_stops_at_its_budget(repo: Path) -> None:
    usage: list[UsageRecord] = []
    one_dollar = Reply(tool_calls=[("bash", {"command": "ls"})], prompt_tokens=1000, completion_tokens=0)
    with ScriptedOpenAIServer(scripted([one_dollar])) as server:
        spec = ModelSpec("openai/scripted", api_base=server.url, api_key="sk-test",
                         input_usd_per_m=Decimal(1000), output_usd_per_m=Decimal(0))  # fmt: skip
        model = LanguageModel(spec, on_usage=usage.append, num_retries=0)
        result = MiniSweAgent().run(make_task(repo, server.url, usage, model=model, max_usd=2.5))

    assert not result.ok
    assert result.reason == "agent stopped: spent $3 of its $2.5 budget"
    assert len(server.requests) == 3 and sum(u.cost_usd for u in usage) == 3


def test_plain_text_reply_gets_format_feedback_and_continues(repo: Path) -> None:
    replies = [Reply(content="I would read parse.py first."), bash(SUBMIT, "Nothing to change.")]
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(scripted(replies)) as server:
        result = MiniSweAgent().run(make_task(repo, server.url, usage))

    assert result.ok, result.reason
    assert result.summary == "Nothing to change."
    second = server.requests[1]["messages"]
    assert second[2] == {"role": "assistant", "content": "I would read parse.py first."}
    assert second[3]["role"] == "user"
    assert "No tool calls found" in second[3]["content"]
    assert len(usage) == 2


def test_repeated_plain_text_gives_up(repo: Path) -> None:
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(scripted([Reply(content="hmm")])) as server:
        result = MiniSweAgent().run(make_task(repo, server.url, usage))

    assert not result.ok
    assert result.reason == "agent stopped: 3 replies in a row without a bash tool call"
    assert len(server.requests) == 3


def test_unreachable_endpoint_raises_model_error(repo: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    usage: list[UsageRecord] = []
    with pytest.raises(ModelError, match="cannot reach"):
        MiniSweAgent().run(make_task(repo, f"http://127.0.0.1:{port}/v1", usage))
    assert usage == []


def test_context_overflow_is_an_agent_failure(repo: Path) -> None:
    overflow = Reply(status=400, error_message="This model's maximum context length is 4096 tokens.")
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(scripted([bash("ls"), overflow])) as server:
        result = MiniSweAgent().run(make_task(repo, server.url, usage))

    assert not result.ok
    assert result.reason == "agent stopped: the conversation exceeded the model's context window"
    assert len(usage) == 1


class RecordingSandbox(UnsafeSandbox):
    """The real unsafe tier, keeping what it was asked to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], SandboxPolicy]] = []

    def run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None = None) -> CommandResult:
        self.calls.append((list(argv), policy))
        return super().run(argv, policy, stdin)


def test_commands_run_in_the_sandbox_with_the_policy_env(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CE_PROBE_SECRET", "leaked")
    probe = 'echo "probe=${CE_PROBE_SECRET:-unset} policy=$POLICY_VAR pager=$PAGER"; pwd'
    env = policy_env() | {"POLICY_VAR": "visible"}
    sandbox = RecordingSandbox()
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(scripted([bash(probe), bash(SUBMIT)])) as server:
        task = make_task(repo, server.url, usage, sandbox=sandbox, policy=SandboxPolicy(workdir=Path("/"), env=env))
        result = MiniSweAgent(command_timeout_s=30).run(task)

    assert result.ok, result.reason
    observed = tool_outputs(server.requests[1])[0]
    assert "probe=unset policy=visible pager=cat" in observed
    assert str(repo.resolve()) in observed
    argv, policy = sandbox.calls[0]
    assert argv == ["bash", "-c", probe]
    assert policy.workdir == repo
    assert policy.timeout_s is not None and 0 < policy.timeout_s <= 30
    assert "CE_PROBE_SECRET" not in policy.env


def test_wall_clock_timeout_kills_the_command_and_stops(repo: Path) -> None:
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(scripted([bash("sleep 30"), bash(SUBMIT)])) as server:
        started = time.monotonic()
        result = MiniSweAgent().run(make_task(repo, server.url, usage, timeout_s=1.5))
        elapsed = time.monotonic() - started

    assert not result.ok
    assert result.reason == "agent stopped: exceeded the 1.5 s timeout"
    assert elapsed < 10
    assert len(server.requests) == 1
    assert "timed out" in json.dumps(result.transcript)


def test_registry() -> None:
    assert AGENTS["mini"] == "codeevolver.agents.mini:MiniSweAgent"
    agent = get_agent("mini")
    assert isinstance(agent, MiniSweAgent)
    assert agent.name == "mini"
    with pytest.raises(ConfigError, match="use one of: claude, mini"):
        get_agent("nope")
