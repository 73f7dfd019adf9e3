"""Broken inputs: each gets one clear message, exit status 2, no traceback, nothing half-written."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from codeevolver.testing.fake_openai import ScriptedOpenAIServer
from scripted import RouterWorld, cli_env, make_repo, run_cli


def edit_toml(old: str, new: str) -> Callable[[Path], None]:
    def edit(repo: Path) -> None:
        path = repo / "codeevolver.toml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))

    return edit


def append_toml(text: str) -> Callable[[Path], None]:
    def edit(repo: Path) -> None:
        with (repo / "codeevolver.toml").open("a") as handle:
            handle.write("\n" + text + "\n")

    return edit


def write(rel: str, text: str) -> Callable[[Path], None]:
    def edit(repo: Path) -> None:
        (repo / rel).write_text(text)

    return edit


def chain(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(repo: Path) -> None:
        for step in edits:
            step(repo)

    return edit


HANGING = "import time\n\ndef route(example, prompts):\n    time.sleep(30)\n"
TIMEOUT_1S = edit_toml('input_keys = ["ticket"]', 'input_keys = ["ticket"]\nexample_timeout_s = 1')
CRASHING = "def route(example, prompts):\n    raise RuntimeError('boom in the pipeline')\n"
BAD_METRIC = "def score(example, output):\n    return 'great'\n"


@dataclass
class Case:
    name: str
    expect: str  # a regex the error message must match
    edit: Callable[[Path], None] | None = None
    args: tuple[str, ...] = ()
    after: Callable[[Path], None] | None = None  # applied after the commit (dirty tree, …)
    command: str = "optimize"
    git: bool = True
    api_key: str | None = None


CASES = [
    Case("missing key", r"missing required key \[program\] metric",
         edit_toml('metric = "router.metric:score"', "")),
    Case("unknown key", r"unknown key.*max_metric_cals.*\n.*did you mean 'max_metric_calls'",
         edit_toml("max_metric_calls = 150", "max_metric_cals = 150")),
    Case("no config file", r"no codeevolver.toml in", lambda repo: (repo / "codeevolver.toml").unlink()),
    Case("invalid toml", r"not valid TOML", write("codeevolver.toml", "[program\nframework=")),
    Case("entry not importable", r"router\.nowhere", edit_toml("router.pipeline:route", "router.nowhere:route")),
    Case("metric not importable", r"(?i)metric.*router\.metric:nope|nope",
         edit_toml("router.metric:score", "router.metric:nope")),
    Case("metric returns a non-number", r"metric returned 'great'", write("router/metric.py", BAD_METRIC)),
    Case("empty dataset", r"train\.jsonl has no rows", write("data/train.jsonl", "")),
    Case("malformed row", r"train\.jsonl:3: malformed JSON",
         lambda repo: _replace_line(repo / "data" / "train.jsonl", 2, '{"ticket": "broken"')),
    Case("valset keys the program does not take", r"val\.jsonl:1: row lacks the input key\(s\) ticket",
         lambda repo: _replace_line(repo / "data" / "val.jsonl", 0, '{"question": "x", "label": "other"}')),
    Case("not a git repo", r"is not a git repository", git=False),
    Case("dirty worktree", r"uncommitted changes", after=write("notes.txt", "wip")),
    Case("endpoint unreachable", r"cannot reach model endpoint", args=("--api-base", "http://127.0.0.1:9/v1")),
    Case("api key rejected", r"rejected the API key", api_key="sk-wrong"),
    Case("budget of 0", r"budget max_metric_calls is 0", args=("--max-metric-calls", "0")),
    Case("budget too small for the seed", r"cannot even score the seed", args=("--max-metric-calls", "10")),
    Case("program hangs", r"timed out after 1", chain(write("router/pipeline.py", HANGING), TIMEOUT_1S)),
    Case("program crashes every row", r"failed on 15 of 15.*boom in the pipeline",
         write("router/pipeline.py", CRASHING)),
    Case("unwritable state dir", r"state directory", args=("--state-dir", "/proc/version/state")),
    Case("unknown sandbox tier", r"unknown sandbox tier 'moon'", args=("--sandbox", "moon")),
    Case("bad --mutate", r"--mutate 'everything'", args=("--mutate", "everything")),
    Case("secret from an unset variable", r"need the environment variable CE_TEST_UNSET_TOKEN",
         append_toml('[sandbox]\nsecrets = {"api.github.com" = "Authorization: Bearer ${CE_TEST_UNSET_TOKEN}"}')),
    Case("resume unknown run", r"no run 'r-nope'|no CodeEvolver runs", command="resume"),
]  # fmt: skip


def _replace_line(path: Path, index: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def server() -> ScriptedOpenAIServer:
    with ScriptedOpenAIServer(RouterWorld(), api_key="sk-right") as srv:
        yield srv


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, server: ScriptedOpenAIServer) -> None:
    repo = tmp_path / "repo"
    if case.git:
        make_repo(repo, case.edit)
    else:
        import shutil

        from scripted import EXAMPLE

        shutil.copytree(EXAMPLE, repo)
    if case.after:
        case.after(repo)
    before = _snapshot(repo)
    env = cli_env(OPENAI_API_KEY=case.api_key or "sk-right")
    if case.command == "resume":
        if case.name == "resume unknown run":
            run_cli(
                "optimize", str(repo), "--api-base", server.url, "--model", "s", "--max-metric-calls", "60", env=env
            )
        proc = run_cli("resume", "r-nope", "--path", str(repo), env=env)
    else:
        args = ("--api-base", server.url, "--model", "s")
        if "--api-base" in case.args:
            args = ("--model", "s")
        proc = run_cli("optimize", str(repo), *args, *case.args, env=env)
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    message = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert re.search(case.expect, proc.stderr) or re.search(case.expect, message), proc.stderr
    assert "fix:" in proc.stderr, "every error names the fix"
    if case.command == "optimize":
        assert _snapshot(repo) == before, "the repository changed"
        db = repo / ".codeevolver" / "runs.db"
        if db.exists():
            from codeevolver.store import Store

            with Store(f"sqlite:///{db}") as store:
                assert store.list_runs() == [], "a run was half-created"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", edit_toml("router.pipeline:route", "router.nowhere:route"))
    with ScriptedOpenAIServer(RouterWorld()) as srv:
        proc = run_cli("optimize", str(repo), "--api-base", srv.url, "--model", "s", "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def _snapshot(repo: Path) -> tuple[str, str]:
    if not (repo / ".git").exists():
        return ("", "")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    refs = subprocess.run(["git", "for-each-ref"], cwd=repo, capture_output=True, text=True).stdout
    return status, refs
