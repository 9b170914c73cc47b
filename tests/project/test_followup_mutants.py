"""Kills mutants of the hunts since 7eb79f4 that no test caught: each test passes on the code and fails on one
small change to it (a boundary moved, a clause dropped, a check moved after the work it guards).

- `klvae noise --shift auto`: an image exactly one FLUX token tall is taken; one under a latent cell with a
  numeric shift is not refused for a token rule it does not use; the refusal gives the image's width x height.
- `klvae decode` of a 3-d FLUX.2 tensor read the wrong way names --unscaled, as a 4-d one does.
- An image of exactly one latent cell encodes.
- optimize_for_inference: a weight of exactly fp16's largest value casts; a refused cast leaves the model as it was.
- GroupNorm keeps an NHWC input's layout under no_grad and for an input that needs a gradient.
- A manifest line whose `dropped` is no shard name of its rank is a damaged cache, not a crash.
- A FLUX.2-like model without latent statistics builds a scaled cache.
- Resumes: an EMA run switched to export_ema=true exports the EMA; one left at export_ema=false keeps its export.
- variant=: a folder holding only the variant file (no config.json) loads; a hub file with a variant is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import klvae
from helpers import (
    SMALL_CACHE,
    assert_same_weights,
    cache_vae,
    fake_hub_cache,
    flux_like_models,
    noise_folder,
    one_error_line,
    perturbed_vae,
    tiny_train_cli,
)
from klvae import AutoencoderKL, WeightsError
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.inference import SpeedOptions, optimize_for_inference
from klvae.latents import build_cache
from klvae.model.blocks import GroupNorm
from klvae.training.checkpoint import load_checkpoint
from oracles import SMALL, klvae_flux2


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return flux_like_models(tmp_path_factory.mktemp("flux_models"))


def _png(path: Path, h: int, w: int) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _noise(img: Path, model: Path, tmp: Path, *opts: str) -> int:
    return main(["noise", str(img), "-o", str(tmp / "sheet.png"), "--steps", "500", "--model", str(model), *opts])


# ---- klvae noise --shift auto -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_noise_shift_auto_takes_an_image_exactly_one_token_tall(family: str, tmp_path: Path,
                                                                flux_models: dict[str, Path]) -> None:
    """A 4-pixel-high image (one FLUX token of the tiny model) is refused as smaller than one token."""
    img = _png(tmp_path / "img.png", 4, 8)
    assert _noise(img, flux_models[family], tmp_path, "--schedule", "flow", "--shift", "auto") == 0


def test_noise_shift_auto_refusal_gives_the_images_width_by_height(tmp_path: Path, flux_models: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The refusal of a 3x56 image says 2x56 pixels (height x width), where every other size is width x height."""
    img = _png(tmp_path / "img.png", 3, 56)
    assert _noise(img, flux_models["flux"], tmp_path, "--schedule", "flow", "--shift", "auto") == 2
    assert "(56x2 pixels in whole latent cells)" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("opts", [("--schedule", "flow", "--shift", "3"), ()], ids=["flow-shift-3", "ddpm"])
def test_noise_of_an_image_under_one_latent_cell_without_shift_auto_is_not_refused(
        opts: tuple[str, ...], tmp_path: Path, flux_models: dict[str, Path]) -> None:
    """A 1-pixel-high image noised with a numeric shift (or DDPM) is refused by FLUX's token rule it never uses."""
    img = _png(tmp_path / "img.png", 1, 8)
    assert _noise(img, flux_models["flux"], tmp_path, *opts) == 0


# ---- klvae decode of a plain 3-d FLUX.2 tensor --------------------------------------------------------------------

