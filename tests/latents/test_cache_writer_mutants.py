"""Pins what a mutation audit of latents/cache.py and latents/dataset.py found untested: manifest lines naming a
shard of another form (four digits, another rank's, a path) or a failure that is no string are a damaged cache; an
empty manifest (a kill before its first line) is resumed; a run that reads no image leaves no manifest and no folder
it made (a user's file and folder stay); a failed start keeps the empty folder the user made; an empty source is
refused before the folder is made; a non-finite flipped row is named "(flipped)"; index.json lists its unreadable
images sorted and records the world size; a resume of a cache whose manifest lines carry no options (an older
klvae's) is checked against the index's world size and encoder; the reader refuses an index of another format and
returns each row's bucket; the bucket sampler shuffles within a bucket."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import klvae
from helpers import SMALL_CACHE, cache_vae, copy_cache, noise_folder, perturbed_vae, read_index, small_cache
from klvae import inference
from klvae.errors import KlvaeError, LatentsError
from klvae.latents import build_cache, cache
from klvae.latents.cache import read_manifest
from klvae.latents.dataset import BucketBatchSampler, LatentDataset
from klvae.latents.sources import ItemSource


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return cache_vae()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, vae: klvae.AutoencoderKL) -> Path:
    """A finished moments cache of two 32x32 images in one shard (tests change copies of it)."""
    return small_cache(tmp_path_factory.mktemp("finished"), 2, vae)


# ---- manifest records --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shard", "failed"), [
    ("rank000-0001.safetensors", []),  # four digits: no writer's name
    ("rank001-00000.safetensors", []),  # another rank's shard in rank 0's manifest
    ("../rank000-00000.safetensors", []),
    ("rank000-00000.safetensors", [5]),  # a failure that is no image id
], ids=["four-digits", "other-rank", "path", "failed-int"])
def test_a_line_naming_a_shard_of_another_form_or_a_non_string_failure_is_damaged(
        tmp_path: Path, shard: str, failed: list) -> None:
    path = tmp_path / "manifest-rank000.jsonl"
    row = {"source": "a.png", "flip": False, "shard": shard, "row": 0}
    path.write_text(json.dumps({"shard": shard, "rows": [row], "failed": failed}) + "\n")
    with pytest.raises(KlvaeError, match=r"line 1 is not a cache manifest record: the cache is damaged"):
        read_manifest(path)


def test_an_empty_manifest_left_by_a_kill_is_resumed(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    # Killed after the manifest was created, before its first line was written: an empty file, not a torn line.
    data, out = noise_folder(tmp_path / "data", 2, hw=(32, 32)), tmp_path / "out"
    out.mkdir()
    (out / "manifest-rank000.jsonl").write_bytes(b"")
    summary = build_cache(vae, data, out, **SMALL_CACHE)
    assert (summary.encoded, summary.rows) == (2, 2)
    text = (out / "manifest-rank000.jsonl").read_text()
    assert not text.startswith("\n") and len(read_manifest(out / "manifest-rank000.jsonl")) == 1


# ---- runs that fail ----------------------------------------------------------------------------------------------


def test_a_run_that_reads_no_image_leaves_no_trace(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(KlvaeError, match=r"nothing cached in .*: the only image could not be read"):
        build_cache(vae, data, out, **SMALL_CACHE)
    assert not out.exists()  # no manifest of failures alone, which a rerun would take as done
    # A folder holding the user's own file: the manifests go, the folder and the file stay.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KlvaeError, match="nothing cached"):
        build_cache(vae, data, out, **SMALL_CACHE)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _nan_moments(monkeypatch: pytest.MonkeyPatch, row: int) -> None:
    real = inference.encode_moments

    def nan_row(*args: object, **kwargs: object) -> torch.Tensor:
        moments = real(*args, **kwargs).clone()
        moments[row] = float("nan")
        return moments

    monkeypatch.setattr(inference, "encode_moments", nan_row)


def test_a_failed_start_keeps_an_empty_folder_the_user_made(tmp_path: Path, vae: klvae.AutoencoderKL,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = noise_folder(tmp_path / "data", 1, hw=(32, 32))
    _nan_moments(monkeypatch, 0)
    made = tmp_path / "made"
    with pytest.raises(KlvaeError, match=r"non-finite latents for img0\.png"):
        build_cache(vae, data, made, **SMALL_CACHE)
    assert not made.exists()  # made by the run: removed
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(KlvaeError, match=r"non-finite latents for img0\.png"):
        build_cache(vae, data, mine, **SMALL_CACHE)
    assert mine.is_dir() and not any(mine.iterdir())  # the user's: kept


def test_a_non_finite_flipped_row_is_named_as_flipped(tmp_path: Path, vae: klvae.AutoencoderKL,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # One image with --flip, two rows a batch: [img0.png, img0.png flipped]; only the flipped one is bad.
    data = noise_folder(tmp_path / "data", 1, hw=(32, 32))
    _nan_moments(monkeypatch, 1)
    with pytest.raises(KlvaeError, match=r"non-finite latents for img0\.png \(flipped\): "):
        build_cache(vae, data, tmp_path / "out", flip=True, **SMALL_CACHE)


def test_the_index_lists_its_unreadable_images_sorted(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    data = noise_folder(tmp_path / "data", 1, hw=(32, 32))
    bad = [f"bad{c}.png" for c in "qwertz"]
    for name in bad:
        (data / name).write_bytes(b"not an image")
    summary = build_cache(vae, data, tmp_path / "out", **SMALL_CACHE)
    assert (summary.encoded, summary.failed, summary.rows) == (1, 6, 1)
    assert read_index(tmp_path / "out")["failed"] == sorted(bad)


def test_an_empty_source_is_refused_before_the_folder_is_made(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    out = tmp_path / "out"
    with pytest.raises(KlvaeError, match=r"^no images in the data$"):
        cache.cache_rank(vae, ItemSource(kind="folder", ids=[]), out, cache.CacheOptions(**SMALL_CACHE), torch.float32)
    assert not out.exists()


# ---- what a resume compares --------------------------------------------------------------------------------------


def _strip_manifest_options(out: Path) -> None:
    # The manifest lines of a klvae that recorded no options there: index.json alone holds them.
    path = out / "manifest-rank000.jsonl"
    recs = read_manifest(path)
    path.write_text("".join(json.dumps({k: v for k, v in rec.items() if k != "options"}) + "\n" for rec in recs))


def test_the_index_records_the_world_size_and_a_resume_checks_it(finished: Path, tmp_path: Path,
                                                                 vae: klvae.AutoencoderKL) -> None:
    assert read_index(finished)["world_size"] == 1
    out = copy_cache(finished, tmp_path)
    _strip_manifest_options(out)
    data = finished.parent / "data"
    with pytest.raises(KlvaeError, match="holds a cache made by 1 processes, not 2"):
        cache.cache_rank(vae, str(data), out, cache.CacheOptions(**SMALL_CACHE), torch.float32, rank=0, world=2)


def test_a_resume_of_manifests_without_options_is_checked_against_the_index_encoder(
        finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    _strip_manifest_options(out)
    before = sorted(p.name for p in out.iterdir())
    other = perturbed_vae("tiny", seed=1, scaling_factor=0.5, shift_factor=0.1)
    with pytest.raises(KlvaeError, match="whose encoder differs"):
        build_cache(other, finished.parent / "data", out, **SMALL_CACHE)
    assert sorted(p.name for p in out.iterdir()) == before


# ---- the reader --------------------------------------------------------------------------------------------------


def test_the_reader_refuses_an_index_of_another_format(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    index = read_index(out)
    (out / "index.json").write_text(json.dumps({**index, "format": "someone-else/1"}))
    with pytest.raises(LatentsError, match=r"index\.json is not a klvae latent cache index"):
        LatentDataset(out)


def test_each_item_carries_its_bucket_and_the_index_fields(finished: Path) -> None:
    item = LatentDataset(finished, mode="mean")[1]
    assert {k: item[k] for k in ("source", "size", "crop", "flip", "bucket")} == {
        "source": "img1.png", "size": [32, 32], "crop": [0, 0, 32, 32], "flip": False, "bucket": [32, 32]}
    assert item["latents"].shape == (4, 16, 16)


def test_the_bucket_sampler_shuffles_within_a_bucket() -> None:
    # One bucket of eight rows: shuffled, the batches are not always the runs [0, 1], [2, 3], ... in some order.
    dataset = SimpleNamespace(items=[{"bucket": [32, 32]} for _ in range(8)])
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=0)  # type: ignore[arg-type]
    runs = [[k, k + 1] for k in range(0, 8, 2)]
    seen = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(8))
        seen += [sorted(b) for b in batches]
    assert any(b not in runs for b in seen)
