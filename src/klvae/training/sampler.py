"""The data position: global batches from a per-epoch permutation, split across ranks, resumable anywhere."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from klvae.errors import KlvaeError

T = TypeVar("T")


def fewer_per_process(n: int, world: int, field: str) -> str:
    """How to make `n` (> 0) items fill one global batch of `world` processes: a smaller `field`, or fewer
    processes. The items left over from whole global batches are dropped from each epoch (others each time)."""
    if n >= world:
        return f"set {field} to {n // world} or less"
    return f"set {field} to 1 and run at most {n} process(es)"


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's slice of each global batch as (index, epoch) pairs, without end.

    Global batch k of an epoch is positions [k*G, (k+1)*G) of that epoch's permutation, and rank r takes
    the block [r*L, (r+1)*L) of it. So a run's data depend only on (seed, global batch size), not on the
    world size: a resume may change the number of processes, and 2 ranks see what 1 rank with the
    doubled batch sees.
    """

    def __init__(self, n: int, local_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start_batch: int = 0, shuffle: bool = True) -> None:
        self.n, self.local, self.rank, self.world = n, local_batch, rank, world
        self.seed, self.start, self.shuffle = seed, start_batch, shuffle
        self.global_batch = local_batch * world
        self.per_epoch = n // self.global_batch
        if self.per_epoch == 0:
            fix = fewer_per_process(n, world, "the batch size per process") if n else "add images"
            raise KlvaeError(f"the dataset has {n} images, fewer than one global batch of {self.global_batch} "
                             f"({local_batch} per process x {world} process(es)): {fix}")

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of dataset indices used in `epoch`."""
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b, order_epoch = self.start, -1
        order = torch.empty(0, dtype=torch.long)  # replaced before first use: order_epoch -1 is no epoch
        while True:
            epoch, k = divmod(b, self.per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            lo = k * self.global_batch + self.rank * self.local
            yield [(int(i), epoch) for i in order[lo : lo + self.local]]
            b += 1

    def __len__(self) -> int:
        return self.per_epoch


class SeededItems(Dataset):
    """Wraps a map-style dataset so each item's random augmentation is a function of (seed, epoch, index).

    Worker processes draw their seeds when the DataLoader iterator starts, which differs between a run and
    its resume; seeding per item makes the crops and flips of a resumed run the same as uninterrupted.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        return seeded((self.seed * 1_000_003 + epoch * 7_919 + index) % 2**31, lambda: self.dataset[index])


def seeded(seed: int, fn: Callable[[], T]) -> T:
    """fn() with torch's, Python's and NumPy's global generators seeded by `seed`; their states are put back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            return fn()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
