"""Pins bugs a hunt of the inference speed levers (inference.speed, fused_norm, the folded upsampler) found:

- optimize_for_inference only ever turns channels_last on: called again on the same model with
  SpeedOptions(channels_last=False) (and the upsampler unfolded), the weights stay NHWC, so the model keeps
  computing in the other layout and no longer gives the plain model's (diffusers') bits;
- SpeedOptions(cast_weights=True) (the default on a GPU, so `klvae decode --dtype fp16` there) casts every weight
  to fp16 without the range check the loader makes: a weight past 65504 silently becomes inf, and every decode is
  NaN, the promised fp32 rerun too (it upcasts the inf weights);
- a fused GroupNorm runs its kernel, which has no backward, when autograd is on but only the norm's bias is
  trainable (its weight frozen): the bias gets no gradient, and a loss over the output cannot be backpropagated.

Also pinned: the levers give the plain path's result within each dtype's noise (odd sizes, batches, 1x1 latents),
the fused norms honour the config's eps and group counts that are no powers of two, an fp16 overflow with the
weights stored in fp16 and fused norms is rerun in fp32, and a model saved after the levers loads in diffusers.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch

from helpers import perturbed_vae
from klvae import inference
from klvae.errors import KlvaeError
from klvae.inference import SpeedOptions, fused_norm, optimize_for_inference
from klvae.model.blocks import GroupNorm

# The interpreter's numpy exp overflows for a SiLU input far below zero; the sigmoid is then 0, as on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _latents(shape: tuple[int, ...] = (2, 4, 3, 5), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _overflowing_decoder_vae() -> object:
    vae = perturbed_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's 65504 (finite in fp32)
    return vae


# ---- switching levers off again -----------------------------------------------------------------------------------

def test_turning_channels_last_off_again_gives_the_plain_models_bits() -> None:
    """A model optimised, then optimised again with channels_last=False, keeps NHWC weights and other bits."""
    z = _latents()
    ref = inference.decode(perturbed_vae(), z, torch.float32)
    vae = optimize_for_inference(perturbed_vae(), torch.float32)  # the CPU default: channels_last, folded
    optimize_for_inference(vae, torch.float32, SpeedOptions(channels_last=False, fold_upsample=False))
    assert vae.decoder.conv_in.weight.is_contiguous(), "channels_last=False left the weights in NHWC"
    assert torch.equal(inference.decode(vae, z, torch.float32), ref)


# ---- weights cast to fp16 -----------------------------------------------------------------------------------------

def test_casting_weights_to_fp16_does_not_turn_a_large_weight_into_inf() -> None:
    """cast_weights with fp16 makes a weight past 65504 inf in silence: every decode is NaN, the fp32 rerun too."""
    vae = perturbed_vae()
    with torch.no_grad():
        vae.decoder.conv_in.bias[0] = 1e5  # fine in fp32 and bf16; loading it in fp16 is refused, naming it
    z = _latents((1, 4, 8, 8))
    ref = inference.decode(vae, z, torch.float32)
    try:
        optimize_for_inference(vae, torch.float16, SpeedOptions(cast_weights=True))
    except KlvaeError as e:  # refused, naming the weight, as from_pretrained(dtype=torch.float16) refuses it
        assert "decoder.conv_in.bias" in str(e)
        return
    bad = [k for k, p in vae.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad, f"cast to fp16 made these weights inf, with no error: {bad}"
    out = inference.decode(vae, z)
    assert bool(torch.isfinite(out).all()) and (out - ref).abs().max() < 1e-2


# ---- fused norms and autograd -------------------------------------------------------------------------------------

def test_a_fused_norm_with_a_frozen_weight_still_trains_its_bias() -> None:
    """With only the norm's bias trainable, the fused kernel runs under autograd: no gradient, backward fails."""
    norm = GroupNorm(32, 8, 1e-6)
    norm.kernel = fused_norm.group_norm_act
    norm.weight.requires_grad_(False)
    x = torch.randn(1, 32, 4, 4).to(memory_format=torch.channels_last)
    norm(x, silu=True).sum().backward()
    assert norm.bias.grad is not None and torch.isfinite(norm.bias.grad).all()


# ---- what holds ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 0.06), (torch.float16, 0.01)])
@pytest.mark.parametrize("shape", [(3, 4, 1, 1), (2, 4, 3, 5)], ids=["1x1x3", "3x5x2"])
def test_levers_stay_within_the_dtypes_noise_of_the_fp32_plain_path(dtype: torch.dtype, tol: float,
                                                                    shape: tuple[int, ...]) -> None:
    z = _latents(shape)
    ref = inference.decode(perturbed_vae(), z, torch.float32)
    for opts in (SpeedOptions(), SpeedOptions(cast_weights=True)):
        fast = optimize_for_inference(perturbed_vae(), dtype, opts)
        out = inference.decode(fast, z, None if opts.cast_weights else dtype)
        assert out.shape == ref.shape and (out - ref).abs().max() < tol, opts


@pytest.mark.parametrize(("widths", "groups", "eps"), [((18, 36), 6, 0.5), ((20, 40), 5, 1e-2)])
def test_fused_norms_honour_the_configs_eps_and_odd_group_counts(widths: tuple[int, int], groups: int,
                                                                 eps: float) -> None:
    kw = {"block_out_channels": widths, "norm_num_groups": groups, "norm_eps": eps}
    z = _latents((3, 4, 1, 1))  # a 1x1 map: the norm's eps weighs most where a group barely varies
    x = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain = perturbed_vae(**kw)
    fused = optimize_for_inference(perturbed_vae(**kw), torch.float32, SpeedOptions(fused_norm=True))
    torch.testing.assert_close(inference.decode(fused, z, torch.float32), inference.decode(plain, z, torch.float32),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inference.encode_moments(fused, x, torch.float32),
                               inference.encode_moments(plain, x, torch.float32), atol=1e-5, rtol=1e-5)


def test_an_fp16_overflow_with_fp16_weights_and_fused_norms_is_rerun_in_fp32() -> None:
    z = _latents()
    ref = inference.decode(_overflowing_decoder_vae(), z, torch.float32)
    fast = optimize_for_inference(_overflowing_decoder_vae(), torch.float16,
                                  SpeedOptions(cast_weights=True, fused_norm=True))
    out = inference.decode(fast, z)
    assert {p.dtype for p in fast.parameters()} == {torch.float16}  # given back as stored after the rerun
    assert bool(torch.isfinite(out).all()) and (out - ref).abs().max() < 5e-3  # fp16-rounded weights, fp32 math


def test_a_model_saved_after_the_levers_loads_in_diffusers_with_its_keys(tmp_path: Path) -> None:
    vae = optimize_for_inference(perturbed_vae(), torch.bfloat16, SpeedOptions(cast_weights=True, fused_norm=True))
    vae.save_pretrained(tmp_path)
    theirs = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    ours = vae.state_dict()
    assert set(theirs.state_dict()) == set(ours)
    assert all(torch.equal(v.float(), ours[k].float()) for k, v in theirs.state_dict().items())
