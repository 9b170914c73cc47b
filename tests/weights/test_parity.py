"""Numerical parity with diffusers' AutoencoderKL through every weight path: diffusers folders both ways, LDM files,
full SD checkpoints, legacy attention names and Lightning .ckpt files. Run with -s to see the max abs diffs."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from klvae import AutoencoderKL
from klvae.model.config import PRESETS
from klvae.weights import config_to_diffusers, diffusers_to_ldm, export_ldm
from oracles import SMALL_F8, assert_parity, diffusers_vae, randomize


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
def test_full_width_parity_both_ways(name: str, tmp_path: Path) -> None:
    cfg = PRESETS[name]
    theirs = diffusers_vae(cfg)
    # diffusers -> klvae: diffusers writes the folder, we read it.
    theirs.save_pretrained(tmp_path / "by_diffusers")
    ours = AutoencoderKL.from_pretrained(tmp_path / "by_diffusers")
    assert ours.config == cfg and not ours.training
    mine = assert_parity(ours, theirs, cfg, f"{name} diffusers->klvae")
    # klvae -> diffusers: we write the folder, diffusers reads it (factors included).
    ours.save_pretrained(tmp_path / "by_klvae")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "by_klvae", low_cpu_mem_usage=False).eval()
    assert back.config.scaling_factor == cfg.scaling_factor
    assert back.config.shift_factor == cfg.shift_factor
    assert back.config.use_quant_conv == cfg.use_quant_conv
    assert_parity(mine, back, cfg, f"{name} klvae->diffusers")


@pytest.mark.parametrize("name", ["small", "sd15"])
def test_bit_for_bit_at_batch_3(name: str) -> None:
    """The same weights give identical bits, encoder and decoder, with several images in a batch (fp32, CPU)."""
    # At batch 1 the order of the mid-block attention's residual add does not show; at batch 3 the layout it
    # leaves picks other convolution kernels, so a different order differs by ~1e-5.
    cfg = SMALL_F8 if name == "small" else PRESETS[name]
    theirs = diffusers_vae(cfg)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, cfg.in_channels, 40, 56, generator=g) * 2 - 1
    z = torch.randn(3, cfg.latent_channels, 5, 7, generator=g)
    with torch.no_grad():
        assert torch.equal(ours.encode_moments(x), theirs.encode(x).latent_dist.parameters)
        assert torch.equal(ours.decode(z), theirs.decode(z).sample)


@pytest.fixture(scope="module", params=["tiny", "sd15", "sdxl"])
def same_weights(request: pytest.FixtureRequest) -> tuple[AutoencoderKL, nn.Module]:
    """klvae and diffusers models of a preset with the same random weights, built once per preset."""
    theirs = diffusers_vae(PRESETS[request.param])
    ours = AutoencoderKL(PRESETS[request.param]).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bit_for_bit_whatever_the_input_layout(same_weights: tuple[AutoencoderKL, nn.Module], layout: str,
                                               batch: int) -> None:
    """Equal bits with channels-last images and latents too, and when decoding encode(x).mode(): at batch 2+
    that mode is a channels-last view of the moments. The mid-block attention must normalise the [B, C, H*W] view
    as diffusers does; its 4-D map took the CPU's channels-last GroupNorm kernel and differed by ~1e-5."""
    ours, theirs = same_weights
    cfg = ours.config
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(batch, cfg.in_channels, 64, 48, generator=g) * 2 - 1).to(memory_format=fmt)
    z = torch.randn(batch, cfg.latent_channels, 64 // cfg.downsample_factor, 48 // cfg.downsample_factor,
                    generator=g).to(memory_format=fmt)
    with torch.no_grad():
        moments = ours.encode_moments(x)
        assert torch.equal(moments, theirs.encode(x).latent_dist.parameters)
        mode = ours.encode(x).mode()  # the user's decode(encode(x).mode()), in whatever layout encode leaves
        assert torch.equal(ours.decode(mode), theirs.decode(mode).sample)
        assert torch.equal(ours.decode(z), theirs.decode(z).sample)


def test_ldm_keys_agree_with_diffusers_own_converter() -> None:
    import diffusers.loaders.single_file_utils as single_file
    theirs = diffusers_vae(SMALL_F8)
    sd = theirs.state_dict()
    converted = single_file.convert_ldm_vae_checkpoint(diffusers_to_ldm(sd), config_to_diffusers(SMALL_F8))
    assert set(converted) == set(sd)
    for k, v in sd.items():
        assert torch.equal(converted[k], v), k


@pytest.mark.parametrize("attention", ["vanilla", "linear", "none"])
def test_ldm_file_round_trip(attention: str, tmp_path: Path) -> None:
    cfg = SMALL_F8.replace(attention=attention)
    torch.manual_seed(0)
    ours = AutoencoderKL(cfg).eval()
    randomize(ours)
    path = export_ldm(ours, tmp_path / "vae.safetensors")
    back = AutoencoderKL.from_pretrained(path, config=cfg)
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def ldm_weights(theirs: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in diffusers_to_ldm(theirs.state_dict()).items()}


def test_full_sd_checkpoint_with_prefix_and_other_models(tmp_path: Path) -> None:
    theirs = diffusers_vae(SMALL_F8)
    sd = {f"first_stage_model.{k}": v for k, v in ldm_weights(theirs).items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    save_file(sd, str(tmp_path / "sd-full.safetensors"))
    ours = AutoencoderKL.from_pretrained(tmp_path / "sd-full.safetensors")  # config from the shapes
    assert ours.config.replace(sample_size=64, force_upcast=False) == SMALL_F8.replace(scaling_factor=0.18215)
    assert_parity(ours, theirs, SMALL_F8, "full SD checkpoint (LDM, first_stage_model.)")


def test_full_checkpoint_family_picks_the_factors(tmp_path: Path) -> None:
    theirs = diffusers_vae(SMALL_F8)
    sd = {f"first_stage_model.{k}": v for k, v in ldm_weights(theirs).items()}
    sd["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    save_file(sd, str(tmp_path / "sdxl-full.safetensors"))
    ours = AutoencoderKL.from_pretrained(tmp_path / "sdxl-full.safetensors")
    assert ours.config.scaling_factor == PRESETS["sdxl"].scaling_factor


def test_legacy_attention_names(tmp_path: Path) -> None:
    theirs = diffusers_vae(SMALL_F8)
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in theirs.state_dict().items():
        for new, old in names.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if old != "proj_attn" and v.ndim == 2:
                    v = v[:, :, None, None]  # some legacy files kept the 1x1-conv shape
        legacy[k] = v.clone()
    assert any(".query.weight" in k for k in legacy)
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    ours = AutoencoderKL.from_pretrained(tmp_path / "legacy.safetensors", config=SMALL_F8)
    assert_parity(ours, theirs, SMALL_F8, "legacy attention keys")


def test_lightning_ckpt_with_training_keys(tmp_path: Path) -> None:
    theirs = diffusers_vae(SMALL_F8)
    sd = ldm_weights(theirs)
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": sd, "global_step": 1000, "epoch": 3}, path)
    ours = AutoencoderKL.from_pretrained(path, config=SMALL_F8)
    assert_parity(ours, theirs, SMALL_F8, "LDM .ckpt (state_dict, loss.*)")
