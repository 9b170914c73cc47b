"""Pins what a mutation audit of the evaluation report, `klvae info` and `klvae eval` found untested: json_safe on
tuples, metrics.csv's exact text (8 significant digits, "\\n" line ends), the error map rounded to the nearest level,
the PSNR histogram's bars (place, height, colour, bin titles), mean lines, axis labels, a one-dB span for equal
whole-number values and its note when nothing is finite; the summary table's labels, dots, images row and its "—"
cells (no entry, no rFID, a non-finite SSIM or NaN PSNR, no std); the example rows' captions, outlines, failed cells
and alt texts, the example files and their error maps; the page's meta line, skipped-image note (first 10), failure
and left-out notes, rFID note, error-map scale, per-model sections; summary.json's indent; which stale PNGs a rerun
removes; `info`'s indented config lines, flux2's downsample factor and a mix of three stored dtypes; and eval's
single-model load error, a named weights file that is a folder and the expanded `~` in its message."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_error_line, rgb_image
from klvae.cli import codec_info
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.evaluation.evaluate import EvalOptions, EvalResult, build_summary
from klvae.evaluation.report import (
    error_heatmap,
    example_files,
    example_rows,
    histogram_svg,
    json_safe,
    metrics_csv,
    render_html,
    summary_table,
    write_report,
)

IDS = ["0.png", "1<.png", "2.png"]


def _result() -> EvalResult:
    """Two models ("a" and "b<") on three images; "b<" failed on the last one."""
    res = EvalResult(models=["a", "b<"], ids=list(IDS), metrics=["psnr", "ssim", "lpips"])
    res.values = {
        "a": {"psnr": [30.123456789, 25.5, 20.25], "ssim": [0.5, 0.25, 0.125], "lpips": [0.1234, 0.2, 0.3]},
        "b<": {"psnr": [31.0, 29.0, math.nan], "ssim": [0.75, 0.625, math.nan], "lpips": [0.05, 0.06, math.nan]},
    }
    res.ok = {"a": [True, True, True], "b<": [True, True, False]}
    res.failed = {"b<": [{"id": "2.png", "error": "NaN output"}]}
    res.summaries = {m: {k: {"mean": 1.0, "std": 0.5, "n": 3} for k in ("psnr", "ssim", "lpips")} for m in res.models}
    res.found = res.available = 16
    res.skipped = [{"id": f"bad{k}.png", "error": "cannot decode"} for k in range(13)]
    res.left_out = {"rfid": "disabled"}
    return res


def _examples() -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Originals and reconstructions of images 0 and 2 (none of "b<" for 2, which it failed on)."""
    g = torch.Generator().manual_seed(0)
    pics = {i: torch.rand(3, 8, 8, generator=g) * 2 - 1 for i in range(3)}
    return {"0.png": (pics[0], {"a": pics[1], "b<": pics[2]}), "2.png": (pics[1], {"a": pics[0]})}


# ---------------------------------------------------------------- tables


def test_json_safe_turns_tuples_into_lists_of_finite_values() -> None:
    assert json_safe({"t": (1.0, math.inf, (math.nan, 2))}) == {"t": [1.0, None, [None, 2]]}


def test_metrics_csv_is_exact_text_with_8_significant_digits() -> None:
    res = _result()
    res.metrics = ["psnr", "ssim"]
    lines = metrics_csv(res).split("\n")
    assert lines[:3] == ["id,model,psnr,ssim", "0.png,a,30.123457,0.5", "0.png,b<,31,0.75"]
    assert lines[-2:] == ["2.png,b<,nan,nan", ""]  # "\n" line ends, never "\r\n"


def test_error_heatmap_rounds_each_channel_to_the_nearest_level() -> None:
    x = torch.zeros(3, 1, 2)
    # 0.6 of the way from the ramp's first colour (0, 0, 4) to its second (40, 11, 84): (24, 6.6, 52).
    r = x + 0.6 * 32 / 7 / 127.5
    assert np.asarray(error_heatmap(x, r)).reshape(-1, 3).tolist() == [[24, 7, 52]] * 2


