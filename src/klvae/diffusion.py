"""The forward (noising) side of DDPM for latents, as LDM's `DDPM.register_schedule` sets it up.

Schedule names follow diffusers, not LDM, because LDM's names are a trap:

==================  ===========================================  ===============  ====================
here (diffusers)    betas                                        LDM name         used by
==================  ===========================================  ===============  ====================
"scaled_linear"     linspace(sqrt(beta_start), sqrt(beta_end))²  "linear"         SD 1.x / 2.x, SDXL
"linear"            linspace(beta_start, beta_end)               "sqrt_linear"    pixel-space DDPM
"cosine"            Nichol & Dhariwal, betas clipped to 0.999    "cosine"         improved DDPM
==================  ===========================================  ===============  ====================

"squaredcos_cap_v2", diffusers' name for the cosine betas, is taken too.

So an LDM config that says `linear` with `linear_start: 0.00085, linear_end: 0.012` is `scaled_linear` here.
Left out, the beta range is the one each name is known by: 1e-4..0.02 for "linear" (DDPM), 0.00085..0.012 for
"scaled_linear" (Stable Diffusion). diffusers' DDPMScheduler defaults to 1e-4..0.02 for both names, so
`DDPMScheduler(beta_schedule="scaled_linear")` is not SD's schedule but `from_name("scaled_linear")` is.
`rescale_betas_zero_snr=True` (diffusers' option of the same name, Lin et al. 2023) shifts and scales the
schedule so that its last step is pure noise: alpha-bar ends at exactly 0, the SNR at 0.
All tables are float64 (as LDM's numpy tables are); results are cast to the input's dtype at the end. So on
fp16/bf16 inputs they are closer to the exact values than diffusers' (which casts alphas_cumprod to the input's
dtype first) and may differ from its results by a few of those formats' rounding steps.

Argument order: LDM's `q_sample(x0, t, noise)` puts t second, its `get_v(x0, noise, t)` last; diffusers'
`add_noise(x0, noise, t)` and `get_velocity(x0, noise, t)` are here under those names, in that order.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from klvae.checks import is_integer, is_real

Schedule = Literal["linear", "scaled_linear", "cosine", "squaredcos_cap_v2"]
# diffusers' names for the schedules that klvae names otherwise.
SCHEDULE_ALIASES: dict[str, str] = {"squaredcos_cap_v2": "cosine"}


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
    if not is_integer(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    name = SCHEDULE_ALIASES.get(schedule, schedule) if isinstance(schedule, str) else ""
    if name in DEFAULT_BETA_RANGE:
        default_start, default_end = DEFAULT_BETA_RANGE[name]
        start = _beta("beta_start", default_start if beta_start is None else beta_start)
        end = _beta("beta_end", default_end if beta_end is None else beta_end)
        if name == "linear":
            return torch.linspace(start, end, num_steps, dtype=torch.float64)
        betas = torch.linspace(start**0.5, end**0.5, num_steps, dtype=torch.float64) ** 2  # scaled_linear
        if not bool((betas < 1).all()):  # a beta just below 1 squared back through its root rounds to 1
            raise ValueError(f"a beta of {max(start, end)!r} rounds to 1 in the scaled_linear schedule (through its "
                             "square root): use one below 0.999999999999999")
        return betas
    if name == "cosine":
        # The offset keeps the first steps' betas from vanishing; below 0 the table turns NaN or all zeros.
        if not is_real(cosine_s) or not 0 <= cosine_s < math.inf:  # also refuses nan
            raise ValueError(f"cosine_s must be a finite number >= 0 (8e-3 in Nichol & Dhariwal), got {cosine_s!r}")
        t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps + cosine_s
        alphas_cumprod = torch.cos(t / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        # The clip keeps the last step from being beta = 1, where x_T would carry no signal and 1/sqrt(alpha) blows up.
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0.0, 0.999)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'linear', 'scaled_linear' or 'cosine' "
                     "(diffusers' 'squaredcos_cap_v2')")


def _beta(name: str, value: object) -> float:
    """A beta range end: a number strictly between 0 and 1 (0 would make the first step noiseless, 0/0 later)."""
    if not is_real(value) or not 0 < value < 1:  # also refuses nan
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1; diffusers' function), float64: the
    last ends in 1, so that x_T is pure noise."""
    betas = _betas_tensor(betas)
    if betas.numel() < 2:
        raise ValueError("rescaling to zero terminal SNR needs at least 2 betas")
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    if abar_sqrt[-2] == 0:  # underflowed: the steps after would be 0/0
        k = int((abar_sqrt == 0).nonzero()[0])
        raise ValueError(f"these {betas.numel()} betas reach pure noise (alpha-bar 0 in float64) at step {k} already, "
                         "before the last: there is no terminal SNR to rescale; leave zero terminal SNR out")
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    # Shift so that the last step is 0, then scale so that the first keeps its value.
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    rescaled = 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    if not bool((rescaled > 0).all()):  # sqrt and square lost it: a step that adds no noise (t=0: a 0/0 posterior)
        k = int((~(rescaled > 0)).nonzero()[0])  # NaN too
        raise ValueError(f"beta {k}, {betas[k].item():.3g}, is too small to survive rescaling to zero terminal SNR "
                         "in float64 (it becomes 0 or NaN: that step would add no noise); use betas of 1e-15 or more")
    return rescaled


