"""Pins of LDM's loss that a mutation audit found unguarded: the pixel weight and the L2 pixel term inside the
generator loss, the vanilla critic loss chosen by the config, and the critic's real images detached; each against a
hand transcription of LPIPSWithDiscriminator's formulas."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from klvae.posterior import DiagonalGaussian
from klvae.training.losses import AutoencoderLoss, LossConfig


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Differences well away from 0 and 1, where |d| and d² (and their weights) cannot coincide.
    return torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1


def test_pixel_weight_scales_the_pixel_term_of_the_nll() -> None:
    x, y = _pair()
    post = DiagonalGaussian(torch.randn(2, 8, 2, 2, generator=torch.Generator().manual_seed(1)))
    cfg = LossConfig(perceptual_weight=0.0, pixel_weight=0.25, kl_weight=0.1, logvar_init=0.3, disc_weight=0.0)
    loss, logs = AutoencoderLoss(cfg).generator_loss(x, y, post, global_step=0)
    rec = 0.25 * (x - y).abs()
    nll = (rec / math.exp(0.3) + 0.3).sum() / 2
    torch.testing.assert_close(logs["rec"], rec.mean())
    torch.testing.assert_close(logs["nll"], nll)
    torch.testing.assert_close(loss, nll + 0.1 * post.kl().sum() / 2)


def test_pixel_and_perceptual_weights_together() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = LossConfig(lpips_pretrained=False, pixel_weight=2.0, perceptual_weight=0.5, kl_weight=0.0, disc_weight=0.0)
    loss_fn = AutoencoderLoss(cfg)
    loss, logs = loss_fn.generator_loss(x, y, None, 0)
    rec = 2.0 * (x - y).abs() + 0.5 * loss_fn.perceptual(x, y)  # LPIPS [B, 1, 1, 1], broadcast over pixels
    torch.testing.assert_close(logs["rec"], rec.mean())
    torch.testing.assert_close(loss, rec.sum() / 2)


def test_l2_pixel_loss_reaches_the_generator_loss() -> None:
    x, y = _pair(2)
    cfg = LossConfig(pixel_loss="l2", perceptual_weight=0.0, kl_weight=0.0, disc_weight=0.0)
    loss, logs = AutoencoderLoss(cfg).generator_loss(x, y, None, 0)
    torch.testing.assert_close(loss, (x - y).square().sum() / 2)
    torch.testing.assert_close(logs["rec"], (x - y).square().mean())


def test_the_vanilla_critic_loss_is_the_one_the_config_names() -> None:
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(LossConfig(perceptual_weight=0.0, disc_start=0, disc_ndf=8, disc_loss="vanilla",
                                         disc_factor=0.7))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d_loss, logs = loss_fn.discriminator_loss(x, y, 0)
    # Train-mode BatchNorm normalises each pass by its own batch: a second pass gives the same logits.
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(y)
    hand = 0.7 * 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    hinge = 0.7 * 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    assert not torch.allclose(hand, hinge)  # the two critics differ on these logits
    torch.testing.assert_close(d_loss, hand)
    torch.testing.assert_close(logs["logits_real"], real.mean().detach())
    torch.testing.assert_close(logs["logits_fake"], fake.mean().detach())


def test_the_critic_sends_no_gradient_to_the_real_images() -> None:
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(LossConfig(perceptual_weight=0.0, disc_start=0, disc_ndf=8))
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)  # e.g. images from an upstream differentiable step
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    d_loss, _ = loss_fn.discriminator_loss(x, y, 0)
    d_loss.backward()
    assert x.grad is None and y.grad is None
    assert all(p.grad is not None for p in loss_fn.discriminator_parameters())
