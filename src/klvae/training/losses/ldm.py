"""The LDM autoencoder objective (LPIPSWithDiscriminator): pixel + LPIPS as a Gaussian NLL, KL, and a PatchGAN.

Generator side:  loss = sum(w * nll) / B + kl_weight * KL / B + d_weight * disc_factor * g_loss,
with nll = rec / exp(logvar) + logvar per pixel and rec = pixel_weight * |x - x̂| (or squared)
+ perceptual_weight * LPIPS broadcast over pixels, exactly as LDM sums it.
Critic side:     d_loss = disc_factor * hinge-or-vanilla(D(x), D(x̂)).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from klvae.checks import FLOAT32_MAX
from klvae.errors import KlvaeError, quote
from klvae.nets.lpips import LPIPS
from klvae.posterior import DiagonalGaussian
from klvae.training.losses.discriminator import (
    D_LOSSES,
    NLayerDiscriminator,
    generator_adversarial_loss,
    weights_init,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossConfig:
    """Weights and switches of the autoencoder loss; the defaults are LDM's KL-f8 recipe."""

    # L1 is LDM's choice (sharper, robust to outliers); L2 is what the SD ft-MSE decoder leaned on (smoother).
    pixel_loss: str = "l1"
    # Scale of the per-pixel term; LDM has none (1.0), the LPIPS weight is relative to it.
    pixel_weight: float = 1.0
    # LPIPS weight, added per pixel as LDM does; 0 skips building the VGG altogether.
    perceptual_weight: float = 1.0
    # Real LPIPS weights are required for a meaningful perceptual term; False gives a random trunk (tests only).
    lpips_pretrained: bool = True
    # Explicit VGG16 (torchvision layout) and LPIPS-head files, for machines that cannot download them.
    lpips_vgg_path: str | None = None
    lpips_lin_path: str | None = None
    # LDM's 1e-6: just enough KL to keep latents bounded without blurring reconstructions.
    kl_weight: float = 1e-6
    # Initial log-variance of the Gaussian NLL; 0 makes nll = rec at the start.
    logvar_init: float = 0.0
    # LDM registers logvar as a parameter but never gives it to an optimiser, so it stays at logvar_init;
    # True hands it to the autoencoder optimiser (as sgm's learn_logvar does).
    learn_logvar: bool = False
    # Step from which the GAN term (and critic training) is on: LDM lets reconstructions settle first.
    disc_start: int = 50001
    # Scale on the adaptive GAN weight; 0 disables (and does not build) the discriminator.
    disc_weight: float = 0.5
    # On/off factor of both GAN losses after disc_start; 0 also disables the discriminator.
    disc_factor: float = 1.0
    # "hinge" (LDM) or "vanilla" (non-saturating BCE) critic loss.
    disc_loss: str = "hinge"
    # PatchGAN depth: 3 gives a 70x70 receptive field, the pix2pix/LDM default.
    disc_num_layers: int = 3
    # Channels the critic sees: 3 for RGB images.
    disc_in_channels: int = 3
    # Width of the critic's first layer (doubles per layer up to 8x).
    disc_ndf: int = 64
    # ActNorm instead of BatchNorm in the critic: independent of batch composition and size.
    disc_use_actnorm: bool = False

    def __post_init__(self) -> None:
        _coerce_numbers(self)
        if self.pixel_loss not in ("l1", "l2"):
            raise KlvaeError(f"loss.pixel_loss must be 'l1' or 'l2', got {quote(self.pixel_loss)}")
        if self.disc_loss not in D_LOSSES:
            raise KlvaeError(f"loss.disc_loss must be one of {sorted(D_LOSSES)}, got {quote(self.disc_loss)}")
        for name in ("pixel_weight", "perceptual_weight", "kl_weight", "disc_weight", "disc_factor", "disc_start"):
            if getattr(self, name) < 0:
                raise KlvaeError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("disc_num_layers", "disc_in_channels", "disc_ndf"):
            if getattr(self, name) < 1:
                raise KlvaeError(f"loss.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def uses_discriminator(self) -> bool:
        """Whether a GAN term can ever be on (and so a discriminator is built)."""
        return self.disc_weight > 0 and self.disc_factor > 0

    def replace(self, **changes: Any) -> LossConfig:
        """A copy with some fields changed (TypeError on unknown names)."""
        return dataclasses.replace(self, **changes)


_FLOATS = ("pixel_weight", "perceptual_weight", "kl_weight", "logvar_init", "disc_weight", "disc_factor")
_INTS = ("disc_start", "disc_num_layers", "disc_in_channels", "disc_ndf")


def _coerce_numbers(cfg: LossConfig) -> None:
    # YAML 1.1 reads `1e-6` (no dot) as a string; accept it rather than fail deep inside the loss.
    for names, kind in ((_FLOATS, float), (_INTS, int)):
        for name in names:
            value = getattr(cfg, name)
            try:
                number = math.nan if isinstance(value, bool) else float(value)
            except (TypeError, ValueError, OverflowError):
                number = math.nan
            # A nan or inf weight would make every step non-finite, and each would only be skipped.
            if not math.isfinite(number):
                raise KlvaeError(f"loss.{name} must be a finite number, got {quote(value)}")
            if kind is int and not number.is_integer():
                raise KlvaeError(f"loss.{name} must be a whole number, got {quote(value)}")
            if kind is float and abs(number) > FLOAT32_MAX:  # the loss computes in float32
                raise KlvaeError(f"loss.{name} must lie within float32's range (±3.4e38), got {quote(value)}")
            object.__setattr__(cfg, name, int(number) if kind is int else number)


LOSS_PRESETS: dict[str, LossConfig] = {
    # LDM's KL-f8 autoencoder: L1 + LPIPS, KL 1e-6, hinge PatchGAN from step 50001 with weight 0.5.
    "ldm": LossConfig(),
    # Stability's sd-vae-ft-mse recipe: MSE + 0.1 LPIPS (decoder-only, so no KL); no critic here.
    "ft-mse": LossConfig(pixel_loss="l2", perceptual_weight=0.1, kl_weight=0.0, disc_weight=0.0),
    # The plain loop: MSE only.
    "mse": LossConfig(pixel_loss="l2", perceptual_weight=0.0, kl_weight=0.0, disc_weight=0.0),
}


def get_loss_preset(name: str) -> LossConfig:
    """A named LossConfig: ldm, ft-mse or mse."""
    try:
        return LOSS_PRESETS[name]
    except KeyError:
        raise KlvaeError(f"unknown loss preset {quote(name)}; choose one of {', '.join(LOSS_PRESETS)}") from None


# ---- the terms, each on its own -----------------------------------------------------------------------


def pixel_loss(inputs: Tensor, reconstructions: Tensor, kind: str = "l1") -> Tensor:
    """Per-element |x - x̂| ("l1") or (x - x̂)^2 ("l2"), same shape as the inputs."""
    diff = inputs - reconstructions
    return diff.abs() if kind == "l1" else diff.pow(2)


def gaussian_nll(rec: Tensor, logvar: Tensor) -> Tensor:
    """rec / exp(logvar) + logvar: a Laplace/Gaussian NLL up to constants, with one learned scale."""
    return rec / torch.exp(logvar) + logvar


def batch_mean_of_sums(t: Tensor) -> Tensor:
    """sum(t) / B: LDM's reduction (sum over pixels, mean over the batch)."""
    return t.sum() / t.shape[0]


def kl_loss(posterior: DiagonalGaussian) -> Tensor:
    """KL(q || N(0, I)) summed over C, H, W, averaged over the batch."""
    return batch_mean_of_sums(posterior.kl())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before `threshold`, `weight` from it on (LDM's switch for the GAN terms)."""
    return value if global_step < threshold else weight


def _last_layer_grad_norm(loss: Tensor, last_layer: Tensor, fp16_scale: float = 1.0) -> Tensor | None:
    """||∂loss/∂last_layer|| in fp32; None when last_layer is not in the loss's graph.

    Under fp16 (autocast or fp16 weights) the gradient at the decoder's last layer, a sum over every pixel, can
    pass fp16's 65504 and turn to inf, which the clamp would turn into the maximum weight without a word; the loss
    is then scaled down (and the norm back up) until the gradient fits, as the gradient scaler does for the real
    backward. A loss whose gradient is tiny a pixel starts scaled up by `fp16_scale`, else fp16's subnormals round
    it coarsely. fp32 and bf16 take one pass, as before.
    """
    device = last_layer.device.type
    fp16 = last_layer.dtype == torch.float16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    )
    scale, norm = fp16_scale if fp16 else 1.0, None
    for _ in range(5 if fp16 else 1):
        grad: Tensor | None = torch.autograd.grad(
            loss if scale == 1.0 else loss * scale, last_layer, retain_graph=True, allow_unused=True
        )[0]
        if grad is None:
            return None
        norm = grad.float().norm() / scale
        if not fp16 or bool(torch.isfinite(norm)):
            break
        scale *= 2.0**-8
    return norm


# The GAN term's gradient is a mean's, 1/pixels a pixel (1e-7 at 512x512): below fp16's normal range, it came out
# 14 % low unscaled. The reconstruction term's is a sum's, about 1 a pixel: scaled, it would overflow.
_GAN_FP16_SCALE = 2.0**16


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||∇_last nll|| / (||∇_last g|| + 1e-4), clamped to [0, max_weight] and detached (VQGAN's balance)."""
    nll_norm, g_norm = _last_layer_grad_norm(nll_loss, last_layer), _last_layer_grad_norm(g_loss, last_layer,
                                                                                            _GAN_FP16_SCALE)
    if nll_norm is None or g_norm is None:
        raise ValueError("last_layer is not in the graph of the loss (pass the decoder's final conv weight)")
    return (nll_norm / (g_norm + 1e-4)).clamp(0.0, max_weight).detach()


# ---- the module ---------------------------------------------------------------------------------------


def _skip_perceptual(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # LPIPS is fixed and reloaded from its source: 59 MB of VGG per checkpoint would be dead weight.
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _fill_perceptual(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # The mirror image: loading a checkpoint without LPIPS keys keeps the LPIPS this module was built with.
    perceptual = getattr(module, "perceptual", None)
    if perceptual is not None:
        for key, value in perceptual.state_dict().items():
            state_dict.setdefault(f"{prefix}perceptual.{key}", value)


class AutoencoderLoss(nn.Module):
    """LPIPS (optional), the NLL log-variance and the PatchGAN critic, with the two LDM loss methods."""

    def __init__(self, config: LossConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else LossConfig()
        self.config = cfg
        self.perceptual: LPIPS | None = None
        if cfg.perceptual_weight > 0:
            self.perceptual = LPIPS(cfg.lpips_pretrained, cfg.lpips_vgg_path, cfg.lpips_lin_path)
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)
        self.discriminator: NLayerDiscriminator | None = None
        if cfg.uses_discriminator:
            self.discriminator = NLayerDiscriminator(
                cfg.disc_in_channels, cfg.disc_ndf, cfg.disc_num_layers, cfg.disc_use_actnorm
            )
            self.discriminator.apply(weights_init)
        self.register_state_dict_post_hook(_skip_perceptual)
        self.register_load_state_dict_pre_hook(_fill_perceptual)

    # ---- what the trainer needs to know -------------------------------------------------------------------

    def autoencoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the autoencoder optimiser should update: logvar when learn_logvar."""
        if self.logvar.requires_grad:
            yield self.logvar

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """The critic's parameters (none when the GAN is disabled)."""
        if self.discriminator is not None:
            yield from self.discriminator.parameters()

    def discriminator_requires_grad(self, flag: bool) -> None:
        """Freeze the critic for the generator pass (its gradients there would be wrong-signed)."""
        if self.discriminator is not None:
            self.discriminator.requires_grad_(flag)

    def discriminator_factor(self, global_step: int) -> float:
        """disc_factor at this step: 0 before disc_start or without a critic."""
        if self.discriminator is None:
            return 0.0
        return adopt_weight(self.config.disc_factor, global_step, threshold=self.config.disc_start)

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms count at this step (so the critic should train)."""
        return self.discriminator_factor(global_step) > 0

    # ---- losses -------------------------------------------------------------------------------------------

    def reconstruction(self, inputs: Tensor, reconstructions: Tensor) -> Tensor:
        """pixel_weight * pixel loss + perceptual_weight * LPIPS, per pixel [B, C, H, W]."""
        cfg = self.config
        rec = cfg.pixel_weight * pixel_loss(inputs, reconstructions, cfg.pixel_loss)
        if self.perceptual is not None:
            rec = rec + cfg.perceptual_weight * self.perceptual(inputs, reconstructions).to(rec.dtype)
        return rec

    def _gan_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor | None) -> Tensor:
        # Without a last layer or a graph (eval, no_grad) LDM falls back to 0: no GAN term in validation.
        if last_layer is None or not torch.is_grad_enabled() or not (nll_loss.requires_grad and g_loss.requires_grad):
            return nll_loss.new_zeros(())
        return adaptive_weight(nll_loss, g_loss, last_layer) * self.config.disc_weight

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: DiagonalGaussian | None,
        global_step: int,
        last_layer: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's loss and detached logs (total, nll, rec, kl, d_weight, disc_factor, g_loss, logvar)."""
        cfg = self.config
        rec = self.reconstruction(inputs, reconstructions)
        nll = gaussian_nll(rec, self.logvar)
        weighted_nll_loss = batch_mean_of_sums(nll if weights is None else weights * nll)
        nll_loss = batch_mean_of_sums(nll)
        kl = kl_loss(posterior) if posterior is not None else nll_loss.new_zeros(())
        factor = self.discriminator_factor(global_step)
        zero = nll_loss.new_zeros(())
        g_loss, d_weight = zero, zero
        if factor > 0 and self.discriminator is not None:  # before disc_start the critic's loss is not needed
            g_loss = generator_adversarial_loss(self.discriminator(reconstructions))
            d_weight = self._gan_weight(nll_loss, g_loss, last_layer)
        elif self.discriminator is not None and self.discriminator.awaits_init():
            # LDM's generator pass runs the critic from step 0, so ActNorm takes its init from the first
            # reconstructions, not from those at disc_start; one pass without gradients does the same.
            with torch.no_grad():
                self.discriminator(reconstructions.detach())
        loss = weighted_nll_loss + cfg.kl_weight * kl + d_weight * factor * g_loss
        logs = {
            "total": loss, "nll": nll_loss, "rec": rec.mean(), "kl": kl, "d_weight": d_weight,
            "disc_factor": nll_loss.new_tensor(factor), "g_loss": g_loss, "logvar": self.logvar,
        }
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic's loss on detached real and reconstructed images, and logs (d_loss, logits_real/fake)."""
        if self.discriminator is None:
            raise KlvaeError("this loss has no discriminator (disc_weight or disc_factor is 0)")
        # Two passes, not one concatenated batch: BatchNorm then normalises real and fake separately, as in LDM.
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        d_loss = self.discriminator_factor(global_step) * D_LOSSES[self.config.disc_loss](logits_real, logits_fake)
        logs = {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {k: v.detach() for k, v in logs.items()}
