"""klvae: the KL autoencoder of latent diffusion — encode, decode, train, evaluate, cache latents."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from klvae.errors import ImageError, KlvaeError, LatentsError, WeightsError

if TYPE_CHECKING:
    from klvae.model import PRESETS, AutoencoderKL, AutoencoderKLConfig, get_preset
    from klvae.posterior import DiagonalGaussian

__version__ = "0.1.0"

# The model's names load torch (seconds) on first use, not on `import klvae`: the `klvae` command imports this
# package before its main() runs, and a Ctrl-C during torch's import would otherwise print a traceback.
_LAZY = {
    "PRESETS": "klvae.model",
    "AutoencoderKL": "klvae.model",
    "AutoencoderKLConfig": "klvae.model",
    "get_preset": "klvae.model",
    "DiagonalGaussian": "klvae.posterior",
}


def __getattr__(name: str) -> Any:
    """The model's names, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'klvae' has no attribute {name!r}")


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
