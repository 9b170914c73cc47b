"""Scale and shift from data: scaling_factor = 1/std and shift_factor = mean of the latents (LDM's scale_by_std),
and the per-channel form, latents_mean and latents_std (Playground v2.5's)."""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from klvae import inference
from klvae.errors import KlvaeError
from klvae.images import pil_to_tensor
from klvae.latents.buckets import resize_crop
from klvae.latents.cache import check_finite_moments
from klvae.latents.options import check_at_least, check_resolution, check_seed, check_whole_latents
from klvae.latents.sources import ItemSource, item_error, open_source
from klvae.model.autoencoder import AutoencoderKL
from klvae.posterior import DiagonalGaussian

log = logging.getLogger(__name__)

# Real latents, unscaled, stay within a few dozen: factors from a std far past this fit a broken model.
_PLAUSIBLE_STD = 1e4
# A std below this (a channel constant over the data: blank images, or one image's mode) gives a factor that
# multiplies the diffusion model's inputs by 10^4 or more.
_DEGENERATE_STD = 1e-4


def check_scale_options(limit: int, resolution: int) -> None:
    """OptionError for a `limit` or `resolution` that no run can use."""
    check_at_least("limit", limit, 1)
    check_resolution(resolution)


def estimate_factors(vae: AutoencoderKL, spec: str | os.PathLike[str] | ItemSource, limit: int = 256,
                     resolution: int = 256, dtype: torch.dtype = torch.float32, sample: bool = True, seed: int = 0,
                     batch_size: int = 4) -> dict[str, Any]:
    """Mean and std of z over up to `limit` images (centre crops): the factors that make z zero-mean, unit-std.

    `scaling_factor`, `shift_factor` and `std` are over all channels; `latents_mean` and `latents_std` (lists)
    per channel (of the diffusion latent: in FLUX.2's 2x2 patches, 4x the VAE's channels). Unreadable images are
    skipped with a warning and counted (`skipped`); `images` is the number used. The crops are encoded
    `batch_size` at a time; each image's sample is drawn alone (seed + its position in the data), so the batch
    size changes no figure beyond float rounding.
    """
    check_scale_options(limit, resolution)
    check_at_least("batch_size", batch_size, 1)
    check_seed(seed)
    check_whole_latents(vae, resolution)  # padded cells would bias the statistics
    source = open_source(str(spec)) if isinstance(spec, str | os.PathLike) else spec
    name = str(spec) if isinstance(spec, str | os.PathLike) else "the data"
    # A CPU generator on any device: DiagonalGaussian.sample draws on the generator's device and moves the noise,
    # so a seed gives the same samples on every device.
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source.ids), generator=gen).tolist()[:limit]
    # Per-channel sums in float64: n, sum z and sum z^2 over every position of every image.
    n, s1, s2, used = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
    skipped: list[str] = []
    crops = _readable_crops(source, order, resolution, skipped)
    while batch := list(itertools.islice(crops, batch_size)):
        # One forward pass a batch: a stack is NCHW-contiguous, as the batches of encode and cache are.
        moments = inference.encode_moments(vae, torch.stack([x for _, x in batch]), dtype)
        check_finite_moments(moments, [source.ids[i] for i, _ in batch])  # else NaN factors, found only at --save
        posts = [DiagonalGaussian(m[None]) for m in moments]
        z = torch.cat([p.sample(gen.manual_seed(seed + i)) if sample else p.mode()
                       for (i, _), p in zip(batch, posts, strict=True)])
        z = vae.config.latent_norm.patchify(z.cpu().double())  # FLUX.2's statistics: the diffusion latent's channels
        n, used = n + z[:, 0].numel(), used + len(batch)
        s1, s2 = s1 + z.sum(dim=(0, 2, 3)), s2 + z.square().sum(dim=(0, 2, 3))
    if used == 0:
        raise KlvaeError(f"no readable images in {name} ({len(skipped)} unreadable)")
    if skipped:
        log.warning("skipped %d unreadable of %d images sampled", len(skipped), len(order))
    mean = s1.sum().item() / (n * len(s1))
    std = math.sqrt(max(s2.sum().item() / (n * len(s1)) - mean * mean, 1e-12))
    if std > _PLAUSIBLE_STD:
        log.warning("the latents' std is %.3g, far beyond an encoder's: huge values in the model's weights?", std)
    means = s1 / n
    stds = (s2 / n - means.square()).clamp_min(1e-12).sqrt()
    if (low := int((stds < _DEGENERATE_STD).sum())) or std < _DEGENERATE_STD:
        log.warning("the latents are nearly constant (std %.3g; %d of %d channels below %g): too few or blank "
                    "images for factors that generalise", std, low, len(stds), _DEGENERATE_STD)
    return {"scaling_factor": 1.0 / std, "shift_factor": mean, "std": std, "images": float(used),
            "skipped": float(len(skipped)), "latents_mean": means.tolist(), "latents_std": stds.tolist()}


def _readable_crops(source: ItemSource, order: list[int], resolution: int,
                    skipped: list[str]) -> Iterator[tuple[int, Tensor]]:
    # (position in the data, centre crop as a tensor) of each image in `order` that reads; the others are warned
    # about and added to `skipped`.
    for i in order:
        try:
            img, _ = resize_crop(source.load(source.ids[i]), (resolution, resolution))
        except Exception as e:  # ImageError, or a decoder's own error: this image is skipped, not the job
            log.warning("skipping %s", item_error(source.ids[i], e))
            skipped.append(source.ids[i])
            continue
        yield i, pil_to_tensor(img)
