"""The run store against real SQLite files: round trips, atomicity, idempotence, durability."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC
from decimal import Decimal
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from codeevolver.errors import RunNotFound, StoreError
from codeevolver.store import Store, new_run_id
from codeevolver.store.tables import Base
from codeevolver.types import Candidate, ExampleResult, UsageRecord


@pytest.fixture
def store(tmp_path: Path):
    s = Store.for_repo(tmp_path)
    yield s
    s.close()


@pytest.fixture
def run_id(store: Store, tmp_path: Path) -> str:
    return store.create_run({"model": "m", "budget": {"metric_calls": 100}}, str(tmp_path), "abc123", 7)


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _results(n: int, score: float = 0.5, start: int = 0) -> list[ExampleResult]:
    return [ExampleResult(index=start + i, score=score, feedback=f"fb{i}") for i in range(n)]


# -- runs ----------------------------------------------------------------------------------


def test_run_ids_look_like_the_documented_format():
    rid = new_run_id()
    prefix, day, suffix = rid.split("-")
    assert prefix == "r" and len(day) == 8 and day.isdigit() and len(suffix) == 6
    int(suffix, 16)


def test_run_round_trip(store: Store, run_id: str, tmp_path: Path):
    run = store.get_run(run_id)
    assert run.id == run_id
    assert run.status == "running"
    assert run.config == {"model": "m", "budget": {"metric_calls": 100}}
    assert run.repo_path == str(tmp_path)
    assert (run.base_commit, run.seed, run.metric_calls, run.iteration) == ("abc123", 7, 0, 0)
    assert run.best_candidate_id is None and run.finished_at is None
    assert run.created_at.tzinfo is not None and run.created_at.utcoffset() == UTC.utcoffset(None)

    store.update_run(run_id, iteration=3, best_candidate_id="c1", best_score=0.75, seed_score=0.5)
    store.update_run(run_id, status="finished", config={"model": "other"})
    run2 = store.get_run(run_id)
    assert (run2.iteration, run2.best_candidate_id, run2.best_score, run2.seed_score) == (3, "c1", 0.75, 0.5)
    assert run2.status == "finished" and run2.finished_at is not None
    assert run2.config == {"model": "other"}
    assert run2.updated_at > run.updated_at

    store.update_run(run_id, status="running")  # resumed
    assert store.get_run(run_id).finished_at is None
    store.update_run(run_id, status="failed", error="boom")
    failed = store.get_run(run_id)
    assert failed.error == "boom" and failed.finished_at is not None


def test_update_run_rejects_unknown_fields_and_statuses(store: Store, run_id: str):
    with pytest.raises(ValueError, match="unknown fields"):
        store.update_run(run_id, colour="red")
    with pytest.raises(ValueError, match="status"):
        store.update_run(run_id, status="exploded")


def test_list_runs_newest_first(store: Store, tmp_path: Path):
    ids = [store.create_run({}, str(tmp_path), "c", i) for i in range(3)]
    assert [r.id for r in store.list_runs()] == ids[::-1]
    assert [r.id for r in store.list_runs(repo_path=str(tmp_path))] == ids[::-1]
    assert store.list_runs(repo_path="/elsewhere") == []


def test_unknown_run_raises_run_not_found(store: Store):
    rec = UsageRecord(model="m", purpose="task", run_id="r-nope", request_id="x")
    calls = [
        lambda: store.get_run("r-nope"),
        lambda: store.update_run("r-nope", iteration=1),
        lambda: store.add_evaluations("r-nope", "c", "val", _results(1), "b"),
        lambda: store.add_event("r-nope", "k", {}),
        lambda: store.add_usage(rec),
        lambda: store.add_candidate("r-nope", Candidate("c", {}, "x"), "seed"),
        lambda: store.add_transcript("r-nope", "c", "agent", []),
        lambda: store.get_candidate("r-nope", "c"),
        lambda: store.update_candidate("r-nope", "c", status="accepted"),
    ]
    for call in calls:
        with pytest.raises(RunNotFound, match="r-nope") as info:
            call()
        assert info.value.fix == "list runs with `codeevolver runs`"


# -- candidates ----------------------------------------------------------------------------


def test_candidate_round_trip(store: Store, run_id: str):
    seed = Candidate(id="c0", components={"qa": "Answer."}, commit="aaa", branch="main")
    child = Candidate(
        id="c1",
        components={"qa": "Answer well.", "new": "x"},
        commit="bbb",
        parents=["c0"],
        branch=f"codeevolver/{run_id}/c1",
        change_type="code",
        description="added a predictor",
        iteration=1,
    )
    store.add_candidate(run_id, seed, "seed", val_score=0.5)
    store.add_candidate(run_id, child, "rejected", reason="minibatch not better")

    got = store.get_candidate(run_id, "c1")
    assert got.to_candidate() == child
    assert (got.status, got.reason, got.val_score) == ("rejected", "minibatch not better", None)
    assert store.get_candidate(run_id, "c0").val_score == 0.5

    assert [c.id for c in store.list_candidates(run_id)] == ["c0", "c1"]
    assert [c.id for c in store.list_candidates(run_id, status="seed")] == ["c0"]

    store.update_candidate(run_id, "c1", status="accepted", val_score=0.9, reason=None)
    got = store.get_candidate(run_id, "c1")
    assert (got.status, got.val_score, got.reason) == ("accepted", 0.9, None)


def test_candidates_keep_creation_order_beyond_clock_resolution(store: Store, run_id: str):
    ids = [f"c{i:03d}" for i in range(50)][::-1]  # ids sort opposite to creation
    for cid in ids:
        store.add_candidate(run_id, Candidate(cid, {}, "x"), "rejected")
    assert [c.id for c in store.list_candidates(run_id)] == ids


def test_candidate_errors(store: Store, run_id: str):
    store.add_candidate(run_id, Candidate("c0", {}, "x"), "seed")
    with pytest.raises(StoreError, match="already exists"):
        store.add_candidate(run_id, Candidate("c0", {}, "y"), "seed")
    with pytest.raises(RunNotFound, match="no candidate 'zz'"):
        store.get_candidate(run_id, "zz")
    with pytest.raises(RunNotFound, match="no candidate 'zz'"):
        store.update_candidate(run_id, "zz", status="accepted")
    with pytest.raises(ValueError, match="status"):
        store.add_candidate(run_id, Candidate("c1", {}, "x"), "maybe")


# -- evaluations ---------------------------------------------------------------------------


def test_evaluations_round_trip(store: Store, run_id: str):
    first = [
        ExampleResult(index=0, score=1.0, feedback="right", output={"answer": "4", "n": [1, 2]}),
        ExampleResult(index=1, score=0.0, error="TimeoutError: 30s", output=None),
        ExampleResult(index=2, score=0.25, output=object()),  # not JSON: stored as its repr
    ]
    assert store.add_evaluations(run_id, "c0", "val", first, "b1") == 3
    assert store.add_evaluations(run_id, "c0", "train", _results(2), "b2") == 5
    assert store.add_evaluations(run_id, "c0", "val", [ExampleResult(index=1, score=0.5)], "b3") == 6
    assert store.add_evaluations(run_id, "c1", "val", _results(2, score=0.1), "b4") == 8
    assert store.add_evaluations(run_id, "c1", "val", [], "b5") == 8
    assert store.get_run(run_id).metric_calls == 8

    assert store.val_scores(run_id) == {"c0": {0: 1.0, 1: 0.5, 2: 0.25}, "c1": {0: 0.1, 1: 0.1}}

    rows = store.evaluations(run_id, "c0", split="val")
    assert [(r.example_index, r.batch_id) for r in rows] == [(0, "b1"), (1, "b1"), (2, "b1"), (1, "b3")]
    assert rows[0].output == {"answer": "4", "n": [1, 2]} and rows[0].feedback == "right"
    assert rows[1].error == "TimeoutError: 30s" and rows[1].output is None
    assert rows[2].output.startswith("<object object")
    assert rows[0].to_result() == ExampleResult(
        index=0, score=1.0, feedback="right", output={"answer": "4", "n": [1, 2]}
    )
    assert len(store.evaluations(run_id, "c0")) == 6
    assert [r.split for r in store.evaluations(run_id, "c0", split="train")] == ["train", "train"]

    with pytest.raises(ValueError, match="split"):
        store.add_evaluations(run_id, "c0", "test", _results(1), "b")


def test_metric_calls_increment_atomically_under_threads(store: Store, run_id: str):
    threads, rounds, batch = 8, 20, 3
    totals: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(n: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                total = store.add_evaluations(run_id, f"c{n}", "train", _results(batch), f"b{n}-{r}")
                with lock:
                    totals.append(total)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()

    assert errors == []
    expected = threads * rounds * batch
    assert store.get_run(run_id).metric_calls == expected
    # Each call saw its own increment: the returned totals are exactly 3, 6, ..., 480.
    assert sorted(totals) == list(range(batch, expected + 1, batch))
    assert sum(len(store.evaluations(run_id, f"c{n}")) for n in range(threads)) == expected


# -- events and transcripts ----------------------------------------------------------------


def test_events_round_trip(store: Store, run_id: str):
    ids = [store.add_event(run_id, "iteration", {"i": i}) for i in range(5)]
    store.add_event(run_id, "finished", {"best": "c3", "nested": {"a": [1.5, None]}})
    events = store.events(run_id)
    assert [e.kind for e in events] == ["iteration"] * 5 + ["finished"]
    assert events[-1].data == {"best": "c3", "nested": {"a": [1.5, None]}}
    assert [e.data.get("i") for e in store.events(run_id, after_id=ids[2])] == [3, 4, None]
    assert len(store.events(run_id, after_id=ids[0], limit=2)) == 2
    assert events[0].time.tzinfo is not None


def test_transcripts_round_trip(store: Store, run_id: str):
    store.add_transcript(run_id, "c1", "reflection", [{"role": "user", "content": "why?"}])
    store.add_transcript(run_id, "c1", "coding", {"steps": 3, "log": "ok"})
    store.add_transcript(run_id, "c2", "coding", "plain text")
    got = store.transcript(run_id, "c1")
    assert [(t.kind, t.content) for t in got] == [
        ("reflection", [{"role": "user", "content": "why?"}]),
        ("coding", {"steps": 3, "log": "ok"}),
    ]
    assert [t.content for t in store.transcript(run_id, "c2")] == ["plain text"]
    assert store.transcript(run_id, "c9") == []


# -- usage and money -----------------------------------------------------------------------


def test_usage_is_idempotent_on_request_id(store: Store, run_id: str):
    rec = UsageRecord(
        model="claude",
        purpose="reflection",
        input_tokens=100,
        output_tokens=20,
        cached_tokens=5,
        cost_usd=Decimal("0.0123"),
        request_id="req-1",
        run_id=run_id,
        candidate_id="c1",
    )
    assert store.add_usage(rec) is True
    assert store.add_usage(rec) is False
    no_id = UsageRecord(model="m", purpose="task", input_tokens=1, run_id=run_id)
    assert store.add_usage(no_id) is True
    assert store.add_usage(no_id) is True  # without a request id every call counts

    totals = store.usage_totals(run_id)
    assert (totals.input_tokens, totals.output_tokens, totals.cached_tokens, totals.calls) == (102, 20, 5, 3)
    assert totals.cost_usd == Decimal("0.0123")
    assert totals.by_purpose["reflection"].calls == 1
    assert totals.by_purpose["task"].input_tokens == 2
    assert set(totals.by_purpose) == {"reflection", "task"}


def test_same_request_id_in_another_run_is_another_row(store: Store, run_id: str, tmp_path: Path):
    other = store.create_run({}, str(tmp_path), "c", 0)
    for rid in (run_id, other):
        assert store.add_usage(UsageRecord(model="m", purpose="agent", request_id="same", run_id=rid))
    assert store.usage_totals(run_id).calls == store.usage_totals(other).calls == 1


def test_money_is_exact(store: Store, run_id: str):
    for _ in range(3):
        store.add_usage(UsageRecord(model="m", purpose="task", cost_usd=Decimal("0.000001"), run_id=run_id))
    assert store.usage_totals(run_id).cost_usd == Decimal("0.000003")
    for _ in range(10):
        store.add_usage(UsageRecord(model="m", purpose="agent", cost_usd=Decimal("0.1"), run_id=run_id))
    totals = store.usage_totals(run_id)
    assert totals.cost_usd == Decimal("1.000003")
    assert totals.by_purpose["agent"].cost_usd == Decimal(1)
    assert isinstance(totals.cost_usd, Decimal)
    assert store.usage_totals("r-none").cost_usd == Decimal(0)
    with pytest.raises(TypeError, match="float"):
        store.add_usage(UsageRecord(model="m", purpose="task", cost_usd=0.1, run_id=run_id))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="run_id"):
        store.add_usage(UsageRecord(model="m", purpose="task"))


# -- opening, migrations, errors -----------------------------------------------------------


def test_for_repo_creates_a_git_ignored_state_dir(tmp_path: Path):
    with Store.for_repo(tmp_path):
        pass
    state = tmp_path / ".codeevolver"
    assert (state / "runs.db").is_file()
    assert (state / ".gitignore").read_text().splitlines()[-1] == "*"
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        status = subprocess.run(
            ["git", "-C", str(tmp_path), "status", "--porcelain"], capture_output=True, text=True, check=True
        )
        assert status.stdout == ""


def test_open_existing_creates_nothing_without_a_store(tmp_path: Path):
    with pytest.raises(StoreError, match="no CodeEvolver runs in") as info:
        Store.open_existing(tmp_path)
    assert info.value.fix == "run `codeevolver optimize` first"
    assert list(tmp_path.iterdir()) == []

    with Store.for_repo(tmp_path) as s:
        rid = s.create_run({}, str(tmp_path), "c", 0)
    with Store.open_existing(tmp_path) as s:
        assert s.get_run(rid).id == rid


def test_unwritable_state_dir_raises_store_error(tmp_path: Path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot write state directory") as info:
        Store.for_repo(blocker / "sub")
    assert info.value.fix
    with pytest.raises(StoreError, match="cannot write state directory"):
        Store(_url(blocker / "sub" / "runs.db"))


def test_migration_creates_version_table_and_reopening_is_a_no_op(tmp_path: Path):
    path = tmp_path / "runs.db"
    with Store(_url(path)) as s:
        rid = s.create_run({"k": 1}, "/repo", "c", 0)
    engine = create_engine(_url(path))
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        assert {"alembic_version", "runs", "candidates", "evaluations", "events", "usage"} <= tables
        assert {"transcripts", "audit"} <= tables
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]
    mtime = path.stat().st_mtime_ns
    with Store(_url(path)) as s:
        assert s.get_run(rid).config == {"k": 1}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0002"]
    assert path.stat().st_mtime_ns == mtime  # the upgrade found nothing to do and wrote nothing
    engine.dispose()


def test_models_match_the_migrations(tmp_path: Path):
    path = tmp_path / "runs.db"
    Store(_url(path)).close()
    engine = create_engine(_url(path))
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
    engine.dispose()


def test_database_from_a_newer_release_is_refused(tmp_path: Path):
    path = tmp_path / "runs.db"
    Store(_url(path)).close()
    engine = create_engine(_url(path))
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="does not know"):
        Store(_url(path))


def test_store_does_not_depend_on_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with Store.for_repo(tmp_path / "repo") as s:
        assert s.list_runs() == []
    assert (tmp_path / "repo" / ".codeevolver" / "runs.db").is_file()
    assert list(elsewhere.iterdir()) == []


def test_bad_url_raises_store_error():
    with pytest.raises(StoreError, match="not a database URL"):
        Store("::nonsense::")


def test_in_memory_store_works_across_threads():
    with Store("sqlite://") as s:
        rid = s.create_run({}, "/r", "c", 0)

        def add() -> None:
            for _ in range(10):
                s.add_evaluations(rid, "c", "val", _results(1), "b")

        pool = [threading.Thread(target=add) for _ in range(4)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert s.get_run(rid).metric_calls == 40


# -- durability ----------------------------------------------------------------------------


def test_second_store_sees_committed_data(tmp_path: Path):
    a = Store.for_repo(tmp_path)
    b = Store.open_existing(tmp_path)
    rid = a.create_run({}, str(tmp_path), "c", 0)
    a.add_candidate(rid, Candidate("c0", {"p": "x"}, "aaa"), "seed")
    a.add_evaluations(rid, "c0", "val", _results(4), "b")
    a.add_usage(UsageRecord(model="m", purpose="task", cost_usd=Decimal("0.5"), request_id="q", run_id=rid))
    assert b.get_run(rid).metric_calls == 4
    assert b.get_candidate(rid, "c0").components == {"p": "x"}
    assert b.usage_totals(rid).cost_usd == Decimal("0.5")
    a.close()
    b.close()


_CHILD_SELF_KILL = """
import os, signal, sys
from decimal import Decimal
from codeevolver.store import Store
from codeevolver.types import Candidate, ExampleResult, UsageRecord
s = Store(sys.argv[1])
rid = s.create_run({"k": 1}, "/repo", "c", 0)
s.add_candidate(rid, Candidate("c0", {"p": "x"}, "aaa"), "accepted", val_score=0.75)
s.add_usage(UsageRecord(model="m", purpose="task", cost_usd=Decimal("0.000007"), request_id="q", run_id=rid))
print(rid, flush=True)
s.add_evaluations(rid, "c0", "val", [ExampleResult(index=i, score=1.0) for i in range(5)], "b")
os.kill(os.getpid(), signal.SIGKILL)
"""

_CHILD_LOOP = """
import sys
from codeevolver.store import Store
from codeevolver.types import ExampleResult
s = Store(sys.argv[1])
rid = s.create_run({}, "/repo", "c", 0)
print(rid, flush=True)
i = 0
while True:
    total = s.add_evaluations(rid, "c0", "val", [ExampleResult(index=i, score=0.5)], f"b{i}")
    event = s.add_event(rid, "step", {"i": i})
    print(total, event, flush=True)
    i += 1
"""


def test_sigkill_right_after_a_write_loses_nothing(tmp_path: Path):
    url = _url(tmp_path / "runs.db")
    child = subprocess.run([sys.executable, "-c", _CHILD_SELF_KILL, url], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    rid = child.stdout.strip()
    with Store(url) as s:
        assert s.get_run(rid).metric_calls == 5
        assert s.val_scores(rid) == {"c0": dict.fromkeys(range(5), 1.0)}
        assert s.get_candidate(rid, "c0").val_score == 0.75
        assert s.usage_totals(rid).cost_usd == Decimal("0.000007")


def test_sigkill_mid_stream_keeps_every_acknowledged_write(tmp_path: Path):
    url = _url(tmp_path / "runs.db")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_LOOP, url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    rid = proc.stdout.readline().strip()
    acked: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    while len(acked) < 30 and time.monotonic() < deadline:
        total, event = proc.stdout.readline().split()
        acked.append((int(total), int(event)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(acked) == 30
    with Store(url) as s:
        run = s.get_run(rid)
        assert run.metric_calls >= acked[-1][0]
        event_ids = {e.id for e in s.events(rid)}
        assert {event for _, event in acked} <= event_ids
        assert len(s.val_scores(rid)["c0"]) == run.metric_calls
