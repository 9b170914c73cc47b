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


# -- klvae.weights: saving (a second hunt) ------------------------------------------------------------------------

def _file_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_save_pretrained_over_a_sharded_folder_is_what_diffusers_then_loads(tmp_path: Path) -> None:
    # diffusers prefers the shard index it leaves behind, so it silently loads the OLD sharded weights back.
    import diffusers

    old = klvae.AutoencoderKL("tiny-f8").eval()
    old.save_pretrained(tmp_path / "plain")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "plain", low_cpu_mem_usage=False)
    theirs.save_pretrained(tmp_path / "vae", max_shard_size="1MB")  # diffusers' sharded layout
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    torch.manual_seed(1)
    new = klvae.AutoencoderKL("tiny-f8").eval()
    new.save_pretrained(tmp_path / "vae")  # replaces the model in the folder
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae", low_cpu_mem_usage=False)
    got, want = back.state_dict(), new.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), "diffusers reads the superseded sharded weights"


def test_save_pretrained_and_export_ldm_of_a_compiled_model_write_plain_keys(tmp_path: Path) -> None:
    # Both files hold '_orig_mod.'-prefixed keys: diffusers loads random weights (a warning), from_single_file fails.
    from klvae.weights import export_ldm, save_pretrained

    vae = klvae.AutoencoderKL("tiny-f8").eval()
    save_pretrained(vae, tmp_path / "plain")
    export_ldm(vae, tmp_path / "plain.safetensors")
    compiled = torch.compile(vae)  # never called: nothing compiles
    save_pretrained(compiled, tmp_path / "compiled")  # type: ignore[arg-type]
    export_ldm(compiled, tmp_path / "compiled.safetensors")  # type: ignore[arg-type]
    name = "diffusion_pytorch_model.safetensors"
    assert _file_keys(tmp_path / "compiled" / name) == _file_keys(tmp_path / "plain" / name)
    assert _file_keys(tmp_path / "compiled.safetensors") == _file_keys(tmp_path / "plain.safetensors")


def test_weights_save_pretrained_of_the_diffusers_wrapper_saves_it_or_names_the_model(
        vae: klvae.AutoencoderKL, tmp_path: Path) -> None:
    # klvae.weights.save_pretrained(as_diffusers(vae), d) is AttributeError "the config has no 'attention'".
    from klvae.weights import save_pretrained

    try:
        save_pretrained(as_diffusers(vae), tmp_path / "out")
    except CLEAR as e:
        assert "AutoencoderKL" in str(e) or "klvae_model" in str(e), str(e)
        return
    back = klvae.AutoencoderKL.from_pretrained(tmp_path / "out")
    assert back.config == vae.config


# -- klvae.latents.build_cache (a second hunt) ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp8", torch.int32])
def test_build_cache_names_a_bad_dtype_in_an_option_error(vae: klvae.AutoencoderKL, tmp_path: Path,
                                                          dtype: object) -> None:
    # README: "a bad value ... is a klvae.latents.OptionError naming the keyword"; dtype= gives a plain KlvaeError
    # ("unknown dtype 'fp8'") or a TypeError (torch.int32), which `except OptionError` does not catch.
    from PIL import Image

    from klvae.latents import OptionError, build_cache

    data = tmp_path / "photos"
    data.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(data / "a.png")
    with pytest.raises(OptionError, match="dtype"):
        build_cache(vae, data, tmp_path / "latents", resolution=16, num_workers=0, dtype=dtype)  # type: ignore[arg-type]
    assert not (tmp_path / "latents").exists()


# -- klvae.inference: the compute dtype (a second hunt) -------------------------------------------------------------

def test_inference_computes_in_the_half_dtype_asked_for_or_refuses_it() -> None:
    # Weights stored in bf16, dtype=torch.float16 asked: the pass silently runs in bf16 (its result, bit for bit),
    # though the docstring says `dtype` is the compute dtype (fp32 asked of half weights is honoured).
    torch.manual_seed(0)
    fp16_values = klvae.AutoencoderKL("tiny-f8").eval().to(torch.bfloat16)
    stored_fp16 = klvae.AutoencoderKL("tiny-f8").eval()
    stored_fp16.load_state_dict(fp16_values.state_dict())
    stored_fp16.to(torch.float16)  # the same values (bf16 ones fit fp16 here), stored as fp16
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    try:
        got = inference.decode(fp16_values, z, torch.float16)
    except CLEAR as e:
        assert "dtype" in str(e) or "float16" in str(e), str(e)
        return
    assert torch.equal(got, inference.decode(stored_fp16, z, torch.float16)), "computed in bf16, not fp16"
