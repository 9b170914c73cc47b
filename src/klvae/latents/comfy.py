"""ComfyUI's `.latent` files (its SaveLatent / LoadLatent nodes): one [B, C, h, w] batch of the VAE's latents.

The format, as ComfyUI's nodes.py writes and reads it (SaveLatent.save, LoadLatent.load): a safetensors file
holding `latent_tensor` (the LATENT's "samples", float32 [batch, channels, height, width]) and an empty tensor
`latent_format_version_0` marking the current format; a file without the marker is of the first format, whose
latents LoadLatent multiplies by 1 / 0.18215. The metadata (the workflow's prompt) is not read back.

A LATENT holds what ComfyUI's VAE.encode returns (comfy/sd.py): the posterior's mode, not scaled; the diffusion
model's latent_format.process_in applies scaling_factor/shift_factor (or Playground's per-channel statistics)
later (comfy/latent_formats.py). FLUX.2's VAE is the exception: ComfyUI builds its 2x2 patching and latent
BatchNorm into the VAE (sd.py: `bn.running_mean` -> batch_norm_latent, 4x the channels at twice the factor), so
its LATENT is 128 channels at 1/16 of the image, normalised, and latent_formats.Flux2.process_in is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from klvae.atomic import atomic_save_file
from klvae.errors import LatentsError, quote
from klvae.latents.file import LatentsFile, batch_item_names, batch_latents_file, check_filled_float
from klvae.model.latent_norm import LatentNorm

LATENT_KEY = "latent_tensor"
VERSION_MARKER = "latent_format_version_0"
# LoadLatent's multiplier for files without VERSION_MARKER: those held SD's scaled latents.
OLD_FORMAT_SCALE = 0.18215
SUFFIX = ".latent"


@dataclass
class ComfyLatent:
    """A `.latent` file's batch as LoadLatent gives it (float32, old-format files already multiplied back)."""

    samples: Tensor
    old_format: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


def comfy_norm(norm: LatentNorm) -> LatentNorm:
    """The factors from a VAE latent to ComfyUI's LATENT: none, but FLUX.2's patches and per-channel statistics."""
    if norm.latent_patch_size == 1:
        return LatentNorm()
    # ComfyUI's FLUX.2 VAE ends in its latent BatchNorm, (z - running_mean) / sqrt(running_var + eps), without
    # scaling_factor: klvae's latents_mean/latents_std hold those two.
    return LatentNorm(1.0, None, norm.latents_mean, norm.latents_std, norm.latent_patch_size)


def comfy_channels(latent_channels: int, norm: LatentNorm) -> int:
    """Channels of ComfyUI's LATENT for a VAE with `latent_channels` (x4 for FLUX.2's 2x2 patches)."""
    return latent_channels * norm.latent_patch_size ** 2


def to_comfy(z: Tensor, norm: LatentNorm) -> Tensor:
    """VAE latents [B, C, h, w] -> ComfyUI's LATENT samples (float32)."""
    return comfy_norm(norm).scale(z.float())


def from_comfy(samples: Tensor, norm: LatentNorm) -> Tensor:
    """ComfyUI's LATENT samples -> VAE latents [B, C, h, w] (float32)."""
    return comfy_norm(norm).unscale(samples.float())


def comfy_crop(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred crop to multiples of `multiple` that ComfyUI's VAE.encode
    makes (vae_encode_crop_pixels: offset (side % multiple) // 2)."""
    h, w = height // multiple * multiple, width // multiple * multiple
    return (height % multiple) // 2, (width % multiple) // 2, h, w


def is_comfy_latent(path: str | Path) -> bool:
    """Whether `path` is meant as a ComfyUI latent: named `.latent`, or a safetensors holding `latent_tensor`."""
    if Path(path).suffix.lower() == SUFFIX:
        return True
    if not Path(path).is_file():  # a FIFO would block safe_open for good, holding the GIL (no Ctrl-C)
        return False  # the klvae reader says what it is
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = f.keys()  # safe_open has no __contains__
        return LATENT_KEY in keys
    except (SafetensorError, OSError, ValueError):
        return False  # not safetensors: the klvae reader says what is wrong with it


def load_comfy_latent(path: str | Path) -> ComfyLatent:
    """Read and check a `.latent` file as LoadLatent does; anything unusable is a one-line LatentsError."""
    path = Path(path)
    if not path.is_file():
        raise LatentsError(f"{path} is a folder, not a latents file" if path.is_dir() else
                           f"{path} is not a regular file (a FIFO, socket or device)" if path.exists() else
                           f"no such latents file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise LatentsError(f"{path} is not a readable safetensors file: {e}") from None
    if LATENT_KEY not in tensors:
        held = ", ".join(sorted(tensors)[:5]) or "nothing"
        raise LatentsError(f"{path} is not a ComfyUI latent file: no {LATENT_KEY} tensor (it holds {quote(held)})")
    t = tensors[LATENT_KEY]
    if t.ndim != 4:
        raise LatentsError(f"{path}: {LATENT_KEY} of shape {list(t.shape)}; ComfyUI's image latents are "
                           "[batch, channels, height, width]")
    check_filled_float(t, str(path), LATENT_KEY)
    old = VERSION_MARKER not in tensors
    # LoadLatent's own lines: the multiplier as a Python float, applied to the float32 tensor.
    multiplier = 1.0 / OLD_FORMAT_SCALE if old else 1.0
    samples = t.float() * multiplier
    if not torch.isfinite(samples).all():
        raise LatentsError(f"{path}: latents contain NaN or infinite values")
    return ComfyLatent(samples=samples, old_format=old, metadata=dict(metadata))


def save_comfy_latent(path: str | Path, samples: Tensor, metadata: dict[str, str] | None = None,
                      replace: bool = True) -> Path:
    """Write a `.latent` file as SaveLatent does (float32 samples and the version marker), atomically (with
    replace=False, a file at `path` is kept: KlvaeError)."""
    if samples.ndim != 4 or 0 in samples.shape:
        raise ValueError(f"ComfyUI latents are one non-empty [B, C, h, w] batch, got shape {list(samples.shape)}")
    tensors = {LATENT_KEY: samples.detach().to("cpu", torch.float32).contiguous(),
               VERSION_MARKER: torch.tensor([])}
    return atomic_save_file(path, tensors, metadata, replace)


def comfy_item_names(path: str | Path, count: int) -> list[str]:
    """Image names for a file's latents: its name's stem and the index, `x_00.png`, `x_01.png`... (two digits
    at least)."""
    return batch_item_names(path, count)


def comfy_latents_file(samples: Tensor, names: list[str], norm: LatentNorm, cell: int,
                       model: str = "") -> LatentsFile:
    """A `.latent` batch as a klvae LatentsFile (one item per latent, decoded whole: `cell` pixels per stored
    cell), its factors comfy_norm(norm), so that the latents file's checks and decoding apply."""
    return batch_latents_file(samples, names, comfy_norm(norm), cell, model)
