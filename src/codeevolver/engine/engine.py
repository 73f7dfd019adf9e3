"""The asynchronous GEPA loop.

One proposal = select a parent from the Pareto frontier, pick a component (or
``_code``), draw a minibatch, run the parent on it with traces, ask a proposer
for a change, run the child on the same minibatch, and accept the child only if
its minibatch score is strictly higher; an accepted child is scored on the
whole valset and joins the frontier. Up to ``concurrency`` proposals are in
flight at once; blocking work (subprocesses, model calls, git) runs in threads.

Durability: every evaluation and every accepted candidate is committed to the
store before the loop moves on; a resumed run rebuilds its state from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from codeevolver.engine.batching import EpochSampler
from codeevolver.engine.pareto import ParetoParentSelector, frontier_size, mean_score
from codeevolver.engine.selection import ComponentSelector
from codeevolver.errors import CodeEvolverError, GitError, ModelError, StoreError, UserProgramError
from codeevolver.evaluator import Evaluator
from codeevolver.proposers.code import CodeProposer
from codeevolver.proposers.prompt import PromptProposer
from codeevolver.proposers.reflective import build_records
from codeevolver.store import Store
from codeevolver.store.rows import CandidateRow
from codeevolver.types import CODE_COMPONENT, Candidate, ExampleResult
from codeevolver.workspace.git import GitWorkspace

T = TypeVar("T")
HEARTBEAT_S = 15.0
"""How often a running engine touches its run row (``status`` flags runs silent for long)."""
MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class Budget:
    max_metric_calls: int | None = None
    max_usd: Decimal | None = None
    max_seconds: float | None = None


@dataclass
class EngineSettings:
    concurrency: int = 1
    minibatch_size: int = 3
    seed: int = 0
    skip_perfect_score: bool = True
    perfect_score: float = 1.0


@dataclass
class Parts:
    """Everything the engine drives; built by the CLI or the service."""

    store: Store
    evaluator: Evaluator
    workspace: GitWorkspace
    prompt_proposer: PromptProposer | None
    code_proposer: CodeProposer | None
    selector: ComponentSelector
    framework: str
    component_files: dict[str, str]


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn`` in a daemon thread, so an interrupted run can exit at once."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: the run was interrupted
            loop.call_soon_threadsafe(_settle, future, *outcome)

    threading.Thread(target=target, daemon=True).start()
    return await future


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def code_history(rows: list[CandidateRow]) -> list[str]:
    """The run's code changes for the reflection agent: how each ended, its valset score and its parent's."""
    val = {row.id: row.val_score for row in rows}

    def score(value: float | None) -> str:
        return "unscored" if value is None else f"{value:.3f}"

    lines = []
    for row in rows:
        if row.change_type != "code":
            continue
        parent = row.parents[0] if row.parents else None
        outcome = f"val {score(row.val_score)}" if row.status == "accepted" else (row.reason or "no reason given")
        against = f"parent {parent} val {score(val.get(parent))}" if parent else "no parent"
        lines.append(f"{row.id} {row.status} ({outcome}; {against}): {row.description[:200]}")
    return lines


class Engine:
    def __init__(
        self,
        run_id: str,
        parts: Parts,
        trainset: list[dict[str, Any]],
        valset: list[dict[str, Any]],
        settings: EngineSettings,
        budget: Budget,
        stop_file: Path | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.p = parts
        self.store = parts.store
        self.trainset = trainset
        self.valset = valset
        self.settings = settings
        self.budget = budget
        self.stop_file = stop_file
        self.on_progress = on_progress
        self.sampler = EpochSampler(len(trainset), settings.minibatch_size, settings.seed)
        self.parent_selector = ParetoParentSelector()
        self.candidates: dict[str, Candidate] = {}
        # Where a candidate's program runs: a prompt child runs in its parent's export (the prompts
        # reach the program as arguments), so only code changes ever export a new tree.
        self._run_commit: dict[str, str] = {}
        self.val: dict[str, dict[int, float]] = {}
        self.iteration = 0
        self.in_flight: dict[asyncio.Task[None], int] = {}
        self.reserved: dict[int, int] = {}
        """iteration -> metric calls its proposal may still spend (counted against the budget)."""
        self.metric_calls = 0
        self.stop_reason: str | None = None
        self.done_reason: str | None = None
        """Why no proposal may be launched now: a budget that cannot cover one more, or a code-only run
        past its code cutoff. Recomputed by every ``_may_launch``; a run that ends by itself reports it."""
        self.failures = 0
        self._next_id = 0
        self._started = time.monotonic()
        self._last_beat = self._started

    # ----- the loop -------------------------------------------------------

    async def run(self, seed: Candidate | None = None) -> str:
        """Run until a budget or a stop ends it; return the final run status."""
        self._restore()
        self._clear_stale_stop_file()
        if not self.candidates:
            assert seed is not None, "a new run needs a seed candidate"
            await self._add_seed(seed)
        while True:
            while len(self.in_flight) < self.settings.concurrency and self._may_launch():
                self._launch()
            if not self.in_flight:
                break
            done, _ = await asyncio.wait(self.in_flight, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                self._finish(task)
            self._report()
            self._heartbeat()
        return self._close()

    def _clear_stale_stop_file(self) -> None:
        """A stop file left from an earlier stop would end this start or resume at once: remove it."""
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_file.unlink(missing_ok=True)
            self._event("stop_file_removed", {"path": str(self.stop_file)})

    def _heartbeat(self) -> None:
        """Touch the run now and then, so ``status`` can tell a live run from a killed one."""
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self.store.update_run(self.run_id)

    def request_stop(self, reason: str) -> None:
        """Stop launching; cancel proposals in flight (nothing accepted is lost)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        for task in self.in_flight:
            task.cancel()

    def _launch(self) -> None:
        self.iteration += 1
        self.reserved[self.iteration] = self._cost_of_proposal()
        self.store.update_run(self.run_id, iteration=self.iteration)
        task = asyncio.ensure_future(self._propose(self.iteration))
        self.in_flight[task] = self.iteration

    def _finish(self, task: asyncio.Task[None]) -> None:
        self.reserved.pop(self.in_flight.pop(task), None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.failures = 0
            return
        if isinstance(exc, (ModelError, StoreError, GitError)):
            self.request_stop(f"failed: {exc}")
            self._failure: CodeEvolverError | None = exc
            return
        self.failures += 1
        self._event("proposal_failed", {"error": f"{type(exc).__name__}: {exc}"})
        if self.failures >= MAX_CONSECUTIVE_FAILURES:
            self.request_stop(f"failed: {self.failures} proposals in a row failed; last: {exc}")

    def _cost_of_proposal(self) -> int:
        return 2 * self.sampler.batch_size + len(self.valset)

    def _may_launch(self) -> bool:
        if self.stop_reason is not None:
            return False
        if self.stop_file is not None and self.stop_file.exists():
            self.stop_reason = f"stop file {self.stop_file}"
            return False
        self.done_reason = self.p.selector.exhausted(self.iteration + 1)
        if self.done_reason is not None:
            return False
        run = self.store.get_run(self.run_id)
        if run.status == "cancelling":
            self.stop_reason = "cancelled"
            return False
        b = self.budget
        cost = self._cost_of_proposal()
        if b.max_metric_calls is not None and (
            self.metric_calls + sum(self.reserved.values()) + cost > b.max_metric_calls
        ):
            left = b.max_metric_calls - self.metric_calls
            self.done_reason = (
                f"metric-call budget: {left} of {b.max_metric_calls} calls left, and a proposal may need {cost} "
                f"(2 x minibatch {self.sampler.batch_size} + valset {len(self.valset)})"
            )
            return False
        if b.max_usd is not None:
            spent = self.store.usage_totals(self.run_id).cost_usd
            if spent >= b.max_usd:
                self.done_reason = f"USD budget: ${spent:.4f} of ${b.max_usd} spent"
                return False
        if b.max_seconds is not None and time.monotonic() - self._started >= b.max_seconds:
            self.done_reason = f"time budget: {b.max_seconds / 60:g} minutes used"
            return False
        return True

    # ----- one proposal ---------------------------------------------------

    async def _propose(self, iteration: int) -> None:
        rng = random.Random(f"{self.settings.seed}:parent:{iteration}")
        parent = self.candidates[self.parent_selector.select(self.val, rng)]
        batch = self.sampler.batch_at(iteration - 1)
        child_id = self._new_id()
        self._event("proposal_started", {"iteration": iteration, "parent": parent.id, "candidate": child_id})
        before = await self._evaluate(parent, batch, "train", f"{child_id}-parent", traces=True, iteration=iteration)
        if self.settings.skip_perfect_score and all(r.score >= self.settings.perfect_score for r in before):
            self._event("proposal_skipped", {"candidate": child_id, "reason": "parent perfect on minibatch"})
            return
        # As in gepa, the component is chosen only once the minibatch shows there is something to fix.
        component = self.p.selector.choose(parent.id, list(parent.components), iteration)
        self._event(
            "mutation_started",
            {"iteration": iteration, "parent": parent.id, "component": component, "candidate": child_id},
        )
        examples = [self.trainset[i] for i in batch]
        if component == CODE_COMPONENT:
            child = await self._code_child(parent, child_id, examples, before, iteration)
        else:
            child = await self._prompt_child(parent, child_id, component, examples, before, iteration)
        if child is None:
            return
        try:
            after = await self._evaluate(child, batch, "train", f"{child_id}-child", iteration=iteration)
        except UserProgramError as exc:
            await self._reject(child, f"the changed program cannot run: {exc.message}", status="failed")
            return
        old, new = sum(r.score for r in before), sum(r.score for r in after)
        if new <= old:
            errors = [r.error for r in after if r.error]
            if errors and len(errors) == len(after):  # say why, not just that it scored 0
                reason = f"the changed program failed on every minibatch example: {errors[0][:300]}"
                await self._reject(child, reason, status="failed")
            else:
                await self._reject(child, f"minibatch score {new:g} is not above the parent's {old:g}")
            return
        await self._accept(child, old, new)

    async def _prompt_child(
        self,
        parent: Candidate,
        child_id: str,
        component: str,
        examples: list[dict[str, Any]],
        results: list[ExampleResult],
        iteration: int,
    ) -> Candidate | None:
        assert self.p.prompt_proposer is not None
        records = build_records(examples, results, component)
        current = parent.components[component]
        text = await in_thread(self.p.prompt_proposer.propose, component, current, records, child_id)
        child = Candidate(
            id=child_id,
            components={**parent.components, component: text},
            commit=parent.commit,
            parents=[parent.id],
            change_type="prompt",
            iteration=iteration,
            description=f"rewrote prompt {component!r}",
        )
        if not text.strip() or text.strip() == current.strip():
            await self._reject(child, "the reflection model proposed no change to the prompt")
            return None
        # Evaluated in the parent's export; its own commit is written only if it is accepted.
        self._run_commit[child_id] = self._run_commit.get(parent.id, parent.commit)
        return child

    async def _commit_prompt_child(self, child: Candidate) -> None:
        """Write the accepted prompt child's component files as a commit on top of its parent."""
        changed = {
            path: child.components[name]
            for name, path in self.p.component_files.items()
            if child.components.get(name) != self.candidates[child.parents[0]].components.get(name)
        }
        if changed:
            child.commit = await in_thread(
                self.p.workspace.commit_files, child.commit, changed, f"codeevolver {child.id}: {', '.join(changed)}"
            )

    async def _code_child(
        self,
        parent: Candidate,
        child_id: str,
        examples: list[dict[str, Any]],
        results: list[ExampleResult],
        iteration: int,
    ) -> Candidate | None:
        assert self.p.code_proposer is not None
        records = build_records(examples, results, None)
        worktree = self.p.workspace.work_root / f"agent-{child_id}"
        try:
            change = await in_thread(
                self.p.code_proposer.propose,
                parent.commit,
                parent.components,
                records,
                self._code_history(),
                child_id,
                worktree,
            )
        finally:
            self.p.workspace.remove(worktree)
        child = Candidate(
            id=child_id,
            components=dict(parent.components),
            commit=change.commit or parent.commit,
            parents=[parent.id],
            change_type="code",
            iteration=iteration,
            description=change.change_request[:2000],
        )
        if change.transcript:
            self.store.add_transcript(self.run_id, child_id, "agent", change.transcript)
        if change.commit is None:
            await self._reject(child, change.reason or "the code change failed", status="failed")
            return None
        self.p.workspace.set_ref(f"refs/codeevolver/{self.run_id}/{child_id}", change.commit)
        try:
            child.components = await in_thread(self._components_at, change.commit, parent.components)
        except UserProgramError as exc:
            await self._reject(child, f"the changed program cannot load: {exc.message}", status="failed")
            return None
        return child

    def _components_at(self, commit: str, inherited: dict[str, str]) -> dict[str, str]:
        """Components after a code change: files re-read, DSPy predictors re-discovered."""
        components = dict(inherited)
        for name, path in self.p.component_files.items():
            text = self.p.workspace.read_file(commit, path)
            if text is not None:
                components[name] = text
        # Loading the program and metric catches a broken import before any example is spent on it.
        found = self.p.evaluator.describe(self.p.workspace.evaluation_dir(commit))
        if self.p.framework == "dspy":
            components = {name: inherited.get(name, text) for name, text in found.items()}
        return components

    def _commit_in_use(self, commit: str) -> bool:
        return any(self._run_commit.get(c.id, c.commit) == commit for c in self.candidates.values())

    def _code_history(self) -> list[str]:
        return code_history(self.store.list_candidates(self.run_id))

    async def _accept(self, child: Candidate, old: float, new: float) -> None:
        indices = list(range(len(self.valset)))
        results = await self._evaluate(child, indices, "val", f"{child.id}-val", iteration=child.iteration)
        scores = {i: r.score for i, r in zip(indices, results, strict=True)}
        if child.change_type == "prompt":
            await self._commit_prompt_child(child)
        child.branch = f"codeevolver/{self.run_id}/{child.id}"
        await in_thread(self.p.workspace.set_ref, f"refs/heads/{child.branch}", child.commit)
        self.store.add_candidate(self.run_id, child, "accepted", val_score=mean_score(scores))
        self.candidates[child.id] = child
        self.val[child.id] = scores
        self.p.selector.inherit(child.id, child.parents[0])
        self._update_best()
        self._event(
            "candidate_accepted",
            {"candidate": child.id, "minibatch": [old, new], "val_score": mean_score(scores)},
        )

    async def _reject(self, child: Candidate, reason: str, status: str = "rejected") -> None:
        self.store.add_candidate(self.run_id, child, status, reason=reason)
        self._run_commit.pop(child.id, None)
        if child.change_type == "code" and not self._commit_in_use(child.commit):
            await in_thread(self.p.workspace.drop_export, child.commit)
        self._event("candidate_rejected", {"candidate": child.id, "reason": reason})

    async def _evaluate(
        self,
        cand: Candidate,
        indices: list[int],
        split: str,
        batch_id: str,
        traces: bool = False,
        iteration: int | None = None,
    ) -> list[ExampleResult]:
        rows = self.trainset if split == "train" else self.valset
        workdir = await in_thread(self.p.workspace.evaluation_dir, self._run_commit.get(cand.id, cand.commit))
        examples = [(i, rows[i]) for i in indices]
        results = await in_thread(self.p.evaluator.evaluate, workdir, cand.components, examples, traces)
        self.metric_calls = self.store.add_evaluations(self.run_id, cand.id, split, results, batch_id)
        if iteration in self.reserved:  # these calls are now counted in metric_calls
            self.reserved[iteration] = max(0, self.reserved[iteration] - len(indices))
        return results

    # ----- state ----------------------------------------------------------

    async def _add_seed(self, seed: Candidate) -> None:
        indices = list(range(len(self.valset)))
        results = await self._evaluate(seed, indices, "val", "seed-val")
        scores = {i: r.score for i, r in zip(indices, results, strict=True)}
        seed.branch = None
        self.store.add_candidate(self.run_id, seed, "seed", val_score=mean_score(scores))
        self._next_id = max(self._next_id, 1)
        self.candidates[seed.id] = seed
        self.val[seed.id] = scores
        self.store.update_run(self.run_id, seed_score=mean_score(scores))
        self._update_best()
        self._event("seed_evaluated", {"candidate": seed.id, "val_score": mean_score(scores)})

    def _restore(self) -> None:
        """Rebuild candidates, frontier, counters and budgets from the store (resume)."""
        run = self.store.get_run(self.run_id)
        self.iteration = run.iteration
        self.metric_calls = run.metric_calls
        rows = self.store.list_candidates(self.run_id)
        # Ids of proposals that were skipped or cut short by a kill have no row: never reuse them.
        used = [row.id for row in rows] + [
            str(event.data.get("candidate", ""))
            for event in self.store.events(self.run_id)
            if event.kind == "proposal_started"
        ]
        numbers = [int(cid[1:]) for cid in used if cid[:1] == "c" and cid[1:].isdigit()]
        self._next_id = max(numbers, default=-1) + 1
        scores = self.store.val_scores(self.run_id)
        for row in rows:
            if row.status in ("seed", "accepted") and row.id in scores:
                self.candidates[row.id] = row.to_candidate()
                self.val[row.id] = scores[row.id]

    def _new_id(self) -> str:
        number = self._next_id
        self._next_id += 1
        return f"c{number:03d}"

    def best(self) -> Candidate:
        best_id = max(self.val, key=lambda cid: (mean_score(self.val[cid]), -int(cid[1:])))
        return self.candidates[best_id]

    def _update_best(self) -> None:
        best = self.best()
        self.store.update_run(self.run_id, best_candidate_id=best.id, best_score=mean_score(self.val[best.id]))

    def _close(self) -> str:
        failure = getattr(self, "_failure", None)
        if failure is not None:
            status = "failed"
        elif self.stop_reason is not None:
            status = "cancelled" if self.stop_reason == "cancelled" else "stopped"
        else:
            status = "finished"
        reason = self.stop_reason or self.done_reason
        self.store.update_run(self.run_id, status=status, error=str(failure) if failure else reason)
        self._event("run_finished", {"status": status, "reason": reason})
        self._report()
        if failure is not None:
            raise failure
        return status

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        self.store.add_event(self.run_id, kind, data)
        self._report(kind, data)

    def _report(self, kind: str = "tick", data: dict[str, Any] | None = None) -> None:
        if self.on_progress is None or not self.val:
            return
        best = self.best()
        usage = self.store.usage_totals(self.run_id)
        self.on_progress(
            {
                "kind": kind,
                "data": data or {},
                "iteration": self.iteration,
                "metric_calls": self.metric_calls,
                "max_metric_calls": self.budget.max_metric_calls,
                "best_candidate": best.id,
                "best_score": mean_score(self.val[best.id]),
                "frontier": frontier_size(self.val),
                "in_flight": len(self.in_flight),
                "concurrency": self.settings.concurrency,
                "candidates": len(self.candidates),
                "tokens": usage.input_tokens + usage.output_tokens,
                "usd": usage.cost_usd,
            }
        )
