"""Pins what a mutation audit of model.latent_norm, weights.latent_bn, evaluation.metrics and evaluation.fid found
untested: a scaling_factor of zero or below and a non-finite shift_factor refused, numpy factors and patch sizes
stored as plain Python numbers (so that to_dict stays JSON), patchify as the identity for 1x1 patches, scaling in
diffusers' order of operations (bit for bit), flat latents refused when the channels are known, empty statistics
refused; an integer running_var refused, a variance in (-eps, 0] taken, identity BatchNorm buffers replacing a
config's own statistics; the Fréchet distance's shape checks, 1-D features refused, float64 statistics and the
sample-space form never below zero; and for the metrics, images of equal size but another shape refused, the range
warning's boundaries (-1.5 and 1.5 are still [-1, 1]-ish, 0 is non-negative, either image's extremes count, both
kinds warned once each), empty batches scored without a crash, float64 kept when either image is float64, and
SSIM's 11 px minimum on each side (11 itself accepted)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

from klvae.errors import WeightsError
from klvae.evaluation import metrics
from klvae.evaluation.fid import FIDReference, feature_statistics, frechet_distance, trace_sqrt_product
from klvae.evaluation.metrics import psnr, ssim, ssim_map
from klvae.model.config import AutoencoderKLConfig
from klvae.model.latent_norm import LatentNorm
from klvae.weights.latent_bn import BFL_EPS, pop_latent_bn, with_latent_stats

# ---- model.latent_norm ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 0.0, -0.18])
def test_a_scaling_factor_of_zero_or_below_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="scaling_factor must be a finite positive number"):
        LatentNorm(scaling_factor=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1"])
def test_a_shift_factor_that_is_no_finite_number_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="shift_factor must be a finite number"):
        LatentNorm(shift_factor=bad)  # type: ignore[arg-type]
    # zero and negative shifts are fine (only the scale must be positive)
    assert LatentNorm(shift_factor=-0.1159).shift_factor == -0.1159


def test_numpy_factors_and_patch_sizes_are_stored_as_python_numbers() -> None:
    """A factor or patch size computed with numpy is kept as float/int: to_dict must stay JSON."""
    norm = LatentNorm(scaling_factor=np.float32(0.5), latents_mean=[np.float32(0.0)] * 4,
                      latents_std=[np.float32(2.0)] * 4, latent_patch_size=np.int64(2))  # type: ignore[arg-type]
    assert type(norm.scaling_factor) is float and type(norm.latent_patch_size) is int
    assert all(type(v) is float for v in (*norm.latents_mean, *norm.latents_std))  # type: ignore[misc]
    d = norm.to_dict()
    assert json.loads(json.dumps(d)) == d and LatentNorm.from_dict(d) == norm
    assert type(LatentNorm(shift_factor=np.float32(0.25)).shift_factor) is float
    assert type(LatentNorm(shift_factor=1).shift_factor) is float


def test_one_cell_patches_leave_latents_of_any_shape_alone() -> None:
    norm = LatentNorm(scaling_factor=0.5, shift_factor=0.25)
    for z in (torch.randn(5), torch.randn(3, 4), torch.randn(2, 4, 3, 5)):
        assert norm.patchify(z) is z and norm.unpatchify(z) is z
        torch.testing.assert_close(norm.scale(z), (z - 0.25) * 0.5)
        torch.testing.assert_close(norm.unscale(norm.scale(z)), z)


def test_scaling_is_bit_for_bit_the_order_of_diffusers_pipelines() -> None:
    """(z - mean) * scaling_factor / std and back z * std / scaling_factor + mean, in that order: another order
    rounds differently, and latents then differ from those a diffusers pipeline makes."""
    mean, std = (0.3, -0.2, 0.1, 0.5), (2.1, 0.7, 1.3, 3.9)
    norm = LatentNorm(scaling_factor=0.13025, latents_mean=mean, latents_std=std)
    z = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    assert torch.equal(norm.scale(z), (z - m) * 0.13025 / s)
    assert torch.equal(norm.unscale(z), z * s / 0.13025 + m)


@pytest.mark.parametrize(("patch", "scale_says", "unscale_says"), [
    (1, "do not have the 4 channels of this VAE's", "do not have the 4 channels of this VAE's"),
    (2, r"are not this VAE's \[B, 4, h, w\]", r"are not this VAE's diffusion latent \[B, 16, h, w\]"),
])
def test_latents_without_channel_axes_are_refused_when_the_channels_are_known(patch: int, scale_says: str,
                                                                              unscale_says: str) -> None:
    norm = LatentNorm(scaling_factor=0.18215, latent_patch_size=patch)
    for flat in (torch.randn(8), torch.randn(4, 8)):
        shape = re.escape(f"latents of shape {tuple(flat.shape)} ")
        with pytest.raises(ValueError, match=shape + scale_says):
            norm.scale(flat, latent_channels=4)
        with pytest.raises(ValueError, match=shape + unscale_says):
            norm.unscale(flat, latent_channels=4)


def test_empty_statistics_are_refused() -> None:
    with pytest.raises(ValueError, match="latents_mean must be a non-empty list of numbers, got \\[\\]"):
        LatentNorm(latents_mean=[], latents_std=[])  # type: ignore[arg-type]


# ---- weights.latent_bn ------------------------------------------------------------------------------------------

# One latent channel in 2x2 patches: four statistics.
BN_CFG = AutoencoderKLConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, latent_channels=1,
                             scaling_factor=1.0, latent_patch_size=2, sample_size=64, force_upcast=False)


def test_an_integer_running_var_is_refused() -> None:
    with pytest.raises(WeightsError, match="no matching float vectors"):
        pop_latent_bn({"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4, dtype=torch.int64)})


def test_a_variance_just_below_zero_that_eps_makes_positive_is_taken() -> None:
    """The BatchNorm divides by sqrt(var + eps): var in (-eps, 0] is a valid (tiny) std."""
    var = torch.tensor([1.0, -0.5e-4, 0.0, 2.0], dtype=torch.float64)
    got = with_latent_stats(BN_CFG, (torch.zeros(4, dtype=torch.float64), var), 1e-4, "cfg")
    assert got.latents_std == pytest.approx([(1 + 1e-4) ** 0.5, 0.5e-4 ** 0.5, 1e-4 ** 0.5, (2 + 1e-4) ** 0.5])


def test_identity_buffers_replace_a_configs_statistics() -> None:
    """Only a config without statistics keeps none for identity buffers; one with its own gets the weights'."""
    stats = (torch.zeros(4, dtype=torch.float64), torch.full((4,), 1 - BFL_EPS, dtype=torch.float64))
    assert with_latent_stats(BN_CFG, stats, BFL_EPS, "cfg").latents_mean is None
    own = BN_CFG.replace(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(2.0, 2.0, 2.0, 2.0))
    got = with_latent_stats(own, stats, BFL_EPS, "cfg")
    assert got.latents_mean == (0.0,) * 4 and got.latents_std == pytest.approx([1.0] * 4, abs=1e-12)


