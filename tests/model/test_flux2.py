"""FLUX.2's VAE: the latent patchified 2x2 and normalised by the VAE's latent BatchNorm. Parity with diffusers'
AutoencoderKLFlux2 and its pipeline's latent handling, both ways through diffusers folders; BFL's single-file
layout (quant convs nested in encoder/decoder, bn.* statistics); the patched latent shapes; the combinations
that must be refused (the CLI's encode/decode round trip: test_flux2_cli.py)."""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import klvae
from helpers import one_line
from klvae import AutoencoderKL
from klvae.errors import WeightsError
from klvae.model.config import PRESET_HUB_IDS, PRESETS, AutoencoderKLConfig
from klvae.model.latent_norm import LatentNorm
from klvae.weights import diffusers_to_ldm, export_ldm
from oracles import (
    BN_EPS,
    PATCHED,
    REL,
    SMALL,
    TOL,
    assert_parity,
    bfl_state_dict,
    flux2_diffusers,
    klvae_flux2,
    random_stats,
)

# ---- the references: diffusers' model and its pipeline's latent handling ----

def _pipeline_staticmethod(name: str) -> Callable[[Tensor], Tensor]:
    """Flux2Pipeline.<name>, diffusers' own code. The pipeline module imports transformers (not a dependency
    here), so the method is compiled from the installed pipeline_flux2.py's source rather than imported."""
    src = Path(diffusers.__file__).parent / "pipelines" / "flux2" / "pipeline_flux2.py"
    tree = ast.parse(src.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Flux2Pipeline")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.decorator_list = []  # @staticmethod
    namespace: dict[str, object] = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(src), "exec"), namespace)
    return namespace[name]  # type: ignore[return-value]


patchify_latents = _pipeline_staticmethod("_patchify_latents")
unpatchify_latents = _pipeline_staticmethod("_unpatchify_latents")


