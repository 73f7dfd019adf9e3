"""The per-example Pareto frontier and frontier-weighted parent selection.

For every validation example, the frontier holds the candidates that reach the
best score seen on it. A candidate that is only ever on the frontier together
with stronger candidates is dominated and never chosen; the others are chosen
with probability proportional to the number of examples they lead on, so a
candidate that is best on a single example stays alive.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

Scores = Mapping[str, Mapping[int, float]]
"""candidate id -> validation example index -> score"""


def frontier(scores: Scores) -> dict[int, set[str]]:
    """Example index -> ids of the candidates with the best score on it."""
    best: dict[int, float] = {}
    for per_example in scores.values():
        for index, score in per_example.items():
            best[index] = max(score, best.get(index, float("-inf")))
    return {
        index: {cid for cid, per_example in scores.items() if per_example.get(index) == top}
        for index, top in best.items()
    }


def mean_score(per_example: Mapping[int, float]) -> float:
    return sum(per_example.values()) / len(per_example) if per_example else 0.0


def non_dominated(scores: Scores) -> set[str]:
    """Drop candidates whose every frontier slot is shared with a surviving candidate.

    Weakest first (by mean score, then id), so of two equal candidates the
    later, stronger one survives.
    """
    fronts = list(frontier(scores).values())
    survivors = {cid for front in fronts for cid in front}
    for cid in sorted(survivors, key=lambda c: (mean_score(scores[c]), c)):
        others = survivors - {cid}
        if all(front & others for front in fronts if cid in front):
            survivors.discard(cid)
    return survivors


def frontier_size(scores: Scores) -> int:
    return len(non_dominated(scores))


class ParetoParentSelector:
    """Sample a parent with probability ∝ number of examples it leads on."""

    def select(self, scores: Scores, rng: random.Random) -> str:
        alive = non_dominated(scores)
        weights: dict[str, int] = dict.fromkeys(alive, 0)
        for front in frontier(scores).values():
            for cid in front & alive:
                weights[cid] += 1
        pool = sorted(weights)
        return rng.choices(pool, weights=[weights[c] for c in pool], k=1)[0]


class BestParentSelector:
    """Always the candidate with the best mean validation score (a greedy baseline)."""

    def select(self, scores: Scores, rng: random.Random) -> str:
        return max(sorted(scores), key=lambda c: mean_score(scores[c]))


PARENT_SELECTORS = {"pareto": ParetoParentSelector, "best": BestParentSelector}
