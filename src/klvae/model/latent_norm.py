"""How a VAE latent becomes the diffusion model's latent: one scale and shift, or one per channel."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

NORM_FIELDS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


@dataclass(frozen=True)
class LatentNorm:
    """z_diffusion = (z - shift) * scale: SD/SDXL scale only, SD3/FLUX add one shift, and VAEs whose config has
    latents_mean/latents_std (Playground v2.5) normalise each channel: (z - mean_c) * scaling_factor / std_c,
    as diffusers' pipelines do. Bad values are a ValueError naming the field."""

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "scaling_factor", finite(self.scaling_factor, "scaling_factor", positive=True))
        if self.shift_factor is not None:
            put(self, "shift_factor", finite(self.shift_factor, "shift_factor"))
        put(self, "latents_mean", _floats(self.latents_mean, "latents_mean"))
        put(self, "latents_std", _floats(self.latents_std, "latents_std", positive=True))
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
        """The channel count the per-channel statistics fit (None: any)."""
        return None if self.latents_mean is None else len(self.latents_mean)

    def _affine(self, z: Tensor) -> tuple[Tensor | float, Tensor | float]:
        if self.latents_mean is None or self.latents_std is None:
            return self.shift_factor or 0.0, self.scaling_factor
        if z.ndim < 3 or z.shape[-3] != len(self.latents_mean):
            raise ValueError(f"latents of shape {tuple(z.shape)} do not have the {len(self.latents_mean)} "
                             "channels that latents_mean/latents_std describe")
        # [C, 1, 1]: broadcasts over [C, H, W] and [B, C, H, W] alike.
        mean = torch.tensor(self.latents_mean, dtype=z.dtype, device=z.device).view(-1, 1, 1)
        std = torch.tensor(self.latents_std, dtype=z.dtype, device=z.device).view(-1, 1, 1)
        return mean, self.scaling_factor / std

    def scale(self, z: Tensor) -> Tensor:
        """VAE latent -> the diffusion model's latent."""
        shift, scale = self._affine(z)
        return (z - shift) * scale

    def unscale(self, z: Tensor) -> Tensor:
        """The diffusion model's latent -> VAE latent."""
        shift, scale = self._affine(z)
        return z / scale + shift

    def to_dict(self) -> dict[str, Any]:
        """The four fields in plain JSON (lists for the per-channel ones)."""
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "latents_mean": None if self.latents_mean is None else list(self.latents_mean),
                "latents_std": None if self.latents_std is None else list(self.latents_std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentNorm:
        """From a dict holding the fields; absent per-channel ones (files older than them) are None."""
        return cls(d["scaling_factor"], d.get("shift_factor"), d.get("latents_mean"), d.get("latents_std"))


def finite(value: Any, name: str, positive: bool = False) -> float:
    """`value` as a float; ValueError if it is no finite (positive) real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return float(value)


def _floats(values: Any, name: str, positive: bool = False) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
    return tuple(finite(v, f"every {name} entry", positive) for v in values)
