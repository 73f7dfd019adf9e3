"""The isolation boundary: the real runner, under a real user interpreter, through the unsafe sandbox."""

from __future__ import annotations

import ast
import shutil
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from codeevolver.errors import UserProgramError
from codeevolver.evaluator import RUNNER_PATH, Evaluator
from codeevolver.sandbox.unsafe import UnsafeSandbox
from codeevolver.testing.fake_openai import Reply, ScriptedOpenAIServer
from codeevolver.userenv import default_cache_dir, resolve_python

PIPELINE = """
import os

def run(inputs, prompts):
    q = inputs["question"]
    if q == "boom":
        raise ValueError("bad question")
    return {"answer": q.upper(), "prefix": prompts.get("style", "")}
"""

METRICS = """
def as_tuple(example, output):
    ok = output["answer"] == example["answer"]
    return (1.0 if ok else 0.0, "right" if ok else "wrong")

def as_dict(example, output):
    return {"score": 0.5, "feedback": f"saw {output['answer']}"}

def with_trace(example, output, trace):
    assert trace is None
    return 1.0

def not_a_number(example, output):
    return "abc"

def nan(example, output):
    return float("nan")
"""

ROWS = [
    {"question": "a", "answer": "A"},
    {"question": "b", "answer": "wrong"},
    {"question": "boom", "answer": "B"},
]


def make_repo(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (path -> source) under ``root`` and return it."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter for repos without requirements.txt, built once in a private cache."""
    empty = tmp_path_factory.mktemp("empty-repo")
    return resolve_python(empty, cache_dir=tmp_path_factory.mktemp("envs"))


def evaluator(python: Path, metric: str = "metrics:as_tuple", **kw: Any) -> Evaluator:
    defaults: dict[str, Any] = {
        "framework": "python",
        "entry": "pipeline:run",
        "metric": metric,
        "input_keys": ["question"],
        "sandbox": UnsafeSandbox(),
        "python": python,
        "env": {},
        "per_example_timeout_s": 10.0,
    }
    defaults.update(kw)
    return Evaluator(**defaults)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "repo", {"pipeline.py": PIPELINE, "metrics.py": METRICS})


def examples(rows: list[dict[str, Any]] = ROWS, first: int = 0) -> list[tuple[int, dict[str, Any]]]:
    return [(first + i, row) for i, row in enumerate(rows)]


def test_python_happy_path_tuple_metric(repo: Path, bare_python: Path) -> None:
    results = evaluator(bare_python).evaluate(
        repo, {"style": "terse"}, examples(ROWS[:2], first=7), capture_traces=True
    )
    assert [r.index for r in results] == [7, 8]
    assert [r.score for r in results] == [1.0, 0.0]
    assert [r.feedback for r in results] == ["right", "wrong"]
    assert results[0].output == {"answer": "A", "prefix": "terse"}
    assert results[0].error is None
    assert results[0].traces == {
        "style": [{"inputs": {"question": "a"}, "outputs": {"answer": "A", "prefix": "terse"}}]
    }


def test_python_dict_metric_and_no_traces_unless_asked(repo: Path, bare_python: Path) -> None:
    results = evaluator(bare_python, "metrics:as_dict").evaluate(repo, {"style": "x"}, examples(ROWS[:1]))
    assert (results[0].score, results[0].feedback) == (0.5, "saw A")
    assert results[0].traces == {}


def test_metric_with_trace_parameter(repo: Path, bare_python: Path) -> None:
    results = evaluator(bare_python, "metrics:with_trace").evaluate(repo, {}, examples(ROWS[:2]))
    assert [(r.score, r.error) for r in results] == [(1.0, None), (1.0, None)]


