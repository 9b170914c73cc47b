"""FLUX.2 support at its boundaries: the largest latent patch, patch sizes given as zero or null, a config's
statistics against the BatchNorm's (kept, replaced, of other lengths), batch_norm_eps, config.json patches and
factors, the parameter cap, hub file suffixes and revisions, headerless BFL files of any latent width, and a patched
model without statistics. Pure functions and tiny configs only, so the file stays fast."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from klvae import AutoencoderKL
from klvae.cli.codec import _norm_differences
from klvae.errors import WeightsError
from klvae.model.config import PRESET_HUB_FILES, PRESETS, AutoencoderKLConfig, approx_parameters
from klvae.model.latent_norm import LatentNorm
from klvae.weights import export_ldm
from klvae.weights.diffusers_config import FLUX2_CLASS, batch_norm_eps, config_from_diffusers
from klvae.weights.hub import fetch_hub_file, parse_hub_file
from klvae.weights.latent_bn import BFL_EPS, pop_latent_bn, with_latent_stats

# One latent channel in 2x2 patches: four statistics.
CFG = AutoencoderKLConfig(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, latent_channels=1,
                          scaling_factor=1.0, latent_patch_size=2, sample_size=64, force_upcast=False)
MEAN = torch.tensor([0.1, -0.2, 0.3, -0.4], dtype=torch.float64)
VAR = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
EPS = 1e-4
STD = tuple((VAR + EPS).sqrt().tolist())


# ---- model.latent_norm ----

def test_the_largest_latent_patch_named_in_the_message_is_accepted() -> None:
    """The error says "an integer from 1 to 8": 8 itself must pass, 9 and 0 not."""
    assert LatentNorm(latent_patch_size=8).latent_patch_size == 8
    for bad in (0, 9):
        with pytest.raises(ValueError, match="latent_patch_size must be an integer from 1 to 8"):
            LatentNorm(latent_patch_size=bad)


@pytest.mark.parametrize("bad", [0, None])
def test_from_dict_refuses_a_patch_size_given_as_zero_or_null(bad: object) -> None:
    """Only an absent field (older files) means 1; a stored 0 or null is malformed, not silently 1."""
    with pytest.raises(ValueError, match="latent_patch_size"):
        LatentNorm.from_dict({"scaling_factor": 1.0, "latent_patch_size": bad})
    assert LatentNorm.from_dict({"scaling_factor": 1.0}).latent_patch_size == 1


# ---- weights.latent_bn ----

def test_config_statistics_are_kept_only_when_both_mean_and_std_agree() -> None:
    agreeing = CFG.replace(latents_mean=tuple(MEAN.tolist()), latents_std=STD)
    assert with_latent_stats(agreeing, (MEAN, VAR), EPS, "cfg") is agreeing
    # The mean agrees, the std does not: the weights' std wins.
    other_std = CFG.replace(latents_mean=tuple(MEAN.tolist()), latents_std=(1.0, 1.0, 1.0, 1.0))
    got = with_latent_stats(other_std, (MEAN, VAR), EPS, "cfg")
    assert got.latents_std == pytest.approx(STD, rel=1e-12)
    # The std agrees, the mean does not: the weights' mean wins.
    other_mean = CFG.replace(latents_mean=(0.0, 0.0, 0.0, 0.0), latents_std=STD)
    got = with_latent_stats(other_mean, (MEAN, VAR), EPS, "cfg")
    assert got.latents_mean == pytest.approx(tuple(MEAN.tolist()), rel=1e-12)


def test_config_statistics_that_differ_beyond_float32_rounding_are_replaced() -> None:
    """"Agree" means equal to float32's rounding (1e-6), not merely close: 1e-4 off is another statistic."""
    near = tuple(m * (1 + 1e-4) for m in MEAN.tolist())
    got = with_latent_stats(CFG.replace(latents_mean=near, latents_std=STD), (MEAN, VAR), EPS, "cfg")
    assert got.latents_mean == tuple(MEAN.tolist())


def test_the_batchnorm_statistics_replace_a_configs_shift() -> None:
    shifted = CFG.replace(shift_factor=0.25)
    got = with_latent_stats(shifted, (MEAN, VAR), EPS, "cfg")
    assert got.shift_factor is None and got.latents_mean == tuple(MEAN.tolist())


