"""Both coding agents on an OpenAI-compatible model, in the real bwrap sandbox behind a real egress gateway.

- ``claude``: the real bundled Claude Code CLI speaks Anthropic Messages to the gateway's ``anthropic``
  route, which translates each call to chat completions (gateway/translate.py) for a scripted OpenAI
  server; the CLI holds only the session's placeholder key and names its own model, the upstream gets
  the real key and the operator's model.
- ``mini``: mini-swe-agent's loop calls the same server from here; each of its commands runs in bwrap
  with the same kind of gateway session, whose ``openai`` route is the sandbox's only way to the model.

Both carry out the same change as tests/test_agent_claude.py (read, edit, self-check, answer), and the
orchestrator commits the worktree as the code proposer does. Nothing is skipped when bwrap is missing.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from codeevolver.agents.base import AgentTask
from codeevolver.agents.claude import ClaudeCodeAgent
from codeevolver.agents.mini import MiniSweAgent
from codeevolver.gateway import EgressGateway, LLMUpstream, Prices, static_resolver
from codeevolver.gateway.testing import MemoryLedger
from codeevolver.models.base import LanguageModel, ModelSpec
from codeevolver.sandbox.base import SandboxPolicy
from codeevolver.sandbox.bwrap import BwrapSandbox
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer
from codeevolver.types import UsageRecord
from codeevolver.workspace.git import GitWorkspace

pytestmark = [
    pytest.mark.timeout(180),
    # litellm's TypedDicts, imported by the gateway's translation in the first test, warn in the second.
    pytest.mark.filterwarnings("ignore:Items? .* on TypedDict class .* using the `ReadOnly`:UserWarning"),
]

REAL_KEY = "sk-real-openai-compatible-key-agent-0123456789"
SERVED = "served-coder"
"""The model the operator's endpoint serves (``--agent-model openai/served-coder``)."""
PRICES = Prices(input=Decimal(1), output=Decimal(2))
CHANGE_REQUEST = "Make parse() strip whitespace around each field (ticket CE-4711)."
OLD = 'return text.split(",")'
NEW = 'return [t.strip() for t in text.split(",")]'
SUMMARY = "Made parse() strip whitespace around each field."


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def ledger() -> MemoryLedger:
    return MemoryLedger()


