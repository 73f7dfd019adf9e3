"""The read-only reflection agent and the constraint check, against a real scripted OpenAI server.

Everything is real: a git repository, the GitWorkspace, the ``mini`` coding agent on the unsafe
sandbox and litellm over HTTP; only the model's answers are scripted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from codeevolver.agents.mini import MiniSweAgent
from codeevolver.config import parse_config
from codeevolver.errors import ConfigError
from codeevolver.models.base import LanguageModel, ModelSpec
from codeevolver.proposers.code import CodeChange, CodeProposer
from codeevolver.proposers.reflection_agent import (
    ToolError,
    WorktreeTools,
    choose_mode,
    parse_verdict,
)
from codeevolver.sandbox.unsafe import UnsafeSandbox
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer
from codeevolver.types import UsageRecord
from codeevolver.workspace.git import GitWorkspace

SEED = 'def parse(text):\n    return text.split(",")  # PARSE_MARKER\n'
EDIT = 'sed -i \'s/text.split(",")/[t.strip() for t in text.split(",")]/\' parse.py'
SUBMIT_BASH = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
REQUEST = {
    "what": "Strip whitespace around each field returned by parse()",
    "where": ["parse.py"],
    "why": "Outputs keep a leading space (' b'), so every multi-field example fails",
    "expected_effect": "Multi-field examples become exact matches; score rises from 0.3 to about 1.0",
}
FALLBACK_TEXT = "In parse.py, strip whitespace around each field (single-call fallback)."
RECORDS = [{"Inputs": '{"text": "a, b"}', "Output": "['a', ' b']", "Score": "0", "Feedback": "expected ['a', 'b']"}]
HISTORY = ["c002 (rejected, minibatch 0.3 not above the parent 0.3): UNIQUE_EARLIER_IDEA cache the model calls"]


def tool_names(body: dict[str, Any]) -> list[str]:
    return [t["function"]["name"] for t in body.get("tools") or []]


def user_text(body: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))


class World:
    """Plays the reflection agent, the single-call reflection, the constraint checker and the coding agent."""

    def __init__(
        self,
        reflection: list[Reply | Callable[[dict[str, Any]], Reply]],
        checker: str = '{"violates": false, "constraint": "", "why": "fine"}',
    ) -> None:
        self.reflection = reflection
        self.checker = checker
        self.roles: list[str] = []

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        names = tool_names(body)
        turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if "submit_change_request" in names:
            self.roles.append("reflection_agent")
            step = self.reflection[min(turns, len(self.reflection) - 1)]
            return step(body) if callable(step) else step
        if "bash" in names:
            self.roles.append("coding_agent")
            return Reply(tool_calls=[("bash", {"command": EDIT if turns == 0 else SUBMIT_BASH})])
        text = user_text(body)
        if "<constraints>" in text:
            self.roles.append("checker")
            return self.checker
        assert "architect" in text, text
        self.roles.append("single_call")
        return FALLBACK_TEXT


def read(path: str) -> Reply:
    return Reply(tool_calls=[("read_file", {"path": path})])


def submit(**overrides: Any) -> Reply:
    return Reply(tool_calls=[("submit_change_request", REQUEST | overrides)])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "parse.py").write_text(SEED)
    (root / "pkg").mkdir()
    (root / "pkg" / "util.py").write_text("HELPER = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "seed"], cwd=root, check=True)
    return root


def head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def proposer(repo: Path, tmp_path: Path, url: str, usage: list[UsageRecord], **kwargs: Any) -> CodeProposer:
    model = LanguageModel(
        ModelSpec(name="openai/scripted", api_base=url, api_key="sk-test"), on_usage=usage.append, num_retries=0
    )
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"}
    return CodeProposer(
        model,
        model,
        MiniSweAgent(),
        UnsafeSandbox(),
        GitWorkspace(repo, tmp_path / "work"),
        entry="parse:parse",
        metric="metric:score",
        agent_env=env,
        max_steps=5,
        timeout_s=60.0,
        **kwargs,
    )


def propose(cp: CodeProposer, repo: Path, worktree: Path, history: list[str] | None = None) -> CodeChange:
    return cp.propose(head(repo), {"instructions": "Split on commas."}, RECORDS, history or [], "c003", worktree)


def test_agent_reads_a_file_then_submits_a_structured_request(repo: Path, tmp_path: Path) -> None:
    world = World([read("parse.py"), submit()])
    usage: list[UsageRecord] = []
    worktree = tmp_path / "agent-c003"
    with ScriptedOpenAIServer(world) as server:
        change = propose(proposer(repo, tmp_path, server.url, usage), repo, worktree)

    assert world.roles == ["reflection_agent", "reflection_agent", "coding_agent", "coding_agent"]
    assert change.commit is not None, change.reason
    # the model was shown the file it asked for, read from the parent's export
    tool_reply = [m for m in server.requests[1]["messages"] if m["role"] == "tool"]
    assert "PARSE_MARKER" in tool_reply[0]["content"] and "    1| def parse(text):" in tool_reply[0]["content"]
    # the coding agent got the structured request, rendered
    agent_task = user_text(server.requests[2])
    for part in (REQUEST["what"], "Where: parse.py", REQUEST["why"], REQUEST["expected_effect"]):
        assert part in change.change_request
        assert part in agent_task
    assert "Expected effect on the metric:" in agent_task
    assert [u.purpose for u in usage] == ["reflection", "reflection", "agent", "agent"]
    shown = subprocess.run(["git", "show", f"{change.commit}:parse.py"], cwd=repo, capture_output=True, text=True)
    assert "t.strip()" in shown.stdout


def test_tools_refuse_paths_that_leave_the_worktree(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\nSECRET_NOT = 0\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP_SECRET\n")
    (root / "link_out.txt").symlink_to(outside / "secret.txt")
    (root / "dir_out").symlink_to(outside)
    (root / "sub" / "link_in.py").symlink_to(root / "a.py")
    tools = WorktreeTools(root)

    for path in ("../../etc/passwd", "/etc/passwd", "link_out.txt", "dir_out/secret.txt", "sub/../../outside", "~"):
        with pytest.raises(ToolError, match="refused"):
            tools.read_file(path)
    with pytest.raises(ToolError, match="refused"):
        tools.list_dir("dir_out")
    # a symlink that stays inside is fine; walks never go through links
    assert "x = 1" in tools.read_file("sub/link_in.py")
    assert "TOP_SECRET" not in tools.grep("SECRET")
    assert "a.py:2: SECRET_NOT = 0" in tools.grep("SECRET")
    assert tools.glob("**/*.txt") == "(no files match **/*.txt)"
    assert "dir_out@ (symlink)" in tools.list_dir(".")
    with pytest.raises(ToolError):
        tools.glob("../*")


def test_tools_cap_what_they_return(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "big.py").write_text("".join(f"line_{i} = {i}\n" for i in range(5000)))
    tools = WorktreeTools(root, max_bytes=2000)
    text = tools.read_file("big.py")
    assert len(text.encode()) <= 2100 and "call read_file with start=" in text
    assert tools.read_file("big.py", start=4000, end=4001) == " 4000| line_3999 = 3999\n 4001| line_4000 = 4000"
    assert "[stopped" in tools.grep("line_")
    assert tools.grep("(unbalanced") == "(no matches for '(unbalanced')"


def test_escape_attempt_through_the_model_is_refused(repo: Path, tmp_path: Path) -> None:
    world = World([read("../../etc/passwd"), submit()])
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(world) as server:
        cp = proposer(repo, tmp_path, server.url, usage)
        request = cp.change_request(head(repo), {}, RECORDS, [], "c003")
    tool_reply = next(m for m in server.requests[1]["messages"] if m["role"] == "tool")
    assert tool_reply["content"].startswith("error: ../../etc/passwd: refused")
    assert "root:" not in json.dumps(server.requests[1])
    assert REQUEST["what"] in request


def test_history_and_mode_are_in_the_prompt(repo: Path, tmp_path: Path) -> None:
    world = World([submit()])
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(world) as server:
        cp = proposer(repo, tmp_path, server.url, usage, additional_instructions="Keep it in pure Python.")
        cp.change_request(head(repo), {}, RECORDS, HISTORY, "c003")
        cp.change_request(head(repo), {}, RECORDS, [], "c004")
    first, second = user_text(server.requests[0]), user_text(server.requests[1])
    assert "UNIQUE_EARLIER_IDEA" in first and "not above the parent" in first
    assert "EXPLORE A NEW DESIGN" in first and "FIX OBSERVED FAILURES" not in first
    assert "FIX OBSERVED FAILURES" in second and "(none yet)" in second
    assert "Keep it in pure Python." in first and "expected ['a', 'b']" in first
    assert "parse.py" in first and "pkg/util.py" in first
    assert [choose_mode(["x"] * n) for n in range(4)] == ["fix", "explore", "fix", "explore"]


@pytest.mark.parametrize(
    "reflection",
    [
        [Reply(content="You should strip whitespace in parse.py.")],  # plain text, no tool call
        [Reply(tool_calls=[("bash", {"command": "cat parse.py"})])],  # only tools it was not given
        [Reply(status=400, error_message="tools are not supported by this model")],  # endpoint refuses tools
    ],
    ids=["plain-text", "unknown-tools", "tools-refused"],
)
def test_model_without_tool_calls_falls_back_to_one_call(repo: Path, tmp_path: Path, reflection: list[Reply]) -> None:
    world = World(reflection)
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(world) as server:
        request = proposer(repo, tmp_path, server.url, usage).change_request(head(repo), {}, RECORDS, [], "c003")
    assert request == FALLBACK_TEXT
    assert world.roles[-1] == "single_call" and world.roles.count("single_call") == 1
    assert "tools" not in server.requests[-1]
    assert len(world.roles) <= 4  # gave up quickly, did not burn every step


def test_violating_request_is_rejected_before_any_export_or_agent(repo: Path, tmp_path: Path) -> None:
    verdict = '{"violates": true, "constraint": "no network calls", "why": "it adds an HTTP lookup"}'
    world = World([submit(what="Call a web API to normalise labels")], checker=verdict)
    usage: list[UsageRecord] = []
    worktree = tmp_path / "agent-c003"
    with ScriptedOpenAIServer(world) as server:
        cp = proposer(repo, tmp_path, server.url, usage, additional_instructions="Never add network calls.")
        change = propose(cp, repo, worktree)
    assert change.commit is None
    assert change.reason == (
        "the change request violates a stated constraint: no network calls: it adds an HTTP lookup"
    )
    assert "Call a web API" in change.change_request
    assert world.roles == ["reflection_agent", "checker"]
    assert not any("bash" in tool_names(body) for body in server.requests)
    assert not worktree.exists()
    checked = user_text(server.requests[-1])
    assert "Never add network calls." in checked and "Call a web API" in checked


def test_unparseable_verdict_does_not_block(repo: Path, tmp_path: Path) -> None:
    world = World([submit()], checker="I think it is probably fine?")
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(world) as server:
        cp = proposer(repo, tmp_path, server.url, usage, additional_instructions="Never add network calls.")
        change = propose(cp, repo, tmp_path / "agent-c003")
    assert change.commit is not None, change.reason
    assert world.roles[:2] == ["reflection_agent", "checker"] and "coding_agent" in world.roles


def test_parse_verdict() -> None:
    assert parse_verdict('```json\n{"violates": true, "constraint": "c", "why": "w"}\n```').violates
    assert not parse_verdict('{"violates": false}').violates
    for junk in ("", "yes", '{"violates": "yes"}', "{not json}"):
        verdict = parse_verdict(junk)
        assert not verdict.violates and not verdict.parsed


def test_config_switch_turns_the_agent_off(repo: Path, tmp_path: Path) -> None:
    program = {"framework": "python", "entry": "a:b", "metric": "a:c", "trainset": "t.jsonl"}
    path = tmp_path / "codeevolver.toml"
    assert parse_config({"program": program}, path).optimize.reflection_agent is True
    off = parse_config({"program": program, "optimize": {"reflection_agent": False}}, path)
    assert off.optimize.reflection_agent is False
    with pytest.raises(ConfigError) as err:
        parse_config({"program": program, "optimize": {"reflection_agnet": False}}, path)
    assert "did you mean 'reflection_agent'" in str(err.value)

    world = World([submit()])
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(world) as server:
        cp = proposer(repo, tmp_path, server.url, usage, reflection_agent=off.optimize.reflection_agent)
        request = cp.change_request(head(repo), {}, RECORDS, [], "c003")
    assert request == FALLBACK_TEXT
    assert world.roles == ["single_call"]
    assert "tools" not in server.requests[0]


def test_code_reflection_records_carry_every_components_calls_bounded() -> None:
    from codeevolver.proposers.reflective import CODE_TRACE_CHARS, build_records, render
    from codeevolver.types import ExampleResult

    traces = {
        "extract": [{"inputs": {"text": "a, b"}, "outputs": {"fields": "a| b"}}],
        "judge": [{"inputs": {"fields": "a| b"}, "outputs": {"verdict": "x" * 50_000}}],
        "unused": [],
    }
    results = [ExampleResult(0, 0.0, "expected ['a', 'b']", ["a", " b"], traces)]
    (code,) = build_records([{"text": "a, b"}], results, None)
    assert "a| b" in code["Calls of component 'extract'"]
    assert "verdict" in code["Calls of component 'judge'"]
    assert "Calls of component 'unused'" not in code
    traced = sum(len(v) for k, v in code.items() if k.startswith("Calls of"))
    assert traced <= CODE_TRACE_CHARS + 200  # the clip notes add a few characters
    assert "Calls of component 'extract'" in render([code])
    # a prompt mutation sees only its own component's calls
    (prompt,) = build_records([{"text": "a, b"}], results, "extract")
    assert [k for k in prompt if k.startswith("Calls")] == ["Calls of this component"]