def test_program_exception_is_one_examples_error(repo: Path, bare_python: Path) -> None:
    results = evaluator(bare_python).evaluate(repo, {}, examples())
    assert [r.score for r in results] == [1.0, 0.0, 0.0]
    assert results[1].error is None
    error = results[2].error
    assert error is not None
    assert error.startswith("program raised ValueError: bad question (at pipeline.py:")
    assert "\n" not in error


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        (
            "metrics:not_a_number",
            "metric returned 'abc' (str), expected a float, (float, str) or {'score', 'feedback'}",
        ),
        ("metrics:nan", "metric returned nan, expected a finite number"),
    ],
)
def test_unusable_metric_result(repo: Path, bare_python: Path, metric: str, expected: str) -> None:
    [result] = evaluator(bare_python, metric).evaluate(repo, {}, examples(ROWS[:1]))
    assert result.score == 0.0
    assert result.error == expected
    assert result.output == {"answer": "A", "prefix": ""}


def test_hanging_program_is_stopped_per_example(tmp_path: Path, bare_python: Path) -> None:
    repo = make_repo(
        tmp_path,
        {
            "pipeline.py": """
                import time
                BUSY = []
                def run(inputs, prompts):
                    if BUSY:
                        raise RuntimeError("state left behind by an interrupted example")
                    BUSY.append(1)
                    if inputs["question"] == "hang":
                        while True:
                            try:
                                time.sleep(60)
                            except Exception:
                                pass  # a program that swallows errors is still stopped
                    BUSY.clear()
                    return {"answer": inputs["question"].upper()}
            """,
            "metrics.py": METRICS,
        },
    )
    rows = [
        {"question": "a", "answer": "A"},
        {"question": "hang", "answer": "X"},
        {"question": "b", "answer": "B"},
        {"question": "hang", "answer": "X"},
    ]
    started = time.monotonic()
    results = evaluator(bare_python, per_example_timeout_s=1).evaluate(repo, {}, examples(rows, first=5))
    assert time.monotonic() - started < 20
    assert [r.index for r in results] == [5, 6, 7, 8]
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 0.0]
    assert [r.error for r in results] == [None, "program timed out after 1s", None, "program timed out after 1s"]


def test_entry_not_importable(repo: Path, bare_python: Path) -> None:
    with pytest.raises(UserProgramError) as info:
        evaluator(bare_python, entry="src.nope:run").evaluate(repo, {}, examples(ROWS[:1]))
    assert "entry 'src.nope:run'" in info.value.message
    assert "no module named 'src'" in info.value.message
    assert info.value.fix

    with pytest.raises(UserProgramError, match="module pipeline has no attribute 'missing'"):
        evaluator(bare_python, entry="pipeline:missing").describe(repo)


def test_entry_with_missing_dependency_names_requirements(tmp_path: Path, bare_python: Path) -> None:
    repo = make_repo(tmp_path, {"pipeline.py": "import not_installed_pkg\n", "metrics.py": METRICS})
    with pytest.raises(UserProgramError) as info:
        evaluator(bare_python).evaluate(repo, {}, examples(ROWS[:1]))
    assert "no module named 'not_installed_pkg'" in info.value.message
    assert "requirements.txt" in (info.value.fix or "")


def test_metric_not_importable(repo: Path, bare_python: Path) -> None:
    with pytest.raises(UserProgramError, match=r"metric 'scoring:f': no module named 'scoring'"):
        evaluator(bare_python, "scoring:f").evaluate(repo, {}, examples(ROWS[:1]))
    with pytest.raises(UserProgramError, match=r"not of the form 'package\.module:attribute'"):
        evaluator(bare_python, "metrics.as_tuple").evaluate(repo, {}, examples(ROWS[:1]))


