"""rFID: the Fréchet distance between Inception-v3 pool3 features of originals and their reconstructions.

The network itself is `klvae.nets.inception`; this module holds the statistics and the distance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from klvae.nets.inception import FEATURE_DIM, InceptionV3Features, resolve_inception_weights

__all__ = ["FEATURE_DIM", "FIDReference", "InceptionV3Features", "feature_statistics", "frechet_distance",
           "resolve_inception_weights", "trace_sqrt_product"]


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance (float64) of features [N, D]; needs N >= 2."""
    f = features.double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need at least two feature vectors, got shape {tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()):  # else a NaN distance, or an eigensolver's failure
        raise ValueError("features hold NaN or inf")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(sigma: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(sigma)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor,
                     sqrt_sigma1: Tensor | None = None) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2 and, unlike a general sqrtm, no
    complex round-off to discard. Pass `sqrt_sigma1` to reuse S1^(1/2) across several comparisons.
    """
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"mismatched statistics: {tuple(mu1.shape)}, {tuple(s1.shape)} / {tuple(mu2.shape)}, "
                         f"{tuple(s2.shape)}")
    r = (sqrt_sigma1.double() if sqrt_sigma1 is not None else _psd_sqrt(s1)).to(s2.device)
    m = r @ s2 @ r
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = eig.clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    # Round-off can push an exact zero (identical sets) a hair below it.
    return max(float(value), 0.0)


def trace_sqrt_product(a_centred: Tensor, b_centred: Tensor) -> float:
    """tr((S_a S_b)^(1/2)) from centred samples [n, D]: the nuclear norm of A Bᵀ over sqrt((n_a - 1)(n_b - 1)).

    S_a S_b = Aᵀ A Bᵀ B / k shares its nonzero eigenvalues with (A Bᵀ)(A Bᵀ)ᵀ / k, whose square roots are
    the singular values of A Bᵀ / sqrt(k): an n_a x n_b problem instead of D x D, and exact for rank-deficient
    covariances (fewer images than feature dimensions), where clamping round-off eigenvalues would bias it.
    """
    a, b = a_centred.double(), b_centred.double()
    k = (a.shape[0] - 1) * (b.shape[0] - 1)
    return float(torch.linalg.svdvals(a @ b.T).sum()) / math.sqrt(k)


class FIDReference:
    """Statistics of the originals, computed once and compared with each model's reconstructions."""

    def __init__(self, features: Tensor) -> None:
        self.n = int(features.shape[0])
        self.mu, self.sigma = feature_statistics(features)
        self.centred = features.double() - self.mu
        self._sqrt_sigma: Tensor | None = None

    def distance(self, features: Tensor) -> float:
        """FID between the reference set and `features` [N, D]."""
        if features.ndim != 2 or features.shape[1] != self.mu.numel():  # else a matmul's shapes, on one path only
            raise ValueError(f"features must be [N, {self.mu.numel()}] as the reference's, got {list(features.shape)}")
        mu, sigma = feature_statistics(features)
        if max(self.n, features.shape[0]) <= features.shape[1]:
            # Fewer samples than dimensions: the sample-space form is exact and far cheaper.
            tr_covmean = trace_sqrt_product(self.centred, features.double() - mu)
            value = (self.mu - mu).pow(2).sum() + torch.trace(self.sigma) + torch.trace(sigma) - 2 * tr_covmean
            return max(float(value), 0.0)
        if self._sqrt_sigma is None:
            self._sqrt_sigma = _psd_sqrt(self.sigma)
        return frechet_distance(self.mu, self.sigma, mu, sigma, sqrt_sigma1=self._sqrt_sigma)
