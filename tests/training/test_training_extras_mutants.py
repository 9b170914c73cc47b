"""Pins what a mutation audit of the critic, EMA, sampler, model setup and validation modules found untested:
the PatchGAN's n_layers check, awaits_init outside training and the BatchNorm bias init; make_ema's default
warm-up; the sampler's rank slicing, resume position, batch length, epoch tags, length and per-item seeding;
build_model's checkpointing, decoder_only freezing, train mode, override handling and messages; and validate's
metric averaging, clamping, posterior mean, SSIM/LPIPS size gates, train-mode restore and sample grid."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

import klvae
from helpers import one_line, perturbed_vae
from klvae.errors import KlvaeError, WeightsError
from klvae.evaluation.metrics import psnr, ssim
from klvae.images import tensor_to_uint8
from klvae.training import validate as val_mod
from klvae.training.config import load_config
from klvae.training.ema import make_ema
from klvae.training.losses.discriminator import NLayerDiscriminator, weights_init
from klvae.training.model_setup import build_model
from klvae.training.sampler import GlobalBatchSampler, SeededItems, fewer_per_process

# ---------------------------------------------------------------- discriminator


def test_patchgan_refuses_zero_layers() -> None:
    with pytest.raises(ValueError, match="n_layers must be >= 1, got 0"):
        NLayerDiscriminator(n_layers=0)


def test_awaits_init_only_in_training_mode() -> None:
    d = NLayerDiscriminator(ndf=4, n_layers=1, use_actnorm=True)
    assert d.awaits_init()
    assert not d.eval().awaits_init()


def test_weights_init_zeroes_batchnorm_bias() -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.bias.fill_(3.0)
    bn.apply(weights_init)
    assert torch.equal(bn.bias, torch.zeros(4))


# ---------------------------------------------------------------- EMA


def test_make_ema_warms_up_by_default() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = make_ema(model, 0.9999)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # decay min(0.9999, 2/11)
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11, rel=1e-5)


# ---------------------------------------------------------------- sampler


def test_fewer_per_process_when_the_items_just_fill_the_processes() -> None:
    assert fewer_per_process(2, 2, "b") == "set b to 1 or less"


def _take(s: GlobalBatchSampler, k: int) -> list[list[tuple[int, int]]]:
    it = iter(s)
    return [next(it) for _ in range(k)]


def test_ranks_split_each_global_batch_in_rank_order() -> None:
    world, local, n = 3, 2, 13
    whole = _take(GlobalBatchSampler(n, local * world, seed=5), 5)  # per epoch 2: spans an epoch change
    parts = [_take(GlobalBatchSampler(n, local, rank=r, world=world, seed=5), 5) for r in range(world)]
    for k in range(5):
        assert [item for p in parts for item in p[k]] == whole[k]
        assert all(len(p[k]) == local for p in parts)
    assert [b[0][1] for b in whole] == [0, 0, 1, 1, 2]  # each item tagged with its epoch
    assert len(GlobalBatchSampler(n, local, world=world)) == 2


def test_a_sampler_started_later_continues_the_same_stream() -> None:
    assert _take(GlobalBatchSampler(10, 3, seed=1, start_batch=4), 3) == _take(GlobalBatchSampler(10, 3, seed=1), 7)[4:]


class _Draws:
    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> tuple[float, float, float]:
        return torch.rand(()).item(), random.random(), float(np.random.rand())


def test_seeded_items_seed_every_generator_per_index() -> None:
    items = SeededItems(_Draws(), seed=3)
    assert len(items) == 5
    a, again, other = items[(2, 0)], items[(2, 0)], items[(3, 0)]
    assert a == again
    assert all(x != y for x, y in zip(a, other, strict=True))


# ---------------------------------------------------------------- model setup


def _cfg(tmp_path: Path, *sets: str):
    return load_config(None, ["data.train=x", "data.resolution=32", f"train.out_dir={tmp_path / 'run'}", *sets])


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturbed_vae("tiny", seed=1).save_pretrained(tmp_path_factory.mktemp("w") / "tiny")


def test_build_model_from_a_preset_trains_with_the_settings(tmp_path: Path) -> None:
    vae = build_model(_cfg(tmp_path, "model.preset=tiny", "model.gradient_checkpointing=true",
                           "model.decoder_only=true"))
    assert vae.training and vae.encoder.gradient_checkpointing and vae.decoder.gradient_checkpointing
    frozen = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in vae.decoder.parameters())
    assert all(p.requires_grad for p in vae.post_quant_conv.parameters())


def test_build_model_from_pretrained_is_in_train_mode_with_everything_trainable(tmp_path: Path,
                                                                              saved_tiny: Path) -> None:
    vae = build_model(_cfg(tmp_path, f"model.pretrained={saved_tiny}"))
    assert vae.training and all(p.requires_grad for p in vae.parameters())


def test_overrides_keep_the_weights_and_the_seed_stream(tmp_path: Path, saved_tiny: Path) -> None:
    torch.manual_seed(7)
    plain = build_model(_cfg(tmp_path, f"model.pretrained={saved_tiny}"))
    expected = torch.rand(4)
    torch.manual_seed(7)
    changed = build_model(_cfg(tmp_path, f"model.pretrained={saved_tiny}", "model.overrides={scaling_factor: 0.5}"))
    assert torch.equal(torch.rand(4), expected)
    assert changed.config.scaling_factor == 0.5 and plain.config.scaling_factor != 0.5
    sd = plain.state_dict()
    assert all(torch.equal(t, sd[k]) for k, t in changed.state_dict().items())


def test_a_bad_override_value_is_named_under_model_overrides(tmp_path: Path, saved_tiny: Path) -> None:
    with pytest.raises(KlvaeError) as e:
        build_model(_cfg(tmp_path, f"model.pretrained={saved_tiny}", "model.overrides={scaling_factor: -1.0}"))
    assert one_line(e) == "model.overrides: scaling_factor must be a finite positive number, got -1.0"


def test_a_missing_pretrained_says_so_and_hints_for_a_final_export(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as e:
        build_model(_cfg(tmp_path, f"model.pretrained={tmp_path / 'stage1' / 'final'}"))
    msg = one_line(e)
    assert msg.startswith("model.pretrained: ") and msg.endswith("(train the run that exports it first)")
    with pytest.raises(WeightsError) as e:
        build_model(_cfg(tmp_path, f"model.pretrained={tmp_path / 'elsewhere'}"))
    assert one_line(e).startswith("model.pretrained: ") and "train the run" not in one_line(e)


# ---------------------------------------------------------------- validation


class _Stub(nn.Module):
    """y = 3 * x + shift (outside [-1, 1] often, so the clamp matters); records sample_posterior."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[bool] = []

    def forward(self, x: Tensor, sample_posterior: bool = True) -> tuple[Tensor]:
        self.calls.append(sample_posterior)
        return (3 * x + 0.1 + (0.5 if sample_posterior else 0.0),)


