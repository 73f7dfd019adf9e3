"""Wall time per code mutation, and what of it is orchestration and sandbox overhead, for both coding agents.

One mutation is what ``CodeProposer.propose`` does after the change request: a fresh export of the
seed commit of a small git repo (``GitWorkspace.export``), the coding agent's scripted 5-turn edit
(read, edit, self-check, a second check, finish) in the real bwrap sandbox behind a real egress
gateway session of its own, and the commit of the worktree (``GitWorkspace.commit_dir``). The models are
scripted local servers that answer at once (zero latency):

- ``claude``: the bundled Claude Code CLI in bwrap, its ``anthropic`` route onto a
  ``ScriptedAnthropicServer``;
- ``claude→openai``: the same, the route translating onto a ``ScriptedOpenAIServer`` (the CLI on an
  open model);
- ``mini``: mini-swe-agent's loop here, calling a ``ScriptedOpenAIServer`` through litellm, each
  command in its own bwrap sandbox with the gateway bridge.

WARMUP unmeasured then RUNS measured mutations per backend, the backends interleaved round by round
so that they share the machine's load. Printed per backend, medians over the runs, in ms:

- ``total``: export -> commit;
- ``model``: time inside the model servers' responders, as a timing wrapper sees it (near zero);
- ``1st req``: from the agent's start to its first model request;
- ``sandbox``: sandbox start. claude: one attached launch of ``true`` in the agent's sandbox (the
  launcher, bwrap with the gateway bridge, teardown), measured side by side after each mutation;
  mini: its command count times ``bash -c true`` through the same ``Sandbox.run`` and policy;
- ``CLI``: claude only, ``1st req`` minus ``sandbox``: the CLI (and the SDK's handshake) starting;
- ``commands``: mini only, the time inside ``Sandbox.run`` (starts included; the rest of its agent
  time is its loop and litellm);
- ``export``, ``commit``: the two git steps; ``session``: opening and closing the mutation's own
  gateway session (as ``RunEgress.agent_session`` does);
- ``work``: the agent's own shell commands (the edit script, the Python self-check, ``grep``; for mini
  also ``cat`` and the submit ``echo``; the CLI reads and edits with built-in tools) run bare, as
  plain subprocesses in the same worktree, side by side after each mutation: the program's time,
  which is neither orchestration nor sandbox;
- ``overhead``: ``total - model - work``, the figure the targets are about.

Targets (issue: "orchestration and sandbox overhead < 1.5 s per mutation with the Claude CLI,
< 0.3 s with mini-swe-agent").
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from harness import commit_repo, machine

from codeevolver.agents.base import AgentTask
from codeevolver.agents.claude import ClaudeCodeAgent
from codeevolver.agents.mini import MiniSweAgent
from codeevolver.gateway import EgressGateway, GatewaySession, LLMUpstream, Prices, static_resolver
from codeevolver.models.base import LanguageModel, ModelSpec
from codeevolver.sandbox import attach
from codeevolver.sandbox.base import CommandResult, SandboxPolicy
from codeevolver.sandbox.bwrap import BwrapSandbox
from codeevolver.testing.fake_anthropic import AnthropicReply, ScriptedAnthropicServer
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer
from codeevolver.workspace.git import GitWorkspace

RUNS = 10
WARMUP = 1
TARGET_MS = {"claude": 1500.0, "claude→openai": 1500.0, "mini": 300.0}
KEY = "sk-bench-real-key-0123456789"
PRICES = Prices(input=Decimal(1), output=Decimal(2))
OLD = 'return text.split(",")'
NEW = 'return [t.strip() for t in text.split(",")]'
REQUEST = "Make parse() strip whitespace around each field."
CHECK = "python3 -c \"from parse import parse; print(parse('a, b'))\""
SECOND_CHECK = "grep -n strip parse.py"
EDIT = (
    "python3 - <<'EOF'\nfrom pathlib import Path\np = Path('parse.py')\n"
    f"p.write_text(p.read_text().replace({OLD!r}, {NEW!r}))\nEOF"
)
SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
SHELL_COMMANDS = {"mini": ["cat parse.py", EDIT, CHECK, SECOND_CHECK, SUBMIT], "claude": [CHECK, SECOND_CHECK]}
"""The commands each backend runs as processes in its sandbox (the CLI's Read and Edit are built in)."""


class Clock:
    """Wraps a responder: when each model request arrived and how long answering it took."""

    def __init__(self, responder: Callable[[dict[str, Any]], Any]) -> None:
        self.responder = responder
        self.arrivals: list[float] = []
        self.inside_s = 0.0
        self._lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Any:
        started = time.monotonic()
        reply = self.responder(body)
        with self._lock:
            self.arrivals.append(started)
            self.inside_s += time.monotonic() - started
        return reply

    def reset(self) -> None:
        self.arrivals, self.inside_s = [], 0.0


def turn(body: dict[str, Any]) -> int:
    return sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")


class Worktree:
    """The worktree of the mutation in progress (the scripted tool calls name absolute paths)."""

    path = Path("/nonexistent")


def claude_anthropic(body: dict[str, Any]) -> AnthropicReply:
    wt = Worktree.path
    script = [
        AnthropicReply(tool_uses=[("Read", {"file_path": str(wt / "parse.py")})], input_tokens=400, output_tokens=30),
        AnthropicReply(
            tool_uses=[("Edit", {"file_path": str(wt / "parse.py"), "old_string": OLD, "new_string": NEW})],
            input_tokens=500, output_tokens=40,
        ),
        AnthropicReply(tool_uses=[("Bash", {"command": CHECK})], input_tokens=600, output_tokens=20),
        AnthropicReply(tool_uses=[("Bash", {"command": SECOND_CHECK})], input_tokens=650, output_tokens=20),
        AnthropicReply(text="Made parse() strip each field.", input_tokens=700, output_tokens=10),
    ]  # fmt: skip
    return script[min(turn(body), len(script) - 1)]


def claude_openai(body: dict[str, Any]) -> Reply:
    wt = Worktree.path
    script = [
        Reply(tool_calls=[("Read", {"file_path": str(wt / "parse.py")})], prompt_tokens=400, completion_tokens=30),
        Reply(
            tool_calls=[("Edit", {"file_path": str(wt / "parse.py"), "old_string": OLD, "new_string": NEW})],
            prompt_tokens=500, completion_tokens=40,
        ),
        Reply(tool_calls=[("Bash", {"command": CHECK})], prompt_tokens=600, completion_tokens=20),
        Reply(tool_calls=[("Bash", {"command": SECOND_CHECK})], prompt_tokens=650, completion_tokens=20),
        Reply(content="Made parse() strip each field.", prompt_tokens=700, completion_tokens=10),
    ]  # fmt: skip
    return script[min(turn(body), len(script) - 1)]


def mini_openai(body: dict[str, Any]) -> Reply:
    script = ["cat parse.py", EDIT, CHECK, SECOND_CHECK, SUBMIT]
    command = script[min(turn(body), len(script) - 1)]
    return Reply(tool_calls=[("bash", {"command": command})], prompt_tokens=500, completion_tokens=20)


class TimedSandbox(BwrapSandbox):
    """The real bwrap tier, counting the commands it runs and the time spent in them."""

    def __init__(self) -> None:
        self.commands = 0
        self.inside_s = 0.0

    def run(self, argv: Sequence[str], policy: SandboxPolicy, stdin: bytes | None = None) -> CommandResult:
        self.commands += 1
        started = time.monotonic()
        try:
            return super().run(argv, policy, stdin)
        finally:
            self.inside_s += time.monotonic() - started


@dataclasses.dataclass
class Backend:
    name: str
    clock: Clock
    gateway: EgressGateway
    routes: dict[str, LLMUpstream]
    agent: Any
    model: LanguageModel
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def open_session(self, candidate_id: str) -> GatewaySession:
        """A session of its own for one mutation, as ``RunEgress.agent_session`` opens it."""
        return self.gateway.open_session(
            f"agent-{candidate_id}", run_id="bench", candidate_id=candidate_id, purpose="agent",
            llm_routes=self.routes,
        )  # fmt: skip

    def add(self, **figures: float) -> None:
        for key, value in figures.items():
            self.samples.setdefault(key, []).append(value * 1000)


def attached_true_s(policy: SandboxPolicy, directory: Path) -> float:
    """One attached launch of ``true`` in the sandbox the claude agent gets (launcher + bwrap + teardown)."""
    prepared = attach.prepare(directory, "bwrap", policy, ["/bin/true"])
    env = {"PATH": "/usr/bin:/bin", **prepared.env}
    started = time.monotonic()
    subprocess.run([str(prepared.script)], env=env, cwd=policy.workdir, check=True, timeout=60)
    return time.monotonic() - started


def bare_s(commands: list[str], worktree: Path) -> float:
    """The commands' own time: each run once as a plain subprocess in ``worktree``."""
    started = time.monotonic()
    for command in commands:
        subprocess.run(["bash", "-c", command], cwd=worktree, env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                       check=True, timeout=60)  # fmt: skip
    return time.monotonic() - started


def mutate(backend: Backend, workspace: GitWorkspace, seed: str, worktree: Path, scratch: Path) -> dict[str, float]:
    backend.clock.reset()
    started = time.monotonic()
    workspace.export(seed, worktree)
    exported = time.monotonic()
    Worktree.path = worktree
    base = SandboxPolicy(workdir=worktree, env={"PATH": "/usr/bin:/bin"}, timeout_s=60)
    session = backend.open_session(worktree.name)
    opened = time.monotonic()
    sandbox = TimedSandbox()
    task = AgentTask(
        change_request=REQUEST, worktree=worktree, sandbox=sandbox, policy=session.apply(base), model=backend.model,
        candidate_id=worktree.name, max_steps=10, timeout_s=120.0, entry="parse:parse",
    )  # fmt: skip
    try:
        result = backend.agent.run(task)
    finally:
        closing = time.monotonic()
        backend.gateway.close_session(session)
    ran = time.monotonic()
    if not result.ok:
        raise SystemExit(f"{backend.name}: the agent failed: {result.reason}\n{result.transcript[-3:]}")
    commit = workspace.commit_dir(worktree, seed, f"codeevolver {worktree.name}: strip fields")
    finished = time.monotonic()
    if commit is None or NEW not in (workspace.read_file(commit, "parse.py") or ""):
        raise SystemExit(f"{backend.name}: the mutation did not commit the edit")
    if len(backend.clock.arrivals) != 5:
        raise SystemExit(f"{backend.name}: {len(backend.clock.arrivals)} model requests, not 5")
    # Side by side, in the same sandbox and kind of policy as the agent's: what starting it costs.
    session = backend.open_session(f"{worktree.name}-true")
    policy = session.apply(base)
    if backend.name == "mini":
        commands_s, sandbox_s = sandbox.inside_s, 0.0
        for _ in range(sandbox.commands):
            before = time.monotonic()
            sandbox.run(["bash", "-c", "true"], policy)
            sandbox_s += time.monotonic() - before
    else:
        sandbox_s = attached_true_s(policy, scratch / f"attach-{worktree.name}")
    backend.gateway.close_session(session)
    work_s = bare_s(SHELL_COMMANDS["mini" if backend.name == "mini" else "claude"], worktree)
    first = backend.clock.arrivals[0] - opened
    figures = {
        "total": finished - started,
        "model": backend.clock.inside_s,
        "1st req": first,
        "sandbox": sandbox_s,
        "export": exported - started,
        "session": (opened - exported) + (ran - closing),
        "agent": closing - opened,
        "commit": finished - ran,
        "work": work_s,
        "overhead": finished - started - backend.clock.inside_s - work_s,
    }
    if backend.name == "mini":
        figures["commands"] = commands_s
    else:
        figures["CLI"] = first - sandbox_s
    return figures


def make_repo(root: Path) -> str:
    root.mkdir()
    (root / "parse.py").write_text(f"def parse(text):\n    {OLD}\n")
    (root / "metric.py").write_text("def score(example, prediction):\n    return float(prediction == example)\n")
    (root / "README.md").write_text("A small program to optimize.\n")
    return commit_repo(root)


def main() -> int:
    print(f"agent step: a scripted 5-turn edit per mutation, {RUNS} runs per backend after {WARMUP} warm-up")
    print(f"machine: {machine()}")
    ledger: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="codeevolver-bench-") as tmp:
        root = Path(tmp)
        seed = make_repo(root / "repo")
        workspace = GitWorkspace(root / "repo", root / "work")
        clocks = {"claude": Clock(claude_anthropic), "claude→openai": Clock(claude_openai), "mini": Clock(mini_openai)}
        with (
            EgressGateway(ledger=ledger.append, audit=lambda rows: None, resolver=static_resolver({})) as gateway,
            ScriptedAnthropicServer(clocks["claude"], api_key=KEY) as anthropic,
            ScriptedOpenAIServer(clocks["claude→openai"], api_key=KEY, model="served") as translated,
            ScriptedOpenAIServer(clocks["mini"], api_key=KEY, model="served") as openai,
        ):
            routes = {
                "claude": {"anthropic": LLMUpstream(anthropic.url, KEY, "anthropic", prices=PRICES)},
                "claude→openai": {
                    "anthropic": LLMUpstream(
                        translated.url, KEY, "anthropic", prices=PRICES, upstream_protocol="openai", model="served"
                    )
                },
                "mini": {"openai": LLMUpstream(openai.url, KEY, "openai", prices=PRICES)},
            }
            models = {
                "claude": ModelSpec("anthropic/claude-sonnet-4-5"),
                "claude→openai": ModelSpec("openai/served"),
                "mini": ModelSpec("openai/served", api_base=openai.url, api_key=KEY, input_usd_per_m=PRICES.input,
                                  output_usd_per_m=PRICES.output),
            }  # fmt: skip
            backends = [
                Backend(
                    name,
                    clocks[name],
                    gateway,
                    routes[name],
                    MiniSweAgent() if name == "mini" else ClaudeCodeAgent(max_retries=0),
                    LanguageModel(models[name], ledger.append, run_id="bench", num_retries=0),
                )
                for name in clocks
            ]
            started = time.monotonic()
            for i in range(WARMUP + RUNS):
                for backend in backends:
                    worktree = root / "work" / f"{backend.name.replace('→', '-')}-{i:02d}"
                    figures = mutate(backend, workspace, seed, worktree, root)
                    if i >= WARMUP:
                        backend.add(**figures)
            assert gateway.flush()
        elapsed = time.monotonic() - started
    report(backends, elapsed)
    return 0


def report(backends: list[Backend], elapsed: float) -> None:
    columns = ["total", "model", "work", "1st req", "sandbox", "CLI", "commands", "export", "session", "commit"]
    columns.append("overhead")
    print(f"\nmedians of {RUNS} mutations, ms ({elapsed:.0f} s in all)")
    print(f"{'backend':14}" + "".join(f"{c:>10}" for c in columns) + f"{'target':>10}  verdict")
    for b in backends:
        cells = []
        for column in columns:
            values = b.samples.get(column)
            cells.append(f"{statistics.median(values):10.0f}" if values else f"{'—':>10}")
        overhead = statistics.median(b.samples["overhead"])
        target = TARGET_MS[b.name]
        verdict = "met" if overhead < target else f"MISSED ({overhead / target:.2f}x)"
        print(f"{b.name:14}" + "".join(cells) + f"{target:10.0f}  {verdict}")
    mini = next(b for b in backends if b.name == "mini")
    per_command = statistics.median(mini.samples["sandbox"]) / 5
    print(f"\nmini: {per_command:.0f} ms per sandboxed command start (5 commands per mutation)")
    for b in backends:
        spread = b.samples["overhead"]
        print(f"{b.name}: overhead min {min(spread):.0f} / max {max(spread):.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
