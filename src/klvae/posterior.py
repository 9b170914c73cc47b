"""The diagonal Gaussian posterior q(z | x) that the encoder's moments describe."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# LDM's bounds: exp(-30) is still a positive variance in fp32, exp(20) keeps sample() finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from moments [B, 2C, ...]: the first C channels mean, the rest logvar."""

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        if parameters.shape[1] % 2:
            raise ValueError(f"moments need an even channel count, got {parameters.shape[1]}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I): differentiable in mean and logvar (reparameterisation)."""
        # Drawn where the generator lives, then moved (as diffusers' randn_tensor): a CPU generator gives the same
        # noise for moments on any device, and torch.randn refuses a generator of another device.
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        """The most likely z: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """KL(self || other) summed over `dims`, per sample; `other` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * terms.sum(dim=tuple(dims))

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of `sample` under this Gaussian, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=tuple(dims))

    def to_deterministic(self) -> DiagonalGaussian:
        """The same moments with zero variance: sample() returns the mean."""
        return DiagonalGaussian(self.parameters, deterministic=True)
