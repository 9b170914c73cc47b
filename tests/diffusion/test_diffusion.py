"""The DDPM forward process for latents against closed forms and diffusers' DDPMScheduler."""

import math

import numpy as np
import pytest
import torch

from klvae.diffusion import NoiseSchedule, make_betas

T = 1000


def _x0(shape: tuple[int, ...] = (6, 4, 8, 8), dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _t(b: int = 6) -> torch.Tensor:
    return torch.tensor([0, 1, 10, 500, 998, 999][:b])


def test_betas_closed_forms() -> None:
    lin = make_betas("linear", T, 1e-4, 2e-2)
    np.testing.assert_allclose(lin.numpy(), np.linspace(1e-4, 2e-2, T), rtol=0, atol=1e-15)
    sl = make_betas("scaled_linear", T, 0.00085, 0.012)
    np.testing.assert_allclose(sl.numpy(), np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2, rtol=0, atol=1e-15)
    assert sl[0].item() == pytest.approx(0.00085, abs=1e-15) and sl[-1].item() == pytest.approx(0.012, abs=1e-15)
    assert lin.dtype == sl.dtype == torch.float64


def test_default_beta_ranges_are_each_names_own() -> None:
    """Left out, "linear" is DDPM's 1e-4..0.02 (diffusers' and LDM's defaults), "scaled_linear" SD's 0.00085..0.012."""
    lin = make_betas("linear", T)
    assert (lin[0].item(), lin[-1].item()) == pytest.approx((1e-4, 2e-2), abs=1e-15)
    torch.testing.assert_close(make_betas("scaled_linear", T), make_betas("scaled_linear", T, 0.00085, 0.012),
                               rtol=0, atol=0)
    assert NoiseSchedule.from_name("linear", T).alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=1e-2)


def test_cosine_betas_formula() -> None:
    s = 8e-3
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    want = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    got = make_betas("cosine", T).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got[-1] == 0.999 and (got > 0).all()
    # alpha-bar follows f(t) / f(0) until the clip bites at the very end
    ab = np.cumprod(1 - got)
    np.testing.assert_allclose(ab[:-1], [f(i + 1) / f(0) for i in range(T - 1)], rtol=1e-9)


def test_bad_schedule_and_betas() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic", T)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.0, 0.1]))
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize(
    ("ours", "theirs", "start", "end"),
    [
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
        ("linear", "linear", 1e-4, 2e-2),
        ("cosine", "squaredcos_cap_v2", 0.00085, 0.012),
    ],
)
def test_alphas_cumprod_match_diffusers(ours: str, theirs: str, start: float, end: float) -> None:
    import diffusers
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs, beta_start=start, beta_end=end)
    s = NoiseSchedule.from_name(ours, T, beta_start=start, beta_end=end)  # type: ignore[arg-type]
    # diffusers holds float32 tables; the gap is its rounding (cosine is the same formula, s = 0.008).
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ref.alphas_cumprod.double().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(s.betas.numpy(), ref.betas.double().numpy(), rtol=0, atol=1e-7)


def test_sd_constructor() -> None:
    s = NoiseSchedule.sd()
    assert s.num_steps == T
    torch.testing.assert_close(s.betas, make_betas("scaled_linear", T, 0.00085, 0.012), rtol=0, atol=0)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0046600, rel=1e-4)


def test_q_sample_closed_form_and_seeding() -> None:
    s, x0, t = NoiseSchedule.sd(), _x0(), _t()
    eps = _x0(seed=1)
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(s.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=0, atol=1e-14)
    a = s.q_sample(x0, t, generator=torch.Generator().manual_seed(3))
    b = s.q_sample(x0, t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, s.q_sample(x0, t, generator=torch.Generator().manual_seed(4)))
    # a scalar timestep broadcasts over the batch
    torch.testing.assert_close(s.q_sample(x0, 500, eps), s.q_sample(x0, torch.full((6,), 500), eps))


def test_predict_start_from_noise_inverts_q_sample() -> None:
    s, t = NoiseSchedule.sd(), _t()
    x0, eps = _x0(), _x0(seed=1)
    torch.testing.assert_close(s.predict_start_from_noise(s.q_sample(x0, t, eps), t, eps), x0, rtol=0, atol=1e-6)
    # in float32 the rounding of x_t is amplified by 1/sqrt(ab_T) ≈ 14.6 at the last step
    x32, e32 = x0.float(), eps.float()
    back = s.predict_start_from_noise(s.q_sample(x32, t, e32), t, e32)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, x32, rtol=0, atol=1e-5)


