"""DDPM and rectified-flow schedules against diffusers 0.42: diffusers' schedule name for the cosine betas and its
zero-terminal-SNR rescaling; arguments refused rather than broadcast, truncated or ignored, and a schedule's name
given to the constructor that takes numbers; timesteps of any integer dtype; `klvae noise`'s schedule options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as diffusers_rescale
from diffusers.training_utils import compute_snr
from PIL import Image

from helpers import one_error_line, one_line
from klvae import diffusion, flow
from klvae.cli.main import main
from klvae.diffusion import NoiseSchedule, make_betas
from klvae.flow import FlowSchedule

T = 1000
SD = {"beta_start": 0.00085, "beta_end": 0.012}


def _x(shape: tuple[int, ...] = (6, 4, 8, 8), seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _t() -> torch.Tensor:
    return torch.tensor([0, 1, 10, 500, 998, 999])


# ---- diffusers' names and options ----

def test_squaredcos_cap_v2_is_diffusers_name_for_the_cosine_betas() -> None:
    ours = NoiseSchedule.from_name("squaredcos_cap_v2", T)
    torch.testing.assert_close(ours.betas, make_betas("cosine", T), rtol=0, atol=0)
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    x0, eps = _x(), _x(seed=1)
    # diffusers' float32 alpha-bar table against klvae's float64 one: measured 7.4e-6 at most
    torch.testing.assert_close(ours.add_noise(x0, eps, _t()), ref.add_noise(x0, eps, _t()), rtol=0, atol=2e-5)


@pytest.mark.parametrize(("name", "kw"), [("scaled_linear", SD), ("linear", {}), ("squaredcos_cap_v2", {})])
def test_rescale_betas_zero_snr_is_diffusers(name: str, kw: dict[str, float]) -> None:
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=name, rescale_betas_zero_snr=True, **kw)
    ours = NoiseSchedule.from_name(name, T, rescale_betas_zero_snr=True, **kw)  # type: ignore[arg-type]
    # the same algorithm: equal bit for bit on the same float64 betas
    betas = make_betas(name, T, **kw)  # type: ignore[arg-type]
    ours_betas = diffusion.rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours_betas, diffusers_rescale(betas.clone()), rtol=0, atol=0)
    assert ours.alphas_cumprod[-1].item() == 0.0 == ref.alphas_cumprod[-1].item()
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)
    assert ours.snr(T - 1).item() == 0.0 == compute_snr(ref, torch.tensor([T - 1])).item()
    x0, eps, t = _x(), _x(seed=1), _t()
    # float32 rounding of diffusers' tables: measured 3.4e-5 (cosine's last steps), 2.4e-6 for the others
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=1e-4)
    last = torch.full((6,), T - 1)
    assert torch.equal(ours.add_noise(x0, eps, last), eps)  # pure noise: no signal left
    assert torch.equal(ours.get_velocity(x0, eps, last), -x0)


def test_the_zero_snr_step_refuses_x0_from_noise_but_gives_it_from_v() -> None:
    s = NoiseSchedule.from_name("scaled_linear", T, rescale_betas_zero_snr=True)
    x0, eps, last = _x(), _x(seed=1), torch.full((6,), T - 1)
    x_t = s.q_sample(x0, last, eps)
    with pytest.raises(ValueError, match=r"zero-terminal-SNR.*predict_start_from_v"):
        s.predict_start_from_noise(x_t, last, eps)  # 1/sqrt(0): inf and nan otherwise
    torch.testing.assert_close(s.predict_start_from_v(x_t, last, s.get_v(x0, eps, last)), x0, rtol=0, atol=1e-6)
    assert "zero_terminal_snr=True" in repr(s)


def test_betas_ending_in_one_need_the_zero_terminal_snr_flag() -> None:
    rescaled = diffusion.rescale_zero_terminal_snr(make_betas("scaled_linear", T))
    assert rescaled[-1].item() == 1.0
    with pytest.raises(ValueError, match="zero_terminal_snr=True"):
        NoiseSchedule(rescaled)
    assert NoiseSchedule(rescaled, zero_terminal_snr=True).alphas_cumprod[-1].item() == 0.0
    with pytest.raises(ValueError, match="rescale_zero_terminal_snr"):
        NoiseSchedule(make_betas("scaled_linear", T), zero_terminal_snr=True)
    with pytest.raises(ValueError, match="at least 2"):
        diffusion.rescale_zero_terminal_snr(torch.tensor([0.5]))


# ---- arguments that used to pass silently ----

@pytest.mark.parametrize("call", [
    lambda s, x, y, t: s.get_velocity(x, y, t),
    lambda s, x, y, t: s.get_v(x, y, t),
    lambda s, x, y, t: s.predict_start_from_noise(x, t, y),
    lambda s, x, y, t: s.predict_start_from_v(x, t, y),
    lambda s, x, y, t: s.q_posterior(y, x, t),
])
def test_a_second_tensor_of_another_shape_is_refused_not_broadcast(call: object) -> None:
    s, x, t = NoiseSchedule.sd(), _x(), _t()
    with pytest.raises(ValueError, match=r"shape \(1, 4, 8, 8\) differs"):
        call(s, x, x[:1], t)  # type: ignore[operator]


def test_add_noise_needs_the_noise() -> None:
    """diffusers' add_noise takes the noise; drawing it here would leave the caller without the target."""
    with pytest.raises(TypeError, match="noise must be a tensor"):
        NoiseSchedule.sd().add_noise(_x(), None, _t())  # type: ignore[arg-type]


