"""End-to-end runs of `codeevolver optimize` against a scripted OpenAI-protocol server.

Each test drives the real CLI in a subprocess (or the session API in-process) over a real git
repo, the real runner, store and engine; only the model is scripted, over real HTTP.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import sqlite3
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import pytest

from codeevolver.store import Store
from codeevolver.testing.fake_openai import ScriptedOpenAIServer
from scripted import BAD_PROMPT, RouterWorld, cli_env, make_repo, popen_cli, run_cli


def optimize(repo: Path, server: ScriptedOpenAIServer, *extra: str) -> dict:
    proc = run_cli("optimize", str(repo), "--api-base", server.url, "--model", "scripted", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def store_of(repo: Path) -> Store:
    return Store(f"sqlite:///{repo / '.codeevolver' / 'runs.db'}")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def test_prompt_mutation_improves_and_is_accepted(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld()
    with ScriptedOpenAIServer(world) as server:
        result = optimize(repo, server, "--mutate", "prompts", "--max-metric-calls", "120", "--concurrency", "1")
    assert result["best_score"] > result["seed_score"]
    assert result["best_score"] == pytest.approx(1.0)
    with store_of(repo) as store:
        best = store.get_candidate(result["run_id"], result["best_candidate"])
        assert best.status == "accepted" and best.change_type == "prompt"
        assert "LABEL_RULES_V2" in best.components["classify"]
        # the reflection model was shown the failing examples and the metric's feedback
    assert world.calls["reflection"] >= 1
    # the winning branch carries the new prompt file; the user's checkout is untouched
    assert "LABEL_RULES_V2" in git(repo, "show", f"{result['best_branch']}:prompts/classify.txt")
    assert "LABEL_RULES_V2" not in (repo / "prompts" / "classify.txt").read_text()
    assert git(repo, "status", "--porcelain") == ""


def test_worse_proposal_is_rejected(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT)) as server:
        result = optimize(repo, server, "--mutate", "prompts", "--max-metric-calls", "100")
    assert result["best_candidate"] == "c000"
    assert result["best_score"] == result["seed_score"]
    with store_of(repo) as store:
        rejected = store.list_candidates(result["run_id"], status="rejected")
        assert rejected, "every proposal should have been judged"
        assert all("not above the parent" in c.reason for c in rejected)
        assert store.list_candidates(result["run_id"], status="accepted") == []
    branches = git(repo, "branch", "--list", "codeevolver/*")
    assert branches.strip() == ""


def test_code_mutation_commits_on_a_new_branch_and_is_evaluated(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld()
    with ScriptedOpenAIServer(world) as server:
        result = optimize(repo, server, "--mutate", "code", "--max-metric-calls", "100")
    assert world.calls["agent"] >= 2 and world.calls["change_request"] >= 1
    run_id, best = result["run_id"], result["best_candidate"]
    assert result["best_branch"] == f"codeevolver/{run_id}/{best}"
    diff = git(repo, "diff", "HEAD", result["best_branch"])
    assert "text.lower().split()" in diff
    with store_of(repo) as store:
        cand = store.get_candidate(run_id, best)
        assert cand.change_type == "code" and cand.status == "accepted"
        assert cand.commit == git(repo, "rev-parse", result["best_branch"]).strip()
        # the child's minibatch and valset evaluations ran the new code: it scores perfectly
        val = store.evaluations(run_id, best, "val")
        assert val and all(row.score == 1.0 for row in val)
        steps = store.transcript(run_id, best)
        assert any("lower" in json.dumps(entry.content) for entry in steps)
    # the commit was made by CodeEvolver, not by a hook or the agent
    assert git(repo, "log", "-1", "--format=%an", result["best_branch"]).strip() == "CodeEvolver"


def test_claude_code_agent_changes_the_code_behind_the_gateway(tmp_path: Path) -> None:
    def use_claude(repo: Path) -> None:
        path = repo / "codeevolver.toml"
        path.write_text(path.read_text().replace("concurrency = 2", 'concurrency = 2\ncoding_agent = "claude"', 1))

    repo = make_repo(tmp_path / "repo", use_claude)
    world = RouterWorld(reflection_prompt=BAD_PROMPT)
    with ScriptedOpenAIServer(world, api_key="sk-upstream") as server:
        proc = run_cli(
            "optimize", str(repo), "--api-base", server.url, "--model", "scripted", "--json",
            "--mutate", "code", "--max-metric-calls", "130",
            env=cli_env(OPENAI_API_KEY="sk-upstream"),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        agent_requests = [h for body, h in zip(server.requests, server.headers, strict=True) if body.get("tools")]
    assert world.calls["agent"] >= 2  # the CLI's turns, translated to chat completions
    keys = [{name.lower(): value for name, value in h.items()}.get("authorization") for h in agent_requests]
    assert keys and set(keys) == {"Bearer sk-upstream"}  # the CLI's placeholder was swapped by the gateway
    assert result["best_candidate"] != "c000" and result["best_score"] > result["seed_score"]
    assert "text.lower()" in git(repo, "show", f"{result['best_branch']}:router/pipeline.py")
    with sqlite3.connect(repo / ".codeevolver" / "runs.db") as db:
        query = "SELECT candidate_id FROM usage WHERE run_id = ? AND purpose = 'agent'"
        metered = {row[0] for row in db.execute(query, (result["run_id"],))}
    assert result["best_candidate"] in metered  # the gateway metered the CLI's calls under its candidate
    shown = run_cli("candidates", result["run_id"], "--path", str(repo), "--show", result["best_candidate"])
    assert "grep -c lower" in shown.stdout


def test_failed_code_change_is_rejected_and_run_goes_on(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld(reflection_prompt=BAD_PROMPT, agent_command="true")  # the agent changes nothing
    with ScriptedOpenAIServer(world) as server:
        result = optimize(repo, server, "--mutate", "both", "--max-metric-calls", "120")
    with store_of(repo) as store:
        failed = store.list_candidates(result["run_id"], status="failed")
        assert failed and all(c.reason == "the coding agent changed nothing" for c in failed)
        rejected = store.list_candidates(result["run_id"], status="rejected")
        assert rejected and all(c.change_type == "prompt" for c in rejected)
    assert result["status"] == "finished"
    assert result["metric_calls"] > 60  # the run went on after the failed code changes


def test_code_change_that_breaks_the_import_is_rejected_with_the_reason(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    breaks = "echo 'def broken(:' >> router/pipeline.py && echo lower >> router/pipeline.py"
    world = RouterWorld(reflection_prompt=BAD_PROMPT, agent_command=breaks)
    with ScriptedOpenAIServer(world) as server:
        result = optimize(repo, server, "--mutate", "code", "--max-metric-calls", "130")
    with store_of(repo) as store:
        failed = store.list_candidates(result["run_id"], status="failed")
    assert failed and all("cannot load" in (c.reason or "") and "SyntaxError" in (c.reason or "") for c in failed)
    assert result["status"] == "finished" and result["best_candidate"] == "c000"


def test_code_change_that_crashes_every_example_is_rejected_with_the_error(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    crash = "def route(example, prompts):\n    raise RuntimeError('lower() of nothing')\n"
    breaks = f"printf {shlex.quote(crash)} >> router/pipeline.py"
    world = RouterWorld(reflection_prompt=BAD_PROMPT, agent_command=breaks)
    with ScriptedOpenAIServer(world) as server:
        result = optimize(repo, server, "--mutate", "code", "--max-metric-calls", "130")
    with store_of(repo) as store:
        failed = store.list_candidates(result["run_id"], status="failed")
    assert failed, "the code change should have failed"
    for cand in failed:
        assert "failed on every minibatch example" in (cand.reason or "") and "lower() of nothing" in cand.reason


def test_four_proposals_in_flight_at_once(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld(reflection_prompt=BAD_PROMPT, reflection_delay_s=1.0)
    with ScriptedOpenAIServer(world) as server:
        optimize(repo, server, "--mutate", "prompts", "--max-metric-calls", "260", "--concurrency", "4")
    assert world.max_reflection_in_flight == 4


def test_same_seed_same_run(tmp_path: Path) -> None:
    outcomes = []
    for name in ("a", "b"):
        repo = make_repo(tmp_path / name)
        with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT)) as server:
            result = optimize(repo, server, "--max-metric-calls", "150", "--seed", "7", "--concurrency", "1")
        with store_of(repo) as store:
            rows = store.list_candidates(result["run_id"])
            outcomes.append([(c.id, c.status, c.change_type, c.parents, c.val_score) for c in rows])
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0]) > 2


def test_budget_of_metric_calls_is_never_exceeded(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT)) as server:
        result = optimize(repo, server, "--mutate", "prompts", "--max-metric-calls", "90", "--concurrency", "3")
    assert 50 <= result["metric_calls"] <= 90
    left = 90 - result["metric_calls"]
    assert result["reason"].startswith(f"metric-call budget: {left} of 90 calls left, and a proposal may need 40 ")


def test_progress_and_summary_as_a_person_sees_them(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT)) as server:
        proc = run_cli("optimize", str(repo), "--api-base", server.url, "--model", "s", "--mutate", "prompts",
                       "--max-metric-calls", "90", "--concurrency", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    progress = proc.stderr.splitlines()
    assert any(line.startswith("seed c000 val ") for line in progress), proc.stderr
    rejected = [line for line in progress if line.startswith("✗ c001 rejected: ")]
    assert rejected and re.search(r"· in flight [0-2]/2 ·", rejected[0]), proc.stderr
    summary, ended = proc.stdout.splitlines()[:2]
    assert re.match(r"run r-\S+ finished: seed \d\.\d{3} -> best \d\.\d{3} \(c000\) after \d+ metric calls", summary)
    assert re.match(r"ended: metric-call budget: \d+ of 90 calls left, and a proposal may need 40 ", ended), ended


def test_usd_budget_stops_the_run(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    # gpt-4o is in litellm's price table, so each reflection call costs real (scripted) money
    with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT)) as server:
        result = optimize(
            repo, server, "--mutate", "prompts", "--reflection-model", "openai/gpt-4o",
            "--max-metric-calls", "400", "--max-usd", "0.00001", "--concurrency", "1",
        )  # fmt: skip
    assert result["status"] == "finished"
    assert result["usage"]["calls_by_purpose"]["reflection"] == 1
    assert float(result["usage"]["usd"]) > 0.00001
    assert result["metric_calls"] < 100
    assert result["reason"].startswith("USD budget: $") and result["reason"].endswith(" of $0.00001 spent")


def test_model_prices_bill_a_self_hosted_model_everywhere(tmp_path: Path) -> None:
    def priced(repo: Path) -> None:
        with (repo / "codeevolver.toml").open("a") as handle:
            handle.write("\n[optimize.model_prices]\nscripted = { input = 2.0, output = 8.0 }\n")

    repo = make_repo(tmp_path / "repo", priced)
    with ScriptedOpenAIServer(RouterWorld(reflection_prompt=BAD_PROMPT)) as server:
        result = optimize(repo, server, "--mutate", "prompts", "--max-metric-calls", "100", "--concurrency", "1")
    with store_of(repo) as store:
        totals = store.usage_totals(result["run_id"])
    by_purpose = totals.by_purpose
    for purpose in ("task", "reflection"):  # the program's calls (metered by the gateway) and ours
        used = by_purpose[purpose]
        expected = (Decimal(2) * (used.input_tokens + used.cached_tokens) + Decimal(8) * used.output_tokens) / 10**6
        assert used.calls > 0 and used.cost_usd == expected, (purpose, used)


def test_time_budget_stops_the_run(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld(reflection_prompt=BAD_PROMPT, reflection_delay_s=0.5)
    with ScriptedOpenAIServer(world) as server:
        started = time.monotonic()
        result = optimize(repo, server, "--mutate", "prompts", "--max-metric-calls", "5000", "--max-minutes", "0.05")
        took = time.monotonic() - started
    assert result["status"] == "finished"
    assert result["metric_calls"] < 5000
    assert took < 60
    assert result["reason"] == "time budget: 0.05 minutes used"


def test_stop_file_stops_a_running_optimization(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld(reflection_prompt=BAD_PROMPT, reflection_delay_s=0.3)
    with ScriptedOpenAIServer(world) as server:
        proc = popen_cli("optimize", str(repo), "--api-base", server.url, "--model", "s", "--json",
                         "--mutate", "prompts", "--max-metric-calls", "100000")  # fmt: skip
        run_id = wait_for_run(repo)
        (repo / ".codeevolver" / "runs").mkdir(parents=True, exist_ok=True)
        (repo / ".codeevolver" / "runs" / f"{run_id}.stop").touch()
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["status"] == "stopped"


def test_sigint_stops_gracefully(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld(reflection_delay_s=0.3)
    with ScriptedOpenAIServer(world) as server:
        proc = popen_cli("optimize", str(repo), "--api-base", server.url, "--model", "s", "--json",
                         "--mutate", "prompts", "--max-metric-calls", "100000")  # fmt: skip
        run_id = wait_for_run(repo, accepted=1)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    with store_of(repo) as store:
        run = store.get_run(run_id)
        assert run.status == "stopped" and "SIGINT" in (run.error or "")
        assert store.list_candidates(run_id, status="accepted")


def test_kill_9_then_resume_loses_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld(reflection_prompt=BAD_PROMPT, reflection_delay_s=0.2, task_delay_s=0.01)
    budget = 300
    with ScriptedOpenAIServer(world) as server:
        args = ("--api-base", server.url, "--model", "s", "--json")
        proc = popen_cli("optimize", str(repo), *args, "--max-metric-calls", str(budget), "--concurrency", "2")
        run_id = wait_for_run(repo, candidates=4)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        with store_of(repo) as store:
            before = {c.id: c for c in store.list_candidates(run_id) if c.status in ("seed", "accepted")}
            calls_before = store.get_run(run_id).metric_calls
            assert store.get_run(run_id).status == "running"
        # Ten minutes later the killed run has not beaten since: status and runs say so.
        with sqlite3.connect(repo / ".codeevolver" / "runs.db") as db:
            db.execute("UPDATE runs SET updated_at = datetime(updated_at, '-10 minutes') WHERE id = ?", (run_id,))
        shown = run_cli("status", run_id, "--path", str(repo))
        assert shown.returncode == 0 and f"codeevolver resume {run_id}" in shown.stdout, shown.stdout
        assert "running? (silent 10m" in run_cli("runs", "--path", str(repo)).stdout.replace("\n", "")
        resumed = run_cli("resume", run_id, "--path", str(repo), "--json")
        assert resumed.returncode == 0, resumed.stderr
        summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"
    assert calls_before <= summary["metric_calls"] <= budget
    with store_of(repo) as store:
        after = {c.id: c for c in store.list_candidates(run_id)}
        for cid, cand in before.items():
            assert after[cid].status == cand.status and after[cid].val_score == cand.val_score
        ids = [c.id for c in store.list_candidates(run_id)]
        assert len(ids) == len(set(ids))


def wait_for_run(repo: Path, accepted: int = 0, candidates: int = 1, timeout: float = 120) -> str:
    """Poll the run database until the run has the given number of candidates."""
    db = repo / ".codeevolver" / "runs.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            with Store(f"sqlite:///{db}") as store:
                runs = store.list_runs()
                if runs:
                    rows = store.list_candidates(runs[0].id)
                    n_accepted = sum(1 for c in rows if c.status == "accepted")
                    if len(rows) >= candidates and n_accepted >= accepted:
                        return runs[0].id
        time.sleep(0.2)
    raise AssertionError("the run did not get far enough in time")


def test_kill_9_while_the_seed_is_scored_then_resume_scores_it_and_finishes(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    world = RouterWorld(reflection_prompt=BAD_PROMPT, task_delay_s=0.2)  # the seed's 34 valset rows take seconds
    with ScriptedOpenAIServer(world) as server:
        args = ("--api-base", server.url, "--model", "s", "--json", "--mutate", "prompts")
        proc = popen_cli("optimize", str(repo), *args, "--max-metric-calls", "90", "--concurrency", "1")
        run_id = wait_for_run(repo, candidates=0)  # the run exists: the seed's valset evaluation has begun
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        with store_of(repo) as store:
            assert store.list_candidates(run_id) == [] and store.get_run(run_id).seed_score is None
        world.task_delay_s = 0.0
        resumed = run_cli("resume", run_id, "--path", str(repo), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["seed_score"] is not None
    with store_of(repo) as store:
        seed = store.get_candidate(run_id, "c000")
        assert seed.status == "seed" and seed.val_score == summary["seed_score"]
        assert seed.components["classify"] == (repo / "prompts" / "classify.txt").read_text()
        assert len(store.evaluations(run_id, "c000", "val")) == 34
        assert [c.id for c in store.list_candidates(run_id)][1:], "the resumed run went on to propose"
