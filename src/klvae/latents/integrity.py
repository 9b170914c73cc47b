"""Whether a cache's recorded shards still hold their rows, and what a resume does with one that does not.

A shard is written whole and renamed into place before its manifest line is appended, but a file can still be
cut short or damaged later (a full disk when copying the cache, a bad sector, a stray `truncate`). A resume
checks the header of each shard its manifest names (cheaply: the tensor data is not read); a damaged one is
dropped and its rows are encoded again, exactly once:

1. index.json is removed: it names the shard, and the cache is incomplete until the resume ends;
2. the manifest is rewritten atomically with the shard's line kept as a line of no shard (its failures and
   options still count): from now on no line names the shard, so its rows are to do;
3. the file is deleted (a kill before this leaves a shard no line names, which every resume deletes).

Damage inside the tensor data keeps the header whole: each shard's SHA-256 is recorded when it is written
(`save_shard`), and `klvae cache --verify` (latents/verify.py) reads every shard to compare it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from klvae.atomic import atomic_save_file, atomic_write_text
from klvae.checksum import file_sha256
from klvae.errors import KlvaeError, first_line
from klvae.model.config import AutoencoderKLConfig

log = logging.getLogger(__name__)

RowShapes = Callable[[Sequence[int]], dict[str, tuple[int, ...]]]



def stored_tensors(config: AutoencoderKLConfig, store: str) -> dict[str, Any]:
    """What each row of a cache of this model and store holds, as index.json records it ("stored"): float32
    tensors named `tensors`, each [channels, h / downsample_factor, w / downsample_factor] for a bucket of h x w
    pixels. Scaled rows of a model with latent patches (FLUX.2) are patched: 4x the channels at half the size."""
    c, p = config.latent_channels, config.latent_patch_size
    patched = store == "scaled"  # scaling patchifies the latent; the other stores keep the VAE's
    return {"tensors": ["mean", "logvar"] if store == "moments" else ["latent"],
            "channels": c * p * p if patched else c,
            "downsample_factor": config.downsample_factor * (p if patched else 1)}


def row_shapes(config: AutoencoderKLConfig, store: str) -> RowShapes:
    """For a bucket (height, width in pixels), the tensors a row of this model and store holds, with shapes."""
    stored, m = stored_tensors(config, store), config.size_multiple
    cells = m // stored["downsample_factor"]  # latent cells per padding step: the patch side, or 1 when patched

    def shapes(bucket: Sequence[int]) -> dict[str, tuple[int, ...]]:
        h, w = (-(-side // m) * cells for side in bucket)  # the encoder pads an image to whole patches
        return {name: (stored["channels"], h, w) for name in stored["tensors"]}

    return shapes


def shard_problem(path: Path, rows: list[dict[str, Any]], shapes: RowShapes) -> str | None:
    """Why the shard at `path` does not hold `rows` (a manifest line's) as recorded, in a few words; None when
    it does. Reads the header alone; safetensors checks there that the file is exactly as long as it says."""
    found = read_header(path)
    return found if isinstance(found, str) else rows_problem(found, rows, shapes)


def read_header(path: Path) -> dict[str, tuple[int, ...]] | str:
    """The tensors a shard's header lists, with shapes; or why it cannot be read, in a few words. KlvaeError where
    its permissions forbid reading it: that is no damage, and dropping the shard would delete a whole file."""
    try:
        path.open("rb").close()  # safetensors reports any failure to open, permissions too, as "No such file"
    except PermissionError as e:
        raise KlvaeError(f"cannot read {path}: {e.strerror}; fix its permissions (nothing was changed)") from None
    except OSError as e:  # a folder, say
        return e.strerror or first_line(e)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = f.keys()  # safe_open is no mapping
            return {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except (SafetensorError, OSError) as e:
        return first_line(e)


def rows_problem(found: dict[str, tuple[int, ...]], rows: list[dict[str, Any]], shapes: RowShapes) -> str | None:
    """Why a header's tensors (`read_header`) are not `rows` as recorded, in a few words; None when they are."""
    for r in rows:
        row, bucket = r.get("row"), r.get("bucket")
        if not (isinstance(row, int) and isinstance(bucket, list) and len(bucket) == 2
                and all(isinstance(v, int) and v > 0 for v in bucket)):
            # .get: an index.json that `klvae cache --verify` reads alone may give a row no source either.
            return f"its manifest line gives {r.get('source', 'a row')} no row number or bucket"
        for field, shape in shapes(bucket).items():
            key = f"{row:06d}.{field}"
            if key not in found:
                return f"it has no tensor {key}"
            if found[key] != shape:
                return f"its {key} is {list(found[key])}, not {list(shape)}"
    return None


def save_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """safetensors' save_file, atomically; returns the SHA-256 (hex) of the file written."""
    atomic_save_file(path, tensors, metadata)
    # Read back at once, from the page cache, before the manifest line that records the shard (a kill in between
    # leaves a shard no line names, which a resume deletes): serialising to memory to hash on the way would hold
    # a second copy of the whole shard, and atomic.py writes the tensors straight to the file.
    return file_sha256(path)


def drop_damaged(out: Path, manifest: Path, records: list[dict[str, Any]], shapes: RowShapes) -> list[dict]:
    """`records` (the lines of `manifest`, read with their shards present) with each damaged shard dropped, as
    the module's docstring says: a warning names it, and its rows are no longer recorded as done."""
    bad = {}
    for rec in records:
        if rec.get("shard") and (why := shard_problem(out / rec["shard"], rec["rows"], shapes)):
            bad[rec["shard"]] = why
            log.warning("%s is damaged (%s): its %d row(s) will be encoded again", out / rec["shard"], why,
                        len(rec["rows"]))
    return drop_shards(out, manifest, records, bad) if bad else records


def drop_shards(out: Path, manifest: Path, records: list[dict[str, Any]], bad: dict[str, str]) -> list[dict]:
    """`records` (the lines of `manifest`) with the shards named in `bad` dropped, in the module docstring's
    order, so that the next resume encodes their rows again; a shard already gone is no error."""
    # The dropped line's SHA-256 goes with its shard: it would describe no file.
    kept = [{**{k: v for k, v in rec.items() if k != "sha256"}, "shard": None, "rows": [], "dropped": rec["shard"]}
            if rec.get("shard") in bad else rec for rec in records]
    (out / "index.json").unlink(missing_ok=True)
    atomic_write_text(manifest, "".join(json.dumps(rec) + "\n" for rec in kept))
    for name in bad:
        (out / name).unlink(missing_ok=True)
    return kept
