"""klvae.compat: a klvae model behind diffusers' AutoencoderKL API. The same random weights in diffusers' model and
the adapter give the same posteriors, samples, images and pipeline outputs; the config has diffusers' keys and
values; tiling is klvae's exact tiling; slicing, dtypes, offload hooks and saving behave as diffusers'. Run with -s
to see the measured differences."""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import klvae.compat
from helpers import perturbed_vae
from klvae import AutoencoderKL
from klvae.compat import DiffusersVAE, as_diffusers
from klvae.errors import KlvaeError
from klvae.inference import estimate_bytes
from klvae.model.config import PRESETS, AutoencoderKLConfig
from klvae.weights import config_to_diffusers
from oracles import SMALL, TOL, diffusers_vae, flux2_diffusers, randomize

TINY = PRESETS["tiny"]  # factor 2: small images still give latents of some size


def pair(cfg: AutoencoderKLConfig = TINY, seed: int = 0) -> tuple[nn.Module, DiffusersVAE]:
    """diffusers' AutoencoderKL with random weights, and the adapter loaded from its state_dict (same keys)."""
    theirs = diffusers_vae(cfg, seed)
    ours = as_diffusers(AutoencoderKL(cfg))
    ours.load_state_dict(theirs.state_dict())  # strict: the adapter's keys are diffusers' keys
    return theirs, ours.eval()


def images(b: int = 2, h: int = 24, w: int = 32, seed: int = 1) -> Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return (a - b).abs().max().item()


@torch.no_grad()
def test_encode_decode_and_forward_match_diffusers() -> None:
    theirs, ours = pair()
    x = images()
    p, q = ours.encode(x).latent_dist, theirs.encode(x).latent_dist
    (p_tuple,) = ours.encode(x, return_dict=False)
    z = q.sample(generator=gen())
    diffs = {
        **{name: max_diff(getattr(p, name), getattr(q, name)) for name in ("parameters", "mean", "std", "var",
                                                                           "logvar")},
        "return_dict=False": max_diff(p_tuple.mean, q.mean),
        "sample(generator)": max_diff(p.sample(generator=gen()), z),
        "sample([generators])": max_diff(p.sample([gen(5), gen(6)]), q.sample([gen(5), gen(6)])),
        "mode": max_diff(p.mode(), q.mode()),
        "kl": max_diff(p.kl(), q.kl()),
        "kl(other)": max_diff(p.kl(ours.encode(x.flip(0)).latent_dist), q.kl(theirs.encode(x.flip(0)).latent_dist)),
        "nll": max_diff(p.nll(z), q.nll(z)),
        "decode": max_diff(ours.decode(z).sample, theirs.decode(z).sample),
        "decode(return_dict=False)": max_diff(ours.decode(z, return_dict=False)[0],
                                              theirs.decode(z, return_dict=False)[0]),
        "forward": max_diff(ours(x).sample, theirs(x).sample),
        "forward(sample_posterior)": max_diff(ours(x, sample_posterior=True, generator=gen(3)).sample,
                                              theirs(x, sample_posterior=True, generator=gen(3)).sample),
        "forward(return_dict=False)": max_diff(ours(x, return_dict=False)[0], theirs(x, return_dict=False)[0]),
    }
    print("\ncompat vs diffusers, max abs diff: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    # The draws differ with the seed (a sampler that ignored its generator would pass the equalities above).
    assert max_diff(p.sample(generator=gen(1)), z) > 1e-2
    assert max_diff(p.sample([gen(5), gen(6)]), p.sample([gen(5), gen(7)])) > 1e-2
    # diffusers' BaseOutput access.
    out = ours.decode(z)
    assert out[0] is out.sample and out["sample"] is out.sample and out.to_tuple() == (out.sample,)
    assert ours.encode(x)["latent_dist"].mean.shape == (2, 4, 12, 16)
    with pytest.raises(KeyError):
        out["commit_loss"]  # None, as diffusers leaves it out


@torch.no_grad()
def test_dit_pipeline_gives_the_same_images_with_the_adapter() -> None:
    cfg = PRESETS["tiny-f8"]
    theirs, ours = pair(cfg, seed=2)
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=cfg.latent_channels, out_channels=8, num_layers=1,
        norm_num_groups=2, sample_size=8, patch_size=2,
    ).eval()
    randomize(transformer, 3)
    out: list[np.ndarray] = []
    for vae in (ours, theirs):
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe(class_labels=[1, 7], generator=gen(), num_inference_steps=2, output_type="np").images)
        assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    pipe.vae = ours  # the README's way into a pipeline that from_pretrained loaded (with vae=None)
    out.append(pipe(class_labels=[1, 7], generator=gen(), num_inference_steps=2, output_type="np").images)
    diff = max(np.abs(out[1] - out[0]).max(), np.abs(out[1] - out[2]).max())  # out[1]: diffusers' VAE
    print(f"\nDiTPipeline images, diffusers' VAE vs the adapter: max abs diff {diff:.3g}")
    assert out[0].shape == (2, 64, 64, 3) and diff <= TOL
    # Not saturated by the pipeline's clamp to [0, 1], so a wrong scaling_factor or decode would show.
    assert out[1].std() > 0.1 and ((out[1] > 0) & (out[1] < 1)).mean() > 0.5


