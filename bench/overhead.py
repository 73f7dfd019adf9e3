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

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import commit_repo

from codeevolver.store import Store
from codeevolver.types import Candidate, ExampleResult
from codeevolver.workspace.git import GitWorkspace

FILES = 1000
ITERATIONS = 50
MINIBATCH, VALSET = 3, 30
TARGET_MS = 100.0
PROMPT = "prompts/instructions.txt"


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
    """The engine's per-proposal git and store calls, one proposal at a time."""

    def __init__(self, repo: Path, state: Path, head: str) -> None:
        self.store = Store(f"sqlite:///{state / 'runs.db'}")
        self.run_id = self.store.create_run({}, str(repo), head, 0)
        self.ws = GitWorkspace(repo, state / "work" / self.run_id)
        self.parent = Candidate(id="c000", components={"instructions": "Answer."}, commit=head)
        self.ws.evaluation_dir(head)
        self.store.add_evaluations(self.run_id, "c000", "val", results(VALSET), "seed-val")
        self.store.add_candidate(self.run_id, self.parent, "seed", val_score=0.5)
        self.n = 0

    def proposal(self, kind: str) -> float:
        """One accepted proposal of ``kind``; returns its orchestration time in seconds."""
        self.n += 1
        cid, parent, run = f"c{self.n:03d}", self.parent, self.run_id
        started = time.perf_counter()
        self.store.get_run(run)  # _may_launch
        self.store.update_run(run, iteration=self.n)  # _launch
        self.store.add_event(run, "proposal_started", {"iteration": self.n, "parent": parent.id, "candidate": cid})
        self.ws.evaluation_dir(parent.commit)
        self.store.add_evaluations(run, cid, "train", results(MINIBATCH), f"{cid}-parent")
        text = f"Answer the question. Rule {self.n}.\n"
        if kind == "prompt":
            commit = self.ws.commit_files(parent.commit, {PROMPT: text}, f"codeevolver {cid}: instructions")
        else:
            commit = self.code_change(parent.commit, cid)
        child = Candidate(cid, {"instructions": text}, commit, [parent.id], change_type=kind, iteration=self.n)
        self.ws.evaluation_dir(commit)
        self.store.add_evaluations(run, cid, "train", results(MINIBATCH), f"{cid}-child")
        self.store.add_evaluations(run, cid, "val", results(VALSET), f"{cid}-val")
        child.branch = f"codeevolver/{run}/{cid}"
        self.ws.set_ref(f"refs/heads/{child.branch}", commit)
        self.store.add_candidate(run, child, "accepted", val_score=0.6)
        self.store.update_run(run, best_candidate_id=cid, best_score=0.6)
        self.store.add_event(run, "candidate_accepted", {"candidate": cid, "minibatch": [1.5, 2.0], "val_score": 0.6})
        took = time.perf_counter() - started
        self.parent = child
        return took

    def code_change(self, parent: str, cid: str) -> str:
        """CodeProposer + Engine._code_child around the agent: export, edit one file, commit, ref, re-read."""
        self.ws.list_files(parent)  # shown to the reflection agent
        worktree = self.ws.work_root / f"agent-{cid}"
        self.ws.export(parent, worktree)
        module = worktree / "pkg00" / "mod0000.py"
        module.write_text(module.read_text() + f"\nCHANGE = {self.n}\n")  # the coding agent's edit
        commit = self.ws.commit_dir(worktree, parent, f"codeevolver {cid}: change")
        self.ws.remove(worktree)
        assert commit is not None
        self.store.add_transcript(self.run_id, cid, "agent", [{"role": "assistant", "content": "edited"}])
        self.ws.set_ref(f"refs/codeevolver/{self.run_id}/{cid}", commit)
        self.ws.read_file(commit, PROMPT)
        return commit


def median_ms(run: Callable[[], float]) -> float:
    run()  # warm-up
    return 1000 * statistics.median(run() for _ in range(ITERATIONS))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ce-bench-") as tmp:
        repo, state = Path(tmp) / "repo", Path(tmp) / "state"
        repo.mkdir()
        state.mkdir()
        replay = Replay(repo, state, make_repo(repo))
        print(f"{FILES}-file repo, {ITERATIONS} accepted proposals each, minibatch {MINIBATCH}, valset {VALSET}")
        print(f"{'proposal':>8} {'median ms':>9} {'/ target':>8}  target < {TARGET_MS:g} ms")
        for kind in ("prompt", "code"):
            ms = median_ms(lambda kind=kind: replay.proposal(kind))
            verdict = "met" if ms < TARGET_MS else "NOT met"
            print(f"{kind:>8} {ms:>9.1f} {ms / TARGET_MS:>8.2f}  {verdict}")
        replay.store.close()


if __name__ == "__main__":
    main()
