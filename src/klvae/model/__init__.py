"""The network: config and presets, blocks, encoder/decoder, the autoencoder (imports only torch)."""

from klvae.model.autoencoder import AutoencoderKL, Decoder, Encoder
from klvae.model.config import PRESETS, AutoencoderKLConfig, get_preset

__all__ = ["PRESETS", "AutoencoderKL", "AutoencoderKLConfig", "Decoder", "Encoder", "get_preset"]
