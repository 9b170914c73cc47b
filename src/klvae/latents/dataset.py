"""`LatentDataset`: the reader a diffusion trainer uses on a `klvae cache` folder."""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from klvae.checks import is_integer
from klvae.errors import LatentsError, first_line
from klvae.latents.buckets import cover_size
from klvae.latents.cache import parse_index
from klvae.latents.keyed_noise import keyed_generator
from klvae.latents.verify import verify_cache
from klvae.model.latent_norm import LatentNorm
from klvae.posterior import DiagonalGaussian

log = logging.getLogger(__name__)


class LatentDataset(Dataset):
    """Scaled latents ((z - shift) * scale, as the diffusion model wants them) and each row's metadata.

    With moments stored, `mode="sample"` draws z from the posterior on every access (augmentation, as
    LDM training does) and `mode="mean"` returns its mean; a cache of one sample per image has no mean
    (`mode="mean"` returns the sample, with a warning), and scaled means are returned as stored. With a seed,
    an item's noise depends only on (seed, epoch, index): the same in any DataLoader worker and on every run;
    `set_epoch` changes it.

    An item is a dict: "latents" [C, h, w] (for FLUX.2, latent_patch_size 2: 4x latent_channels patched
    channels at half the VAE latent's size, as its pipelines take them); the index's own fields, plain JSON
    ("source": the image's id; "size": the original image's [height, width]; "crop": [top, left, height, width]
    of the centre crop in the resized, unflipped image; "bucket": the crop's [height, width] in pixels; "flip": a
    mirrored row);
    and SDXL's micro-conditioning as int64 tensors [2], which the default collate stacks to [B, 2] (it would
    turn the lists above into two [B] tensors): "original_size" (= size), "crops_coords_top_left" ((top,
    left); for a flipped row measured in the flipped image, as diffusers' SDXL training script flips before
    it crops), "target_size" (= bucket); and "add_time_ids" [6], their concatenation in diffusers' order.
    `dataset.norm.unscale(latents)` (or the VAE's `unscale_latents`) undoes the scaling before decoding.

    `verify=True` reads every shard whole at construction (as `klvae cache --verify`) and raises LatentsError if
    any is damaged; otherwise damage inside a shard's tensor data goes unseen.
    """

    def __init__(self, root: str | Path, mode: str = "sample", seed: int | None = None, verify: bool = False) -> None:
        self.root = Path(root).absolute()  # a later os.chdir must not lose the shards still to be opened
        path = self.root / "index.json"
        if not self.root.is_dir():
            raise LatentsError(f"no such folder: {self.root}")
        if not path.is_file():
            raise LatentsError(f"{self.root} has no index.json: run `klvae cache` to completion first")
        index = parse_index(path)
        options = index.get("options") if index is not None else None
        if index is None or not isinstance(options, dict) or "store" not in options:
            raise LatentsError(f"{path} is not a klvae latent cache index")
        if mode not in ("sample", "mean"):
            raise LatentsError(f"mode must be sample or mean, got {mode!r}")
        if seed is not None:
            _check_count(seed, "seed")
        self.items: list[dict[str, Any]] = index["items"]
        self.store: str = index["options"]["store"]
        try:
            self.norm = LatentNorm.from_dict(index)
        except (TypeError, ValueError) as e:  # klvae writes valid factors: these are damaged
            raise LatentsError(f"{path}: {first_line(e)}: the index is damaged; `klvae cache` run again on this "
                               "folder writes it anew") from None
        if mode == "mean" and self.store == "sample":  # else each row's one sample would pass for its mean unsaid
            log.warning("%s holds one posterior sample per image (--store sample), not its mean: mode='mean' "
                        "returns that sample (a cache made with --store moments or scaled holds the mean)", self.root)
        self.mode = mode
        self.seed = seed
        # In shared memory: persistent DataLoader workers keep the copy of the dataset they started with, and
        # set_epoch must reach them (under fork and spawn alike) for each epoch to draw other noise.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._handles: dict[str, Any] = {}
        if verify:
            self._verify()

    def _verify(self) -> None:
        report = verify_cache(self.root)
        if not report.ok:
            raise LatentsError(f"{report.summary()}: `klvae cache --verify --repair -o {self.root}`, then the same "
                               "`klvae cache` command, encodes their rows again")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def epoch(self) -> int:
        """The epoch set_epoch last set (0 before): with a seed, part of each item's noise key."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Other noise for this epoch (with a seed); call it before the epoch's DataLoader iteration starts."""
        _check_count(epoch, "epoch")
        if epoch >= 2**63:
            raise ValueError(f"epoch must be below 2**63, got {epoch}")
        self._epoch.fill_(int(epoch))

    def _generator(self, i: int) -> torch.Generator | None:
        # One generator per draw, seeded from (seed, epoch, item): a generator held by the dataset is copied into
        # every DataLoader worker, which then all draw the same sequence. Without a seed, torch's global RNG,
        # which the DataLoader seeds differently in each worker.
        if self.seed is None:
            return None
        return keyed_generator(self.seed, self.epoch, i)

    def _tensor(self, shard: str, key: str) -> Tensor:
        # One open handle per shard and process; safetensors maps the file. Newer safetensors hand out a view of
        # its private mapping: an in-place edit of a row (`latents += offset_noise`) would change every later read.
        # A shard missing or damaged is a one-line error naming it, not safetensors' own.
        path, h = self.root / shard, self._handles.get(shard)
        try:
            if h is None:
                h = self._handles[shard] = safe_open(str(path), framework="pt")
            return h.get_tensor(key).clone()
        except FileNotFoundError:
            raise LatentsError(f"{path}, which {self.root / 'index.json'} names, is missing: the cache is "
                               "damaged") from None
        except OSError as e:  # permissions, say: the file itself may be whole
            raise LatentsError(f"{path}: cannot read {key}: {first_line(e)}") from None
        except SafetensorError as e:
            raise LatentsError(f"{path}: cannot read {key} ({first_line(e)}): the shard is damaged; `klvae "
                               "cache` run again on this folder encodes its rows anew") from None

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._row(i)
        it = self.items[i]
        if not _is_item(it):  # checked as read: a check of every row up front would slow a large cache's start
            raise _bad_item(self.root, i)
        prefix = f"{it['row']:06d}"
        if self.store == "moments":
            mean, logvar = self._tensor(it["shard"], f"{prefix}.mean"), self._tensor(it["shard"], f"{prefix}.logvar")
            z = mean
            if self.mode == "sample":
                z = DiagonalGaussian(torch.cat([mean, logvar])[None]).sample(self._generator(i))[0]
            latents = self.norm.scale(z)
        else:
            latents = self._tensor(it["shard"], f"{prefix}.latent")
            if self.store == "sample":
                latents = self.norm.scale(latents)
        meta = {k: it[k] for k in ("source", "size", "crop", "flip", "bucket")}
        return {"latents": latents, **meta, **micro_conditioning(it)}

    def _row(self, i: object) -> int:
        # The noise is keyed by the row: ds[-1], ds[n - 1] and ds[torch.tensor(n - 1)] are one item, one draw.
        if isinstance(i, slice) or not hasattr(i, "__index__"):
            raise TypeError(f"a LatentDataset is indexed by one row number, got {type(i).__name__} (take "
                            "[ds[j] for j in range(...)] for several)")
        row = operator.index(i)
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} is out of range for a cache of {len(self)} rows")
        return row % len(self)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen shards themselves; open handles do not pickle.
        return {**self.__dict__, "_handles": {}}