def bn_stats(theirs: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """As Flux2Pipeline reads them: running_mean and sqrt(running_var + batch_norm_eps), [1, C, 1, 1]."""
    mean = theirs.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(theirs.bn.running_var.view(1, -1, 1, 1) + theirs.config.batch_norm_eps)
    return mean, std


def pipeline_scale(theirs: torch.nn.Module, z: Tensor) -> Tensor:
    """Flux2Pipeline._encode_vae_image after the VAE: patchify, then (z - bn mean) / bn std."""
    mean, std = bn_stats(theirs)
    return (patchify_latents(z) - mean) / std


def pipeline_unscale(theirs: torch.nn.Module, z: Tensor) -> Tensor:
    """The end of Flux2Pipeline.__call__ before vae.decode: z * bn std + bn mean, then unpatchify."""
    mean, std = bn_stats(theirs)
    return unpatchify_latents(z * std + mean)


def assert_rel(a: Tensor, b: Tensor, what: str, rel: float = REL) -> None:
    """Max abs diff within rel of b's scale."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert diff <= rel * scale, f"{what}: max abs diff {diff:.3g} at scale {scale:.3g}"


def image(h: int = 48, w: int = 64, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g) * 2 - 1


def the_norm(cfg: AutoencoderKLConfig) -> tuple[object, ...]:
    return (cfg.latent_patch_size, cfg.scaling_factor, cfg.shift_factor)


ARCH = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
        "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "attention", "norm_eps")


def assert_same_architecture(cfg: AutoencoderKLConfig, other: AutoencoderKLConfig) -> None:
    for f in ARCH:
        assert getattr(cfg, f) == getattr(other, f), f


# ---- the preset ----

def test_the_flux2_preset() -> None:
    cfg = PRESETS["flux2"]
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.layers_per_block == 2
    assert cfg.latent_channels == 32 and cfg.use_quant_conv and cfg.use_post_quant_conv
    assert cfg.latent_patch_size == 2 and cfg.scaling_factor == 1.0 and cfg.shift_factor is None
    assert cfg.latents_mean is None and cfg.latents_std is None
    assert PRESET_HUB_IDS["flux2"] == ("black-forest-labs/FLUX.2-dev", "vae")
    # Without statistics the preset only patchifies.
    z = torch.randn(1, 32, 4, 6)
    assert torch.equal(cfg.latent_norm.scale(z), patchify_latents(z))


# ---- 1. diffusers -> klvae ----

@pytest.mark.parametrize("eps", [BN_EPS, 1e-3])
def test_diffusers_flux2_folder_loads_with_its_batchnorm_as_statistics(eps: float, tmp_path: Path) -> None:
    theirs = flux2_diffusers(eps=eps)
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["_class_name"] == "AutoencoderKLFlux2" and written["batch_norm_eps"] == eps

    ours = AutoencoderKL.from_pretrained(tmp_path)
    cfg = ours.config
    assert_same_architecture(cfg, SMALL)
    assert the_norm(cfg) == (2, 1.0, None)
    assert cfg.latents_mean == tuple(theirs.bn.running_mean.tolist())
    expected_std = torch.sqrt(theirs.bn.running_var.double() + eps)
    assert torch.allclose(torch.tensor(cfg.latents_std, dtype=torch.float64), expected_std, rtol=1e-7, atol=0)
    assert not ours.training

    assert_parity(ours, theirs, SMALL, "flux2 diffusers->klvae")

    x = image()
    with torch.no_grad():
        mode = theirs.encode(x).latent_dist.mode()
        assert torch.allclose(ours.encode(x).mode(), mode, rtol=0, atol=TOL)
        assert_rel(ours.scale_latents(mode), pipeline_scale(theirs, mode), "scale vs the pipeline's")
        y = torch.randn(2, PATCHED, 3, 4, generator=torch.Generator().manual_seed(5))
        assert_rel(ours.unscale_latents(y), pipeline_unscale(theirs, y), "unscale vs the pipeline's")
        # The pipeline's decode of a diffusion latent, end to end.
        assert_rel(ours.decode(ours.unscale_latents(y)), theirs.decode(pipeline_unscale(theirs, y)).sample,
                   "decoded diffusion latent", rel=1e-5)


def test_bn_num_batches_tracked_is_dropped_not_a_weight(tmp_path: Path) -> None:
    flux2_diffusers().save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert not any(k.startswith("bn.") for k in ours.state_dict())


# ---- 2. klvae -> diffusers ----

def test_klvae_flux2_saves_a_folder_diffusers_loads_as_autoencoder_kl_flux2(tmp_path: Path) -> None:
    ours = klvae_flux2()
    mean, std = random_stats()
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["_class_name"] == "AutoencoderKLFlux2"
    assert written["batch_norm_eps"] == BN_EPS and list(written["patch_size"]) == [2, 2]
    assert "batch_norm_momentum" in written
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert int(sd["bn.num_batches_tracked"]) == 0
    assert torch.allclose(sd["bn.running_mean"].double(), torch.tensor(mean, dtype=torch.float64), rtol=1e-6)
    var = torch.tensor(std, dtype=torch.float64) ** 2 - BN_EPS
    assert torch.allclose(sd["bn.running_var"].double(), var, rtol=1e-6, atol=1e-9)

    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    assert theirs.config.batch_norm_eps == BN_EPS and tuple(theirs.config.patch_size) == (2, 2)
    assert_parity(ours, theirs, SMALL, "flux2 klvae->diffusers")
    z = torch.randn(2, 32, 6, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_rel(pipeline_scale(theirs, z), ours.scale_latents(z), "the pipeline's normalisation vs klvae's")
        y = ours.scale_latents(z)
        assert_rel(pipeline_unscale(theirs, y), ours.unscale_latents(y), "the pipeline's inverse vs klvae's")


def test_klvae_to_diffusers_folder_to_klvae_keeps_statistics_and_weights(tmp_path: Path) -> None:
    ours = klvae_flux2()
    ours.save_pretrained(tmp_path)
    back = AutoencoderKL.from_pretrained(tmp_path)
    assert_same_architecture(back.config, ours.config)
    assert the_norm(back.config) == the_norm(ours.config)
    for name in ("latents_mean", "latents_std"):
        got, want = getattr(back.config, name), getattr(ours.config, name)
        assert got is not None and len(got) == len(want) == PATCHED, name
        worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
        assert worst <= 1e-12, f"{name} changed by {worst:.3g} through the folder"
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_a_flux2_model_without_statistics_saves_the_identity_normalisation(tmp_path: Path) -> None:
    ours = klvae_flux2(stats=False)
    ours.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert torch.equal(sd["bn.running_mean"], torch.zeros(PATCHED))
    assert torch.equal(sd["bn.running_var"], torch.full((PATCHED,), 1 - BN_EPS))
    assert int(sd["bn.num_batches_tracked"]) == 0
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    z = torch.randn(1, 32, 4, 6, generator=torch.Generator().manual_seed(2))
    assert_rel(pipeline_scale(theirs, z), patchify_latents(z), "the pipeline's normalisation (identity)")
    back = AutoencoderKL.from_pretrained(tmp_path)
    assert back.config.latent_patch_size == 2
    assert_rel(back.scale_latents(z), patchify_latents(z), "reloaded scale (identity)")
    assert_rel(back.unscale_latents(patchify_latents(z)), z, "reloaded unscale (identity)")


# ---- 3. BFL's single-file layout ----

def test_the_bfl_key_set_has_nested_quant_convs_and_batchnorm() -> None:
    keys = set(bfl_state_dict(flux2_diffusers()))
    assert {"encoder.quant_conv.weight", "encoder.quant_conv.bias", "decoder.post_quant_conv.weight",
            "decoder.post_quant_conv.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
            "encoder.down.0.block.0.conv1.weight", "decoder.up.3.upsample.conv.weight",
            "encoder.mid.attn_1.q.weight", "decoder.norm_out.weight"} <= keys
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys)


def test_bfl_ae_safetensors_without_config_loads_as_flux2(tmp_path: Path) -> None:
    theirs = flux2_diffusers()
    path = tmp_path / "ae.safetensors"
    save_file(bfl_state_dict(theirs), str(path))
    ours = AutoencoderKL.from_pretrained(path)
    assert_same_architecture(ours.config, SMALL)
    assert the_norm(ours.config) == (2, 1.0, None)
    assert ours.config.latents_mean == tuple(theirs.bn.running_mean.tolist())
    std = torch.sqrt(theirs.bn.running_var.double() + BN_EPS)
    assert torch.allclose(torch.tensor(ours.config.latents_std, dtype=torch.float64), std, rtol=1e-7, atol=0)
    assert_parity(ours, theirs, SMALL, "flux2 BFL ae.safetensors->klvae")
    x = image()
    with torch.no_grad():
        mode = theirs.encode(x).latent_dist.mode()
        assert_rel(ours.scale_latents(ours.encode(x).mode()), pipeline_scale(theirs, mode),
                   "BFL encode (mode, patchify, BatchNorm) vs klvae")


def test_export_ldm_of_a_flux2_model_writes_bfls_layout(tmp_path: Path) -> None:
    ours = klvae_flux2()
    path = export_ldm(ours, tmp_path / "ae.safetensors")
    written = load_file(path)
    assert set(written) == set(bfl_state_dict(flux2_diffusers()))
    mean, std = random_stats()
    assert torch.allclose(written["bn.running_mean"].double(), torch.tensor(mean, dtype=torch.float64), rtol=1e-6)
    var = torch.tensor(std, dtype=torch.float64) ** 2 - BN_EPS
    assert torch.allclose(written["bn.running_var"].double(), var, rtol=1e-6, atol=1e-9)
    assert int(written["bn.num_batches_tracked"]) == 0
    assert torch.equal(written["encoder.quant_conv.weight"], ours.state_dict()["quant_conv.weight"])
    assert torch.equal(written["decoder.post_quant_conv.bias"], ours.state_dict()["post_quant_conv.bias"])
    back = AutoencoderKL.from_pretrained(path)
    assert_same_architecture(back.config, ours.config)
    assert the_norm(back.config) == the_norm(ours.config)
    # The header's exact statistics agree with the float32 buffers, so they are kept.
    assert back.config.latents_mean == ours.config.latents_mean
    assert back.config.latents_std == ours.config.latents_std
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_export_ldm_bytes_load_in_bfls_layout_without_klvaes_header(tmp_path: Path) -> None:
    """The file as other tools see it: only its tensors (no klvae config in the header) still load as flux2."""
    ours = klvae_flux2()
    tensors = load_file(export_ldm(ours, tmp_path / "with-header.safetensors"))
    bare = tmp_path / "ae.safetensors"
    save_file(tensors, str(bare))
    back = AutoencoderKL.from_pretrained(bare)
    assert_same_architecture(back.config, ours.config)
    assert the_norm(back.config) == (2, 1.0, None)
    z = torch.randn(1, 32, 4, 6)
    assert_rel(back.scale_latents(z), ours.scale_latents(z), "scale of the bare BFL file", rel=1e-6)


# ---- 4. latent shapes ----

def _stats_norm(scaling_factor: float = 1.0) -> LatentNorm:
    mean, std = random_stats()
    return LatentNorm(scaling_factor, None, mean, std, 2)


def test_scale_patchifies_to_four_times_the_channels_at_half_the_size() -> None:
    z = torch.randn(2, 32, 6, 10)
    norm = _stats_norm()
    y = norm.scale(z)
    assert y.shape == (2, 128, 3, 5)
    assert norm.unscale(y).shape == z.shape
    assert_rel(norm.unscale(y), z, "unscale(scale(z))")
    # Unbatched [C, h, w] too (the latents files hold items so).
    assert norm.scale(z[0]).shape == (128, 3, 5)
    assert_rel(norm.scale(z[0]), y[0], "unbatched scale")


def test_the_channel_order_is_the_pipelines() -> None:
    z = torch.randn(2, 32, 6, 10)
    plain = LatentNorm(1.0, None, None, None, 2)
    assert torch.equal(plain.scale(z), patchify_latents(z))
    y = torch.randn(2, 128, 3, 5)
    assert torch.equal(plain.unscale(y), unpatchify_latents(y))
    # Spelled out: channel c*4 + pi*2 + pj at (i, j) is z[c, 2i + pi, 2j + pj].
    p = plain.scale(z)
    for c, pi, pj, i, j in ((0, 0, 0, 0, 0), (5, 1, 0, 2, 3), (31, 1, 1, 2, 4), (7, 0, 1, 1, 0)):
        assert p[1, c * 4 + pi * 2 + pj, i, j] == z[1, c, 2 * i + pi, 2 * j + pj]


def test_per_channel_statistics_apply_to_the_patched_channels() -> None:
    z = torch.randn(1, 32, 4, 6)
    mean, std = random_stats()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    assert_rel(_stats_norm().scale(z), (patchify_latents(z) - m) / s, "scale with statistics")
    assert_rel(_stats_norm(0.5).scale(z), (patchify_latents(z) - m) * 0.5 / s, "scale with a scaling_factor")


@pytest.mark.parametrize("shape", [(1, 32, 5, 6), (1, 32, 6, 5), (32, 3, 3)])
def test_an_odd_latent_grid_is_a_value_error_naming_the_patch(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="patch"):
        _stats_norm().scale(torch.randn(*shape))
    with pytest.raises(ValueError, match="patch"):
        klvae_flux2(stats=False).scale_latents(torch.randn(*shape))


def test_vae_scale_latents_uses_the_configs_patch() -> None:
    vae = klvae_flux2()
    z = torch.randn(2, 32, 6, 10)
    assert vae.scale_latents(z).shape == (2, 128, 3, 5)
    assert_rel(vae.unscale_latents(vae.scale_latents(z)), z, "vae unscale(scale(z))")
    assert_rel(vae.scale_latents(z), _stats_norm().scale(z), "vae.scale_latents vs LatentNorm")


# ---- 5. wrong combinations ----

def test_batchnorm_statistics_with_a_config_without_patches_are_refused(tmp_path: Path) -> None:
    theirs = flux2_diffusers()
    path = tmp_path / "ae.safetensors"
    save_file(bfl_state_dict(theirs), str(path))
    # The architecture fits, but the statistics describe 2x2 patches this config does not make.
    cfg = SMALL.replace(latent_patch_size=1)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(path, config=cfg)
    text = one_line(e).lower()
    assert "patch" in text or "statistic" in text or "bn." in text, text


def test_flux2_weights_with_preset_sdxl_are_refused_naming_the_statistics(tmp_path: Path) -> None:
    """Weights of SDXL's architecture (uninitialised: only shapes matter) carrying FLUX.2-style bn.* statistics,
    loaded as config="sdxl": the architecture fits, the patched statistics cannot, and loading says so."""
    with torch.device("meta"):
        shapes = AutoencoderKL("sdxl").state_dict()
    sd = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in shapes.items()}
    sd.update({"bn.running_mean": torch.zeros(16), "bn.running_var": torch.ones(16),
               "bn.num_batches_tracked": torch.tensor(0)})
    path = tmp_path / "vae.safetensors"
    save_file(diffusers_to_ldm(sd), str(path))
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(path, config="sdxl")
    text = one_line(e).lower()
    assert "patch" in text or "statistic" in text or "bn." in text, text


def test_latents_mean_must_have_latent_channels_times_patch_squared_entries() -> None:
    with pytest.raises(ValueError, match="128"):
        SMALL.replace(latents_mean=(0.0,) * 32, latents_std=(1.0,) * 32)
    with pytest.raises(ValueError):
        SMALL.replace(latents_mean=(0.0,) * 129, latents_std=(1.0,) * 129)
    ok = SMALL.replace(latents_mean=(0.0,) * 128, latents_std=(1.0,) * 128)
    assert ok.latent_norm.channels == 128


def test_a_diffusers_folder_whose_batchnorm_has_the_wrong_size_is_a_weights_error(tmp_path: Path) -> None:
    flux2_diffusers().save_pretrained(tmp_path)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd["bn.running_mean"], sd["bn.running_var"] = sd["bn.running_mean"][:64].clone(), sd["bn.running_var"][:64].clone()
    save_file(sd, str(f))
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(tmp_path)
    one_line(e)


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_a_batchnorm_variance_that_gives_no_positive_std_is_a_weights_error(bad: float, tmp_path: Path) -> None:
    theirs = flux2_diffusers()
    with torch.no_grad():
        theirs.bn.running_var[3] = bad
    theirs.save_pretrained(tmp_path)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(tmp_path)
    one_line(e)


def test_a_flux2_config_with_a_scaling_factor_cannot_be_saved_for_diffusers(tmp_path: Path) -> None:
    vae = klvae_flux2(scaling_factor=0.5)
    with pytest.raises(WeightsError) as e:
        vae.save_pretrained(tmp_path / "out")
    assert "scaling_factor" in one_line(e)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_flux2_shift_is_refused_when_saved_for_diffusers(tmp_path: Path) -> None:
    """FLUX.2's diffusers folder has no shift_factor: saving one must not silently lose it."""
    vae = klvae_flux2(stats=False, shift_factor=0.25)
    with pytest.raises(WeightsError) as e:
        vae.save_pretrained(tmp_path / "out")
    assert "shift_factor" in one_line(e)
    assert not (tmp_path / "out").exists()


def _flux2_without_statistics() -> klvae.AutoencoderKL:
    with torch.device("meta"):  # scaling uses no weight: the full preset without allocating or initialising it
        return klvae.AutoencoderKL("flux2")


def test_flux2_unscale_of_a_vae_latent_is_an_error_naming_the_expected_shape() -> None:
    """unscale_latents of a [1, 32, 4, 4] VAE latent returned [1, 8, 8, 8] when the model had no statistics
    (with them it raised): the channel check ran only against latents_mean."""
    vae = _flux2_without_statistics()
    assert vae.config.latents_mean is None
    with pytest.raises(ValueError) as e:
        vae.unscale_latents(torch.randn(1, 32, 4, 4))
    text = one_line(e)
    assert "(1, 32, 4, 4)" in text and "[B, 128, h, w]" in text, text
    assert vae.unscale_latents(torch.randn(1, 128, 4, 4)).shape == (1, 32, 8, 8)


def test_flux2_scale_of_an_already_scaled_latent_is_an_error() -> None:
    """scale_latents of a [1, 128, 8, 8] (scaled twice) made a [1, 512, 4, 4] without statistics."""
    vae = _flux2_without_statistics()
    with pytest.raises(ValueError) as e:
        vae.scale_latents(torch.randn(1, 128, 8, 8))
    text = one_line(e)
    assert "(1, 128, 8, 8)" in text and "[B, 32, h, w]" in text, text
    assert vae.scale_latents(torch.randn(1, 32, 8, 8)).shape == (1, 128, 4, 4)


# ---- 6. sizes ----

def test_math_of_the_patched_latent_size() -> None:
    # FLUX.2's full-size VAE: factor 8, so a 1024px image is a 128-cell latent and a 64x64 diffusion latent.
    cfg = PRESETS["flux2"]
    z = torch.zeros(1, cfg.latent_channels, 1024 // cfg.downsample_factor, 1024 // cfg.downsample_factor)
    assert cfg.latent_norm.scale(z).shape == (1, 128, 64, 64)
    assert math.prod(cfg.latent_norm.scale(z).shape[1:]) == math.prod(z.shape[1:])
