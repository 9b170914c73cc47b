"""Pins bugs a hunt of the noise schedules (klvae.diffusion, klvae.flow, `klvae noise`) found:

- a Python float sigma (noisy, predict_start_from_velocity, predict_noise_from_velocity) or timestep
  (FlowSchedule.scale_noise / add_noise) goes through float32 (torch.as_tensor's default dtype) before the
  float64 math, so float64 latents come back off by ~1e-8 and float32 ones are rounded twice, not once;
- a 0-d latent given to q_sample / get_v / noisy / scale_noise is a bare IndexError from deep inside;
- `klvae noise --shift auto` counts FLUX.1 / FLUX.2 tokens on the padded latent (image sides rounded up), where
  the pipelines floor the image's sides: a 42-pixel side gives another mu than FLUX would use;
- betas too small to change 1 - beta in float64 (1e-17) are taken, and alpha-bar stays exactly 1: the posterior at
  t = 0 is 0/0, NaN, silently (the same trap as the beta of 0 that make_betas refuses);
- (doubtful items, then fixed) a timestep past int64 called no number; sigmas passed to a flow table's
  add_noise/scale_noise as timesteps noised next to nothing, silently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import flux_like_models, one_error_line
from klvae import flow
from klvae.cli.main import main
from klvae.diffusion import NoiseSchedule
from klvae.flow import FlowSchedule


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64),
            torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64))


# ---- Python floats go through float32 ----

_SIGMA_FUNCS: dict[str, Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]] = {
    "noisy": flow.noisy,  # type: ignore[dict-item]
    "predict_start_from_velocity": flow.predict_start_from_velocity,  # type: ignore[dict-item]
    "predict_noise_from_velocity": flow.predict_noise_from_velocity,  # type: ignore[dict-item]
}


@pytest.mark.parametrize("name", list(_SIGMA_FUNCS))
@pytest.mark.parametrize("sigma", [0.2, [0.2, 0.3]])
def test_a_python_float_sigma_is_used_in_double_precision(name: str, sigma: float | list[float]) -> None:
    """noisy(x0, eps, 0.2) on float64 latents used sigma = float32(0.2) = 0.20000000298..., 1e-8 off; the same
    call with the float64 tensor of 0.2 is exact. (The shift functions were fixed for this; these were not.)"""
    a, b = _pair()
    fn = _SIGMA_FUNCS[name]
    want = fn(a, b, torch.tensor(sigma, dtype=torch.float64))
    torch.testing.assert_close(fn(a, b, sigma), want, rtol=0, atol=1e-15)


def test_a_python_float_sigma_rounds_float32_latents_once() -> None:
    """The module promises float32 results rounded once from the float64 math; a Python float sigma was rounded
    to float32 first, and some elements came back one float32 step off."""
    a, b = _pair()
    a32, b32 = a.float(), b.float()
    sigma = 0.1
    want = ((1 - sigma) * a32.double() + sigma * b32.double()).float()
    assert torch.equal(flow.noisy(a32, b32, sigma), want)


@pytest.mark.parametrize("method", ["scale_noise", "add_noise"])
def test_a_python_float_timestep_is_used_in_double_precision(method: str) -> None:
    """SD3's table holds float64 timesteps such as 955.3376906318082; passed as a Python float (`.item()`), it
    became float32 955.33771 and the noising was 7e-8 off the same call with the tensor."""
    s = FlowSchedule.sd3()
    a, b = _pair()
    t = s.timesteps[123]
    assert t.item() != float(t.float().item())  # a value that float32 does not hold
    if method == "scale_noise":
        got, want = s.scale_noise(a, t.item(), b), s.scale_noise(a, t, b)
    else:
        got, want = s.add_noise(a, b, t.item()), s.add_noise(a, b, t)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


# ---- a 0-d latent ----

_ZERO_D_CALLS: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
    "q_sample": lambda x, e: NoiseSchedule.sd().q_sample(x, 5, e),
    "get_v": lambda x, e: NoiseSchedule.sd().get_v(x, e, 5),
    "noisy": lambda x, e: flow.noisy(x, e, 0.5),
    "scale_noise": lambda x, e: FlowSchedule().scale_noise(x, 500.0, e),
}


@pytest.mark.parametrize("name", list(_ZERO_D_CALLS))
def test_a_zero_dimensional_latent_is_a_clear_error(name: str) -> None:
    """A 0-d tensor has no batch dimension: these raised a bare IndexError ("tuple index out of range") from
    `x.shape[0]` inside the timestep / sigma handling, naming no argument."""
    with pytest.raises((ValueError, TypeError), match=r"(?i)shape|batch|dimension|latent|sample|x0"):
        _ZERO_D_CALLS[name](torch.tensor(1.0), torch.tensor(0.5))


# ---- klvae noise --shift auto: the pipeline's token count ----

@pytest.fixture(scope="module")
def auto_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return flux_like_models(tmp_path_factory.mktemp("auto_models"))


@pytest.mark.parametrize(("family", "height", "words"), [
    # the tiny model halves each side (f = 2). FLUX.1's pipeline: latent side 2 * (H // (2f)), tokens (side / 2)²
    # per axis: 43 -> 20 -> 10 rows, 56 -> 28 -> 14 columns = 140. klvae padded 43 to 44: 22 -> 11 rows, 154.
    ("flux", 43, f"FLUX.1 mu {flow.calculate_shift(140):.4g} for 140 tokens;"),
    # FLUX.2's: the same floor (2 * (H // (2f))), then its 2x2 patches: 42 -> 20 -> 10 rows; klvae padded 42 to
    # 44 (its size multiple 4): 11 rows, 154 tokens.
    ("flux2", 42, f"FLUX.2 (50 steps) mu {flow.compute_empirical_mu(140, 50):.4g} for 140 tokens;"),
])
def test_noise_shift_auto_counts_the_tokens_the_pipeline_would(
    family: str, height: int, words: str, tmp_path: Path, auto_models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The mu of `--shift auto` is that of FLUX's pipelines for this image's size; they floor the sides to their
    multiple (pipeline_flux*.py: `height = 2 * (int(height) // (self.vae_scale_factor * 2))`), and klvae's own
    flux_image_seq_len floors odd latent sides for that reason. But the CLI counted the latent of the padded
    image, whose sides are rounded up: more tokens, another mu, than FLUX would use."""
    img = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, 56, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "sheet.png"
    assert main(["noise", str(img), "-o", str(out), "--schedule", "flow", "--shift", "auto", "--steps", "500",
                 "--model", str(auto_models[family])]) == 0
    assert words in capsys.readouterr().out


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_noise_shift_auto_of_an_image_under_one_token_names_the_image(
    family: str, tmp_path: Path, auto_models: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    """An image smaller than one FLUX token was refused (after encoding it) as a latent 'ending in [h, w] with h,
    w >= 1', a latent the user never gave: the refusal names the image and the token's size in pixels."""
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((3, 56, 3), dtype=np.uint8)).save(img)
    argv = ["noise", str(img), "-o", str(tmp_path / "sheet.png"), "--schedule", "flow", "--shift", "auto",
            "--steps", "500", "--model", str(auto_models[family])]
    assert main(argv) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"is smaller than one {'FLUX.1' if family == 'flux' else 'FLUX.2'} token (4x4 pixels)" in err, err


