"""Pins what a mutation audit of the DDPM and rectified-flow schedules and of `klvae noise` found untested: make_betas
refusing 0 steps, the argument-order hint for 2-D samples given as timesteps, the zero-SNR refusal of x_0 from the
noise for any row at the last step, a lone beta of 1 refused as out of (0, 1), the float32 tables on MPS, the float32
noise drawn for half-precision latents, the repr's last beta, a bytes name, v_posterior = 1 giving beta itself; the
exponent of time_shift, its unknown kinds, latents without two positive trailing sizes, 2-D timesteps to scale_noise,
the repr of a mu-shifted table and a generator that is not one; and noise's --num-steps ceiling, an infinite --shift,
--batch-size latents per decoder pass and the label margin that decides when a label is split."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from helpers import one_error_line, rgb_image
from klvae.cli import noise
from klvae.cli.main import main
from klvae.diffusion import NoiseSchedule, make_betas, rescale_zero_terminal_snr, table_dtype
from klvae.flow import FlowSchedule, compute_density_for_timestep_sampling, flux2_image_seq_len, time_shift

# ---------------------------------------------------------------- DDPM


def test_make_betas_refuses_zero_steps() -> None:
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        make_betas("linear", 0)


def test_a_two_dimensional_sample_given_as_timesteps_names_the_argument_order() -> None:
    s, x = NoiseSchedule.sd(), torch.zeros(2, 4)
    with pytest.raises(TypeError, match="shaped like a sample; check the argument order"):
        s.q_sample(x, x, torch.tensor([1, 2]))


def test_zero_snr_refuses_x0_from_noise_when_any_row_is_at_the_last_step() -> None:
    s = NoiseSchedule(rescale_zero_terminal_snr(make_betas("scaled_linear", 10)), zero_terminal_snr=True)
    x = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="at t = 9 of a zero-terminal-SNR schedule"):
        s.predict_start_from_noise(x, torch.tensor([0, 9]), x)
    assert torch.isfinite(s.predict_start_from_noise(x, torch.tensor([0, 8]), x)).all()


def test_a_lone_beta_of_1_is_out_of_range_not_a_zero_snr_schedule() -> None:
    with pytest.raises(ValueError, match=r"every value in \(0, 1\)"):
        NoiseSchedule(torch.tensor([1.0]))


def test_tables_are_float32_on_mps_and_float64_elsewhere() -> None:
    assert table_dtype(torch.device("mps")) == torch.float32
    assert table_dtype(torch.device("cpu")) == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_q_sample_draws_float32_noise_for_half_precision_latents(dtype: torch.dtype) -> None:
    s = NoiseSchedule.sd()
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    t = torch.tensor([10, 700])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    drawn = s.q_sample(x0, t, generator=torch.Generator().manual_seed(9))
    assert drawn.dtype == dtype
    assert torch.equal(drawn, s.q_sample(x0, t, eps))


def test_repr_gives_the_first_and_last_beta() -> None:
    assert repr(NoiseSchedule.sd()) == "NoiseSchedule(num_steps=1000, beta[0]=0.00085, beta[-1]=0.012)"


def test_noise_schedule_given_a_bytes_name_names_from_name() -> None:
    with pytest.raises(TypeError, match=r"not a name: use NoiseSchedule.from_name\(b'linear'\)"):
        NoiseSchedule(b"linear")  # type: ignore[arg-type]


def test_v_posterior_of_1_makes_the_posterior_variance_beta() -> None:
    betas = make_betas("linear", 10)
    s = NoiseSchedule(betas, v_posterior=1.0)
    assert torch.allclose(s.posterior_variance, betas, rtol=1e-15, atol=0)


# ---------------------------------------------------------------- rectified flow


def test_exponential_time_shift_raises_the_odds_to_sigma() -> None:
    got = time_shift(1.0, 2.0, torch.tensor([0.25], dtype=torch.float64)).item()
    assert got == pytest.approx(math.e / (math.e + 3.0**2), rel=1e-12)


@pytest.mark.parametrize("kind", ["log", "Exponential"])
def test_time_shift_refuses_an_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match=f"kind must be 'exponential' or 'linear', got '{kind}'"):
        time_shift(0.5, 1.0, [0.5], kind=kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(16, 0, 8), (16, 8, 0), (8,)])
def test_a_latent_without_two_positive_trailing_sizes_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"ending in \[h, w\] with h, w >= 1"):
        flux2_image_seq_len(shape)


def test_scale_noise_given_a_2d_sample_as_timesteps_names_the_argument_order() -> None:
    s, x = FlowSchedule(1000), torch.zeros(2, 4)
    sample_like = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))  # values that are valid timesteps
    with pytest.raises(TypeError, match=r"timesteps must be a number or \[B\], got shape \(2, 4\)"):
        s.scale_noise(x, sample_like, 500.0)  # type: ignore[arg-type]


def test_repr_of_a_mu_shifted_table_gives_its_mu() -> None:
    assert repr(FlowSchedule(1000, mu=0.5)) == "FlowSchedule(num_train_timesteps=1000, mu=0.5)"


def test_density_sampling_refuses_a_generator_that_is_not_one() -> None:
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator, got int"):
        compute_density_for_timestep_sampling("uniform", 2, generator=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- klvae noise


def test_noise_refuses_more_steps_than_its_ceiling(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    assert main(["noise", img, "-o", str(tmp_path / "s.png"), "--num-steps", "100001", "--steps", "0"]) == 2
    assert "--num-steps must lie in [1, 100000], got 100001" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "s.png").exists()


def test_noise_refuses_an_infinite_shift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    argv = ["noise", img, "-o", str(tmp_path / "s.png"), "--schedule", "flow", "--shift", "inf", "--steps", "500"]
    assert main(argv) == 2
    assert "--shift must be a number > 0 or auto, got inf" in one_error_line(capsys.readouterr().err)


def test_noise_decodes_batch_size_latents_per_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[int] = []
    decode = noise.inference.decode

    def counting(vae: object, z: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        passes.append(z.shape[0])
        return decode(vae, z, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(noise.inference, "decode", counting)
    img = str(rgb_image(tmp_path / "a.png"))
    argv = ["-q", "noise", img, "-o", str(tmp_path / "s.png"), "--steps", "0", "500", "999", "--batch-size", "2"]
    assert main(argv) == 0
    assert passes == [2, 1]


def test_a_label_is_split_unless_it_fits_inside_the_tiles_margins() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = "t=0  SNR=1.23"
    width = math.ceil(draw.textlength(label))  # as wide as the label: no room for the margins on either side
    assert noise._label_text(draw, label, width) == "t=0\nSNR=1.23"
    assert noise._label_text(draw, label, width + 8) == label
