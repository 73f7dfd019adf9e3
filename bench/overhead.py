"""Orchestration time per proposal on a 1,000-file repository, without model or program time.

Replays, ITERATIONS times each, the git and store calls the engine makes for
one accepted prompt proposal and one accepted code proposal, in the engine's
order and with the real GitWorkspace and SQLite Store: launch bookkeeping,
parent minibatch results, the new commit (``commit_files`` for a prompt;
export + edit + ``commit_dir`` for a code change, as CodeProposer does), the
child's evaluation export, its minibatch and valset results, ``set_ref``, the
candidate row and the events. Each proposal's parent is the previous child.
Prints the median per proposal kind against the 100 ms target.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from harness import commit_repo, machine

from codeevolver.store import Store
from codeevolver.types import Candidate, ExampleResult
from codeevolver.workspace.git import GitWorkspace

FILES = 1000
ITERATIONS = 50
MINIBATCH, VALSET = 3, 30
TARGET_MS = 100.0
PROMPT = "prompts/instructions.txt"
T = TypeVar("T")


def make_repo(repo: Path) -> str:
    """1,000 files: 999 small Python modules in 30 packages plus one prompt file."""
    for i in range(FILES - 1):
        path = repo / f"pkg{i % 30:02d}" / f"mod{i:04d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'"""Module {i}."""\n\n\ndef f{i}(x):\n    return x + {i}\n' * 8)
    (repo / PROMPT).parent.mkdir()
    (repo / PROMPT).write_text("Answer the question.\n")
    return commit_repo(repo)


def results(n: int) -> list[ExampleResult]:
    return [ExampleResult(index=i, score=0.5, feedback="partly right", output={"answer": "x"}) for i in range(n)]


class Replay:
    """The engine's per-proposal git and store calls, one proposal at a time, timed by kind of call."""

    def __init__(self, repo: Path, state: Path, head: str) -> None:
        self.store = Store(f"sqlite:///{state / 'runs.db'}")
        self.run_id = self.store.create_run({}, str(repo), head, 0)
        self.ws = GitWorkspace(repo, state / "work" / self.run_id)
        self.parent = Candidate(id="c000", components={"instructions": "Answer."}, commit=head)
        self.ws.evaluation_dir(head)
        self.store.add_evaluations(self.run_id, "c000", "val", results(VALSET), "seed-val")
        self.store.add_candidate(self.run_id, self.parent, "seed", val_score=0.5)
        self.n = 0
        self.spent = {"git": 0.0, "store": 0.0}

    def git(self, fn: Callable[..., T], *args: Any) -> T:
        return self._timed("git", fn, *args)

    def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._timed("store", fn, *args, **kwargs)

    def _timed(self, kind: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.spent[kind] += time.perf_counter() - started

    def proposal(self, kind: str) -> dict[str, float]:
        """One accepted proposal of ``kind``; returns its git and store seconds."""
        self.n += 1
        self.spent = {"git": 0.0, "store": 0.0}
        cid, parent, run, db, git = f"c{self.n:03d}", self.parent, self.run_id, self.db, self.git
        db(self.store.get_run, run)  # _may_launch
        db(self.store.update_run, run, iteration=self.n)  # _launch
        db(self.store.add_event, run, "proposal_started", {"iteration": self.n, "parent": parent.id, "candidate": cid})
        git(self.ws.evaluation_dir, parent.commit)
        db(self.store.add_evaluations, run, cid, "train", results(MINIBATCH), f"{cid}-parent")
        text = f"Answer the question. Rule {self.n}.\n"
        if kind == "prompt":
            commit = git(self.ws.commit_files, parent.commit, {PROMPT: text}, f"codeevolver {cid}: instructions")
        else:
            commit = self.code_change(parent.commit, cid)
        child = Candidate(cid, {"instructions": text}, commit, [parent.id], change_type=kind, iteration=self.n)
        git(self.ws.evaluation_dir, commit)
        db(self.store.add_evaluations, run, cid, "train", results(MINIBATCH), f"{cid}-child")
        db(self.store.add_evaluations, run, cid, "val", results(VALSET), f"{cid}-val")
        child.branch = f"codeevolver/{run}/{cid}"
        git(self.ws.set_ref, f"refs/heads/{child.branch}", commit)
        db(self.store.add_candidate, run, child, "accepted", val_score=0.6)
        db(self.store.update_run, run, best_candidate_id=cid, best_score=0.6)
        db(
            self.store.add_event,
            run,
            "candidate_accepted",
            {"candidate": cid, "minibatch": [1.5, 2.0], "val_score": 0.6},
        )
        if parent.id != "c000":  # untimed: keep the disk footprint small (the engine keeps every export)
            shutil.rmtree(self.ws.evaluation_dir(parent.commit))
        self.parent = child
        return self.spent

    def code_change(self, parent: str, cid: str) -> str:
        """CodeProposer + Engine._code_child around the agent: export, edit one file, commit, ref, re-read."""
        git = self.git
        git(self.ws.list_files, parent)  # shown to the reflection agent
        worktree = self.ws.work_root / f"agent-{cid}"
        git(self.ws.export, parent, worktree)
        module = worktree / "pkg00" / "mod0000.py"
        module.write_text(module.read_text() + f"\nCHANGE = {self.n}\n")  # the coding agent's edit (untimed)
        commit = git(self.ws.commit_dir, worktree, parent, f"codeevolver {cid}: change")
        git(self.ws.remove, worktree)
        assert commit is not None
        self.db(self.store.add_transcript, self.run_id, cid, "agent", [{"role": "assistant", "content": "edited"}])
        git(self.ws.set_ref, f"refs/codeevolver/{self.run_id}/{cid}", commit)
        git(self.ws.read_file, commit, PROMPT)
        return commit


def measure(base: Path) -> dict[str, tuple[float, float, float]]:
    """Median (total, git, store) milliseconds per proposal kind, with the repo and state under ``base``."""
    repo, state = base / "repo", base / "state"
    repo.mkdir()
    state.mkdir()
    replay = Replay(repo, state, make_repo(repo))
    medians = {}
    for kind in ("prompt", "code"):
        replay.proposal(kind)  # warm-up
        runs = [replay.proposal(kind) for _ in range(ITERATIONS)]
        medians[kind] = tuple(
            1000 * statistics.median(part(r) for r in runs)
            for part in (lambda r: r["git"] + r["store"], lambda r: r["git"], lambda r: r["store"])
        )
    replay.store.close()
    return medians


def main() -> None:
    places = {"disk": None, "tmpfs": "/dev/shm"} if Path("/dev/shm").is_dir() else {"disk": None}
    print(f"{FILES}-file repo, {ITERATIONS} accepted proposals of each kind, minibatch {MINIBATCH}, valset {VALSET}")
    print(machine())
    print(f"{'where':>5} {'proposal':>8} {'median ms':>9} {'git ms':>7} {'store ms':>8} {'/ target':>8}  target")
    for where, parent in places.items():
        with tempfile.TemporaryDirectory(prefix="ce-bench-", dir=parent) as tmp:
            for kind, (total, git, store) in measure(Path(tmp)).items():
                verdict = f"< {TARGET_MS:g} ms: {'met' if total < TARGET_MS else 'NOT met'}"
                print(
                    f"{where:>5} {kind:>8} {total:>9.1f} {git:>7.1f} {store:>8.1f} {total / TARGET_MS:>8.2f}  {verdict}"
                )
    print("disk: the temp dir's file system, where a run's state would live; tmpfs: the same in memory")


if __name__ == "__main__":
    main()