def number_tensor(value: object, name: str, device: torch.device | None = None) -> Tensor:
    """`value` (a number, a sequence of them, a NumPy array or a tensor) as a tensor on `device`, unsigned integers
    as int64 (torch reduces no uint16/32/64: NumPy's uint32 timesteps failed the range check); TypeError naming
    `name` for anything else (None, a string)."""
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got {value!r}")
    try:
        t = torch.as_tensor(value, device=device)
        if t.is_floating_point() and not hasattr(value, "dtype"):
            # Python floats are doubles: made float32 (torch's default), 0.2 would be off by 1e-8 in the float64
            # maths, and float32 latents rounded twice.
            t = torch.as_tensor(value, device=device, dtype=table_dtype(t.device))
    except (TypeError, ValueError, RuntimeError):
        if isinstance(value, int):  # a number indeed, past int64
            raise ValueError(f"{name} {value} is out of range") from None
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got a "
                        f"{type(value).__name__}") from None
    return t.long() if t.dtype in (torch.uint16, torch.uint32, torch.uint64) else t


def table_dtype(device: torch.device) -> torch.dtype:
    """The dtype of noise tables on `device`: float64 as in LDM, float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] shaped [B, 1, ..., 1] to broadcast against an [B, ...] tensor of `ndim` dims."""
    values = table.to(device=t.device, dtype=table_dtype(t.device))[t]
    return values.reshape(t.shape[0], *([1] * (ndim - 1)))


def _combine(ta: Tensor, a: Tensor, tb: Tensor, b: Tensor, t: Tensor, sign: float,
             dtype: torch.dtype | None = None) -> Tensor:
    """ta[t] * a + sign * tb[t] * b in the tables' precision, returned in `dtype` (a's by default)."""
    wd = table_dtype(a.device)
    out = _extract(ta, t, a.ndim) * a.to(wd) + sign * _extract(tb, t, a.ndim) * b.to(wd)
    return out.to(a.dtype if dtype is None else dtype)


# `NoiseSchedule("scaled_linear")` reads like diffusers' scheduler call, but this constructor takes betas.
_NAMED = "for a named schedule use NoiseSchedule.from_name('scaled_linear') or NoiseSchedule.sd()"


def _betas_tensor(betas: object) -> Tensor:
    """betas as a flat float64 CPU tensor; a TypeError naming the right constructors for a name or non-numbers."""
    if isinstance(betas, str | bytes):
        raise TypeError(f"NoiseSchedule takes betas, not a name: use NoiseSchedule.from_name({betas!r}) (or "
                        "NoiseSchedule.sd() for Stable Diffusion's schedule)")
    try:
        t = torch.as_tensor(betas, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError):
        # torch's own message ("new(): invalid data type 'str'") names neither the argument nor the way out.
        raise TypeError(f"betas must be numbers, got {type(betas).__name__}; {_NAMED}") from None
    if t.ndim > 1:  # flattened, a [2, T] table would pass for 2T steps
        raise ValueError(f"betas must be 1-D, one per step, got shape {tuple(t.shape)}")
    return t.flatten()


