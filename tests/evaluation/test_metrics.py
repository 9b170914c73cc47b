"""PSNR, SSIM (against scikit-image), the running mean/std of reports (an infinite mean PSNR shown as such), and the
warning for images scored with the default [-1, 1] range that they do not have (which klvae's own callers, eval and
validation, never draw)."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skimage_data
import skimage.filters as skimage_filters
import skimage.metrics as skimage_metrics
import torch
from PIL import Image

import klvae
from klvae.evaluation import evaluate as evaluate_mod
from klvae.evaluation import metrics
from klvae.evaluation.evaluate import _per_image
from klvae.evaluation.metrics import MetricAccumulator, psnr, ssim, ssim_map
from klvae.training.validate import validate

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


def test_report_shows_an_infinite_mean_psnr_as_infinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A lossless reconstruction has PSNR +inf; the summary table is meant to say ∞, not "inf ± nan".
    data = tmp_path / "data"
    data.mkdir()
    for k in range(2):
        Image.new("RGB", (16, 16), (40 * k, 90, 200)).save(data / f"{k}.png")
    monkeypatch.setattr(evaluate_mod, "_decoded", lambda vae, x, opts: x.clone())  # lossless
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL("tiny").eval()
    nets = evaluate_mod.MetricNets(left_out={"lpips": "disabled", "rfid": "disabled"})
    opts = evaluate_mod.EvalOptions(resolution=16, examples=1)
    summary = evaluate_mod.run_evaluation({"m": vae}, str(data), tmp_path / "report", opts, nets,
                                          torch.device("cpu"))
    assert summary["models"]["m"]["psnr"]["mean"] is None  # summary.json: JSON has no inf
    page = (tmp_path / "report" / "index.html").read_text()
    table = page.split('<table class="summary">')[1].split("</table>")[0]
    assert "<td>∞</td>" in table and "nan" not in table and "inf" not in table, table


# ---- the value range: images not in [-1, 1] scored with the default range are warned about ----


@pytest.fixture
def fresh_range_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: no range warning given yet."""
    monkeypatch.setattr(metrics, "_range_warned", set(), raising=False)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [0, 1] images, the second a noisy copy of the first."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, 24, 24, generator=g)
    return a, (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)


@pytest.mark.usefixtures("fresh_range_warnings")
def test_zero_one_images_scored_with_the_default_range_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        p, s = psnr(a, b), ssim(a, b)
        psnr(a, b)
    (record,) = caplog.records  # once per process, not once per call or batch
    assert "neither image has a negative value" in record.getMessage() and "data_range=1.0" in record.getMessage()
    # The default's numbers are unchanged (those of data_range=2.0): 6.02 dB over the right ones.
    assert torch.equal(p, psnr(a, b, data_range=2.0)) and torch.equal(s, ssim(a, b, data_range=2.0))
    torch.testing.assert_close(p - psnr(a, b, data_range=1.0), torch.full((2,), 20 * math.log10(2)))
    # The remedy scores [0, 1] images as klvae scores the same images in [-1, 1].
    torch.testing.assert_close(psnr(a, b, data_range=1.0), psnr(2 * a - 1, 2 * b - 1))
    torch.testing.assert_close(ssim(a, b, data_range=1.0), ssim(2 * a - 1, 2 * b - 1))


@pytest.mark.usefixtures("fresh_range_warnings")
def test_eight_bit_values_scored_with_the_default_range_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        ssim(a * 255, b * 255)
    (record,) = caplog.records
    assert "far outside the [-1, 1] range" in record.getMessage() and "255 for 8-bit" in record.getMessage()


@pytest.mark.usefixtures("fresh_range_warnings")
def test_klvae_images_and_ranges_said_outright_draw_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        psnr(2 * a - 1, 2 * b - 1), ssim(2 * a - 1, 2 * b - 1)
        psnr(a, b, data_range=1.0), ssim(a, b, data_range=1.0), ssim(a * 255, b * 255, data_range=255)
        psnr(a, b, data_range=2.0), ssim(a, b, low=-1.0)  # bright [-1, 1] images, said to be so
    assert caplog.records == []


def _bright_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.5  # a light picture: no pixel below mid-grey
    return x, (x + 0.01).clamp(-1, 1)


def test_eval_scores_bright_images_without_a_range_warning(
    fresh_range_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    class NoNets:
        lpips = None

    x, r = _bright_pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = _per_image(NoNets(), x, r)  # type: ignore[arg-type]
    assert out["ssim"].shape == (2,)
    assert not [m for m in caplog.messages if "data_range" in m]


def test_validation_scores_bright_images_without_a_range_warning(
    fresh_range_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Brightening(torch.nn.Module):
        """A stand-in model whose reconstructions stay as bright as the inputs (a random one's would not)."""

        def forward(self, x: torch.Tensor, sample_posterior: bool = False) -> tuple[torch.Tensor]:
            return ((x + 0.01).clamp(-1, 1),)

    x, _ = _bright_pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = validate(Brightening(), [x], torch.device("cpu"), None, lpips_files=None)  # type: ignore[arg-type]
    assert "ssim" in out and np.isfinite(out["psnr"])
    assert not [m for m in caplog.messages if "data_range" in m]