# ---- evaluation.metrics: the range warning ----------------------------------------------------------------------


Warned = Callable[[], list[str]]


@pytest.fixture
def warned(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Warned:
    """As in a new process (no range warning given yet): the range warnings given from here on."""
    monkeypatch.setattr(metrics, "_range_warned", set())
    caplog.set_level(logging.WARNING, logger="klvae")
    return lambda: [m for m in caplog.messages if "data_range" in m]


def _filled(lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    """[1, 3, 16, 16] values in [lo, hi] that reach both ends exactly."""
    x = torch.empty(1, 3, 16, 16).uniform_(lo, hi, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 0, 0], x[0, 0, 0, 1] = lo, hi
    return x


def test_values_at_the_ends_of_the_tolerance_draw_no_warning(warned: Warned) -> None:
    """-1.5 and 1.5 are still taken for [-1, 1] images (a little overshoot); only beyond them is another range."""
    psnr(_filled(-1.5, 1.5), _filled(-1.5, 1.5, seed=1))
    ssim(_filled(-1.5, 1.5), _filled(-1.5, 1.5, seed=1))
    assert warned() == []
    psnr(_filled(-0.5, 1.8), _filled(-0.5, 1.8, seed=1))  # past 1.5 but not past 2
    assert len(warned()) == 1 and "far outside" in warned()[0]


def test_values_far_below_minus_one_are_warned_about(warned: Warned) -> None:
    psnr(_filled(-3.0, 1.0), _filled(-3.0, 1.0, seed=1))
    (message,) = warned()
    assert "the images span [-3, 1], far outside" in message


def test_images_whose_lowest_value_is_exactly_zero_count_as_non_negative(warned: Warned) -> None:
    """[0, 1] images (those from uint8 / 255 hold exact zeros) are the case the warning is for."""
    psnr(_filled(0.0, 1.0), _filled(0.0, 1.0, seed=1))
    (message,) = warned()
    assert "neither image has a negative value" in message


def test_the_extremes_of_both_images_count(warned: Warned) -> None:
    # The first image has no negative value, the second has: a [-1, 1] pair, no warning.
    psnr(_filled(0.0, 1.0), _filled(-1.0, 1.0, seed=1))
    psnr(_filled(-1.0, 1.0, seed=1), _filled(0.0, 1.0))
    assert warned() == []
    # Only the second image goes far past 1 (8-bit values beside a [-1, 1] image).
    psnr(_filled(-1.0, 1.0), _filled(-1.0, 255.0, seed=1))
    (message,) = warned()
    assert "far outside" in message


def test_each_kind_of_range_warning_is_given_once(warned: Warned) -> None:
    a = _filled(0.0, 1.0)
    psnr(a, a.flip(-1))
    psnr(a * 255, a.flip(-1) * 255)
    psnr(a, a.flip(-1)), psnr(a * 255, a.flip(-1) * 255)
    first, second = warned()
    assert "neither image has a negative value" in first and "far outside" in second


def test_an_empty_batch_is_scored_without_a_warning_or_crash(warned: Warned) -> None:
    empty = torch.empty(0, 3, 16, 16)
    assert psnr(empty, empty).shape == (0,)
    assert ssim(empty, empty).shape == (0,)
    assert warned() == []


# ---- evaluation.metrics: dtype and sizes ------------------------------------------------------------------------


def test_images_of_the_same_size_but_another_shape_are_refused() -> None:
    a = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"images differ in shape: \(1, 3, 16, 16\) vs \(3, 1, 16, 16\)"):
        psnr(a, a.view(3, 1, 16, 16))
    with pytest.raises(ValueError, match="images differ in shape"):
        ssim(a, a.view(3, 1, 16, 16))


def test_float64_is_kept_when_either_image_is_float64() -> None:
    a = _filled(-1.0, 1.0)
    b = (a + 0.01).double()
    for x, y in ((a, b), (b, a)):
        assert psnr(x, y).dtype == torch.float64 and ssim(x, y).dtype == torch.float64
    assert psnr(a, b.float()).dtype == torch.float32


def test_ssim_needs_eleven_pixels_on_each_side_and_takes_exactly_eleven() -> None:
    a = _filled(-1.0, 1.0)[..., :11, :11]
    b = (a + 0.05).clamp(-1, 1)
    assert ssim_map(a, b).shape == (1, 3, 1, 1)
    assert 0.0 < ssim(a, b).item() < 1.0
    for h, w in ((11, 10), (10, 11)):
        with pytest.raises(ValueError, match=f"at least 11 px a side, got {h}x{w}"):
            ssim(a[..., :h, :w], b[..., :h, :w])


# ---- evaluation.fid ---------------------------------------------------------------------------------------------


def test_feature_statistics_refuse_anything_but_a_matrix_of_feature_vectors() -> None:
    for bad in (torch.randn(10), torch.randn(4, 3, 2)):
        with pytest.raises(ValueError, match="need at least two feature vectors, got shape"):
            feature_statistics(bad)


def test_statistics_of_different_shapes_are_refused() -> None:
    mu, sigma = torch.zeros(2), torch.eye(2)
    for args in ((mu, sigma, mu[None], sigma), (mu, sigma, torch.zeros(3), torch.eye(3)),
                 (torch.zeros(3), sigma, torch.zeros(3), sigma), (mu, sigma, mu, torch.eye(3))):
        with pytest.raises(ValueError, match="mismatched statistics"):
            frechet_distance(*args)


def test_the_sample_space_distance_of_a_set_with_itself_is_never_below_zero() -> None:
    """Fewer images than feature dimensions take the sample-space form; its round-off must not go below 0 either."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(6, 16, generator=g, dtype=torch.float64) * 3 + 1
        assert 0.0 <= FIDReference(x).distance(x) < 1e-9, seed


def test_statistics_and_traces_are_float64_whatever_the_features() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) * 100 + 1000  # float32 features, as the Inception gives them
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == torch.float64
    mu64, sigma64 = feature_statistics(x.double())
    assert torch.equal(mu, mu64) and torch.equal(sigma, sigma64)
    c = torch.randn(6, 16, generator=g) * 100
    c -= c.mean(0)
    assert trace_sqrt_product(c, c.flip(0)) == trace_sqrt_product(c.double(), c.flip(0).double())
