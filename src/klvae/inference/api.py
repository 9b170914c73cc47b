"""Inference entry points: pixels -> latents -> pixels with padding, precision and the NaN guard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from klvae.errors import LatentsError
from klvae.inference.precision import run_guarded
from klvae.model.autoencoder import AutoencoderKL
from klvae.posterior import DiagonalGaussian


def pad_for(vae: AutoencoderKL, x: Tensor) -> Tensor:
    """Pad right/bottom (edge-replicated) to a multiple of the downsample factor."""
    f = vae.downsample_factor
    h, w = x.shape[-2:]
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


@torch.no_grad()
def encode(vae: AutoencoderKL, x: Tensor, dtype: torch.dtype = torch.float32) -> DiagonalGaussian:
    """Images [B, C, H, W] in [-1, 1], any H and W -> posterior over the padded size's latent grid."""
    x = pad_for(vae, x.to(vae.device))
    moments = run_guarded(vae, vae.encode_moments, x, dtype, "encode")
    return DiagonalGaussian(moments)


@torch.no_grad()
def decode(
    vae: AutoencoderKL, z: Tensor, dtype: torch.dtype = torch.float32, size: tuple[int, int] | None = None
) -> Tensor:
    """Unscaled latents [B, c, h, w] -> images [B, C, H, W] in [-1, 1], cropped to `size` when given."""
    check_latents(vae, z)
    out = run_guarded(vae, vae.decode, z.to(vae.device), dtype, "decode").clamp(-1, 1)
    if size is not None:
        out = out[..., : size[0], : size[1]]
    return out


def check_latents(vae: AutoencoderKL, z: Tensor) -> None:
    """Latents must be 4-D, have the model's channel count and be finite."""
    c = vae.config.latent_channels
    if z.ndim != 4 or z.shape[1] != c:
        raise LatentsError(f"latents of shape {tuple(z.shape)} do not fit this model, which takes [B, {c}, h, w]")
    if not torch.isfinite(z).all():
        raise LatentsError("latents contain NaN or infinite values")
