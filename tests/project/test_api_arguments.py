"""Arguments of the library's helpers that a bug hunt found taken in silence, or failing deep inside torch or PIL
with a message naming nothing: pad_to_multiple's multiple of 0, crop_to_size's negative sides, 2-D betas, a string
as a FLUX latent's shape, a nan shift anchor, LatentDataset's and BucketBatchSampler's non-integer seeds, epochs
and batch sizes, save_latents onto a folder, and a max_pixels that is no number. Each is now a clear error naming
the argument."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import noise_folder, perturbed_vae
from klvae.diffusion import NoiseSchedule
from klvae.flow import calculate_shift, flux_mu
from klvae.images import crop_to_size, image_size, load_image, pad_to_multiple
from klvae.latents import LatentItem, LatentsFile, build_cache, save_latents
from klvae.latents.dataset import BucketBatchSampler, LatentDataset


def test_pad_and_crop_refuse_sizes_that_slice_or_divide_by_zero() -> None:
    x = torch.zeros(1, 3, 5, 7)
    with pytest.raises(ValueError, match=r"^multiple must be an integer >= 1, got 0$"):  # was ZeroDivisionError
        pad_to_multiple(x, 0)
    with pytest.raises(ValueError, match=r"^size must be \(height, width\) of integers >= 1, got \(-2, 4\)$"):
        crop_to_size(x, (-2, 4))  # was x[..., :-2, :4]: two rows short, without a word
    assert crop_to_size(x, (5, 7)).shape == x.shape


def test_betas_of_two_dimensions_are_refused_not_flattened() -> None:
    with pytest.raises(ValueError, match=r"^betas must be 1-D, one per step, got shape \(2, 10\)$"):
        NoiseSchedule(torch.full((2, 10), 0.01))
    assert NoiseSchedule(torch.full((10,), 0.01)).num_steps == 10


def test_flux_shift_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="a latent tensor or its shape is needed, got '64'"):
        flux_mu("64")  # type: ignore[arg-type]  # was read as the shape (6, 4)
    with pytest.raises(ValueError, match=r"^max_shift must be a finite number, got nan$"):
        calculate_shift(1024, max_shift=math.nan)
    assert calculate_shift(256) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    return build_cache(perturbed_vae("tiny"), noise_folder(root / "data", 2, hw=(16, 16)), root / "out",
                       resolution=16, batch_size=2, num_workers=0).root


@pytest.mark.parametrize("seed", [1.5, "0", -1, True])
def test_the_latent_reader_takes_integer_seeds_and_epochs(cache: Path, seed: object) -> None:
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got "):
        LatentDataset(cache, seed=seed)  # type: ignore[arg-type]
    ds = LatentDataset(cache, seed=0)
    with pytest.raises(ValueError, match=r"^epoch must be an integer >= 0, got "):
        ds.set_epoch(seed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got "):
        BucketBatchSampler(ds, 2, seed=seed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got 2.5$"):
        BucketBatchSampler(ds, 2.5)  # type: ignore[arg-type]  # was a bare TypeError from range()
    sampler = BucketBatchSampler(ds, 2, seed=3)
    sampler.set_epoch(1)
    assert sorted(i for b in sampler for i in b) == [0, 1]


def test_save_latents_onto_a_folder_names_the_folder_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    lf = LatentsFile(latents={"a": torch.zeros(4, 2, 2)}, items=[LatentItem("a.png", "a", 16, 16)], model="m")
    with pytest.raises(IsADirectoryError) as err:
        save_latents(lf, folder)
    assert err.value.filename == str(folder)  # was the temporary file's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(folder.iterdir())


@pytest.mark.parametrize("limit", ["10", 0, 1.5])
def test_a_pixel_limit_that_is_no_count_is_named_not_a_decoding_failure(tmp_path: Path, limit: object) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    for read in (load_image, image_size):
        with pytest.raises(ValueError, match=r"^max_pixels must be None or an integer >= 1, got "):
            read(tmp_path / "a.png", max_pixels=limit)  # type: ignore[arg-type]
