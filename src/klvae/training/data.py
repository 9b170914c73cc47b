"""Training images: crops and flips, datasets over folders, Hugging Face data, parquet and tar shards, loaders.

Unreadable items are never fatal: a dataset logs a warning naming the item and yields None in its place;
`collate_skip_none` drops the Nones and puts their number in the batch ("skipped"), because counters kept in
DataLoader worker processes never reach the main process. Random choices (crop position, scale, flip) come
from torch's global generator, so a wrapper that seeds it per item (training.sampler.SeededItems) makes
them reproducible, and DataLoader workers get distinct streams. Tar shards, read as streams, seed each sample
themselves once given a seed (`WebDatasetShards.seed`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from klvae.checks import is_integer
from klvae.datasources import TableRows, expand_shards, resolve_spec
from klvae.distributed import quiet_on_sigterm, usable_workers
from klvae.errors import ImageError, KlvaeError, quote
from klvae.images import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    find_images,
    image_from_cell,
    load_image,
    open_image_bytes,
    pil_to_tensor,
    read_tar_member,
)
from klvae.training.sampler import seeded

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Tensor]
Item = dict[str, Any] | None

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "bilinear": Image.Resampling.BILINEAR}
CROPS = ("center", "random")
# Whether this process has said that images smaller than the resolution are scaled up: once per process (a
# DataLoader worker forked after the warning inherits it), as a warning per image would flood the log.
_UPSCALE_WARNED = [False]


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from torch's global generator."""
    return lo if hi <= lo else int(torch.randint(lo, hi + 1, ()).item())


