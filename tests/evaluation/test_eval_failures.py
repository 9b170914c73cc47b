"""`klvae eval` when something fails: the Inception download checked against the SHA-256 prefix in its name, a model
failing on some images (or on all) in a side-by-side run, the --model a load error names; and the README's Python
evaluation snippet, run offline."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import block_metric_downloads, noise_png
from klvae import inference
from klvae.cli import main as cli_main
from klvae.errors import KlvaeError
from klvae.evaluation import EvalOptions, MetricNets, run_evaluation
from klvae.evaluation.fid import FIDReference
from klvae.nets import inception as inception_mod
from klvae.nets import pretrained as pretrained_mod
from klvae.posterior import DiagonalGaussian

RES = 16
IDS = ["a.png", "b.png", "black.png", "c.png", "d.png"]  # the order open_source lists them in


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Four noise images and an all-black one, which the failing models below cannot reconstruct."""
    d = tmp_path / "data"
    d.mkdir()
    for i, name in enumerate(n for n in IDS if n != "black.png"):
        (d / name).write_bytes(noise_png(i))
    Image.new("RGB", (24, 16)).save(d / "black.png")
    return d


def tiny(seed: int, **changes: object) -> klvae.AutoencoderKL:
    torch.manual_seed(seed)
    return klvae.AutoencoderKL(klvae.get_preset("tiny").replace(**changes)).eval()


