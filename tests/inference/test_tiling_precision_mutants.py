"""Pins what a second mutation audit of klvae.inference's tiling, precision and api modules found untested: the
mid block's maps in resident_map_bytes for a wide deepest level; weight_bytes counting stored bytes; the check of
an image smaller than a latent cell in tiled_encode_moments itself; a strip height's tiled result delivered to the
model's device; the wrapper hint and the TileOptions type check; complex images; crop sizes that are not whole
numbers; all_finite on huge finite values; dtypes autocast cannot run; fp32 asked of bf16 (bf16 images, an ambient
autocast) and fp64 models; fp32 outputs of half-stored models; the slow-fp16 warning following the weights' device;
no rerun for NaN input; the rerun warning once per half dtype; padding to whole latent patches."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import klvae
import klvae.compat
from helpers import perturbed_vae
from klvae import inference
from klvae.errors import ImageError, KlvaeError
from klvae.inference import api, precision, tiling
from klvae.inference.tiling import TileOptions

# ---------------------------------------------------------------- tiling: memory counts


def test_resident_map_bytes_count_the_mid_blocks_maps_of_a_wide_deepest_level() -> None:
    """A wide deepest level's mid block holds four maps: counting three under-states a CPU pass's memory."""
    vae = klvae.AutoencoderKL(klvae.get_preset("tiny").replace(block_out_channels=(16, 256)))
    # 16 x 16 pixels: the deepest level has 64 of them; its mid block holds 4 maps of 256 channels.
    assert tiling.resident_map_bytes(vae, "encode", (1, 3, 16, 16), torch.float32) == 64 * 4 * 256 * 4


def test_weight_bytes_count_each_parameters_stored_size() -> None:
    """A bf16 model's weights are half an fp32 one's: counted as fp32 they would shrink the map pool for nothing."""
    vae = perturbed_vae("tiny")
    n = sum(p.numel() for p in vae.parameters())
    assert tiling.weight_bytes(vae) == 4 * n
    assert tiling.weight_bytes(vae.to(torch.bfloat16)) == 2 * n


# ---------------------------------------------------------------- tiling: the passes


def test_a_tiled_encode_of_an_image_smaller_than_a_latent_cell_says_so() -> None:
    """The strips would fail deep inside a conv, with torch's message about kernels, instead of naming the size."""
    vae = perturbed_vae("tiny")  # downsample factor 2
    st = tiling.make_streamer(vae, TileOptions(tile_size=4), torch.float32, 1)
    with pytest.raises(ValueError, match=r"images of 1x8 pixels are smaller than one latent cell \(2x2\)"):
        tiling.tiled_encode_moments(vae, torch.zeros(1, 3, 1, 8), st)


def test_a_strip_heights_tiled_result_is_delivered_to_the_models_device() -> None:
    """With a strip height asked for, a result the streamer left in host memory would not come back to the GPU."""
    vae = perturbed_vae("tiny").to("meta")  # the model's device; the tiled result waits on the CPU
    out = torch.zeros(1, 3, 4, 4)
    got = tiling.run_maybe_tiled(vae, "decode", torch.zeros(1, 4, 2, 2), torch.float32, plain=lambda t, _: t,
                                 tiled=lambda t, _: out, opts=TileOptions(tile_size=2))
    assert got.device.type == "meta" and got.shape == out.shape


# ---------------------------------------------------------------- api: arguments and checks


