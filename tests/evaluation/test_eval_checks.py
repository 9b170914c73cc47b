"""`klvae eval`'s checks and what it says: a bad model spec or an empty data folder fails before any download or
model load, enlarged images are counted and warned about once, --resolution with --crop none is refused, an rFID
from few images is flagged unreliable, and the summary line's grammar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import klvae
from helpers import block_metric_downloads
from klvae.cli import main as cli_main
from klvae.evaluation import evaluate as evaluate_mod
from klvae.evaluation.fid import FEATURE_DIM, InceptionV3Features

FAST = ("--no-lpips", "--no-fid", "--examples", "1")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the network or a real hub cache; the Inception runs at its smallest input to stay fast."""
    block_metric_downloads(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model as a diffusers folder."""
    torch.manual_seed(0)
    p = Path(klvae.AutoencoderKL("tiny").save_pretrained(tmp_path_factory.mktemp("model") / "vae"))
    return p if p.is_dir() else p.parent


def make_images(d: Path, sizes: list[tuple[int, int]]) -> Path:
    """Random-noise PNGs of the given (width, height) in a new folder `d`."""
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for k, (w, h) in enumerate(sizes):
        a = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(a).save(d / f"img{k}.png")
    return d


def run_cli(*argv: str) -> int:
    return cli_main.main(["eval", *argv])


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if not ln.startswith(("INFO", "WARNING"))]


def test_a_bad_model_spec_fails_before_the_metric_nets_are_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("metric nets (and their downloads) before the model was checked")

    monkeypatch.setattr(evaluate_mod, "build_metric_nets", refuse)
    data = make_images(tmp_path / "imgs", [(32, 32)])
    assert run_cli("--data", str(data), "-o", str(tmp_path / "r"), "-m", str(tmp_path / "nope")) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "nope" in err[0]
    assert not (tmp_path / "r").exists()


def test_an_empty_data_folder_fails_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded for an empty data set")

    monkeypatch.setattr(klvae.AutoencoderKL, "from_pretrained", refuse)
    (tmp_path / "empty").mkdir()
    assert run_cli("--data", str(tmp_path / "empty"), "-o", str(tmp_path / "r"), *FAST) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "holds no images" in err[0]


def test_enlarged_images_are_counted_and_warned_about_once(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_images(tmp_path / "imgs", [(20, 24), (40, 40), (24, 30)])
    report = tmp_path / "r"
    assert run_cli("-m", str(model), "--data", str(data), "-o", str(report), "--resolution", "32", *FAST) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "enlarged" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING"), warnings
    assert "2 of 3 images" in warnings[0] and "smallest side 20 px" in warnings[0]
    assert "--resolution 20 or less" in warnings[0] and "--crop none" in warnings[0]
    assert json.loads((report / "summary.json").read_text())["enlarged"] == 2


def test_the_enlarged_warning_never_advises_a_resolution_below_the_smallest_measurable_side(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_images(tmp_path / "imgs", [(5, 24), (40, 40)])
    assert run_cli("-m", str(model), "--data", str(data), "-o", str(tmp_path / "r"), "--resolution", "32", *FAST) == 0
    warning = next(ln for ln in capsys.readouterr().err.splitlines() if "enlarged" in ln)
    assert "smallest side 5 px" in warning and "--resolution 5" not in warning and "--crop none" not in warning
    assert "images under 16 px a side are measured only enlarged; --resolution 16 enlarges them least" in warning
    # The advice given is one the command takes.
    assert run_cli("-m", str(model), "--data", str(data), "-o", str(tmp_path / "r2"), "--resolution", "16",
                   *FAST) == 0


def test_no_enlarged_warning_when_every_image_covers_the_crop(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_images(tmp_path / "imgs", [(40, 36)])
    report = tmp_path / "r"
    assert run_cli("-m", str(model), "--data", str(data), "-o", str(report), "--resolution", "32", *FAST) == 0
    assert "enlarged" not in capsys.readouterr().err
    assert json.loads((report / "summary.json").read_text())["enlarged"] == 0


def test_resolution_with_crop_none_is_refused(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_images(tmp_path / "imgs", [(32, 32)])
    rc = run_cli("-m", str(model), "--data", str(data), "-o", str(tmp_path / "r"), "--crop", "none",
                 "--resolution", "64", *FAST)
    assert rc == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and "--resolution" in err[0] and "--crop none" in err[0]
    assert not (tmp_path / "r").exists()
    # Left out, --crop none runs on the full images; the library default is unchanged.
    assert run_cli("-m", str(model), "--data", str(data), "-o", str(tmp_path / "r"), "--crop", "none", *FAST) == 0
    assert evaluate_mod.EvalOptions().resolution == 256


def test_one_image_is_singular(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_images(tmp_path / "imgs", [(32, 32)])
    assert run_cli("-m", str(model), "--data", str(data), "-o", str(tmp_path / "r"), "--resolution", "32",
                   *FAST) == 0
    assert "\n1 image; report: " in "\n" + capsys.readouterr().out


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random FID Inception weights in the real layout (as tests/evaluation/test_eval.py makes them)."""
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.manual_seed(0)
    sd = InceptionV3Features(pretrained=False).state_dict()
    sd = {k: torch.nn.init.kaiming_normal_(v.clone()) if k.endswith("conv.weight") else v
          for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, FEATURE_DIM), torch.zeros(1008)
    torch.save(sd, path)
    return path


def test_rfid_from_few_images_is_flagged_unreliable(
    model: Path, inception_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_images(tmp_path / "imgs", [(32, 32)] * 3)
    report = tmp_path / "r"
    assert cli_main.main(["-q", "eval", "-m", str(model), "--data", str(data), "-o", str(report), "--resolution",
                          "32", "--no-lpips", "--inception-weights", str(inception_weights)]) == 0
    captured = capsys.readouterr()
    # -q keeps warnings: this one must survive it.
    assert any(ln.startswith("WARNING") and "unreliable" in ln for ln in captured.err.splitlines()), captured.err
    assert f"(n=3 < {FEATURE_DIM}: unreliable)" in captured.out
    rfid = json.loads((report / "summary.json").read_text())["models"][str(model)]["rfid"]
    assert rfid["n"] == 3 and rfid["reliable"] is False and rfid["value"] is not None
    assert f"n=3 &lt; {FEATURE_DIM}: unreliable" in (report / "index.html").read_text()
