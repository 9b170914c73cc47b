"""The forward (noising) side of rectified flow for latents, as diffusers computes it for SD3, FLUX.1 and FLUX.2.

x_t = (1 - σ) x_0 + σ ε with σ in [0, 1] (0 clean, 1 pure noise), and the model learns the velocity v = ε - x_0,
the constant speed of that straight line, so x_0 = x_t - σ v. diffusers' `FlowMatchEulerDiscreteScheduler` holds
the training table: positions T, T-1, ..., 1 over T, shifted towards noise, and its timestep is σ T (after the
shift). The shifts:

- fixed shift s (SD3, SD3.5: 3.0): σ' = s σ / (1 + (s - 1) σ);
- FLUX's resolution-dependent ("dynamic") exponential shift: σ' = e^mu / (e^mu + 1/σ - 1), which is the fixed
  shift with s = e^mu, mu growing with the image's token count: FLUX.1's `calculate_shift` (a line from 0.5 at 256
  tokens to 1.15 at 4096), FLUX.2's `compute_empirical_mu` (a fit that also takes the inference step count).

diffusers' FLUX training scripts load the scheduler with `use_dynamic_shifting=True`, which leaves the training
table unshifted (the mu shift applies in `set_timesteps(mu=...)`, at inference); `FlowSchedule(mu=...)` is the
shifted table for trainers that shift in training too.

Tables are float64 (float32 on MPS) and results come back in the input's dtype, so on bf16/fp16 inputs they are
computed in float64 and rounded at the end (torch casts float64 through float32, which rounds a value lying within
float32's precision of a halfway point the other way: one bf16/fp16 step, rarely); diffusers casts σ to the
input's dtype first and may differ by a few of those formats' steps.
Training-time sampling draws exactly what diffusers' `compute_density_for_timestep_sampling` draws, from an explicit
generator, and `sample_timesteps` returns them in float32, as diffusers' scripts hold them. Argument orders follow
diffusers: `scale_noise(sample, timestep, noise)`, and `add_noise(x0, noise, t)` as its DDPM schedulers (and
klvae.diffusion) have it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from klvae.checks import is_integer, is_real
from klvae.diffusion import number_tensor, table_dtype

# The names diffusers' SD3/FLUX training scripts accept for --weighting_scheme, which they pass both to the timestep
# sampling (where all but logit_normal and mode draw uniformly) and to the loss weighting (where all but sigma_sqrt
# and cosmap weigh 1); "uniform" is the sampling's own name for its last branch.
WeightingScheme = Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"]
WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none")

# The SD3 paper's range for the mode sampler's scale, where u -> 1 - u - s (cos²(πu/2) - 1 + u) is monotone, a map
# of [0, 1] onto itself; past it that map folds over, and far past it (|s| > 7) it leaves [0, 1], where a negative
# table index would wrap around silently.
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))

# FLUX.2's pipeline default number of inference steps, which its empirical mu is a function of.
FLUX2_DEFAULT_STEPS = 50


# ---- shifts and FLUX's mu --------------------------------------------------------------------------------------

def _unit_interval(t: Tensor | float | Sequence[float], name: str) -> tuple[Tensor, torch.dtype]:
    """t as a float64 tensor (float32 on MPS), checked to lie in [0, 1], and the dtype to return results in: a
    tensor's (or NumPy array's) own floating dtype, else float64: Python floats are doubles, which torch would
    round to float32 in a list."""
    given = t
    t = number_tensor(given, name)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers, got {t.dtype}")
    typed = isinstance(given, Tensor) or hasattr(given, "dtype")
    out_dtype = t.dtype if typed and t.is_floating_point() else torch.float64
    if not isinstance(given, Tensor):
        t = torch.as_tensor(given, dtype=torch.float64)
    t = t.to(table_dtype(t.device))
    if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):  # also refuses nan
        raise ValueError(f"{name} must lie in [0, 1]")
    return t, out_dtype


def shift_sigmas(sigmas: Tensor | float | Sequence[float], shift: float) -> Tensor:
    """The fixed shift s σ / (1 + (s - 1) σ) of diffusers' scheduler (SD3: s = 3), float64 math."""
    s = _positive(shift, "shift")
    t, out_dtype = _unit_interval(sigmas, "sigmas")
    # s t / (s t + 1 - t): the same map as s t / (1 + (s - 1) t), exact at both ends for any s (with a tiny s,
    # s - 1 rounds to -1 and the other form divides 0 by 0 at t = 1).
    return (s * t / (s * t + (1 - t))).to(out_dtype)


