"""The PatchGAN critic of taming-transformers / LDM, its ActNorm option, init, and the critic losses.

Module names (`main.N`) follow the original so an LDM checkpoint's `loss.discriminator.*` loads as is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc), initialised from the first training batch to zero mean, unit std."""

    initialized: Tensor  # a registered buffer: 0 until the first training batch has set loc and scale

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        # A buffer (not a Python flag) so a resumed run does not re-initialise over trained values.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set loc = -mean, scale = 1 / std per channel of `x` (averaged over ranks under DDP)."""
        flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)
        stats = torch.stack([flat.mean(dim=1), flat.std(dim=1)])
        if dist.is_available() and dist.is_initialized():
            # DDP broadcasts parameters only at construction: without this each rank would keep its own init.
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        self.loc.copy_(-stats[0].view_as(self.loc))
        self.scale.copy_((1.0 / (stats[1] + 1e-6)).view_as(self.scale))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise [B, C, H, W]; the first call in training mode initialises."""
        if self.training and not bool(self.initialized):
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: [B, input_nc, H, W] -> per-patch logits [B, 1, H', W'] (H' = H / 2**n_layers - 2)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        # BatchNorm's own shift makes a conv bias redundant; ActNorm keeps it as in the original.
        bias = use_actnorm
        kw, pad = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last widening conv keeps resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kw, stride=stride, padding=pad, bias=bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Per-patch real/fake logits."""
        return self.main(x)

    def awaits_init(self) -> bool:
        """True while an ActNorm layer waits for the first training batch to set its loc and scale."""
        return self.training and any(isinstance(m, ActNorm) and not bool(m.initialized) for m in self.modules())


def weights_init(m: nn.Module) -> None:
    """DCGAN init for `module.apply`: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake))): the non-saturating BCE critic loss."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """-mean(logits of the reconstructions): what the autoencoder minimises to fool the critic."""
    return -logits_fake.mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
