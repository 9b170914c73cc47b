"""A user trial of the Python API: one failing test per finding (tiny models or meta-device presets, CPU, fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from safetensors.torch import save_file

import klvae
from klvae.diffusion import NoiseSchedule
from klvae.flow import FlowSchedule
from klvae.model.config import PRESETS, AutoencoderKLConfig
from klvae.weights.convert import diffusers_to_ldm


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text.strip(), text
    return text


# ---- 1. a schedule's name given to the constructor that takes numbers ----

@pytest.mark.parametrize("betas", ["scaled_linear", ["a", "b"], None])
def test_noise_schedule_given_a_name_names_the_right_constructors(betas: Any) -> None:
    """`NoiseSchedule("scaled_linear")` read as diffusers' call, but raised torch's `new(): invalid data type
    'str'` from torch.as_tensor: name from_name / sd() instead."""
    with pytest.raises((TypeError, ValueError)) as e:
        NoiseSchedule(betas)
    text = _one_line(e)
    assert "NoiseSchedule.from_name(" in text and "NoiseSchedule.sd()" in text, text


@pytest.mark.parametrize("arg", ["sd3", torch.full((1000,), 0.5)])
def test_flow_schedule_given_a_name_or_sigmas_names_the_right_constructors(arg: Any) -> None:
    """FlowSchedule's first argument is num_train_timesteps: a name (or a table) said only "must be an integer"
    (a tensor's repr, many lines, for a table)."""
    with pytest.raises((TypeError, ValueError)) as e:
        FlowSchedule(arg)
    text = _one_line(e)
    assert "FlowSchedule.sd3()" in text and "FlowSchedule.flux(" in text, text


# ---- 2. FLUX.2 without latent statistics: wrong channels went through ----

def _flux2_without_statistics() -> klvae.AutoencoderKL:
    with torch.device("meta"):  # scaling uses no weight: the full preset without allocating or initialising it
        return klvae.AutoencoderKL("flux2")


def test_flux2_unscale_of_a_vae_latent_is_an_error_naming_the_expected_shape() -> None:
    """unscale_latents of a [1, 32, 4, 4] VAE latent returned [1, 8, 8, 8] when the model had no statistics
    (with them it raised): the channel check ran only against latents_mean."""
    vae = _flux2_without_statistics()
    assert vae.config.latents_mean is None
    with pytest.raises(ValueError) as e:
        vae.unscale_latents(torch.randn(1, 32, 4, 4))
    text = _one_line(e)
    assert "(1, 32, 4, 4)" in text and "[B, 128, h, w]" in text, text
    assert vae.unscale_latents(torch.randn(1, 128, 4, 4)).shape == (1, 32, 8, 8)


def test_flux2_scale_of_an_already_scaled_latent_is_an_error() -> None:
    """scale_latents of a [1, 128, 8, 8] (scaled twice) made a [1, 512, 4, 4] without statistics."""
    vae = _flux2_without_statistics()
    with pytest.raises(ValueError) as e:
        vae.scale_latents(torch.randn(1, 128, 8, 8))
    text = _one_line(e)
    assert "(1, 128, 8, 8)" in text and "[B, 32, h, w]" in text, text
    assert vae.scale_latents(torch.randn(1, 32, 8, 8)).shape == (1, 128, 4, 4)


@pytest.mark.parametrize("method", ["scale_latents", "unscale_latents"])
def test_scaling_latents_of_the_wrong_channel_count_is_an_error(method: str) -> None:
    """An SD-style model (4 channels, one scale) scaled a 16-channel FLUX latent elementwise without a word."""
    vae = klvae.AutoencoderKL(PRESETS["tiny"])
    with pytest.raises(ValueError) as e:
        getattr(vae, method)(torch.randn(1, 16, 8, 8))
    text = _one_line(e)
    assert "(1, 16, 8, 8)" in text and "[B, 4, h, w]" in text, text


# ---- 3. sample_timesteps in float32, as diffusers' training scripts hold them ----

@pytest.mark.parametrize("schedule", [FlowSchedule(), FlowSchedule.sd3()], ids=["shift1", "sd3"])
def test_sampled_sigmas_keep_fp32_latents_fp32(schedule: FlowSchedule) -> None:
    """The float64 sigmas of sample_timesteps promoted a script's `(1 - s) z + s n` to float64, which the float32
    model refused; diffusers' scripts hold timesteps and sigmas in float32 (the scheduler's table and get_sigmas)."""
    t, sig = schedule.sample_timesteps(4, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert t.dtype == sig.dtype == torch.float32
    vae = klvae.AutoencoderKL(PRESETS["tiny"]).eval()
    z, n = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    s = sig.view(-1, 1, 1, 1)
    noisy = (1 - s) * z + s * n
    assert noisy.dtype == torch.float32
    with torch.no_grad():
        assert vae.decode(noisy).shape == (4, 3, 8, 8)


def test_sampled_timesteps_are_diffusers_values() -> None:
    """Same rows as diffusers' table after `(u * T).long()`: the unshifted table bit for bit, SD3's within a few
    float32 steps (klvae rounds the float64 value once; diffusers computes the shift in float32)."""
    u = torch.sigmoid(torch.normal(0.0, 1.0, (64,), generator=torch.Generator().manual_seed(1)))
    idx = (u * 1000).long()
    for ours, shift in ((FlowSchedule(), 1.0), (FlowSchedule.sd3(), 3.0)):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        t, sig = ours.sample_timesteps(64, "logit_normal", generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(sig, ref.sigmas[idx], rtol=0, atol=0 if shift == 1 else 2e-7)
        torch.testing.assert_close(t, ref.timesteps[idx], rtol=0, atol=0 if shift == 1 else 2e-4)


# ---- 4. an inferred norm_num_groups is a guess, not the user's choice ----

def test_inferred_group_count_warning_does_not_blame_the_user(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metadata-less LDM file of width 16: norm_num_groups 16 is guessed, and the config's warning told the
    user to "use norm_num_groups <= 8", a value they never set."""
    cfg = AutoencoderKLConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
    model = klvae.AutoencoderKL(cfg)
    path = tmp_path / "vae.safetensors"
    save_file(diffusers_to_ldm({k: v.contiguous() for k, v in model.state_dict().items()}), str(path))
    with caplog.at_level("WARNING"):
        back = klvae.AutoencoderKL.from_pretrained(path)
    assert back.config.norm_num_groups == 16
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "use norm_num_groups <=" not in text, text
    assert "guess" in text and "one channel per GroupNorm group at width 16" in text, text


def test_a_chosen_group_count_still_gets_the_advice(caplog: pytest.LogCaptureFixture) -> None:
    """(Not a bug) The user's own norm_num_groups 16 at width 16 still gets the advice."""
    with caplog.at_level("WARNING"):
        AutoencoderKLConfig(block_out_channels=(16, 32), norm_num_groups=16)
    assert "use norm_num_groups <= 8" in caplog.text


def test_flux2_statistics_added_on_load_do_not_repeat_the_advice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metadata-less FLUX.2 file of width 16: loading adds the bn statistics with a config.replace outside the
    guesser's guard, which rebuilt the guessed config and told the user to "use norm_num_groups <= 8"."""
    from klvae.weights.latent_bn import latent_bn_tensors

    cfg = PRESETS["flux2"].replace(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                   sample_size=32, latents_mean=(0.1,) * 128, latents_std=(1.5,) * 128)
    sd = {k: v.contiguous() for k, v in klvae.AutoencoderKL(cfg).state_dict().items()}
    path = tmp_path / "vae.safetensors"
    save_file({**sd, **latent_bn_tensors(cfg)}, str(path))
    with caplog.at_level("WARNING"):
        back = klvae.AutoencoderKL.from_pretrained(path)
        back.config.replace(scaling_factor=1.0)  # as `klvae latents` sets a file's factors on the loaded model
    assert back.config.norm_num_groups == 16 and back.config.latents_std[0] == pytest.approx(1.5)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "use norm_num_groups <=" not in text, text
    assert "guess" in text and "one channel per GroupNorm group at width 16" in text, text


def test_replacing_the_group_count_still_gets_the_advice(caplog: pytest.LogCaptureFixture) -> None:
    """(Not a bug) A replace that sets the widths or the group count is the user's choice: advised as before."""
    base = AutoencoderKLConfig(block_out_channels=(16, 32), norm_num_groups=8)
    with caplog.at_level("WARNING"):
        base.replace(norm_num_groups=16)
    assert "use norm_num_groups <= 8" in caplog.text
