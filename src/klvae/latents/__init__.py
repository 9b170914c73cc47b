"""Latents on disk: the single file of `klvae encode`, and (for diffusion training) cached shards."""

from klvae.latents.file import LatentItem, LatentsFile, load_latents, save_latents

__all__ = ["LatentItem", "LatentsFile", "load_latents", "save_latents"]