def test_user_stdout_does_not_corrupt_answer(tmp_path: Path, bare_python: Path) -> None:
    repo = make_repo(
        tmp_path,
        {
            "pipeline.py": """
                import os, subprocess, sys
                print("imported!")
                def run(inputs, prompts):
                    print("{not json")
                    sys.stdout.write("more noise\\n")
                    os.write(1, b"raw fd noise\\n")
                    subprocess.run(["echo", "child noise"])
                    return {"answer": inputs["question"].upper()}
            """,
            "metrics.py": METRICS,
        },
    )
    [result] = evaluator(bare_python).evaluate(repo, {}, examples(ROWS[:1]))
    assert (result.score, result.error) == (1.0, None)


def test_orchestrator_environment_is_not_visible(
    tmp_path: Path, bare_python: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEEVOLVER_TEST_SECRET", "s3cret")
    repo = make_repo(
        tmp_path,
        {
            "pipeline.py": """
                import os
                def run(inputs, prompts):
                    return {"secret": os.environ.get("CODEEVOLVER_TEST_SECRET"),
                            "given": os.environ.get("GIVEN"),
                            "keys": sorted(os.environ)}
            """,
            "metrics.py": "def m(example, output):\n    return 1.0\n",
        },
    )
    [result] = evaluator(bare_python, "metrics:m", env={"GIVEN": "yes"}).evaluate(repo, {}, examples(ROWS[:1]))
    assert result.output["secret"] is None
    assert result.output["given"] == "yes"
    assert set(result.output["keys"]) <= {
        "GIVEN",
        "PATH",
        "HOME",
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
        "LC_CTYPE",
    }


def test_bare_interpreter_cannot_import_orchestrator_dependencies(tmp_path: Path, bare_python: Path) -> None:
    import litellm  # noqa: F401 - proves the orchestrator itself has it

    repo = make_repo(
        tmp_path,
        {
            "pipeline.py": """
                import importlib.util, sys
                def run(inputs, prompts):
                    return {"found": [m for m in ("litellm", "codeevolver", "sqlalchemy", "pytest")
                                      if importlib.util.find_spec(m) is not None],
                            "prefix": sys.prefix}
            """,
            "metrics.py": "def m(example, output):\n    return 1.0\n",
        },
    )
    [result] = evaluator(bare_python, "metrics:m").evaluate(repo, {}, examples(ROWS[:1]))
    assert result.error is None
    assert result.output["found"] == []
    assert Path(result.output["prefix"]) == bare_python.parent.parent


def test_process_death_reports_stderr(tmp_path: Path, bare_python: Path) -> None:
    repo = make_repo(
        tmp_path,
        {
            "pipeline.py": """
                import os, sys
                def run(inputs, prompts):
                    sys.stderr.write("about to die\\n")
                    sys.stderr.flush()
                    os._exit(3)
            """,
            "metrics.py": METRICS,
        },
    )
    with pytest.raises(UserProgramError) as info:
        evaluator(bare_python).evaluate(repo, {}, examples(ROWS[:1]))
    assert "exit status 3" in info.value.message
    assert "about to die" in info.value.message


def test_describe_python_is_empty(repo: Path, bare_python: Path) -> None:
    assert evaluator(bare_python).describe(repo) == {}


def test_concurrent_evaluations(repo: Path, bare_python: Path) -> None:
    ev = evaluator(bare_python)
    found: dict[int, list[float]] = {}

    def work(n: int) -> None:
        rows = [{"question": f"q{n}", "answer": f"Q{n}"}, {"question": "x", "answer": "no"}]
        found[n] = [r.score for r in ev.evaluate(repo, {}, examples(rows, first=n * 10))]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == {n: [1.0, 0.0] for n in range(4)}


def test_environment_cache_and_concurrent_builders(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"x.py": ""})
    cache = tmp_path / "cache"
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(resolve_python(repo, cache))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0].exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [got[0].parent.parent.name]


