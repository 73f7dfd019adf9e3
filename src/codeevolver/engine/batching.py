"""Epoch-shuffled minibatches over the training set.

Each epoch visits every training example once in a fresh order drawn from the
run's seed; a batch that would cross the end of an epoch is filled from the
start of the next. The sampler's whole state is the number of batches drawn,
so a resumed run continues the same sequence.
"""

from __future__ import annotations

import random


class EpochSampler:
    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        if n_examples < 1:
            raise ValueError("the training set is empty")
        self.n = n_examples
        self.batch_size = min(batch_size, n_examples)
        self.seed = seed
        self.drawn = 0
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batch_at(self, number: int) -> list[int]:
        """The ``number``-th batch (0-based) of the sequence."""
        start = number * self.batch_size
        out: list[int] = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.n)
            out.append(self._order(epoch)[offset])
        return out

    def next(self) -> list[int]:
        batch = self.batch_at(self.drawn)
        self.drawn += 1
        return batch