@pytest.fixture
def gateway(ledger: MemoryLedger) -> Iterator[EgressGateway]:
    with EgressGateway(ledger=ledger.add_usage, audit=ledger.add_audit, resolver=static_resolver({})) as gw:
        yield gw


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "parse.py").write_text(f"def parse(text):\n    {OLD}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "seed"], cwd=root, check=True)
    return root


@pytest.fixture
def workspace(repo: Path, tmp_path: Path) -> GitWorkspace:
    return GitWorkspace(repo, tmp_path / "work")


@pytest.fixture
def seed(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def worktree(workspace: GitWorkspace, seed: str, tmp_path: Path) -> Path:
    """A fresh export of the seed commit, as the code proposer makes one."""
    return workspace.export(seed, tmp_path / "work" / "cand-1")


def by_turn(replies: Sequence[Callable[[Path], Reply]], worktree: Path) -> Callable[[dict[str, Any]], Reply]:
    """Answer each chat request by how many assistant turns its conversation already holds."""

    def responder(body: dict[str, Any]) -> Reply:
        turn = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
        return replies[min(turn, len(replies) - 1)](worktree)

    return responder


def tool(name: str, args: Callable[[Path], dict[str, Any]], tokens: tuple[int, int]) -> Callable[[Path], Reply]:
    return lambda wt: Reply(tool_calls=[(name, args(wt))], prompt_tokens=tokens[0], completion_tokens=tokens[1])


def say(text: str, tokens: tuple[int, int]) -> Callable[[Path], Reply]:
    return lambda wt: Reply(content=text, prompt_tokens=tokens[0], completion_tokens=tokens[1])


def committed(workspace: GitWorkspace, worktree: Path, seed: str) -> str:
    """Commit the agent's worktree as CodeProposer does; the new parse.py as committed."""
    commit = workspace.commit_dir(worktree, seed, "codeevolver cand-1: strip fields")
    assert commit is not None
    return workspace.read_file(commit, "parse.py") or ""


# -- claude: the CLI through the Anthropic -> OpenAI translation ----------------------------


def test_claude_cli_on_an_openai_endpoint_through_the_translating_route(
    gateway: EgressGateway, ledger: MemoryLedger, workspace: GitWorkspace, seed: str, worktree: Path
) -> None:
    self_check = "python3 -c \"from parse import parse; print(parse('a, b'))\" && printenv ANTHROPIC_API_KEY"
    replies = [
        tool("Read", lambda wt: {"file_path": str(wt / "parse.py")}, (400, 30)),
        tool("Edit", lambda wt: {"file_path": str(wt / "parse.py"), "old_string": OLD, "new_string": NEW}, (500, 40)),
        tool("Bash", lambda wt: {"command": self_check}, (600, 20)),
        say(SUMMARY, (700, 10)),
    ]
    with ScriptedOpenAIServer(by_turn(replies, worktree), api_key=REAL_KEY) as server:
        route = LLMUpstream(server.url, REAL_KEY, "anthropic", prices=PRICES, upstream_protocol="openai", model=SERVED)
        session = gateway.open_session(
            "agent", run_id="run-1", candidate_id="cand-1", purpose="agent", llm_routes={"anthropic": route}
        )
        task = AgentTask(
            change_request=CHANGE_REQUEST,
            worktree=worktree,
            sandbox=BwrapSandbox(),
            policy=session.apply(SandboxPolicy(workdir=worktree, timeout_s=60)),
            # As session.py builds it for `--agent-model openai/served-coder`: the CLI is told this name.
            model=LanguageModel(ModelSpec(name=f"openai/{SERVED}"), num_retries=0),
            candidate_id="cand-1",
            max_steps=10,
            timeout_s=90.0,
            entry="parse:parse",
        )
        result = ClaudeCodeAgent(max_retries=0).run(task)
        assert gateway.flush()

    assert result.ok, (result.reason, result.transcript)
    assert result.summary == SUMMARY
    assert (worktree / "parse.py").read_text() == f"def parse(text):\n    {NEW}\n"
    assert sorted(p.name for p in worktree.iterdir()) == ["parse.py"]  # the CLI left nothing else
    assert NEW in committed(workspace, worktree, seed)

    # The upstream saw chat completions with the real key and the operator's model, never a claude-… name.
    assert len(server.requests) == 4
    assert [h["Authorization"] for h in server.headers] == [f"Bearer {REAL_KEY}"] * 4
    assert {body["model"] for body in server.requests} == {SERVED}
    assert all(body["stream"] is True and body["stream_options"] == {"include_usage": True} for body in server.requests)
    offered = {t["function"]["name"] for t in server.requests[0]["tools"]}
    assert {"Read", "Edit", "Bash"} <= offered, offered
    assert "CE-4711" in json.dumps(server.requests[0]["messages"])
    last = server.requests[-1]["messages"]
    assert any(m["role"] == "tool" and "['a', 'b']" in json.dumps(m["content"]) for m in last)

    # The CLI asked with the placeholder: the gateway lets a call through only when every key header it
    # carries is this session's placeholder; the CLI's environment held that and nothing else.
    assert not [row for row in ledger.audit if row.decision == "blocked"]
    tool_outputs = "\n".join(s["content"] for s in result.transcript if s["role"] == "tool")
    assert "['a', 'b']" in tool_outputs and session.placeholder_key in tool_outputs
    assert session.placeholder_key not in json.dumps(server.headers)
    assert REAL_KEY not in json.dumps(result.transcript) + result.summary

    # Every call is in the gateway's ledger with the endpoint's token counts and model, for the agent.
    assert [(u.input_tokens, u.output_tokens) for u in ledger.usage] == [(400, 30), (500, 40), (600, 20), (700, 10)]
    assert {(u.model, u.run_id, u.candidate_id, u.purpose) for u in ledger.usage} == {
        (SERVED, "run-1", "cand-1", "agent")
    }
    assert sum((u.cost_usd for u in ledger.usage), Decimal(0)) == Decimal("0.0024")  # 2,200 in at $1/M, 100 out at $2/M


# -- mini: its loop here, its commands in bwrap behind the gateway --------------------------


def test_mini_on_the_same_endpoint_runs_its_commands_in_bwrap_behind_the_gateway(
    gateway: EgressGateway, ledger: MemoryLedger, workspace: GitWorkspace, seed: str, worktree: Path
) -> None:
    edit = (
        "python3 - <<'EOF'\nfrom pathlib import Path\np = Path('parse.py')\n"
        f"p.write_text(p.read_text().replace({OLD!r}, {NEW!r}))\nEOF"
    )
    # The self-check also asks the model endpoint for its models the only way the sandbox can: the gateway.
    models = (
        'python3 -c "import json, os, urllib.request as u; '
        "r = u.Request(os.environ['OPENAI_BASE_URL'] + '/models', "
        "headers={'Authorization': 'Bearer ' + os.environ['OPENAI_API_KEY']}); "
        "print('served', json.load(u.urlopen(r, timeout=10))['data'][0]['id'])\" && echo key $OPENAI_API_KEY"
    )
    self_check = f"python3 -c \"from parse import parse; print(parse('a, b'))\" && {models} && id -u"
    replies = [
        tool("bash", lambda wt: {"command": "cat parse.py"}, (400, 30)),
        tool("bash", lambda wt: {"command": edit}, (500, 40)),
        tool("bash", lambda wt: {"command": self_check}, (600, 20)),
        lambda wt: Reply(
            content=SUMMARY, tool_calls=[("bash", {"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"})],
            prompt_tokens=700, completion_tokens=10,
        ),
    ]  # fmt: skip
    usage: list[UsageRecord] = []
    with ScriptedOpenAIServer(by_turn(replies, worktree), api_key=REAL_KEY, model=SERVED) as server:
        route = LLMUpstream(server.url, REAL_KEY, "openai", prices=PRICES)
        session = gateway.open_session(
            "agent", run_id="run-1", candidate_id="cand-1", purpose="agent", llm_routes={"openai": route}
        )
        policy = SandboxPolicy(workdir=worktree, env={"PATH": "/usr/bin:/bin"}, timeout_s=60)
        task = AgentTask(
            change_request=CHANGE_REQUEST,
            worktree=worktree,
            sandbox=BwrapSandbox(),
            policy=session.apply(policy),
            model=LanguageModel(
                ModelSpec(
                    f"openai/{SERVED}",
                    api_base=server.url,
                    api_key=REAL_KEY,
                    input_usd_per_m=PRICES.input,
                    output_usd_per_m=PRICES.output,
                ),
                usage.append,
                run_id="run-1",
                num_retries=0,
            ),
            candidate_id="cand-1",
            max_steps=10,
            timeout_s=90.0,
            entry="parse:parse",
        )
        result = MiniSweAgent(command_timeout_s=30).run(task)
        assert gateway.flush()

    assert result.ok, (result.reason, result.transcript)
    assert result.summary == SUMMARY
    assert (worktree / "parse.py").read_text() == f"def parse(text):\n    {NEW}\n"
    assert sorted(p.name for p in worktree.iterdir()) == ["parse.py"]
    assert NEW in committed(workspace, worktree, seed)

    # Four agent turns, metered by the orchestrator's LanguageModel with the endpoint's tokens.
    assert len(server.requests) == 4
    assert {body["model"] for body in server.requests} == {SERVED}
    assert [(u.input_tokens, u.output_tokens) for u in usage] == [(400, 30), (500, 40), (600, 20), (700, 10)]
    assert {(u.purpose, u.candidate_id) for u in usage} == {("agent", "cand-1")}
    assert sum((u.cost_usd for u in usage), Decimal(0)) == Decimal("0.0024")

    # The commands ran in bwrap (uid 65534) and reached the endpoint only through the gateway's route,
    # holding only the placeholder; the gateway audited the (unmetered) GET and blocked nothing.
    shown = "\n".join(s["content"] for s in result.transcript if s["role"] == "tool")
    assert "['a', 'b']" in shown and f"served {SERVED}" in shown and "\n65534" in shown
    assert f"key {session.placeholder_key}" in shown
    routed = [row for row in ledger.audit if row.path == "/openai/v1/models"]
    assert [(row.decision, row.status, row.sandbox_id) for row in routed] == [("allowed", 200, "agent")]
    assert not [row for row in ledger.audit if row.decision == "blocked"]
    assert ledger.usage == []  # a model listing bills nothing; the agent's own calls are metered above
    assert REAL_KEY not in json.dumps(result.transcript)