def test_summary_table_labels_dots_images_row_and_empty_cells() -> None:
    a = {
        "n": 3,
        "psnr": {"mean": 30.0, "std": None, "n": 1},
        "ssim": {"mean": math.inf, "std": math.nan, "n": 3},
        "rfid": {"value": None, "n": 3},
    }
    b = {
        "n": 2,
        "psnr": {"mean": math.nan, "std": math.nan, "n": 2},
        "ssim": {"mean": 0.5, "std": 0.0, "n": 2},
        "lpips": {"mean": 0.25, "std": 0.0, "n": 2},
        "rfid": {"value": 1.0, "n": 2},
    }
    table = summary_table({"metrics": ["psnr", "ssim", "lpips", "rfid"], "models": {"a": a, "b": b}})
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert rows[0].endswith('<span class="dot" style="background:#f28e2b"></span>b</th>')
    assert rows[1:] == [
        "<th>PSNR (dB) ↑</th><td>30.00 ± —</td><td>—</td>",  # no std; a NaN mean is no ∞
        "<th>SSIM ↑</th><td>—</td><td>0.5000 ± 0.0000</td>",  # an infinite SSIM is no ∞ either
        "<th>LPIPS ↓</th><td>—</td><td>0.2500 ± 0.0000</td>",  # a model without the metric
        "<th>rFID ↓</th><td>—</td><td>1.000 <small>(n=2)</small></td>",  # an rFID without a value
        "<th>images</th><td>3</td><td>2</td>",
    ]


# ---------------------------------------------------------------- histogram


def test_histogram_bars_mean_lines_and_axis_labels() -> None:
    svg = histogram_svg({"a": [19.5, 19.7, 23.9], "b": [22.5]}, bins=5)  # 19..24 dB, one dB a bin
    rects = re.findall(r"<rect [^>]*><title>[^<]*</title></rect>", svg)
    assert rects == [
        '<rect x="40.0" y="15.0" width="121.0" height="185.0" fill="#4e79a7" fill-opacity="0.6">'
        "<title>a: 2 image(s), 19.00–20.00 dB</title></rect>",
        '<rect x="528.0" y="107.5" width="121.0" height="92.5" fill="#4e79a7" fill-opacity="0.6">'
        "<title>a: 1 image(s), 23.00–24.00 dB</title></rect>",
        '<rect x="406.0" y="107.5" width="121.0" height="92.5" fill="#f28e2b" fill-opacity="0.6">'
        "<title>b: 1 image(s), 22.00–23.00 dB</title></rect>",
    ]
    means = re.findall(r'<line x1="([\d.]+)" y1="200" x2="[\d.]+" y2="15" stroke-dasharray="4 3" stroke="([^"]+)"', svg)
    assert means == [("288.1", "#4e79a7"), ("467.0", "#f28e2b")]
    ticks = re.findall(r'<text x="([\d.]+)" y="216" text-anchor="middle">([\d.]+)</text>', svg)
    assert ticks == [("40.0", "19.0"), ("192.5", "20.2"), ("345.0", "21.5"), ("497.5", "22.8"), ("650.0", "24.0")]
    assert '<text x="34" y="19.0" text-anchor="end">2</text>' in svg  # the tallest bar's count


def test_histogram_of_equal_whole_number_values_spans_one_db() -> None:
    svg = histogram_svg({"m": [30.0, 30.0]}, bins=4)
    assert "<title>m: 2 image(s), 30.00–30.25 dB</title>" in svg
    assert re.findall(r'text-anchor="middle">([\d.]+)</text>', svg) == ["30.0", "30.2", "30.5", "30.8", "31.0"]


