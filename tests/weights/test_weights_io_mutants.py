"""Pins what a mutation audit of the weights-format files (weights.save, weights.diffusers_config,
weights.latent_bn) found the other tests let through: what save_pretrained and export_ldm write and return,
config.json's defaults, type checks and FLUX.2 fields, and the latent BatchNorm's checks (weights.hub's pins are in
test_hub_mutants.py). Each test names the mutant(s) it kills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import klvae
from helpers import one_line, perturbed_vae
from klvae.errors import WeightsError
from klvae.model.config import AutoencoderKLConfig
from klvae.weights import diffusers_to_ldm, export_ldm
from klvae.weights.diffusers_config import (
    FLUX2_CLASS,
    batch_norm_eps,
    config_from_diffusers,
    config_to_diffusers,
    read_config_json,
)
from klvae.weights.latent_bn import (
    BFL_EPS,
    COUNT,
    check_flux2_format,
    latent_bn_tensors,
    pop_latent_bn,
    with_latent_stats,
)
from klvae.weights.latent_bn import MEAN as MEAN_KEY
from klvae.weights.latent_bn import VAR as VAR_KEY
from klvae.weights.read import CONFIG_METADATA
from klvae.weights.save import save_pretrained

# ---- weights.save -------------------------------------------------------------------------------------------------

# One latent channel in 2x2 patches (FLUX.2's layout), small enough to build in milliseconds.
FLUX2_TINY = AutoencoderKLConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, latent_channels=1,
                                 scaling_factor=1.0, latent_patch_size=2, sample_size=64, force_upcast=False,
                                 latents_mean=(0.1, -0.2, 0.3, -0.4), latents_std=(1.5, 2.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def tiny() -> klvae.AutoencoderKL:
    return perturbed_vae("tiny")


def test_save_pretrained_writes_each_format_and_removes_the_other(tiny: klvae.AutoencoderKL, tmp_path: Path) -> None:
    """S04/S05 (the other format's file kept), S06 (config.json without its final newline), S10 (no path returned),
    S12 (.bin written as safetensors), S02 (no config in the safetensors header)."""
    from safetensors import safe_open

    assert tiny.save_pretrained(tmp_path) == tmp_path
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert AutoencoderKLConfig.from_dict(json.loads(f.metadata()[CONFIG_METADATA])) == tiny.config
    text = (tmp_path / "config.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == config_to_diffusers(tiny.config)
    assert save_pretrained(tiny, tmp_path, safe_serialization=False) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    sd = torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=True)
    assert sd.keys() == tiny.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in tiny.state_dict().items())
    save_pretrained(tiny, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_saving_a_module_without_a_config_says_so(tmp_path: Path) -> None:
    """S03 (an AttributeError instead), S08 (a config of another type gets past export_ldm's check)."""
    with pytest.raises(WeightsError, match=r"^Conv2d has no config to save$"):
        save_pretrained(torch.nn.Conv2d(1, 1, 1), tmp_path)
    module = torch.nn.Conv2d(1, 1, 1)
    module.config = {"latent_channels": 4}
    with pytest.raises(WeightsError, match=r"^Conv2d has no AutoencoderKLConfig to export with$"):
        export_ldm(module, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_export_ldm_takes_any_case_of_the_suffix_and_returns_the_path(tiny: klvae.AutoencoderKL,
                                                                      tmp_path: Path) -> None:
    """S07 (.SAFETENSORS refused), S11 (no path returned), S09 (diffusers' key names written)."""
    from safetensors.torch import load_file

    path = tmp_path / "ae.SAFETENSORS"
    assert export_ldm(tiny, path) == path
    sd = load_file(path)
    assert sd.keys() == diffusers_to_ldm(tiny.state_dict()).keys()
    assert "encoder.mid.attn_1.q.weight" in sd and "decoder.conv_out.weight" in sd
    with pytest.raises(WeightsError, match=r"^export_ldm writes \.safetensors, not ae\.ckpt$"):
        export_ldm(tiny, tmp_path / "ae.ckpt")


def test_flux2_files_carry_the_latent_batchnorm(tmp_path: Path) -> None:
    """S01/S13: a model with 2x2 latent patches gets bn.* buffers (its statistics, var = std^2 - 1e-4) in both
    formats."""
    from safetensors.torch import load_file

    vae = klvae.AutoencoderKL(FLUX2_TINY)
    std = torch.tensor(FLUX2_TINY.latents_std, dtype=torch.float64)
    for sd in (load_file(export_ldm(vae, tmp_path / "ae.safetensors")),
               load_file(save_pretrained(vae, tmp_path / "d") / "diffusion_pytorch_model.safetensors")):
        assert torch.equal(sd["bn.running_mean"], torch.tensor(FLUX2_TINY.latents_mean))
        assert torch.equal(sd["bn.running_var"], (std.square() - 1e-4).float())
        assert sd["bn.num_batches_tracked"].dtype == torch.int64


ONE_LEVEL = {"down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"]}

# ---- weights.diffusers_config -------------------------------------------------------------------------------------

def test_a_config_json_that_leaves_keys_out_means_diffusers_defaults() -> None:
    """D01-D07, D41: the defaults are diffusers' own (its AutoencoderKL() is the oracle), the class AutoencoderKL."""
    from diffusers import AutoencoderKL as DiffusersVAE

    oracle = json.loads(json.dumps(dict(DiffusersVAE().config)))  # as its config.json has it: lists
    cfg = config_from_diffusers({})
    assert cfg == config_from_diffusers(oracle)
    assert (cfg.in_channels, cfg.out_channels, cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels,
            cfg.norm_num_groups, cfg.sample_size, cfg.scaling_factor, cfg.force_upcast, cfg.attention,
            cfg.latent_patch_size, cfg.norm_eps) == (3, 3, (64,), 1, 4, 32, 32, 0.18215, True, "vanilla", 1, 1e-6)


def test_a_flux2_config_json_that_leaves_keys_out_means_its_defaults() -> None:
    """D39/D40 (other FLUX.2 defaults), D43 (another batch_norm_eps default), D18 (its scaling_factor kept)."""
    cfg = config_from_diffusers({"_class_name": FLUX2_CLASS, "block_out_channels": [32], "norm_num_groups": 8,
                                 "layers_per_block": 1, "scaling_factor": 0.5, **ONE_LEVEL})
    assert (cfg.latent_channels, cfg.sample_size, cfg.latent_patch_size, cfg.scaling_factor, cfg.shift_factor) == \
        (32, 1024, 2, 1.0, None)
    assert batch_norm_eps({}) == 1e-4 and batch_norm_eps({"batch_norm_eps": 0}) == 0.0


@pytest.mark.parametrize(("changes", "message"), [
    ({"down_block_types": "DownEncoderBlock2D"}, "down_block_types must be a list, got 'DownEncoderBlock2D'"),
    ({"up_block_types": ["AttnUpDecoderBlock2D"]}, "up_block_types ['AttnUpDecoderBlock2D'] is unsupported"),
    ({"down_block_types": ["DownEncoderBlock2D"] * 2}, "down_block_types has 2 entries but block_out_channels has 1"),
    ({"layers_per_block": True}, "layers_per_block must be an integer, got True"),
    ({"latent_channels": 1.5}, "latent_channels must be an integer, got 1.5"),
    ({"mid_block_add_attention": "no"}, "mid_block_add_attention must be true or false, got 'no'"),
    ({"block_out_channels": []}, "block_out_channels must be a non-empty list of integers, got []"),
    ({"sample_size": []}, "sample_size must be an integer, got []"),
    ({"act_fn": "relu"}, "act_fn 'relu' is unsupported (only 'silu')"),
    ({"_class_name": "UNet2DModel"}, "config.json describes a UNet2DModel, not an AutoencoderKL"),
])
def test_each_bad_config_json_field_is_named(changes: dict, message: str) -> None:
    """D08-D10, D12-D14, D23, D24, D42."""
    with pytest.raises(WeightsError) as e:
        config_from_diffusers({"block_out_channels": [32], "norm_num_groups": 8, **changes})
    assert message in one_line(e)


def test_json_numbers_and_lists_that_mean_integers_are_taken() -> None:
    """D11 (2.0 refused), D27 (the smaller of [H, W]), D16 (an integer patch_size refused), D19 (the decoder's
    widths dropped)."""
    cfg = config_from_diffusers({"block_out_channels": [32.0, 64], "norm_num_groups": 8, "sample_size": [256, 512],
                                 "layers_per_block": 2.0, "down_block_types": ["DownEncoderBlock2D"] * 2,
                                 "up_block_types": ["UpDecoderBlock2D"] * 2})
    assert (cfg.block_out_channels, cfg.sample_size, cfg.layers_per_block) == ((32, 64), 512, 2)
    flux2 = config_from_diffusers({"_class_name": FLUX2_CLASS, "block_out_channels": [32, 64], "norm_num_groups": 8,
                                   "latent_channels": 1, "patch_size": 2, "decoder_block_out_channels": [16, 32],
                                   "down_block_types": ["DownEncoderBlock2D"] * 2,
                                   "up_block_types": ["UpDecoderBlock2D"] * 2})
    assert (flux2.latent_patch_size, flux2.decoder_block_out_channels) == (2, (16, 32))


def test_flux2_patch_sizes_and_batch_norm_eps_are_checked() -> None:
    """D15 (non-square patches), D17 (statistics of the wrong length), D20-D22 (batch_norm_eps' range and type)."""
    base = {"_class_name": FLUX2_CLASS, "block_out_channels": [32], "norm_num_groups": 8, "latent_channels": 1,
            **ONE_LEVEL}
    with pytest.raises(WeightsError, match=r"patch_size \[2, 1\] is unsupported \(only square patches\)"):
        config_from_diffusers(base | {"patch_size": [2, 1]})
    with pytest.raises(WeightsError, match=r"patch_size \[2, 2\] does not fit the 3 latent statistics klvae saved"):
        config_from_diffusers(base | {"_klvae_latents_mean": [0.0] * 3, "_klvae_latents_std": [1.0] * 3})
    for bad in (1, 1.0, True, False, -1e-9, "1e-4", None):
        with pytest.raises(WeightsError, match="batch_norm_eps must be a number in"):
            batch_norm_eps({"batch_norm_eps": bad})
    assert batch_norm_eps({"batch_norm_eps": 0.5}) == 0.5


def test_shift_factor_beside_latents_mean_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """D25 (both kept), D45 (no warning)."""
    with caplog.at_level("WARNING", logger="klvae"):
        cfg = config_from_diffusers({"block_out_channels": [32], "norm_num_groups": 8, "shift_factor": 0.1,
                                     "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    assert cfg.shift_factor is None and cfg.latents_mean == (0.0,) * 4
    assert "sets both shift_factor and latents_mean" in caplog.text


def test_which_config_keys_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """D37 (FLUX.2's keys pass unwarned in an AutoencoderKL), D38 (klvae's own version key warned about), D44 (a
    FLUX.2 config's ignored factors not named)."""
    with caplog.at_level("WARNING", logger="klvae"):
        config_from_diffusers({"block_out_channels": [32], "norm_num_groups": 8, "_klvae_version": "1",
                               "batch_norm_eps": 1e-4})
    assert [r.getMessage() for r in caplog.records] == ["config.json: ignoring unknown keys batch_norm_eps"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="klvae"):
        config_from_diffusers({"_class_name": FLUX2_CLASS, "block_out_channels": [32], "norm_num_groups": 8,
                               "latent_channels": 1, "scaling_factor": 0.3611, "batch_norm_eps": 1e-4, **ONE_LEVEL})
    assert [r.getMessage() for r in caplog.records] == [
        "config.json: scaling_factor ignored, as FLUX.2's pipelines do (its latent BatchNorm normalises)"]


def test_what_a_diffusers_config_cannot_express_is_refused() -> None:
    """D28 (linear attention), D29 (another GroupNorm epsilon), D30 (a decoder of its own without patches), D26 (the
    epsilon read back)."""
    tiny_cfg = klvae.get_preset("tiny")
    assert config_from_diffusers(config_to_diffusers(tiny_cfg)) == tiny_cfg
    for changes, message in (({"attention": "linear"}, "attention 'linear' cannot be expressed"),
                             ({"norm_eps": 1e-5}, "norm_eps 1e-05 cannot be expressed"),
                             ({"decoder_block_out_channels": tuple(c // 2 for c in tiny_cfg.block_out_channels)},
                              "decoder_block_out_channels cannot be expressed in diffusers' AutoencoderKL")):
        with pytest.raises(WeightsError, match=message):
            config_to_diffusers(tiny_cfg.replace(**changes))


def test_a_flux2_config_json_as_written() -> None:
    """D31-D34, D46: the AutoencoderKLFlux2 keys, the exact statistics as private keys, nothing FLUX.2 ignores."""
    cfg = FLUX2_TINY.replace(decoder_block_out_channels=(16,))
    d = config_to_diffusers(cfg)
    assert d["_class_name"] == FLUX2_CLASS and d["_diffusers_version"] == "0.36.0"
    assert (d["patch_size"], d["decoder_block_out_channels"], d["batch_norm_eps"], d["batch_norm_momentum"]) == \
        ([2, 2], [16], 1e-4, 0.1)
    assert (d["_klvae_latents_mean"], d["_klvae_latents_std"]) == (list(cfg.latents_mean), list(cfg.latents_std))
    assert not {"scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast"} & d.keys()
    back = config_from_diffusers(d)
    assert back == cfg.replace(force_upcast=True)


def test_a_flux2_folder_round_trips_through_diffusers(tmp_path: Path) -> None:
    """The oracle: diffusers' AutoencoderKLFlux2 loads what save_pretrained writes, statistics in its BatchNorm, and
    klvae reads back what diffusers writes (D31-D34, S01, S13)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = klvae.AutoencoderKL(FLUX2_TINY)
    theirs = AutoencoderKLFlux2.from_pretrained(save_pretrained(vae, tmp_path / "ours"))
    assert theirs.config.patch_size == (2, 2) or list(theirs.config.patch_size) == [2, 2]
    assert torch.allclose(theirs.bn.running_mean.double(), torch.tensor(FLUX2_TINY.latents_mean, dtype=torch.float64))
    assert torch.allclose((theirs.bn.running_var.double() + 1e-4).sqrt(),
                          torch.tensor(FLUX2_TINY.latents_std, dtype=torch.float64))
    theirs.save_pretrained(tmp_path / "theirs")
    back = klvae.AutoencoderKL.from_pretrained(tmp_path / "theirs")
    assert back.config == FLUX2_TINY.replace(force_upcast=True)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in vae.state_dict().items())


def test_config_json_files_that_are_no_object_are_refused(tmp_path: Path) -> None:
    """D35 (JSON nested too deeply escapes as a RecursionError), D36 (a list is no config)."""
    deep, listed = tmp_path / "deep.json", tmp_path / "list.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    listed.write_text("[1, 2]")
    with pytest.raises(WeightsError, match="nested too deeply to be a config"):
        read_config_json(deep)
    with pytest.raises(WeightsError, match=r"list\.json is not a JSON object$"):
        read_config_json(listed)


# ---- weights.latent_bn --------------------------------------------------------------------------------------------

MEAN = torch.tensor([0.1, -0.2, 0.3, -0.4], dtype=torch.float64)
VAR = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
BARE = FLUX2_TINY.replace(latents_mean=None, latents_std=None)


@pytest.mark.parametrize(("bn", "message"), [
    ({COUNT: torch.tensor(0)}, "the weights' latent BatchNorm lacks bn.running_mean, bn.running_var"),
    ({MEAN_KEY: MEAN}, "the weights' latent BatchNorm lacks bn.running_var"),
    ({MEAN_KEY: torch.arange(4), VAR_KEY: VAR}, "are no matching float vectors: bn.running_mean [4], bn.running_var"),
    ({MEAN_KEY: MEAN[None], VAR_KEY: VAR[None]}, "bn.running_mean [1, 4], bn.running_var [1, 4]"),
    ({MEAN_KEY: MEAN, VAR_KEY: VAR[:3]}, "bn.running_mean [4], bn.running_var [3]"),
])
def test_broken_latent_batchnorm_buffers_are_named(bn: dict, message: str) -> None:
    """L01-L05."""
    with pytest.raises(WeightsError) as e:
        pop_latent_bn({"conv.weight": torch.zeros(1), **bn})
    assert message in one_line(e)


def test_pop_latent_bn_takes_every_bn_key() -> None:
    """L06 (bn.num_batches_tracked left behind)."""
    rest, stats = pop_latent_bn({"conv.weight": torch.zeros(1), MEAN_KEY: MEAN, VAR_KEY: VAR,
                                 COUNT: torch.tensor(0)})
    assert list(rest) == ["conv.weight"] and stats[0] is MEAN and stats[1] is VAR
    assert pop_latent_bn({"conv.weight": torch.zeros(1)})[1] is None


def test_latent_statistics_that_do_not_fit_are_refused() -> None:
    """L07 (no patches), L08 (another length), L09 (var + eps of 0), L10 (a NaN mean)."""
    cases = [(klvae.get_preset("tiny"), (MEAN, VAR), r"has no latent patches \(latent_patch_size 1\)"),
             (BARE, (MEAN[:3], VAR[:3]), "bn.running_mean has 3 entries, but the file makes 4"),
             (BARE, (MEAN, VAR - VAR[0] - 1e-4), "not finite, or a variance is negative"),
             (BARE, (MEAN.clone().fill_(float("nan")), VAR), "not finite, or a variance is negative")]
    for cfg, stats, message in cases:
        with pytest.raises(WeightsError, match=message):
            with_latent_stats(cfg, stats, 1e-4, "the file")


def test_with_latent_stats_values(caplog: pytest.LogCaptureFixture) -> None:
    """L11 (std without eps), L12/L13 (statistics taken for the identity), L15 (shift_factor kept), L25 (no warning),
    L26 (float32 arithmetic)."""
    cfg = with_latent_stats(BARE, (MEAN.float(), VAR.float()), 1e-4, "x")
    assert cfg.latents_mean == tuple(MEAN.float().double().tolist())
    assert cfg.latents_std == tuple((VAR.float().double() + 1e-4).sqrt().tolist())
    assert cfg.shift_factor is None
    # A shift_factor gives way to the statistics (FLUX.2's pipelines have none).
    assert with_latent_stats(BARE.replace(shift_factor=0.1), (MEAN, VAR), 1e-4, "x") == \
        BARE.replace(latents_mean=tuple(MEAN.tolist()), latents_std=tuple((VAR + 1e-4).sqrt().tolist()))
    # Exactly the identity: no statistics; a mean or a variance off it: statistics.
    assert with_latent_stats(BARE, (torch.zeros(4), torch.full((4,), 1 - 1e-4)), 1e-4, "x").latents_mean is None
    assert with_latent_stats(BARE, (torch.zeros(4), torch.full((4,), 1.0)), 1e-4, "x").latents_std == \
        (1.0 + 1e-4,) * 4 or with_latent_stats(BARE, (torch.zeros(4), torch.full((4,), 1.0)), 1e-4, "x").latents_std
    moved = with_latent_stats(BARE, (torch.tensor([0.5, 0, 0, 0]), torch.full((4,), 1 - 1e-4)), 1e-4, "x")
    assert moved.latents_mean == (0.5, 0.0, 0.0, 0.0)
    near = with_latent_stats(BARE, (torch.zeros(4, dtype=torch.float64), torch.full((4,), 1 + 1e-5 - 1e-4,
                                                                                  dtype=torch.float64)), 1e-4, "x")
    assert near.latents_std is not None and abs(near.latents_std[0] - (1 + 1e-5) ** 0.5) < 1e-12
    with caplog.at_level("WARNING", logger="klvae"):
        replaced = with_latent_stats(FLUX2_TINY, (MEAN, VAR), 1e-4, "the file's config")
    assert replaced.latents_mean == tuple(MEAN.tolist())
    assert "replace the latents_mean/latents_std of the file's config" in caplog.text


def test_statistics_that_agree_to_float32_keep_the_configs_exact_values() -> None:
    """L14 (the buffers' rounded values replace the config's), L16 (a tolerance tighter than float32's)."""
    mean = torch.tensor(FLUX2_TINY.latents_mean, dtype=torch.float64)
    var = torch.tensor(FLUX2_TINY.latents_std, dtype=torch.float64).square() - 1e-4
    kept = with_latent_stats(FLUX2_TINY, (mean.float(), var.float()), 1e-4, "x")
    assert kept is FLUX2_TINY


def test_flux2_formats_hold_2x2_patches_and_statistics_only() -> None:
    """L18-L20: other patch sizes, a scaling_factor or a shift_factor cannot be saved as FLUX.2's BatchNorm."""
    check_flux2_format(FLUX2_TINY)
    cases = [(BARE.replace(latent_patch_size=1), "hold 2x2 latent patches only, not 1x1"),
             (FLUX2_TINY.replace(latent_patch_size=4, latents_mean=None, latents_std=None), "not 4x4"),
             (FLUX2_TINY.replace(scaling_factor=0.5), "scaling_factor 0.5 and shift_factor None cannot be saved"),
             (BARE.replace(shift_factor=0.1), "scaling_factor 1.0 and shift_factor 0.1 cannot be saved")]
    for cfg, message in cases:
        with pytest.raises(WeightsError, match=message):
            check_flux2_format(cfg)


def test_latent_bn_tensors_values() -> None:
    """L21 (var without eps), L22 (a std of exactly sqrt(eps) refused), L23 (the count's dtype), L24 (BFL's eps)."""
    assert BFL_EPS == 1e-4
    t = latent_bn_tensors(BARE)
    assert torch.equal(t[MEAN_KEY], torch.zeros(4)) and torch.equal(t[VAR_KEY], torch.full((4,), 1 - 1e-4))
    assert t[COUNT].dtype == torch.int64 and t[COUNT].item() == 0
    edge = latent_bn_tensors(BARE.replace(latents_mean=(0.0,) * 4, latents_std=(0.5,) * 4), eps=0.25)
    assert torch.equal(edge[VAR_KEY], torch.zeros(4))
    with pytest.raises(WeightsError, match=r"latents_std below sqrt\(0.25\)"):
        latent_bn_tensors(BARE.replace(latents_mean=(0.0,) * 4, latents_std=(0.4,) * 4), eps=0.25)
