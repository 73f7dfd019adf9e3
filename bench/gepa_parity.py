"""Our engine at concurrency 1 against ``gepa.optimize`` (gepa 0.1.4) on the same task.

The task: a one-call quiz program whose prompt needs rules. Each question
belongs to one of six rules; the scripted task model answers it right only when
the system prompt contains ``RULE_<name>``, and the metric's feedback names the
rule a wrong answer needed. The seed prompt has one rule, so the valset score
climbs 2/12, 4/12 ... 12/12 as rules are added. The proposer is one
deterministic function for both optimizers: add the first rule the minibatch
feedback asks for that the prompt lacks (one rule per reflection).

Both run the same program through the same runner subprocess (ours through its
engine and a reflection model over HTTP that calls the proposer; gepa through a
GEPAAdapter whose ``propose_new_texts`` calls it), with the same trainset (18),
valset (12), minibatch size 3, budget and seeds. Reported per seed and on
average: metric calls until the final best candidate's valset score is known
(gepa's ``discovery_eval_counts`` plus its valset evaluation), the best score,
and the ratio ours/gepa (target: within 10%).
"""

from __future__ import annotations

import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import gepa
from gepa.core.adapter import EvaluationBatch
from harness import Program, commit_repo, evaluator, run_engine

from codeevolver.engine.engine import Budget, EngineSettings
from codeevolver.testing.fake_openai import ScriptedOpenAIServer
from codeevolver.workspace.git import GitWorkspace

RULES = ["CITE", "UNITS", "ROUND", "DATES", "NAMES", "CODES"]
SEEDS = [0, 1, 2, 3, 4]
BUDGET = 180
MINIBATCH = 3
TOLERANCE = 0.10
SEED_PROMPT = "Answer the question with a number only.\nRULE_CITE: apply rule CITE.\n"
PROGRAM = Program(
    "quiz.program:answer", "quiz.metric:score", ["question"], {"instructions": "prompts/instructions.txt"}
)
FILES = {
    "quiz/__init__.py": "",
    "quiz/program.py": '''"""Answer a quiz question with one model call; the prompt is component 'instructions'."""

import json
import os
import urllib.request


def answer(example, prompts):
    messages = [
        {"role": "system", "content": prompts["instructions"]},
        {"role": "user", "content": example["question"]},
    ]
    request = urllib.request.Request(
        os.environ["OPENAI_BASE_URL"] + "/chat/completions",
        data=json.dumps({"model": "scripted", "messages": messages}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return {"answer": json.load(response)["choices"][0]["message"]["content"]}
''',
    "quiz/metric.py": """def score(example, output):
    if output["answer"] == example["answer"]:
        return {"score": 1.0, "feedback": "Correct."}
    return {
        "score": 0.0,
        "feedback": f"Wrong: expected {example['answer']!r}. Questions of this kind need rule {example['rule']}.",
    }
""",
    "prompts/instructions.txt": SEED_PROMPT,
}


def dataset(first: int, n: int) -> list[dict[str, Any]]:
    return [
        {"question": f"Question {i}: what is {i} times 7?", "answer": str(7 * i), "rule": RULES[i % len(RULES)]}
        for i in range(first, first + n)
    ]


TRAINSET, VALSET = dataset(0, 18), dataset(18, 12)


def propose(current: str, feedback: str) -> str:
    """The deterministic proposer: add the first rule the feedback asks for that the prompt lacks."""
    for rule in re.findall(r"need rule (\w+)", feedback):
        if f"RULE_{rule}" not in current:
            return f"{current.rstrip()}\nRULE_{rule}: apply rule {rule}.\n"
    return current