def test_histogram_without_a_finite_value_says_so() -> None:
    assert histogram_svg({"a": [math.inf], "b": [math.nan]}) == "<p>no finite PSNR values</p>"


# ---------------------------------------------------------------- examples


def test_example_rows_captions_outlines_and_failed_cells() -> None:
    res = _result()
    files = {
        0: {"original": "o0", "recon0": "r00", "error0": "e00", "recon1": "r01", "error1": "e01"},
        2: {"original": "o2", "recon0": "r20", "error0": "e20"},
    }
    html = example_rows(res, "b<", [0, 1, 2], files)  # image 1 has no files: no row
    rows = html.split('<div class="row">')[1:]
    assert [re.search(r'<div class="id">(.*?)</div>', r)[1] for r in rows] == ["0.png", "2.png"]
    assert (
        '<a href="r00"><img src="r00" loading="lazy" alt="a reconstruction"></a>'
        "<figcaption><b>a</b><br>30.12 dB · SSIM 0.500 · LPIPS 0.123</figcaption>"
    ) in rows[0]
    assert (
        '<img src="r01" loading="lazy" alt="b&lt; reconstruction" style="outline:3px solid #f28e2b">' in rows[0]
    )  # the model this section ranks by, in its colour; the other without
    assert rows[0].count("outline") == 1 and "<figcaption>|error| · b&lt;</figcaption>" in rows[0]
    assert "<figure><figcaption><b>b&lt;</b><br>failed on this image</figcaption></figure>" in rows[1]
    one = _result()
    one.models = ["a"]
    assert "outline" not in example_rows(one, "a", [0], files)  # one model: nothing to tell apart


def test_example_files_name_each_picture_and_draw_error_maps_of_original_and_reconstruction() -> None:
    res, examples = _result(), _examples()
    files, images = example_files(res, examples)
    assert files == {
        0: {
            "original": "images/00000_original.png",
            "recon0": "images/00000_m0_recon.png",
            "error0": "images/00000_m0_error.png",
            "recon1": "images/00000_m1_recon.png",
            "error1": "images/00000_m1_error.png",
        },
        2: {
            "original": "images/00002_original.png",
            "recon0": "images/00002_m0_recon.png",
            "error0": "images/00002_m0_error.png",
        },
    }
    drawn = dict(images)["images/00000_m1_error.png"]
    original, recs = examples["0.png"]
    assert callable(drawn) and drawn().tobytes() == error_heatmap(original, recs["b<"]).tobytes()


# ---------------------------------------------------------------- the page and the folder


def _summary(res: EvalResult) -> dict:
    return build_summary(res, "data<", EvalOptions(crop="none", resolution=None), torch.device("cpu"))


def test_page_notes_and_sections(tmp_path: Path) -> None:
    res = _result()
    summary = _summary(res)
    summary["left_out"]["lpips"] = "weights unavailable"
    picks = {"a": {"worst": [2], "best": [0]}, "b<": {"worst": [0], "best": []}}
    files, _ = example_files(res, _examples())
    page = render_html(summary, res, picks, files)
    assert "3 images evaluated of 16 · crop none (full images) · cpu float32" in page
    skipped = ", ".join(f"bad{k}.png" for k in range(10))
    assert f"<p class='note'>13 unreadable image(s) skipped: {skipped}</p>" in page
    notes = re.findall(r"<p class='note'>(.*?)</p>", page)
    assert notes[1:] == [
        "b&lt; failed on 1 of 3 images (2.png: NaN output); its scores are over the other 2",
        "rFID left out: disabled",
        "LPIPS left out: weights unavailable",
    ]  # "a" failed on none
    assert "rFID over" not in page  # no rFID measured, no note on it
    assert "0 to ≥32/255, the same scale on every map" in page
    sections = re.findall(r"<h2>(.*?)</h2>", page)
    assert sections[2:] == ["a: worst 1 by PSNR", "a: best 1 by PSNR", "b&lt;: worst 1 by PSNR"]
    # Each section outlines the model it ranks by: "a" in its blue, "b<" in its orange.
    a_part, b_part = page.split("<h2>a: worst")[1].split("<h2>b&lt;: worst")
    assert "solid #4e79a7" in a_part and "solid #f28e2b" not in a_part and "solid #f28e2b" in b_part


