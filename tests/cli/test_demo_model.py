"""The embedded demo model: loads offline by name, is the CLI's default, and reconstructs a shipped image."""

from pathlib import Path

import pytest

import klvae
from klvae import inference
from klvae.cli.main import main
from klvae.evaluation.metrics import psnr
from klvae.images import load_image, pil_to_tensor
from klvae.weights.load import embedded_model_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "images" / "fallen-leaf.png"
# docs/demo-model.md gives the measured figure; the floor sits 1 dB under it.
PSNR_FLOOR = float((Path(__file__).resolve().parents[2] / "tests" / "demo_psnr_floor.txt").read_text())


def test_demo_loads_by_name_with_its_config() -> None:
    vae = klvae.AutoencoderKL.from_pretrained("demo")
    assert vae.config.latent_channels == 4 and vae.downsample_factor == 8
    size = sum(p.stat().st_size for p in embedded_model_dir("demo").iterdir())
    assert size <= 20 * 10**6


def test_demo_reconstructs_the_shipped_image_above_the_floor() -> None:
    vae = klvae.AutoencoderKL.from_pretrained("demo")
    x = pil_to_tensor(load_image(EXAMPLE))[None]
    y = inference.decode(vae, inference.encode(vae, x).mode(), size=tuple(x.shape[-2:]))
    assert psnr(x, y).item() >= PSNR_FLOOR


def test_commands_use_the_demo_model_without_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    assert main(["reconstruct", str(EXAMPLE), "-o", str(tmp_path / "r.png")]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert "built-in demo model" in caplog.text


def test_prepare_data_without_apt_get_uses_the_scikit_image_samples(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "prepare_data.py"
    env = {**os.environ, "PATH": str(tmp_path)}  # no apt-get: not Debian, or a machine without it
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "d"), "--max-side", "48"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # was a CalledProcessError traceback
    assert "cannot be fetched" in r.stderr and "scikit-image's 17 samples only" in r.stderr
    licences = json.loads((tmp_path / "d" / "licences.json").read_text())
    files = sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*.png"))
    n_val = sum(f.startswith("val/") for f in files)
    assert files == sorted(licences) and len(files) >= 12 and n_val >= 2  # of 17: a few may need a download
    assert f"wrote {len(files) - n_val} training and {n_val} validation images" in r.stderr