def test_v_prediction_round_trip() -> None:
    s, x0, eps, t = NoiseSchedule.sd(), _x0(), _x0(seed=1), _t()
    x_t, v = s.q_sample(x0, t, eps), s.get_v(x0, eps, t)
    torch.testing.assert_close(s.predict_start_from_v(x_t, t, v), x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule", ["scaled_linear", "cosine"])
def test_q_posterior_closed_form(schedule: str) -> None:
    s = NoiseSchedule.from_name(schedule, T)  # type: ignore[arg-type]
    x0, x_t, t = _x0(), _x0(seed=2), _t()
    beta = s.betas.numpy()
    ab = np.cumprod(1 - beta)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    tt = t.numpy()
    var = beta[tt] * (1 - ab_prev[tt]) / (1 - ab[tt])
    c1 = np.sqrt(ab_prev[tt]) * beta[tt] / (1 - ab[tt])
    c2 = np.sqrt(1 - beta[tt]) * (1 - ab_prev[tt]) / (1 - ab[tt])
    mean, v, logv = s.q_posterior(x0, x_t, t)
    want = c1[:, None, None, None] * x0.numpy() + c2[:, None, None, None] * x_t.numpy()
    np.testing.assert_allclose(mean.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v.flatten().numpy(), var, rtol=1e-12, atol=0)
    np.testing.assert_allclose(logv.flatten().numpy(), np.log(np.maximum(var, 1e-20)), rtol=1e-12)
    assert v.shape == (6, 1, 1, 1)
    # t = 0: x_0 is known, so the posterior is a point mass at x0
    torch.testing.assert_close(mean[0], x0[0], rtol=0, atol=1e-12)
    assert v[0].item() == 0.0 and logv[0].item() == pytest.approx(math.log(1e-20))


def test_posterior_variance_blends_beta_tilde_and_beta_with_v_posterior() -> None:
    beta = NoiseSchedule.sd().betas
    ab = torch.cumprod(1 - beta, 0)
    tilde = beta * (1 - torch.cat([ab.new_ones(1), ab[:-1]])) / (1 - ab)
    s = NoiseSchedule(beta, v_posterior=0.25)
    torch.testing.assert_close(s.posterior_variance, 0.75 * tilde + 0.25 * beta)


def test_q_mean_variance() -> None:
    s, x0, t = NoiseSchedule.sd(), _x0(), _t()
    mean, var, logvar = s.q_mean_variance(x0, t)
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, ab.sqrt() * x0)
    torch.testing.assert_close(var, 1 - ab)
    torch.testing.assert_close(logvar, torch.log(1 - ab))


def test_snr() -> None:
    s = NoiseSchedule.sd()
    t = torch.arange(T)
    snr = s.snr(t)
    torch.testing.assert_close(snr, s.alphas_cumprod / (1 - s.alphas_cumprod))
    assert (snr[1:] < snr[:-1]).all()
    assert s.snr(999).item() == pytest.approx(0.0046600 / (1 - 0.0046600), rel=1e-3)


def test_last_step_is_near_unit_gaussian() -> None:
    s = NoiseSchedule.sd()
    x0 = _x0((8, 4, 64, 64), dtype=torch.float32, seed=5)  # unit-variance "latents"
    x_t = s.q_sample(x0, torch.full((8,), T - 1), generator=torch.Generator().manual_seed(6))
    assert x_t.var().item() == pytest.approx(1.0, abs=0.01)
    assert abs(x_t.mean().item()) < 0.01
    # only sqrt(ab_T) ≈ 0.068 of the signal is left
    corr = torch.corrcoef(torch.stack([x0.flatten(), x_t.flatten()]))[0, 1].item()
    assert corr == pytest.approx(s.sqrt_alphas_cumprod[-1].item(), abs=0.01)


def test_dtype_kept_and_timestep_checks() -> None:
    s, x = NoiseSchedule.sd(), _x0(dtype=torch.bfloat16)
    assert s.q_sample(x, _t()).dtype == torch.bfloat16
    assert all(o.dtype == torch.bfloat16 for o in s.q_posterior(x, x, _t()))
    with pytest.raises(TypeError):
        s.q_sample(x, torch.full((6,), 3.0))
    with pytest.raises(ValueError, match="lie in"):
        s.q_sample(x, torch.full((6,), T))
    for call in (lambda t: s.q_sample(x, t), lambda t: s.q_posterior(x, x, t), s.snr):
        with pytest.raises(ValueError, match="lie in"):  # -1 would index the last step silently
            call(torch.full((6,), -1))
    with pytest.raises(TypeError):
        s.q_sample(x, torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B\]"):
        s.q_sample(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="noise shape"):
        s.q_sample(x, _t(), noise=torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_and_get_velocity_in_diffusers_argument_order(dtype: torch.dtype) -> None:
    import diffusers
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012)
    s, x0, eps, t = NoiseSchedule.sd(), _x0(dtype=dtype), _x0(dtype=dtype, seed=1), _t()
    ours, theirs = s.add_noise(x0, eps, t), ref.add_noise(x0, eps, t)
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, s.q_sample(x0, t, eps), rtol=0, atol=0)
    # fp16: diffusers rounds its tables to fp16 first, klvae rounds only the result
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)
    torch.testing.assert_close(s.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=tol)
    # one timestep in a [1] tensor serves the whole batch, as in diffusers
    one = torch.tensor([500])
    torch.testing.assert_close(s.add_noise(x0, eps, one), ref.add_noise(x0, eps, one), rtol=0, atol=tol)


def test_swapped_noise_and_timesteps_name_the_argument_order() -> None:
    s, x0, eps, t = NoiseSchedule.sd(), _x0(dtype=torch.float32), _x0(dtype=torch.float32, seed=1), _t()
    with pytest.raises(TypeError, match=r"argument order.*add_noise\(x0, noise, t\)"):
        s.q_sample(x0, eps, t)  # type: ignore[arg-type]  # diffusers' habit
    with pytest.raises(TypeError, match=r"get_v\(x0, noise, t\)"):
        s.get_v(x0, t, eps)  # type: ignore[arg-type]