def random_flip(img: Image.Image, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability p."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if p > 0 and torch.rand(()).item() < p else img


@dataclass
class TransformConfig:
    """How a training image becomes a square tensor."""

    resolution: int = 256
    # True: the crop is resized to `resolution`; False: a resolution² window at native size (small images
    # are still scaled up to it).
    resize: bool = True
    crop: str = "center"
    flip: float = 0.0
    # The crop's side as a fraction of the shorter side, drawn uniformly from this range (resize=True only):
    # (1, 1) is the usual resize-then-crop; (0.5, 1) adds zoomed-in detail crops at up to 2x.
    scale: tuple[float, float] = (1.0, 1.0)
    resample: str = "lanczos"


class ImageTransform:
    """Square crop (random or central, at a random scale), resize, flip, to [-1, 1]: picklable for workers."""

    def __init__(self, cfg: TransformConfig) -> None:
        self.cfg = cfg

    def crop_side(self, w: int, h: int) -> int:
        """The side of the square cut from a w x h image, in source pixels."""
        c, short = self.cfg, min(w, h)
        if not c.resize:
            return min(short, c.resolution)
        lo, hi = c.scale
        s = lo + (hi - lo) * torch.rand(()).item() if hi > lo else lo
        return max(1, min(short, round(s * short)))

    def __call__(self, img: Image.Image) -> Tensor:
        """One image -> float32 [3, resolution, resolution] in [-1, 1]."""
        c = self.cfg
        if min(img.size) < c.resolution and not _UPSCALE_WARNED[0]:
            _warn_upscale(c.resolution, min(img.size))
        side = self.crop_side(img.width, img.height)
        if c.crop == "random":
            left, top = _randint(0, img.width - side), _randint(0, img.height - side)
        else:
            left, top = (img.width - side) // 2, (img.height - side) // 2
        box = (left, top, left + side, top + side)
        if side == c.resolution:
            img = img.crop(box)
        else:  # crop and resample in one pass: only the box is filtered
            img = img.resize((c.resolution, c.resolution), RESAMPLE[c.resample], box=box)
        return pil_to_tensor(random_flip(img, c.flip))


def mark_upscale_warned() -> None:
    """Take the scaled-up images as said in this process (and the DataLoader workers it starts from now on)."""
    _UPSCALE_WARNED[0] = True


def _warn_upscale(resolution: int, side: int) -> None:
    # Every crop of such an image is upsampled: the decoder learns blurred targets, not the data's detail.
    _UPSCALE_WARNED[0] = True
    log.warning("data.resolution %d is larger than the images: one of %d px on its shorter side was scaled up, as "
                "is every image under %d px, which blurs the targets; consider a data.resolution of at most %d (a "
                "multiple of the model's downsample factor; said once per process)", resolution, side, resolution,
                side)


def build_transform(cfg: TransformConfig) -> ImageTransform:
    """Validate cfg and return the transform."""
    lo, hi = cfg.scale
    problems = [
        (cfg.resolution < 1, f"resolution must be at least 1, got {cfg.resolution}"),
        (cfg.crop not in CROPS, f"crop must be one of {', '.join(CROPS)}, got {quote(cfg.crop)}"),
        (not 0.0 <= cfg.flip <= 1.0, f"flip is a probability, got {cfg.flip}"),
        (not 0.0 < lo <= hi <= 1.0, f"scale must satisfy 0 < min <= max <= 1, got ({lo}, {hi})"),
        (cfg.resample not in RESAMPLE, f"resample must be one of {', '.join(RESAMPLE)}, got {quote(cfg.resample)}"),
    ]
    for bad, msg in problems:
        if bad:
            raise KlvaeError(f"transform: {msg}")
    return ImageTransform(cfg)


def _item(key: str, load: Callable[[], Image.Image], transform: Transform | None) -> Item:
    try:
        img = load()
    except ImageError as e:
        log.warning("skipping unreadable image %s", e)
        return None
    return {"pixels": transform(img) if transform is not None else pil_to_tensor(img), "key": key}


class ImageFolderDataset(Dataset):
    """The images under a folder (or one file), sorted; an item is {"pixels", "key"} or None if unreadable."""

    def __init__(self, root: str | Path, transform: Transform | None = None, recursive: bool = True,
                 max_pixels: int | None = MAX_PIXELS, cache: bool = False) -> None:
        self.root, self.transform, self.max_pixels = Path(root), transform, max_pixels
        self.paths = find_images([self.root], recursive)
        # Decoded images kept in memory (per worker): decoding a large PNG costs ~10x the crop and resize.
        self.cache: dict[int, Image.Image] | None = {} if cache else None
        if not self.paths:
            raise KlvaeError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        """The item's path relative to the root."""
        p = self.paths[i]
        return p.name if p == self.root else p.relative_to(self.root).as_posix()

    def _load(self, i: int) -> Image.Image:
        if self.cache is None:
            return load_image(self.paths[i], self.max_pixels)
        if i not in self.cache:
            self.cache[i] = load_image(self.paths[i], self.max_pixels)
        return self.cache[i]

    def __getitem__(self, i: int) -> Item:
        return _item(self.key(i), lambda: self._load(i), self.transform)


class HFDiskDataset(Dataset):
    """A `datasets.save_to_disk` folder (needs `datasets`) or parquet file(s) (needs `pyarrow`) with an image column."""

    def __init__(self, path: str | Path | Sequence[str | Path] | TableRows, image_column: str = "image",
                 transform: Transform | None = None, split: str | None = None,
                 max_pixels: int | None = MAX_PIXELS) -> None:
        self.transform, self.max_pixels = transform, max_pixels
        self.table = path if isinstance(path, TableRows) else TableRows(path, image_column, split)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> Item:
        key = f"row{i}"
        return _item(key, lambda: image_from_cell(self.table.cell(i), f"{self.table.path}:{key}", self.max_pixels),
                     self.transform)


def split_plan(n_shards: int, levels: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(shard, stride, offset) reads for part q of p at each level (rank, then worker): whole shards while
    there are at least p of them, else every p-th sample of each, so the parts are disjoint and cover all."""
    plan = [(s, 1, 0) for s in range(n_shards)]
    for q, p in levels:
        if p <= 1:
            continue
        # Too few shards: of samples o, o+k, o+2k, ... of each, part q takes every p-th, from the q-th.
        plan = plan[q::p] if len(plan) >= p else [(s, k * p, o + q * k) for s, k, o in plan]
    return plan


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else from an initialised torch.distributed, else (0, 1)."""
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not is_integer(rank) or not is_integer(world_size) or not 0 <= rank < world_size:
        raise KlvaeError(f"rank {rank!r} of world size {world_size!r}: give both, integers with "
                         f"0 <= rank < world size")
    return rank, world_size


def _split_name(name: str) -> tuple[str, str]:
    # As webdataset: the key is the path up to the first dot of the file name, the rest is the extension.
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _tar_groups(tf: tarfile.TarFile, wanted: Callable[[int], bool],
                is_image: Callable[[str], bool]) -> Iterator[tuple[int, str, dict[str, bytes | ImageError]]]:
    """(sample number, key, {extension: bytes, or the error of a member too big to read}) per run of members
    sharing a key; bytes read only for wanted images."""
    key, idx = None, -1
    group: dict[str, bytes | ImageError] = {}
    for m in tf:  # a stream: a member's bytes can only be read while it is the current one
        if not m.isfile() or m.name.rpartition("/")[2].startswith("."):
            continue
        k, ext = _split_name(m.name)
        if k != key:
            if key is not None and wanted(idx):
                yield idx, key, group
            key, idx, group = k, idx + 1, {}
        if wanted(idx) and is_image(ext):
            try:
                group[ext] = read_tar_member(tf, m, m.name)
            except ImageError as e:  # the sample is skipped and counted; the stream goes on past the member
                group[ext] = e
    if key is not None and wanted(idx):
        yield idx, key, group


def _count_images(shard: Path, stride: int, offset: int, is_image: Callable[[str], bool], limit: int) -> int:
    """Samples of one shard's part (every `stride`-th from `offset`) that hold an image member, counted from the
    member headers alone (no image is read), up to `limit`; a torn shard counts what precedes the tear."""
    n, key, idx, has = 0, None, -1, False
    try:
        with tarfile.open(shard, "r|*") as tf:
            for m in tf:
                if not m.isfile() or m.name.rpartition("/")[2].startswith("."):
                    continue
                k, ext = _split_name(m.name)
                if k != key:
                    n += has and idx % stride == offset
                    if n >= limit:
                        return n
                    key, idx, has = k, idx + 1, False
                has = has or is_image(ext)
    except (OSError, EOFError, tarfile.TarError):
        pass  # training reads the shard too, and warns about it then
    return n + (has and idx % stride == offset)


# The members a sample's image is taken from, in order of preference: every image a shard can contribute (README),
# the usual WebDataset keys first.
TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", *sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS
                                                        if e.lstrip(".") not in ("jpg", "jpeg", "png", "webp")))


