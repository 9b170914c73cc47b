"""klvae: the KL autoencoder of latent diffusion — encode, decode, train, evaluate, cache latents."""

from klvae.errors import ImageError, KlvaeError, LatentsError, WeightsError
from klvae.model import PRESETS, AutoencoderKL, AutoencoderKLConfig, get_preset
from klvae.posterior import DiagonalGaussian

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussian",
    "ImageError",
    "KlvaeError",
    "LatentsError",
    "WeightsError",
    "__version__",
    "get_preset",
]
