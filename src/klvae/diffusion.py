"""The forward (noising) side of DDPM for latents, as LDM's `DDPM.register_schedule` sets it up.

Schedule names follow diffusers, not LDM, because LDM's names are a trap:

==================  ===========================================  ===============  ====================
here (diffusers)    betas                                        LDM name         used by
==================  ===========================================  ===============  ====================
"scaled_linear"     linspace(sqrt(beta_start), sqrt(beta_end))²  "linear"         SD 1.x / 2.x, SDXL
"linear"            linspace(beta_start, beta_end)               "sqrt_linear"    pixel-space DDPM
"cosine"            Nichol & Dhariwal, betas clipped to 0.999    "cosine"         improved DDPM
==================  ===========================================  ===============  ====================

So an LDM config that says `linear` with `linear_start: 0.00085, linear_end: 0.012` is `scaled_linear` here.
Left out, the beta range is the one each name is known by: 1e-4..0.02 for "linear" (DDPM), 0.00085..0.012 for
"scaled_linear" (Stable Diffusion).
All tables are float64 (as LDM's numpy tables are); results are cast to the input's dtype at the end. So on
fp16/bf16 inputs they are closer to the exact values than diffusers' (which casts alphas_cumprod to the input's
dtype first) and may differ from its results by a few of those formats' rounding steps.

Argument order: LDM's `q_sample(x0, t, noise)` puts t second, its `get_v(x0, noise, t)` last; diffusers'
`add_noise(x0, noise, t)` and `get_velocity(x0, noise, t)` are here under those names, in that order.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Schedule = Literal["linear", "scaled_linear", "cosine"]


# The beta range each schedule is known by: pixel-space DDPM's for "linear" (diffusers' and LDM's defaults), Stable
# Diffusion's for "scaled_linear", which only SD-style latent models use.
DEFAULT_BETA_RANGE: dict[str, tuple[float, float]] = {"linear": (1e-4, 2e-2), "scaled_linear": (0.00085, 0.012)}


def make_betas(
    schedule: Schedule,
    num_steps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 8e-3,
) -> Tensor:
    """The float64 betas [num_steps] of a named schedule (LDM's `make_beta_schedule`, diffusers' names)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    default_start, default_end = DEFAULT_BETA_RANGE.get(schedule, (0.0, 0.0))
    beta_start = default_start if beta_start is None else beta_start
    beta_end = default_end if beta_end is None else beta_end
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps + cosine_s
        alphas_cumprod = torch.cos(t / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        # The clip keeps the last step from being beta = 1, where x_T would carry no signal and 1/sqrt(alpha) blows up.
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0.0, 0.999)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'linear', 'scaled_linear' or 'cosine'")


def table_dtype(device: torch.device) -> torch.dtype:
    """The dtype of noise tables on `device`: float64 as in LDM, float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] shaped [B, 1, ..., 1] to broadcast against an [B, ...] tensor of `ndim` dims."""
    values = table.to(device=t.device, dtype=table_dtype(t.device))[t]
    return values.reshape(t.shape[0], *([1] * (ndim - 1)))


def _combine(ta: Tensor, a: Tensor, tb: Tensor, b: Tensor, t: Tensor, sign: float) -> Tensor:
    """ta[t] * a + sign * tb[t] * b in the tables' precision, returned in a's dtype."""
    wd = table_dtype(a.device)
    out = _extract(ta, t, a.ndim) * a.to(wd) + sign * _extract(tb, t, a.ndim) * b.to(wd)
    return out.to(a.dtype)


# `NoiseSchedule("scaled_linear")` reads like diffusers' scheduler call, but this constructor takes betas.
_NAMED = "for a named schedule use NoiseSchedule.from_name('scaled_linear') or NoiseSchedule.sd()"


def _betas_tensor(betas: Tensor) -> Tensor:
    """betas as a flat float64 CPU tensor; a TypeError naming the right constructors for a name or non-numbers."""
    if isinstance(betas, str | bytes):
        raise TypeError(f"NoiseSchedule takes betas, not a name: use NoiseSchedule.from_name({betas!r}) (or "
                        "NoiseSchedule.sd() for Stable Diffusion's schedule)")
    try:
        return torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        # torch's own message ("new(): invalid data type 'str'") names neither the argument nor the way out.
        raise TypeError(f"betas must be numbers, got {type(betas).__name__}; {_NAMED}") from None


