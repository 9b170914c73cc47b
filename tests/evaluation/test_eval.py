"""`klvae eval`: the Fréchet distance against hand computations, the Inception port, and whole runs of the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skdata
import skimage.metrics as skmetrics
import torch
from PIL import Image

import klvae
from helpers import block_metric_downloads, counting_tiled_calls
from klvae.cli import main as cli_main
from klvae.errors import KlvaeError, WeightsError
from klvae.evaluation.fid import (
    FEATURE_DIM,
    FIDReference,
    InceptionV3Features,
    feature_statistics,
    frechet_distance,
    trace_sqrt_product,
)
from klvae.evaluation.report import ERROR_FULL_SCALE, error_heatmap, histogram_svg, json_safe
from klvae.latents.buckets import resize_crop
from klvae.nets import inception as inception_mod
from klvae.nets import lpips as lpips_mod
from klvae.nets import pretrained as pretrained_mod
from klvae.nets.inception import tf_bilinear_resize
from klvae.nets.lpips import LPIPS, LinLayers, VGG16Features
from klvae.posterior import DiagonalGaussian

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")
RES = 32


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the network or a real hub cache; the Inception runs at its smallest input to stay fast."""
    block_metric_downloads(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six scikit-image samples at small, different sizes, and one truncated PNG."""
    d = tmp_path_factory.mktemp("images")
    for k, name in enumerate(SAMPLES):
        img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        img.resize((40 + 7 * k, 36 + 3 * k), Image.Resampling.LANCZOS).save(d / f"{name}.png")
    (d / "broken.png").write_bytes((d / "coffee.png").read_bytes()[:150])
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny random models as diffusers folders; the second's name needs HTML escaping."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed, name in enumerate(("vae_a", "vae<b>&c")):
        torch.manual_seed(seed)
        out.append(klvae.AutoencoderKL("tiny").save_pretrained(root / name))
    return [Path(p) if Path(p).is_dir() else Path(p).parent for p in out]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random weight files in the real layouts: LPIPS VGG16 + heads, and the FID Inception (with its fc)."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    files = {"vgg": d / "vgg16.pth", "lin": d / "lin.pth", "inception": d / "inception.pth"}
    torch.save(VGG16Features().state_dict(), files["vgg"])
    torch.save({k: v.abs() for k, v in LinLayers().state_dict().items()}, files["lin"])
    sd = InceptionV3Features(pretrained=False).state_dict()
    # He-normal convolutions keep activations O(1) through 90 layers (the default init shrinks them to ~1e-8);
    # the BN counters are left out, as older conversions lack them.
    sd = {k: torch.nn.init.kaiming_normal_(v.clone()) if k.endswith("conv.weight") else v
          for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, FEATURE_DIM), torch.zeros(1008)
    torch.save(sd, files["inception"])
    return files


def run_cli(*argv: str) -> int:
    return cli_main.main(["eval", *argv])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- the Fréchet distance ------------------------------------------------------------------------------


def test_frechet_distance_diagonal_gaussians_by_hand() -> None:
    # |dmu|² = 1 + 4 = 5; tr = (1 + 4) + (4 + 9) - 2 (sqrt(1*4) + sqrt(4*9)) = 18 - 16 = 2.
    d = frechet_distance(torch.tensor([0.0, 0.0]), torch.diag(torch.tensor([1.0, 4.0])),
                         torch.tensor([1.0, 2.0]), torch.diag(torch.tensor([4.0, 9.0])))
    assert d == pytest.approx(7.0, abs=1e-10)


def test_frechet_distance_non_commuting_covariances_by_hand() -> None:
    # S1 S2 = [[2, 3], [1, 6]]: trace 8, det 9, so tr sqrt(S1 S2) = sqrt(8 + 2 sqrt 9) = sqrt 14.
    s1, s2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    mu = torch.zeros(2)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(8 - 2 * math.sqrt(14), abs=1e-10)
    assert frechet_distance(mu, s2, mu, s1) == pytest.approx(8 - 2 * math.sqrt(14), abs=1e-10)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_statistics_match_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 8, generator=g) @ torch.randn(8, 8, generator=g)).double()
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), atol=1e-10)
    ref = FIDReference(x)
    assert ref.distance(x) == pytest.approx(0.0, abs=1e-8)
    assert ref.distance(x + 1.0) == pytest.approx(8.0, abs=1e-8)  # a pure shift adds |dmu|²
    with pytest.raises(ValueError):
        feature_statistics(x[:1])


def test_fewer_samples_than_dimensions_uses_the_exact_sample_space_form() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 16, generator=g).double(), (torch.randn(7, 16, generator=g) * 1.5 + 0.3).double()
    ref = FIDReference(x)
    full = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert ref.distance(y) == pytest.approx(full, rel=1e-6)
    assert ref.distance(x) == pytest.approx(0.0, abs=1e-9)
    c = x - x.mean(0)
    assert trace_sqrt_product(c, c) == pytest.approx(float(torch.trace(c.T @ c / 5)), rel=1e-12)


def test_frechet_distance_of_samples_approaches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 2, generator=g) * torch.tensor([1.0, 2.0])
    b = torch.randn(20000, 2, generator=g) * torch.tensor([2.0, 3.0]) + torch.tensor([1.0, 2.0])
    assert FIDReference(a).distance(b) == pytest.approx(7.0, abs=0.25)


# ---- the Inception port --------------------------------------------------------------------------------


def test_tf_bilinear_resize_has_no_half_pixel_offset() -> None:
    x = torch.tensor([[[[0.0, 1.0]]]])
    # TF1 (align_corners=False): source = target * in/out = 0, 0.5, 1, 1.5 -> clamped to the last pixel.
    assert tf_bilinear_resize(x, (1, 4)).flatten().tolist() == [0.0, 0.5, 1.0, 1.0]
    y = torch.rand(1, 3, 9, 7)
    assert torch.equal(tf_bilinear_resize(y, (9, 7)), y)
    assert torch.allclose(tf_bilinear_resize(torch.full((1, 3, 5, 6), 0.3), (11, 13)), torch.tensor(0.3))


def test_inception_features_load_from_file_and_fail_offline(weights: dict[str, Path], tmp_path: Path) -> None:
    net = InceptionV3Features(pretrained=True, weights=weights["inception"])  # fc dropped, BN counters filled
    x = torch.rand(2, 3, 24, 30) * 2 - 1
    f = net(x)
    assert f.shape == (2, FEATURE_DIM) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert torch.allclose(net(x[:1]), f[:1], atol=1e-5)
    with pytest.raises(KlvaeError, match="--inception-weights"):
        InceptionV3Features(pretrained=True)  # nothing cached, download refused
    bad = tmp_path / "bad.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="missing"):
        InceptionV3Features(weights=bad)


def test_inception_weights_found_in_the_torch_hub_cache(weights: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cached = pretrained_mod.hub_checkpoint(inception_mod.PYTORCH_FID_FILE)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights["inception"].read_bytes())
    with pytest.raises(WeightsError, match="expected 6726825d0af5f729"):  # a cache hit must be the pinned file
        InceptionV3Features(pretrained=True)
    monkeypatch.setattr(inception_mod, "INCEPTION_SHA256", hashlib.sha256(cached.read_bytes()).hexdigest())
    InceptionV3Features(pretrained=True)


# ---- whole runs ----------------------------------------------------------------------------------------


def reconstruct_independently(model_dir: Path, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit crop and 8-bit reconstruction, through the model's own methods rather than klvae.inference."""
    vae = klvae.AutoencoderKL.from_pretrained(model_dir).eval()
    crop, _ = resize_crop(Image.open(image_path).convert("RGB"), (RES, RES))
    orig = np.asarray(crop)
    x = torch.from_numpy(orig.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(DiagonalGaussian(vae.encode_moments(x)).mode()).clamp(-1, 1)
    return orig, ((rec[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def check_html(report: Path) -> str:
    page = (report / "index.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all((report / s).is_file() for s in srcs)
    assert "<svg" in page
    return page


def test_eval_one_model_all_metrics(data_dir: Path, models: list[Path], weights: dict[str, Path],
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report"
    rc = run_cli("--model", str(models[0]), "--data", str(data_dir), "-o", str(report), "--resolution", str(RES),
                 "--batch-size", "4", "--examples", "2", "--lpips-vgg", str(weights["vgg"]),
                 "--lpips-lin", str(weights["lin"]), "--inception-weights", str(weights["inception"]))
    assert rc == 1  # the truncated file was skipped
    assert "rFID" in capsys.readouterr().out
    rows = read_csv(report / "metrics.csv")
    assert list(rows[0]) == ["id", "model", "psnr", "ssim", "lpips"]
    assert sorted(r["id"] for r in rows) == sorted(f"{n}.png" for n in SAMPLES)
    lp = LPIPS(pretrained=False, vgg_path=weights["vgg"], lin_path=weights["lin"])
    for r in rows:
        orig, rec = reconstruct_independently(models[0], data_dir / r["id"])
        assert float(r["psnr"]) == pytest.approx(skmetrics.peak_signal_noise_ratio(orig, rec, data_range=255), abs=0.02)
        ssim = skmetrics.structural_similarity(orig, rec, data_range=255, channel_axis=-1, gaussian_weights=True,
                                               sigma=1.5, use_sample_covariance=False)
        assert float(r["ssim"]) == pytest.approx(ssim, abs=2e-3)
        to_t = lambda a: torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
        assert float(r["lpips"]) == pytest.approx(float(lp(to_t(orig), to_t(rec))), rel=1e-2, abs=1e-4)

    s = json.loads((report / "summary.json").read_text())
    assert s["images"] == {"in_data": 7, "found": 7, "evaluated": 6, "skipped": 1,
                           "skipped_items": s["images"]["skipped_items"]}
    assert s["images"]["skipped_items"][0]["id"] == "broken.png"
    assert (s["resolution"], s["crop"], s["device"], s["dtype"]) == (RES, "center", "cpu", "float32")
    assert s["versions"]["klvae"] == klvae.__version__ and s["versions"]["torch"] == torch.__version__
    assert s["metrics"] == ["psnr", "ssim", "lpips", "rfid"] and s["left_out"] == {}
    m = s["models"][str(models[0])]
    assert m["n"] == 6 and m["psnr"]["n"] == 6
    assert m["psnr"]["mean"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]), abs=1e-5)
    assert m["rfid"]["n"] == 6 and 0 < m["rfid"]["value"] < math.inf
    page = check_html(report)
    assert "worst 2 by PSNR" in page and "best 2 by PSNR" in page and "rFID" in page


def test_eval_two_models_side_by_side_without_weights(data_dir: Path, models: list[Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report"
    rc = run_cli("--model", str(models[0]), "--model", str(models[1]), "--data", str(data_dir), "-o", str(report),
                 "--resolution", str(RES), "--examples", "3", "--no-fid")
    assert rc == 1
    assert "LPIPS left out" in capsys.readouterr().err
    rows = read_csv(report / "metrics.csv")
    assert list(rows[0]) == ["id", "model", "psnr", "ssim"]  # no weights offline: no LPIPS column
    assert len(rows) == 12
    names = [str(models[0]), str(models[1])]
    for a, b in zip(rows[::2], rows[1::2], strict=True):  # the models of one image sit together
        assert a["id"] == b["id"] and [a["model"], b["model"]] == names
    s = json.loads((report / "summary.json").read_text())
    assert list(s["models"]) == names
    assert s["left_out"]["lpips"].startswith("weights unavailable") and "disabled" in s["left_out"]["rfid"]
    assert "pass --lpips-vgg <file>" in s["left_out"]["lpips"]  # the flag, not a Python API name
    assert "lpips" not in s["models"][names[0]] and "rfid" not in s["models"][names[0]]
    page = check_html(report)
    assert "vae&lt;b&gt;&amp;c" in page and "vae<b>&c" not in page
    rows_html = page.split('<div class="row">')[1:]
    assert len(rows_html) == 2 * 2 * 3  # 2 models x worst/best x 3
    assert all(r.count("_recon.png") == 2 * 2 for r in rows_html)  # each model's reconstruction (href + src)
    # A rerun with one model into the same folder leaves no picture of the second; the user's own files stay.
    (report / "images" / "notes.png").write_bytes(b"mine")
    assert run_cli("--model", str(models[0]), "--data", str(data_dir), "-o", str(report), "--resolution", str(RES),
                   "--examples", "1", "--no-fid", "--no-lpips", "--overwrite") == 1
    page = check_html(report)
    linked = set(re.findall(r'src="(images/[^"]+)"', page))
    assert {f"images/{p.name}" for p in (report / "images").iterdir()} == linked | {"images/notes.png"}
    assert not list((report / "images").glob("*_m1_*"))


def test_eval_full_images_limit_and_duplicate_model(data_dir: Path, models: list[Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_tiled_calls(monkeypatch)
    report = tmp_path / "report"
    rc = run_cli("--model", str(models[0]), "--model", str(models[0]), "--data", str(data_dir), "-o", str(report),
                 "--crop", "none", "--limit", "3", "--no-lpips", "--no-fid", "--examples", "1", "--tile-size", "16")
    s = json.loads((report / "summary.json").read_text())
    assert list(s["models"]) == [str(models[0]), f"{models[0]} #2"]
    assert s["images"]["found"] == 3 and s["resolution"] is None and s["crop"] == "none"
    assert s["tiling"] == {"tile_size": 16, "max_memory": None}
    assert calls["encode"] >= 3 and calls["decode"] >= 3  # the strips really ran (3 images, 2 models)
    assert rc == (1 if s["images"]["skipped"] else 0)
    rows = read_csv(report / "metrics.csv")
    assert [r["psnr"] for r in rows[::2]] == [r["psnr"] for r in rows[1::2]]  # the same model twice
    # Odd sizes are padded inside inference and cropped back: every picture keeps its original's size.
    for i, item in enumerate(dict.fromkeys(r["id"] for r in rows)):
        for png in (report / "images").glob(f"{i:05d}_*.png"):
            assert Image.open(png).size == Image.open(data_dir / item).size


def test_eval_bad_input_is_a_one_line_error(data_dir: Path, models: list[Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    assert run_cli("--model", str(models[0]), "--data", str(bad), "-o", str(tmp_path / "r"), "--no-fid") == 2
    assert "the only image could not be read" in capsys.readouterr().err
    assert run_cli("--model", str(models[0]), "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "r")) == 2
    assert run_cli("--model", str(models[0]), "--model", str(models[1]), "--subfolder", "a", "--subfolder", "b",
                   "--subfolder", "c", "--data", str(data_dir), "-o", str(tmp_path / "r")) == 2
    assert run_cli("--model", str(models[0]), "--data", str(data_dir), "-o", str(tmp_path / "r"),
                   "--resolution", "4") == 2
    assert not (tmp_path / "r").exists()


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test whose run gets as far as evaluating: its error must come before the work."""
    from klvae.evaluation import evaluate as evaluate_mod

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(evaluate_mod, "evaluate", refuse)


@pytest.mark.parametrize(("flag", "content", "words"), [
    ("--lpips-vgg", None, ["--lpips-vgg", "no such file"]),
    ("--lpips-vgg", np.random.default_rng(0).integers(0, 255, 1000, dtype=np.uint8).tobytes(),
     ["--lpips-vgg", "not a PyTorch weights file"]),
    ("--lpips-lin", b"abc", ["--lpips-lin", "not a PyTorch weights file"]),
    ("--inception-weights", b"abc", ["--inception-weights", "not a PyTorch weights file"]),
    ("--inception-weights", "wrong keys", ["--inception-weights", "do not fit"]),
    ("--inception-weights", b"", ["--inception-weights", "is empty"]),
])
def test_named_metric_weights_must_load_before_the_work(
    data_dir: Path, models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None,
    flag: str, content: bytes | str | None, words: list[str],
) -> None:
    path = tmp_path / "w.pth"
    if content == "wrong keys":
        torch.save({"conv.weight": torch.zeros(1)}, path)
    elif content is not None:
        path.write_bytes(content)
    report = tmp_path / "report"
    capsys.readouterr()
    assert run_cli("--model", str(models[0]), "--data", str(data_dir), "-o", str(report), flag, str(path)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith(("INFO", "WARNING"))]
    assert len(err) == 1 and err[0].startswith("klvae: error: ") and all(w in err[0] for w in words), err
    assert not report.exists()


def test_weights_found_automatically_but_unreadable_are_left_out_in_one_line(
    data_dir: Path, models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    junk = np.random.default_rng(0).integers(0, 255, 1000, dtype=np.uint8).tobytes()  # not a pickle
    # Under a name whose hash prefix it has, so that it passes the SHA-256 check and reaches torch.load.
    monkeypatch.setattr(lpips_mod, "VGG16_FILE", f"vgg16-{hashlib.sha256(junk).hexdigest()[:8]}.pth")
    cached = pretrained_mod.hub_checkpoint(lpips_mod.VGG16_FILE)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(junk)
    capsys.readouterr()
    rc = run_cli("--model", str(models[0]), "--data", str(data_dir), "-o", str(tmp_path / "r"), "--no-fid",
                 "--resolution", str(RES))
    assert rc == 1  # for the truncated image: LPIPS missing is no failure
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "LPIPS left out" in ln]
    assert len(warning) == 1 and "UnpicklingError" in warning[0]
    assert "Unsupported operand" not in err and "weights_only" not in err.replace(warning[0], "")


def test_eval_output_that_is_a_file_fails_before_the_work(
    data_dir: Path, models: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    (tmp_path / "report").write_text("not a folder")
    capsys.readouterr()
    assert run_cli("--model", str(models[0]), "--data", str(data_dir), "-o", str(tmp_path / "report")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"klvae: error: --output {tmp_path / 'report'} is a " \
        "file, not a folder"


def test_eval_resolution_beyond_max_pixels_is_an_error(data_dir: Path, models: list[Path], tmp_path: Path,
                                                       no_work: None) -> None:
    assert run_cli("--model", str(models[0]), "--data", str(data_dir), "-o", str(tmp_path / "r"),
                   "--resolution", "20000") == 2


# ---- report pieces -------------------------------------------------------------------------------------


def test_error_heatmap_scale_and_histogram() -> None:
    x = torch.zeros(3, 4, 5)
    assert np.asarray(error_heatmap(x, x)).reshape(-1, 3).tolist() == [[0, 0, 4]] * 20
    far = x + 2 * ERROR_FULL_SCALE / 255
    assert np.asarray(error_heatmap(x, far)).reshape(-1, 3).tolist() == [[252, 255, 164]] * 20
    svg = histogram_svg({"a": [20.0, 21.0, 21.5], "b<": [30.0, float("inf")]}, bins=10)
    assert svg.startswith("<svg") and svg.count("<rect") == 3 and "b&lt;:" in svg
    assert json_safe({"x": [float("inf"), 1.0, float("nan")]}) == {"x": [None, 1.0, None]}


def test_eval_file_name_that_is_not_utf8_is_written_as_escapes(models: list[Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    img = Image.fromarray(skdata.astronaut()).resize((40, 40))
    img.save(os.fsencode(data) + b"/\xff\xfe.png", format="PNG")  # a Latin-1 name on a UTF-8 system
    img.save(data / "plain.png")
    report = tmp_path / "report"
    assert run_cli("--model", str(models[0]), "--data", str(data), "-o", str(report), "--resolution", str(RES),
                   "--examples", "1", "--no-fid", "--no-lpips") == 0
    assert sorted(r["id"] for r in read_csv(report / "metrics.csv")) == ["\\xff\\xfe.png", "plain.png"]
    assert "\\xff\\xfe.png" in check_html(report)


def test_a_report_that_fails_midway_leaves_the_previous_one_whole(data_dir: Path, models: list[Path],
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report"
    args = ("--model", str(models[0]), "--data", str(data_dir), "-o", str(report), "--resolution", str(RES),
            "--examples", "1", "--no-fid", "--no-lpips")
    run_cli(*args)
    before = {p: p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert len(before) == 3 + 2 * 3  # csv, json, html; worst and best triplets
    from klvae.evaluation import report as report_mod

    def full_disk(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_mod, "write_image", full_disk)  # the tables are written, then the first PNG fails
    capsys.readouterr()
    assert run_cli(*args, "--limit", "2", "--overwrite") == 2  # other images: other tables, were they written
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"klvae: error: cannot write .*/images/\d{5}_original\.png: .*No space left on device",
                        err), err
    after = {p: p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert after == before  # no new table beside the old page, no temporary file left
