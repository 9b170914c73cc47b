"""`build_cache`: the Python API of `klvae cache` (encode a dataset to latent shards plus index.json, resumably).

The CLI is a thin layer over it. The building blocks (a rank's share, the manifests, the index) live in
latents/cache.py; this module runs them in order, sums the counts over the ranks of a torchrun job, writes the
index on rank 0 and says what was done, so that `LatentDataset(out)` reads the cache as soon as it returns.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klvae.atomic import make_folders, remove_made_folders
from klvae.distributed import DistInfo, all_sum, barrier, job_lock
from klvae.errors import KlvaeError, OptionError, quote
from klvae.inference.precision import compute_dtype, resolve_dtype
from klvae.latents import cache
from klvae.latents.options import CacheOptions, check_seed
from klvae.latents.sources import ItemSource, open_source
from klvae.model.autoencoder import AutoencoderKL

log = logging.getLogger(__name__)

_COUNTS = ("encoded", "failed", "done_before", "failed_before", "enlarged")  # the image counts cache_rank returns


@dataclass(frozen=True)
class CacheSummary:
    """What `build_cache` did (image counts summed over every rank) and the cache it left in `root`."""

    root: Path
    index: Path | None  # None on the ranks of a torchrun job other than 0: rank 0 writes the index
    rows: int  # rows the index lists (an image and, with flip, its mirror image); 0 where index is None
    shards: int  # shard files the index lists; 0 where index is None
    encoded: int  # images this call encoded
    failed: int  # images this call found unreadable: skipped, recorded, and not retried by a rerun
    done_before: int  # images an earlier, interrupted run had encoded already
    failed_before: int  # images an earlier run found unreadable, skipped again
    unreadable_shards: int  # tar shards of the data that could not be read (wholly or from some point on)
    enlarged: int = 0  # images this call encoded that were smaller than their crop, so scaled up to cover it

    @property
    def ok(self) -> bool:
        """True when every image of the data is in the cache: none unreadable, in this run or before."""
        return not (self.failed or self.failed_before or self.unreadable_shards)

    def summary(self) -> str:
        """One line: the rows cached, and what this run encoded, found done and skipped."""
        parts = [f"this run encoded {self.encoded} images and skipped {self.failed} unreadable",
                 f"{self.done_before} were done before"]
        if self.enlarged:
            parts.insert(1, f"{self.enlarged} of those were smaller than their crop, so enlarged")
        if self.failed_before:
            parts.append(f"{self.failed_before} found unreadable before were skipped again")
        if self.unreadable_shards:
            parts.append(f"{self.unreadable_shards} unreadable tar shard{'s' if self.unreadable_shards > 1 else ''} "
                         "skipped")
        return f"cached {self.rows} rows in {self.root} ({'; '.join(parts)})"


def _compute_dtype(vae: AutoencoderKL, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype the cache computes in; an OptionError naming `dtype` before any folder is touched."""
    try:
        return compute_dtype(vae, resolve_dtype(dtype, vae.device))
    except (KlvaeError, TypeError):
        raise OptionError(lambda n: f"{n('dtype')} must be auto, fp32, bf16 or fp16 (or torch.float32, torch.bfloat16, "
                          f"torch.float16), got {quote(dtype)}") from None


