"""Per-image reconstruction metrics (PSNR, SSIM) in torch, and a running mean/std for reports.

Range convention: klvae images are [B, C, H, W] in [-1, 1], so `data_range` left out means 2.0 (max - min of
the range). Pass 1.0 for [0, 1] images (torchmetrics' and torchvision's habit) and 255 for 8-bit ones. The data
range sets PSNR's peak and SSIM's stabilising constants, so a wrong value gives wrong (not just rescaled)
numbers: [0, 1] images scored as [-1, 1] ones gain 6.02 dB of PSNR and a too-high SSIM. Hence, when
`data_range` is left out, images that do not look like [-1, 1] ones (no negative value at all, or values
beyond [-1.5, 1.5]) get a warning, once per process; passing data_range=2.0 says they are [-1, 1] and skips it.

SSIM is written here (separable Gaussian conv2d) rather than taken from torchmetrics, which pulls torchvision;
it matches `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=-1)`, see `ssim`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from klvae.checks import is_real

# Wang et al. 2004: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # skimage: int(truncate * sigma + 0.5) with truncate = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# klvae's range, assumed when data_range is left out; values this far past its ends are another range's.
DEFAULT_DATA_RANGE = 2.0
_PAST_THE_ENDS = 0.5

log = logging.getLogger(__name__)
# The kinds of range warning given so far: once per process each, not once per batch of an evaluation.
_range_warned: set[str] = set()


def _as_batches(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both as float [B, C, H, W] in a common working dtype; a lone [C, H, W] image becomes a batch of one."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"images must be torch tensors, got {type(a).__name__} and {type(b).__name__} "
                        "(torch.from_numpy takes a NumPy array)")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected [B, C, H, W] or [C, H, W] images, got shape {tuple(a.shape)}")
    if 0 in a.shape[1:]:  # a mean over no pixels is NaN, and SSIM's grouped convolution takes no zero channels
        raise ValueError(f"images without pixels: shape {tuple(a.shape)}")
    # Half precision loses the small differences these metrics measure; float64 stays float64.
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(dtype), b.to(dtype)


def _warn_if_not_klvae_range(what: str, a: Tensor, b: Tensor) -> None:
    """Warn (once per process and kind) when images scored as [-1, 1] ones look like another range's."""
    if len(_range_warned) == 2 or a.numel() == 0:
        return
    with torch.no_grad():  # one host sync for the four extremes
        lo_a, lo_b, hi_a, hi_b = torch.stack([a.amin(), b.amin(), a.amax(), b.amax()]).tolist()
    lo, hi = min(lo_a, lo_b), max(hi_a, hi_b)
    if lo < -1 - _PAST_THE_ENDS or hi > 1 + _PAST_THE_ENDS:
        kind, why = "outside", f"the images span [{lo:.4g}, {hi:.4g}], far outside"
    elif lo >= 0:
        # A [-1, 1] photograph with no pixel below mid-grey is rare; [0, 1] images always look like this.
        kind, why = "non-negative", "neither image has a negative value, unusual for"
    else:
        return
    if kind in _range_warned:
        return
    _range_warned.add(kind)
    log.warning("%s: %s the [-1, 1] range that data_range's default (2.0) assumes: pass data_range=1.0 for [0, 1] "
                "images, 255 for 8-bit ones (or data_range=2.0 to say they are [-1, 1] images)", what, why)


def _resolve_range(what: str, a: Tensor, b: Tensor, data_range: float | None) -> float:
    """data_range, or klvae's 2.0 after a check that the images look like [-1, 1] ones."""
    if data_range is not None:
        return _checked_range(data_range)
    _warn_if_not_klvae_range(what, a, b)
    return DEFAULT_DATA_RANGE


def _checked_range(data_range: float) -> float:
    # 0 gave -inf PSNR and an SSIM without its constants; a negative one the figure of its absolute value.
    if not (is_real(data_range) and 0 < data_range < math.inf):  # also refuses nan
        raise ValueError(f"data_range must be a finite number > 0 (max - min of the pixel range), got {data_range!r}")
    return data_range


def psnr(a: Tensor, b: Tensor, data_range: float | None = None) -> Tensor:
    """Per-image PSNR [B] in dB, 10 log10(data_range² / MSE); +inf for identical images (as skimage gives).

    data_range: max - min of the images' range; left out, 2.0 (klvae's [-1, 1]), with a warning when the images
    look like another range's (see the module docstring)."""
    a, b = _as_batches(a, b)
    data_range = _resolve_range("psnr", a, b, data_range)
    mse = (a - b).square().flatten(1).mean(dim=1)
    # MSE = 0 gives log10(inf) = +inf, left as it is: a cap would be an arbitrary number in a report.
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_taps(dtype: torch.dtype, device: torch.device) -> Tensor:
    # scipy.ndimage's kernel: exp(-x²/2σ²) on integer offsets, normalised to sum 1.
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)


