"""Autoencoder training losses: LPIPS, the PatchGAN critic, and LDM's combined objective."""

from klvae.nets.lpips import LPIPS
from klvae.training.losses.discriminator import (
    ActNorm,
    NLayerDiscriminator,
    generator_adversarial_loss,
    hinge_d_loss,
    vanilla_d_loss,
    weights_init,
)
from klvae.training.losses.ldm import (
    LOSS_PRESETS,
    AutoencoderLoss,
    LossConfig,
    adaptive_weight,
    adopt_weight,
    gaussian_nll,
    get_loss_preset,
    kl_loss,
    pixel_loss,
)

__all__ = [
    "LOSS_PRESETS",
    "LPIPS",
    "ActNorm",
    "AutoencoderLoss",
    "LossConfig",
    "NLayerDiscriminator",
    "adaptive_weight",
    "adopt_weight",
    "gaussian_nll",
    "generator_adversarial_loss",
    "get_loss_preset",
    "hinge_d_loss",
    "kl_loss",
    "pixel_loss",
    "vanilla_d_loss",
    "weights_init",
]