def nan_latents_for_black_images(vae: klvae.AutoencoderKL) -> klvae.AutoencoderKL:
    """`vae`, whose encoder gives NaN moments for an all-black image: deterministic, whatever the batch."""
    real = vae.encode_moments

    def encode_moments(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        black = (x.flatten(1).amax(1) < -0.99).view(-1, 1, 1, 1).to(x.device)
        return real(x, *args, **kwargs).masked_fill(black, math.nan)

    vae.encode_moments = encode_moments  # type: ignore[method-assign]
    return vae


def nan_everywhere(vae: klvae.AutoencoderKL) -> klvae.AutoencoderKL:
    """`vae`, whose decoder gives NaN pixels for every image."""
    real = vae.decode
    vae.decode = lambda z, *a, **k: real(z, *a, **k) * math.nan  # type: ignore[method-assign]
    return vae


class RecordingFeatures(torch.nn.Module):
    """A stand-in for the FID Inception: 48 pooled colour features per image, each batch's kept in `calls`."""

    def __init__(self, calls: list[torch.Tensor]) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 48]."""
        self.calls.append(torch.nn.functional.adaptive_avg_pool2d(x * self.scale, 4).flatten(1).double())
        return self.calls[-1]


def test_the_inception_download_is_checked_against_the_sha256_prefix_in_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "served.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(2)}, served)  # a valid weights file, but not the pinned one
    monkeypatch.setattr(inception_mod, "INCEPTION_URL", served.as_uri())  # urllib serves file:// as it would https
    with pytest.raises(KlvaeError) as err:
        inception_mod.resolve_inception_weights()
    msg = str(err.value)
    assert "\n" not in msg and "SHA-256" in msg and "6726825d" in msg and "--inception-weights" in msg, msg
    assert str(pretrained_mod.hub_checkpoint(inception_mod.INCEPTION_FILE)) in msg  # where a good copy goes
    cache = pretrained_mod.hub_checkpoint(inception_mod.INCEPTION_FILE).parent
    assert not cache.exists() or not any(cache.iterdir())  # nothing kept
    # The same file under a name that carries its own hash is the pinned file: downloaded and read.
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    monkeypatch.setattr(inception_mod, "INCEPTION_SHA256", digest)
    assert list(inception_mod.resolve_inception_weights()) == ["Conv2d_1a_3x3.conv.weight"]


def test_a_model_failing_on_one_image_is_reported_and_the_others_are_scored(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block_metric_downloads(monkeypatch, tmp_path)
    feats: list[torch.Tensor] = []
    nets = MetricNets(inception=RecordingFeatures(feats))  # the run's FID bookkeeping, without the Inception's cost
    models = {"good": tiny(0), "bad": nan_latents_for_black_images(tiny(1)), "broken": nan_everywhere(tiny(2))}
    opts = EvalOptions(resolution=RES, batch_size=4, examples=2)
    summary = run_evaluation(models, data_dir, tmp_path / "report", opts, nets, torch.device("cpu"))

    good, bad, broken = (summary["models"][m] for m in models)
    assert summary["images"]["evaluated"] == 5 and good["failed"] == 0 and good["n"] == 5
    assert bad["failed"] == 1 and bad["failed_items"] == [{"id": "black.png", "error": bad["failed_items"][0]["error"]}]
    assert "NaN" in bad["failed_items"][0]["error"] and bad["n"] == bad["psnr"]["n"] == bad["ssim"]["n"] == 4
    assert broken["failed"] == 5 and broken["n"] == 0 and broken["psnr"]["mean"] is None
    assert broken["rfid"]["value"] is None
    with open(tmp_path / "report" / "metrics.csv", newline="") as f:
        rows = {(r["id"], r["model"]): r for r in csv.DictReader(f)}
    assert [r["id"] for r in rows.values()][::3] == IDS
    assert math.isnan(float(rows["black.png", "bad"]["psnr"])) and math.isnan(float(rows["black.png", "bad"]["ssim"]))
    bad_psnr = [float(rows[i, "bad"]["psnr"]) for i in IDS if i != "black.png"]
    assert all(math.isfinite(float(rows[i, "good"][k])) for i in IDS for k in ("psnr", "ssim"))
    assert bad["psnr"]["mean"] == pytest.approx(np.mean(bad_psnr), abs=1e-6)
    # rFID: each model's features against those of the originals of the images it reconstructed.
    # Per batch (4 images, then 1): the originals, good's and bad's reconstructions; broken has none to measure.
    assert [len(f) for f in feats] == [4, 4, 3, 1, 1, 1]
    orig, per_model = torch.cat(feats[0::3]), {"good": feats[1::3], "bad": feats[2::3]}
    assert summary["models"]["good"]["rfid"]["value"] == FIDReference(orig).distance(torch.cat(per_model["good"]))
    kept = torch.tensor([i != "black.png" for i in IDS])
    expected_bad = FIDReference(orig[kept]).distance(torch.cat(per_model["bad"]))
    assert bad["rfid"]["value"] == pytest.approx(expected_bad, rel=1e-12) and bad["rfid"]["n"] == 4
    page = (tmp_path / "report" / "index.html").read_text()
    assert "bad failed on 1 of 5 images (black.png: " in page and "broken failed on 5 of 5 images" in page
    # broken scored no image: its summary cells are blanks, never a PSNR of ∞ (which reads as a perfect score).
    table = page[page.index('<table class="summary">'):page.index("</table>")]
    cells = {row.split("</th>")[0]: row.split("<td>")[1:] for row in table.split("<tr><th>")[1:]}
    assert [c.removesuffix("</tr>").removesuffix("</td>") for c in cells["PSNR (dB) ↑"]][2] == "—", cells
    assert [c.removesuffix("</tr>").removesuffix("</td>") for c in cells["SSIM ↑"]][2] == "—", cells
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["models"]["bad"]["failed"] == 1


def test_the_cli_finishes_a_run_where_one_model_fails_on_an_image_and_exits_1(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    block_metric_downloads(monkeypatch, tmp_path)
    tiny(0).save_pretrained(tmp_path / "good")
    tiny(1, scaling_factor=0.5).save_pretrained(tmp_path / "bad")  # the factor only tells the two apart here
    real_encode = inference.encode

    def encode(vae: klvae.AutoencoderKL, x: torch.Tensor, *args: object, **kwargs: object) -> DiagonalGaussian:
        post = real_encode(vae, x, *args, **kwargs)
        if vae.config.scaling_factor != 0.5:
            return post
        black = (x.flatten(1).amax(1) < -0.99).view(-1, 1, 1, 1)
        return DiagonalGaussian(post.parameters.masked_fill(black, math.nan))

    monkeypatch.setattr(inference, "encode", encode)
    capsys.readouterr()
    rc = cli_main.main(["eval", "--model", str(tmp_path / "good"), "--model", str(tmp_path / "bad"), "--data",
                        str(data_dir), "-o", str(tmp_path / "r"), "--resolution", str(RES), "--no-lpips", "--no-fid"])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert f"{tmp_path / 'bad'} failed on 1 of 5 images (black.png: latents contain NaN" in out
    assert f"WARNING: {tmp_path / 'bad'} failed on black.png" in err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [m["n"] for m in summary["models"].values()] == [5, 4]


def test_a_model_that_fails_to_load_is_named_among_several(data_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("one", "two"):
        tiny(0).save_pretrained(tmp_path / name)
    capsys.readouterr()
    rc = cli_main.main(["eval", "--model", str(tmp_path / "one"), "--model", str(tmp_path / "two"), "--config",
                        "tiny", "--config", "sdxl", "--data", str(data_dir), "-o", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith(("INFO", "WARNING"))]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"klvae: error: --model {tmp_path / 'two'}: "), err
    assert "do not fit config 'sdxl'" in err[0] and not (tmp_path / "r").exists()


def test_the_readme_python_evaluation_snippet_runs_offline(data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from klvae.evaluation import build_metric_nets

    block_metric_downloads(monkeypatch, tmp_path)
    models = {"mine": tiny(0), "other": tiny(1)}
    nets = build_metric_nets(models["mine"].device, fid=False)  # downloads refused: LPIPS left out
    summary = run_evaluation(models, str(data_dir), tmp_path / "report", EvalOptions(resolution=RES), nets)
    assert summary["models"]["other"]["psnr"]["n"] == 5 and set(summary["left_out"]) == {"lpips", "rfid"}
    assert "vgg16-397923af.pth" in summary["left_out"]["lpips"] and summary["device"] == "cpu"
    # Nets and device left out: the weights looked for (and missing here), and the models' device.
    summary = run_evaluation(models, data_dir, tmp_path / "report2", EvalOptions(resolution=RES))
    assert "6726825d" in summary["left_out"]["rfid"] and summary["device"] == "cpu"
    assert (tmp_path / "report2" / "index.html").is_file()
