"""Pins bugs a hunt of the inference path and the diffusers-compatible wrapper found:

- as_diffusers' tiled path (enable_tiling) skips the shape check of its untiled path: a single image without a
  batch dimension fails with a bare IndexError, and a 5-D, wrong-channel or empty batch with a TypeError about
  Streamer.new_map, a torch conv RuntimeError or a ZeroDivisionError, where the untiled path names the shape;
- the fp32 upcast around a rerun or an fp32 request (precision._fp32_weights) does not give the weights back as
  they were: an fp64 model that yields inf is "rerun in fp32" and every weight is rounded to fp32 for good;
  weights of a second dtype (an fp16 encoder beside an fp32 decoder) all come back in the first parameter's dtype;
  under torch.inference_mode the parameters come back as inference tensors, so the model can no longer train;
- an fp64 model through inference.encode/decode enters torch.autocast(float64), which torch warns about
  (UserWarning "In CPU autocast, but the target dtype is not supported") on every call;
- an ambient torch.autocast overrides the compute dtype asked for: inference.decode(vae, z, torch.float32) computes
  in bf16 under autocast(bfloat16), and under autocast(float16) an overflow comes back as NaN, not rerun in fp32;
- DiagonalGaussian.sample (what inference.encode returns) given a seed or a list of generators fails with a bare
  AttributeError ("'int' object has no attribute 'device'") instead of a TypeError naming `generator`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from helpers import perturbed_vae
from klvae import inference
from klvae.compat import DiffusersVAE, as_diffusers
from klvae.errors import KlvaeError
from klvae.inference import TileOptions


def _wrapper(tile_size: int | None) -> DiffusersVAE:
    ours = as_diffusers(perturbed_vae("tiny"))
    ours.enable_tiling(tile_size=tile_size)
    return ours


def _latents(seed: int = 0) -> Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- as_diffusers: the tiled path checks shapes as the untiled one does ------------------------------------------

@pytest.mark.parametrize("tile_size", [None, 4])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_a_single_image_without_batch_dimension_is_named_when_tiling_is_on(op: str, tile_size: int | None) -> None:
    # Untiled, the wrapper says "expected a batch of images [B, 3, H, W], got shape [3, 16, 16]"; with
    # enable_tiling() (a small image that would not even tile) it fails with IndexError: tuple index out of range.
    ours = _wrapper(tile_size)
    x = torch.rand(3 if op == "encode" else 4, 16, 16)
    with torch.no_grad(), pytest.raises((ValueError, KlvaeError), match=r"(?i)shape|batch"):
        getattr(ours, op)(x)


@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("shape", [(1, 3, 2, 16, 16), "channels", "empty"])
def test_a_batch_that_does_not_fit_is_named_when_tiling_in_strips(op: str, shape: object) -> None:
    # With tile_size the wrapper streams without a check: a 5-D batch fails with "TypeError: Streamer.new_map()
    # takes 5 positional arguments but 6 were given", one channel too many with torch's conv RuntimeError, an
    # empty height with ZeroDivisionError.
    ours = _wrapper(4)
    c = 3 if op == "encode" else 4
    if shape == "channels":
        x = torch.rand(1, c + 1, 16, 16)
    elif shape == "empty":
        x = torch.rand(1, c, 0, 16)
    else:
        x = torch.rand(*shape)  # type: ignore[misc]
    with torch.no_grad(), pytest.raises((ValueError, KlvaeError), match=r"(?i)shape|batch|channel|empty|size"):
        getattr(ours, op)(x)


# ---- precision: the weights after a call are the weights before -------------------------------------------------

def _snapshot(vae: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _assert_unchanged(vae: torch.nn.Module, before: dict[str, Tensor]) -> None:
    after = vae.state_dict()
    dtypes = {k for k in before if after[k].dtype != before[k].dtype}
    values = {k for k in before if after[k].dtype == before[k].dtype and not torch.equal(after[k], before[k])}
    assert not dtypes and not values, f"dtype changed: {sorted(dtypes)[:3]}, values changed: {sorted(values)[:3]}"


def test_an_fp64_model_that_yields_inf_keeps_its_fp64_weights() -> None:
    # fp64 has nothing higher to rerun in (compat's own comment says so), but run_guarded reruns it "in fp32":
    # model.float() then model.to(float64) rounds all 124 weights to fp32 precision, silently and for good.
    vae = perturbed_vae("tiny").double()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(1e-12)  # values that fp32 cannot hold
        vae.decoder.conv_out.bias[0] = float("inf")  # a broken model: its output is not finite
    before = _snapshot(vae)
    out = inference.decode(vae, _latents())
    assert not torch.isfinite(out).all()  # returned unclamped, as documented
    _assert_unchanged(vae, before)


def test_weights_of_a_second_dtype_come_back_in_it_after_an_fp32_call() -> None:
    # An fp16 encoder beside an fp32 decoder: asking for fp32 upcasts the model for the call, then casts every
    # weight to the first parameter's dtype, so the fp32 decoder is left in fp16.
    vae = perturbed_vae("tiny")
    vae.encoder.half()
    before = _snapshot(vae)
    inference.decode(vae, _latents(), torch.float32)
    _assert_unchanged(vae, before)


def test_a_call_under_inference_mode_leaves_parameters_that_can_still_train() -> None:
    # A bf16-stored model asked for fp32 under torch.inference_mode: the upcast and the cast back run there, so the
    # parameters come back as inference tensors and the next training step fails ("Inference tensors cannot be
    # saved for backward").
    vae = perturbed_vae("tiny").to(torch.bfloat16)
    z = _latents()
    with torch.inference_mode():
        inference.decode(vae, z, torch.float32)
    assert not any(p.is_inference() for p in vae.parameters())
    vae.decode(z.bfloat16()).float().sum().backward()  # a training step still runs


def test_an_fp64_model_runs_without_torch_autocast_warnings() -> None:
    # precision.autocast enters torch.autocast(cpu, float64) for a model stored in fp64 (its own dtype, which
    # compute_dtype accepts); torch warns "In CPU autocast, but the target dtype is not supported" on every call.
    vae = perturbed_vae("tiny").double()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = inference.encode(vae, x).mode()[:, :4]
        inference.decode(vae, z, tiling=TileOptions(tile_size=4))


# ---- precision: the dtype asked for is the dtype computed in ----------------------------------------------------

def test_fp32_asked_for_is_honoured_under_an_ambient_autocast() -> None:
    # inference.decode(vae, z, torch.float32) documents fp32 compute; inside a caller's torch.autocast(bfloat16) it
    # runs in bf16 (max abs error 0.025 on this model), untiled and tiled alike.
    vae = perturbed_vae("tiny")
    z = _latents()
    reference = inference.decode(vae, z, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = inference.decode(vae, z, torch.float32)
        tiled = inference.decode(vae, z, torch.float32, tiling=TileOptions(tile_size=4))
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled, reference, atol=1e-4, rtol=0)


def test_an_overflow_under_an_ambient_fp16_autocast_is_not_returned_as_nan() -> None:
    # The NaN guard reruns a half-precision overflow in fp32; but when the half precision comes from the caller's
    # autocast, run_guarded thinks it ran fp32 ("nothing higher to fall back to") and hands back NaN.
    vae = perturbed_vae("tiny")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's 65504
    z = _latents()
    reference = inference.decode(vae, z, torch.float32)
    assert torch.isfinite(reference).all()
    with torch.autocast("cpu", dtype=torch.float16):
        out = inference.decode(vae, z, torch.float32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


# ---- the posterior: a generator that is not one is named ---------------------------------------------------------

def test_a_seed_given_as_the_generator_is_a_type_error_naming_it() -> None:
    posterior = inference.encode(perturbed_vae("tiny"), torch.rand(2, 3, 8, 8) * 2 - 1)
    with pytest.raises(TypeError, match="generator"):
        posterior.sample(generator=42)  # type: ignore[arg-type]


def test_a_list_of_generators_draws_per_image_or_is_named() -> None:
    # diffusers' idiom (one generator per image); klvae's own posterior fails with "'list' object has no attribute
    # 'device'". Either per-image draws (as as_diffusers' posterior makes them) or a TypeError naming `generator`.
    posterior = inference.encode(perturbed_vae("tiny"), torch.rand(2, 3, 8, 8) * 2 - 1)
    gens = [torch.Generator().manual_seed(i) for i in (5, 6)]
    try:
        z = posterior.sample(generator=gens)  # type: ignore[arg-type]
    except TypeError as e:
        assert "generator" in str(e)
        return
    first = posterior.sample(generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z[:1], first[:1])
