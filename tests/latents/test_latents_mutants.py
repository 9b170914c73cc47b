"""Details of the latent cache that its other tests leave open: which manifest lines read as records (a row's
shard goes with its rows; its flip is a bool), that each appended line is fsynced; that every unreadable image is
recorded exactly once (also after the last full shard) and not retried, and that one with a row is no failure of
the index; that one non-finite value refuses its image by name; that an image in two manifests is never indexed;
`klvae scale`'s figures against each image's own draw; and that verify takes a hash in capitals and counts its
shards in its summary."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import klvae
from helpers import SMALL_CACHE, cache_vae, copy_cache, noise_folder, perturbed_vae, read_index, small_cache
from klvae import inference
from klvae.errors import KlvaeError
from klvae.images import pil_to_tensor
from klvae.latents import build_cache, cache, verify_cache
from klvae.latents.buckets import resize_crop
from klvae.latents.cache import read_manifest
from klvae.latents.fingerprint import encoder_fingerprint
from klvae.latents.scale import estimate_factors
from klvae.latents.sources import open_source
from klvae.posterior import DiagonalGaussian


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return cache_vae()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, vae: klvae.AutoencoderKL) -> Path:
    """A finished cache of four 32x32 images in two shards (tests change copies of it)."""
    return small_cache(tmp_path_factory.mktemp("finished"), 4, vae)


def _lines(out: Path) -> list[dict]:
    return read_manifest(out / "manifest-rank000.jsonl")


SHARD = "rank000-00000.safetensors"
ROW = {"source": "a.png", "flip": False, "shard": SHARD, "row": 0}


# ---- manifest records --------------------------------------------------------------------------------------------


def _manifest(tmp_path: Path, *records: dict) -> Path:
    path = tmp_path / "manifest-rank000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("record", [
    {"shard": None, "rows": [{**ROW, "shard": None}], "failed": []},  # rows that no shard holds
    {"shard": SHARD, "rows": [], "failed": []},  # a shard said to hold nothing
    {"shard": SHARD, "rows": [{**ROW, "flip": 0}], "failed": []},  # flip must be a bool, not 0
    {"shard": SHARD, "rows": [{**ROW, "flip": "false"}], "failed": []},
], ids=["rows-without-shard", "shard-without-rows", "flip-0", "flip-str"])
def test_a_line_no_writer_makes_is_a_damaged_cache(tmp_path: Path, record: dict) -> None:
    good = {"shard": None, "rows": [], "failed": ["b.png"]}
    assert read_manifest(_manifest(tmp_path, good)) == [good]
    with pytest.raises(KlvaeError, match="line 2 is not a cache manifest record"):
        read_manifest(_manifest(tmp_path, good, record))


def test_each_appended_line_is_on_disk_before_append_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A line appended is the promise that its shard is kept: a crash after it may not lose it.
    path, synced = tmp_path / "manifest-rank000.jsonl", []
    real = os.fsync
    monkeypatch.setattr(cache.os, "fsync", lambda fd: (synced.append(path.read_text()), real(fd)))
    cache._append_line(path, {"shard": None, "rows": [], "failed": ["x.png"]})
    assert synced == ['{"shard": null, "rows": [], "failed": ["x.png"]}\n']


# ---- unreadable images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "failed_by_line"), [
    ("00.png", [["00.png"], []]),  # first in order: recorded with the first shard, and only there
    ("zz.png", [[], [], ["zz.png"]]),  # last, after the last full shard: a line of its own
])
def test_each_unreadable_image_is_recorded_once(tmp_path: Path, vae: klvae.AutoencoderKL, bad: str,
                                                failed_by_line: list[list[str]]) -> None:
    data = noise_folder(tmp_path / "data", 4, hw=(32, 32))
    (data / bad).write_bytes(b"not an image")
    first = build_cache(vae, data, tmp_path / "out", **SMALL_CACHE)
    assert (first.encoded, first.failed, first.rows, first.shards) == (4, 1, 4, 2)
    assert [line["failed"] for line in _lines(tmp_path / "out")] == failed_by_line
    assert read_index(tmp_path / "out")["failed"] == [bad]
    again = build_cache(vae, data, tmp_path / "out", **SMALL_CACHE)  # recorded: not tried again
    assert (again.encoded, again.failed, again.done_before, again.failed_before) == (0, 0, 4, 1)


def test_an_image_with_a_row_is_not_listed_as_failed(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    # A later run found img0 unreadable (say, for its flipped row): it has a row, so it is no failure of the cache.
    data, out = noise_folder(tmp_path / "data", 2, hw=(32, 32)), tmp_path / "out"
    build_cache(vae, data, out, **SMALL_CACHE)
    opts = cache.CacheOptions(**SMALL_CACHE)
    cache._append_line(out / "manifest-rank000.jsonl", {"shard": None, "rows": [], "failed": ["img0.png", "x.png"],
                                                        "options": cache.row_options(opts, 1)})
    index = json.loads(cache.write_index(vae, "m", out, opts, 1).read_text())
    assert index["failed"] == ["x.png"] and {it["source"] for it in index["items"]} == {"img0.png", "img1.png"}


# ---- what the model gives ----------------------------------------------------------------------------------------


def test_one_non_finite_value_refuses_its_image_by_name() -> None:
    moments = torch.zeros(3, 8, 4, 4)
    cache.check_finite_moments(moments, ["a.png", "b.png", "c.png"])  # all finite: no error
    moments[1, 5, 2, 3] = float("inf")  # one value of b's logvar
    moments[2, 0, 0, 0] = float("nan")
    with pytest.raises(KlvaeError, match=r"non-finite latents for b\.png: "):
        cache.check_finite_moments(moments, ["a.png", "b.png", "c.png"])



# ---- scale factors -----------------------------------------------------------------------------------------------


def _expected_factors(vae: klvae.AutoencoderKL, data: Path, limit: int, seed: int) -> tuple[torch.Tensor, int]:
    # Each sampled image alone: its centre crop, its own noise (seed + its position in the data); z of all of them.
    source = open_source(str(data))
    order = torch.randperm(len(source.ids), generator=torch.Generator().manual_seed(seed)).tolist()[:limit]
    zs, skipped = [], 0
    for i in order:
        if source.ids[i] == "bad.png":
            skipped += 1
            continue
        x = pil_to_tensor(resize_crop(source.load(source.ids[i]), (32, 32))[0])[None]
        post = DiagonalGaussian(inference.encode_moments(vae, x, torch.float32))
        zs.append(post.sample(torch.Generator().manual_seed(seed + i)))
    return torch.cat(zs).double(), skipped


def test_scale_factors_are_the_statistics_of_each_sampled_images_own_draw(tmp_path: Path,
                                                                           vae: klvae.AutoencoderKL) -> None:
    data = noise_folder(tmp_path / "data", 6, hw=(40, 48))
    (data / "bad.png").write_bytes(b"not an image")
    z, skipped = _expected_factors(vae, data, limit=5, seed=7)
    assert skipped == 1 and len(z) == 4  # of 7 items, 5 sampled: the bad one and 4 images
    got = estimate_factors(vae, str(data), limit=5, resolution=32, seed=7, batch_size=3)
    assert (got["images"], got["skipped"]) == (4.0, 1.0)
    mean, std = z.mean().item(), z.std(correction=0).item()
    assert got["shift_factor"] == pytest.approx(mean, rel=1e-5, abs=1e-6)
    assert (got["std"], got["scaling_factor"]) == pytest.approx((std, 1 / std), rel=1e-5)
    means, stds = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3), correction=0)
    assert got["latents_mean"] == pytest.approx(means.tolist(), rel=1e-5, abs=1e-6)
    assert got["latents_std"] == pytest.approx(stds.tolist(), rel=1e-5)



# ---- verify ------------------------------------------------------------------------------------------------------


def test_a_recorded_hash_in_capitals_is_the_same_hash(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    manifest = out / "manifest-rank000.jsonl"
    lines = [{**rec, "sha256": rec["sha256"].upper()} if rec.get("shard") else rec for rec in read_manifest(manifest)]
    manifest.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    report = verify_cache(out)
    assert report.ok and [(c.rows, c.hashed) for c in report.shards] == [(2, True), (2, True)]
    assert report.summary() == f"{out}: 2 shards ok"
    shard = out / "rank000-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    assert verify_cache(out).summary() == f"{out}: 1 shard ok, 1 damaged: rank000-00001.safetensors"


def test_an_image_in_two_manifests_is_never_indexed(finished: Path, tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    # Rank 1's manifest (copied in from another run) records rank 0's first two rows again, in a shard of its own.
    out, opts = copy_cache(finished, tmp_path), cache.CacheOptions(**SMALL_CACHE)
    first = _lines(out)[0]
    shutil.copy(out / first["shard"], out / "rank001-00000.safetensors")
    rows = [{**r, "shard": "rank001-00000.safetensors"} for r in first["rows"]]
    cache._append_line(out / "manifest-rank001.jsonl", {**first, "shard": "rank001-00000.safetensors", "rows": rows})
    (out / "index.json").unlink()
    with pytest.raises(KlvaeError, match=r"^img0\.png appears twice in the cache manifests$"):
        cache.write_index(vae, "m", out, opts, 1)
    assert not (out / "index.json").exists()


# ---- fingerprints ------------------------------------------------------------------------------------------------


def test_the_encoder_fingerprint_takes_quant_conv_and_not_the_decoder() -> None:
    # quant_conv turns the encoder's output into the moments: another one gives other rows, so no resume may mix them.
    a, b = perturbed_vae("tiny"), perturbed_vae("tiny")
    assert encoder_fingerprint(a) == encoder_fingerprint(b)
    with torch.no_grad():
        b.decoder.conv_out.weight.add_(0.01)
        b.post_quant_conv.weight.add_(0.01)
    assert encoder_fingerprint(a) == encoder_fingerprint(b)
    with torch.no_grad():
        b.quant_conv.weight.add_(0.01)
    assert encoder_fingerprint(a) != encoder_fingerprint(b)
