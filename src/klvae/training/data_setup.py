"""Data for the trainer: the training loader at a resumable position, and fixed validation batches."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from klvae.datasources import resolve_spec
from klvae.distributed import DistInfo, quiet_on_sigterm, usable_workers
from klvae.errors import KlvaeError
from klvae.training.config import TrainConfig
from klvae.training.data import (
    TransformConfig,
    WebDatasetShards,
    build_dataset,
    build_transform,
    collate_skip_none,
    mark_upscale_warned,
)
from klvae.training.sampler import GlobalBatchSampler, SeededItems, fewer_per_process

log = logging.getLogger(__name__)


def _transform(cfg: TrainConfig, train: bool) -> Any:
    d = cfg.data
    return build_transform(TransformConfig(
        resolution=d.resolution,
        crop=d.crop if train else "center",
        flip=d.flip if train else 0.0,
        scale=(d.scale_min, d.scale_max) if train else (1.0, 1.0),
    ))


def build_train_loader(cfg: TrainConfig, dist: DistInfo, start_batch: int = 0,
                       start_at: Callable[[int], int] | None = None) -> Iterator[dict[str, Any]]:
    """Endless batches of this rank's share, starting after `start_batch` global batches (for random-access data,
    after `start_at(item count)` where given: a resume's position depends on the count).

    Each batch has "new_pass": True on the first batch of a pass over this rank's data (an epoch), so that the
    loop can tell when a whole pass held no readable image."""
    d = cfg.data
    workers = usable_workers(d.num_workers)
    ds = build_dataset(d.train, _transform(cfg, train=True), image_column=d.image_column,
                       rank=dist.rank, world_size=dist.world, cache=d.cache_images)
    if isinstance(ds, IterableDataset):
        # Streams (tar shards) have no random access: resume skips the consumed batches by reading them, and
        # each sample's augmentation is seeded by its place (see WebDatasetShards.seed), so the reading draws
        # nothing that the batches after it would miss.
        if isinstance(ds, WebDatasetShards):
            ds.seed = cfg.train.seed
        # A worker's last batch of a pass may be short: streams are read in the shards' order, so dropping it
        # would leave the same samples out of every pass.
        loader = DataLoader(ds, batch_size=d.batch_size, num_workers=workers, collate_fn=collate_skip_none,
                            worker_init_fn=quiet_on_sigterm)
        return itertools.islice(_endless(loader, f"{d.train} (rank {dist.rank} of {dist.world})"), start_batch, None)
    _check_one_global_batch(ds, d.batch_size, dist.world, d.train)
    if start_at is not None:
        start_batch = start_at(len(ds))
    sampler = GlobalBatchSampler(len(ds), d.batch_size, dist.rank, dist.world, cfg.train.seed, start_batch)
    loader = DataLoader(SeededItems(ds, cfg.train.seed), batch_sampler=sampler, num_workers=workers,
                        collate_fn=collate_skip_none, persistent_workers=workers > 0, worker_init_fn=quiet_on_sigterm)
    return _mark_epochs(iter(loader), start_batch, sampler.per_epoch)


def check_train_data(cfg: TrainConfig, world: int, val: bool = True) -> None:
    """Refuse, before any model is built, missing data (data.val too where `val`), or training data with fewer
    items than one global batch of `world` processes (shards are opened per rank and are not counted)."""
    d = cfg.data
    if d.val and val:
        with _naming("data.val"):  # a mistyped data.val would otherwise stop the run at its start, once all is built
            resolve_spec(d.val)
    with _naming("data.train"):
        ds = build_dataset(d.train, image_column=d.image_column, rank=0, world_size=world)
    if isinstance(ds, WebDatasetShards):
        _check_shard_batches(ds, d.batch_size, world, d.train)
    elif not isinstance(ds, IterableDataset):
        _check_one_global_batch(ds, d.batch_size, world, d.train)


def _check_shard_batches(ds: WebDatasetShards, batch: int, world: int, source: str) -> None:
    """Refuse tar shards that give some process fewer samples than one batch (counted from the tar headers, up to
    one batch each: no image is read), as other data with fewer items than one global batch is refused."""
    for r in range(world):
        n = ds.count_samples([(r, world)], batch)
        if n >= batch:
            continue
        who = f"rank {r} of {world} process(es) reads" if world > 1 else "holds"
        fix = f"{fewer_per_process(n, 1, 'data.batch_size')}, or add images" if n else "add images"
        raise KlvaeError(f"{source} {who} {n} image sample(s) in its tar shards, fewer than one batch of "
                         f"data.batch_size {batch}: {fix}")


@contextlib.contextmanager
def _naming(field: str) -> Iterator[None]:
    """Errors raised inside prefixed with the config field they come from."""
    try:
        yield
    except KlvaeError as e:
        raise type(e)(f"{field}: {e}") from None


def _check_one_global_batch(ds: Any, batch: int, world: int, source: str) -> None:
    """Refuse a dataset with fewer items than one global batch, saying how many of them are unreadable."""
    if len(ds) >= batch * world:
        return
    # Items are the files (or rows) found, readable or not: so few are cheap to read, and the count of the
    # unreadable ones (each also named in a warning) tells whether the data or the batch size is at fault.
    unreadable = sum(ds[i] is None for i in range(len(ds)))
    readable = len(ds) - unreadable
    fix = "add readable images"
    if readable:
        fix = f"{fewer_per_process(readable, world, 'data.batch_size')}, or add images"
    raise KlvaeError(f"{source} has {len(ds)} item(s) (files or rows found; {unreadable} of them unreadable), fewer "
                     f"than one global batch of {batch * world} (data.batch_size {batch} x {world} process(es)): {fix}")


def _endless(loader: DataLoader, name: str) -> Iterator[dict[str, Any]]:
    for epoch in itertools.count():
        if isinstance(loader.dataset, WebDatasetShards):
            loader.dataset.set_epoch(epoch)  # before the pass starts its workers, which copy the dataset
        first = True
        for batch in loader:
            yield {**batch, "new_pass": first}
            first = False
        if first:  # a pass with no batch at all would make `while True` spin without end, silently
            raise KlvaeError(f"no training samples in {name}: a whole pass over the data yielded nothing")
        # Each pass starts new workers, copied from this process: the first pass's workers have said what there
        # was to say about scaled-up images, and the copies of later passes would say it again, pass after pass.
        mark_upscale_warned()


def _mark_epochs(it: Iterator[dict[str, Any]], start_batch: int, per_epoch: int) -> Iterator[dict[str, Any]]:
    for b, batch in zip(itertools.count(start_batch), it):
        yield {**batch, "new_pass": b % per_epoch == 0}


def build_val_batches(cfg: TrainConfig) -> list[Tensor]:
    """The first `val_images` held-out images, centre-cropped, as a list of batches (held in memory)."""
    d = cfg.data
    # Rank 0 alone validates: it reads the whole held-out set, not its rank's share of the shards.
    ds = build_dataset(d.val, _transform(cfg, train=False), image_column=d.image_column, rank=0, world_size=1)
    items = []
    source = iter(ds) if isinstance(ds, IterableDataset) else (ds[i] for i in range(len(ds)))
    for item in source:
        if item is not None:
            items.append(item["pixels"] if isinstance(item, dict) else item)
        if len(items) >= d.val_images:
            break
    if not items:
        log.warning("no readable validation images in %s: the run is not validated", d.val)
    return [torch.stack(items[i : i + d.batch_size]) for i in range(0, len(items), d.batch_size)]
