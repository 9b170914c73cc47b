"""Pins of the evaluation code that a mutation audit found unguarded: the Fréchet distance never below zero, the
enlargement and minimum-size boundaries, batches of at most --batch-size images, failed reconstructions all NaN,
the worst/best example picks, rFID's reliability at exactly 2048 images, and the error map's mean over RGB."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.metrics as skimage_metrics
import torch
from PIL import Image

from klvae.errors import ImageError
from klvae.evaluation import evaluate as evaluate_mod
from klvae.evaluation.evaluate import (
    NON_FINITE,
    EvalOptions,
    EvalResult,
    MetricNets,
    _per_image,
    build_summary,
    is_enlarged,
    iter_batches,
    prepare,
    reconstruct_checked,
    select_examples,
)
from klvae.evaluation.fid import FEATURE_DIM, FIDReference, feature_statistics, frechet_distance
from klvae.evaluation.report import (
    _RAMP,
    ERROR_FULL_SCALE,
    error_heatmap,
    failure_note,
    rfid_sample_note,
    summary_table,
)
from klvae.model.autoencoder import AutoencoderKL

# ---- the Fréchet distance ------------------------------------------------------------------------------------


def test_the_frechet_distance_of_a_set_with_itself_is_never_below_zero() -> None:
    # tr(S) + tr(S) - 2 tr(S) cancels to round-off of either sign (about every other seed here is negative).
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
        mu, sigma = feature_statistics(x)
        assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-6, seed
        assert 0.0 <= FIDReference(x).distance(x) < 1e-6, seed


# ---- preparing and batching the images -------------------------------------------------------------------------


class _PooledColours(torch.nn.Module):
    """A stand-in for the FID Inception: 2x2 average-pooled colours, 12 features per image."""

    def __init__(self) -> None:
        super().__init__()
        self.unit = torch.nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 12]."""
        return torch.nn.functional.adaptive_avg_pool2d(x * self.unit, 2).flatten(1).double()


def test_a_lossless_model_has_an_rfid_of_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference features must be those of the very images the model was given, as the model saw them.
    monkeypatch.setattr(evaluate_mod, "_decoded", lambda vae, x, opts: x.clone())
    torch.manual_seed(0)
    source = _Images({f"i{k}": (24, 20) for k in range(5)})
    nets = MetricNets(inception=_PooledColours())  # type: ignore[arg-type]
    res = evaluate_mod.evaluate({"m": AutoencoderKL("tiny").eval()}, source, EvalOptions(resolution=16, batch_size=2),  # type: ignore[arg-type]
                                nets)
    assert res.metrics == ["psnr", "ssim", "rfid"] and res.rfid["m"] == pytest.approx(0.0, abs=1e-9)


def test_an_image_exactly_the_crop_size_is_not_enlarged() -> None:
    opts = EvalOptions(resolution=32)
    assert not is_enlarged(Image.new("RGB", (32, 40)), opts)
    assert is_enlarged(Image.new("RGB", (31, 40)), opts) and is_enlarged(Image.new("RGB", (40, 31)), opts)
    assert not is_enlarged(Image.new("RGB", (8, 8)), EvalOptions(resolution=32, crop="none"))


def test_full_images_of_exactly_the_minimum_side_are_measured() -> None:
    opts = EvalOptions(crop="none")
    assert prepare(Image.new("RGB", (16, 20)), opts).shape == (3, 20, 16)
    with pytest.raises(ImageError, match="15x20 is too small to measure; at least 16 px a side"):
        prepare(Image.new("RGB", (15, 20)), opts)