# ---- betas below float64's resolution ----

@pytest.mark.parametrize("make", [
    lambda: NoiseSchedule.from_name("linear", 10, beta_start=1e-17),
    lambda: NoiseSchedule.from_name("scaled_linear", 10, beta_start=1e-40),
    lambda: NoiseSchedule(torch.tensor([1e-17, 0.1, 0.2], dtype=torch.float64)),
])
def test_betas_that_leave_alpha_bar_at_1_are_refused(make: Callable[[], NoiseSchedule]) -> None:
    """1 - 1e-17 is 1.0 in float64: alpha-bar at t = 0 stays exactly 1, and q_posterior(x0, x_t, 0) came back
    NaN (posterior variance and mean coefficient 0/0 and beta/0), SNR(0) inf, without a word. make_betas refuses
    a beta of 0 for that very reason ("0 would make the first step noiseless, 0/0 later"); a beta that 1 - beta
    does not see is the same beta to the tables."""
    with pytest.raises(ValueError, match=r"(?i)beta"):
        s = make()
        x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
        mean, var, _ = s.q_posterior(x, x, 0)
        assert torch.isfinite(mean).all() and torch.isfinite(var).all()  # else fails here, not with ValueError


# ---- a follow-up: sigmas given where timesteps are taken ----

def test_sigmas_given_as_timesteps_are_refused_but_a_table_timestep_below_1_is_taken() -> None:
    x = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match=r"sigmas\? This takes diffusers' timesteps"):
        FlowSchedule.sd3().add_noise(x, x, torch.tensor([0.3, 0.7]))  # was: noised by 0.0003 and 0.0007
    low = FlowSchedule(1000, shift=0.5)  # its clean end: timestep 0.50025, on the table
    assert torch.equal(low.scale_noise(x, low.timesteps[-1], x + 1), torch.full_like(x, float(low.sigmas[-1])))


def test_a_timestep_past_int64_is_out_of_range_not_a_type_error() -> None:
    with pytest.raises(ValueError, match="timesteps 1180591620717411303424 is out of range"):
        NoiseSchedule.sd().q_sample(torch.zeros(1, 4, 2, 2), 2**70)  # was: TypeError "... got a int"
