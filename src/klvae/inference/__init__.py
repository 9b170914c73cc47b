"""Inference: precision, padding, the NaN guard and exact tiling of large images around the model."""

from klvae.inference.api import check_images, check_latents, decode, encode, encode_moments, pad_for
from klvae.inference.precision import resolve_device, resolve_dtype, run_guarded, usable_device
from klvae.inference.speed import SpeedOptions, optimize_for_inference
from klvae.inference.tiling import TileOptions, estimate_bytes

__all__ = [
    "SpeedOptions",
    "TileOptions",
    "check_images",
    "check_latents",
    "decode",
    "encode",
    "encode_moments",
    "estimate_bytes",
    "optimize_for_inference",
    "pad_for",
    "resolve_device",
    "resolve_dtype",
    "run_guarded",
    "usable_device",
]
