"""Pins what a hunt found running README.md's sections from "## Library" to the end, and docs/demo-model.md, as a
newcomer copies them:

- README.md, evaluation: "Its `-o`, like `cache`'s, may not be the `--data` folder or lie inside it (a rerun would
  read the report)", and "From Python, the same run (models as loaded, without the CLI's speed settings)".
  `klvae.latents.build_cache` refuses such a folder in the library, but `run_evaluation` writes the report among
  the photos, and a rerun scores the report's originals, reconstructions and error maps as photos (6 images
  became 24), overwriting the first report with those numbers;
- docs/demo-model.md: the shipped example's figures, as `klvae reconstruct` prints them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import klvae
from helpers import noise_folder, perturbed_vae
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.evaluation import EvalOptions, MetricNets, run_evaluation

ROOT = Path(__file__).resolve().parents[2]


def _models() -> dict[str, klvae.AutoencoderKL]:
    return {"mine": perturbed_vae("tiny-f8")}


def _no_nets() -> MetricNets:
    # PSNR and SSIM only: no VGG16 or Inception weights are looked for.
    return MetricNets(left_out={"lpips": "disabled", "rfid": "disabled"})


@pytest.mark.parametrize("inside", ["report", "."], ids=["subfolder", "the-data-folder"])
def test_run_evaluation_refuses_a_report_folder_inside_the_data(tmp_path: Path, inside: str) -> None:
    """run_evaluation(models, "photos/", "photos/report/") writes the report among the photos; a rerun scores it."""
    data = noise_folder(tmp_path / "photos", 2, hw=(16, 16))
    out = data / inside
    # now: no error; the report (index.html, images/*.png) lands in the data, and the next run scores its PNGs
    with pytest.raises(KlvaeError, match=r"inside|is the"):
        run_evaluation(_models(), data, out, EvalOptions(resolution=16), _no_nets())
    assert sorted(p.name for p in data.rglob("*")) == ["img0.png", "img1.png"]


def test_demo_model_md_figures_of_the_shipped_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/demo-model.md: `klvae reconstruct docs/images/fallen-leaf.png` gives 23.62 dB / SSIM 0.767."""
    assert main(["-q", "reconstruct", str(ROOT / "docs" / "images" / "fallen-leaf.png"), "-o",
                 str(tmp_path / "recon.png")]) == 0
    out = capsys.readouterr().out
    assert "PSNR 23.62 dB" in out and "SSIM 0.767" in out, out
    vae = klvae.AutoencoderKL.from_pretrained("demo")
    c = vae.config
    assert (list(c.block_out_channels), c.layers_per_block, c.norm_num_groups, c.latent_channels) == \
        ([16, 32, 64, 128], 1, 4, 4)
    assert c.scaling_factor == 0.18215 and c.shift_factor is None and vae.downsample_factor == 8
    assert round(vae.num_parameters()["total"] / 1e6, 1) == 2.7
