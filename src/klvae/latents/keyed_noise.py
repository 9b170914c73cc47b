"""Noise keyed by what it is drawn for (a seed and an image, a flip, an epoch), not by the order of the draws: the
same draw wherever, whenever and in whatever batch it is made."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by a hash of `key` (e.g. seed, epoch, item): the same draw wherever it is made."""
    # surrogateescape: a file name that is not valid UTF-8 hashes as its own bytes (valid ones as before).
    digest = hashlib.blake2b("/".join(map(str, key)).encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def image_generators(seed: int, names: Iterable[str]) -> list[torch.Generator]:
    """One generator per image, keyed by the seed and the image's name: its posterior sample is the same whatever
    the batch size or the other images of the run."""
    return [keyed_generator(seed, name) for name in names]
