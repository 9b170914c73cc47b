"""PSNR, SSIM (against scikit-image) and the running mean/std of reports."""

import math

import numpy as np
import pytest
import skimage.data as skimage_data
import skimage.filters as skimage_filters
import skimage.metrics as skimage_metrics
import torch

from klvae.evaluation.metrics import MetricAccumulator, psnr, ssim, ssim_map

SK_SSIM = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "channel_axis": -1}


def _rand(shape: tuple[int, ...] = (3, 3, 32, 40), seed: int = 0, lo: float = -0.5, hi: float = 0.5) -> torch.Tensor:
    return torch.empty(shape).uniform_(lo, hi, generator=torch.Generator().manual_seed(seed))


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]


def test_psnr_constant_offset() -> None:
    a = _rand()
    offsets = torch.tensor([0.1, 0.05, 0.2]).view(3, 1, 1, 1)
    got = psnr(a, a + offsets)  # MSE = offset² exactly
    want = [10 * math.log10(4 / o**2) for o in (0.1, 0.05, 0.2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    assert got[0].item() == pytest.approx(26.0206, abs=1e-3)
    # the same images in [0, 1] with data_range 1 give the same dB
    np.testing.assert_allclose(psnr((a + 1) / 2, (a + offsets + 1) / 2, 1.0).numpy(), want, rtol=1e-5)


def test_psnr_uint8_and_skimage() -> None:
    x = torch.randint(10, 240, (1, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert psnr(x, x + 5, data_range=255).item() == pytest.approx(10 * math.log10(255**2 / 25), rel=1e-6)
    a, b = _rand(seed=2), _rand(seed=3)
    for i in range(3):
        ref = skimage_metrics.peak_signal_noise_ratio(a[i].double().numpy(), b[i].double().numpy(), data_range=2.0)
        assert psnr(a, b)[i].item() == pytest.approx(ref, rel=1e-5)


def test_psnr_identical_is_inf_and_shape_checks() -> None:
    a = _rand()
    out = psnr(a, a)
    assert out.shape == (3,) and torch.isinf(out).all() and (out > 0).all()
    assert psnr(a[0], a[0] + 0.1).shape == (1,)  # a lone [C, H, W] image
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        psnr(a[0, 0], a[0, 0])


def _variants(img: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    blur = skimage_filters.gaussian(img, sigma=2.0, channel_axis=-1)
    return {
        "noisy": np.clip(img + rng.normal(0, 0.1, img.shape), -1, 1),
        "blurred": blur,
        "blurred+noisy": np.clip(blur + rng.normal(0, 0.3, img.shape), -1, 1),
    }


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_ssim_matches_skimage(name: str) -> None:
    img = getattr(skimage_data, name)().astype(np.float64) / 127.5 - 1.0
    for kind, other in _variants(img, np.random.default_rng(0)).items():
        # SSIM is defined on ranges that start at 0: [-1, 1] images are compared as [0, 2] ones
        ref = skimage_metrics.structural_similarity(img + 1, other + 1, data_range=2.0, **SK_SSIM)
        a, b = _chw(img), _chw(other)
        # float64: the same sums in a different order; float32 (the working dtype for images): rounding only
        assert ssim(a, b).item() == pytest.approx(ref, abs=1e-10), kind
        assert ssim(a.float(), b.float()).item() == pytest.approx(ref, abs=1e-5), kind


def test_ssim_uint8_range_matches_skimage() -> None:
    img = skimage_data.chelsea()[:96, :128]
    noisy = np.clip(img + np.random.default_rng(1).normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    ref = skimage_metrics.structural_similarity(img, noisy, data_range=255, **SK_SSIM)
    assert ssim(_chw(img), _chw(noisy), data_range=255).item() == pytest.approx(ref, abs=1e-5)
    # the same images as [-1, 1] tensors score what their 8-bit versions score
    a, b = (_chw(v).double() / 127.5 - 1 for v in (img, noisy))
    assert ssim(a, b).item() == pytest.approx(ref, abs=1e-6)


def test_ssim_identity_symmetry_and_noise_order() -> None:
    x = torch.from_numpy(skimage_data.astronaut()[::4, ::4] / 255.0).permute(2, 0, 1)[None].float() * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    levels = [0.02, 0.05, 0.1, 0.3]
    noisy = torch.cat([(x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1) for s in levels])
    xs = x.expand_as(noisy)
    fwd, bwd = ssim(xs, noisy), ssim(noisy, xs)
    torch.testing.assert_close(fwd, bwd, rtol=0, atol=1e-6)
    assert (fwd[1:] < fwd[:-1]).all() and fwd[-1] < 0.5
    # per image: a batch gives each image's own value
    torch.testing.assert_close(fwd[2:3], ssim(x, noisy[2:3]))


def test_ssim_map_shape_gradient_and_small_images() -> None:
    a, b = _rand((2, 3, 20, 24), seed=4), _rand((2, 3, 20, 24), seed=5).requires_grad_()
    assert ssim_map(a, b).shape == (2, 3, 10, 14)
    ssim(a, b).sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all()
    with pytest.raises(ValueError, match="at least 11"):
        ssim(a[..., :10, :], a[..., :10, :])


def test_accumulator_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    acc = MetricAccumulator()
    chunks = [rng.normal(30, 3, n) + 1e6 for n in (1, 7, 64, 3)]  # offset: cancellation would show
    for c in chunks:
        acc.update("psnr", torch.from_numpy(c))
        acc.update("ssim", torch.from_numpy(c[:2]))
    acc.update("ssim", torch.empty(0))  # an empty batch changes nothing
    allv = np.concatenate(chunks)
    ssimv = np.concatenate([c[:2] for c in chunks])
    s = acc.summary()
    assert acc.names() == ["psnr", "ssim"]
    assert s["psnr"]["n"] == allv.size and s["ssim"]["n"] == ssimv.size
    assert s["psnr"]["mean"] == pytest.approx(allv.mean(), rel=1e-12)
    assert s["psnr"]["std"] == pytest.approx(allv.std(), rel=1e-8)
    assert s["ssim"]["std"] == pytest.approx(ssimv.std(), rel=1e-8)


def test_accumulator_single_value_and_inf() -> None:
    acc = MetricAccumulator()
    acc.update("a", 2.5)
    assert acc.summary()["a"] == {"mean": 2.5, "std": 0.0, "n": 1}
    acc.update("p", torch.tensor([30.0, 31.0]))
    acc.update("p", torch.tensor([math.inf]))
    acc.update("p", torch.tensor([29.0]))
    p = acc.summary()["p"]
    assert p["mean"] == math.inf and math.isnan(p["std"]) and p["n"] == 4
