"""`klvae info`: a preset described without weights, and the dtype the weights are stored in (every weights format,
mixed dtypes, a full checkpoint's VAE); `klvae reconstruct --json`."""

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import one_error_line, perturbed_vae
from klvae.cli.main import main
from klvae.model.autoencoder import AutoencoderKL
from klvae.weights.save import export_ldm

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


def _info(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["-q", "info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _full_checkpoint(vae: torch.nn.Module, path: Path, tmp_path: Path) -> Path:
    """A full SD checkpoint: the VAE in fp16 under first_stage_model., beside a UNet tensor in fp32."""
    export_ldm(copy.deepcopy(vae).half(), tmp_path / "vae_ldm.safetensors")
    sd = {f"first_stage_model.{k}": v for k, v in load_file(tmp_path / "vae_ldm.safetensors").items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    save_file(sd, path)
    return path


def test_info_names_the_stored_dtype_of_every_weights_format(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    vae = perturbed_vae("tiny")
    copy.deepcopy(vae).half().save_pretrained(tmp_path / "fp16")  # a diffusers folder saved in fp16
    copy.deepcopy(vae).save_pretrained(tmp_path / "bin", safe_serialization=False)
    export_ldm(copy.deepcopy(vae).to(torch.bfloat16), tmp_path / "bf16.safetensors")
    torch.save({"state_dict": {k: v.half() for k, v in vae.state_dict().items()}}, tmp_path / "fp16.ckpt")
    full = _full_checkpoint(vae, tmp_path / "sd.safetensors", tmp_path)
    cases = [(tmp_path / "fp16", "fp16"), (tmp_path / "bin", "fp32"), (tmp_path / "bf16.safetensors", "bf16"),
             (tmp_path / "fp16.ckpt", "fp16"), (full, "fp16")]  # full: the VAE's dtype, not the UNet's
    for model, want in cases:
        d = _info(capsys, "--model", str(model), "--config", "tiny")
        assert d["stored_dtype"] == want, model
        assert Path(d["weights"]).is_file()
    # Text: one line, beside the file it comes from.
    assert main(["-q", "info", "--model", str(tmp_path / "fp16")]) == 0
    out = capsys.readouterr().out
    assert "stored dtype: fp16\n" in out and "diffusion_pytorch_model.safetensors" in out


def test_info_names_a_mix_of_dtypes_and_none_for_a_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy.deepcopy(perturbed_vae("tiny")).half().save_pretrained(tmp_path / "mixed")
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"].float()  # one tensor kept in fp32
    save_file(sd, weights, metadata={"format": "pt"})
    share = 100 * sd["encoder.conv_in.weight"].numel() / sum(t.numel() for t in sd.values())
    assert _info(capsys, "--model", str(folder))["stored_dtype"] == f"fp16 (fp32 for {share:.2g} % of the values)"
    assert _info(capsys, "--model", "tiny")["stored_dtype"] is None
    assert main(["-q", "info", "--config", "sdxl"]) == 0
    assert "stored dtype: none (no weights)" in capsys.readouterr().out


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
