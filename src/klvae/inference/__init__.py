"""Inference: precision, padding, the NaN guard and (large images) tiling around the model."""

from klvae.inference.api import check_latents, decode, encode, pad_for
from klvae.inference.precision import resolve_device, resolve_dtype, run_guarded

__all__ = ["check_latents", "decode", "encode", "pad_for", "resolve_device", "resolve_dtype", "run_guarded"]
