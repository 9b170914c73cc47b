"""Pins of the model, posterior and compat details that the other model tests leave loose.

- compat: a one-element generator list draws as diffusers' randn_tensor does; slicing splits a batch of two;
  float64 passes are not rounded through float32; a half-precision result that only float32 holds comes back in
  float32; configs diffusers cannot express carry its mid-block flag and leave out the file-only keys;
  from_pretrained reads the subfolder; too few generators for a batch are a ValueError; gradient checkpointing
  is off until asked and switches off again.
- blocks: every GroupNorm uses the config's eps; the folded upsampler equals nearest-then-conv; attention on a
  channels-last batch is diffusers' bit for bit.
- autoencoder: its posterior is stochastic and forward samples it; parameter counts include the quant convs;
  from_single_file refuses folders.
- presets: the sample sizes, quant convs, pixel multiples and hub locations of the released VAEs.
- config: the cap on blocks per level is inclusive; to_dict is plain JSON (lists, not tuples).
- latent normalisation: boolean factors, empty statistics and latents without a channel axis are ValueErrors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersPosterior

from helpers import perturbed_vae
from klvae import AutoencoderKL
from klvae.compat import DiagonalGaussianDistribution, DiffusersVAE, as_diffusers, diffusers_config
from klvae.model.blocks import Attention, GroupNorm, Upsample
from klvae.model.config import PRESET_HUB_IDS, PRESETS, AutoencoderKLConfig
from klvae.model.latent_norm import LatentNorm
from oracles import SMALL, random_stats


def _moments(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 8, 3, 5, generator=torch.Generator().manual_seed(seed))


def _latents(b: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=dtype)


def test_a_one_generator_list_draws_the_whole_batch_as_that_generator() -> None:
    # diffusers' randn_tensor takes [g] as g itself, whatever the batch size.
    m = _moments()
    ours = DiagonalGaussianDistribution(m).sample([torch.Generator().manual_seed(5)])
    theirs = DiffusersPosterior(m).sample(generator=[torch.Generator().manual_seed(5)])
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, DiagonalGaussianDistribution(m).sample(torch.Generator().manual_seed(5)))


def test_fewer_generators_than_images_are_refused() -> None:
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        DiagonalGaussianDistribution(_moments(3)).sample(gens)


def test_gradient_checkpointing_switches_on_and_off() -> None:
    ours = as_diffusers(AutoencoderKL(PRESETS["tiny"]))
    vae = ours.klvae_model
    assert not vae.encoder.gradient_checkpointing and not vae.decoder.gradient_checkpointing  # off until asked
    ours.enable_gradient_checkpointing()
    assert vae.encoder.gradient_checkpointing and vae.decoder.gradient_checkpointing
    ours.disable_gradient_checkpointing()
    assert not vae.encoder.gradient_checkpointing and not vae.decoder.gradient_checkpointing


def test_slicing_splits_a_batch_of_two() -> None:
    ours = as_diffusers(perturbed_vae("tiny"))
    sizes: list[int] = []
    ours.decoder.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    ours.enable_slicing()
    with torch.no_grad():
        ours.decode(_latents(2))
    assert sizes == [1, 1]


def test_float64_weights_decode_in_float64_without_rounding() -> None:
    vae = perturbed_vae("tiny").double()
    ours, z = as_diffusers(vae), _latents(dtype=torch.float64)
    with torch.no_grad():
        out, reference = ours.decode(z).sample, vae.decode(z)
    assert out.dtype == torch.float64 and torch.equal(out, reference)


def test_a_half_precision_result_beyond_float16_comes_back_in_float32(caplog: pytest.LogCaptureFixture) -> None:
    vae = perturbed_vae("tiny")
    with torch.no_grad():  # outputs around 6.4e4 +- 2e3: some past float16's 65504, all finite in float32
        vae.decoder.conv_out.weight.mul_(2e3)
        vae.decoder.conv_out.bias.fill_(6.4e4)
    ours, z = as_diffusers(vae), _latents()
    with torch.no_grad():
        reference = ours.decode(z).sample
        assert reference.abs().max() > 65504
        ours.half()
        with caplog.at_level(logging.WARNING):
            out = ours.decode(z).sample
    assert "rerunning this step in fp32" in caplog.text
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=1e-2, atol=0)


@pytest.mark.parametrize(("attention", "added"), [("none", False), ("linear", True), ("vanilla", True)])
def test_a_config_diffusers_cannot_express_says_whether_the_mid_block_has_attention(attention: str,
                                                                                      added: bool) -> None:
    # norm_eps 1e-5 has no diffusers class: the config keeps klvae's names, plus diffusers' flag for the mid block.
    config = diffusers_config(PRESETS["tiny"].replace(attention=attention, norm_eps=1e-5))
    assert "_class_name" not in config and config["attention"] == attention
    assert config["mid_block_add_attention"] is added


def test_the_flux2_config_leaves_out_the_files_float64_statistics() -> None:
    mean, std = random_stats()
    vae = AutoencoderKL(SMALL.replace(latents_mean=mean, latents_std=std))
    config = as_diffusers(vae).config
    assert config["_class_name"] == "AutoencoderKLFlux2"
    assert not [k for k in config if k.startswith("_klvae_latents")]


def test_every_group_norm_uses_the_configs_eps() -> None:
    x = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(4))
    norm = GroupNorm(8, 2, 0.5)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(5))
    mean, var = x.view(2, 2, -1).mean(-1), x.view(2, 2, -1).var(-1, unbiased=False)
    ref = (x.view(2, 2, -1) - mean[..., None]) / (var[..., None] + 0.5).sqrt()
    ref = ref.view_as(x) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), ref)
    vae = AutoencoderKL(PRESETS["tiny"].replace(norm_eps=1e-3))
    eps = {m.eps for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert eps == {1e-3}


@pytest.mark.parametrize("field", ["scaling_factor", "shift_factor"])
def test_a_boolean_factor_is_refused(field: str) -> None:
    # bool is a numbers.Real: True would silently read as 1.0 (a YAML "yes", say).
    with pytest.raises(ValueError, match=field):
        LatentNorm(**{field: True})
    with pytest.raises(ValueError, match=field):
        AutoencoderKLConfig(**{field: True})


def test_empty_latent_statistics_are_refused() -> None:
    with pytest.raises(ValueError, match="latents_mean must be a non-empty list"):
        LatentNorm(latents_mean=[], latents_std=[])


def test_scaling_latents_without_a_channel_axis_is_a_value_error() -> None:
    vae = AutoencoderKL(PRESETS["tiny"])
    for f in (vae.scale_latents, vae.unscale_latents):
        with pytest.raises(ValueError, match="4 channels"):
            f(torch.zeros(4, 6))
    per_channel = LatentNorm(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    with pytest.raises(ValueError, match="4 channels"):
        per_channel.scale(torch.zeros(4, 6))


def test_the_folded_upsampler_equals_nearest_then_conv() -> None:
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        plain = up(x)
        up.fold = True
        folded = up(x)
    assert folded.shape == (2, 6, 10, 8)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)


def test_attention_on_a_channels_last_batch_is_diffusers_bit_for_bit() -> None:
    torch.manual_seed(0)
    ours = Attention(64, 8, 1e-6).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs = DiffusersAttention(64, heads=1, dim_head=64, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=8,
                                residual_connection=True, bias=True, upcast_softmax=True,
                                _from_deprecated_attn_block=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 6, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_from_pretrained_reads_the_subfolder(tmp_path: Path) -> None:
    vae = perturbed_vae("tiny")
    vae.save_pretrained(tmp_path / "part")
    loaded = DiffusersVAE.from_pretrained(tmp_path, subfolder="part")
    z = _latents()
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, vae.decode(z))


def _image(b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_the_autoencoders_posterior_is_stochastic_and_forward_samples_it() -> None:
    vae, x = perturbed_vae("tiny"), _image()
    with torch.no_grad():
        posterior = vae.encode(x)
        eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(6))
        assert not posterior.deterministic and (posterior.kl() > 0).all()
        assert torch.equal(posterior.sample(torch.Generator().manual_seed(6)), posterior.mean + posterior.std * eps)
        sampled, _ = vae(x, generator=torch.Generator().manual_seed(6))
        assert torch.equal(sampled, vae.decode(posterior.mean + posterior.std * eps))
        assert not torch.equal(sampled, vae(x, sample_posterior=False)[0])


def test_num_parameters_counts_each_side_with_its_quant_conv() -> None:
    vae = AutoencoderKL(PRESETS["tiny"])

    def count(*mods: torch.nn.Module) -> int:
        return sum(p.numel() for m in mods for p in m.parameters())

    n = vae.num_parameters()
    assert n["encoder"] == count(vae.encoder, vae.quant_conv)
    assert n["decoder"] == count(vae.decoder, vae.post_quant_conv)
    assert n["total"] == count(vae)


def test_from_single_file_refuses_a_folder(tmp_path: Path) -> None:
    AutoencoderKL(PRESETS["tiny"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="from_single_file takes one weights file"):
        AutoencoderKL.from_single_file(tmp_path)


def test_presets_have_the_released_vaes_architecture_flags_and_sizes() -> None:
    # Figures from each model's vae/config.json (SD 2.x: sample_size 768; SD3/FLUX.1: no quant convs).
    assert {n: PRESETS[n].sample_size for n in ("sd15", "sd2", "sdxl", "sd3", "flux")} == \
        {"sd15": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024}
    for name in ("sd3", "flux"):
        assert not PRESETS[name].use_quant_conv and not PRESETS[name].use_post_quant_conv
    assert PRESETS["sdxl"].use_quant_conv and PRESETS["flux2"].use_quant_conv


def test_the_pixel_multiple_includes_the_latent_patch() -> None:
    assert (PRESETS["sd15"].size_multiple, PRESETS["flux"].size_multiple, PRESETS["flux2"].size_multiple) == (8, 8, 16)
    assert PRESETS["tiny"].replace(latent_patch_size=3).size_multiple == 6


def test_preset_hub_locations() -> None:
    # sd-vae-ft-mse and sdxl-vae hold the VAE at the repo root; the pipelines' repos in vae/.
    assert PRESET_HUB_IDS == {
        "sd15": ("stabilityai/sd-vae-ft-mse", None),
        "sd2": ("stabilityai/stable-diffusion-2-1", "vae"),
        "sdxl": ("stabilityai/sdxl-vae", None),
        "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "vae"),
        "flux": ("black-forest-labs/FLUX.1-dev", "vae"),
        "flux2": ("black-forest-labs/FLUX.2-dev", "vae"),
        "playground25": ("playgroundai/playground-v2.5-1024px-aesthetic", "vae"),
    }


def test_the_block_cap_takes_64_blocks_per_level_and_refuses_65() -> None:
    small = {"block_out_channels": (8,), "norm_num_groups": 4}
    assert AutoencoderKLConfig(layers_per_block=64, **small).layers_per_block == 64
    with pytest.raises(ValueError, match="at most 16 levels of 64"):
        AutoencoderKLConfig(layers_per_block=65, **small)


def test_to_dict_is_unchanged_by_a_json_round_trip() -> None:
    for name in ("playground25", "flux2-small-decoder"):
        d = PRESETS[name].to_dict()
        assert json.loads(json.dumps(d)) == d
        assert AutoencoderKLConfig.from_dict(d) == PRESETS[name]
