"""The inspection commands on a finished run: runs, status, candidates, diff, apply, cancel."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from codeevolver.testing.fake_openai import ScriptedOpenAIServer
from scripted import BAD_PROMPT, RouterWorld, make_repo, popen_cli, run_cli


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    repo = make_repo(tmp_path_factory.mktemp("cli") / "repo")
    # prompts are rejected, so the winner is the agent's code change
    with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT)) as server:
        proc = run_cli("optimize", str(repo), "--api-base", server.url, "--model", "s", "--json",
                       "--max-metric-calls", "150", "--concurrency", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return repo, json.loads(proc.stdout.strip().splitlines()[-1])


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--path", str(repo))


def test_runs_and_status(finished: tuple[Path, dict]) -> None:
    repo, result = finished
    assert result["run_id"][:12] in cli(repo, "runs").stdout
    status = json.loads(cli(repo, "status", "--json").stdout)
    assert status["run_id"] == result["run_id"] and status["best_score"] == result["best_score"]
    assert status["status"] == "finished" and status["iteration"] >= 2


def test_candidates_lists_reasons_and_shows_the_agent_transcript(finished: tuple[Path, dict]) -> None:
    repo, result = finished
    listing = cli(repo, "candidates", result["run_id"]).stdout
    assert "rejected" in listing and "accepted" in listing and "not above" in listing
    shown = cli(repo, "candidates", result["run_id"], "--show", result["best_candidate"]).stdout
    assert "accepted code" in shown and "lowercase" in shown
    assert "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT" in shown  # the agent's steps


def test_diff_shows_the_code_change(finished: tuple[Path, dict]) -> None:
    repo, result = finished
    proc = cli(repo, "diff", result["run_id"], result["best_candidate"])
    assert proc.returncode == 0
    assert "-    words = text.split()" in proc.stdout and "+    words = text.lower().split()" in proc.stdout


def test_unknown_candidate_is_a_clear_error(finished: tuple[Path, dict]) -> None:
    repo, result = finished
    proc = cli(repo, "diff", result["run_id"], "c999")
    assert proc.returncode == 2 and "c999" in proc.stderr and "Traceback" not in proc.stderr


def test_cancel_refuses_a_finished_run(finished: tuple[Path, dict]) -> None:
    repo, result = finished
    proc = cli(repo, "cancel", result["run_id"])
    assert proc.returncode == 2 and "not running" in proc.stderr


def test_apply_checks_out_the_best_branch(finished: tuple[Path, dict]) -> None:
    repo, result = finished
    proc = cli(repo, "apply", result["run_id"])
    assert proc.returncode == 0, proc.stderr
    head = subprocess.run(["git", "branch", "--show-current"], cwd=repo, capture_output=True, text=True).stdout
    assert head.strip() == result["best_branch"]
    assert "text.lower().split()" in (repo / "router" / "pipeline.py").read_text()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""


def test_cancel_stops_a_running_optimization(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT, reflection_delay_s=0.3)) as server:
        proc = popen_cli("optimize", str(repo), "--api-base", server.url, "--model", "s", "--json",
                         "--mutate", "prompts", "--max-metric-calls", "100000")  # fmt: skip
        from test_optimize import wait_for_run

        run_id = wait_for_run(repo)
        assert cli(repo, "cancel", run_id).returncode == 0
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["status"] == "cancelled"


def test_egress_lists_the_runs_audited_requests(finished: tuple[Path, dict]) -> None:
    repo, result = finished
    listing = cli(repo, "egress", result["run_id"])
    assert listing.returncode == 0, listing.stderr
    count = int(listing.stdout.strip().splitlines()[-1].split()[0])
    assert count > 0, listing.stdout  # the program's and the agent's model calls went through the gateway
    assert "allowed" in listing.stdout
    blocked = cli(repo, "egress", result["run_id"], "--blocked")
    assert blocked.returncode == 0 and blocked.stdout.strip().splitlines()[-1] == "0 request(s)"
    unknown = cli(repo, "egress", "r-nope")
    assert unknown.returncode == 2 and "r-nope" in unknown.stderr
