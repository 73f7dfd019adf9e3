"""Shared set-up for the benchmarks: a committed git repo and a real Engine over it.

The parts are the ones ``session._parts`` builds for a prompts-only run of a
python-framework program: runner subprocesses (the ``unsafe`` tier, so no
sandbox cost is measured), real git, a SQLite store, and a reflection model
reached over HTTP through litellm.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeevolver.engine.engine import Budget, Engine, EngineSettings, Parts
from codeevolver.engine.selection import ComponentSelector
from codeevolver.evaluator import Evaluator
from codeevolver.models.base import LanguageModel, ModelSpec
from codeevolver.proposers.prompt import PromptProposer
from codeevolver.sandbox.unsafe import UnsafeSandbox
from codeevolver.store import Store
from codeevolver.types import Candidate
from codeevolver.userenv import resolve_python
from codeevolver.workspace.git import GitWorkspace


def machine() -> str:
    """The context every figure needs on a shared machine: cores and the current 1-minute load."""
    return f"{os.cpu_count()} cores, 1-minute load average {os.getloadavg()[0]:.1f} at start"


def commit_repo(repo: Path) -> str:
    """``git init`` + commit everything in ``repo``; return the HEAD commit."""
    commit = ["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "seed"]
    for args in (["init", "-q"], ["add", "-A"], commit):
        subprocess.run(["git", *args], cwd=repo, check=True)
    return head_of(repo)


def head_of(repo: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


@dataclass
class Program:
    """The user's side of the contract (what ``codeevolver.toml`` [program] and [components] say)."""

    entry: str
    metric: str
    input_keys: list[str]
    component_files: dict[str, str]


def model_spec(url: str) -> ModelSpec:
    return ModelSpec("openai/scripted", api_base=url, api_key="bench")


def evaluator(repo: Path, program: Program, url: str) -> Evaluator:
    env = {"CODEEVOLVER_MODEL": "openai/scripted", "OPENAI_BASE_URL": url, "OPENAI_API_KEY": "bench"}
    python = resolve_python(repo)
    return Evaluator("python", program.entry, program.metric, program.input_keys, UnsafeSandbox(), python, env)


def run_engine(
    repo: Path,
    state: Path,
    program: Program,
    url: str,
    trainset: list[dict[str, Any]],
    valset: list[dict[str, Any]],
    settings: EngineSettings,
    budget: Budget,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    stop_file: Path | None = None,
) -> tuple[Store, str]:
    """Run a new prompts-only optimization of ``repo`` to its end; return the store and the run id."""
    head = head_of(repo)
    state.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{state / 'runs.db'}")
    run_id = store.create_run({}, str(repo), head, settings.seed)
    components = {name: (repo / path).read_text() for name, path in program.component_files.items()}
    parts = Parts(
        store,
        evaluator(repo, program, url),
        GitWorkspace(repo, state / "work" / run_id),
        PromptProposer(LanguageModel(model_spec(url), store.add_usage, run_id=run_id)),
        None,
        ComponentSelector("prompts"),
        "python",
        program.component_files,
    )
    engine = Engine(run_id, parts, trainset, valset, settings, budget, stop_file=stop_file, on_progress=on_progress)
    asyncio.run(engine.run(Candidate(id="c000", components=components, commit=head)))
    return store, run_id
