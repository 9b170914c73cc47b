"""Inference entry points: pixels -> latents -> pixels with padding, precision, the NaN guard and tiling."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from klvae.errors import ImageError, KlvaeError, LatentsError, quote
from klvae.inference.precision import compute_dtype, pass_modules
from klvae.inference.tiling import TileOptions, make_streamer, run_maybe_tiled, tiled_decode, tiled_encode_moments
from klvae.model.autoencoder import AutoencoderKL
from klvae.posterior import DiagonalGaussian


def pad_for(vae: AutoencoderKL, x: Tensor) -> Tensor:
    """Pad right/bottom (edge-replicated) to whole cells of the diffusion latent (config.size_multiple: the
    downsample factor, times the latent patch for FLUX.2, so that its latents always split into patches)."""
    f = vae.config.size_multiple
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

    `dtype` is the compute dtype (default: the weights' dtype; weights stored in half precision take theirs or
    fp32, not the other half type); a half-precision pass that overflows is rerun in fp32. The moments are on the
    model's device, unless a tiled result alone would exceed the memory budget: then it stays in host memory
    (`tiling.deliver`).
    """
    check_arguments(vae, tiling)
    check_images(vae, x)
    part = pass_modules(vae, "encode")
    dtype = compute_dtype(part, dtype)
    # The image stays where it is until a path takes it: the tiled one reads it strip by strip, so a big image
    # in host memory never has to fit on the GPU whole.
    x = pad_for(vae, x)

    def tiled(t: Tensor, dt: torch.dtype) -> Tensor:
        return tiled_encode_moments(vae, t, make_streamer(vae, tiling or TileOptions(), dt, t.shape[2]))

    return run_maybe_tiled(vae, "encode", x, dtype, plain=lambda t, _: vae.encode_moments(t.to(vae.device)),
                           tiled=tiled, opts=tiling, guard=part)


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
    size: Sequence[int] | None = None,
    tiling: TileOptions | None = None,
) -> Tensor:
    """Unscaled latents [B, c, h, w] -> images [B, C, H, W] in [-1, 1], cropped to `size` when given; dtype and
    device as in encode_moments. A model that yields inf or NaN returns them unclamped."""
    check_arguments(vae, tiling)
    check_latents(vae, z)
    part = pass_modules(vae, "decode")
    dtype = compute_dtype(part, dtype)
    z = z.to(vae.device)

    def tiled(t: Tensor, dt: torch.dtype) -> Tensor:
        st = make_streamer(vae, tiling or TileOptions(), dt, t.shape[2] * vae.downsample_factor)
        return tiled_decode(vae, t, st)

    out = run_maybe_tiled(vae, "decode", z, dtype, plain=lambda t, _: vae.decode(t), tiled=tiled, opts=tiling,
                          guard=part)
    # Clamped, an infinite pixel (a broken model's) would pass for white or black: only a finite output is
    # clamped, so that the caller's check (the CLI's, or isfinite) still sees the failure. See check_images.
    if all_finite(out):
        out = out.clamp(-1, 1)
    if size is not None:
        h, w = _check_size(size, tuple(out.shape[-2:]))
        out = out[..., :h, :w]
    return out


def _check_size(size: Sequence[int], full: tuple[int, ...]) -> tuple[int, int]:
    """`size` as two ints, each within the decoded image's side (numpy integers are taken too)."""
    # A crop larger than the decoded image would silently return the whole image; negative sizes would slice
    # from the end.
    try:
        h, w = (operator.index(s) for s in size if not isinstance(s, bool))
    except (TypeError, ValueError):
        h = w = 0
    if not (1 <= h <= full[0] and 1 <= w <= full[1]):
        raise KlvaeError(f"size must be (height, width) with each between 1 and the decoded {full[0]}x{full[1]}, "
                         f"got {quote(size)}")
    return h, w


def check_arguments(vae: object, tiling: object) -> None:
    """TypeError unless `vae` is klvae's model and `tiling` None or a TileOptions."""
    if not isinstance(vae, AutoencoderKL):
        hint = " (as_diffusers' wrapper: pass its .klvae_model)" if hasattr(vae, "klvae_model") else ""
        raise TypeError(f"the model must be a klvae.AutoencoderKL, got a {type(vae).__name__}{hint}")
    if tiling is not None and not isinstance(tiling, TileOptions):
        raise TypeError(f"tiling must be None or a TileOptions (TileOptions(max_memory=2 * 2**30), say), got "
                        f"{quote(tiling)}")


def check_float(x: Tensor, op: str) -> None:
    """ImageError (to "encode") or LatentsError (to "decode") unless `x` is floating point: cast, uint8 pixels
    0..255 would be encoded as if they were [-1, 1] values."""
    if x.is_floating_point():
        return
    if op == "encode":
        raise ImageError(f"images must be floating point in [-1, 1], got {x.dtype} (uint8 pixels: x / 127.5 - 1)")
    raise LatentsError(f"latents must be floating point, got {x.dtype}")


def check_images(vae: AutoencoderKL, x: Tensor) -> None:
    """Images must be a finite floating-point [B, C, H, W] tensor with the model's channel count, not empty."""
    c = vae.config.in_channels
    if not isinstance(x, Tensor):
        raise ImageError(f"images must be a torch.Tensor [B, {c}, H, W] in [-1, 1], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != c or 0 in x.shape:
        hint = " (a single image needs a batch dimension: x[None])" if x.ndim == 3 else ""
        raise ImageError(f"images of shape {tuple(x.shape)} do not fit this model, which takes [B, {c}, H, W]{hint}")
    check_float(x, "encode")
    # Else the NaN guard would take them for a half-precision overflow and rerun the pass in fp32 for nothing.
    if not all_finite(x):
        raise ImageError("images contain NaN or infinite values")


# Values per block of all_finite's sums: 32 MiB of float64 temporaries at most.
_FINITE_BLOCK = 2**22


def all_finite(t: Tensor) -> bool:
    """Whether every value of `t` is finite, without a temporary anywhere near its size."""
    # A float64 sum is non-finite exactly when a value is (pixels are far from its range). Over blocks of the
    # tensor's memory, each cast alone: one sum over a big host image casts it whole (+400 MiB at 4096x4096), and
    # so does a sum over non-contiguous views of it.
    if t.numel() == 0:
        return True
    if t.is_contiguous():
        flat = t.view(-1)
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        flat = t.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC is this tensor's memory order
    else:  # other strides: a bool mask, a quarter of a float32 tensor's size
        return bool(torch.isfinite(t).all())
    sums = torch.stack([part.sum(dtype=torch.float64) for part in flat.split(_FINITE_BLOCK)])
    return bool(torch.isfinite(sums.sum()))


def check_latents(vae: AutoencoderKL, z: Tensor) -> None:
    """Latents must be a floating-point [B, c, h, w] tensor, not empty, with the model's channel count, finite."""
    c = vae.config.latent_channels
    if not isinstance(z, Tensor):
        raise LatentsError(f"latents must be a torch.Tensor [B, {c}, h, w], got {type(z).__name__}")
    if z.ndim != 4 or z.shape[1] != c or 0 in z.shape:
        raise LatentsError(f"latents of shape {tuple(z.shape)} do not fit this model, which takes [B, {c}, h, w]")
    check_float(z, "decode")
    if not torch.isfinite(z).all():
        raise LatentsError("latents contain NaN or infinite values")