def _blur_valid(x: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian over each channel of [N, C, H, W], valid padding (no border pixel enters a window)."""
    c, k = x.shape[1], taps.numel()
    # Depthwise (groups = C) runs several times faster on CPU than C single-channel images through one filter.
    x = F.conv2d(x, taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_map(a: Tensor, b: Tensor, data_range: float | None = None, low: float | None = None) -> Tensor:
    """The SSIM map [B, C, H-10, W-10]: each channel on its own, windows wholly inside the image."""
    a, b = _as_batches(a, b)
    if data_range is None:
        # With `low` given, the caller has thought about the range: only the wholly default call is checked.
        data_range = _resolve_range("ssim", a, b, None) if low is None else DEFAULT_DATA_RANGE
    data_range = _checked_range(data_range)
    # SSIM's luminance term is not shift-invariant: it is defined on images whose range starts at 0, so
    # [-1, 1] images are moved to [0, 2] first (the default `low` is -1 exactly when data_range is 2).
    low = (-1.0 if data_range == 2.0 else 0.0) if low is None else low
    if low:
        a, b = a - low, b - low
    n, c, h, w = a.shape
    if min(h, w) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} px a side, got {h}x{w}")
    taps = _gaussian_taps(a.dtype, a.device)
    # The (co)variances are taken about one mean per image and channel, which they do not depend on: E[a^2] - mu^2
    # of a flat light background (a near 2 in float32) cancels to noise, 2e-4 SSIM off on white product shots.
    m = a.mean(dim=(2, 3), keepdim=True).detach()
    a, b = a - m, b - m
    # One blur pass over all five moment images.
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    moments = _blur_valid(stack, taps)
    mu_a, mu_b, e_aa, e_bb, e_ab = moments.reshape(n, 5, c, *moments.shape[-2:]).unbind(1)
    # Population (co)variances (skimage's use_sample_covariance=False), as in Wang et al.
    var_a, var_b, cov = e_aa - mu_a.square(), e_bb - mu_b.square(), e_ab - mu_a * mu_b
    mu_a, mu_b = mu_a + m, mu_b + m  # the luminance term is not shift-invariant
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    return num / den


def ssim(a: Tensor, b: Tensor, data_range: float | None = None, low: float | None = None) -> Tensor:
    """Per-image SSIM [B] (Wang et al. 2004; Gaussian 11x11, sigma 1.5), per channel then averaged over RGB.

    Valid windows only, which is what skimage's crop of the filter radius does, so the border mode never
    matters and the result equals `structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=-1)` to rounding.
    `data_range` left out is 2.0 (klvae's [-1, 1]), with a warning when the images look like another range's
    (see the module docstring); pass 1.0 for [0, 1] images, 255 for 8-bit ones. `low` is the bottom of the
    range (default -1 for data_range 2, i.e. [-1, 1] images, else 0), so a [-1, 1] image scores as its 8-bit
    version does. Computed in float32 (float64 for float64 input); differentiable.
    """
    return ssim_map(a, b, data_range, low).flatten(1).mean(dim=1)


class MetricAccumulator:
    """Running count, mean and standard deviation per metric name, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self._stats: dict[str, tuple[int, float, float]] = {}  # name -> (n, mean, sum of squared deviations)

    def update(self, name: str, values: Tensor | float) -> None:
        """Add a batch of values (any shape, flattened) to metric `name`."""
        v = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
        if v.numel() == 0:
            return
        nb, mb = v.numel(), float(v.mean())
        m2b = float((v - mb).square().sum())
        na, ma, m2a = self._stats.get(name, (0, 0.0, 0.0))
        n = na + nb
        if not (math.isfinite(ma) and math.isfinite(mb)):
            # An inf stays an inf mean (inf - inf a nan) instead of the merge's inf * 0 = nan.
            self._stats[name] = (n, ma + mb, math.nan)
            return
        delta = mb - ma
        # Chan's pairwise merge stays accurate where sum and sum-of-squares would cancel.
        mean = ma + delta * nb / n
        m2 = m2a + m2b + delta * delta * na * nb / n if na else m2b
        self._stats[name] = (n, mean, m2)

    def names(self) -> list[str]:
        """The metric names seen, in first-update order."""
        return list(self._stats)

    def summary(self) -> dict[str, dict[str, float]]:
        """{name: {"mean", "std", "n"}}; std is the population one (ddof 0), 0 for a single value.

        A non-finite value (PSNR of identical images is +inf) makes that metric's mean inf and its std nan.
        """
        out: dict[str, dict[str, float]] = {}
        for name, (n, mean, m2) in self._stats.items():
            std = math.sqrt(m2 / n) if math.isfinite(m2) and m2 >= 0 else math.nan
            out[name] = {"mean": mean, "std": std, "n": n}
        return out
