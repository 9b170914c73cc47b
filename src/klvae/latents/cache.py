"""`klvae cache`: encode a dataset to latent shards, resumably, on one process or many.

Exactly-once: a shard is written under a temporary name and renamed; only then is one line describing
all of its rows appended (and fsynced) to this rank's manifest. On restart, shards that no manifest line
names are deleted and only rows that no line names are encoded (per row, not per image: with --flip an
image's two rows may fall in different shards). A torn last line is ignored, so a kill at any instant
leaves either a whole shard and its line, or neither counted. Every line records the options that decide
what a row holds, and fingerprints of the model: of its encoder (and, for scaled rows, of its factors), which
decide the rows, so that a fine-tune of the decoder alone may resume a cache, and of the whole model, which decided
for lines written before the encoder's was recorded. A resume with other values, or another model, is refused
before anything is touched. A resume also checks the header of each shard its lines name (latents/integrity.py):
one damaged since it was recorded is dropped, with a warning, and its rows are encoded again. Each line also
records its shard's SHA-256, which `klvae cache --verify` (latents/verify.py) compares with the whole file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from klvae import inference
from klvae.atomic import append_text, atomic_write_text, folder_lock, make_folders, remove_made_folders
from klvae.distributed import quiet_on_sigterm, usable_workers
from klvae.errors import KlvaeError, none_read, quote
from klvae.images import pil_to_tensor
from klvae.latents.buckets import make_buckets, nearest_bucket, resize_crop
from klvae.latents.fingerprint import encoder_fingerprint, factors_fingerprint, model_fingerprint
from klvae.latents.integrity import RowShapes, drop_damaged, row_shapes, save_shard, shard_problem, stored_tensors
from klvae.latents.keyed_noise import keyed_generator
from klvae.latents.options import CacheOptions, check_whole_latents
from klvae.latents.resume import refusal
from klvae.latents.sources import ItemSource, item_error, open_source
from klvae.model.autoencoder import AutoencoderKL
from klvae.progress import progress_bar

log = logging.getLogger(__name__)

INDEX_FORMAT = "klvae.latent-cache/1"


class _Prepared(Dataset):
    """Loads, cuts and flips the images of this rank that are still to do (an error string for unreadable ones)."""

    def __init__(self, source: ItemSource, todo: list[tuple[str, list[bool]]], opts: CacheOptions) -> None:
        self.source, self.todo = source, todo  # (id, the flips of its rows still to encode)
        self.buckets = make_buckets(opts.resolution) if opts.buckets else [(opts.resolution, opts.resolution)]

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, i: int) -> tuple[str, list[tuple[Tensor, dict[str, Any]]] | str]:
        item_id, flips = self.todo[i]
        try:
            img = self.source.load(item_id)
            bucket = nearest_bucket(img.height, img.width, self.buckets)
            cut, crop = resize_crop(img, bucket)
            x = pil_to_tensor(cut)
        except Exception as e:  # ImageError, or a decoder's own (PIL raises many kinds): this image, not the job
            return item_id, item_error(item_id, e)
        meta = {"source": item_id, "size": [img.height, img.width], "crop": list(crop), "bucket": list(bucket)}
        return item_id, [(x.flip(-1) if f else x, {**meta, "flip": f}) for f in flips]


def _collate(batch: list[Any]) -> list[Any]:
    return batch


def _write_shard(rows: list[tuple[dict[str, Tensor], dict[str, Any]]], out: Path, name: str) -> dict[str, Any]:
    # The manifest line's shard, rows and the shard's SHA-256.
    tensors, metas = {}, []
    for r, (t, meta) in enumerate(rows):
        for field, v in t.items():
            tensors[f"{r:06d}.{field}"] = v.contiguous()
        metas.append({**meta, "shard": name, "row": r})
    return {"shard": name, "rows": metas, "sha256": save_shard(out / name, tensors, {"format": INDEX_FORMAT})}


def _append_line(path: Path, record: dict[str, Any]) -> None:
    # After a line torn by a kill, start a new one: glued to the fragment, this record would be unreadable too.
    torn = path.exists() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    append_text(path, ("\n" if torn else "") + json.dumps(record) + "\n", sync=True)


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _damaged(what: str) -> KlvaeError:
    return KlvaeError(f"{what}: the cache is damaged; move the folder aside and cache again")


_MANIFEST_NAME = re.compile(r"manifest-(rank\d{3,})\.jsonl")


def read_manifest(path: Path, shards: bool = False) -> list[dict[str, Any]]:
    """The complete lines of a manifest (lines torn by a kill are ignored; a whole line that is not a record is a
    KlvaeError). With `shards`, each shard a line names must also be a file beside it, named by one line only."""
    if not path.exists():
        return []
    if not path.is_file():  # a FIFO would block the read for good; a folder, a device: not ours either
        raise _damaged(f"{path} is not a regular file")
    if not (name := _MANIFEST_NAME.fullmatch(path.name)):
        raise _damaged(f"{path} is not named like a cache manifest (manifest-rankNNN.jsonl)")
    # A resume takes the next number from these names and deletes every shard of this rank that none names: a
    # name of another form would crash it, or have it delete the shard the line stands for.
    shard_name = re.compile(rf"{name[1]}-\d{{5,}}\.safetensors")
    records, seen = [], set()
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # ValueError: bad JSON, or an int of 5000 digits
            continue
        if not _is_record(rec) or any(rec.get(k) is not None and not (isinstance(rec[k], str)
                                                                      and shard_name.fullmatch(rec[k]))
                                      for k in ("shard", "dropped")):
            raise _damaged(f"{path} line {n} is not a cache manifest record")
        if shards and (shard := rec.get("shard")):
            # A line is appended only once its shard is in place; a shard gone, or named twice, was not our doing.
            if shard in seen or not (path.parent / shard).is_file():
                raise _damaged(f"{path} line {n} names {quote(shard)}, which is "
                               f"{'named twice' if shard in seen else 'missing'}")
            seen.add(shard)
        records.append(rec)
    return records


def _is_record(rec: Any) -> bool:
    # What a resume and write_index read from each line: its shard, rows (source, flip, and the shard they are
    # in), failures and options. Rows without a shard, or a shard without rows, no writer makes.
    def is_row(m: Any) -> bool:
        return (isinstance(m, dict) and isinstance(m.get("source"), str) and isinstance(m.get("flip"), bool)
                and m.get("shard", shard) == shard)

    return (
        isinstance(rec, dict)
        and isinstance(shard := rec.get("shard"), str | None) and isinstance(rec.get("sha256", ""), str)
        and isinstance(rows := rec.get("rows", []), list) and all(map(is_row, rows)) and bool(rows) == bool(shard)
        and isinstance(failed := rec.get("failed", []), list) and all(isinstance(i, str) for i in failed)
        and isinstance(options := rec.get("options", {}), dict) and _good_options(options)
    )


# The fingerprints a record may hold, beside its options (index.json keeps them at its top level).
_FINGERPRINTS = ("model_fingerprint", "encoder_fingerprint", "factors_fingerprint", "data_fingerprint")
# The type each recorded option must have: a value of another type is no setting any run wrote.
_OPTION_TYPES: dict[str, type] = {"resolution": int, "buckets": bool, "flip": bool, "store": str, "seed": int,
                                  "world_size": int, **dict.fromkeys(_FINGERPRINTS, str)}


def _good_options(options: dict[str, Any]) -> bool:
    # bool is an int to Python, but `true` is no resolution.
    return all(isinstance(v, t) and (t is bool or not isinstance(v, bool))
               for k, v in options.items() if (t := _OPTION_TYPES.get(k)))


# The options that decide what a row holds (and the world size, which decides each rank's images): a resume
# with other values would mix rows the reader cannot serve together, or encode images twice.
_ROW_OPTIONS = ("resolution", "buckets", "flip", "store")


def model_fingerprints(vae: AutoencoderKL, store: str) -> dict[str, str]:
    """The fingerprints a cache of `store` records of the model, and a resume compares: the encoder's and, for
    scaled rows, the factors' (what decides the rows); and the whole model's, which decided for records written
    before the encoder's was (a klvae of before then compares it too)."""
    scaled = store == "scaled"
    return {"model_fingerprint": model_fingerprint(vae, scaled), "encoder_fingerprint": encoder_fingerprint(vae),
            **({"factors_fingerprint": factors_fingerprint(vae)} if scaled else {})}