def _said_merged(shard: Path, key: str, group: dict[str, bytes | ImageError], keys: Sequence[str]) -> bool:
    """Warn (and say so) when a sample holds several images none of which has a plain key: files whose names share
    the part before their first dot (2023.05.01.jpg, 2023.05.02.jpg), which WebDataset makes one sample."""
    if len(group) < 2 or any(k in group for k in keys):  # jpg beside seg.png: a sample and its mask, as meant
        return False
    log.warning("shard %s: sample %s holds %d images (%s): a WebDataset key is a name up to its first dot, so one "
                "of them is trained on (cache and eval read each file); rename them without dots to train on all",
                shard.name, key, len(group), ", ".join(f"{key}.{ext}" for ext in group))
    return True


class WebDatasetShards(IterableDataset):
    """Samples of WebDataset .tar shards, read with tarfile; each (rank, worker) reads its own part once."""

    def __init__(self, shards: str | Path | Sequence[str | Path], transform: Transform | None = None,
                 image_keys: Sequence[str] = TAR_IMAGE_KEYS, rank: int | None = None,
                 world_size: int | None = None, max_pixels: int | None = MAX_PIXELS) -> None:
        self.shards = expand_shards(shards)
        self.transform, self.max_pixels = transform, max_pixels
        self.image_keys = tuple(k.lower().lstrip(".") for k in image_keys)
        # Resolved here, in the main process: worker processes do not share its torch.distributed state.
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.skipped = 0  # in this process only; batches carry the count across workers
        # Training sets a seed: each sample's crop and flip then come from (seed, pass, shard, sample), not from
        # the global generator, which a resume (reading the consumed batches again) would leave elsewhere.
        self.seed: int | None = None
        self.epoch = 0  # the pass over the shards, set by the loader before each (workers get a copy)

    def set_epoch(self, epoch: int) -> None:
        """Number the coming pass over the shards (it seeds the samples' augmentations with `seed`)."""
        self.epoch = epoch

    def _is_image(self, ext: str) -> bool:
        return ext in self.image_keys or ext.rpartition(".")[2] in self.image_keys

    def _pick(self, group: dict[str, bytes | ImageError]) -> bytes | ImageError | None:
        for k in self.image_keys:
            if k in group:
                return group[k]
        return next(iter(group.values()), None)  # a compound extension such as "512.jpg"

    def plan(self) -> list[tuple[int, int, int]]:
        """This rank's and worker's (shard, stride, offset) reads."""
        info = get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        return split_plan(len(self.shards), [(self.rank, self.world_size), worker])

    def count_samples(self, parts: Sequence[tuple[int, int]], limit: int) -> int:
        """The samples holding an image in one part of the shards (`parts`: (rank, world size), then (worker,
        workers), as plan() splits them), counted from the tar headers up to `limit`."""
        n = 0
        for s, stride, offset in split_plan(len(self.shards), parts):
            n += _count_images(self.shards[s], stride, offset, self._is_image, limit - n)
            if n >= limit:
                break
        return n

    def _sample(self, name: str, data: bytes | ImageError | None) -> Item:
        if data is None or isinstance(data, ImageError):
            log.warning("skipping %s: %s", name, data or f"no {'/'.join(self.image_keys)} member")
            return None
        return _item(name, lambda: open_image_bytes(data, name, self.max_pixels), self.transform)

    def _sample_seed(self, shard: int, sample: int) -> int:
        text = f"{self.seed},{self.epoch},{shard},{sample}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little") % 2**31

    def _read(self, s: int, stride: int, offset: int) -> Iterator[Item]:
        shard = self.shards[s]
        try:
            with tarfile.open(shard, "r|*") as tf:
                said = False
                for i, key, group in _tar_groups(tf, lambda i: i % stride == offset, self._is_image):
                    said = said or _said_merged(shard, key, group, self.image_keys)
                    make = functools.partial(self._sample, f"{shard.name}:{key}", self._pick(group))
                    yield make() if self.seed is None else seeded(self._sample_seed(s, i), make)
                end = tf.offset
                # A compressed stream has no end-of-archive blocks to count, whatever its name.
                plain = getattr(tf.fileobj, "comptype", "tar") == "tar"
        except (OSError, EOFError, tarfile.TarError) as e:  # a torn shard: keep what was read, go on
            log.warning("skipping the rest of shard %s: %s", shard, e)
            yield None
            return
        # tarfile takes a file cut at a block boundary for a clean end; a whole one ends in zero blocks.
        if plain and shard.stat().st_size - end < 512:
            log.warning("shard %s has no end-of-archive marker: torn, samples may be missing", shard)
            yield None

    def __iter__(self) -> Iterator[Item]:
        for s, stride, offset in self.plan():
            for item in self._read(s, stride, offset):
                self.skipped += item is None
                yield item


