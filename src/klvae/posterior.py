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

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I): differentiable in mean and logvar (reparameterisation); a list of
        generators draws each image's eps with its own, as diffusers' randn_tensor does."""
        gens = list(generator) if isinstance(generator, Sequence) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in gens) or not gens:
            raise TypeError(f"generator must be a torch.Generator, a list of them (one per image) or None, got "
                            f"{type(generator).__name__}")
        if len(gens) > 1 and len(gens) < self.mean.shape[0]:
            raise ValueError(f"{len(gens)} generators for a batch of {self.mean.shape[0]}")
        # A one-element list is the generator itself, as randn_tensor takes it.
        draws = [(gens[0], self.mean.shape)] if len(gens) == 1 else \
            [(g, (1, *self.mean.shape[1:])) for g in gens[: self.mean.shape[0]]]
        # Drawn where the generator lives, then moved (as diffusers' randn_tensor): a CPU generator gives the same
        # noise for moments on any device, and torch.randn refuses a generator of another device.
        eps = [torch.randn(shape, generator=g, device=g.device if g is not None else self.mean.device,
                           dtype=self.mean.dtype).to(self.mean.device) for g, shape in draws]
        return self.mean + self.std * (eps[0] if len(eps) == 1 else torch.cat(eps))

    def mode(self) -> Tensor:
        """The most likely z: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """KL(self || other) summed over `dims`, per sample; `other` defaults to N(0, I)."""
        if self.deterministic:  # zeros shaped as the reduction over `dims` would leave them
            return torch.zeros_like(self.mean).sum(dim=tuple(dims))
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
            return torch.zeros_like(self.mean).sum(dim=tuple(dims))
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=tuple(dims))

    def to_deterministic(self) -> DiagonalGaussian:
        """The same moments with zero variance: sample() returns the mean."""
        return DiagonalGaussian(self.parameters, deterministic=True)