class NoiseSchedule:
    """q(x_t | x_0) and q(x_{t-1} | x_t, x_0) for a beta schedule: LDM's buffer set, float64."""

    def __init__(self, betas: Tensor, v_posterior: float = 0.0) -> None:
        betas = _betas_tensor(betas)
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must be a non-empty 1-D tensor with every value in (0, 1); {_NAMED}")
        self.betas = betas
        self.num_steps = betas.numel()
        self.v_posterior = v_posterior
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - ab)
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()
        # v_posterior blends the two natural choices of reverse variance: beta-tilde (0) and beta (1).
        self.posterior_variance = (1 - v_posterior) * betas * (1.0 - ab_prev) / (1.0 - ab) + v_posterior * betas
        # posterior_variance[0] is 0 (x_0 is known at t=0), so the log is clipped as LDM does.
        self.posterior_log_variance_clipped = torch.log(self.posterior_variance.clamp(min=1e-20))
        self.posterior_mean_coef1 = betas * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * self.alphas.sqrt() / (1.0 - ab)

    @classmethod
    def from_name(cls, schedule: Schedule, num_steps: int = 1000, **kwargs: float | None) -> NoiseSchedule:
        """A schedule from `make_betas` arguments."""
        return cls(make_betas(schedule, num_steps, **kwargs))

    @classmethod
    def sd(cls) -> NoiseSchedule:
        """Stable Diffusion's (1.x, 2.x, SDXL) training schedule: scaled_linear 0.00085..0.012, 1000 steps."""
        return cls(make_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012))

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_steps={self.num_steps}, beta[0]={self.betas[0]:.6g}, beta[-1]={self.betas[-1]:.6g})"

    def _check_t(self, t: Tensor | int, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            hint = ""
            if t.ndim > 1:  # a sample, not timesteps: arguments swapped
                hint = (" shaped like a sample; check the argument order: q_sample(x0, t, noise), get_v(x0, noise, t), "
                        "diffusers' order add_noise(x0, noise, t), get_velocity(x0, noise, t)")
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}{hint}")
        if t.ndim == 0 or t.shape == (1,):  # one timestep for the whole batch, as diffusers broadcasts it
            t = t.reshape(()).expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must be [B] with B = {x.shape[0]}, got shape {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}]")
        return t.long()

    def q_sample(
        self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps; eps is drawn (from `generator`) when not given."""
        t = self._check_t(t, x0)
        if noise is None:
            noise_dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=noise_dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        return _combine(self.sqrt_alphas_cumprod, x0, self.sqrt_one_minus_alphas_cumprod, noise, t, sign=1.0)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """`q_sample` in diffusers' `DDPMScheduler.add_noise` argument order (noise before the timesteps)."""
        return self.q_sample(x0, t, noise)

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """`get_v` under diffusers' name (`DDPMScheduler.get_velocity`, the same order)."""
        return self.get_v(x0, noise, t)

    def q_mean_variance(self, x0: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0); the latter two are [B, 1, ..., 1]."""
        t = self._check_t(t, x0)
        mean = _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0.to(table_dtype(x0.device))
        var = _extract(1.0 - self.alphas_cumprod, t, x0.ndim)
        log_var = _extract(self.log_one_minus_alphas_cumprod, t, x0.ndim)
        return mean.to(x0.dtype), var.to(x0.dtype), log_var.to(x0.dtype)

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """x_0 = x_t / sqrt(ab_t) - sqrt(1/ab_t - 1) eps: the inverse of `q_sample` for a known eps."""
        t = self._check_t(t, x_t)
        return _combine(self.sqrt_recip_alphas_cumprod, x_t, self.sqrt_recipm1_alphas_cumprod, noise, t, sign=-1.0)

    def get_v(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The v-prediction target sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (SD 2.x's 768 models)."""
        t = self._check_t(t, x0)
        out = _combine(self.sqrt_alphas_cumprod, noise, self.sqrt_one_minus_alphas_cumprod, x0, t, sign=-1.0)
        return out.to(x0.dtype)

    def predict_start_from_v(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v: the inverse of `get_v` given x_t."""
        t = self._check_t(t, x_t)
        return _combine(self.sqrt_alphas_cumprod, x_t, self.sqrt_one_minus_alphas_cumprod, v, t, sign=-1.0)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0); the latter two [B, 1, ..., 1]."""
        t = self._check_t(t, x_t)
        wd = table_dtype(x_t.device)
        mean = _extract(self.posterior_mean_coef1, t, x_t.ndim) * x0.to(wd)
        mean = mean + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t.to(wd)
        var = _extract(self.posterior_variance, t, x_t.ndim)
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean.to(x_t.dtype), var.to(x_t.dtype), log_var.to(x_t.dtype)

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ab_t / (1 - ab_t) at timesteps t, float64 (float32 on MPS)."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}]")
        ab = self.alphas_cumprod.to(device=t.device, dtype=table_dtype(t.device))[t.long()]
        return ab / (1.0 - ab)