def build_cache(vae: AutoencoderKL, data: str | os.PathLike[str] | ItemSource, out: str | os.PathLike[str], *,
                resolution: int = 512, buckets: bool = False, flip: bool = False, store: str = "moments",
                shard_size: int = 256, batch_size: int = 4, num_workers: int = 2, seed: int = 0,
                dtype: str | torch.dtype | None = None, model_name: str | os.PathLike[str] | None = None,
                dist: DistInfo | None = None, fingerprints: dict[str, str] | None = None) -> CacheSummary:
    """Encode `data` into a latent cache in `out` (shards + index.json), as `klvae cache` does; rerun to finish.

    `data` is what `klvae cache --data` takes (an image folder, a `datasets` folder, parquet, .tar shards, a glob)
    or an opened `ItemSource`; the options are the CLI's flags. The model runs where it is (move it first), in
    `dtype` ("auto"/None: bf16 on GPUs that have it, else fp32). A rerun into the same `out` encodes only what is
    not done yet and refuses (KlvaeError) other options, another encoder or (store="scaled") other factors; a
    fine-tune of the first model's decoder alone gives the same rows, and may finish it. Unreadable images are
    skipped and counted (`CacheSummary.ok` is False), the rest finished. `model_name` is what index.json records
    as the model. Bad options, and a resume with other ones, are an OptionError (a KlvaeError) naming the argument.
    Under torchrun, pass `dist` (klvae.distributed.init_distributed) or initialise the process group
    first: each rank encodes its share, and rank 0 writes the index. A model whose weights were cast to half
    precision after loading passes `fingerprints=klvae.latents.cache.model_fingerprints(vae, store)` taken before the
    cast, so that a run in another precision resumes the cache.
    """
    opts = _options({"resolution": resolution, "buckets": buckets, "flip": flip, "store": store,
                     "shard_size": shard_size, "batch_size": batch_size, "num_workers": num_workers, "seed": seed})
    _check_args(vae, data, model_name)
    compute = _compute_dtype(vae, dtype)
    dist = dist or _process_group()
    root = _check_out(Path(out), data)
    source = data if isinstance(data, ItemSource) else open_source(os.fspath(data))
    log.info("caching %d images into %s (store %s, resolution %d%s%s)", len(source.ids), root, opts.store,
             opts.resolution, ", buckets" if opts.buckets else "", ", flip" if opts.flip else "")
    # Computed once: hashing every weight is slow on a large model, and the ranks and the index share them.
    fingerprints = {**(fingerprints or cache.model_fingerprints(vae, opts.store)), **source.fingerprints()}
    # The folders around the cache's own are made here, and removed again by a failed run (as cache_rank and
    # write_index remove the cache's).
    made = make_folders(root if dist.is_main else root.parent)  # rank 0's lock is on the cache's folder itself
    try:
        with job_lock(root, "klvae cache", dist, vae.device):
            counts = cache.cache_rank(vae, source, root, opts, compute, dist.rank, dist.world, fingerprints,
                                      locked=True)
            counts = _sum_over_ranks(counts, dist, vae.device)
            barrier(dist)  # every rank's manifest is complete before rank 0 merges them
            index = cache.write_index(vae, os.fspath(model_name or "unnamed"), root, opts, dist.world,
                                      fingerprints) if dist.is_main else None
    except BaseException:
        remove_made_folders(made)
        raise
    result = _summarise(root, index, counts, len(source.unreadable))
    if dist.is_main and result.enlarged:
        # As training's and evaluation's crops: a scaled-up image has no detail at the latents' scale to learn.
        log.warning("%d of the %d images encoded were smaller than their crop (resolution %d%s) and were enlarged "
                    "to cover it, which blurs them; a resolution at most the images' shorter side avoids that",
                    result.enlarged, result.encoded, opts.resolution, ", or its bucket" if opts.buckets else "")
    log.debug("%s", result.summary())
    return result


def _options(values: dict[str, Any]) -> CacheOptions:
    # CacheOptions checks the ranges; a library caller may also pass a str or float, which it would not catch.
    for name, value in values.items():
        want = bool if name in ("buckets", "flip") else str if name == "store" else int
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise OptionError(f"{name} must be a{'n' if want is int else ''} {want.__name__}, got {quote(value)}")
    check_seed(values["seed"])
    return CacheOptions(**values)


def _check_args(vae: object, data: object, model_name: object) -> None:
    # Checked before the work: index.json, written last, records model_name as JSON, which takes no Path as is.
    if not isinstance(vae, AutoencoderKL):
        raise KlvaeError(f"vae must be a klvae AutoencoderKL (klvae.AutoencoderKL.from_pretrained), got "
                         f"{type(vae).__name__}")
    if not isinstance(data, str | os.PathLike | ItemSource):
        raise KlvaeError(f"data must be a path or an ItemSource, got {type(data).__name__}")
    if not isinstance(model_name, str | os.PathLike | None):
        raise KlvaeError(f"model_name must be a str or a path, got {type(model_name).__name__}")


def _process_group() -> DistInfo:
    # A caller under torchrun who set up the process group but passed no `dist`: as one process, every rank would
    # write rank 0's manifest and shards, over one another.
    pg = torch.distributed
    if pg.is_available() and pg.is_initialized():
        return DistInfo(rank=pg.get_rank(), world=pg.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise KlvaeError("under torchrun, build_cache needs the process group: pass "
                         "dist=klvae.distributed.init_distributed(device_type)")
    return DistInfo()


def _check_out(out: Path, data: object) -> Path:
    # Checked before anything is opened or made. A cache inside a data folder would become part of its data.
    if out.exists() and not out.is_dir():
        raise KlvaeError(f"cache folder {out} is a file, not a folder")
    if isinstance(data, str | os.PathLike) and (folder := Path(data)).is_dir():
        where, top = out.resolve(), folder.resolve()
        if where == top or top in where.parents:
            raise KlvaeError(f"cache folder {out} is inside the data folder {folder}; name a folder outside it")
    return out


def _sum_over_ranks(counts: dict[str, int], dist: DistInfo, device: torch.device) -> dict[str, int]:
    # The summary (and the CLI's exit status) speak for the whole job, not for this rank's share.
    t = all_sum(torch.tensor([counts[k] for k in _COUNTS], dtype=torch.int64, device=device), dist)
    return dict(zip(_COUNTS, t.tolist(), strict=True))


def _summarise(root: Path, index: Path | None, counts: dict[str, int], unreadable_shards: int) -> CacheSummary:
    written = json.loads(index.read_text()) if index else {"items": [], "shards": {}}
    return CacheSummary(root=root, index=index, rows=len(written["items"]), shards=len(written["shards"]),
                        unreadable_shards=unreadable_shards, **counts)
