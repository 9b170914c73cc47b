"""Pins what a mutation audit of klvae.compat (as_diffusers and its DiffusersVAE) found untested: a list of more
generators than images draws the first ones, in the posterior's dtype, as diffusers' randn_tensor; an output field
it lacks is a KeyError; the config names a missing key and refuses every write (del, clear, pop, popitem,
setdefault, update) with its read-only message; private names are never read from the config; from_pretrained and
from_single_file pass an explicit config and dtype on; save_pretrained honours safe_serialization=False; an offload
hook without pre_forward is ignored; tiled passes run with autograd on for an input that wants no gradient, and
under no_grad for one that does, and give back the weights' half dtype; an fp16 overflow with autograd on is not
rerun (frozen weights or not); tile_size is the strip height in image pixels when decoding too; the
refusal of a foreign module names it; and FLUX.2 variances loaded beside the config's own means reach latents_std."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersPosterior
from torch import Tensor, nn

from helpers import perturbed_vae
from klvae import AutoencoderKL
from klvae.compat import DiagonalGaussianDistribution, DiffusersVAE, as_diffusers
from klvae.model.config import PRESETS
from klvae.weights.save import export_ldm
from oracles import SMALL, random_stats


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _latents(b: int = 1, h: int = 4, w: int = 4) -> Tensor:
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def ours() -> DiffusersVAE:
    return as_diffusers(perturbed_vae("tiny"))


def test_more_generators_than_images_draw_the_first_ones_as_diffusers_does() -> None:
    m = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    drawn = DiagonalGaussianDistribution(m).sample(_gens(5, 6, 7))
    assert drawn.shape == (2, 4, 3, 5)
    assert torch.equal(drawn, DiffusersPosterior(m).sample(generator=_gens(5, 6, 7)))
    assert torch.equal(drawn, DiagonalGaussianDistribution(m).sample(_gens(5, 6)))


def test_a_generator_list_draws_in_the_posteriors_dtype_as_diffusers_does() -> None:
    m = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = DiagonalGaussianDistribution(m).sample(_gens(5, 6))
    assert drawn.dtype == torch.float64
    assert torch.equal(drawn, DiffusersPosterior(m).sample(generator=_gens(5, 6)))


def test_an_output_field_it_does_not_have_is_a_key_error(ours: DiffusersVAE) -> None:
    with torch.no_grad():
        decoded, encoded = ours.decode(_latents()), ours.encode(torch.zeros(1, 3, 8, 8))
    for out, key in ((decoded, "nope"), (decoded, "latent_dist"), (encoded, "sample")):
        with pytest.raises(KeyError):
            out[key]


def test_the_configs_attribute_error_names_the_missing_key(ours: DiffusersVAE) -> None:
    with pytest.raises(AttributeError, match="the config has no 'nope'"):
        ours.config.nope  # noqa: B018


def test_every_way_of_writing_the_config_is_refused_as_read_only(ours: DiffusersVAE) -> None:
    config = ours.config
    before = dict(config)
    writes: list[Any] = [
        lambda: delattr(config, "scaling_factor"),
        lambda: config.__delitem__("scaling_factor"),
        config.clear,
        lambda: config.pop("scaling_factor"),
        config.popitem,
        lambda: config.setdefault("new_key", 1),
        lambda: config.update(scaling_factor=1.0),
        lambda: setattr(config, "scaling_factor", 1.0),
    ]
    for write in writes:
        with pytest.raises(TypeError, match="the config is read-only; change the klvae model's config"):
            write()
    assert dict(config) == before


def test_private_names_are_not_read_from_the_config(ours: DiffusersVAE) -> None:
    assert ours.config["_class_name"] == "AutoencoderKL"
    assert not hasattr(ours, "_class_name")
    assert ours.latent_channels == 4  # public keys are


def test_from_pretrained_uses_an_explicit_config(tmp_path: Path) -> None:
    perturbed_vae("tiny").save_pretrained(tmp_path / "vae")
    loaded = DiffusersVAE.from_pretrained(tmp_path / "vae", config=PRESETS["tiny"].replace(scaling_factor=0.5))
    assert loaded.config.scaling_factor == 0.5 and loaded.klvae_model.config.scaling_factor == 0.5


def test_from_single_file_uses_an_explicit_config_and_dtype(tmp_path: Path) -> None:
    path = export_ldm(perturbed_vae("tiny"), tmp_path / "vae.safetensors")
    loaded = DiffusersVAE.from_single_file(
        path, config=PRESETS["tiny"].replace(scaling_factor=0.5), torch_dtype=torch.bfloat16
    )
    assert loaded.config.scaling_factor == 0.5
    assert loaded.dtype == torch.bfloat16


def test_save_pretrained_without_safe_serialization_writes_a_bin(ours: DiffusersVAE, tmp_path: Path) -> None:
    out = ours.save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    back = DiffusersVAE.from_pretrained(out)
    z = _latents()
    with torch.no_grad():
        assert torch.equal(back.decode(z).sample, ours.decode(z).sample)


def test_an_offload_hook_without_pre_forward_is_ignored(ours: DiffusersVAE) -> None:
    ours._hf_hook = SimpleNamespace()
    with torch.no_grad():
        assert ours.decode(_latents()).sample.shape == (1, 3, 8, 8)


def test_a_tiled_pass_runs_with_autograd_on_for_an_input_that_wants_no_gradient(ours: DiffusersVAE) -> None:
    z = _latents(h=8)
    with torch.no_grad():
        untiled = ours.decode(z).sample
    ours.enable_tiling(tile_size=4)
    torch.testing.assert_close(ours.decode(z).sample, untiled, rtol=1e-4, atol=1e-4)


def test_a_tiled_pass_under_no_grad_takes_an_input_that_wants_gradients(ours: DiffusersVAE) -> None:
    z = _latents(h=8).requires_grad_(True)
    with torch.no_grad():
        untiled = ours.decode(z).sample
        ours.enable_tiling(tile_size=4)
        tiled = ours.decode(z).sample
    torch.testing.assert_close(tiled, untiled, rtol=1e-4, atol=1e-4)


def test_a_tiled_half_precision_pass_returns_the_weights_dtype(ours: DiffusersVAE) -> None:
    ours.to(torch.bfloat16).enable_tiling(tile_size=4)
    with torch.no_grad():
        decoded = ours.decode(_latents(h=8)).sample
        moments = ours.encode(torch.zeros(1, 3, 16, 8)).latent_dist.parameters
    assert decoded.dtype == moments.dtype == torch.bfloat16


@pytest.mark.parametrize("frozen", [False, True])
def test_an_overflowing_half_precision_pass_with_autograd_on_is_not_rerun(
    frozen: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # As diffusers runs it, whether the weights or the latents want gradients: the fp32 rerun would swap the
    # weights' dtype under a recorded graph, so the model's own fp16 pass (non-finite here) comes back.
    vae = perturbed_vae("tiny")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's 65504
    vae.half().requires_grad_(not frozen)
    z = _latents().half().requires_grad_(frozen)
    with caplog.at_level(logging.WARNING):
        out = as_diffusers(vae).decode(z).sample
    assert "rerunning" not in caplog.text
    assert out.requires_grad and out.dtype == torch.float16 and not torch.isfinite(out).all()
    assert torch.equal(out.nan_to_num(), vae.decode(z).nan_to_num())


def test_tile_size_is_the_strip_height_in_image_pixels_when_decoding(
    ours: DiffusersVAE, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 48-row image (24 latent rows) in strips of 8 image rows: the last conv (3 output channels) runs 6 times.
    conv_out = ours.decoder.conv_out.weight.shape
    calls: list[int] = []
    real = nn.functional.conv2d

    def counted(x: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if weight.shape == conv_out:
            calls.append(x.shape[2])
        return real(x, weight, *args, **kwargs)

    ours.enable_tiling(tile_size=8)
    monkeypatch.setattr(nn.functional, "conv2d", counted)
    with torch.no_grad():
        assert ours.decode(_latents(h=24)).sample.shape == (1, 3, 48, 8)
    assert len(calls) == 6


def test_as_diffusers_names_what_it_refuses() -> None:
    with pytest.raises(TypeError, match=r"as_diffusers wraps a klvae\.AutoencoderKL, not a Linear"):
        as_diffusers(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_flux2_variances_loaded_beside_the_configs_own_means_reach_latents_std() -> None:
    mean, std = random_stats()
    ours = as_diffusers(AutoencoderKL(SMALL.replace(latents_mean=mean, latents_std=std)))
    sd = ours.state_dict()
    sd["bn.running_var"] = sd["bn.running_var"] * 4  # the means stay the config's own
    ours.load_state_dict(sd)
    cfg = ours.klvae_model.config
    assert cfg.latents_mean is not None and cfg.latents_std is not None
    f64 = torch.float64
    torch.testing.assert_close(
        torch.tensor(cfg.latents_mean, dtype=f64), torch.tensor(mean, dtype=f64), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(torch.tensor(cfg.latents_std, dtype=f64), sd["bn.running_var"].double().add(1e-4).sqrt())
