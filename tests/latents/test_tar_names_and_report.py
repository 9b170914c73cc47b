"""Review findings in the latents and evaluation code: each test failed before its fix."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import klvae
from klvae.evaluation import evaluate as evaluate_mod
from klvae.latents.sources import open_source


def _tar_with_one_png(path: Path, colour: tuple[int, int, int], member: str = "000000000.png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))


def test_tar_shards_of_one_name_in_two_folders_keep_every_image(tmp_path: Path) -> None:
    # Two img2dataset outputs side by side: the same shard and member names, other pictures.
    _tar_with_one_png(tmp_path / "laion" / "00000.tar", (255, 0, 0))
    _tar_with_one_png(tmp_path / "coyo" / "00000.tar", (0, 0, 255))
    for spec in (f"{tmp_path}/*/00000.tar", f"{tmp_path}/{{laion,coyo}}/00000.tar"):
        source = open_source(spec)
        assert len(source.ids) == 2, source.ids  # was one: the second shard's image replaced the first's
        assert {source.load(i).getpixel((0, 0)) for i in source.ids} == {(255, 0, 0), (0, 0, 255)}
    # Shards whose names differ keep their short ids (those of existing caches).
    _tar_with_one_png(tmp_path / "one" / "00001.tar", (0, 255, 0))
    assert open_source(f"{tmp_path}/one/00001.tar").ids == ["00001.tar:000000000.png"]
    assert open_source(f"{tmp_path}/{{laion/00000,one/00001}}.tar").ids == [
        "00000.tar:000000000.png", "00001.tar:000000000.png"]


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