def build_dataset(spec: str | Path, transform: Transform | None = None, image_column: str = "image",
                  rank: int | None = None, world_size: int | None = None, recursive: bool = True,
                  split: str | None = None, cache: bool = False
                  ) -> ImageFolderDataset | HFDiskDataset | WebDatasetShards:
    """The dataset a path names: image folder or file, save_to_disk folder, parquet, or tar shards (glob/braces).

    `cache` keeps an image folder's decoded images in memory (small datasets seen many times)."""
    found = resolve_spec(spec, recursive)
    if found.kind == "tar":
        return WebDatasetShards(list(found.paths), transform, rank=rank, world_size=world_size)
    if found.kind == "table":
        return HFDiskDataset(TableRows.from_spec(found, image_column, split), transform=transform)
    return ImageFolderDataset(found.paths[0], transform, recursive, cache=cache)


def collate_skip_none(items: Sequence[Item | Tensor]) -> dict[str, Any]:
    """Drop unreadable (None) items: {"pixels": [B, 3, H, W], "keys": [...], "skipped": number dropped}."""
    good = [it for it in items if it is not None]
    pixels = [it["pixels"] if isinstance(it, dict) else it for it in good]
    keys = [it.get("key") if isinstance(it, dict) else None for it in good]
    if not pixels:
        return {"pixels": torch.empty(0, 3, 0, 0), "keys": [], "skipped": len(items)}
    shapes = {tuple(t.shape) for t in pixels}
    if len(shapes) > 1:
        raise KlvaeError(f"images of one batch differ in size {sorted(shapes)}: use a transform that crops")
    return {"pixels": torch.stack(pixels), "keys": keys, "skipped": len(items) - len(good)}


def build_dataloader(dataset: Dataset | IterableDataset, batch_size: int, num_workers: int = 0,
                     shuffle: bool = True, seed: int = 0, drop_last: bool = False, distributed: bool = False,
                     rank: int | None = None, world_size: int | None = None) -> DataLoader:
    """A DataLoader with collate_skip_none; a DistributedSampler for map-style data when distributed."""
    sampler: DistributedSampler | None = None
    if isinstance(dataset, IterableDataset):
        shuffle = False  # streams split themselves by rank and worker; order is the shards'
    elif distributed:
        r, w = resolve_rank(rank, world_size)
        sampler = DistributedSampler(dataset, num_replicas=w, rank=r, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
        shuffle = False
    num_workers = usable_workers(num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_skip_none, drop_last=drop_last, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=quiet_on_sigterm)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a distributed loader for `epoch` (DistributedSampler draws its order from seed + epoch)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