class NoiseSchedule:
    """q(x_t | x_0) and q(x_{t-1} | x_t, x_0) for a beta schedule: LDM's buffer set, float64."""

    def __init__(self, betas: Tensor, v_posterior: float = 0.0, *, zero_terminal_snr: bool = False) -> None:
        betas = _betas_tensor(betas)
        _check_betas(betas, zero_terminal_snr)
        if not is_real(v_posterior) or not 0 <= v_posterior <= 1:
            raise ValueError(f"v_posterior must be a number in [0, 1] (0: beta-tilde, 1: beta), got {v_posterior!r}")
        self.betas = betas
        self.zero_terminal_snr = zero_terminal_snr
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
    def from_name(cls, schedule: Schedule, num_steps: int = 1000, *, rescale_betas_zero_snr: bool = False,
                  **kwargs: Any) -> NoiseSchedule:
        """A schedule from `make_betas` arguments; `rescale_betas_zero_snr` as diffusers' DDPMScheduler has it."""
        betas = make_betas(schedule, num_steps, **kwargs)
        if rescale_betas_zero_snr:
            return cls(rescale_zero_terminal_snr(betas), zero_terminal_snr=True)
        return cls(betas)

    @classmethod
    def sd(cls) -> NoiseSchedule:
        """Stable Diffusion's (1.x, 2.x, SDXL) training schedule: scaled_linear 0.00085..0.012, 1000 steps."""
        return cls(make_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012))

    def __repr__(self) -> str:
        zero = ", zero_terminal_snr=True" if self.zero_terminal_snr else ""
        return (f"NoiseSchedule(num_steps={self.num_steps}, beta[0]={self.betas[0]:.6g}, "
                f"beta[-1]={self.betas[-1]:.6g}{zero})")

    def _timesteps(self, t: Tensor | int, device: torch.device | None = None) -> Tensor:
        """t as a long tensor on `device`, checked to be integers in [0, num_steps - 1]."""
        t = number_tensor(t, "timesteps", device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            hint = ""
            if t.ndim > 1:  # a sample, not timesteps: arguments swapped
                hint = (" shaped like a sample; check the argument order: q_sample(x0, t, noise), get_v(x0, noise, t), "
                        "diffusers' order add_noise(x0, noise, t), get_velocity(x0, noise, t)")
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}{hint}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_steps):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps - 1}]")
        return t.long()

    def _check_t(self, t: Tensor | int, x: Tensor, *others: tuple[str, Tensor | None]) -> Tensor:
        """t as [B] long timesteps for x (a floating tensor), after checking that `others` (name, tensor) are
        shaped like x: mismatched ones would broadcast into a silently wrong result."""
        if isinstance(x, Tensor) and x.ndim == 0:  # before the timesteps, whose checks read its batch size
            raise ValueError("latents must have a batch dimension ([B, ...]), got a 0-d tensor")
        t = self._timesteps(t, x.device if isinstance(x, Tensor) else None)
        _check_sample(x, others)
        if t.ndim == 0 or t.shape == (1,):  # one timestep for the whole batch, as diffusers broadcasts it
            t = t.reshape(()).expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must be [B] with B = {x.shape[0]}, got shape {tuple(t.shape)}")
        return t

    def q_sample(
        self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps; eps is drawn (from `generator`) when not given."""
        t = self._check_t(t, x0, ("noise", noise))
        if noise is None:
            noise_dtype = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
            # Drawn where the generator lives, as diffusers' randn_tensor does: a CPU generator serves CUDA latents.
            where = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=where, dtype=noise_dtype).to(x0.device)
        return _combine(self.sqrt_alphas_cumprod, x0, self.sqrt_one_minus_alphas_cumprod, noise, t, sign=1.0)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """`q_sample` in diffusers' `DDPMScheduler.add_noise` argument order (noise before the timesteps)."""
        if not isinstance(noise, Tensor):
            # q_sample would draw it, and the caller, holding no noise, could not form the training target.
            raise TypeError(f"noise must be a tensor shaped like x0, got {type(noise).__name__} (to have it drawn, "
                            "use q_sample(x0, t, generator=g))")
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
        t = self._check_t(t, x_t, ("noise", noise))
        if self.zero_terminal_snr and bool((t == self.num_steps - 1).any()):
            # alpha-bar is 0 there: x_t is all noise, and 1/sqrt(alpha-bar) would turn the result into inf/nan.
            raise ValueError(f"at t = {self.num_steps - 1} of a zero-terminal-SNR schedule x_t holds nothing of x_0, "
                             "so x_0 cannot be had from the noise; use v-prediction (predict_start_from_v)")
        return _combine(self.sqrt_recip_alphas_cumprod, x_t, self.sqrt_recipm1_alphas_cumprod, noise, t, sign=-1.0)

    def get_v(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The v-prediction target sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (SD 2.x's 768 models)."""
        t = self._check_t(t, x0, ("noise", noise))
        # In x0's dtype straight from the tables' precision: half-precision noise must not round the target.
        return _combine(self.sqrt_alphas_cumprod, noise, self.sqrt_one_minus_alphas_cumprod, x0, t, sign=-1.0,
                        dtype=x0.dtype)

    def predict_start_from_v(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v: the inverse of `get_v` given x_t."""
        t = self._check_t(t, x_t, ("v", v))
        return _combine(self.sqrt_alphas_cumprod, x_t, self.sqrt_one_minus_alphas_cumprod, v, t, sign=-1.0)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0); the latter two [B, 1, ..., 1]."""
        t = self._check_t(t, x_t, ("x0", x0))
        wd = table_dtype(x_t.device)
        mean = _extract(self.posterior_mean_coef1, t, x_t.ndim) * x0.to(wd)
        mean = mean + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t.to(wd)
        var = _extract(self.posterior_variance, t, x_t.ndim)
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        return mean.to(x_t.dtype), var.to(x_t.dtype), log_var.to(x_t.dtype)

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ab_t / (1 - ab_t) at timesteps t, float64 (float32 on MPS)."""
        t = self._timesteps(t)
        ab = self.alphas_cumprod.to(device=t.device, dtype=table_dtype(t.device))[t]
        return ab / (1.0 - ab)


def _check_betas(betas: Tensor, zero_terminal_snr: bool) -> None:
    """Every beta in (0, 1); with zero_terminal_snr the last one exactly 1 (x_T pure noise)."""
    body = betas[:-1]
    if not zero_terminal_snr and betas.numel() > 1 and betas[-1].item() == 1.0 and _open_unit(body):
        raise ValueError("betas that end in 1 have zero terminal SNR (x_T pure noise): pass zero_terminal_snr=True")
    if betas.numel() < 1 or not _open_unit(body if zero_terminal_snr else betas):
        raise ValueError(f"betas must be a non-empty 1-D tensor with every value in (0, 1); {_NAMED}")
    if 1.0 - betas[0].item() == 1.0:  # in float64: alpha-bar stays 1, and the posterior at t=0 is 0/0
        raise ValueError(f"the first beta, {betas[0].item():.3g}, is too small to change 1 - beta in float64: the "
                         "first step would add no noise at all (a NaN posterior); use a beta of 1e-15 or more")
    if zero_terminal_snr and betas[-1].item() != 1.0:
        raise ValueError(f"zero_terminal_snr needs betas that end in 1, got {betas[-1].item():.6g}: rescale them "
                         "with rescale_zero_terminal_snr(betas)")


def _open_unit(b: Tensor) -> bool:
    """Whether every value lies strictly between 0 and 1 (nan does not)."""
    return bool(((b > 0) & (b < 1)).all())


def _check_sample(x: Tensor, others: tuple[tuple[str, Tensor | None], ...]) -> None:
    """x a floating-point tensor (an integer one would come back truncated), the `others` shaped like it."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"latents must be a floating-point tensor (integers would come back truncated), got {got}")
    for name, other in others:
        if other is None:
            continue
        if not isinstance(other, Tensor):
            raise TypeError(f"{name} must be a tensor shaped like the sample, got {type(other).__name__}")
        if other.shape != x.shape:
            raise ValueError(f"{name} shape {tuple(other.shape)} differs from the sample's {tuple(x.shape)}")
