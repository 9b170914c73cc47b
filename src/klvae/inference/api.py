"""Inference entry points: pixels -> latents -> pixels with padding, precision, the NaN guard and tiling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from klvae.errors import LatentsError
from klvae.inference.precision import compute_dtype, run_guarded
from klvae.inference.tiling import TileOptions, make_streamer, run_maybe_tiled, tiled_decode, tiled_encode_moments
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
def encode_moments(
    vae: AutoencoderKL, x: Tensor, dtype: torch.dtype | None = None, tiling: TileOptions | None = None
) -> Tensor:
    """Images [B, C, H, W] in [-1, 1], any H and W -> fp32 moments over the padded size's latent grid.

    `dtype` is the compute dtype (default: the weights' dtype); a half-precision pass that overflows is rerun in
    fp32. The moments are on the model's device, unless a tiled result alone would exceed the memory budget:
    then it stays in host memory (`tiling.deliver`).
    """
    dtype = compute_dtype(vae, dtype)
    # The image stays where it is until a path takes it: the tiled one reads it strip by strip, so a big image
    # in host memory never has to fit on the GPU whole.
    x = pad_for(vae, x)

    def tiled(t: Tensor, dt: torch.dtype) -> Tensor:
        return tiled_encode_moments(vae, t, make_streamer(vae, tiling or TileOptions(), dt, t.shape[2]))

    return run_maybe_tiled(
        vae, "encode", x, dtype,
        plain=lambda t, dt: run_guarded(vae, lambda u, _: vae.encode_moments(u.to(vae.device)), t, dt, "encode"),
        tiled=lambda t, dt: run_guarded(vae, tiled, t, dt, "tiled encode"),
        opts=tiling,
    )


def encode(
    vae: AutoencoderKL, x: Tensor, dtype: torch.dtype | None = None, tiling: TileOptions | None = None
) -> DiagonalGaussian:
    """Images [B, C, H, W] in [-1, 1] -> the posterior q(z | x) (see encode_moments)."""
    return DiagonalGaussian(encode_moments(vae, x, dtype, tiling))


@torch.no_grad()
def decode(
    vae: AutoencoderKL,
    z: Tensor,
    dtype: torch.dtype | None = None,
    size: tuple[int, int] | None = None,
    tiling: TileOptions | None = None,
) -> Tensor:
    """Unscaled latents [B, c, h, w] -> images [B, C, H, W] in [-1, 1], cropped to `size` when given; dtype and
    device as in encode_moments."""
    check_latents(vae, z)
    dtype = compute_dtype(vae, dtype)
    z = z.to(vae.device)

    def tiled(t: Tensor, dt: torch.dtype) -> Tensor:
        st = make_streamer(vae, tiling or TileOptions(), dt, t.shape[2] * vae.downsample_factor)
        return tiled_decode(vae, t, st)

    out = run_maybe_tiled(
        vae, "decode", z, dtype,
        plain=lambda t, dt: run_guarded(vae, lambda u, _: vae.decode(u), t, dt, "decode"),
        tiled=lambda t, dt: run_guarded(vae, tiled, t, dt, "tiled decode"),
        opts=tiling,
    ).clamp(-1, 1)
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
