"""FLUX.2's small decoder (BFL's full_encoder_small_decoder.safetensors): a decoder with widths of its own.
Parity with diffusers' AutoencoderKLFlux2 both ways, inference from a BFL file's shapes, the preset, the refusals,
and exact tiling that follows the decoder's widths."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from klvae import AutoencoderKL, inference
from klvae.errors import WeightsError
from klvae.model.config import PRESETS
from klvae.weights import export_ldm
from oracles import SMALL, assert_parity, bfl_state_dict, flux2_diffusers, klvae_flux2

SMALL_DECODER = SMALL.replace(decoder_block_out_channels=(16, 32, 32, 48), norm_num_groups=16)


def test_small_decoder_parity_both_ways_through_diffusers_folders(tmp_path: Path) -> None:
    theirs = flux2_diffusers(SMALL_DECODER)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = AutoencoderKL.from_pretrained(tmp_path / "theirs")
    assert ours.config.decoder_block_out_channels == (16, 32, 32, 48)
    assert ours.decoder.conv_out.in_channels == 16 and ours.decoder.conv_in.out_channels == 48
    assert_parity(ours, theirs, SMALL_DECODER, "flux2 small decoder diffusers->klvae")
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["decoder_block_out_channels"] == [16, 32, 32,
                                                                                                       48]
    back = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "ours", low_cpu_mem_usage=False).eval()
    assert_parity(ours, back, SMALL_DECODER, "flux2 small decoder klvae->diffusers")


def test_small_decoder_is_inferred_from_a_bfl_file(tmp_path: Path) -> None:
    """BFL's full_encoder_small_decoder.safetensors comes without a config: the shapes give the decoder widths."""
    theirs = flux2_diffusers(SMALL_DECODER)
    save_file(bfl_state_dict(theirs), str(tmp_path / "full_encoder_small_decoder.safetensors"))
    ours = AutoencoderKL.from_pretrained(tmp_path / "full_encoder_small_decoder.safetensors")
    assert ours.config.decoder_block_out_channels == (16, 32, 32, 48)
    assert ours.config.block_out_channels == (32, 32, 64, 64) and ours.config.latent_patch_size == 2
    assert_parity(ours, theirs, SMALL_DECODER, "flux2 small decoder BFL file->klvae")


def test_the_small_decoder_preset_has_bfls_widths() -> None:
    cfg = PRESETS["flux2-small-decoder"]
    assert cfg.decoder_block_out_channels == (96, 192, 384, 384) and cfg.block_out_channels == (128, 256, 512, 512)
    with torch.device("meta"):
        full, small = AutoencoderKL("flux2").num_parameters(), AutoencoderKL(cfg).num_parameters()
    assert small["encoder"] == full["encoder"]
    assert 0.55 < small["decoder"] / full["decoder"] < 0.58  # 44 % fewer decoder parameters


def test_decoder_widths_equal_to_the_encoders_are_no_small_decoder() -> None:
    cfg = SMALL.replace(decoder_block_out_channels=list(SMALL.block_out_channels))
    assert cfg.decoder_block_out_channels is None and cfg == SMALL


@pytest.mark.parametrize(("widths", "message"), [
    ((16, 32, 48), "3 levels but block_out_channels 4"),
    ((16, 32, 32, 40), "not divisible by norm_num_groups=16"),
    ("abc", "decoder_block_out_channels must be a list"),
])
def test_bad_decoder_widths_are_refused(widths: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SMALL.replace(norm_num_groups=16, decoder_block_out_channels=widths)


def test_decoder_widths_without_patches_save_only_as_ldm(tmp_path: Path) -> None:
    """diffusers' AutoencoderKL has one set of widths: such a model goes to a single LDM-layout file instead."""
    cfg = PRESETS["tiny-f8"].replace(decoder_block_out_channels=(16, 16, 32, 32))
    vae = AutoencoderKL(cfg)
    with pytest.raises(WeightsError, match=r"decoder_block_out_channels cannot be expressed.*export_ldm"):
        vae.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    back = AutoencoderKL.from_pretrained(export_ldm(vae, tmp_path / "vae.safetensors"))
    assert back.config == cfg


def test_tiled_decode_of_a_small_decoder_equals_the_untiled() -> None:
    """The streamed GroupNorm statistics follow the decoder's own widths."""
    vae = klvae_flux2(stats=False, decoder_block_out_channels=(16, 32, 32, 48), norm_num_groups=16)
    z = torch.randn(1, SMALL.latent_channels, 12, 10, generator=torch.Generator().manual_seed(5))
    whole = inference.decode(vae, z)
    tiled = inference.decode(vae, z, tiling=inference.TileOptions(tile_size=32))
    assert whole.shape == (1, 3, 96, 80)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)


def test_a_model_without_statistics_round_trips_without_statistics(tmp_path: Path) -> None:
    """save_pretrained writes the identity BatchNorm (mean 0, var 1 - eps) for a config without statistics; read
    back, that is still no statistics, not 128 zeros and ones."""
    vae = klvae_flux2(stats=False)
    vae.save_pretrained(tmp_path / "d")
    back = AutoencoderKL.from_pretrained(tmp_path / "d")
    assert back.config == vae.config and back.config.latents_mean is None