class _Images:
    """A stand-in ItemSource: id -> (width, height) of a noise image; "bad" ids fail to load."""

    def __init__(self, sizes: dict[str, tuple[int, int]]) -> None:
        self.sizes = sizes
        self.ids = list(sizes)
        self.unreadable: list[tuple[str, str]] = []

    def load(self, item_id: str) -> Image.Image:
        if item_id.startswith("bad"):
            raise ImageError(f"{item_id}: cannot identify image file")
        w, h = self.sizes[item_id]
        rng = np.random.default_rng(self.ids.index(item_id))
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_batches_hold_at_most_batch_size_images_of_one_size() -> None:
    ids = [f"i{k}" for k in range(5)]
    source = _Images(dict.fromkeys(ids, (20, 20)))
    skipped: list[dict[str, str]] = []
    got = list(iter_batches(source, ["i0", "bad0", *ids[1:]], EvalOptions(resolution=16, batch_size=2),  # type: ignore[arg-type]
                            skipped))
    assert [b for b, _ in got] == [["i0", "i1"], ["i2", "i3"], ["i4"]]
    assert all(x.shape[1:] == (3, 16, 16) for _, x in got)
    assert skipped == [{"id": "bad0", "error": "bad0: cannot identify image file"}]
    # crop=none: a change of size starts a new batch, as does a full one.
    source = _Images({"a": (16, 16), "b": (16, 16), "c": (16, 16), "d": (24, 16), "e": (16, 16)})
    got = list(iter_batches(source, list("abcde"), EvalOptions(crop="none", batch_size=2), []))  # type: ignore[arg-type]
    assert [b for b, _ in got] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_a_failed_reconstruction_comes_back_all_nan_and_the_others_8_bit_rounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def decoded(vae: object, x: torch.Tensor, opts: EvalOptions) -> torch.Tensor:
        out = x.clone()
        out[1, 0, 3, 4] = math.inf  # one pixel: quantise's clamp would hide it as a white one
        return out

    monkeypatch.setattr(evaluate_mod, "_decoded", decoded)
    r, errors = reconstruct_checked(None, x, EvalOptions())  # type: ignore[arg-type]
    assert errors == [None, NON_FINITE, None]
    assert torch.isnan(r[1]).all()
    want = ((x + 1) * 127.5).round() / 127.5 - 1
    torch.testing.assert_close(r[[0, 2]], want[[0, 2]], rtol=0, atol=1e-6)


def test_per_image_scores_are_those_of_the_8_bit_images() -> None:
    g = np.random.default_rng(0)
    orig = g.integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    orig[:, :4] = 255  # saturated pixels: a clamp of either image would show
    orig[:, -4:] = 0
    rec = np.clip(orig.astype(int) + g.integers(-20, 21, orig.shape), 0, 255).astype(np.uint8)
    x, r = (torch.from_numpy(a).permute(0, 3, 1, 2).double() / 127.5 - 1 for a in (orig, rec))
    out = _per_image(MetricNets(), x, r)
    assert set(out) == {"psnr", "ssim"}
    for i in range(2):
        want_psnr = skimage_metrics.peak_signal_noise_ratio(orig[i], rec[i], data_range=255)
        want_ssim = skimage_metrics.structural_similarity(orig[i], rec[i], data_range=255, channel_axis=-1,
                                                          gaussian_weights=True, sigma=1.5,
                                                          use_sample_covariance=False)
        assert out["psnr"][i].item() == pytest.approx(want_psnr, rel=1e-6)
        assert out["ssim"][i].item() == pytest.approx(want_ssim, abs=1e-6)


# ---- the report's picks and summary ------------------------------------------------------------------------------


def _result(psnrs: dict[str, list[float]], ok: dict[str, list[bool]] | None = None) -> EvalResult:
    n = len(next(iter(psnrs.values())))
    res = EvalResult(models=list(psnrs), ids=[f"{i}.png" for i in range(n)], metrics=["psnr"])
    res.values = {m: {"psnr": v} for m, v in psnrs.items()}
    res.ok = ok or {}
    return res