def test_the_diffusers_wrapper_passed_as_the_model_is_told_to_pass_its_klvae_model() -> None:
    """Passing as_diffusers' wrapper would give a bare type error without saying how to reach klvae's model."""
    wrapper = klvae.compat.as_diffusers(perturbed_vae("tiny"))
    with pytest.raises(TypeError, match=r"got a DiffusersVAE \(as_diffusers' wrapper: pass its \.klvae_model\)$"):
        inference.encode_moments(wrapper, torch.zeros(1, 3, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^the model must be a klvae.AutoencoderKL, got a str$"):
        inference.decode("vae", torch.zeros(1, 4, 2, 2))  # type: ignore[arg-type]


def test_complex_images_are_refused_as_not_floating_point() -> None:
    """Complex pixels would be encoded (their real part, or a torch error deep inside) instead of refused."""
    with pytest.raises(ImageError, match=r"floating point in \[-1, 1\], got torch.complex64"):
        inference.encode_moments(perturbed_vae("tiny"), torch.zeros(1, 3, 4, 4, dtype=torch.complex64))


@pytest.mark.parametrize("size", [(4.0, 3), (4, 2.5), ("4", 3)])
def test_a_crop_size_that_is_not_whole_numbers_is_refused(size: tuple[object, ...]) -> None:
    """A float crop size (4.0, 3) or (4, 2.5) would be truncated to a crop the user did not ask for."""
    with pytest.raises(KlvaeError, match=r"size must be \(height, width\) with each between 1 and the decoded 4x4"):
        inference.decode(perturbed_vae("tiny"), torch.zeros(1, 4, 2, 2), size=size)  # type: ignore[arg-type]


def test_huge_but_finite_values_count_as_finite() -> None:
    """Sums in float32 would overflow on finite values near its range and call such a tensor non-finite."""
    assert api.all_finite(torch.full((1, 3, 4, 4), 3e38))
    assert api.all_finite(torch.full((1, 3, 4, 4), -3e38).to(memory_format=torch.channels_last))
    assert not api.all_finite(torch.tensor([1.0, float("inf")]))
    assert api.all_finite(torch.zeros(0, 3))


# ---------------------------------------------------------------- precision


def test_fp32_asked_of_a_bf16_model_takes_bf16_images() -> None:
    """The fp32 pass of a half-stored model would meet bf16 images with its upcast fp32 weights and fail."""
    vae = perturbed_vae("tiny").to(torch.bfloat16)
    ref = perturbed_vae("tiny").to(torch.bfloat16).float()  # the same rounded weights, in fp32
    x = (torch.rand(1, 3, 8, 8) * 2 - 1).to(torch.bfloat16)
    got = inference.encode_moments(vae, x, torch.float32)
    torch.testing.assert_close(got, inference.encode_moments(ref, x.float()), rtol=1e-5, atol=1e-5)


def test_the_slow_fp16_warning_follows_the_weights_device_not_the_inputs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An input waiting in host memory for a GPU model would be warned about as a slow fp16 CPU pass (or back)."""
    monkeypatch.setattr(precision, "_slow_half_warned", set())
    vae = perturbed_vae("tiny")  # on the CPU
    x = torch.zeros(1, 4, 2, 2, device="meta")  # the input elsewhere: only the weights' device computes
    with caplog.at_level(logging.WARNING, logger="klvae"):
        precision.run_guarded(vae, lambda t, _: torch.zeros(1), x, torch.float16, "decode")
    assert "fp16 on the CPU is usually tens of times slower" in caplog.text


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "bf16"])
def test_a_dtype_autocast_cannot_run_is_refused(dtype: object) -> None:
    """float64, an integer dtype or a dtype's name would be taken in silence and computed in fp32."""
    with pytest.raises(TypeError, match=r"dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        inference.encode_moments(perturbed_vae("tiny"), torch.zeros(1, 3, 4, 4), dtype)  # type: ignore[arg-type]


def test_fp32_asked_of_an_fp64_model_computes_in_fp32() -> None:
    """fp32 asked of a model stored in float64 would be computed in float64, ignoring the dtype asked for."""
    vae = perturbed_vae("tiny").double()
    ref = perturbed_vae("tiny")  # the same weights in fp32
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    got = inference.encode_moments(vae, x, torch.float32)
    assert torch.equal(got, inference.encode_moments(ref, x))
    assert next(vae.parameters()).dtype == torch.float64


def test_a_half_stored_models_outputs_are_fp32() -> None:
    """A bf16-stored model's images and moments would come back in bf16, not the fp32 the API promises."""
    vae = perturbed_vae("tiny").to(torch.bfloat16)
    assert inference.decode(vae, torch.randn(1, 4, 2, 2)).dtype == torch.float32
    assert inference.encode_moments(vae, torch.zeros(1, 3, 4, 4)).dtype == torch.float32


def test_fp32_asked_of_a_bf16_model_is_honoured_under_an_ambient_autocast() -> None:
    """A caller's bf16 autocast would lower the upcast fp32 pass of a half-stored model back to bf16."""
    vae = perturbed_vae("tiny").to(torch.bfloat16)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    want = inference.encode_moments(vae, x, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = inference.encode_moments(vae, x, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_non_finite_input_is_not_rerun_in_fp32(caplog: pytest.LogCaptureFixture) -> None:
    """NaN in gives NaN out in any dtype: a rerun in fp32 would double the time and warn about an overflow."""
    calls: list[torch.dtype] = []

    def fn(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        calls.append(dt)
        return t * 2

    x = torch.tensor([1.0, float("nan")])
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = precision.run_guarded(perturbed_vae("tiny"), fn, x, torch.bfloat16, "decode")
    assert calls == [torch.bfloat16] and torch.isnan(out[1]) and caplog.records == []


def test_the_rerun_warning_is_said_once_per_half_dtype(caplog: pytest.LogCaptureFixture) -> None:
    """An fp16 overflow after a bf16 one would be logged at debug level only, as if the same warning repeated."""
    def fn(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return t * float("inf") if dt != torch.float32 else t

    vae = perturbed_vae("tiny")
    with caplog.at_level(logging.WARNING, logger="klvae"):
        precision.run_guarded(vae, fn, torch.ones(2), torch.bfloat16, "decode")
        precision.run_guarded(vae, fn, torch.ones(2), torch.float16, "decode")
    assert [r.getMessage()[:45] for r in caplog.records if "rerunning" in r.getMessage()] == [
        "decode produced non-finite values in bfloat16", "decode produced non-finite values in float16;"]


# ---------------------------------------------------------------- api: padding and tiling options


def test_images_are_padded_to_whole_latent_patches() -> None:
    """With a latent patch (FLUX.2), padding to the downsample factor alone leaves latents that do not split."""
    vae = perturbed_vae("tiny", latent_patch_size=2)  # size multiple 2 x 2 = 4
    x = torch.rand(1, 3, 6, 10) * 2 - 1
    m = inference.encode_moments(vae, x)
    assert m.shape == (1, 8, 4, 6)
    torch.testing.assert_close(m, inference.encode_moments(vae, F.pad(x, (0, 2, 0, 2), mode="replicate")))


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_tiling_that_is_not_tile_options_is_refused(op: str) -> None:
    """A dict of tiling options would be ignored in silence, or fail deep inside, instead of being named."""
    vae = perturbed_vae("tiny")
    with pytest.raises(TypeError, match=r"^tiling must be None or a TileOptions .*, got \{'tile_size': 4\}$"):
        if op == "encode":
            inference.encode_moments(vae, torch.zeros(1, 3, 4, 4), tiling={"tile_size": 4})  # type: ignore[arg-type]
        else:
            inference.decode(vae, torch.zeros(1, 4, 2, 2), tiling={"tile_size": 4})  # type: ignore[arg-type]
