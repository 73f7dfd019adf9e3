"""Orchestration time per proposal on a 1,000-file (packed) repository, without model or program time.

Replays, ITERATIONS times each, the git and store calls the engine makes for
one accepted prompt proposal and one accepted code proposal, in the engine's
order and with the real GitWorkspace and SQLite Store: launch bookkeeping,
parent minibatch results, the new commit (``commit_files`` for a prompt;
export + edit + ``commit_dir`` + ``adopt`` for a code change, as CodeProposer does:
the agent's tree, pruned to the commit, becomes the child's evaluation export),
the child's evaluation directory (a prompt child runs in its parent's export and is
committed only once accepted), its minibatch and valset results, ``set_ref``, the
candidate row and the events. Each proposal's parent is the previous child.
Prints, per proposal kind, the median against the 100 ms target and where the
time goes, with the repo and state on the temp dir's disk and on tmpfs (the
same work without the disk); the four series are interleaved so that they see
the same load. Like the engine, it deletes no export.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
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
KINDS = ("prompt", "code")
TREE_CALLS = {"export", "evaluation_dir", "remove", "adopt"}
T = TypeVar("T")


def make_repo(repo: Path) -> str:
    """1,000 files: 999 small Python modules in 30 packages plus one prompt file, committed and packed."""
    for i in range(FILES - 1):
        path = repo / f"pkg{i % 30:02d}" / f"mod{i:04d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'"""Module {i}."""\n\n\ndef f{i}(x):\n    return x + {i}\n' * 8)
    (repo / PROMPT).parent.mkdir()
    (repo / PROMPT).write_text("Answer the question.\n")
    head = commit_repo(repo)
    # Packed, as a cloned (or once garbage-collected) repository is: checking out 1,000 loose
    # objects, as ``git add`` leaves them, costs about twice as much (measured 27 vs 51-69 ms on tmpfs).
    subprocess.run(["git", "gc", "-q"], cwd=repo, check=True)
    return head


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
        self.run_commit = head  # the export the current parent's program runs in
        self.store.add_evaluations(self.run_id, "c000", "val", results(VALSET), "seed-val")
        self.store.add_candidate(self.run_id, self.parent, "seed", val_score=0.5)
        self.n = 0
        self.spent: dict[str, float] = {}

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a Store or GitWorkspace method, adding its time to its kind: store, tree (writing or
        removing a whole tree of files) or git (commits, refs, reads)."""
        kind = "tree" if fn.__name__ in TREE_CALLS else "git"
        if isinstance(getattr(fn, "__self__", None), Store):
            kind = "store"
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.spent[kind] += time.perf_counter() - started

    def proposal(self, kind: str) -> dict[str, float]:
        """One accepted proposal of ``kind``; returns its seconds by kind of call."""
        self.n += 1
        self.spent = {"tree": 0.0, "git": 0.0, "store": 0.0}
        cid, parent, run, call = f"c{self.n:03d}", self.parent, self.run_id, self.call
        call(self.store.get_run, run)  # _may_launch
        call(self.store.update_run, run, iteration=self.n)  # _launch
        call(self.store.add_event, run, "proposal_started", {"iteration": self.n, "candidate": cid})
        call(self.ws.evaluation_dir, self.run_commit)
        call(self.store.add_evaluations, run, cid, "train", results(MINIBATCH), f"{cid}-parent")
        text = f"Answer the question. Rule {self.n}.\n"
        if kind == "prompt":  # evaluated in the parent's export; committed only once accepted
            commit, run_commit = parent.commit, self.run_commit
        else:
            commit = run_commit = self.code_change(parent.commit, cid)
        child = Candidate(cid, {"instructions": text}, commit, [parent.id], change_type=kind, iteration=self.n)
        call(self.ws.evaluation_dir, run_commit)
        call(self.store.add_evaluations, run, cid, "train", results(MINIBATCH), f"{cid}-child")
        call(self.store.add_evaluations, run, cid, "val", results(VALSET), f"{cid}-val")
        if kind == "prompt":
            commit = call(self.ws.commit_files, parent.commit, {PROMPT: text}, f"codeevolver {cid}: instructions")
            child.commit = commit
        child.branch = f"codeevolver/{run}/{cid}"
        call(self.ws.set_ref, f"refs/heads/{child.branch}", commit)
        call(self.store.add_candidate, run, child, "accepted", val_score=0.6)
        call(self.store.update_run, run, best_candidate_id=cid, best_score=0.6)
        call(self.store.add_event, run, "candidate_accepted", {"candidate": cid, "val_score": 0.6})
        self.parent, self.run_commit = child, run_commit
        return self.spent

    def code_change(self, parent: str, cid: str) -> str:
        """CodeProposer + Engine._code_child around the agent: export, edit one file, commit, ref, re-read."""
        call = self.call
        call(self.ws.list_files, parent)  # shown to the reflection agent
        worktree = self.ws.work_root / f"agent-{cid}"
        call(self.ws.export, parent, worktree)
        module = worktree / "pkg00" / "mod0000.py"
        module.write_text(module.read_text() + f"\nCHANGE = {self.n}\n")  # the coding agent's edit (untimed)
        commit = call(self.ws.commit_dir, worktree, parent, f"codeevolver {cid}: change")
        assert commit is not None
        call(self.ws.adopt, worktree, commit)  # the agent's tree becomes the child's evaluation export
        call(self.ws.remove, worktree)  # Engine._code_child's clean-up (nothing left to remove)
        call(self.store.add_transcript, self.run_id, cid, "agent", [{"role": "assistant", "content": "edited"}])
        call(self.ws.set_ref, f"refs/codeevolver/{self.run_id}/{cid}", commit)
        call(self.ws.read_file, commit, PROMPT)
        return commit


