"""Pins what a mutation audit of the scale estimation, build_cache and the cache/scale commands found untested: the
"no readable images" error's name for an opened source and its count of unreadable images, estimate_factors'
default limit of 256 images, the skipped-images warning's count of those sampled (not of the whole data), the
warning on an implausibly large latent std (and its absence on a real model), build_cache's library defaults of
batch_size 4 and num_workers 2, the enlarged-images warning's ", or its bucket" with buckets, and the local rank
read from LOCAL_RANK when a caller set up the process group without passing `dist`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import noise_folder, perturbed_vae
from klvae import inference
from klvae.errors import KlvaeError
from klvae.latents import build, build_cache
from klvae.latents import cache as cache_mod
from klvae.latents.cache import CacheOptions
from klvae.latents.scale import estimate_factors
from klvae.latents.sources import ItemSource


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return perturbed_vae("tiny")


def _folder_source(paths: dict[str, Path]) -> ItemSource:
    return ItemSource(kind="folder", ids=list(paths), _paths=dict(paths))


def test_no_readable_images_names_the_data_and_counts_the_default_limit_of_256(
    tmp_path: Path, vae: klvae.AutoencoderKL
) -> None:
    # 300 items, none readable: the default limit samples 256 of them, all skipped
    source = _folder_source({f"item{i}": tmp_path / f"missing{i}.png" for i in range(300)})
    with pytest.raises(KlvaeError) as e:
        estimate_factors(vae, source, resolution=32)
    assert str(e.value) == "no readable images in the data (256 unreadable)"


def test_skipped_warning_counts_the_images_sampled_not_the_whole_data(
    tmp_path: Path, vae: klvae.AutoencoderKL, caplog: pytest.LogCaptureFixture
) -> None:
    data = noise_folder(tmp_path / "data", 4, hw=(32, 32))
    (data / "bad.png").write_bytes(b"not an image")
    paths = {f"img{i}": data / f"img{i}.png" for i in range(4)} | {"bad": data / "bad.png"}
    # seed 0 samples positions 4, 0 and 1 of the five: bad, img0 and img1
    with caplog.at_level(logging.WARNING, logger="klvae"):
        f = estimate_factors(vae, _folder_source(paths), limit=3, resolution=32, seed=0)
    assert (f["images"], f["skipped"]) == (2.0, 1.0)
    assert "skipped 1 unreadable of 3 images sampled" in [r.getMessage() for r in caplog.records]


def test_an_implausibly_large_latent_std_is_warned_of_and_a_real_one_is_not(
    tmp_path: Path, vae: klvae.AutoencoderKL, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = str(noise_folder(tmp_path / "data", 2, hw=(32, 32)))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        real = estimate_factors(vae, data, resolution=32, sample=False)
    assert real["std"] < 1e4 and "far beyond" not in caplog.text
    encode = inference.encode_moments

    def huge(*args: object, **kwargs: object) -> torch.Tensor:
        m = encode(*args, **kwargs)  # type: ignore[arg-type]
        return torch.cat([m[:, : m.shape[1] // 2] * 1e6, m[:, m.shape[1] // 2 :]], dim=1)

    monkeypatch.setattr(inference, "encode_moments", huge)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        f = estimate_factors(vae, data, resolution=32, sample=False)
    assert f["std"] > 1e4
    warned = [r.getMessage() for r in caplog.records if "far beyond" in r.getMessage()]
    assert warned == [
        f"the latents' std is {f['std']:.3g}, far beyond an encoder's: huge values in the model's weights?"
    ]


def test_build_cache_defaults_are_the_cli_flags_defaults(
    tmp_path: Path, vae: klvae.AutoencoderKL, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[CacheOptions] = []

    def record(vae: object, source: object, root: object, opts: CacheOptions, *args: object,
               **kwargs: object) -> dict[str, int]:
        seen.append(opts)
        raise KlvaeError("recorded")

    monkeypatch.setattr(cache_mod, "cache_rank", record)
    with pytest.raises(KlvaeError, match="recorded"):
        build_cache(vae, noise_folder(tmp_path / "data", 1, hw=(32, 32)), tmp_path / "out")
    (opts,) = seen
    assert (opts.resolution, opts.shard_size, opts.batch_size, opts.num_workers, opts.seed) == (512, 256, 4, 2, 0)
    assert (opts.buckets, opts.flip, opts.store) == (False, False, "moments")


def test_the_enlarged_warning_names_the_bucket_with_buckets(
    tmp_path: Path, vae: klvae.AutoencoderKL, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(data / "small.png")
    with caplog.at_level(logging.WARNING, logger="klvae"):
        summary = build_cache(vae, data, tmp_path / "out", resolution=64, buckets=True, num_workers=0)
    assert (summary.encoded, summary.enlarged) == (1, 1)
    warned = [r.getMessage() for r in caplog.records if "enlarged" in r.getMessage()]
    assert warned == [
        "1 of the 1 images encoded were smaller than their crop (resolution 64, or its bucket) and "
        "were enlarged to cover it, which blurs them; a resolution at most the images' shorter side "
        "avoids that"
    ]


def test_an_initialised_process_group_takes_the_local_rank_from_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 5)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist = build._process_group()
    assert (dist.rank, dist.world, dist.local_rank) == (5, 8, 1)