def _count_tiled(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"tiled_encode_moments": 0, "tiled_decode": 0}
    for name in calls:
        real = getattr(klvae.compat, name)

        def counted(*args: object, _real=real, _name=name, **kwargs: object) -> object:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(klvae.compat, name, counted)
    return calls


@torch.no_grad()
def test_enable_tiling_is_exact_where_diffusers_tiling_leaves_seams(monkeypatch: pytest.MonkeyPatch) -> None:
    theirs, ours = pair()
    calls = _count_tiled(monkeypatch)
    x = images(1, 48, 32)
    z = theirs.encode(x).latent_dist.mode().contiguous()
    moments, decoded = theirs.encode(x).latent_dist.parameters, theirs.decode(z).sample
    ours.enable_tiling(tile_size=8)  # strips of 8 image rows: 6 strips at the image, 3 at the latent
    assert ours.use_tiling
    tiled = ours.encode(x).latent_dist.parameters, ours.decode(z).sample
    assert calls == {"tiled_encode_moments": 1, "tiled_decode": 1}
    exact = max_diff(tiled[0], moments), max_diff(tiled[1], decoded)
    # diffusers' tiling on the same weights, with tiles smaller than the image: each tile runs the whole network.
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size = 16, 8
    seams = (max_diff(theirs.encode(x).latent_dist.parameters, moments), max_diff(theirs.decode(z).sample, decoded))
    print(f"\ntiled vs untiled, max abs diff: klvae's (encode, decode) {exact}, diffusers' {seams}")
    assert max(exact) <= 1e-4 and min(seams) > 1e-2
    ours.disable_tiling()
    ours.decode(z)
    assert calls["tiled_decode"] == 1


@torch.no_grad()
def test_default_tiling_tiles_over_the_memory_budget_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _, ours = pair()
    calls = _count_tiled(monkeypatch)
    z = torch.randn(1, 4, 8, 8, generator=gen())
    ours.enable_tiling()  # 2 GiB: a 16x16 decode stays untiled
    ours.decode(z)
    assert calls["tiled_decode"] == 0
    # Just under the untiled pass's estimate: tiled (in few strips, which keeps the test fast).
    ours.enable_tiling(max_memory=estimate_bytes(ours.klvae_model, "decode", (1, 3, 16, 16), torch.float32) - 1)
    ours.decode(z)
    assert calls["tiled_decode"] == 1
    assert ours.decode(z).sample.device == z.device


@torch.no_grad()
def test_enable_slicing_runs_one_image_at_a_time() -> None:
    theirs, ours = pair()
    x = images(3)
    sizes: list[int] = []
    for module in (ours.encoder, ours.decoder):
        module.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    whole = ours(x).sample
    assert sizes == [3, 3]
    sizes.clear()
    ours.enable_slicing()
    theirs.enable_slicing()
    sliced = ours(x).sample
    assert sizes == [1] * 6 and ours.use_slicing
    assert max_diff(sliced, theirs(x).sample) <= TOL and max_diff(sliced, whole) <= TOL
    ours.disable_slicing()
    sizes.clear()
    ours(x)
    assert sizes == [3, 3]


