"""Latents on disk: the single file of `klvae encode`, and (for diffusion training) cached shards."""

from klvae.latents.build import CacheSummary, build_cache
from klvae.latents.file import LatentItem, LatentsFile, load_latents, save_latents
from klvae.latents.options import OptionError
from klvae.latents.plain import load_plain_latents
from klvae.latents.verify import CacheReport, ShardCheck, repair_cache, verify_cache

__all__ = ["CacheReport", "CacheSummary", "LatentItem", "LatentsFile", "OptionError", "ShardCheck", "build_cache",
           "load_latents", "load_plain_latents", "repair_cache", "save_latents", "verify_cache"]