def collate_latents(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """A DataLoader collate_fn for LatentDataset: tensors stacked to [B, ...], the index's plain fields kept as
    one list per field with each item's value (the default collate would split "size" into two [B] tensors)."""
    tensors = [k for k, v in batch[0].items() if isinstance(v, Tensor)]
    shapes = {tuple(b["latents"].shape) for b in batch}
    if len(shapes) > 1:
        raise LatentsError(f"latents of {len(shapes)} sizes in one batch ({', '.join(map(str, sorted(shapes)[:2]))}"
                           "): batch with BucketBatchSampler, which keeps each batch to one size")
    return {**{k: torch.stack([b[k] for b in batch]) for k in tensors},
            **{k: [b[k] for b in batch] for k in batch[0] if k not in tensors}}


def micro_conditioning(item: dict[str, Any]) -> dict[str, Tensor]:
    """SDXL's size and crop conditioning of an index row (see `LatentDataset`), as int64 tensors."""
    (height, width), (top, left, th, tw) = item["size"], item["crop"]
    if item["flip"]:
        # The row is the crop of the unflipped image, mirrored: the same pixels as the crop of the mirrored image
        # at left' = scaled_width - crop_width - left.
        left = cover_size(height, width, (th, tw))[1] - tw - left
    original, crop, target = (torch.tensor(v, dtype=torch.int64) for v in ((height, width), (top, left), (th, tw)))
    return {"original_size": original, "crops_coords_top_left": crop, "target_size": target,
            "add_time_ids": torch.cat([original, crop, target])}


def _bad_item(root: Path, i: int) -> LatentsError:
    return LatentsError(f"{root / 'index.json'} item {i} is not a cache row (shard, row, source, size, crop, flip, "
                        "bucket): the index is damaged; `klvae cache` run again on this folder writes it anew")


def _ints(v: object, n: int, least: int = 0) -> bool:
    return isinstance(v, list) and len(v) == n and all(type(x) is int and x >= least for x in v)


def _is_item(it: object) -> bool:
    # What __getitem__, micro_conditioning and BucketBatchSampler read of a row.
    return (isinstance(it, dict) and isinstance(it.get("shard"), str) and type(it.get("row")) is int
            and it["row"] >= 0 and isinstance(it.get("source"), str) and _ints(it.get("size"), 2, 1)
            and _ints(it.get("crop"), 4) and isinstance(it.get("flip"), bool) and _ints(it.get("bucket"), 2, 1))


def _check_count(value: object, name: str, least: int = 0) -> None:
    # A float or a string would key the noise or the shuffle some other way, or fail deep inside torch.
    if not is_integer(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


class BucketBatchSampler(Sampler[list[int]]):
    """Batches whose rows share a bucket (one latent size), shuffled per epoch; partial batches kept unless
    `drop_last`. Under data parallelism each of `num_replicas` ranks takes every num_replicas-th batch of the same
    epoch order (the default: torch.distributed's world, when it is initialised)."""

    def __init__(self, dataset: LatentDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None) -> None:
        _check_count(batch_size, "batch_size", least=1)
        _check_count(seed, "seed")
        dist = torch.distributed
        running = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if running else 1
        self.rank = rank if rank is not None else dist.get_rank() if running else 0
        _check_count(self.num_replicas, "num_replicas", least=1)
        _check_count(self.rank, "rank")
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {self.rank}")
        self.batch_size, self.shuffle, self.seed, self.drop_last, self.epoch = batch_size, shuffle, seed, drop_last, 0
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, it in enumerate(dataset.items):
            if not (isinstance(it, dict) and _ints(it.get("bucket"), 2)):
                raise _bad_item(dataset.root, i)
            groups[tuple(it["bucket"])].append(i)
        self.groups = list(groups.values())

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently for the next epoch (call it on every rank with the same epoch)."""
        _check_count(epoch, "epoch")
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        # The whole epoch's batches, the same list on every rank (one seed), so that the ranks' shares are disjoint.
        # int(): NumPy integers are taken; modulo 2**64, the seeds manual_seed takes (a larger one overflowed).
        g = torch.Generator().manual_seed(int(self.seed + self.epoch) % 2**64)
        batches = []
        for idx in self.groups:
            order = [idx[j] for j in torch.randperm(len(idx), generator=g)] if self.shuffle else idx
            ends = range(0, len(order) - (len(order) % self.batch_size if self.drop_last else 0), self.batch_size)
            batches += [order[k : k + self.batch_size] for k in ends]
        perm = torch.randperm(len(batches), generator=g).tolist() if self.shuffle else range(len(batches))
        return [batches[j] for j in perm]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        # Every rank must run as many steps as the others (a collective waits for all), so a short tail is
        # topped up with the epoch's first batches, as DistributedSampler repeats its first samples.
        padded = [batches[i % len(batches)] for i in range(len(self) * self.num_replicas)] if batches else []
        return iter(padded[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        full = sum(len(g) // self.batch_size if self.drop_last else -(-len(g) // self.batch_size)
                   for g in self.groups)
        return -(-full // self.num_replicas)
