"""Pins what a second mutation audit of klvae's weight-format detection and config inference (weights.infer,
identify, diffusers_config, stored_dtype, latent_bn) found the other tests let through: the family an SD 2.x full
checkpoint's keys name, the factors of a latent channel count of no family, the GroupNorm groups guessed for widths
32 does not divide, spliced encoder/decoder levels, diffusers' config.json defaults, a bf16 file's stored dtype, a
zero latent variance, edm statistics that come half, and what a file's name may not be taken for. Each test names
the mutant it kills; weights come from random-init tiny models saved in the real formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import klvae
from helpers import one_line, perturbed_vae
from klvae.errors import WeightsError
from klvae.model.config import PRESETS, AutoencoderKLConfig
from klvae.weights import diffusers_to_ldm
from klvae.weights.diffusers_config import batch_norm_eps, config_from_diffusers
from klvae.weights.infer import infer_config, with_edm_stats
from klvae.weights.latent_bn import with_latent_stats
from klvae.weights.stored_dtype import main_dtype, stored_values


def _ldm_file(vae: klvae.AutoencoderKL, path: Path) -> Path:
    """`vae`'s weights in LDM layout (as SD's and FLUX's files spell them), with no config."""
    save_file({k: t.contiguous() for k, t in diffusers_to_ldm(vae.state_dict()).items()}, str(path))
    return path


# ---- infer.py: families ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hint", "family"), [("cond_stage_model.model.transformer.resblocks.0.x", "sd2"),
                                              ("cond_stage_model.transformer.text_model.x", "sd15")])
def test_an_sd2_full_checkpoint_loads_with_sd2s_config(hint: str, family: str, tmp_path: Path) -> None:
    """M: ("cond_stage_model.model.", "sd2") -> "sd15": an SD 2.x checkpoint got SD 1.x's 512 tiles, not 768."""
    full = {hint: torch.zeros(1), **{f"first_stage_model.{k}": t.contiguous()
                                     for k, t in diffusers_to_ldm(perturbed_vae("tiny").state_dict()).items()}}
    save_file(full, str(tmp_path / "model.safetensors"))
    cfg = klvae.AutoencoderKL.from_pretrained(tmp_path / "model.safetensors").config
    assert cfg.sample_size == PRESETS[family].sample_size
    assert (cfg.scaling_factor, cfg.shift_factor) == (0.18215, None)


def test_a_latent_channel_count_of_no_family_gets_no_factors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """M: the fallback AutoencoderKLConfig(scaling_factor=1.0) -> 0.18215: an 8-channel VAE of no known family was
    scaled by SD 1.x's factor (its latents, caches and diffusion models all off by 5.5x), not left as they are."""
    path = _ldm_file(perturbed_vae("tiny", latent_channels=8), tmp_path / "vae.safetensors")
    cfg = klvae.AutoencoderKL.from_pretrained(path).config
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.latents_mean, cfg.latent_patch_size) == (1.0, None, None, 1)
    assert "latent factors guessed (scaling 1.0, shift None)" in caplog.text


def test_playground_v2_is_not_taken_for_playground_v25(tmp_path: Path) -> None:
    """BUG: a lone VAE named after Playground v2's 512px repo (playground-v2-512px-base) reads its "v2-5" as v2.5
    and loads with v2.5's per-channel EDM statistics; Playground v2 is SDXL's VAE, scaled by a plain factor."""
    path = _ldm_file(perturbed_vae("tiny"), tmp_path / "playground-v2-512px-base-vae.safetensors")
    cfg = klvae.AutoencoderKL.from_pretrained(path).config
    assert cfg.latents_mean is None and cfg.latents_std is None


def test_half_of_the_edm_statistics_is_none(caplog: pytest.LogCaptureFixture) -> None:
    """M: `edm_mean not in extras or edm_std not in extras` -> `and`: edm_mean alone gave a KeyError traceback."""
    cfg = PRESETS["tiny"]
    assert with_edm_stats(cfg, {"edm_mean": torch.zeros(1, 4, 1, 1)}, "p.ckpt") is cfg
    assert with_edm_stats(cfg, {"edm_std": torch.ones(1, 4, 1, 1)}, "p.ckpt") is cfg


# ---- infer.py: GroupNorm groups ----------------------------------------------------------------------------------
def test_widths_that_16_divides_and_32_does_not_get_16_groups(tmp_path: Path) -> None:
    """M: groups tried (32, 16, 8, ...) -> (32, 8, ...): widths 32/48 trained with 16 groups loaded with 8, and
    every GroupNorm then normalised the wrong channels together (silently other images)."""
    vae = perturbed_vae("tiny", block_out_channels=(32, 48), norm_num_groups=16)
    back = klvae.AutoencoderKL.from_pretrained(_ldm_file(vae, tmp_path / "vae.safetensors"))
    assert back.config.norm_num_groups == 16
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back.encode_moments(x), vae.encode_moments(x))


