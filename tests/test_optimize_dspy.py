"""A DSPy program evolved end to end: predictors become components, unused ones are dropped,
per-predictor traces reach the reflection prompt. The program runs in its own venv (dspy from
requirements.txt), never in the test process."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from codeevolver.store import Store
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer
from scripted import ROOT, cli_env, run_cli

EXAMPLE = ROOT / "examples" / "dspy_qa"
GOOD = "DSPY_GOOD"


class QAWorld:
    """Plays DSPy's task model (ChatAdapter format) and the reflection model."""

    def __init__(self) -> None:
        self.truth = {}
        for name in ("train", "val"):
            for line in (EXAMPLE / "data" / f"{name}.jsonl").read_text().splitlines():
                row = json.loads(line)
                self.truth[row["question"]] = row
        self.reflection_prompts: list[str] = []

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        messages = body["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        user = messages[-1]["content"]
        if "Reply with OK" in user:
            return "OK"
        found = re.search(r"\[\[ ## question ## \]\]\n(.*?)\n", user + "\n")
        if not found:
            self.reflection_prompts.append(user)
            return f"```\n{GOOD}: answer with only the short fact.\n```"
        row = self.truth[found.group(1).strip()]
        if "`topic`" in system.split("Your output fields are:")[-1].split("All interactions")[0]:
            return f"[[ ## topic ## ]]\n{row['topic']}\n\n[[ ## completed ## ]]"
        answer = row["answer"] if GOOD in system else "I am not sure."
        return f"[[ ## reasoning ## ]]\nThinking.\n\n[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"


def test_dspy_program_is_evolved(tmp_path: Path) -> None:
    repo = tmp_path / "qa"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@l", "commit", "-qm", "s"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    world = QAWorld()
    with ScriptedOpenAIServer(world) as server:
        proc = run_cli(
            "optimize", str(repo), "--api-base", server.url, "--model", "scripted", "--mutate", "prompts",
            "--max-metric-calls", "120", "--concurrency", "1", "--json", env=cli_env(), timeout=900,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seed_score"] < 0.5 and result["best_score"] == 1.0
    with Store(f"sqlite:///{repo / '.codeevolver' / 'runs.db'}") as store:
        seed = store.get_candidate(result["run_id"], "c000")
        best = store.get_candidate(result["run_id"], result["best_candidate"])
    # the never-called `verify` predictor is dropped; the two called ones are components
    assert sorted(seed.components) == ["answer.predict", "classify"]
    assert "Answer the question" in seed.components["answer.predict"]
    assert GOOD in best.components["answer.predict"]
    # the reflection saw that component's own calls (per-predictor traces) and the metric feedback
    assert any("Calls of this component" in p and "Answer wrong" in p for p in world.reflection_prompts)
