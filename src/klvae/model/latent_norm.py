"""How a VAE latent becomes the diffusion model's latent: one scale and shift, or one per channel."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from klvae.checks import is_integer, is_real

NORM_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "latent_patch_size")


@dataclass(frozen=True)
class LatentNorm:
    """z_diffusion = (z - shift) * scale: SD/SDXL scale only, SD3/FLUX add one shift, and VAEs whose config has
    latents_mean/latents_std (Playground v2.5) normalise each channel: (z - mean_c) * scaling_factor / std_c,
    as diffusers' pipelines do. Bad values are a ValueError naming the field.

    With latent_patch_size p > 1 (FLUX.2) the diffusion latent is z patchified first: [C, h, w] -> [C*p*p, h/p, w/p],
    channels in (c, row in patch, column in patch) order as FLUX.2's pipelines have them, and the per-channel
    statistics (FLUX.2's latent BatchNorm: mean, sqrt(var + eps)) have C*p*p entries.
    """

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    latent_patch_size: int = 1

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "scaling_factor", finite(self.scaling_factor, "scaling_factor", positive=True))
        if self.shift_factor is not None:
            put(self, "shift_factor", finite(self.shift_factor, "shift_factor"))
        put(self, "latents_mean", _floats(self.latents_mean, "latents_mean"))
        put(self, "latents_std", _floats(self.latents_std, "latents_std", positive=True))
        p = self.latent_patch_size
        if not is_integer(p) or not 1 <= p <= _MAX_PATCH:
            raise ValueError(f"latent_patch_size must be an integer from 1 to {_MAX_PATCH}, got {p!r}")
        put(self, "latent_patch_size", int(p))
        mean, std = self.latents_mean, self.latents_std
        if (mean is None) != (std is None):
            raise ValueError("latents_mean and latents_std come together: set both or neither")
        if mean is not None and std is not None:
            if len(mean) != len(std):
                raise ValueError(f"latents_mean has {len(mean)} entries but latents_std has {len(std)}")
            if self.shift_factor is not None:
                # diffusers' pipelines ignore shift_factor when the per-channel statistics are set.
                raise ValueError("shift_factor and latents_mean are two shifts of the same latent: set one")

    @property
    def channels(self) -> int | None:
        """The channel count of the diffusion latent that the per-channel statistics fit (None: any)."""
        return None if self.latents_mean is None else len(self.latents_mean)

    def patchify(self, z: Tensor) -> Tensor:
        """[..., C, h, w] -> [..., C*p*p, h/p, w/p] in (c, pi, pj) channel order; z itself when p is 1."""
        p = self.latent_patch_size
        if p == 1:
            return z
        if z.ndim < 3:
            raise ValueError(f"latents of shape {tuple(z.shape)} have no [C, h, w] to split into patches")
        *lead, c, h, w = z.shape
        if h % p or w % p:
            raise ValueError(f"latents of size {h}x{w} do not split into the {p}x{p} patches that this VAE's "
                             f"diffusion latent is made of (sides a multiple of {p} latent cells; "
                             "klvae.inference.encode pads images so)")
        n = len(lead)
        z = z.reshape(*lead, c, h // p, p, w // p, p)  # [..., c, i, pi, j, pj]
        z = z.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3)  # [..., c, pi, pj, i, j]
        return z.reshape(*lead, c * p * p, h // p, w // p)

    def unpatchify(self, z: Tensor) -> Tensor:
        """The inverse of patchify: [..., C*p*p, h, w] -> [..., C, h*p, w*p]."""
        p = self.latent_patch_size
        if p == 1:
            return z
        if z.ndim < 3:
            raise ValueError(f"latents of shape {tuple(z.shape)} have no [C, h, w] to join patches in")
        *lead, cpp, h, w = z.shape
        if cpp % (p * p):
            raise ValueError(f"latents with {cpp} channels are not {p}x{p} patches of whole channels")
        n = len(lead)
        z = z.reshape(*lead, cpp // (p * p), p, p, h, w)  # [..., c, pi, pj, i, j]
        z = z.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # [..., c, i, pi, j, pj]
        return z.reshape(*lead, cpp // (p * p), h * p, w * p)

    def _affine(self, z: Tensor) -> tuple[Tensor | float, float, Tensor | float]:
        """(shift, scaling_factor, std) for z; the order of operations below is diffusers' pipelines', so that
        results agree bit for bit."""
        if self.latents_mean is None or self.latents_std is None:
            return self.shift_factor or 0.0, self.scaling_factor, 1.0
        if z.ndim < 3 or z.shape[-3] != len(self.latents_mean):
            raise ValueError(f"latents of shape {tuple(z.shape)} do not have the {len(self.latents_mean)} "
                             "channels that latents_mean/latents_std describe")
        # [C, 1, 1]: broadcasts over [C, H, W] and [B, C, H, W] alike.
        mean = torch.tensor(self.latents_mean, dtype=z.dtype, device=z.device).view(-1, 1, 1)
        std = torch.tensor(self.latents_std, dtype=z.dtype, device=z.device).view(-1, 1, 1)
        return mean, self.scaling_factor, std

    def _vae_channels(self, latent_channels: int | None) -> int | None:
        """The VAE latent's channel count: the model's when given, else what the statistics imply (None: any)."""
        if latent_channels is not None:
            return latent_channels
        return None if self.channels is None else self.channels // self.latent_patch_size**2

    def scale(self, z: Tensor, latent_channels: int | None = None) -> Tensor:
        """VAE latent -> the diffusion model's latent; `latent_channels` (the model's) checks z's channels."""
        p, c = self.latent_patch_size, self._vae_channels(latent_channels)
        if c is not None and (z.ndim < 3 or z.shape[-3] != c):
            # Checked before patching, so that the message names the shape passed (latents scaled twice, say).
            if p == 1:
                raise ValueError(f"latents of shape {tuple(z.shape)} do not have the {c} channels of this VAE's "
                                 f"[B, {c}, h, w] latents")
            raise ValueError(f"latents of shape {tuple(z.shape)} are not this VAE's [B, {c}, h, w] (its diffusion "
                             f"latent is [B, {c * p * p}, h/{p}, w/{p}])")
        z = self.patchify(z)
        shift, scale, std = self._affine(z)
        return (z - shift) * scale / std

    def unscale(self, z: Tensor, latent_channels: int | None = None) -> Tensor:
        """The diffusion model's latent -> VAE latent; `latent_channels` (the model's) checks z's channels."""
        p, c = self.latent_patch_size, self._vae_channels(latent_channels)
        if c is not None and (z.ndim < 3 or z.shape[-3] != c * p * p):
            # Without this, a VAE latent given to a patched model's unscale (channels a multiple of p*p) would be
            # unpatchified silently into a wrong shape.
            if p == 1:
                raise ValueError(f"latents of shape {tuple(z.shape)} do not have the {c} channels of this VAE's "
                                 f"[B, {c}, h, w] latents")
            raise ValueError(f"latents of shape {tuple(z.shape)} are not this VAE's diffusion latent "
                             f"[B, {c * p * p}, h, w] (its [B, {c}, {p}h, {p}w] latent in {p}x{p} patches, as "
                             "scale_latents makes it)")
        shift, scale, std = self._affine(z)
        return self.unpatchify(z * std / scale + shift)

    def to_dict(self) -> dict[str, Any]:
        """The fields in plain JSON (lists for the per-channel ones)."""
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latents_mean": None if self.latents_mean is None else list(self.latents_mean),
                "latents_std": None if self.latents_std is None else list(self.latents_std),
                "latent_patch_size": self.latent_patch_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentNorm:
        """From a dict holding the fields; those absent (files older than them) take their defaults, but for
        scaling_factor, which every such file holds."""
        if "scaling_factor" not in d:  # a default of 1.0 would read scaled latents as unscaled ones
            raise ValueError("no scaling_factor among the latent normalisation's fields")
        return cls(d["scaling_factor"], d.get("shift_factor"), d.get("latents_mean"), d.get("latents_std"),
                   d.get("latent_patch_size", 1))


# FLUX.2 uses 2; a bigger patch would fold more cells into one diffusion token than any released model does.
_MAX_PATCH = 8


def finite(value: Any, name: str, positive: bool = False) -> float:
    """`value` as a float; ValueError if it is no finite (positive) real number."""
    try:
        ok = is_real(value) and math.isfinite(value)
    except OverflowError:  # an int past float's range (a YAML or JSON number of hundreds of digits)
        ok = False
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return float(value)


def _floats(values: Any, name: str, positive: bool = False) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
    return tuple(finite(v, f"every {name} entry", positive) for v in values)