def test_page_meta_names_the_crop_resolution() -> None:
    res = _result()
    summary = build_summary(res, "d", EvalOptions(resolution=64), torch.device("cpu"))
    assert "crop center at 64² · cpu" in render_html(summary, res, {}, {})


def test_report_files_and_the_stale_pictures_a_rerun_removes(tmp_path: Path) -> None:
    res = _result()
    summary = _summary(res)
    images = tmp_path / "images"
    images.mkdir()
    theirs = ["1_original.png", "00001_m0_thumb.png", "00001_original.png.png", "123456_original.png"]
    for name in [*theirs, "00007_m12_error.png", "00001_m3_recon.png"]:  # a user's files, then stale examples
        (images / name).write_bytes(b"x")
    write_report(tmp_path, res, summary, {"a": {"worst": [0], "best": [2]}}, _examples())
    written = sorted(p.name for p in images.iterdir())
    assert written == sorted(
        [
            *theirs,
            "00000_original.png",
            "00000_m0_recon.png",
            "00000_m0_error.png",
            "00000_m1_recon.png",
            "00000_m1_error.png",
            "00002_original.png",
            "00002_m0_recon.png",
            "00002_m0_error.png",
        ]
    )
    text = (tmp_path / "summary.json").read_text()
    assert text.startswith('{\n  "created": ') and text.endswith("\n}\n")
    assert json.loads(text)["models"]["b<"]["failed"] == 1


# ---------------------------------------------------------------- info


def test_info_indents_the_config_and_gives_flux2_its_downsample_factor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "info", "--config", "flux2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["model: flux2", "weights: preset, no weights (random init)"]
    assert "  latent_patch_size: 2" in lines and "downsample factor: 8" in lines  # not the 16 of a patch
    assert main(["-q", "info", "--config", "flux2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["downsample_factor"] == 8


def test_stored_dtype_lists_each_minority(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(codec_info, "stored_values", lambda path: Counter({"fp16": 900, "fp32": 90, "bf16": 10}))
    want = "fp16 (fp32 for 9 % of the values, bf16 for 1 % of the values)"
    assert codec_info.stored_dtype(tmp_path / "w.safetensors") == want


# ---------------------------------------------------------------- eval


def test_a_single_models_load_error_is_passed_on_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from klvae.model.autoencoder import AutoencoderKL

    def load(spec: str, **kw: object) -> object:
        raise KlvaeError("weights do not fit the config")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", load)
    rgb_image(tmp_path / "data" / "a.png")
    args = ["-q", "eval", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "r"), "--device", "cpu"]
    assert main([*args, "-m", "bad"]) == 2
    assert one_error_line(capsys.readouterr().err) == "klvae: error: weights do not fit the config"


def test_a_named_weights_folder_is_refused_before_the_models_load_and_home_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from klvae.model.autoencoder import AutoencoderKL

    loaded: list[str] = []
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", lambda spec, **kw: loaded.append(spec))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "vgg").mkdir()
    rgb_image(tmp_path / "data" / "a.png")
    args = ["-q", "eval", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "r"), "--device", "cpu"]
    assert main([*args, "--lpips-vgg", str(tmp_path / "vgg")]) == 2
    assert one_error_line(capsys.readouterr().err) == f"klvae: error: --lpips-vgg {tmp_path / 'vgg'}: no such file"
    assert main([*args, "--inception-weights", "~/gone.pth"]) == 2
    want = f"klvae: error: --inception-weights {tmp_path / 'gone.pth'}: no such file"
    assert one_error_line(capsys.readouterr().err) == want
    assert loaded == []  # refused before any model loads
