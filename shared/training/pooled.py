"""Centralised ("pooled") training over several sites' data, as if it could be pooled.

Used for the baselines that federated learning is judged against, and to measure how hard
the generated data is. Sites keep their own loaders (their exams may have 1 or 2
channels), and one epoch visits every site's batches in a seeded random interleaving.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch


class _Loader(Protocol):
    """A loader as InterleavedLoader uses it: its batches, and how many it has (a DataLoader)."""

    def __iter__(self) -> Iterator[Mapping[str, torch.Tensor]]: ...

    def __len__(self) -> int: ...


class InterleavedLoader:
    """Iterate the batches of several loaders in a random order that changes every epoch."""

    def __init__(self, loaders: Sequence[_Loader], seed: int = 0):
        self.loaders = list(loaders)
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[Mapping[str, torch.Tensor]]:
        iters = [iter(loader) for loader in self.loaders]
        order = [i for i, loader in enumerate(self.loaders) for _ in range(len(loader))]
        self.rng.shuffle(order)
        for i in order:
            try:
                yield next(iters[i])
            except StopIteration:
                continue

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)
