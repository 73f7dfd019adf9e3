"""The bundled examples: their datasets are usable and the support router runs end to end.

User code is never imported into this process (the orchestrator never does
either): the router runs in a subprocess against a scripted model server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from codeevolver.testing.fake_openai import ScriptedOpenAIServer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROUTER = EXAMPLES / "support_router"

# Runs route + score on each row; prints one JSON result per row.
RUN_ROWS = """
import json, sys
from router.pipeline import route
from router.metric import score
prompts = {"classify": open("prompts/classify.txt").read()}
for row in json.loads(sys.stdin.read()):
    print(json.dumps(score(row, route(row, prompts))))
"""


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("example", "keys"),
    [("support_router", {"ticket", "label", "priority"}), ("dspy_qa", {"question", "answer", "topic"})],
)
def test_datasets_are_complete(example: str, keys: set[str]) -> None:
    root = EXAMPLES / example
    config = tomllib.loads((root / "codeevolver.toml").read_text())["program"]
    train, val = _rows(root / config["trainset"]), _rows(root / config["valset"])
    assert len(train) >= 60 and len(val) >= 30
    for row in train + val:
        assert keys <= row.keys() and all(str(row[k]).strip() for k in keys)
    assert set(config["input_keys"]) < keys
    questions = [row[config["input_keys"][0]] for row in train + val]
    assert len(set(questions)) == len(questions), "train and val overlap or repeat"


def test_router_labels_are_valid() -> None:
    for row in _rows(ROUTER / "data/train.jsonl") + _rows(ROUTER / "data/val.jsonl"):
        assert row["label"] in {"billing", "technical", "account", "shipping", "other"}
        assert row["priority"] in {"low", "normal", "urgent"}


def _run_router(rows: list[dict[str, Any]], answers: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """Route ``rows`` in a subprocess; the scripted model answers ``answers[ticket]``."""

    def responder(request: dict[str, Any]) -> str:
        return answers[request["messages"][-1]["content"]]

    with ScriptedOpenAIServer(responder) as server:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "OPENAI_BASE_URL": server.url,
            "OPENAI_API_KEY": "test-key",
            "CODEEVOLVER_MODEL": "openai/scripted",
        }
        done = subprocess.run(
            [sys.executable, "-c", RUN_ROWS],
            cwd=ROUTER,
            env=env,
            input=json.dumps(rows),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert all(r["model"] == "scripted" and r["temperature"] == 0 for r in server.requests)
        return [json.loads(line) for line in done.stdout.splitlines()], len(server.requests)


def test_router_scores_right_and_wrong_answers() -> None:
    rows = _rows(ROUTER / "data/val.jsonl")[:6]
    good = {row["ticket"]: f"{row['label']} {row['priority']}" for row in rows}
    results, calls = _run_router(rows, good)
    assert calls == len(rows)
    assert [r["score"] for r in results] == [1.0] * len(rows)

    # The seed parser misreads a capitalised, punctuated reply; a wrong priority costs less.
    wrong_label = {t: f"{a.split()[0].title()}. {a.split()[1]}" for t, a in good.items()}
    results, _ = _run_router(rows, wrong_label)
    assert any(row["label"] != "other" for row in rows)
    for row, result in zip(rows, results, strict=True):
        if row["label"] == "other":
            continue
        assert result["score"] == pytest.approx(0.3)
        assert f"label: expected {row['label']!r}" in result["feedback"]
        assert "The model replied" in result["feedback"]

    flip = {"low": "urgent", "normal": "low", "urgent": "normal"}
    wrong_priority = {row["ticket"]: f"{row['label']} {flip[row['priority']]}" for row in rows}
    results, _ = _run_router(rows, wrong_priority)
    for row, result in zip(rows, results, strict=True):
        assert result["score"] == pytest.approx(0.7)
        assert f"priority: expected {row['priority']!r}" in result["feedback"]


# Configures dspy the way CodeEvolver's runner does, then answers one question.
RUN_QA = """
import json, os, dspy
from qa.program import QA
from qa.metric import score
dspy.configure(lm=dspy.LM(os.environ["CODEEVOLVER_MODEL"], api_base=os.environ["OPENAI_BASE_URL"],
                          api_key=os.environ["OPENAI_API_KEY"], cache=False))
program = QA()
pred = program(question="What is the capital of Australia?")
result = score({"answer": "Canberra", "topic": "geography"}, pred)
print(json.dumps({"predictors": [n for n, _ in program.named_predictors()], **result}))
"""


def _qa_responder(request: dict[str, Any]) -> str:
    if "[[ ## reasoning ## ]]" in json.dumps(request["messages"]):
        return "[[ ## reasoning ## ]]\nIts capital.\n\n[[ ## answer ## ]]\nCanberra\n\n[[ ## completed ## ]]"
    return "[[ ## topic ## ]]\ngeography\n\n[[ ## completed ## ]]"


def test_dspy_qa_runs_against_a_scripted_model() -> None:
    pytest.importorskip("dspy")
    with ScriptedOpenAIServer(_qa_responder) as server:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "OPENAI_BASE_URL": server.url,
            "OPENAI_API_KEY": "test-key",
            "CODEEVOLVER_MODEL": "openai/scripted",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
        done = subprocess.run(
            [sys.executable, "-c", RUN_QA],
            cwd=EXAMPLES / "dspy_qa",
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert len(server.requests) == 2  # classify and answer; verify never runs
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["predictors"] == ["classify", "answer.predict", "verify"]
    assert result["score"] == 1.0
