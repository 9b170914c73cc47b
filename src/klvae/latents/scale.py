"""Scale and shift from data: scaling_factor = 1/std and shift_factor = mean of the latents (LDM's scale_by_std),
and the per-channel form, latents_mean and latents_std (Playground v2.5's)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from klvae import inference
from klvae.errors import KlvaeError
from klvae.images import pil_to_tensor
from klvae.latents.buckets import resize_crop
from klvae.latents.cache import check_finite_moments, check_resolution, check_whole_latents
from klvae.latents.sources import ItemSource, item_error, open_source
from klvae.model.autoencoder import AutoencoderKL

log = logging.getLogger(__name__)

# Real latents, unscaled, stay within a few dozen: factors from a std far past this fit a broken model.
_PLAUSIBLE_STD = 1e4


def check_scale_options(limit: int, resolution: int) -> None:
    """KlvaeError for a --limit or --resolution that no run can use."""
    if limit < 1:
        raise KlvaeError(f"--limit must be at least 1, got {limit}")
    check_resolution(resolution)


def estimate_factors(vae: AutoencoderKL, spec: str | ItemSource, limit: int = 256, resolution: int = 256,
                     dtype: torch.dtype = torch.float32, sample: bool = True, seed: int = 0) -> dict[str, Any]:
    """Mean and std of z over up to `limit` images (centre crops): the factors that make z zero-mean, unit-std.

    `scaling_factor`, `shift_factor` and `std` are over all channels; `latents_mean` and `latents_std` (lists)
    per channel (of the diffusion latent: in FLUX.2's 2x2 patches, 4x the VAE's channels). Unreadable images are
    skipped with a warning and counted (`skipped`); `images` is the number used.
    """
    check_scale_options(limit, resolution)
    check_whole_latents(vae, resolution)  # padded cells would bias the statistics
    source = open_source(spec) if isinstance(spec, str) else spec
    name = spec if isinstance(spec, str) else "the data"
    # A CPU generator on any device: DiagonalGaussian.sample draws on the generator's device and moves the noise,
    # so a seed gives the same samples on every device.
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source.ids), generator=gen).tolist()[:limit]
    # Per-channel sums in float64: n, sum z and sum z^2 over every position of every image.
    n, s1, s2, used, skipped = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0, 0
    for i in order:
        try:
            img, _ = resize_crop(source.load(source.ids[i]), (resolution, resolution))
        except Exception as e:  # ImageError, or a decoder's own error: this image is skipped, not the job
            log.warning("skipping %s", item_error(source.ids[i], e))
            skipped += 1
            continue
        post = inference.encode(vae, pil_to_tensor(img)[None], dtype)
        check_finite_moments(post.parameters, [source.ids[i]])  # else every factor is NaN, found only at --save
        z = (post.sample(gen.manual_seed(seed + i)) if sample else post.mode()).double().cpu()
        z = vae.config.latent_norm.patchify(z)  # FLUX.2's statistics are of the diffusion latent's channels
        n, used = n + z[:, 0].numel(), used + 1
        s1, s2 = s1 + z.sum(dim=(0, 2, 3)), s2 + z.square().sum(dim=(0, 2, 3))
    if used == 0:
        raise KlvaeError(f"no readable images in {name} ({skipped} unreadable)")
    if skipped:
        log.warning("skipped %d unreadable of %d images sampled", skipped, len(order))
    mean = s1.sum().item() / (n * len(s1))
    std = math.sqrt(max(s2.sum().item() / (n * len(s1)) - mean * mean, 1e-12))
    if std > _PLAUSIBLE_STD:
        log.warning("the latents' std is %.3g, far beyond an encoder's: huge values in the model's weights?", std)
    means = s1 / n
    stds = (s2 / n - means.square()).clamp_min(1e-12).sqrt()
    return {"scaling_factor": 1.0 / std, "shift_factor": mean, "std": std, "images": float(used),
            "skipped": float(skipped), "latents_mean": means.tolist(), "latents_std": stds.tolist()}
