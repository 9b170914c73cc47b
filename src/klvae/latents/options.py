"""The options of the cache and scale jobs, and their checks: OptionErrors (klvae.errors), which name an option as
the Python API does, and as the command line's flags do."""

from __future__ import annotations

from dataclasses import dataclass

from klvae.checks import is_integer
from klvae.errors import OptionError
from klvae.images import MAX_PIXELS, MAX_RESOLUTION
from klvae.model.autoencoder import AutoencoderKL

__all__ = ["CacheOptions", "OptionError", "check_at_least", "check_resolution", "check_seed", "check_whole_latents"]


@dataclass
class CacheOptions:
    """What to store and how to cut the images."""

    resolution: int = 512  # target side; with buckets, the target area is resolution**2
    buckets: bool = False  # aspect-ratio buckets instead of a centre square crop
    flip: bool = False  # also store a horizontally flipped copy of every image
    store: str = "moments"  # "moments" (mean + logvar), "sample" (one posterior sample) or "scaled" (scaled mean)
    shard_size: int = 256  # rows per shard file
    batch_size: int = 8
    num_workers: int = 2
    seed: int = 0  # for store="sample"

    def __post_init__(self) -> None:
        if self.store not in ("moments", "sample", "scaled"):
            raise OptionError(lambda n: f"{n('store')} must be moments, sample or scaled, got {self.store!r}")
        check_resolution(self.resolution)
        if self.resolution % 64 and self.buckets:
            raise OptionError(lambda n: f"with {n('buckets')}, {n('resolution')} must be a multiple of 64, got "
                                        f"{self.resolution}")
        for name, least in (("shard_size", 1), ("batch_size", 1), ("num_workers", 0)):
            check_at_least(name, getattr(self, name), least)


def check_at_least(name: str, value: int, least: int) -> None:
    """OptionError unless the option `name` is an integer of at least `least`."""
    # A library caller's float, bool or str would fail deep inside (a slice, a resize) or count as an integer.
    if not is_integer(value):
        raise OptionError(lambda n: f"{n(name)} must be an integer, got {value!r}")
    if value < least:
        raise OptionError(lambda n: f"{n(name)} must be at least {least}, got {value}")


def check_seed(seed: int) -> None:
    """OptionError unless `seed` is an integer that torch's generators take (0 .. 2**63 - 1)."""
    check_at_least("seed", seed, -(2**63))  # its type; the range's message names both ends
    if not 0 <= seed < 2**63:
        raise OptionError(lambda n: f"{n('seed')} must be between 0 and {2**63 - 1}, got {seed}")


def check_resolution(resolution: int) -> None:
    """OptionError unless a square of this side is an image size klvae reads (1 .. sqrt(MAX_PIXELS))."""
    check_at_least("resolution", resolution, 1)
    if resolution > MAX_RESOLUTION:
        raise OptionError(lambda n: f"{n('resolution')} must be at most {MAX_RESOLUTION} (a square of at most "
                                    f"{MAX_PIXELS} pixels), got {resolution}")


def check_whole_latents(vae: AutoencoderKL, resolution: int) -> None:
    """OptionError unless `resolution` is a multiple of the model's downsample factor (times its latent patch)."""
    factor = vae.config.size_multiple
    if resolution % factor:
        # The encoder would pad the crop, and the latents would hold cells of the padding too.
        p = vae.config.latent_patch_size
        what = f"the model's downsample factor {factor}" if p == 1 else \
            f"{factor} (the model's downsample factor {vae.config.downsample_factor} x its latent patch {p})"
        raise OptionError(lambda n: f"{n('resolution')} must be a multiple of {what}, got {resolution}")