def test_bad_requirements_names_the_file(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"requirements.txt": "this is not a requirement!!\n"})
    with pytest.raises(UserProgramError) as info:
        resolve_python(repo, tmp_path / "cache")
    assert "requirements.txt" in info.value.message
    assert "requirements.txt" in (info.value.fix or "")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_runner_is_python39_compatible(tmp_path: Path, repo: Path) -> None:
    ast.parse(RUNNER_PATH.read_text(), feature_version=(3, 9))
    py39 = _python39()
    if py39 is None:
        return  # the syntax check above still holds
    python = resolve_python(repo, tmp_path / "envs", base_python=py39)
    results = evaluator(python).evaluate(repo, {}, examples())
    assert [r.score for r in results] == [1.0, 0.0, 0.0]


def _python39() -> str | None:
    """A working Python 3.9 on this machine, if any (pyenv shims may exist without one)."""
    candidates = [
        shutil.which("python3.9"),
        *map(str, Path.home().glob(".pyenv/versions/3.9*/bin/python3.9")),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    return None


# --------------------------------------------------------------------------- dspy

DSPY_PROGRAM = """
import dspy

class TwoStep(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question -> answer")
        self.unused = dspy.Predict("question -> summary")

    def forward(self, question):
        return self.answer(question=question)
"""

DSPY_METRIC = """
def score(example, prediction, trace=None):
    calls = len(trace or [])
    ok = prediction.answer == example.answer
    return {"score": 1.0 if ok else 0.0, "feedback": f"calls={calls} inputs={sorted(example.inputs())}"}
"""


def test_dspy_program(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "repo",
        {"requirements.txt": "dspy==3.4.1\n", "prog.py": DSPY_PROGRAM, "metric.py": DSPY_METRIC},
    )
    python = resolve_python(repo, default_cache_dir())

    def answer(request: dict[str, Any]) -> Reply:
        question = request["messages"][-1]["content"]
        value = "Paris" if "France" in question else "unknown"
        return Reply(
            content=f"[[ ## answer ## ]]\n{value}\n\n[[ ## completed ## ]]",
            delay_s=15 if "slowly" in question else 0,
        )

    with ScriptedOpenAIServer(answer) as server:
        ev = Evaluator(
            framework="dspy",
            entry="prog:TwoStep",
            metric="metric:score",
            input_keys=["question"],
            sandbox=UnsafeSandbox(),
            python=python,
            env={
                "CODEEVOLVER_MODEL": "openai/test",
                "OPENAI_BASE_URL": server.url,
                "OPENAI_API_KEY": "sk-test",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            },
            per_example_timeout_s=5,
        )
        described = ev.describe(repo)
        assert set(described) == {"answer", "unused"}
        assert all(isinstance(text, str) and text for text in described.values())

        rows = [
            {"question": "Answer slowly: capital of Peru?", "answer": "Lima"},
            {"question": "Capital of France?", "answer": "Paris"},
            {"question": "Capital of Mars?", "answer": "Olympus"},
        ]
        components = {"answer": "ANSWER-INSTRUCTIONS-XYZ", "unused": "UNUSED-INSTRUCTIONS"}
        results = ev.evaluate(repo, components, examples(rows), capture_traces=True)

    # the slow call is cut off; the examples after it run in a fresh process, unharmed
    assert [r.error for r in results] == ["program timed out after 5s", None, None]
    assert [r.score for r in results] == [0.0, 1.0, 0.0]
    france = results[1]
    assert france.feedback == "calls=1 inputs=['question']"
    assert france.output == {"answer": "Paris"}
    assert set(france.traces) == {"answer"}
    [call] = france.traces["answer"]
    assert call["inputs"] == {"question": "Capital of France?"}
    assert call["outputs"] == {"answer": "Paris"}
    chats = [r for r in server.requests if "France" in r["messages"][-1]["content"]]
    assert chats, "the model was never called"
    system = chats[-1]["messages"][0]
    assert system["role"] == "system"
    assert "ANSWER-INSTRUCTIONS-XYZ" in system["content"]
    assert not any("UNUSED-INSTRUCTIONS" in m["content"] for r in server.requests for m in r["messages"])
