"""Pins inputs a bug hunt of klvae's Python API found to be taken silently with a wrong result, or to end in an
internal error from deep inside torch or PIL instead of a clear klvae error naming the argument:
`as_diffusers(vae).encode` of uint8 pixels (encoded as if in [-1, 1]), its `enable_tiling(max_memory=0)`
(silently the 2 GiB default) and its tiled encode of an empty batch; `inference.encode` with `tiling=True`, with
an integer compute dtype (silently fp32) and with the `as_diffusers` wrapper as its model; `AutoencoderKL(dict)`;
`tensor_to_pil` of a uint8 tensor (0 shown as grey, 200 as white); unsigned-integer timesteps (numpy uint32)
and `None` timesteps or sigmas in `klvae.diffusion`/`klvae.flow`; `make_betas("cosine", cosine_s=nan)` (NaN
betas); `psnr`/`ssim` with a data_range of 0 or below; and `save_latents` writing files that `load_latents` then
refuses (a [1, C, h, w] latent per item, an item naming a latent the file does not hold).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import klvae
from klvae import flow, inference
from klvae.compat import as_diffusers
from klvae.diffusion import NoiseSchedule, make_betas
from klvae.errors import KlvaeError
from klvae.evaluation import psnr, ssim
from klvae.images import tensor_to_pil
from klvae.latents import LatentItem, LatentsFile, load_latents, save_latents

CLEAR = (KlvaeError, TypeError, ValueError)  # what a bad argument may raise; torch's RuntimeError etc. are not


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    torch.manual_seed(0)
    return klvae.AutoencoderKL("tiny-f8").eval()


def _images(b: int = 2, side: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


# -- klvae.compat ---------------------------------------------------------------------------------------------

def test_as_diffusers_refuses_uint8_pixels_rather_than_encoding_them_as_if_in_minus_one_one(
        vae: klvae.AutoencoderKL) -> None:
    # inference.encode refuses them ("uint8 pixels: x / 127.5 - 1"); the wrapper cast them to float and encoded
    # 0..255 as if they were [-1, 1] values, where diffusers itself fails on the dtype.
    pixels = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad(), pytest.raises(CLEAR, match="uint8"):
        as_diffusers(vae).encode(pixels)


def test_as_diffusers_enable_tiling_refuses_a_zero_memory_budget(vae: klvae.AutoencoderKL) -> None:
    # TileOptions(max_memory=0) is refused; enable_tiling(max_memory=0) became the 2 GiB default without a word.
    with pytest.raises(CLEAR, match="max_memory"):
        as_diffusers(vae).enable_tiling(max_memory=0)


def test_as_diffusers_tiled_encode_of_an_empty_batch_is_the_untiled_one(vae: klvae.AutoencoderKL) -> None:
    # Untiled, an empty batch gives empty moments; tiled, it was a RuntimeError from a reshape in the streamer.
    wrapper = as_diffusers(vae)
    empty = _images()[:0]
    with torch.no_grad():
        plain = wrapper.encode(empty).latent_dist.mean
        wrapper.enable_tiling(tile_size=8)
        try:
            tiled = wrapper.encode(empty).latent_dist.mean
        finally:
            wrapper.disable_tiling()
    assert tiled.shape == plain.shape == (0, 4, 2, 2)


# -- klvae.inference --------------------------------------------------------------------------------------------

def test_inference_encode_with_tiling_true_is_tiled_or_a_clear_error(vae: klvae.AutoencoderKL) -> None:
    # `tiling=True` (diffusers' switch is a boolean) was an AttributeError: 'bool' object has no attribute 'enabled'.
    x = _images()
    try:
        got = inference.encode_moments(vae, x, tiling=True)  # type: ignore[arg-type]
    except CLEAR as e:
        assert "tiling" in str(e), str(e)
        return
    torch.testing.assert_close(got, inference.encode_moments(vae, x), atol=1e-5, rtol=0)


def test_inference_encode_refuses_an_integer_compute_dtype(vae: klvae.AutoencoderKL) -> None:
    # Taken silently: autocast to int32 is switched off (a torch UserWarning at most) and the pass runs in fp32.
    with pytest.raises(CLEAR, match="dtype"):
        inference.encode(vae, _images(), torch.int32)


def test_inference_encode_of_the_diffusers_wrapper_works_or_names_the_model(vae: klvae.AutoencoderKL) -> None:
    # inference.encode(as_diffusers(vae), x) was AttributeError: "the config has no 'size_multiple'".
    x = _images()
    try:
        got = inference.encode_moments(as_diffusers(vae), x)  # type: ignore[arg-type]
    except CLEAR as e:
        assert "AutoencoderKL" in str(e) or "klvae_model" in str(e), str(e)
        return
    torch.testing.assert_close(got, inference.encode_moments(vae, x))


# -- klvae.AutoencoderKL ----------------------------------------------------------------------------------------

def test_autoencoder_given_a_dict_config_builds_it_or_names_the_argument() -> None:
    # AutoencoderKL({"latent_channels": 4}) was AttributeError: 'dict' object has no attribute 'latent_channels'.
    d = klvae.get_preset("tiny-f8").to_dict()
    try:
        model = klvae.AutoencoderKL(d)  # type: ignore[arg-type]
    except CLEAR as e:
        assert "config" in str(e), str(e)
        return
    assert model.config == klvae.get_preset("tiny-f8")


# -- klvae.images -----------------------------------------------------------------------------------------------

def test_tensor_to_pil_refuses_uint8_pixels_instead_of_reading_them_as_minus_one_one() -> None:
    # torchvision's read_image gives uint8 [3, H, W]; tensor_to_pil showed 0 as mid-grey and 200 as white.
    with pytest.raises(CLEAR, match="uint8"):
        tensor_to_pil(torch.full((3, 4, 4), 200, dtype=torch.uint8))


# -- klvae.diffusion and klvae.flow ----------------------------------------------------------------------------

def test_unsigned_integer_timesteps_work_as_signed_ones() -> None:
    # numpy uint32 timesteps: NotImplementedError "min_all" not implemented for 'UInt32', from the range check.
    s = NoiseSchedule.sd()
    x0 = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    want = s.q_sample(x0, torch.tensor([1, 500]), noise)
    torch.testing.assert_close(s.q_sample(x0, np.array([1, 500], dtype=np.uint32), noise), want)
    torch.testing.assert_close(s.snr(torch.tensor([1, 500], dtype=torch.uint16)), s.snr(torch.tensor([1, 500])))
    table = flow.FlowSchedule()
    torch.testing.assert_close(table.sigma_at(np.array([1, 500], dtype=np.uint32)), table.sigma_at([1, 500]))


def test_missing_timesteps_and_sigmas_are_named() -> None:
    # None was RuntimeError "Could not infer dtype of NoneType" from torch.as_tensor, naming no argument.
    x0 = torch.randn(2, 4, 2, 2)
    noise = torch.randn_like(x0)
    with pytest.raises((TypeError, ValueError), match="timestep"):
        NoiseSchedule.sd().q_sample(x0, None, noise)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="timestep"):
        flow.FlowSchedule.sd3().scale_noise(x0, None, noise)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="sigma"):
        flow.noisy(x0, noise, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("cosine_s", [math.nan, -0.5, -1.0])
def test_make_betas_refuses_a_cosine_offset_that_breaks_the_schedule(cosine_s: float) -> None:
    # make_betas returned NaN (nan, -1) or all-zero (-0.5) betas; from_name then blamed "betas", naming no cosine_s.
    with pytest.raises(ValueError, match="cosine_s"):
        make_betas("cosine", 10, cosine_s=cosine_s)
    with pytest.raises(ValueError, match="cosine_s"):
        NoiseSchedule.from_name("cosine", 10, cosine_s=cosine_s)


# -- klvae.evaluation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data_range", [0.0, -2.0, math.nan])
def test_metrics_refuse_a_data_range_that_is_not_positive(data_range: float) -> None:
    # psnr gave -inf (0), the figure of +2 (-2) or nan; ssim a number computed with no stabilising constants.
    a = _images(1, 16)
    b = (a + 0.1).clamp(-1, 1)
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, data_range)
    with pytest.raises(ValueError, match="data_range"):
        ssim(a, b, data_range)


# -- klvae.latents ----------------------------------------------------------------------------------------------

def _latents_file(latents: dict[str, torch.Tensor], key: str = "a") -> LatentsFile:
    return LatentsFile(latents=latents, items=[LatentItem("a.png", key, 16, 16)], model="m", scaling_factor=0.18215)


def test_save_latents_round_trips_a_good_file(tmp_path: Path) -> None:
    z = torch.randn(4, 2, 2)
    path = save_latents(_latents_file({"a": z}), tmp_path / "ok.safetensors")
    torch.testing.assert_close(load_latents(path, 8).latents["a"], z)


@pytest.mark.parametrize("case", ["batched latent", "missing key"])
def test_save_latents_refuses_what_load_latents_would_refuse_and_writes_nothing(tmp_path: Path, case: str) -> None:
    # Both were written without a word; load_latents then refused the file it had just been given.
    z = torch.randn(4, 2, 2)
    lf = _latents_file({"a": z[None]}) if case == "batched latent" else _latents_file({"b": z}, key="a")
    path = tmp_path / "x.safetensors"
    with pytest.raises((KlvaeError, ValueError)):
        save_latents(lf, path)
    assert not path.exists()
