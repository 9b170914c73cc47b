"""Pins bugs a hunt of `klvae eval` and klvae.evaluation found:

- `eval --data OUT/images -o OUT` writes the report's example PNGs into the data folder (a rerun scores them).
- `eval -o ""` writes the report into the current folder; `eval --data ""` evaluates the current folder's images
  (an empty model name is refused, as these should be).
- an `--lpips-lin` file holding a sparse or nested tensor ends in an internal error, not one `klvae: error:` line.
- `EvalOptions.check()` passes a fractional, NaN, string or bool resolution/limit/batch_size/examples: a run then
  calls every image unreadable, fails inside slicing, or silently evaluates one image.
- `run_evaluation` given a bare model, a list of models, a path as a model or a non-string name fails deep inside
  (AttributeError, or a TypeError from the HTML join after all the work) instead of naming `models`.
- `run_evaluation` with `out_dir` an existing file evaluates everything before failing with FileExistsError.
- `FIDReference.distance` of features of another dimension: a ValueError with many samples, a bare torch
  RuntimeError with fewer samples than dimensions (the path every eval below 2048 images takes).
- `psnr`/`ssim` given NumPy arrays raise AttributeError; `psnr` of images with no pixels is a silent NaN and
  `ssim` of images with no channels a torch RuntimeError.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import klvae
from helpers import block_metric_downloads, files_under, noise_png, one_error_line, saved_tiny_model
from klvae.cli import main as cli_main
from klvae.errors import KlvaeError
from klvae.evaluation import evaluate as evaluate_mod
from klvae.evaluation import psnr, ssim
from klvae.evaluation.evaluate import EvalOptions, MetricNets, run_evaluation
from klvae.evaluation.fid import FIDReference
from klvae.nets.lpips import TAP_CHANNELS

FAST = ("--no-lpips", "--no-fid", "--resolution", "16", "--examples", "1")
CLEAR = (KlvaeError, TypeError, ValueError)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No download of metric weights, no real torch hub cache."""
    block_metric_downloads(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset saved as a diffusers folder."""
    return saved_tiny_model(tmp_path_factory.mktemp("model") / "vae")


def images(folder: Path, n: int = 2) -> Path:
    """`folder` (made) holding n 24x16 noise PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img{i}.png").write_bytes(noise_png(i))
    return folder


def run_cli(*argv: str) -> int:
    return cli_main.main(["eval", *argv])


def tiny() -> klvae.AutoencoderKL:
    torch.manual_seed(0)
    return klvae.AutoencoderKL("tiny").eval()


NO_NETS = {"lpips": "disabled", "rfid": "disabled"}


# ---- the CLI -----------------------------------------------------------------------------------------------


def test_the_report_never_writes_its_pictures_into_the_data_folder(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --data OUT/images -o OUT: the example PNGs go to OUT/images, the data folder; a rerun would score them.
    out = tmp_path / "out"
    data = images(out / "images")
    before = files_under(data)
    capsys.readouterr()
    rc = run_cli("-m", str(model), "--data", str(data), "-o", str(out), *FAST)
    assert files_under(data) == before, files_under(data)
    assert rc == 2
    assert "--output" in one_error_line(capsys.readouterr().err)


def test_an_empty_output_name_is_not_the_current_folder(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = images(tmp_path / "data")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    rc = run_cli("-m", str(model), "--data", str(data), "-o", "", *FAST)
    assert files_under(cwd) == [], files_under(cwd)  # index.html, summary.json, metrics.csv, images/ were written
    assert rc == 2
    assert "--output" in one_error_line(capsys.readouterr().err)


def test_an_empty_data_name_is_not_the_current_folder(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(images(tmp_path / "cwd"))  # images in the current folder, which Path("") finds
    capsys.readouterr()
    rc = run_cli("-m", str(model), "--data", "", "-o", str(tmp_path / "r"), *FAST)
    assert rc == 2, "the current folder's images were evaluated"
    assert "--data" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["sparse", "nested"])
def test_a_lin_heads_file_holding_an_odd_tensor_is_one_line(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    sd: dict[str, Any] = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)}
    first = "lin0.model.1.weight"
    sd[first] = sd[first].to_sparse() if kind == "sparse" else torch.nested.nested_tensor([torch.rand(3)])
    heads = tmp_path / "lin.pth"
    torch.save(sd, heads)
    data = images(tmp_path / "data")
    capsys.readouterr()
    rc = run_cli("-m", str(model), "--data", str(data), "-o", str(tmp_path / "r"), "--no-fid", "--resolution", "16",
                 "--lpips-lin", str(heads))
    err = capsys.readouterr().err
    assert rc == 2, err  # now 1: "klvae: internal error: RuntimeError: ..."
    assert "--lpips-lin" in one_error_line(err)
    assert not (tmp_path / "r").exists()


# ---- the library: EvalOptions, run_evaluation --------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("resolution", 32.5),  # each image's resize fails: the run says "none of the 2 images could be read"
    ("resolution", math.nan),
    ("resolution", "32"),  # TypeError: '<' not supported between instances of 'str' and 'int'
    ("limit", 2.5),  # TypeError in evaluate(): slice indices must be integers
    ("limit", True),  # silently one image
    ("batch_size", 2.5),  # len(batch) == 2.5 never holds: one batch of every image
    ("examples", "4"),
])
def test_eval_options_refuse_values_that_are_no_integers_by_name(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {"resolution": 32, field: value}
    with pytest.raises(CLEAR) as e:
        EvalOptions(**kwargs).check()
    assert field in str(e.value), str(e.value)


def test_a_fractional_resolution_is_not_reported_as_unreadable_images(tmp_path: Path) -> None:
    data = images(tmp_path / "data")
    with pytest.raises(CLEAR) as e:
        run_evaluation({"m": tiny()}, data, tmp_path / "r", EvalOptions(resolution=24.5), MetricNets(left_out=NO_NETS),
                       torch.device("cpu"))
    assert "resolution" in str(e.value) and "could be read" not in str(e.value), str(e.value)


@pytest.mark.parametrize("how", ["bare model", "list", "path as model", "number as name"])
def test_run_evaluation_names_models_of_the_wrong_kind(tmp_path: Path, model: Path, how: str) -> None:
    vae = tiny()
    models: Any = {"bare model": vae, "list": [vae], "path as model": {"m": str(model)},
                   "number as name": {1: vae}}[how]
    data = images(tmp_path / "data")
    with pytest.raises(CLEAR) as e:
        run_evaluation(models, data, tmp_path / "r", EvalOptions(resolution=16), MetricNets(left_out=NO_NETS),
                       torch.device("cpu"))
    assert "models" in str(e.value), f"{type(e.value).__name__}: {e.value}"
    assert not (tmp_path / "r").exists()


def test_run_evaluation_refuses_an_output_that_is_a_file_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(evaluate_mod, "evaluate", refuse)
    (tmp_path / "report").write_text("a file")
    data = images(tmp_path / "data")
    with pytest.raises((KlvaeError, ValueError, OSError)):  # now: the work, then FileExistsError from mkdir
        run_evaluation({"m": tiny()}, data, tmp_path / "report", EvalOptions(resolution=16),
                       MetricNets(left_out=NO_NETS), torch.device("cpu"))
    assert (tmp_path / "report").read_text() == "a file"


# ---- the library: FID and the metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 40])
def test_fid_of_features_of_another_dimension_is_a_value_error_whatever_the_count(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    reference = FIDReference(torch.randn(n, 8, generator=g))
    with pytest.raises(ValueError) as e:  # n=3 (fewer than 8 dimensions) was torch's RuntimeError
        reference.distance(torch.randn(n, 6, generator=g))
    assert str(e.value) == f"features must be [N, 8] as the reference's, got [{n}, 6]"


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_metrics_of_numpy_arrays_are_a_type_error(metric: Any) -> None:
    a = np.zeros((1, 3, 16, 16), dtype=np.float32)
    with pytest.raises(TypeError):  # now AttributeError: 'numpy.ndarray' object has no attribute 'to'
        metric(a, a + 0.5, 2.0)


@pytest.mark.parametrize(("metric", "shape"), [(psnr, (1, 3, 0, 16)), (ssim, (1, 0, 16, 16))])
def test_metrics_of_images_without_pixels_are_a_value_error(metric: Any, shape: tuple[int, ...]) -> None:
    a = torch.zeros(shape)
    with pytest.raises(ValueError):  # psnr: tensor([nan]); ssim: torch's "non-positive groups" RuntimeError
        metric(a, a, 2.0)