class Model:
    """Task calls: right only when the prompt has the question's rule. Reflection calls: ``propose``."""

    def __init__(self) -> None:
        self.truth = {row["question"]: row for row in TRAINSET + VALSET}

    def __call__(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        row = self.truth.get(messages[-1]["content"])
        if row is not None:
            return row["answer"] if f"RULE_{row['rule']}" in messages[0]["content"] else "I do not know."
        reflection = messages[-1]["content"]
        current = re.search(r"```\n(.*?)```", reflection, re.DOTALL)
        assert current is not None, "not a reflection prompt"
        return f"```\n{propose(current[1], reflection)}```"


class QuizAdapter:
    """gepa's view of the same program: our runner evaluates, ``propose`` proposes."""

    def __init__(self, repo: Path, head: str, url: str, work: Path) -> None:
        self.evaluator = evaluator(repo, PROGRAM, url)
        self.workdir = GitWorkspace(repo, work).evaluation_dir(head)

    def evaluate(self, batch: list[dict[str, Any]], candidate: dict[str, str], capture_traces: bool = False) -> Any:
        results = self.evaluator.evaluate(self.workdir, candidate, list(enumerate(batch)), capture_traces)
        traces = [{"question": row["question"], "feedback": r.feedback} for row, r in zip(batch, results, strict=True)]
        return EvaluationBatch(
            outputs=[r.output for r in results],
            scores=[r.score for r in results],
            trajectories=traces if capture_traces else None,
        )

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch: Any, components: list[str]) -> Any:
        records = [
            {"Inputs": t["question"], "Generated Outputs": out, "Feedback": t["feedback"]}
            for t, out in zip(eval_batch.trajectories, eval_batch.outputs, strict=True)
        ]
        return {name: records for name in components}

    def propose_new_texts(self, candidate: dict[str, str], dataset: Any, components: list[str]) -> dict[str, str]:
        return {name: propose(candidate[name], "\n".join(r["Feedback"] for r in dataset[name])) for name in components}


class Quiet:
    def log(self, message: str) -> None:
        pass


def run_gepa(repo: Path, head: str, url: str, work: Path, seed: int) -> tuple[int, float, int]:
    """(metric calls until the best candidate's valset score is known, best valset score, calls in all)."""
    result = gepa.optimize(
        seed_candidate={"instructions": SEED_PROMPT},
        trainset=TRAINSET,
        valset=VALSET,
        adapter=QuizAdapter(repo, head, url, work),
        reflection_minibatch_size=MINIBATCH,
        max_metric_calls=BUDGET,
        seed=seed,
        logger=Quiet(),
    )
    best = result.best_idx
    calls = result.discovery_eval_counts[best] + len(VALSET)  # gepa counts up to its valset evaluation
    return calls, result.val_aggregate_scores[best], result.total_metric_calls or 0


def run_ours(repo: Path, url: str, state: Path, seed: int) -> tuple[int, float, int]:
    """(metric calls until the best candidate's valset score is known, best valset score, calls in all)."""
    scored: list[tuple[float, int]] = []

    def on_progress(p: dict[str, Any]) -> None:
        if p["kind"] in ("seed_evaluated", "candidate_accepted"):
            scored.append((p["data"]["val_score"], p["metric_calls"]))

    settings = EngineSettings(concurrency=1, minibatch_size=MINIBATCH, seed=seed)
    store, run_id = run_engine(repo, state, PROGRAM, url, TRAINSET, VALSET, settings, Budget(BUDGET), on_progress)
    used = store.get_run(run_id).metric_calls
    store.close()
    best = max(score for score, _ in scored)
    return next(calls for score, calls in scored if score == best), best, used


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ce-bench-") as tmp, ScriptedOpenAIServer(Model()) as server:
        repo = Path(tmp) / "repo"
        for name, text in FILES.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(text)
        head = commit_repo(repo)
        print(f"train {len(TRAINSET)}, val {len(VALSET)}, minibatch {MINIBATCH}, budget {BUDGET} metric calls")
        row = "{:>4} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}"
        print(row.format("seed", "ours calls", "gepa calls", "ours best", "gepa best", "ours used", "gepa used"))
        ours, theirs = [], []
        for seed in SEEDS:
            ours.append(run_ours(repo, server.url, Path(tmp) / f"ours-{seed}", seed))
            theirs.append(run_gepa(repo, head, server.url, Path(tmp) / f"gepa-{seed}", seed))
            (a, best_a, used_a), (b, best_b, used_b) = ours[-1], theirs[-1]
            print(row.format(seed, a, b, f"{best_a:.3f}", f"{best_b:.3f}", used_a, used_b))
    mean_ours = statistics.mean(calls for calls, _, _ in ours)
    mean_gepa = statistics.mean(calls for calls, _, _ in theirs)
    ratio = mean_ours / mean_gepa
    same_best = {best for _, best, _ in ours} == {best for _, best, _ in theirs}
    print(row.format("mean", f"{mean_ours:.1f}", f"{mean_gepa:.1f}", "", "", "", ""))
    verdict = "met" if abs(ratio - 1) <= TOLERANCE and same_best else "NOT met"
    print(f"same best score: {same_best}; ratio ours/gepa of metric calls to the best score: {ratio:.3f}")
    print(f"target: the same best score and a ratio within 1 ± {TOLERANCE:g}: {verdict}")
    print("calls: metric calls spent when the final best candidate's valset score was known; used: in all")


if __name__ == "__main__":
    main()