def _batches(sizes: tuple[int, ...], h: int = 16, w: int = 16) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(b, 3, h, w, generator=g) * 0.8 - 0.4 for b in sizes]


def test_validate_averages_per_image_over_the_posterior_mean_clamped(tmp_path: Path) -> None:
    stub, batches = _Stub().train(), _batches((3, 1))
    got = val_mod.validate(stub, batches, torch.device("cpu"), None, None)
    x = torch.cat(batches)
    y = (3 * x + 0.1).clamp(-1, 1)
    assert set(got) == {"psnr", "ssim"}
    assert got["psnr"] == pytest.approx(psnr(x, y, data_range=2.0).mean().item(), rel=1e-5)
    assert got["ssim"] == pytest.approx(ssim(x, y, data_range=2.0).mean().item(), rel=1e-5)
    assert stub.calls == [False, False] and stub.training
    val_mod.validate(stub.eval(), batches, torch.device("cpu"), None, None)
    assert not stub.training


def test_validate_gates_ssim_on_the_shorter_side() -> None:
    stub = _Stub()
    assert set(val_mod.validate(stub, _batches((2,), 11, 11), torch.device("cpu"), None, None)) == {"psnr", "ssim"}
    assert set(val_mod.validate(stub, _batches((2,), 8, 32), torch.device("cpu"), None, None)) == {"psnr"}


def test_validate_measures_lpips_from_16_pixels_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(val_mod, "_pretrained_lpips", lambda *a: lambda x, y: torch.full((x.shape[0],), 0.25))
    stub = _Stub()
    got = val_mod.validate(stub, _batches((2,), 16, 16), torch.device("cpu"), None)
    assert got["lpips"] == pytest.approx(0.25)
    assert "lpips" not in val_mod.validate(stub, _batches((2,), 16, 16), torch.device("cpu"), None, None)


def test_validate_without_batches_reports_zeros_and_writes_no_grid(tmp_path: Path) -> None:
    grid = tmp_path / "g.png"
    assert val_mod.validate(_Stub(), [], torch.device("cpu"), grid, None) == {"psnr": 0.0, "ssim": 0.0}
    assert not grid.exists()


def test_the_grid_shows_eight_originals_over_their_reconstructions(tmp_path: Path) -> None:
    batches = _batches((3, 3, 3))
    grid = tmp_path / "sub" / "dir" / "samples.png"
    val_mod.validate(_Stub(), batches, torch.device("cpu"), grid, None)
    img = np.asarray(Image.open(grid).convert("RGB"))
    assert img.shape == (32, 8 * 16, 3)
    x = torch.cat(batches)[:8]
    y = (3 * x + 0.1).clamp(-1, 1)
    for i in range(8):
        assert np.array_equal(img[:16, 16 * i : 16 * (i + 1)], tensor_to_uint8(x[i]))
        assert np.array_equal(img[16:, 16 * i : 16 * (i + 1)], tensor_to_uint8(y[i]))


def test_validate_runs_a_real_tiny_model_through_the_posterior_mean() -> None:
    vae = perturbed_vae("tiny")
    batches = _batches((2,))
    got = val_mod.validate(vae, batches, torch.device("cpu"), None, None)
    with torch.no_grad():
        y = vae(batches[0], sample_posterior=False)[0].clamp(-1, 1)
    assert got["psnr"] == pytest.approx(psnr(batches[0], y, data_range=2.0).mean().item(), rel=1e-5)
    assert isinstance(vae, klvae.AutoencoderKL) and not vae.training
