"""FLUX.2 in diffusers' and klvae's formats: a minimal AutoencoderKLFlux2 config.json takes diffusers' defaults, a
folder saved as .bin reloads its statistics exactly, a patch other than 2 is refused by FLUX.2's formats, and a
training config whose patched model cannot be exported is refused before training."""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import perturbed_vae
from klvae.cli.main import main
from klvae.errors import WeightsError
from klvae.weights import export_ldm
from klvae.weights.diffusers_config import config_from_diffusers


def _patched(p: int = 2, seed: int = 0) -> klvae.AutoencoderKL:
    """tiny-f8 with 8 latent channels in p x p patches and per-channel statistics that float32 cannot hold."""
    vae = perturbed_vae("tiny-f8", latent_channels=8, latent_patch_size=p, scaling_factor=1.0)
    g = torch.Generator().manual_seed(seed)
    n = 8 * p * p
    mean = torch.randn(n, generator=g, dtype=torch.float64) * 0.6
    std = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.3
    vae.config = vae.config.replace(latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))
    return vae


def test_a_minimal_autoencoder_kl_flux2_config_json_takes_diffusers_defaults() -> None:
    """diffusers fills every absent key of AutoencoderKLFlux2 from its own defaults (four levels of
    DownEncoderBlock2D / UpDecoderBlock2D); klvae takes block_out_channels from those defaults but the block types
    from AutoencoderKL's (one level), and refuses the config: 'down_block_types has 1 entries but ... 4'."""
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKLFlux2()
    cfg = config_from_diffusers({"_class_name": "AutoencoderKLFlux2"})
    assert cfg.block_out_channels == tuple(theirs.config.block_out_channels)
    assert cfg.latent_channels == theirs.config.latent_channels
    assert cfg.latent_patch_size == 2


def test_a_flux2_folder_saved_as_bin_reloads_its_statistics_exactly(tmp_path: Path) -> None:
    """For FLUX.2 config.json holds no statistics: only the bn.* buffers (float32) and the safetensors header
    (float64) do. With safe_serialization=False there is no header, so the reload rounds every statistic to
    float32: another config, another model_fingerprint (a scaled cache refuses to resume with it), while a .bin
    of any other model round-trips its factors exactly through config.json."""
    from klvae.latents.cache import model_fingerprint

    vae = _patched()
    vae.save_pretrained(tmp_path / "m", safe_serialization=False)
    back = klvae.AutoencoderKL.from_pretrained(tmp_path / "m")
    assert back.config.latents_mean == vae.config.latents_mean
    assert back.config.latents_std == vae.config.latents_std
    assert model_fingerprint(back) == model_fingerprint(vae)


def test_a_patch_other_than_2_is_refused_by_flux2s_formats(tmp_path: Path) -> None:
    """latent_patch_size may be 1..8, but BFL's layout (its AutoEncoder, ComfyUI), diffusers' Flux2Pipeline and
    klvae's reading of a bare BFL file assume 2x2 patches: export_ldm of a 4x4-patch model wrote a file that
    neither BFL's AutoEncoder nor klvae itself (without the klvae header) loads."""
    vae = _patched(p=4)
    for write in (lambda: export_ldm(vae, tmp_path / "ae.safetensors"), lambda: vae.save_pretrained(tmp_path / "d")):
        with pytest.raises(WeightsError, match="2x2 latent patches only, not 4x4"):
            write()
    assert not any(tmp_path.iterdir())


def test_a_training_config_whose_patched_model_cannot_be_exported_is_refused_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--set model.overrides.latent_patch_size=2` on a preset with a scaling_factor (tiny: 0.18215) is a valid
    config, but save_pretrained refuses it (FLUX.2's formats hold no factors): the run trains to max_steps and only
    then fails at the export, with the training lost. It must be refused before the first step."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    run = tmp_path / "run"
    sets = ["model.preset=tiny", "model.overrides.latent_patch_size=2", f"data.train={data}", "data.resolution=32",
            "data.batch_size=2", "data.num_workers=0", "train.max_steps=1", f"train.out_dir={run}",
            "train.device=cpu", "loss.perceptual_weight=0"]
    rc = main(["-q", "train", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2
    assert "scaling_factor" in err
    assert not (run / "checkpoints").exists(), "the run trained before finding that it cannot export"