def test_the_groups_guess_divides_the_decoders_own_widths_too() -> None:
    """M: _groups(widths + dec_widths) -> _groups(widths): a decoder 48 wide under a 32/64 encoder (as FLUX.2's
    small decoder has its own widths) was refused as 32 groups that 48 channels cannot hold."""
    vae = perturbed_vae("tiny", decoder_block_out_channels=(48, 64), norm_num_groups=16)
    cfg = infer_config(vae.state_dict())
    assert (cfg.norm_num_groups, cfg.decoder_block_out_channels) == (16, (48, 64))


def test_a_decoder_with_more_levels_than_the_encoder_is_refused_as_such() -> None:
    """M: `if dec_levels != levels` dropped: an encoder and a decoder of two VAEs spliced together were inferred as
    one config (decoder widths of its first levels only), refused later as a list of unexpected keys."""
    enc = {k: v for k, v in perturbed_vae("tiny").state_dict().items() if k.startswith("encoder.")}
    dec = {k: v for k, v in perturbed_vae("tiny-f8").state_dict().items() if not k.startswith("encoder.")}
    with pytest.raises(WeightsError) as e:
        infer_config(enc | dec)
    assert one_line(e) == "unsupported weights: 2 encoder levels but 4 decoder levels"


# ---- diffusers_config.py -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["AutoencoderKL", "AutoencoderKLFlux2"])
def test_a_config_json_that_names_only_its_class_means_diffusers_defaults(cls: str) -> None:
    """M: AutoencoderKLFlux2's layers_per_block default 2 -> 1: a config.json that leaves a key out means to klvae
    what it means to diffusers (its classes' own defaults, the oracle here), or weights that fit are refused."""
    import inspect

    import diffusers

    default = {k: p.default for k, p in inspect.signature(getattr(diffusers, cls).__init__).parameters.items()}
    cfg = config_from_diffusers({"_class_name": cls})
    assert (cfg.in_channels, cfg.out_channels, cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels,
            cfg.norm_num_groups, cfg.sample_size, cfg.use_quant_conv, cfg.use_post_quant_conv, cfg.attention) == \
        (default["in_channels"], default["out_channels"], tuple(default["block_out_channels"]),
         default["layers_per_block"], default["latent_channels"], default["norm_num_groups"],
         default["sample_size"], default["use_quant_conv"], default["use_post_quant_conv"],
         "vanilla" if default["mid_block_add_attention"] else "none")
    if cls == "AutoencoderKLFlux2":
        assert cfg.latent_patch_size == default["patch_size"][0] == default["patch_size"][1]
        assert cfg.decoder_block_out_channels == default["decoder_block_out_channels"]
        assert batch_norm_eps({}) == default["batch_norm_eps"]
    else:
        assert (cfg.scaling_factor, cfg.shift_factor, cfg.force_upcast, cfg.latent_patch_size) == \
            (default["scaling_factor"], default["shift_factor"], default["force_upcast"], 1)


# ---- stored_dtype.py ---------------------------------------------------------------------------------------------
def test_a_bf16_safetensors_file_is_counted_as_bf16(tmp_path: Path) -> None:
    """M: float codes ("F", "BF") -> ("F",) and most_common(1)[0] -> most_common()[-1]: FLUX's bf16 ae.safetensors
    (its latent BatchNorm's buffers in fp32, as BFL's FLUX.2 file has them) was said to be stored in fp32."""
    sd = {k: t.to(torch.bfloat16).contiguous() for k, t in perturbed_vae("tiny").state_dict().items()}
    save_file({**sd, "bn.running_mean": torch.zeros(16), "bn.running_var": torch.ones(16)},
              str(tmp_path / "ae.safetensors"))
    assert dict(stored_values(tmp_path / "ae.safetensors")) == {"bf16": sum(t.numel() for t in sd.values()),
                                                                "fp32": 32}
    assert main_dtype(tmp_path / "ae.safetensors") == "bf16"


# ---- latent_bn.py ------------------------------------------------------------------------------------------------
def test_a_latent_channel_of_zero_variance_takes_its_std_from_the_epsilon() -> None:
    """M: (var + eps > 0) -> (var > 0): a BatchNorm variance of 0 (a channel that never varies; std = sqrt(eps),
    as the BatchNorm itself divides) was refused as "a variance is negative"."""
    cfg = AutoencoderKLConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, latent_channels=1,
                              scaling_factor=1.0, latent_patch_size=2, force_upcast=False)
    back = with_latent_stats(cfg, (torch.tensor([0.5, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])), 1e-4,
                             "x")
    assert back.latents_std is not None and back.latents_std[0] == pytest.approx(1e-2, rel=1e-12)
