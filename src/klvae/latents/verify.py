"""`klvae cache --verify`: every shard of a cache read whole and compared with the SHA-256 recorded when it was
written, and its header checked against the rows it is said to hold; `repair_cache` drops the damaged ones.

A resume checks headers alone (reading every shard on every resume would be slow for a large cache), so damage
inside the tensor data (bit rot, a bad copy that keeps the size) is found only here. A damaged shard is not
repaired in place: `repair_cache` drops it from its manifest as a resume drops one whose header is damaged
(latents/integrity.py), and the next `klvae cache` run encodes its rows again. Deleting the file by hand is no
repair: a resume refuses a cache whose manifest names a shard that is gone, as a loss it did not cause.

The shards and their hashes come from the manifests, and index.json's too (a shard it lists is read, whether or
not a manifest records it); without manifests (a copy of index.json and the shards alone), from index.json.
Shards written by an older klvae have no recorded hash: their headers alone are checked. A cache whose index.json
is missing, or lists fewer shards than the manifests (a run under way, or stopped), has the shards recorded so far
verified, and its report says it is unfinished.
No model is needed: the shapes a row's tensors must have are those index.json records ("stored", written from the
model's config), or in a cache without them (unfinished, or an older klvae's) those that the cache's hash-verified
shards (or, with none, most shards) show, scaled to the row's bucket.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from klvae.atomic import folder_lock
from klvae.checks import is_integer
from klvae.checksum import file_sha256
from klvae.errors import KlvaeError
from klvae.latents.cache import parse_index, read_manifest
from klvae.latents.integrity import RowShapes, drop_shards, read_header, rows_problem
from klvae.progress import progress_bar

log = logging.getLogger(__name__)

_NAMES_SHOWN = 5  # damaged shards a summary names; the log names every one

Layout = tuple[tuple[str, ...], int, Fraction, Fraction]  # a row's fields, channels, bucket/latent side ratios


@dataclass(frozen=True)
class ShardCheck:
    """One shard's verdict: `problem` is None for a whole shard; `hashed` says whether a recorded SHA-256 was
    compared (False: written by an older klvae, its header alone checked)."""

    name: str
    rows: int
    problem: str | None
    hashed: bool


@dataclass
class CacheReport:
    """What `verify_cache` found in the cache at `root`, shard by shard; `source` is where the shards and their
    hashes were read from ("manifests" or "index.json"); `unfinished` says why the manifests' shards are not all
    in index.json yet (a `klvae cache` run under way or stopped), None when they are."""

    root: Path
    source: str
    shards: list[ShardCheck]
    unfinished: str | None = None

    @property
    def damaged(self) -> list[ShardCheck]:
        """The shards that are missing, cut, or hold other bytes than were written."""
        return [c for c in self.shards if c.problem]

    @property
    def unverified(self) -> list[ShardCheck]:
        """The whole-looking shards with no recorded hash (written by an older klvae): header checked only."""
        return [c for c in self.shards if not c.problem and not c.hashed]

    @property
    def ok(self) -> bool:
        """True when no shard is damaged."""
        return not self.damaged

    def summary(self) -> str:
        """One line: how many shards are whole, unverified and damaged (naming the first few damaged)."""
        whole = len(self.shards) - len(self.damaged) - len(self.unverified)
        parts = [f"{self.root}: {whole} shard{'s' if whole != 1 else ''} ok"]
        if self.unverified:
            parts.append(f"{len(self.unverified)} unverified (written by an older klvae: header checked only)")
        if self.damaged:
            names = [c.name for c in self.damaged[:_NAMES_SHOWN]]
            more = len(self.damaged) - len(names)
            parts.append(f"{len(self.damaged)} damaged: {', '.join(names)}{f' and {more} more' if more else ''}")
        return ", ".join(parts) + (f"; unfinished: {self.unfinished}" if self.unfinished else "")


def verify_cache(root: str | Path) -> CacheReport:
    """Read every shard of the cache at `root` whole, compare its SHA-256 with the recorded one and check its
    header against its rows; KlvaeError when `root` is not a klvae cache (or its records, or a shard's
    permissions, forbid reading them)."""
    root = Path(root)
    if not root.is_dir():
        raise KlvaeError(f"{root} is not a klvae cache: {'no such folder' if not root.exists() else 'not a folder'}")
    index = _read_index(root / "index.json")
    shards, source = _recorded_shards(root, index)
    if source == "manifests":
        unfinished = _unfinished(root, shards, index)
        # A shard index.json lists, and so LatentDataset reads, is checked even where no manifest line records it.
        shards = {**_index_shards(index), **shards}
    else:
        unfinished = None
    sizes = {name: (root / name).stat().st_size for name in shards if (root / name).is_file()}
    headers: dict[str, dict[str, tuple[int, ...]]] = {}  # of the shards whole so far
    checks: dict[str, ShardCheck] = {}
    with progress_bar(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024,
                      desc="verify cache", disable=not sizes) as bar:
        for name, rec in shards.items():
            checks[name], found = _check_shard(root, name, rec, sizes.get(name), bar)
            if found is not None:
                headers[name] = found
    shapes = _layout_shapes(_index_layout(index) or _common_layout(shards, headers, checks))
    for name, found in headers.items():
        if why := rows_problem(found, shards[name]["rows"], shapes):
            checks[name] = ShardCheck(name, checks[name].rows, why, checks[name].hashed)
    report = CacheReport(root, source, list(checks.values()), unfinished)
    for c in report.damaged:
        log.warning("%s is damaged (%s)", root / c.name, c.problem)
    if report.unverified:
        log.info("%d shard(s) have no recorded SHA-256 (written by an older klvae): their headers alone were "
                 "checked", len(report.unverified))
    return report


def repair_cache(root: str | Path, report: CacheReport | None = None) -> list[str]:
    """Drop the shards that `report` (by default a fresh `verify_cache`) found damaged from their manifests, as
    a resume drops one whose header is damaged, so that the next `klvae cache` run on the folder encodes their
    rows again; returns their names. Refused (KlvaeError) while a `klvae cache` run writes to the folder: a line it
    appended while a manifest is rewritten would be lost."""
    root = Path(root)
    if not root.is_dir():
        return _repair(root, report or verify_cache(root))  # verify_cache names what is wrong with it
    with folder_lock(root, "klvae cache"):
        return _repair(root, report or verify_cache(root))


def _repair(root: Path, report: CacheReport) -> list[str]:
    if report.damaged and report.source != "manifests":
        raise KlvaeError(f"{root} has no manifests (index.json and shards alone): a damaged shard can only be "
                         "encoded again where the cache was made, or with its manifest-rank*.jsonl files copied too")
    bad = {c.name: c.problem or "" for c in report.damaged}
    # Checked before anything is dropped: the resume after a repair would fail to delete a folder in its place.
    if odd := next((root / n for n in bad if (root / n).exists() and not (root / n).is_file()), None):
        raise KlvaeError(f"{odd} is not a file: move it aside, then repair again")
    for manifest in sorted(root.glob("manifest-rank*.jsonl")):
        records = read_manifest(manifest)
        if mine := {rec["shard"]: bad[rec["shard"]] for rec in records if rec.get("shard") in bad}:
            drop_shards(root, manifest, records, mine)
            for name, why in mine.items():
                log.warning("dropped %s (%s): the next `klvae cache` run encodes its rows again", root / name, why)
    return sorted(bad)


def _check_shard(root: Path, name: str, rec: dict[str, Any], size: int | None,
                 bar: Any) -> tuple[ShardCheck, dict[str, tuple[int, ...]] | None]:
    # The shard's verdict from its header and its bytes, and its header where both are whole.
    def verdict(problem: str | None) -> ShardCheck:
        return ShardCheck(name, len(rec["rows"]), problem, rec["sha256"] is not None)

    path = root / name
    if size is None:
        return verdict("it is not a file" if path.exists() else "it is missing"), None
    found = read_header(path)
    if isinstance(found, str):  # cut short, say: what safetensors says tells more than a hash that differs
        bar.update(size)
        return verdict(found), None
    problem = _hash_problem(path, rec["sha256"], bar)
    return verdict(problem), None if problem else found


def _hash_problem(path: Path, recorded: str | None, bar: Any) -> str | None:
    # Every byte is read, with or without a recorded hash: a read error (a bad sector) is found either way.
    try:
        digest = file_sha256(path, bar.update)
    except OSError as e:
        return f"it cannot be read: {e.strerror or e}"
    if recorded is not None and digest != recorded.lower():
        return f"its bytes differ from those written (SHA-256 {digest[:12]}..., recorded {recorded[:12]}...)"
    return None


def _recorded_shards(root: Path, index: dict[str, Any] | None) -> tuple[dict[str, dict[str, Any]], str]:
    # Each shard's rows and recorded SHA-256 (None: none recorded), and where they were read from.
    shards: dict[str, dict[str, Any]] = {}
    if manifests := sorted(root.glob("manifest-rank*.jsonl")):
        for p in manifests:
            for rec in read_manifest(p):
                if rec.get("shard"):
                    shards[rec["shard"]] = {"rows": rec["rows"], "sha256": rec.get("sha256")}
        return shards, "manifests"
    if index is None:
        path = root / "index.json"
        raise KlvaeError(f"{path} is not a klvae latent cache index" if path.is_file() else
                         f"{root} is not a klvae cache: it has no manifest-rank*.jsonl or index.json")
    return _index_shards(index), "index.json"


def _index_shards(index: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    # The shards index.json lists, with their rows and the SHA-256 it records (None: none).
    shards: dict[str, dict[str, Any]] = {}
    entries = index.get("shards", {}) if index is not None else {}
    for item in index["items"] if index is not None else []:
        entry = shards.setdefault(item["shard"], {"rows": [], "sha256": None})
        entry["rows"].append(item)
        if isinstance(e := entries.get(item["shard"]) if isinstance(entries, dict) else None, dict):
            entry["sha256"] = e.get("sha256") if isinstance(e.get("sha256"), str) else None
    return shards


def _unfinished(root: Path, shards: dict[str, dict[str, Any]], index: dict[str, Any] | None) -> str | None:
    # Why index.json, which LatentDataset reads, does not list every shard the manifests record; None when it does.
    if index is None:
        why = "its index.json is no klvae cache index" if (root / "index.json").is_file() else "no index.json yet"
    else:
        listed = {item["shard"] for item in index["items"]}
        if set(shards) <= listed:
            return None
        why = f"index.json lists {len(set(shards) & listed)} of the {len(shards)} shards the manifests record"
    return f"{why} (a `klvae cache` run is under way or was stopped: the same command finishes it)"


def _read_index(path: Path) -> dict[str, Any] | None:
    # index.json as LatentDataset reads it; None where there is none or it is no cache index.
    index = parse_index(path) if path.is_file() else None
    ok = index is not None and all(isinstance(it, dict) and isinstance(it.get("shard"), str) for it in index["items"])
    return index if ok else None


def _index_layout(index: dict[str, Any] | None) -> Layout | None:
    # The row layout index.json records ("stored"); None in an index without it (an older klvae's) or none.
    stored = index.get("stored") if index is not None else None
    if not isinstance(stored, dict):
        return None
    names, channels, factor = stored.get("tensors"), stored.get("channels"), stored.get("downsample_factor")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and is_integer(channels) and channels > 0 and is_integer(factor) and factor > 0):
        return None
    return tuple(sorted(names)), channels, Fraction(factor), Fraction(factor)


def _common_layout(shards: dict[str, dict[str, Any]], headers: dict[str, dict[str, tuple[int, ...]]],
                   checks: dict[str, ShardCheck]) -> Layout | None:
    # The layout of the first row of each readable shard; the one most shards whose hash matched show, or with
    # none such (an older klvae's cache), most shards: a shard cut or swapped is rarely the majority.
    votes = {name: lay for name, found in headers.items() if (lay := _row_layout(found, shards[name]["rows"]))}
    trusted = [lay for name, lay in votes.items() if checks[name].hashed and not checks[name].problem]
    common = Counter(trusted or votes.values()).most_common(1)
    return common[0][0] if common else None


def _row_layout(found: dict[str, tuple[int, ...]], rows: Sequence[dict[str, Any]]) -> Layout | None:
    # The fields, channels and side ratios of a shard's first row, as its header shows them.
    row, bucket = (rows[0].get("row"), rows[0].get("bucket")) if rows else (None, None)
    if not (isinstance(row, int) and isinstance(bucket, list) and len(bucket) == 2
            and all(isinstance(v, int) and v > 0 for v in bucket)):
        return None
    prefix = f"{row:06d}."
    fields = tuple(sorted(k[len(prefix):] for k in found if k.startswith(prefix)))
    shape = found.get(prefix + fields[0]) if fields else None
    if not shape or len(shape) != 3 or not all(shape):
        return None
    return fields, shape[0], Fraction(bucket[0], shape[1]), Fraction(bucket[1], shape[2])


def _layout_shapes(layout: Layout | None) -> RowShapes:
    # A bucket's side over the ratio, rounded up as the encoder pads: the same for every bucket of a cache, since
    # every bucket side is a multiple of the model's size multiple.
    fields, channels, rh, rw = layout or ((), 0, Fraction(1), Fraction(1))

    def shapes(bucket: Sequence[int]) -> dict[str, tuple[int, ...]]:
        return {f: (channels, math.ceil(bucket[0] / rh), math.ceil(bucket[1] / rw)) for f in fields}

    return shapes