def replay_in(base: Path) -> Replay:
    repo, state = base / "repo", base / "state"
    repo.mkdir()
    state.mkdir()
    return Replay(repo, state, make_repo(repo))


def main() -> None:
    places = {"disk": None, "tmpfs": "/dev/shm"} if Path("/dev/shm").is_dir() else {"disk": None}
    print(f"{FILES}-file repo, {ITERATIONS} accepted proposals of each kind, minibatch {MINIBATCH}, valset {VALSET}")
    print(machine())
    with contextlib.ExitStack() as stack:
        replays = {
            where: replay_in(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ce-bench-", dir=d))))
            for where, d in places.items()
        }
        runs: dict[tuple[str, str], list[dict[str, float]]] = {(w, k): [] for w in places for k in KINDS}
        for i in range(ITERATIONS + 1):  # interleaved, so every series sees the same machine; the first is a warm-up
            for (where, kind), series in runs.items():
                spent = replays[where].proposal(kind)
                if i:
                    series.append(spent)
        for replay in replays.values():
            replay.store.close()
    row = "{:>5} {:>8} {:>9} {:>7} {:>6} {:>8} {:>8}  {}"
    print(row.format("where", "proposal", "median ms", "tree ms", "git ms", "store ms", "/ target", "target"))
    for (where, kind), series in runs.items():
        total = 1000 * statistics.median(sum(r.values()) for r in series)
        parts = [1000 * statistics.median(r[part] for r in series) for part in ("tree", "git", "store")]
        verdict = f"< {TARGET_MS:g} ms: {'met' if total < TARGET_MS else 'NOT met'}"
        cells = [f"{ms:.1f}" for ms in (total, *parts)]
        print(row.format(where, kind, *cells, f"{total / TARGET_MS:.2f}", verdict))
    print("tree: exporting or removing a whole tree; disk: the temp dir's file system (where a run's state")
    print("would live); tmpfs: the same in memory. Parts are medians of their own, so they need not add up.")


if __name__ == "__main__":
    main()
