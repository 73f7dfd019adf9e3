"""The engine's small strategies: Pareto frontier, parent selection, minibatches, component schedule."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from codeevolver.engine.batching import EpochSampler
from codeevolver.engine.pareto import ParetoParentSelector, frontier, non_dominated
from codeevolver.engine.selection import ComponentSelector
from codeevolver.store import Store
from codeevolver.types import CODE_COMPONENT


def test_frontier_keeps_a_candidate_best_on_one_example_only() -> None:
    scores = {
        "c0": {0: 0.5, 1: 0.5, 2: 0.5},
        "c1": {0: 0.9, 1: 0.9, 2: 0.1},  # best mean
        "c2": {0: 0.1, 1: 0.2, 2: 0.6},  # worst mean, but the only one that leads on example 2
    }
    assert frontier(scores) == {0: {"c1"}, 1: {"c1"}, 2: {"c2"}}
    assert non_dominated(scores) == {"c1", "c2"}
    picks = Counter(ParetoParentSelector().select(scores, random.Random(i)) for i in range(600))
    assert set(picks) == {"c1", "c2"}
    # weighted by the number of examples led: c1 leads on 2, c2 on 1
    assert 1.5 < picks["c1"] / picks["c2"] < 2.7


def test_tied_candidates_do_not_both_survive() -> None:
    scores = {"c0": {0: 1.0, 1: 0.0}, "c1": {0: 1.0, 1: 0.0}, "c2": {0: 0.0, 1: 1.0}}
    alive = non_dominated(scores)
    assert "c2" in alive and len(alive & {"c0", "c1"}) == 1


def test_dominated_candidate_is_never_selected() -> None:
    scores = {"c0": {0: 0.2, 1: 0.2}, "c1": {0: 0.8, 1: 0.8}}
    assert {ParetoParentSelector().select(scores, random.Random(i)) for i in range(50)} == {"c1"}


def test_epoch_sampler_visits_every_example_once_per_epoch() -> None:
    sampler = EpochSampler(10, 3, seed=1)
    first_epoch = [i for _ in range(3) for i in sampler.next()] + sampler.batch_at(3)[:1]
    assert sorted(first_epoch) == list(range(10))
    # a fresh sampler with the same seed replays the same sequence (resume)
    again = EpochSampler(10, 3, seed=1)
    assert [again.batch_at(n) for n in range(6)] == [sampler.batch_at(n) for n in range(6)]


def test_epoch_sampler_shuffles_differently_per_epoch_and_seed() -> None:
    a = EpochSampler(30, 30, seed=1)
    assert a.batch_at(0) != a.batch_at(1)
    assert EpochSampler(30, 30, seed=2).batch_at(0) != a.batch_at(0)


def test_round_robin_over_prompts_with_code_every_other() -> None:
    selector = ComponentSelector("both", prompts_per_code=1)
    picks = [selector.choose("c0", ["a", "b"], it) for it in range(1, 7)]
    assert picks == ["a", CODE_COMPONENT, "b", CODE_COMPONENT, "a", CODE_COMPONENT]


def test_prompts_per_code_decays_and_cuts_off() -> None:
    selector = ComponentSelector("both", prompts_per_code=1, decay_every=4, code_cutoff=10)
    picks = [selector.choose("c0", ["p"], it) for it in range(1, 16)]
    codes = [it for it, pick in enumerate(picks, start=1) if pick == CODE_COMPONENT]
    assert codes == [2, 5, 9]  # 1 prompt per code, then 2 from iteration 4, then 3 from 8; none from 10
    assert all(pick == "p" for pick in picks[9:])


def test_mutate_modes() -> None:
    assert ComponentSelector("code").choose("c0", ["p"], 1) == CODE_COMPONENT
    prompts_only = ComponentSelector("prompts")
    assert {prompts_only.choose("c0", ["p", "q"], it) for it in range(1, 9)} == {"p", "q"}
    # a program without prompt components can only be mutated as code
    assert ComponentSelector("both").choose("c0", [], 1) == CODE_COMPONENT
    with pytest.raises(ValueError):
        ComponentSelector("prompts").choose("c0", [], 1)


def test_child_continues_parents_round_robin() -> None:
    selector = ComponentSelector("prompts")
    assert selector.choose("c0", ["a", "b", "c"], 1) == "a"
    selector.inherit("c1", "c0")
    assert selector.choose("c1", ["a", "b", "c"], 2) == "b"


def test_code_only_run_is_exhausted_past_the_cutoff() -> None:
    selector = ComponentSelector("code", code_cutoff=3)
    assert [selector.exhausted(it) for it in (1, 2)] == [None, None]
    assert [selector.choose("c0", ["p"], it) for it in (1, 2)] == [CODE_COMPONENT, CODE_COMPONENT]
    reason = selector.exhausted(3)
    assert reason is not None and "code_cutoff_iteration 3" in reason and "mutate = code" in reason
    with pytest.raises(ValueError, match="code_cutoff_iteration 3"):
        selector.choose("c0", ["p"], 3)  # never a prompt mutation the user did not ask for
    # runs that may mutate prompts go on with prompts past the cutoff
    assert ComponentSelector("both", code_cutoff=3).exhausted(5) is None
    assert ComponentSelector("both", code_cutoff=3).choose("c0", ["p"], 5) == "p"
    assert ComponentSelector("code").exhausted(10_000) is None


def test_code_history_gives_each_code_change_its_score_and_its_parents(store: Store, run_id: str) -> None:
    from codeevolver.engine.engine import code_history
    from codeevolver.proposers.reflection_agent import task_prompt
    from codeevolver.types import Candidate

    def cand(cid: str, parent: str | None, change: str, description: str) -> Candidate:
        return Candidate(cid, {"p": "x"}, "abc", parents=[parent] if parent else [], change_type=change,
                         description=description)  # fmt: skip

    store.add_candidate(run_id, cand("c000", None, "seed", ""), "seed", val_score=0.5)
    store.add_candidate(run_id, cand("c001", "c000", "code", "lowercase the labels"), "accepted", val_score=0.75)
    store.add_candidate(run_id, cand("c002", "c001", "prompt", "rewrote prompt 'p'"), "accepted", val_score=0.8)
    store.add_candidate(
        run_id, cand("c003", "c001", "code", "add a retry"), "rejected",
        reason="minibatch score 1 is not above the parent's 2",
    )  # fmt: skip
    history = code_history(store.list_candidates(run_id))
    assert history == [
        "c001 accepted (val 0.750; parent c000 val 0.500): lowercase the labels",
        "c003 rejected (minibatch score 1 is not above the parent's 2; parent c001 val 0.750): add a retry",
    ]
    prompt = task_prompt(files=["a.py"], components={"p": "x"}, records=[], history=history,
                         additional_instructions="", entry="a:b", metric="m:s", mode="fix")  # fmt: skip
    assert "- c001 accepted (val 0.750; parent c000 val 0.500)" in prompt
