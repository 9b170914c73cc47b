"""Bugs found using a finished cache as a diffusion trainer does (LatentDataset, its DataLoader use, a cache mended
while a trainer reads it); each test fails on the code it was written against and passes once the bug is fixed.

- An item of a `store="scaled"` cache shares memory with the shard's mapping (safetensors' get_tensor maps the
  file): an in-place edit of the item (`latents += offset_noise`) is what every later read of that row returns, in
  this process, for the rest of training. The other stores return fresh tensors.
- A resume that drops a damaged shard numbers the shard it writes next after the shards still recorded, so the
  dropped shard's name is reused for other rows: a reader opened before the repair silently serves another image's
  latents under the old row's source, size and crop.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import klvae
from helpers import SMALL_CACHE, cache_vae, noise_folder, rgb_image
from klvae.errors import LatentsError
from klvae.latents import build_cache
from klvae.latents.dataset import LatentDataset


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return cache_vae()


def test_an_in_place_edit_of_a_scaled_item_does_not_change_later_reads(tmp_path: Path,
                                                                         vae: klvae.AutoencoderKL) -> None:
    """A trainer's `item["latents"] += noise` on a scaled cache's item is served again on every later epoch."""
    build_cache(vae, noise_folder(tmp_path / "data", 2, hw=(32, 32)), tmp_path / "out", store="scaled",
                **SMALL_CACHE)
    ds = LatentDataset(tmp_path / "out", mode="mean")
    first = ds[0]["latents"]
    kept = first.clone()
    first += 1.0  # an augmentation applied in place, as `x += offset_noise` is
    # Now the next read returns kept + 1: the item is a view of the shard's memory map, which the edit changed.
    assert torch.equal(ds[0]["latents"], kept)


def test_a_reader_opened_before_a_damaged_shard_was_re_encoded_never_serves_another_images_rows(
        tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    """After a resume re-encodes a dropped last shard, a running trainer reads another image's latents for a row."""
    data = noise_folder(tmp_path / "data", 4, hw=(32, 32))  # shards of two rows: img0 img1 | img2 img3
    out = tmp_path / "out"
    build_cache(vae, data, out, **SMALL_CACHE)
    stale = LatentDataset(out, mode="mean")  # a trainer's dataset, no shard opened yet
    last = out / stale.items[-1]["shard"]
    last.write_bytes(last.read_bytes()[:-64])  # the last shard cut short (a full disk while copying, say)
    rgb_image(data / "img2a.png", 32, 32, seed=9)  # and an image added meanwhile, between img2 and img3
    build_cache(vae, data, out, **SMALL_CACHE)  # drops the damaged shard, encodes img2, img2a, img3 again
    fresh = LatentDataset(out, mode="mean")
    now = {it["source"]: fresh[i]["latents"] for i, it in enumerate(fresh.items)}
    for i, it in enumerate(stale.items):
        try:
            got = stale[i]["latents"]
        except LatentsError:  # the old shard gone: a clear error is fine
            continue
        # Now img3's row (shard rank000-00001, row 1) reads img2a's latents: the new shard took the dropped one's name.
        assert torch.equal(got, now[it["source"]]), it["source"]


def test_a_cache_folder_that_does_not_exist_is_named_so(tmp_path: Path) -> None:
    """LatentDataset("typo/") said "has no index.json: run `klvae cache` to completion first" for a folder that is
    not there at all: a mistyped path reads as an unfinished cache."""
    with pytest.raises(LatentsError, match=r"^no such folder: .*typo$"):
        LatentDataset(tmp_path / "typo")


def test_mode_mean_on_a_sample_cache_says_it_is_a_sample(tmp_path: Path, vae: klvae.AutoencoderKL,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """LatentDataset(mode="mean") on a `--store sample` cache served each row's one sample as its mean, unsaid."""
    build_cache(vae, noise_folder(tmp_path / "data", 1, hw=(32, 32)), tmp_path / "out", store="sample",
                **SMALL_CACHE)
    with caplog.at_level("WARNING", logger="klvae"):
        LatentDataset(tmp_path / "out")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="klvae"):
        ds = LatentDataset(tmp_path / "out", mode="mean")
    assert "one posterior sample per image" in caplog.text and "--store moments" in caplog.text
    torch.testing.assert_close(ds[0]["latents"], LatentDataset(tmp_path / "out")[0]["latents"])
