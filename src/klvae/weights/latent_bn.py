"""FLUX.2's latent BatchNorm <-> the config's per-channel statistics (pure functions on state dicts and configs).

FLUX.2's VAE (BFL's `AutoEncoder`, diffusers' `AutoencoderKLFlux2`) keeps the statistics of its 2x2-patchified
latents as the running buffers of a BatchNorm that is never trained with the network, and its pipelines normalise
with them: (patchify(z) - running_mean) / sqrt(running_var + eps). klvae holds them as what they mean,
latents_mean and latents_std of the config (see model.latent_norm), so that latents files, caches and the scale
command treat them like any other factors; the buffers exist only in the files.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from klvae.errors import WeightsError
from klvae.model.config import AutoencoderKLConfig

log = logging.getLogger(__name__)

MEAN, VAR, COUNT = "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
BN_KEYS = (MEAN, VAR, COUNT)
# BFL's AutoEncoder fixes it; diffusers' AutoencoderKLFlux2 has it in config.json with the same default.
BFL_EPS = 1e-4
# Statistics that a config and the weights both carry agree to float32's rounding when one was written from the
# other (klvae's exported files hold both): then the config's exact values are kept.
_AGREE = 1e-6


def pop_latent_bn(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor] | None]:
    """`sd` without the bn.* keys, and (running_mean, running_var) if it had them."""
    if not any(k in sd for k in BN_KEYS):
        return sd, None
    missing = [k for k in (MEAN, VAR) if k not in sd]
    if missing:
        raise WeightsError(f"the weights' latent BatchNorm lacks {', '.join(missing)}")
    mean, var = sd[MEAN], sd[VAR]
    if not (isinstance(mean, Tensor) and isinstance(var, Tensor) and mean.is_floating_point()
            and var.is_floating_point() and mean.ndim == 1 and mean.shape == var.shape):
        raise WeightsError(f"the weights' latent BatchNorm statistics are no matching float vectors: {MEAN} "
                           f"{_shape(mean)}, {VAR} {_shape(var)}")
    return {k: v for k, v in sd.items() if k not in BN_KEYS}, (mean, var)


def _shape(v: object) -> str:
    return str(list(v.shape)) if isinstance(v, Tensor) else type(v).__name__


def with_latent_stats(cfg: AutoencoderKLConfig, stats: tuple[Tensor, Tensor], eps: float,
                      what: str) -> AutoencoderKLConfig:
    """`cfg` with latents_mean = running_mean and latents_std = sqrt(running_var + eps); WeightsError if they do
    not fit its latent patches (or it has none: a config for another model). Where `cfg` holds statistics that
    agree with the buffers (klvae writes its float64 figures beside them), its own are kept."""
    mean, var = (t.detach().to("cpu", torch.float64) for t in stats)
    p, c = cfg.latent_patch_size, cfg.latent_channels
    if p == 1:
        raise WeightsError(f"the weights carry FLUX.2's latent statistics ({MEAN} [{len(mean)}]) but {what} has no "
                           "latent patches (latent_patch_size 1): load them with config='flux2' (--config flux2)")
    if len(mean) != c * p * p:
        raise WeightsError(f"{MEAN} has {len(mean)} entries, but {what} makes {c * p * p} "
                           f"({c} latent channels in {p}x{p} patches)")
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var + eps > 0).all()):
        raise WeightsError("the weights' latent BatchNorm statistics are not finite, or a variance is negative")
    new_mean, new_std = tuple(mean.tolist()), tuple((var + eps).sqrt().tolist())
    if cfg.latents_mean is None and not mean.any() and torch.allclose(var + eps, torch.ones_like(var), rtol=0,
                                                                      atol=1e-7):
        return cfg  # the identity that latent_bn_tensors writes for a config without statistics: still none
    if cfg.latents_mean is not None and cfg.latents_std is not None:
        if _agree(cfg.latents_mean, new_mean) and _agree(cfg.latents_std, new_std):
            return cfg
        log.warning("the weights' latent BatchNorm statistics replace the latents_mean/latents_std of %s", what)
    try:
        return cfg.replace(latents_mean=new_mean, latents_std=new_std, shift_factor=None)
    except ValueError as e:
        raise WeightsError(f"the weights' latent statistics do not fit {what}: {e}") from None


def _agree(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=_AGREE, abs_tol=_AGREE)
                                    for x, y in zip(a, b, strict=True))


def check_flux2_format(cfg: AutoencoderKLConfig) -> None:
    """WeightsError unless FLUX.2's formats can hold cfg's latent normalisation: 2x2 patches (its pipelines and
    BFL's AutoEncoder know no other) and per-channel statistics, nothing else."""
    if cfg.latent_patch_size != 2:
        raise WeightsError(f"FLUX.2's formats hold 2x2 latent patches only, not {cfg.latent_patch_size}x"
                           f"{cfg.latent_patch_size}")
    if cfg.scaling_factor != 1.0 or cfg.shift_factor is not None:
        raise WeightsError(f"FLUX.2's formats hold per-channel statistics only, so scaling_factor "
                           f"{cfg.scaling_factor} and shift_factor {cfg.shift_factor} cannot be saved in them "
                           "(fold them into latents_mean/latents_std)")


def latent_bn_tensors(cfg: AutoencoderKLConfig, eps: float = BFL_EPS) -> dict[str, Tensor]:
    """The bn.* buffers that make FLUX.2's loaders normalise as `cfg` does; with no statistics, the identity."""
    check_flux2_format(cfg)
    n = cfg.latent_channels * cfg.latent_patch_size**2
    mean = torch.tensor(cfg.latents_mean or [0.0] * n, dtype=torch.float64)
    std = torch.tensor(cfg.latents_std or [1.0] * n, dtype=torch.float64)
    var = std.square() - eps
    if (var < 0).any():
        raise WeightsError(f"a latents_std below sqrt({eps}) cannot be saved as FLUX.2's latent BatchNorm "
                           f"(smallest: {std.min().item():.3g})")
    return {MEAN: mean.float(), VAR: var.float(), COUNT: torch.tensor(0, dtype=torch.int64)}