def time_shift(mu: float, sigma: float, t: Tensor | float | Sequence[float],
               kind: Literal["exponential", "linear"] = "exponential") -> Tensor:
    """diffusers' `time_shift(mu, sigma, t)`: e^mu / (e^mu + (1/t - 1)^sigma) ("linear": mu in place of e^mu)."""
    if kind not in ("exponential", "linear"):
        raise ValueError(f"kind must be 'exponential' or 'linear', got {kind!r}")
    mu, sigma = _finite(mu, "mu"), _positive(sigma, "sigma")
    if kind == "linear" and mu <= 0:
        raise ValueError(f"the linear time shift needs mu > 0, got {mu}")
    t, out_dtype = _unit_interval(t, "t")
    if kind == "linear":
        # t = 0 makes 1/t inf and the result 0 (clean stays clean) without a warning, as float64 division does.
        return (mu / (mu + (1 / t - 1) ** sigma)).to(out_dtype)
    # e^mu / (e^mu + r) = sigmoid(mu - log r), r = (1/t - 1)^sigma: no overflow of e^mu for a large mu, and r = inf
    # (t = 0) or 0 (t = 1) give exactly 0 and 1.
    return torch.sigmoid(mu - sigma * torch.log(1 / t - 1)).to(out_dtype)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX.1's mu for `image_seq_len` tokens: diffusers' `calculate_shift`, the line through the two anchors."""
    _count(image_seq_len, "image_seq_len")
    for name, value in (("base_seq_len", base_seq_len), ("max_seq_len", max_seq_len), ("base_shift", base_shift),
                        ("max_shift", max_shift)):
        if not is_real(value) or not math.isfinite(value):  # nan would give a nan mu, and a nan schedule
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len and base_seq_len must differ: they are the two ends of a line")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's mu for `image_seq_len` tokens sampled in `num_steps` steps (its pipeline's `compute_empirical_mu`)."""
    _count(image_seq_len, "image_seq_len")
    _count(num_steps, "num_steps")
    # BFL's fit: a line in the token count at 10 and at 200 steps, interpolated in the steps; large images (> 4300
    # tokens) use the 200-step line whatever the step count.
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def _latent_hw(latent: Tensor | Sequence[int]) -> tuple[int, int]:
    if isinstance(latent, str | bytes):  # tuple("64") would read as the shape (6, 4)
        raise TypeError(f"a latent tensor or its shape is needed, got {latent!r}")
    shape = tuple(latent.shape) if isinstance(latent, Tensor) else tuple(latent)
    if len(shape) < 2 or any(int(d) < 1 for d in shape[-2:]):
        raise ValueError(f"a latent (or its shape) ending in [h, w] with h, w >= 1 is needed, got {shape}")
    return int(shape[-2]), int(shape[-1])


