"""Pins bugs a hunt of the numerical API around the VAE (klvae.posterior, klvae.model.latent_norm,
klvae.diffusion, klvae.flow), checked against diffusers 0.42.1, found:

- NoiseSchedule.get_v / get_velocity of float32 latents with bf16 (or fp16) noise comes back float32 but rounded
  to the noise's format (2e-3 off), where diffusers' get_velocity is exact to float32;
- NoiseSchedule.q_sample(x0, t, generator=g) draws its noise on x0's device with g: a CPU generator and latents on
  a GPU are torch's "Expected a 'cuda' device type for generator" RuntimeError, where DiagonalGaussian.sample
  (and diffusers' randn_tensor) draw on the generator's device and move the noise;
- DiagonalGaussian.kl / nll of a deterministic posterior ignore `dims`: per-image zeros [B] where the same call on
  a sampling posterior returns the reduction's shape ([B, H, W] for dims=[1]).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

import klvae
from klvae.diffusion import NoiseSchedule
from klvae.posterior import DiagonalGaussian


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- v-prediction target of mixed-precision inputs ----------------------------------------------------------------

@pytest.mark.parametrize("noise_dtype", [torch.bfloat16, torch.float16])
def test_get_v_of_float32_latents_with_half_precision_noise_keeps_float32_precision(noise_dtype: torch.dtype) -> None:
    # Now: the float32 result is the bf16-rounded velocity (rel. error 2e-3); diffusers' get_velocity is ~6e-8 off.
    s = NoiseSchedule.sd()
    x0, noise = _randn(2, 4, 8, 8), _randn(2, 4, 8, 8, seed=1).to(noise_dtype)
    t = torch.tensor([10, 900])
    exact = s.get_v(x0.double(), noise.double(), t)
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).get_velocity(x0, noise, t)
    for ours in (s.get_v(x0, noise, t), s.get_velocity(x0, noise, t)):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs.double(), exact, rtol=1e-6, atol=1e-6)  # the oracle's precision


# ---- q_sample's generator and the latents' device ---------------------------------------------------------------

def test_q_sample_draws_with_a_cpu_generator_for_latents_on_another_device(device: torch.device,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Now on a GPU: RuntimeError "Expected a 'cuda' device type for generator but found 'cpu'" from torch.randn.
    s = NoiseSchedule.sd()
    if device.type != "cpu":
        x0 = _randn(2, 4, 3, 3)
        expected = s.q_sample(x0, [5, 700], generator=torch.Generator().manual_seed(3))
        got = s.q_sample(x0.to(device), [5, 700], generator=torch.Generator().manual_seed(3))
        assert got.device.type == device.type
        torch.testing.assert_close(got.cpu(), expected)
        return
    # On a CPU-only run the latents sit on the meta device (an empty batch: meta timesteps have no values to check),
    # and torch.randn refuses a generator of another device as CUDA's does.
    randn = torch.randn

    def strict_randn(*args: object, generator: torch.Generator | None = None, device: object = None,
                     **kwargs: object) -> torch.Tensor:
        where = torch.device(device) if device is not None else torch.device("cpu")
        if generator is not None and generator.device.type != where.type:
            raise RuntimeError(f"Expected a '{where.type}' device type for generator but found "
                               f"'{generator.device.type}'")
        return randn(*args, generator=generator, device=device, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "randn", strict_randn)
    x0 = torch.zeros(0, 4, 3, 3, device="meta")
    z = s.q_sample(x0, torch.zeros(0, dtype=torch.long), generator=torch.Generator().manual_seed(3))
    assert z.device.type == "meta" and z.shape == x0.shape


# ---- deterministic posteriors and custom dims --------------------------------------------------------------------

def test_deterministic_kl_and_nll_have_the_shape_of_the_reduction_over_dims() -> None:
    # Now: zeros [B] whatever dims says, so (kl(dims=[1]) * weight_map).sum((1, 2)) fails for a deterministic one.
    m = _randn(2, 8, 3, 5, dtype=torch.float64)
    d, det = DiagonalGaussian(m), DiagonalGaussian(m, deterministic=True)
    x = torch.randn_like(d.mean)
    for dims in ([1], (1, 2), [2, 3], (1, 2, 3)):
        assert det.kl(dims=dims).shape == d.kl(dims=dims).shape, dims
        assert det.kl(d, dims=dims).shape == d.kl(d, dims=dims).shape, dims
        assert det.nll(x, dims=dims).shape == d.nll(x, dims=dims).shape, dims
        assert not det.kl(dims=dims).any() and not det.nll(x, dims=dims).any()


def test_an_image_smaller_than_one_latent_cell_is_named() -> None:
    # A doubtful item of the hunt, then fixed: torch's "Kernel size can't be greater than actual input size".
    vae = klvae.AutoencoderKL("tiny")
    f = vae.config.downsample_factor
    with pytest.raises(ValueError, match=rf"images of 1x{f - 1} pixels are smaller than one latent cell \({f}x{f}\)"):
        vae.encode(torch.zeros(1, 3, 1, f - 1))