def row_options(opts: CacheOptions, world: int, fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """The options a resume must share with the runs before it (seed only where it decides the rows), and the
    model's fingerprints (`model_fingerprints`) where known."""
    rec = {k: getattr(opts, k) for k in _ROW_OPTIONS}
    if opts.store == "sample":
        rec["seed"] = opts.seed
    return {**rec, "world_size": world, **(fingerprints or {})}


def check_resume(out: str | Path, opts: CacheOptions, world: int, fingerprints: dict[str, str] | None = None) -> None:
    """Refuse to add to a cache that index.json or a manifest line says was made with other options (OptionError,
    naming them as build_cache's keywords; `flags()` as klvae cache's), or (given this model's `model_fingerprints`)
    with another encoder or, for scaled rows, other factors (KlvaeError). A record without the encoder's
    fingerprint (an older klvae's) is compared by the whole model's, as it was then."""
    out, current = Path(out), row_options(opts, world, fingerprints)
    recorded = []
    if (index := _read_index(out / "index.json")) is not None:
        extra = {k: index[k] for k in ("world_size", *_FINGERPRINTS) if k in index}
        recorded.append({**index.get("options", {}), **extra})
    for p in sorted(out.glob("manifest-rank*.jsonl")):
        # The options alone: each rank checks its own shards (_recover) before it touches anything, and another
        # rank may be dropping a damaged one of its own meanwhile.
        recorded += [rec["options"] for rec in read_manifest(p) if "options" in rec]  # older: none
    for old in recorded:
        for key, value in current.items():
            if key in old and old[key] != value and (error := refusal(out, key, old, value)) is not None:
                raise error


def parse_index(path: Path) -> dict[str, Any] | None:
    """index.json's content when it reads as a klvae cache index (its format and an item list), else None."""
    if not path.is_file():  # absent, or a FIFO (whose read would block) or a folder
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or UTF-8, huge ints
        return None
    ok = isinstance(index, dict) and index.get("format") == INDEX_FORMAT and isinstance(index.get("items"), list)
    return index if ok else None


def _read_index(path: Path) -> dict[str, Any] | None:
    # None where there is none (or no longer: a resume removes it when it drops a damaged shard).
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or UTF-8, huge ints
        index = None
    # Without klvae's format it is another tool's file (a site's index.json), which write_index would replace.
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT \
            or not isinstance(options := index.get("options", {}), dict):
        raise _damaged(f"{path} is not a cache index")
    if not _good_options({**options, **{k: index[k] for k in ("world_size", *_FINGERPRINTS) if k in index}}):
        raise _damaged(f"{path} records options of the wrong type")
    return index


def _recover(out: Path, rank: int, shapes: RowShapes) -> tuple[set[tuple[str, bool]], set[str], int]:
    # Drop this rank's damaged shards and delete those that no manifest line names; return the rows (source,
    # flip) done, the ids that failed and the next shard number.
    # Every line checked (shard names, shards present) before a file is deleted.
    manifest = out / f"manifest-rank{rank:03d}.jsonl"
    records = read_manifest(manifest, shards=True)
    _check_indexed(out, rank, {rec["shard"] for rec in records if rec.get("shard")})
    records = drop_damaged(out, manifest, records, shapes)
    named = {rec["shard"] for rec in records if rec.get("shard")}
    for p in out.glob(f"rank{rank:03d}-*.safetensors"):
        if p.name not in named:
            log.info("removing %s, written but not recorded before an interruption", p.name)
            p.unlink()
    index_tmp = list(out.glob(".index.json.*.tmp")) if rank == 0 else []  # rank 0 writes the index
    for p in [*out.glob(f".rank{rank:03d}-*.tmp"), *out.glob(f".{manifest.name}.*.tmp"), *index_tmp]:
        p.unlink()
    rows = {(m["source"], m["flip"]) for rec in records for m in rec.get("rows", [])}
    failed = {i for rec in records for i in rec.get("failed", [])}
    # After the highest number recorded, dropped shards' too: a reader holding the old index.json would take a new
    # shard under a dropped one's name for its rows. Numbers need not be contiguous (earlier versions skipped one).
    used = named | {rec["dropped"] for rec in records if rec.get("dropped")}
    next_no = 1 + max((int(Path(n).stem.rsplit("-", 1)[1]) for n in used), default=-1)
    return rows, failed, next_no


def _add_other_ranks(out: Path, rank: int, rows_done: set[tuple[str, bool]], failed: set[str]) -> None:
    # Shares are by position, so an image added to the data or removed from it moves later ones to another rank:
    # what any rank recorded is done (else it is encoded twice, and the index refuses the duplicate for good).
    # Their shards are that rank's to check; one it drops as damaged is redone by the next run.
    for p in sorted(out.glob("manifest-rank*.jsonl")):
        if p.name != f"manifest-rank{rank:03d}.jsonl":
            records = read_manifest(p)
            rows_done.update((m["source"], m["flip"]) for rec in records for m in rec.get("rows", []))
            failed.update(i for rec in records for i in rec.get("failed", []))


def _check_indexed(out: Path, rank: int, named: set[str]) -> None:
    # A shard no manifest line names is one an interruption left unrecorded, and is deleted; but index.json lists
    # only shards that had their lines, so one it lists lost its manifest (a copy made without them), not its run.
    items = (_read_index(out / "index.json") or {}).get("items")
    listed = {it.get("shard") for it in items if isinstance(it, dict)} if isinstance(items, list) else set()
    lost = sorted(p.name for p in out.glob(f"rank{rank:03d}-*.safetensors") if p.name in listed - named)
    if lost:
        raise KlvaeError(f"{out}/index.json lists {len(lost)} shard(s), {lost[0]} among them, that no "
                         f"manifest-rank{rank:03d}.jsonl line records (a copy of the cache without its manifests?): "
                         "it is readable as it is; to add to it, copy its manifest-rank*.jsonl files here, or cache "
                         "into another folder")


def _todo(mine: list[str], rows_done: set[tuple[str, bool]], failed: set[str],
          flip: bool) -> list[tuple[str, list[bool]]]:
    # Each image with the flips of its rows that no manifest line records yet.
    wanted = [False, True] if flip else [False]
    todo = [(i, [f for f in wanted if (i, f) not in rows_done]) for i in mine if i not in failed]
    return [(i, flips) for i, flips in todo if flips]


def _encode_rows(vae: AutoencoderKL, xs: list[Tensor], metas: list[dict], opts: CacheOptions,
                 dtype: torch.dtype) -> list[dict[str, Tensor]]:
    moments = inference.encode_moments(vae, torch.stack(xs), dtype).cpu()
    check_finite_moments(moments, [m["source"] + (" (flipped)" if m["flip"] else "") for m in metas])
    c = vae.config.latent_channels
    mean, logvar = moments[:, :c], moments[:, c:]
    if opts.store == "moments":
        return [{"mean": m, "logvar": lv} for m, lv in zip(mean, logvar, strict=True)]
    if opts.store == "sample":
        from klvae.posterior import DiagonalGaussian

        z = torch.cat([DiagonalGaussian(m[None]).sample(_row_generator(opts.seed, meta))
                       for m, meta in zip(moments, metas, strict=True)])
    else:
        z = mean
    if opts.store == "scaled":
        z = vae.scale_latents(z)
    return [{"latent": zi} for zi in z]


def check_finite_moments(moments: Tensor, names: list[str]) -> None:
    """KlvaeError naming the first image whose moments [B, 2C, h, w] (mean and logvar) are not all finite."""
    # Inference already reruns a half-precision overflow in fp32: what is still inf or NaN comes from the model,
    # and stored (or averaged into factors) it would only turn up later, as a grey picture or a NaN loss.
    bad = (~torch.isfinite(moments.flatten(1))).any(1).nonzero()
    if len(bad):
        # Weights loaded from files are finite (the loader refuses others): overflow from huge ones, or a model
        # changed in memory.
        raise KlvaeError(f"the model produced non-finite latents for {names[int(bad[0])]}: huge, inf or NaN "
                         "weights?")


def _row_generator(seed: int, meta: dict) -> torch.Generator:
    # Noise from (seed, image, flip) alone: a row's sample is the same whatever the batch, rank, world size or
    # resume that encodes it, so an interrupted cache ends as an uninterrupted one would.
    return keyed_generator(seed, meta["source"], int(meta["flip"]))


def cache_rank(vae: AutoencoderKL, spec: str | os.PathLike[str] | ItemSource, out: str | Path, opts: CacheOptions,
               dtype: torch.dtype, rank: int = 0, world: int = 1,
               fingerprints: dict[str, str] | None = None, locked: bool = False) -> dict[str, int]:
    """Encode this rank's share of the data that is not done yet; returns image counts (encoded, failed,
    done_before, failed_before). Everything is checked before `out` is made or touched. `fingerprints`:
    `model_fingerprints(vae, opts.store)`, computed here when not given. `locked`: the caller's rank 0 holds
    `out`'s folder lock for the whole job (build_cache does); otherwise rank 0 holds it while it runs."""
    out = Path(out)
    source = spec if isinstance(spec, ItemSource) else open_source(str(spec))
    if not source.ids:
        raise KlvaeError(f"no images in {'the data' if isinstance(spec, ItemSource) else spec}")
    check_whole_latents(vae, opts.resolution)
    fingerprints = fingerprints or {**model_fingerprints(vae, opts.store), **source.fingerprints()}
    check_resume(out, opts, world, fingerprints)
    made = make_folders(out)
    try:
        with folder_lock(out, "klvae cache") if rank == 0 and not locked else contextlib.nullcontext():
            return _cache_todo(vae, source, out, opts, dtype, rank, world, fingerprints)
    except BaseException:
        remove_made_folders(made)  # a failed start leaves no empty folders (rmdir fails on anything in one)
        raise


def _cache_todo(vae: AutoencoderKL, source: ItemSource, out: Path, opts: CacheOptions, dtype: torch.dtype,
                rank: int, world: int, fingerprints: dict[str, str]) -> dict[str, int]:
    mine = [i for n, i in enumerate(source.ids) if n % world == rank]
    rows_done, failed, shard_no = _recover(out, rank, row_shapes(vae.config, opts.store))
    _add_other_ranks(out, rank, rows_done, failed)
    todo = _todo(mine, rows_done, failed, opts.flip)
    failed_before = sum(i in failed for i in mine)  # recorded unreadable by an earlier run: not retried
    counts = {"encoded": 0, "failed": 0, "done_before": len(mine) - len(todo) - failed_before,
              "failed_before": failed_before, "enlarged": 0}
    log.info("rank %d: %d images, %d done before, %d unreadable before, %d to encode", rank, len(mine),
             counts["done_before"], failed_before, len(todo))
    loader = DataLoader(_Prepared(source, todo, opts), batch_size=opts.batch_size,
                        num_workers=usable_workers(opts.num_workers),
                        collate_fn=_collate, worker_init_fn=quiet_on_sigterm)
    writer = _ShardWriter(out, rank, shard_no, opts.shard_size, row_options(opts, world, fingerprints))
    pending: dict[tuple[int, int], list[tuple[Tensor, dict]]] = {}

    def encode_bucket(key: tuple[int, int]) -> None:
        rows = pending.pop(key)
        metas = [m for _, m in rows]
        writer.add(zip(_encode_rows(vae, [x for x, _ in rows], metas, opts, dtype), metas, strict=True))

    batches = progress_bar(_batches(loader), total=len(loader), desc=f"cache rank {rank}", unit="batch",
                           disable=not todo)
    for batch in batches:
        for item_id, rows in batch:
            if isinstance(rows, str):
                log.warning("skipping %s", rows)
                writer.failed.append(item_id)
                counts["failed"] += 1
                continue
            counts["encoded"] += 1
            (h, w), (bh, bw) = rows[0][1]["size"], rows[0][1]["bucket"]
            counts["enlarged"] += bh > h or bw > w  # scaled up to cover its crop
            for x, meta in rows:
                key = tuple(meta["bucket"])
                pending.setdefault(key, []).append((x, meta))
                if len(pending[key]) >= opts.batch_size:
                    encode_bucket(key)
    for key in list(pending):
        encode_bucket(key)
    writer.flush()
    return counts


def _batches(loader: DataLoader) -> Iterator[list[Any]]:
    # A worker's error arrives with the worker's whole traceback in its message; the CLI wants one line. (Image
    # problems never get here: `_Prepared` turns them into skipped items.)
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            if len(lines) > 1:
                raise RuntimeError(f"in an image-loading worker: {lines[-1]}") from e
            raise
        yield batch


class _ShardWriter:
    """Collects encoded rows; writes a shard when full, then records it with one manifest line."""

    def __init__(self, out: Path, rank: int, next_no: int, size: int, options: dict[str, Any]) -> None:
        self.out, self.rank, self.no, self.size, self.options = out, rank, next_no, size, options
        self.manifest = out / f"manifest-rank{rank:03d}.jsonl"
        self.rows: list[tuple[dict[str, Tensor], dict]] = []
        self.failed: list[str] = []

    def add(self, rows: Iterator[tuple[dict[str, Tensor], dict]]) -> None:
        """Queue rows; every full shard is written at once."""
        for row in rows:
            self.rows.append(row)
            if len(self.rows) >= self.size:
                self.flush()

    def flush(self) -> None:
        """Write the queued rows (if any) as a shard and record it, with the failures seen so far."""
        if not self.rows and not self.failed:
            return
        name = f"rank{self.rank:03d}-{self.no:05d}.safetensors" if self.rows else None
        written = _write_shard(self.rows, self.out, name) if name else {"shard": None, "rows": []}
        _append_line(self.manifest, {**written, "failed": self.failed, "options": self.options})
        self.no += 1 if name else 0
        self.rows, self.failed = [], []


def write_index(vae: AutoencoderKL, model: str, out: str | Path, opts: CacheOptions, world: int,
                fingerprints: dict[str, str] | None = None) -> Path:
    """Merge every rank's manifest into index.json (atomically); checks that every shard holds its rows (by its
    header), that no image appears twice, and that there is a row at all (KlvaeError: none of the images could
    be read)."""
    out, shapes = Path(out), row_shapes(vae.config, opts.store)
    rows, failed, shards = [], [], {}
    for p in sorted(out.glob("manifest-rank*.jsonl")):
        for rec in read_manifest(p, shards=True):
            if rec.get("shard"):  # its entry: the SHA-256 its line records (none from an older klvae)
                shards[rec["shard"]] = {k: rec[k] for k in ("sha256",) if k in rec}
            # Checked by each rank's resume, but damaged since (or by a run of another version): never indexed.
            if rec.get("shard") and (why := shard_problem(out / rec["shard"], rec["rows"], shapes)):
                raise KlvaeError(f"{out / rec['shard']} is damaged ({why}): run the same `klvae cache` (or "
                                 "build_cache call) again, which encodes its rows anew")
            rows += rec.get("rows", [])
            failed += rec.get("failed", [])
    seen: set[tuple[str, bool]] = set()
    for r in rows:
        key = (r["source"], r["flip"])
        if key in seen:
            raise KlvaeError(f"{r['source']} appears twice in the cache manifests")
        seen.add(key)
    if not rows:
        _clear_failed_run(out)
        raise KlvaeError(f"nothing cached in {out}: {none_read(len(set(failed)))}")
    index = {
        "format": INDEX_FORMAT, "model": model, **vae.config.latent_norm.to_dict(),
        **(fingerprints or model_fingerprints(vae, opts.store)),
        # The VAE's latent channels; the tensors each row holds are "stored" (FLUX.2's scaled rows are patched).
        "latent_channels": vae.config.latent_channels, "stored": stored_tensors(vae.config, opts.store),
        "options": asdict(opts), "world_size": world, "items": rows, "shards": shards,
        "failed": sorted(set(failed) - {r["source"] for r in rows}),
    }
    return atomic_write_text(out / "index.json", json.dumps(index))


def _clear_failed_run(out: Path) -> None:
    # No rank cached a row: the manifests record failures alone, which a rerun would take as done and never retry
    # once the images are mended, and the folder would hold nothing else. So no trace is left.
    for p in out.glob("manifest-rank*.jsonl"):
        p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: the user's files, or the data of another run
        out.rmdir()