def test_integer_latents_are_refused_not_truncated() -> None:
    x = torch.ones(6, 4, 8, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="floating-point"):
        NoiseSchedule.sd().add_noise(x, x, _t())


def test_integer_latents_are_refused_not_truncated_by_flow() -> None:
    x = torch.ones(6, 4, 8, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="floating-point"):
        flow.noisy(x, x, 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        flow.FlowSchedule().scale_noise(x, 500.0, x)


def test_snr_refuses_bool_timesteps() -> None:
    with pytest.raises(TypeError, match="integer"):
        NoiseSchedule.sd().snr(torch.tensor([True]))  # used to be read as t = 1


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_steps": 1000.0}, "num_steps must be an integer"),
    ({"num_steps": True}, "num_steps must be an integer"),
    ({"beta_start": 0.0}, "beta_start must be a number strictly between 0 and 1"),
    ({"beta_end": 1.0}, "beta_end must be a number strictly between 0 and 1"),
    ({"beta_end": float("nan")}, "beta_end must"),
])
def test_make_betas_names_the_bad_argument(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_betas("linear", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("v", [-0.5, 2.0, float("nan")])
def test_v_posterior_outside_the_blend_is_refused(v: float) -> None:
    with pytest.raises(ValueError, match="v_posterior"):
        NoiseSchedule(make_betas("linear", 10), v_posterior=v)


# ---- a schedule's name given to the constructor that takes numbers ----

@pytest.mark.parametrize("betas", ["scaled_linear", ["a", "b"], None])
def test_noise_schedule_given_a_name_names_the_right_constructors(betas: Any) -> None:
    """`NoiseSchedule("scaled_linear")` read as diffusers' call, but raised torch's `new(): invalid data type
    'str'` from torch.as_tensor: name from_name / sd() instead."""
    with pytest.raises((TypeError, ValueError)) as e:
        NoiseSchedule(betas)
    text = one_line(e)
    assert "NoiseSchedule.from_name(" in text and "NoiseSchedule.sd()" in text, text


@pytest.mark.parametrize("arg", ["sd3", torch.full((1000,), 0.5)])
def test_flow_schedule_given_a_name_or_sigmas_names_the_right_constructors(arg: Any) -> None:
    """FlowSchedule's first argument is num_train_timesteps: a name (or a table) said only "must be an integer"
    (a tensor's repr, many lines, for a table)."""
    with pytest.raises((TypeError, ValueError)) as e:
        FlowSchedule(arg)
    text = one_line(e)
    assert "FlowSchedule.sd3()" in text and "FlowSchedule.flux(" in text, text


# ---- parity kept: timesteps of any integer dtype, half-precision latents ----

@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize(("xdtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 0.25), (torch.float16, 0.02)])
def test_add_noise_and_velocity_match_diffusers_for_any_integer_timesteps(
        tdtype: torch.dtype, xdtype: torch.dtype, atol: float) -> None:
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", **SD)
    s, x0, eps = NoiseSchedule.sd(), _x(dtype=xdtype), _x(seed=1, dtype=xdtype)
    t = torch.tensor([0, 1, 10, 100, 200, 255]).to(tdtype)
    # measured: 1.9e-6 (fp32), 0.15 (bf16: values up to ~4, a few of its steps), 0.012 (fp16)
    for ours, theirs in ((s.add_noise(x0, eps, t), ref.add_noise(x0, eps, t.long())),
                         (s.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t.long()))):
        assert ours.dtype == xdtype
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=atol)


# ---- the CLI ----

def _noise_args(**changes: object) -> argparse.Namespace:
    args = {"schedule": "squaredcos_cap_v2", "num_steps": T, "beta_start": None, "beta_end": None,
            "zero_terminal_snr": True, "steps": [0, 500, 999]}
    return argparse.Namespace(**{**args, **changes})


def test_noise_cli_schedule_is_diffusers_with_rescale_betas_zero_snr() -> None:
    from klvae.cli.noise import _ddpm_noised

    z0, eps = _x((1, 4, 8, 8)), _x((1, 4, 8, 8), seed=1)
    zts, labels, what = _ddpm_noised(z0, eps, _noise_args())
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                  rescale_betas_zero_snr=True)
    want = torch.cat([ref.add_noise(z0, eps, torch.tensor([t])) for t in (0, 500, 999)])
    torch.testing.assert_close(zts, want, rtol=0, atol=1e-4)
    assert labels[-1] == "t=999  SNR=0" and "zero terminal SNR" in what


@pytest.mark.parametrize(("extra", "message"), [
    (["--schedule", "flow", "--zero-terminal-snr"], "--zero-terminal-snr rescales a beta schedule"),
    (["--zero-terminal-snr", "--num-steps", "1"], "--zero-terminal-snr needs --num-steps 2 or more"),
    (["--schedule", "squaredcos_cap_v2", "--beta-start", "0.001"], "not of squaredcos_cap_v2"),
])
def test_noise_cli_refuses_options_that_do_not_apply_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        extra: list[str], message: str) -> None:
    img = tmp_path / "i.png"
    Image.new("RGB", (32, 32), (90, 120, 60)).save(img)
    monkeypatch.setattr("klvae.cli.noise.load_model", lambda *a: pytest.fail("the model was loaded"))
    assert main(["noise", str(img), "-o", str(tmp_path / "s.png"), *extra]) == 2
    assert message in one_error_line(capsys.readouterr().err)