def _comparable(config: dict) -> dict:
    """Public keys, sequences as lists (diffusers keeps tuples from keyword arguments, lists from JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_has_diffusers_keys_and_values(name: str) -> None:
    cfg = PRESETS[name]
    flux2 = cfg.latent_patch_size > 1
    with torch.device("meta"):
        ours = as_diffusers(AutoencoderKL(cfg))
        cls = diffusers.AutoencoderKLFlux2 if flux2 else diffusers.AutoencoderKL
        theirs = cls.from_config(config_to_diffusers(cfg))
    assert _comparable(ours.config) == _comparable(theirs.config)
    assert ours.config["_class_name"] == cls.__name__
    # What pipelines compute from it, against klvae's own figures.
    assert 2 ** (len(ours.config.block_out_channels) - 1) == cfg.downsample_factor
    assert ours.config.latent_channels == cfg.latent_channels
    if flux2:
        assert ours.config.patch_size == [2, 2] and ours.config.batch_norm_eps == 1e-4
        assert not hasattr(ours.config, "scaling_factor")  # AutoencoderKLFlux2 has none
    else:
        assert (ours.config.scaling_factor, ours.config.shift_factor) == (cfg.scaling_factor, cfg.shift_factor)
        assert ours.config.force_upcast == cfg.force_upcast
        assert ours.config.latents_mean == (None if cfg.latents_mean is None else list(cfg.latents_mean))


def test_flux2_bn_statistics_config_and_weights_round_trip(tmp_path: Path) -> None:
    theirs = flux2_diffusers()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = DiffusersVAE.from_pretrained(tmp_path / "theirs")
    assert _comparable(ours.config) == _comparable(theirs.config)
    assert set(ours.state_dict()) == set(theirs.state_dict())  # bn.* included
    # What Flux2Pipeline reads: running_mean and sqrt(running_var + batch_norm_eps), to float32's rounding.
    torch.testing.assert_close(ours.bn.running_mean, theirs.bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.bn.running_var, theirs.bn.running_var, rtol=1e-5, atol=1e-6)
    x = images(1, 32, 48)
    with torch.no_grad():
        assert max_diff(ours.encode(x).latent_dist.mode(), theirs.encode(x).latent_dist.mode()) <= TOL
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(back.bn.running_var, theirs.bn.running_var, rtol=1e-5, atol=1e-6)
    assert _comparable(back.config) == _comparable(theirs.config)


def test_save_pretrained_and_from_pretrained(tmp_path: Path) -> None:
    theirs, ours = pair()
    ours.save_pretrained(tmp_path / "vae")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    again = DiffusersVAE.from_pretrained(tmp_path / "vae", torch_dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16 and not again.training
    z = torch.randn(1, 4, 6, 5, generator=gen())
    with torch.no_grad():
        assert max_diff(back.decode(z).sample, theirs.decode(z).sample) <= TOL
        assert again.decode(z).sample.dtype == torch.bfloat16


def test_half_precision_overflow_is_rerun_in_fp32(caplog: pytest.LogCaptureFixture) -> None:
    vae = perturbed_vae("tiny")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's 65504
    ours = as_diffusers(vae)
    z = torch.randn(1, 4, 4, 4, generator=gen())
    with torch.no_grad():
        reference = ours.decode(z).sample
        ours.half()
        assert not torch.isfinite(vae.decode(z.half())).all()  # where diffusers' pass gives NaN
        with caplog.at_level(logging.WARNING):
            out = ours.decode(z).sample
    assert "rerunning this step in fp32" in caplog.text
    assert out.dtype == torch.float16 and ours.dtype == torch.float16  # the weights are put back
    torch.testing.assert_close(out.float(), reference, atol=2e-3, rtol=2e-3)


def test_module_plumbing_that_pipelines_use() -> None:
    theirs, ours = pair()
    vae = ours.klvae_model
    assert as_diffusers(ours) is ours and ours.encoder is vae.encoder
    with pytest.raises(TypeError):
        as_diffusers(theirs)
    # SDXL's upcast path: vae.to(dtype=...), then the latents to post_quant_conv's dtype; one set of weights.
    ours.to(dtype=torch.float64)
    assert ours.dtype == vae.dtype == next(iter(ours.post_quant_conv.parameters())).dtype == torch.float64
    z = torch.randn(1, 4, 6, 5, generator=gen(), dtype=torch.float64)
    with torch.no_grad():
        assert ours.decode(z).sample.dtype == torch.float64
    ours.float()
    # enable_model_cpu_offload: accelerate's hook must see encode and decode, not just forward.
    seen: list[nn.Module] = []
    ours._hf_hook = SimpleNamespace(pre_forward=seen.append)
    with torch.no_grad():
        ours.decode(z.float())
        ours.encode(images(1))
    assert seen == [ours, ours]
    del ours._hf_hook
    # Gradients flow through untiled passes; tiled ones refuse an input that wants them.
    zz = z.float().requires_grad_(True)
    ours.decode(zz).sample.square().sum().backward()
    assert zz.grad is not None and zz.grad.abs().sum() > 0
    ours.enable_tiling(tile_size=8)
    with pytest.raises(KlvaeError, match="disable_tiling"):
        ours.decode(zz)


def test_config_reads_like_diffusers_and_is_read_only() -> None:
    _, ours = pair()
    config = ours.config
    assert config.scaling_factor == config["scaling_factor"] == ours.scaling_factor == 0.18215
    assert getattr(config, "shift_factor", "absent") is None and getattr(config, "nope", "absent") == "absent"
    with pytest.raises(AttributeError):
        ours.nope  # noqa: B018
    with pytest.raises(TypeError):
        config.scaling_factor = 1.0
    with pytest.raises(TypeError):
        config["scaling_factor"] = 1.0
    assert copy.deepcopy(ours).config == config and pickle.loads(pickle.dumps(config)) == config
    clone = copy.deepcopy(ours)
    assert clone.encoder is clone.klvae_model.encoder and clone.encoder is not ours.encoder


def test_configs_diffusers_cannot_express_keep_klvae_names() -> None:
    ours = as_diffusers(perturbed_vae("tiny", attention="linear"))
    assert ours.config.attention == "linear" and ours.config.scaling_factor == TINY.scaling_factor
    x = images(1, 16, 16)
    with torch.no_grad():
        assert max_diff(ours(x).sample, ours.klvae_model(x, sample_posterior=False)[0]) == 0


def test_flux2_bn_loaded_by_load_state_dict_reaches_the_model_and_save_pretrained(tmp_path: Path) -> None:
    # A FLUX.2 state_dict loaded into the adapter: the statistics in bn.* are the model's, not dropped on saving.

    theirs = flux2_diffusers()
    ours = as_diffusers(AutoencoderKL(SMALL))
    ours.load_state_dict(theirs.state_dict())
    assert ours.klvae_model.config.latents_mean is not None
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(back.bn.running_mean, theirs.bn.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(back.bn.running_var, theirs.bn.running_var, rtol=1e-5, atol=1e-6)
    clone = pickle.loads(pickle.dumps(ours))
    torch.testing.assert_close(clone.bn.running_mean, theirs.bn.running_mean)


def test_reloading_its_own_half_precision_bn_keeps_the_configs_statistics(caplog: pytest.LogCaptureFixture) -> None:
    from test_flux2 import SMALL, random_stats

    mean, std = random_stats()
    ours = as_diffusers(AutoencoderKL(SMALL.replace(latents_mean=mean, latents_std=std))).half()
    with caplog.at_level(logging.WARNING):
        ours.load_state_dict(ours.state_dict())
    assert ours.klvae_model.config.latents_mean == mean and "replace" not in caplog.text


def test_from_single_file_loads_an_ldm_file_as_diffusers_users_call_it(tmp_path: Path) -> None:
    from klvae import AutoencoderKL
    from klvae.compat import DiffusersVAE
    from klvae.weights.save import export_ldm

    vae = AutoencoderKL("tiny")
    path = export_ldm(vae, tmp_path / "vae.safetensors")
    for loaded in (AutoencoderKL.from_single_file(path), DiffusersVAE.from_single_file(str(path))._klvae):
        assert loaded.config == vae.config
        for (k, a), b in zip(vae.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="is a folder"):
        AutoencoderKL.from_single_file(tmp_path)