@pytest.mark.parametrize(("channels", "unscaled"), [(SMALL.latent_channels, False), (SMALL.latent_channels * 4, True)])
def test_a_3d_plain_flux2_tensor_read_the_wrong_way_names_unscaled(
        channels: int, unscaled: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A [C, h, w] tensor (no batch axis) read the wrong way gets the vague 'latents of another VAE?' instead."""
    model = klvae_flux2().save_pretrained(tmp_path / "flux2")
    side = 4 if unscaled else 8
    save_file({"latents": torch.randn(channels, side, side)}, str(tmp_path / "z.safetensors"))
    argv = ["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "out"), "--model", str(model)]
    assert main(argv + (["--unscaled"] if unscaled else [])) == 2
    assert ("drop --unscaled" if unscaled else "add --unscaled") in one_error_line(capsys.readouterr().err)


# ---- encoding one latent cell -------------------------------------------------------------------------------------

def test_an_image_of_exactly_one_latent_cell_encodes() -> None:
    """encode_moments of an f x f image (one latent cell) is refused as 'smaller than one latent cell'."""
    vae = perturbed_vae()
    f = vae.config.downsample_factor
    assert vae.encode_moments(torch.zeros(1, 3, f, f)).shape == (1, 2 * vae.config.latent_channels, 1, 1)


# ---- optimize_for_inference's fp16 cast ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", [65504.0, 65519.0])
def test_a_weight_that_rounds_to_fp16s_largest_value_casts_to_fp16(value: float) -> None:
    """A weight at 65504 (finite in fp16: a model saved in fp16 may hold it), or one that fp16 rounds down to it,
    is refused as beyond fp16's range."""
    vae = perturbed_vae()
    with torch.no_grad():
        vae.decoder.conv_in.bias[0] = value
    optimize_for_inference(vae, torch.float16, SpeedOptions(cast_weights=True))
    assert vae.decoder.conv_in.bias.dtype == torch.float16 and bool(torch.isfinite(vae.decoder.conv_in.bias).all())


def test_a_refused_fp16_cast_leaves_the_model_as_it_was() -> None:
    """After the refusal the caller's model is already fp16 with an inf weight: its fp32 rerun decodes NaN."""
    vae = perturbed_vae()
    with torch.no_grad():
        vae.decoder.conv_in.bias[0] = 1e5
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(KlvaeError, match=r"decoder\.conv_in\.bias"):
        optimize_for_inference(vae, torch.float16, SpeedOptions(cast_weights=True))
    after = vae.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


# ---- GroupNorm's layout -------------------------------------------------------------------------------------------

def test_group_norm_keeps_an_nhwc_inputs_layout_where_no_workaround_is_needed() -> None:
    """Under no_grad (all inference) or for an input needing a gradient, the NHWC map comes back NCHW."""
    norm = GroupNorm(8, 4, 1e-6)
    x = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert norm(x).is_contiguous(memory_format=torch.channels_last)
    assert norm(x.clone().requires_grad_(True)).is_contiguous(memory_format=torch.channels_last)


# ---- the cache's manifest -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropped", ["evil.safetensors", 5, "rank001-00000.safetensors"])
def test_a_manifest_line_dropping_no_shard_name_of_its_rank_is_a_damaged_cache(dropped: object,
                                                                                tmp_path: Path) -> None:
    """A `dropped` that is not a shard name of the rank crashes the rerun (IndexError, TypeError) or is taken."""
    vae, data, out = cache_vae(), noise_folder(tmp_path / "data", 2, hw=(32, 32)), tmp_path / "out"
    build_cache(vae, data, out, **SMALL_CACHE)
    with (out / "manifest-rank000.jsonl").open("a") as f:
        f.write(json.dumps({"shard": None, "rows": [], "failed": [], "dropped": dropped}) + "\n")
    with pytest.raises(KlvaeError, match="is not a cache manifest record"):
        build_cache(vae, data, out, **SMALL_CACHE)


def test_a_flux2_like_model_without_latent_statistics_builds_a_scaled_cache(tmp_path: Path) -> None:
    """A 2x2-patch model with no latents_mean/std crashes in the factors' fingerprint (torch.tensor(None))."""
    vae = perturbed_vae("tiny", latent_patch_size=2)
    assert vae.config.latents_std is None
    data = noise_folder(tmp_path / "data", 1, hw=(16, 16))
    build_cache(vae, data, tmp_path / "out", resolution=16, store="scaled", num_workers=0, batch_size=1)
    assert (tmp_path / "out" / "index.json").is_file()


# ---- resumes and train.export_ema ---------------------------------------------------------------------------------

_EMA_RUN = ("train.max_steps=2", "train.ema_decay=0.9", "optim.lr=1e-2")


def test_a_finished_run_resumed_with_export_ema_on_exports_the_ema(tmp_path: Path) -> None:
    """A finished EMA run trained with export_ema=false, resumed with it on, leaves the trained weights in final/."""
    noise_folder(tmp_path / "images", 4, hw=(16, 16))
    assert main(tiny_train_cli(tmp_path, *_EMA_RUN, "train.export_ema=false")) == 0
    assert main([*tiny_train_cli(tmp_path, *_EMA_RUN, "train.export_ema=true"), "--resume"]) == 0
    ema = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.pt")["ema"]
    final = klvae.AutoencoderKL.from_pretrained(tmp_path / "run" / "final").state_dict()
    assert all(torch.equal(v, ema[f"module.{k}"]) for k, v in final.items())
    assert any(not torch.equal(v, ema[f"module.{k}"]) for k, v in
               load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.pt")["vae"].items())


def test_a_finished_ema_run_with_export_ema_off_resumed_unchanged_keeps_its_export(tmp_path: Path) -> None:
    """A finished run with an EMA and export_ema=false, resumed as it was, rewrites final/ on every resume."""
    noise_folder(tmp_path / "images", 4, hw=(16, 16))
    argv = tiny_train_cli(tmp_path, *_EMA_RUN, "train.export_ema=false")
    assert main(argv) == 0
    final = tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors"
    before = final.stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert final.stat().st_mtime_ns == before


# ---- from_pretrained(variant=...) ---------------------------------------------------------------------------------

def test_a_folder_holding_only_a_variant_file_loads_as_without_the_variant(tmp_path: Path) -> None:
    """A folder of diffusion_pytorch_model.fp16.safetensors alone (no config.json) fails for want of config.json,
    though the same file without the variant loads with its config told from its weights."""
    model = perturbed_vae(seed=4)
    folder = model.save_pretrained(tmp_path / "vae")
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    (folder / "config.json").unlink()
    assert_same_weights(AutoencoderKL.from_pretrained(folder, variant="fp16"), model)


@pytest.mark.parametrize("name", ["org/files/vae/diffusion_pytorch_model.safetensors",
                                  "https://huggingface.co/org/files/blob/main/vae/diffusion_pytorch_model.safetensors"])
def test_a_variant_with_one_hub_file_is_refused(name: str, offline_cache: Path) -> None:
    """from_pretrained("org/name/file.safetensors", variant="fp16") loads that one file, the variant ignored."""
    fake_hub_cache(offline_cache, "org/files", perturbed_vae(), "vae")
    with pytest.raises(WeightsError, match=r"variant 'fp16' given, but .* names no diffusers folder or hub repo"):
        AutoencoderKL.from_pretrained(name, variant="fp16")
