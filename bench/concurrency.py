"""Proposal throughput at concurrency K = 1, 4 and 8.

Measures the wall time of 24 proposals of a real engine run (runner
subprocesses, git, SQLite, litellm over HTTP) on a copy of
examples/support_router cut to 12 train and 6 val rows, with a scripted model
that answers every call (task and reflection alike) after a fixed 0.5 s. The
reflection always proposes a prompt that is no better, so every proposal costs
the same: parent minibatch (3 task calls), one reflection, child minibatch (3
task calls), then rejection. The run's stop file is touched once 24 proposals
have been launched; the proposals counted are the run's "proposal_started"
events. Time runs from the end of the seed's valset evaluation to the end of
the run. Reports the speed-up over K=1 per proposal and speed-up/K (target:
speed-up >= 0.7 x K).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import Program, commit_repo, machine, run_engine

from codeevolver.engine.engine import Budget, EngineSettings
from codeevolver.testing.fake_openai import ScriptedOpenAIServer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "support_router"
PROPOSALS = 24
LATENCY_S = 0.5
TARGET = 0.7
PROGRAM = Program("router.pipeline:route", "router.metric:score", ["ticket"], {"classify": "prompts/classify.txt"})


def rows(name: str, n: int) -> list[dict[str, Any]]:
    lines = (EXAMPLE / "data" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()][:n]


class Responder:
    """Task calls: the right answer, capitalised (the seed's parser misreads it; 0.3 per ticket).
    Reflection calls: a different prompt that fixes nothing, so every child is rejected."""

    def __init__(self, tickets: list[dict[str, Any]]) -> None:
        self.truth = {row["ticket"]: row for row in tickets}

    def __call__(self, body: dict[str, Any]) -> str:
        row = self.truth.get(body["messages"][-1]["content"])
        if row is not None:
            return f"{row['label'].capitalize()} {row['priority']}"
        return "New prompt:\n```\nClassify the ticket. Be brief.\n```"


def measure(k: int, repo: Path, state: Path, trainset: list, valset: list) -> tuple[int, float]:
    """Run to PROPOSALS proposals at concurrency k; return (proposals started, seconds)."""
    stop_file = state / "stop"
    marks: dict[str, float] = {}

    def on_progress(p: dict[str, Any]) -> None:
        if p["kind"] == "seed_evaluated":
            marks["start"] = time.monotonic()
        if p["iteration"] >= PROPOSALS:  # proposals launched so far: launch no more
            stop_file.touch()

    with ScriptedOpenAIServer(Responder(trainset + valset), latency_s=LATENCY_S) as server:
        settings = EngineSettings(concurrency=k, minibatch_size=3, seed=0)
        args = (repo, state, PROGRAM, server.url, trainset, valset, settings, Budget(), on_progress, stop_file)
        store, run_id = run_engine(*args)
        seconds = time.monotonic() - marks["start"]  # before the server's shutdown, which polls
    started = sum(1 for e in store.events(run_id) if e.kind == "proposal_started")
    store.close()
    return started, seconds


def main() -> None:
    trainset, valset = rows("train", 12), rows("val", 6)
    print(f"{PROPOSALS} proposals, every model call {LATENCY_S}s, {len(trainset)} train / {len(valset)} val rows")
    print(machine())
    row = "{:>2} {:>9} {:>7} {:>7} {:>8} {:>5}  {}"
    print(row.format("K", "proposals", "wall s", "s/prop", "speed-up", "/K", "target"))
    with tempfile.TemporaryDirectory(prefix="ce-bench-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".codeevolver"))
        for name, data in (("train", trainset), ("val", valset)):
            (repo / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        commit_repo(repo)
        base, met = 0.0, True
        for k in (1, 4, 8):
            n, seconds = measure(k, repo, Path(tmp) / f"state-k{k}", trainset, valset)
            per = seconds / n
            base = base or per
            speedup = base / per
            met &= speedup >= TARGET * k
            verdict = f">= {TARGET * k:.1f}: {'met' if speedup >= TARGET * k else 'NOT met'}"
            print(row.format(k, n, f"{seconds:.1f}", f"{per:.2f}", f"{speedup:.2f}", f"{speedup / k:.2f}", verdict))
    print(f"target speed-up >= {TARGET} x K: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