def flux_image_seq_len(latent: Tensor | Sequence[int]) -> int:
    """FLUX.1's token count for its [..., 16, h, w] latent (or shape): 2x2 patches packed, (h // 2) * (w // 2)."""
    h, w = _latent_hw(latent)
    if h < 2 or w < 2:
        raise ValueError(f"a FLUX.1 latent of {h}x{w} holds no 2x2 patch")
    return (h // 2) * (w // 2)


def flux2_image_seq_len(latent: Tensor | Sequence[int]) -> int:
    """FLUX.2's token count for its already patchified [..., 128, h, w] latent (`scale_latents`' output): h * w."""
    h, w = _latent_hw(latent)
    return h * w


def flux_mu(latent: Tensor | Sequence[int]) -> float:
    """FLUX.1's dynamic-shift mu for a [..., 16, h, w] latent (its pipeline's, from the scheduler's defaults)."""
    return calculate_shift(flux_image_seq_len(latent))


def flux2_mu(latent: Tensor | Sequence[int], num_inference_steps: int = FLUX2_DEFAULT_STEPS) -> float:
    """FLUX.2's dynamic-shift mu for its patchified [..., 128, h, w] latent and a step count (pipeline default 50)."""
    return compute_empirical_mu(flux2_image_seq_len(latent), num_inference_steps)


# ---- the σ form: noising, velocity and its inverse ---------------------------------------------------------------

def _sigma_view(sigma: Tensor | float, x: Tensor, order: str) -> Tensor:
    """σ as a scalar or [B, 1, ..., 1] in the working precision, checked to lie in [0, 1]."""
    s = number_tensor(sigma, "sigma")
    if s.dtype == torch.bool or s.is_complex():
        raise TypeError(f"sigma must be real numbers, got {s.dtype}")
    batch_like = s.ndim == x.ndim and s.shape[0] == x.shape[0] and all(d == 1 for d in s.shape[1:])
    if s.ndim > 1 and not batch_like and s.numel() != 1:
        raise ValueError(f"sigma must be a number, [B] or [B, 1, ..., 1] with B = {x.shape[0]}, got shape "
                         f"{tuple(s.shape)}; check the argument order: {order}")
    s = s.to(device=x.device, dtype=table_dtype(x.device))
    if s.numel() and not bool(((s >= 0) & (s <= 1)).all()):  # also refuses nan
        raise ValueError("sigma must lie in [0, 1] (0 clean, 1 pure noise)")
    if s.numel() == 1:
        return s.reshape([1] * x.ndim)
    if s.ndim == 1 and s.shape[0] == x.shape[0]:
        return s.reshape(x.shape[0], *([1] * (x.ndim - 1)))
    if batch_like:
        return s
    raise ValueError(f"sigma must be a number, [B] or [B, 1, ..., 1] with B = {x.shape[0]}, got shape "
                     f"{tuple(s.shape)}")


def _same_shape(a: Tensor, b: Tensor, names: str, order: str) -> None:
    first, second = (n.strip() for n in names.split(","))
    if not isinstance(a, Tensor):
        raise TypeError(f"{first} must be a tensor, got {type(a).__name__}; check the argument order: {order}")
    if not isinstance(b, Tensor):
        raise TypeError(f"{second} must be a tensor shaped like {first}, got {type(b).__name__}; check the "
                        f"argument order: {order}")
    if a.shape != b.shape:
        raise ValueError(f"{second} shape {tuple(b.shape)} differs from {first} shape {tuple(a.shape)}")
    if a.ndim == 0:
        raise ValueError(f"{first} must have a batch dimension ([B, ...]), got a 0-d tensor")
    if not a.is_floating_point():  # the result comes back in a's dtype: integers would truncate it
        raise TypeError(f"{first} must be a floating-point tensor, got {a.dtype}")


def noisy(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """x_t = (1 - σ) x_0 + σ ε, σ a number, [B] or [B, 1, ..., 1]; in x0's dtype."""
    return _interpolate(x0, noise, sigma, "noisy(x0, noise, sigma)")


def _interpolate(x0: Tensor, noise: Tensor, sigma: Tensor | float, order: str) -> Tensor:
    _same_shape(x0, noise, "x0, noise", order)
    s = _sigma_view(sigma, x0, order)
    wd = s.dtype
    return ((1 - s) * x0.to(wd) + s * noise.to(wd)).to(x0.dtype)


def get_velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow target v = ε - x_0 (SD3's and FLUX's), in x0's dtype; the same at every σ."""
    _same_shape(x0, noise, "x0, noise", "get_velocity(x0, noise)")
    wd = table_dtype(x0.device)
    return (noise.to(wd) - x0.to(wd)).to(x0.dtype)


def predict_start_from_velocity(x_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """x_0 = x_t - σ v: the clean latent from a noisy one and its velocity (the inverse of `noisy`)."""
    _same_shape(x_t, v, "x_t, v", "predict_start_from_velocity(x_t, v, sigma)")
    s = _sigma_view(sigma, x_t, "predict_start_from_velocity(x_t, v, sigma)")
    return (x_t.to(s.dtype) - s * v.to(s.dtype)).to(x_t.dtype)


def predict_noise_from_velocity(x_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """ε = x_t + (1 - σ) v: the noise from a noisy latent and its velocity."""
    _same_shape(x_t, v, "x_t, v", "predict_noise_from_velocity(x_t, v, sigma)")
    s = _sigma_view(sigma, x_t, "predict_noise_from_velocity(x_t, v, sigma)")
    return (x_t.to(s.dtype) + (1 - s) * v.to(s.dtype)).to(x_t.dtype)


# ---- the training table ----------------------------------------------------------------------------------------

class FlowSchedule:
    """diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)` training table, float64, and the
    forward process on it; `mu` instead of `shift` shifts it the FLUX way (exponentially)."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, mu: float | None = None) -> None:
        self.num_train_timesteps = _table_size(num_train_timesteps)
        self.shift = _positive(shift, "shift")
        self.mu = None if mu is None else _finite(mu, "mu")
        if self.mu is not None and self.shift != 1.0:
            # diffusers' dynamic shifting ignores `shift`; two shifts at once would be a silent surprise here.
            raise ValueError("give shift or mu, not both: mu is FLUX's exponential shift (shift = e^mu)")
        n = self.num_train_timesteps
        positions = torch.arange(n, 0, -1, dtype=torch.float64) / n  # diffusers' linspace(1, T, T)[::-1] / T
        self.sigmas = shift_sigmas(positions, self.shift) if self.mu is None else time_shift(self.mu, 1.0, positions)
        self.timesteps = self.sigmas * n

    @classmethod
    def sd3(cls) -> FlowSchedule:
        """SD3's and SD3.5's training table: 1000 steps, fixed shift 3.0."""
        return cls(1000, shift=3.0)

    @classmethod
    def flux(cls, latent: Tensor | Sequence[int]) -> FlowSchedule:
        """FLUX.1's table shifted for a [..., 16, h, w] latent's size (mu from `calculate_shift`)."""
        return cls(1000, mu=flux_mu(latent))

    @classmethod
    def flux2(cls, latent: Tensor | Sequence[int], num_inference_steps: int = FLUX2_DEFAULT_STEPS) -> FlowSchedule:
        """FLUX.2's table shifted for its patchified latent's size (mu from `compute_empirical_mu`)."""
        return cls(1000, mu=flux2_mu(latent, num_inference_steps))

    def __repr__(self) -> str:
        how = f"mu={self.mu:.6g}" if self.mu is not None else f"shift={self.shift:.6g}"
        return f"FlowSchedule(num_train_timesteps={self.num_train_timesteps}, {how})"

    def sigma_at(self, t: Tensor | int) -> Tensor:
        """σ at integer training position t in [1, T]: t / T shifted (so t = T is pure noise); float64."""
        t = number_tensor(t, "positions")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"positions must be integers in [1, {self.num_train_timesteps}], got {t.dtype}; "
                            "for diffusers' (shifted) timesteps divide by num_train_timesteps instead")
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.num_train_timesteps):
            raise ValueError(f"positions must lie in [1, {self.num_train_timesteps}]")
        return self.sigmas.to(device=t.device, dtype=table_dtype(t.device))[self.num_train_timesteps - t.long()]

    def _sigma_of_timestep(self, timestep: Tensor | float, sample: Tensor, order: str) -> Tensor:
        t = number_tensor(timestep, "timesteps")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timesteps must be real numbers, got {t.dtype}")
        if t.ndim > 1:  # a sample, not timesteps: arguments swapped
            raise TypeError(f"timesteps must be a number or [B], got shape {tuple(t.shape)}; check the argument "
                            f"order: {order}")
        n = self.num_train_timesteps
        if not t.is_floating_point() and (self.shift != 1 or self.mu is not None):
            # An integer here is most likely a table position (as NoiseSchedule's t is), which this shifted table
            # would not noise at its own sigma: diffusers refuses such a value (not among its timesteps) too.
            raise TypeError("integer timesteps on a shifted table: pass diffusers' timesteps (schedule.timesteps[i], "
                            "floats), or sigma_at(position) to noisy(x0, noise, sigma)")
        t = t.to(device=sample.device, dtype=table_dtype(sample.device))
        if t.numel() and not bool(((t >= 0) & (t <= n)).all()):  # also refuses nan
            raise ValueError(f"timesteps must lie in [0, {n}] (diffusers' timestep is sigma * {n})")
        if t.ndim == 1 and t.shape[0] not in (1, sample.shape[0]):
            raise ValueError(f"timesteps must be [B] with B = {sample.shape[0]}, got shape {tuple(t.shape)}")
        if n > 1 and t.numel() and bool(((t > 0) & (t < 1)).all()) and not self._on_table(t):
            # Sigmas passed for timesteps would noise next to nothing, silently; the table's own timesteps lie
            # there only at its clean end under a shift below 1.
            raise ValueError(f"timesteps all lie in (0, 1): sigmas? This takes diffusers' timesteps (sigma * {n}); "
                             "noisy(x0, noise, sigma) takes sigmas")
        # diffusers looks σ up by the timestep's value in its table, whose timesteps are σ T: the same σ.
        return t / n

    def _on_table(self, t: Tensor) -> bool:
        table = self.timesteps.to(device=t.device, dtype=t.dtype)
        return bool(torch.isclose(t.reshape(-1, 1), table.reshape(1, -1), rtol=1e-6, atol=0).any(1).all())

    def scale_noise(self, sample: Tensor, timestep: Tensor | float, noise: Tensor) -> Tensor:
        """diffusers' `scale_noise`: σ = timestep / T, then (1 - σ) sample + σ noise, in sample's dtype."""
        order = "scale_noise(sample, timestep, noise)"
        return _interpolate(sample, noise, self._sigma_of_timestep(timestep, sample, order), order)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | float) -> Tensor:
        """`scale_noise` in the DDPM schedulers' `add_noise(x0, noise, timesteps)` order."""
        order = "add_noise(x0, noise, timesteps)"
        return _interpolate(original_samples, noise, self._sigma_of_timestep(timesteps, original_samples, order), order)

    def sample_timesteps(self, batch_size: int, weighting_scheme: WeightingScheme, *, generator: torch.Generator,
                         logit_mean: float = 0.0, logit_std: float = 1.0,
                         mode_scale: float = 1.29) -> tuple[Tensor, Tensor]:
        """(timesteps, sigmas) [B] as diffusers' SD3/FLUX training scripts draw them, float32 as they hold them."""
        u = compute_density_for_timestep_sampling(weighting_scheme, batch_size, generator=generator,
                                                  logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
        n = self.num_train_timesteps
        # The scripts' `(u * T).long()` indexes the descending table; u = 1 (a zero draw of the mode sampler) would
        # be one past its end, an IndexError there: the clamp keeps it on the last row.
        indices = (u * n).long().clamp(0, n - 1)
        # float32 as diffusers' table and `get_sigmas` are: float64 here would promote a script's
        # `(1 - s) * latents + s * noise` to float64, which a float32 model then refuses. The σ is the float64 row
        # rounded once, and the timestep σ T in float32 as diffusers computes its `timesteps`.
        sigmas = self.sigmas[indices.cpu()].to(device=indices.device, dtype=torch.float32)
        return sigmas * n, sigmas


# ---- training-time sampling and loss weighting (diffusers.training_utils) -----------------------------------------

def compute_density_for_timestep_sampling(
    weighting_scheme: WeightingScheme, batch_size: int, *, generator: torch.Generator, logit_mean: float = 0.0,
    logit_std: float = 1.0, mode_scale: float = 1.29,
) -> Tensor:
    """u in [0, 1] [B] on the generator's device, the draws of diffusers' function with that generator."""
    _check_scheme(weighting_scheme)
    if not isinstance(generator, torch.Generator):
        # diffusers falls back on the global RNG; here the draw is reproducible from its arguments alone.
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _count(batch_size, "batch_size")
    device = generator.device
    # The same calls and float32 math as diffusers, so a generator in the same state gives the same u bit for bit
    # (and the same table rows after `(u * T).long()`); u is a random draw, float64 would buy it nothing.
    if weighting_scheme == "logit_normal":
        mean, std = _finite(logit_mean, "logit_mean"), _finite(logit_std, "logit_std")
        if std < 0:
            raise ValueError(f"logit_std must be >= 0, got {std}")
        u = torch.normal(mean=mean, std=std, size=(batch_size,), device=device, generator=generator)
        return torch.sigmoid(u)
    if weighting_scheme == "mode":  # checked before the draw, so that a refusal leaves the generator as it was
        s = _finite(mode_scale, "mode_scale")
        lo, hi = MODE_SCALE_RANGE
        if not lo <= s <= hi:
            raise ValueError(f"mode_scale must lie in [{lo:g}, {hi:.4g}] (the SD3 paper's range, where its map of u "
                             f"is monotone), got {s}")
    u = torch.rand(size=(batch_size,), device=device, generator=generator)
    if weighting_scheme == "mode":
        return 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def compute_loss_weighting_for_sd3(weighting_scheme: WeightingScheme, sigmas: Tensor) -> Tensor:
    """Per-sample loss weights: "sigma_sqrt" 1/σ², "cosmap" 2 / (π (1 - 2σ + 2σ²)), others 1; in sigmas' dtype."""
    _check_scheme(weighting_scheme)
    s, out_dtype = _unit_interval(sigmas, "sigmas")
    if weighting_scheme == "sigma_sqrt":
        if s.numel() and bool((s == 0).any()):
            raise ValueError("sigma_sqrt weighs 1/sigma², which is infinite at sigma = 0")
        w = s**-2.0
    elif weighting_scheme == "cosmap":
        w = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    else:
        w = torch.ones_like(s)
    return w.to(out_dtype)


# ---- argument checks -------------------------------------------------------------------------------------------

def _check_scheme(weighting_scheme: str) -> None:
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"unknown weighting_scheme {weighting_scheme!r}; expected one of "
                         f"{', '.join(WEIGHTING_SCHEMES)}")


def _table_size(v: object) -> int:
    if not is_real(v) and not isinstance(v, bool):
        # A name or a tensor of sigmas here would otherwise meet a bare "must be an integer" (or a tensor repr).
        got = repr(v) if isinstance(v, str) else type(v).__name__
        raise TypeError(f"FlowSchedule takes num_train_timesteps (an integer), got {got}: for a named table use "
                        "FlowSchedule.sd3(), FlowSchedule.flux(latent) or FlowSchedule.flux2(latent)")
    return _count(v, "num_train_timesteps")


def _finite(v: object, name: str) -> float:
    if not is_real(v) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _positive(v: float, name: str) -> float:
    v = _finite(v, name)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def _count(v: object, name: str) -> int:
    if not is_integer(v) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)
