"""User-trial findings: `info` describes a preset without weights; `reconstruct --json`."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_error_line
from klvae.cli.main import main
from klvae.model.autoencoder import AutoencoderKL

NO_WEIGHTS = "preset, no weights (random init)"


def _counts(preset: str) -> dict[str, int]:
    with torch.device("meta"):
        return AutoencoderKL(preset).num_parameters()


def test_info_describes_a_preset_without_released_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "model: tiny" in text and NO_WEIGHTS in text
    assert "downsample factor: 2" in text
    assert f"parameters: {_counts('tiny')['total']:,}" in text


def test_info_json_of_a_preset_without_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "tiny-f8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "tiny-f8" and d["weights"] == NO_WEIGHTS
    assert d["downsample_factor"] == 8 and d["config"]["block_out_channels"] == [32, 32, 64, 64]
    assert d["parameters"] == _counts("tiny-f8")


def test_info_config_alone_describes_the_preset_offline(
    offline_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # flux2's weights do not fit the demo model's; without --model only the preset is meant.
    assert main(["info", "--config", "flux2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "flux2" and d["weights"] == NO_WEIGHTS
    assert d["config"]["latent_channels"] == 32 and d["config"]["latent_patch_size"] == 2
    assert d["parameters"] == _counts("flux2")
    assert main(["info", "--config", "sdxl"]) == 0
    text = capsys.readouterr().out
    assert "model: sdxl" in text and NO_WEIGHTS in text and "scaling_factor: 0.13025" in text
    assert not any(offline_cache.rglob("*.safetensors"))  # nothing fetched


def test_info_model_with_released_weights_still_loads_them(
    offline_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--model", "sdxl"]) != 0
    assert "HF_HUB_OFFLINE" in one_error_line(capsys.readouterr().err)


def _image(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) * 0.7 + rng.uniform(0, 70, (h, w, 3))
    Image.fromarray(base.astype(np.uint8)).save(path)
    return path


def test_reconstruct_json_matches_the_human_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / "small.png", 48, 40)
    assert main(["reconstruct", str(img), "-o", str(tmp_path / "a.png")]) == 0
    line = capsys.readouterr().out
    m = re.search(r"PSNR ([\d.]+) dB  SSIM ([\d.]+)", line)
    assert m, line
    out = tmp_path / "b.png"
    assert main(["reconstruct", str(img), "-o", str(out), "--json"]) == 0
    text = capsys.readouterr().out.strip()
    d = json.loads(text)  # one JSON object, nothing else
    assert set(d) == {"input", "output", "psnr", "ssim", "size", "model"}
    assert d["input"] == str(img) and d["output"] == str(out) and out.is_file()
    assert d["size"] == [48, 40] and d["model"] == "demo"
    assert f"{d['psnr']:.2f}" == m.group(1) and f"{d['ssim']:.4f}" == m.group(2)


def test_reconstruct_json_ssim_is_null_under_its_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / "tiny.png", 8, 8)
    assert main(["reconstruct", str(img), "-o", str(tmp_path / "r.png"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ssim"] is None and d["size"] == [8, 8] and isinstance(d["psnr"], float)