def test_worst_and_best_examples_by_psnr() -> None:
    res = _result({"a": [30.0, 20.0, 40.0, 25.0, 35.0, 10.0], "b": [1.0, 2.0, math.nan, 4.0, 5.0, 6.0]},
                  ok={"a": [True] * 6, "b": [True, True, False, True, True, True]})
    picks = select_examples(res, 2)
    assert picks["a"] == {"worst": [5, 1], "best": [2, 4]}
    assert picks["b"] == {"worst": [0, 1], "best": [5, 4]}  # the failed image is neither
    # At most half of the images each, so no image is both a worst and a best.
    assert select_examples(res, 5)["a"] == {"worst": [5, 1, 3], "best": [2, 4, 0]}
    assert select_examples(res, 5)["b"] == {"worst": [0, 1], "best": [5, 4]}
    assert select_examples(res, 0)["a"] == {"worst": [], "best": []}


@pytest.mark.parametrize(("n", "reliable"), [(FEATURE_DIM - 1, False), (FEATURE_DIM, True)])
def test_an_rfid_from_as_many_images_as_feature_dimensions_is_reliable(n: int, reliable: bool) -> None:
    res = _result({"m": [30.0] * n})
    res.metrics.append("rfid")
    res.summaries = {"m": {"psnr": {"mean": 30.0, "std": 0.0, "n": n}}}
    res.rfid = {"m": 1.5}
    summary = build_summary(res, "data", EvalOptions(), torch.device("cpu"))
    assert summary["models"]["m"]["rfid"] == {"value": 1.5, "n": n, "reliable": reliable}


def test_the_summary_table_shows_psnr_to_2_places_and_the_rest_to_4() -> None:
    model = {"n": 3, "psnr": {"mean": 30.123456, "std": 1.23456, "n": 3},
             "ssim": {"mean": 0.912345, "std": 0.012345, "n": 3}, "lpips": {"mean": 0.054321, "std": 0.001234, "n": 3},
             "rfid": {"value": 12.34567, "n": 3, "reliable": False}}
    summary = {"metrics": ["psnr", "ssim", "lpips", "rfid"], "models": {"m": model}}
    table = summary_table(summary)
    assert "<td>30.12 ± 1.23</td>" in table and "<td>0.9123 ± 0.0123</td>" in table
    assert "<td>0.0543 ± 0.0012</td>" in table and "<td>12.346 <small>(n=3 &lt; 2048: unreliable)</small></td>" in table


def test_rfid_notes_and_failure_notes() -> None:
    assert rfid_sample_note({"n": 7}) == "n=7"  # a summary written before "reliable" existed
    assert rfid_sample_note({"n": 7, "reliable": True}) == "n=7"
    assert rfid_sample_note({"n": 7, "reliable": False}) == f"n=7 < {FEATURE_DIM}: unreliable"
    items = [{"id": f"{k}.png", "error": "NaN"} for k in range(4)]
    three = failure_note("vae", {"failed": 3, "failed_items": items[:3], "n": 2}, 5)
    shown = "0.png: NaN; 1.png: NaN; 2.png: NaN"
    assert three == f"vae failed on 3 of 5 images ({shown}); its scores are over the other 2"
    four = failure_note("vae", {"failed": 4, "failed_items": items, "n": 1}, 5)
    assert four == f"vae failed on 4 of 5 images ({shown}; ...); its scores are over the other 1"  # 3 shown of 4


def test_the_error_map_colours_the_mean_error_over_rgb() -> None:
    x = torch.zeros(3, 2, 2)
    r = x.clone()
    r[0] = 3 * (ERROR_FULL_SCALE / 4) / 127.5  # red only: a mean over RGB of a quarter of full scale
    got = np.asarray(error_heatmap(x, r)).reshape(-1, 3)
    t = 0.25 * (len(_RAMP) - 1)
    want = [np.interp(t, np.arange(len(_RAMP)), _RAMP[:, c]) for c in range(3)]
    np.testing.assert_allclose(got, np.tile(want, (4, 1)), atol=1.0)
