"""BiLoRA's data in the Trainer's own dataloader: which split every micro-batch of a run comes from.

A method whose steps do not all read a training batch (``Method.data_used``; BiLoRA's first-order
upper steps) gets a loader over D1 + D2 whose order is a pure function of the optimizer step:
every D1 example reaches the lower level once per pass and no D1 batch is drawn and thrown away.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["D1", "D2", "SIDE", "LevelSampler", "Levels"]

D1, D2, SIDE = 0, 1, 2  # the streams of Levels: the loader's D1 and D2, darts' extra D1


class Levels:
    """Where every micro-batch of a run comes from when some steps read no training batch.

    Stream ``k`` is an endless sequence of passes over its split (D1, D2, D1), each pass a permutation
    seeded by ``(seed, k, pass)``; it is cut into global micro-batches of ``size`` examples (all
    processes together). Optimizer step ``s`` takes ``accum`` consecutive micro-batches of D2 if it
    reads D2, of D1 otherwise; a step reading both also takes ``accum`` of the side stream.
    Everything is a pure function of the step, so a resumed run continues the same sequence.
    """

    def __init__(
        self, used: Callable[[int], tuple[bool, bool]], n1: int, n2: int, size: int, accum: int, seed: int
    ) -> None:
        self.used, self.sizes, self.size, self.accum, self.seed = used, (n1, n2, n1), size, accum, seed
        self._orders: dict[tuple[int, int], list[int]] = {}
        self._counts: dict[Any, tuple[int, int]] = {}
        lower = math.ceil(n1 / (size * accum))  # steps that read D1 once
        steps = 0
        while steps - self.count(self.upper, steps) < lower:
            steps += 1
        self.steps_per_epoch = steps

    def upper(self, step: int) -> bool:
        """Whether step ``step`` takes the loader's batches from D2."""
        return self.used(step)[1]

    def reads_both(self, step: int) -> bool:
        """Whether step ``step`` also reads D1 batches besides the loader's D2 ones (darts)."""
        return all(self.used(step))

    def count(self, kind: Callable[[int], bool], step: int) -> int:
        """The number of steps before ``step`` of ``kind`` (memoised for increasing ``step``)."""
        start, total = self._counts.get(kind, (0, 0))
        if step < start:
            start, total = 0, 0
        total += sum(kind(s) for s in range(start, step))
        self._counts[kind] = (step, total)
        return total

    def batch(self, stream: int, index: int) -> list[int]:
        """Global micro-batch ``index`` of ``stream``: indices into its split."""
        n = self.sizes[stream]
        return [self._order(stream, p // n)[p % n] for p in range(index * self.size, (index + 1) * self.size)]

    def _order(self, stream: int, epoch: int) -> list[int]:
        key = (stream, epoch)
        if key not in self._orders:
            if len(self._orders) >= 6:  # a run only ever reads the last pass or two of each stream
                self._orders.pop(min(self._orders, key=lambda k: k[1]))
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + 3 * epoch + stream) % 2**63)
            self._orders[key] = torch.randperm(self.sizes[stream], generator=g).tolist()
        return self._orders[key]

    def epoch(self, epoch: int) -> list[int]:
        """The loader's indices into D1 + D2 (D2 after D1) for Trainer epoch ``epoch``."""
        start = epoch * self.steps_per_epoch
        uppers = self.count(self.upper, start)
        taken = [self.accum * (start - uppers), self.accum * uppers]
        out: list[int] = []
        for step in range(start, start + self.steps_per_epoch):
            stream = D2 if self.upper(step) else D1
            offset = self.sizes[D1] if stream == D2 else 0
            for _ in range(self.accum):
                out.extend(i + offset for i in self.batch(stream, taken[stream]))
                taken[stream] += 1
        return out


class LevelSampler(torch.utils.data.Sampler):
    """The Trainer's sampler over D1 + D2: the indices of :meth:`Levels.epoch` for the epoch
    ``epoch_fn()`` gives when an epoch starts."""

    def __init__(self, levels: Levels, epoch_fn: Callable[[], int]) -> None:
        self.levels, self.epoch_fn = levels, epoch_fn

    def __len__(self) -> int:
        return self.levels.steps_per_epoch * self.levels.accum * self.levels.size

    def __iter__(self):
        return iter(self.levels.epoch(self.epoch_fn()))