def test_a_batchnorm_without_running_var_is_a_weights_error_naming_it() -> None:
    with pytest.raises(WeightsError, match=r"latent BatchNorm lacks bn\.running_var"):
        pop_latent_bn({"bn.running_mean": torch.zeros(4), "encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"lacks bn\.running_mean, bn\.running_var"):
        pop_latent_bn({"bn.num_batches_tracked": torch.tensor(0)})


def test_batchnorm_statistics_of_different_lengths_are_a_weights_error() -> None:
    with pytest.raises(WeightsError, match=r"no matching float vectors: bn\.running_mean \[4\], bn\.running_var \[5\]"):
        pop_latent_bn({"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(5)})
    sd, stats = pop_latent_bn({"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4),
                               "bn.num_batches_tracked": torch.tensor(3), "decoder.x": torch.ones(1)})
    assert set(sd) == {"decoder.x"} and stats is not None
    assert math.isclose(float(stats[1].sum()), 4.0)


# ---- weights.diffusers_config ----

def test_batch_norm_eps_takes_zero_and_refuses_what_is_no_epsilon() -> None:
    assert batch_norm_eps({"batch_norm_eps": 0}) == 0.0
    assert batch_norm_eps({"batch_norm_eps": 1e-3}) == 1e-3
    assert batch_norm_eps({}) == BFL_EPS
    for bad in (1, 1.5, -1e-4, True, "1e-4", None):
        with pytest.raises(WeightsError, match="batch_norm_eps must be a number in"):
            batch_norm_eps({"batch_norm_eps": bad})


def test_a_flux2_config_json_with_rectangular_patches_is_refused() -> None:
    with pytest.raises(WeightsError, match=r"patch_size \[2, 1\] is unsupported \(only square patches\)"):
        config_from_diffusers({"_class_name": FLUX2_CLASS, "patch_size": [2, 1]})
    assert config_from_diffusers({"_class_name": FLUX2_CLASS, "patch_size": 2}).latent_patch_size == 2


def test_a_flux2_config_json_ignores_the_factors_its_pipelines_ignore(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config_from_diffusers({"_class_name": FLUX2_CLASS, "scaling_factor": 0.5, "shift_factor": 0.1})
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.latents_mean) == (1.0, None, None)
    assert "scaling_factor, shift_factor ignored" in caplog.text


# ---- model.config ----

def test_the_parameter_cap_counts_the_decoders_own_widths() -> None:
    """A narrow encoder does not make a huge decoder small: 8192 wide decoder convs are ~4.8 billion parameters."""
    with pytest.raises(ValueError, match="billion parameters"):
        AutoencoderKLConfig(block_out_channels=(32,), decoder_block_out_channels=(8192,), layers_per_block=2)
    small = AutoencoderKLConfig(block_out_channels=(64, 64), decoder_block_out_channels=(32, 32),
                                layers_per_block=1)
    ends = 9 * (3 * 64 + 64 * 2 * 4 + 4 * 32 + 32 * 3) + 5 * 4 * 4  # convs in and out, quant convs (4 latents)
    assert approx_parameters(small) == 2 * 18 * 64**2 + 2 * 2 * 18 * 32**2 + 18 * (64**2 + 32**2) + ends


# ---- weights.hub ----

def test_a_hub_file_suffix_is_matched_whatever_its_case() -> None:
    assert parse_hub_file("org/name/vae/AE.SafeTensors", (".safetensors",)) == ("org/name", "vae/AE.SafeTensors",
                                                                                None)
    url = "https://huggingface.co/org/name/resolve/v1.0/ae.safetensors?download=true"
    assert parse_hub_file(url, (".safetensors",)) == ("org/name", "ae.safetensors", "v1.0")
    for bad in ("org/name/../ae.safetensors", "org/name/config.json", "org/ae.safetensors"):
        assert parse_hub_file(bad, (".safetensors",)) is None


# ---- cli.codec ----

def test_norm_differences_name_the_patch_size_and_statistics_of_another_length() -> None:
    assert _norm_differences(LatentNorm(latent_patch_size=2), LatentNorm()) == ["latent_patch_size 2 (the model's 1)"]
    four = LatentNorm(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4, latent_patch_size=2)
    one = LatentNorm(latents_mean=(0.0,), latents_std=(1.0,))
    assert _norm_differences(four, one) == ["latent_patch_size 2 (the model's 1)", "latents_mean sizes",
                                            "latents_std sizes"]
    assert _norm_differences(four, four) == []


# ---- weights.hub and weights.load: one file of a hub repo, at a revision ----

def _bfl_file(path: Path, seed: int) -> AutoencoderKL:
    """A tiny patched VAE written in BFL's layout without klvae's header (as BFL's own files are)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(CFG.replace(latents_mean=tuple(MEAN.tolist()), latents_std=STD)).eval()
    tmp = export_ldm(vae, path.with_suffix(".tmp.safetensors"))
    save_file(load_file(tmp), str(path))
    tmp.unlink()
    return vae


def _two_revisions(cache: Path, repo_id: str, filename: str) -> tuple[AutoencoderKL, AutoencoderKL, str]:
    """A faked hub cache of repo_id: main holds one model's file, the tag v2 (and its commit) another's."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    commits = ("a" * 40, "b" * 40)
    for ref, commit in zip(("main", "v2"), commits, strict=True):
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
    main_vae = _bfl_file(repo / "snapshots" / commits[0] / filename, 0)
    v2_vae = _bfl_file(repo / "snapshots" / commits[1] / filename, 1)
    return main_vae, v2_vae, commits[1]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_hub_files_revision_is_the_one_fetched(offline_cache: Path) -> None:
    main_vae, v2_vae, commit = _two_revisions(offline_cache, "org/single", "ae.safetensors")
    assert fetch_hub_file("org/single", "ae.safetensors", "v2").parent.name == commit
    assert _same_weights(AutoencoderKL.from_pretrained("org/single/ae.safetensors"), main_vae)
    assert _same_weights(AutoencoderKL.from_pretrained("org/single/ae.safetensors@v2"), v2_vae)
    url = "https://huggingface.co/org/single/resolve/v2/ae.safetensors?download=true"
    assert _same_weights(AutoencoderKL.from_pretrained(url), v2_vae)
    assert _same_weights(AutoencoderKL.from_pretrained(url, revision="v2"), v2_vae)


def test_a_file_presets_revision_and_config_are_used(offline_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`flux2-small-decoder@v2` fetches v2 of BFL's file, and the preset, not the shapes, gives what shapes cannot
    tell (sample_size, norm_num_groups)."""
    name = "flux2-small-decoder"
    repo_id, filename = PRESET_HUB_FILES[name]
    main_vae, v2_vae, _ = _two_revisions(offline_cache, repo_id, filename)
    monkeypatch.setitem(PRESETS, name, CFG.replace(sample_size=48))
    back = AutoencoderKL.from_pretrained(name)
    assert _same_weights(back, main_vae)
    assert (back.config.sample_size, back.config.norm_num_groups) == (48, 8)
    assert _same_weights(AutoencoderKL.from_pretrained(f"{name}@v2"), v2_vae)


def test_a_headerless_bfl_file_of_any_latent_width_loads_as_flux2(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Its bn.* buffers name the family: FLUX.2's patches, with no "factors guessed" warning."""
    vae = _bfl_file(tmp_path / "ae.safetensors", 0)
    with caplog.at_level(logging.INFO):
        back = AutoencoderKL.from_pretrained(tmp_path / "ae.safetensors")
    assert back.config.latent_patch_size == 2 and back.config.latent_channels == 1
    assert back.config.latents_std == pytest.approx(STD, rel=1e-6)
    assert _same_weights(back, vae)
    assert "guessed" not in caplog.text


def test_a_patched_model_without_statistics_warns_that_it_only_patchifies(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    vae = AutoencoderKL(CFG)
    save_file(vae.state_dict(), str(tmp_path / "plain.safetensors"))
    back = AutoencoderKL.from_pretrained(tmp_path / "plain.safetensors", config=CFG)
    assert back.config.latents_mean is None
    assert "patchified but not normalised" in caplog.text
