"""Training behaviour pinned by value: the learning rate of both optimisers step by step through the warm-up, the
critic's first step, gradient clipping and accumulation (gradients and logs averaged over micro-batches), the
non-finite streak, the posterior sample, what a checkpoint carries back (counters, loss scales, RNG streams), the
cadence of logging, validation and checkpoints, validation's metrics and centre crops, and the data order."""

import io
import json
import logging
import math
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import CRITIC, noise_folder, noise_png, perturbed_vae, tiny_batch, tiny_train_config
from klvae.distributed import DistInfo
from klvae.errors import KlvaeError
from klvae.evaluation.metrics import psnr
from klvae.posterior import DiagonalGaussian
from klvae.training import checkpoint as ckpt
from klvae.training import data as data_module
from klvae.training import loop as loop_module
from klvae.training.config import TrainConfig
from klvae.training.data import ImageTransform, TransformConfig
from klvae.training.data_setup import build_train_loader, build_val_batches
from klvae.training.loop import DroppedRun, fit
from klvae.training.sampler import GlobalBatchSampler, SeededItems
from klvae.training.trainer import Reconstruct, Trainer, lr_factor
from klvae.training.validate import validate


def _norm(params: list[torch.nn.Parameter]) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))


# ---- one optimiser step ----------------------------------------------------------------------------------------
def test_warm_up_lr_critic_start_and_clipping_step_by_step(tmp_path: Path) -> None:
    tr = Trainer(tiny_train_config(tmp_path, *CRITIC, "loss.disc_start=1", "optim.disc_lr=3e-4",
                                   "optim.warmup_steps=4", "optim.schedule=cosine", "train.max_steps=8",
                                   "optim.grad_clip=1e-4"))
    assert tr.opt_d is not None
    ae = [p for g in tr.opt_ae.param_groups for p in g["params"]]
    for step in range(3):
        critic = [p.detach().clone() for p in tr.disc_params]
        logs = tr.train_step([tiny_batch(step)])
        factor = lr_factor(step, 4, "cosine", 8)
        assert factor == pytest.approx((step + 1) / 4)  # the step's own lr: 1/4 of it at step 0, not 2/4
        assert logs["lr"] == pytest.approx(1e-3 * factor)
        assert tr.opt_d.param_groups[0]["lr"] == pytest.approx(3e-4 * factor)  # optim.disc_lr, not optim.lr
        # The gradients left by the step were clipped to the global norm optim.grad_clip.
        assert _norm(ae) == pytest.approx(1e-4, rel=1e-3)
        moved = any(not torch.equal(a, b) for a, b in zip(critic, tr.disc_params, strict=True))
        assert moved == (step >= 1)  # loss.disc_start=1: the critic first trains in the step counted 1
        if step >= 1:
            assert _norm(tr.disc_params) == pytest.approx(1e-4, rel=1e-3)


def test_accumulated_micro_batches_average_gradients_and_logs(tmp_path: Path) -> None:
    # Two micro-batches of the same images must give one micro-batch's gradients and logs (means, not sums).
    sets = (*CRITIC, "loss.disc_start=0")
    two = Trainer(tiny_train_config(tmp_path, *sets, "optim.grad_accum=2"))
    one = Trainer(tiny_train_config(tmp_path, *sets))
    x = tiny_batch()
    logs_two, logs_one = two.train_step([x, x]), one.train_step([x])
    assert logs_two.keys() == logs_one.keys() and "d_loss" in logs_two
    for k in logs_one:
        assert logs_two[k] == pytest.approx(logs_one[k], rel=1e-4, abs=1e-6), k
    for name, a, b in [("vae", two.vae, one.vae), ("critic", two.loss, one.loss)]:
        for (k, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            if p.grad is not None or q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=f"{name} {k}")
    # A full (not decoder-only) run trains the encoder: its gradients are there and not all zero.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in one.vae.encoder.parameters())


def test_a_finite_step_ends_a_non_finite_streak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Trainer(tiny_train_config(tmp_path, "train.max_nonfinite=2"))
    real = tr.loss.generator_loss

    def every_other_nan(*args: object, **kwargs: object) -> tuple[torch.Tensor, dict]:
        loss, logs = real(*args, **kwargs)
        return (loss * float("nan") if tr.step % 2 == 0 else loss), logs

    monkeypatch.setattr(tr.loss, "generator_loss", every_other_nan)
    skipped = [tr.train_step([tiny_batch(i)])["skipped"] for i in range(5)]  # 3 non-finite, never 2 in a row
    assert skipped == [1.0, 0.0, 1.0, 0.0, 1.0] and tr.nonfinite_run == 1


def test_the_training_forward_decodes_mean_plus_std_times_noise(tmp_path: Path) -> None:
    # train.sample_posterior: the step's noise from its own seed; false: none (the posterior mean is decoded).
    tr = Trainer(tiny_train_config(tmp_path, "train.sample_posterior=true"))
    shape = (2, tr.vae.config.latent_channels, 16 // tr.vae.downsample_factor, 16 // tr.vae.downsample_factor)
    want = torch.randn(shape, generator=torch.Generator().manual_seed(tr.noise_seed(0, 1)))
    assert torch.equal(tr._noise(tiny_batch(), 1), want)
    assert Trainer(tiny_train_config(tmp_path))._noise(tiny_batch(), 1) is None
    vae = perturbed_vae()
    side = 16 // vae.downsample_factor
    x = tiny_batch()
    noise = torch.randn(2, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        rec, moments = Reconstruct(vae, decoder_only=False)(x, noise)
        post = DiagonalGaussian(moments)
        assert post.std.sub(1).abs().max() > 1e-3  # the std is not 1: a dropped factor would show
        torch.testing.assert_close(rec, vae.decode(post.mean + post.std * noise))
        torch.testing.assert_close(Reconstruct(vae, False)(x, None)[0], vae.decode(post.mean))


# ---- what a checkpoint carries back ------------------------------------------------------------------------------
def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def test_a_checkpoint_restores_counters_loss_scales_and_random_streams(tmp_path: Path) -> None:
    cfg = tiny_train_config(tmp_path, *CRITIC, "train.precision=fp16")
    tr = Trainer(cfg)
    for scaler, scale in ((tr.scaler, 512.0), (tr.d_scaler, 256.0)):
        scaler.scale(torch.ones(()))  # creates the scale, which update() then sets
        scaler.update(scale)
    tr.step, tr.batches_done, tr.nonfinite_run = 7, 9, 2
    state = tr.state_dict()
    saved = _draws()
    other = Trainer(cfg)  # seeds torch's generator: only the draws after it move every generator on
    _draws()
    other.load_state_dict(state)
    assert (other.step, other.batches_done, other.nonfinite_run) == (7, 9, 2)
    assert (other.scaler.get_scale(), other.d_scaler.get_scale()) == (512.0, 256.0)
    again = _draws()  # Python's, NumPy's and torch's generators all go on from the save
    assert again[:2] == saved[:2] and torch.equal(again[2], saved[2])


def test_a_saved_optimiser_state_with_a_beta_of_1_is_refused() -> None:
    # Adam divides by 1 - beta2**step: a beta of 1 would turn the first step after the resume into NaN weights.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.5, 0.9))
    saved = opt.state_dict()
    assert ckpt.optimizer_state_problem(opt, saved) is None
    saved["param_groups"][0]["betas"] = (0.5, 1.0)
    assert ckpt.optimizer_state_problem(opt, saved) == "param_groups[0] betas are (0.5, 1.0), not in [0, 1)"


# ---- the loop's cadence ------------------------------------------------------------------------------------------
def test_logs_validation_and_checkpoints_follow_their_cadence_and_the_last_step(tmp_path: Path) -> None:
    noise_folder(tmp_path / "images", 4, hw=(20, 20))
    noise_folder(tmp_path / "val", 3, hw=(20, 20))
    tr = Trainer(tiny_train_config(tmp_path, "train.max_steps=5", "train.log_every=2", "train.val_every=2",
                                   "train.ckpt_every=2", f"data.val={tmp_path / 'val'}", "train.val_lpips=false"))
    fit(tr)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 5]  # every 2 steps, and the last
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4, 5] and all(r["psnr"] > 0 for r in val)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_{s:08d}.png" for s in (2, 4, 5)]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000004.pt", "step_00000005.pt"]


def test_a_run_at_max_steps_without_an_export_exports_and_only_rank_0_reads_validation_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on resuming a run killed after its last checkpoint but before final/ was written.
    noise_folder(tmp_path / "images", 4, hw=(20, 20))
    cfg = tiny_train_config(tmp_path, "train.max_steps=2", f"data.val={tmp_path / 'images'}", "train.val_lpips=false")
    reads: list[TrainConfig] = []
    monkeypatch.setattr(loop_module, "build_val_batches", lambda c: reads.append(c) or [])
    other = Trainer(cfg)
    other.dist, other.step = DistInfo(rank=1, world=2), 2
    assert fit(other) == {} and reads == []  # rank 1 neither validates nor exports
    assert not (tmp_path / "run" / "final").exists()
    tr = Trainer(cfg)
    tr.step = 2
    assert fit(tr) == {} and len(reads) == 1
    final = klvae.AutoencoderKL.from_pretrained(tmp_path / "run" / "final")
    for a, b in zip(final.state_dict().values(), tr.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_whole_pass_of_dropped_batches_stops_counting_its_unreadable_images() -> None:
    run = DroppedRun("data", DistInfo(), torch.device("cpu"))

    def empty(new_pass: bool) -> dict:
        return {"pixels": torch.empty(0, 3, 0, 0), "skipped": 2, "new_pass": new_pass}

    assert not run.keep(empty(True))
    assert run.keep({"pixels": torch.zeros(1, 3, 4, 4), "skipped": 1, "new_pass": False})  # starts the count anew
    assert not run.keep(empty(True)) and not run.keep(empty(False))  # one pass start since: not yet a whole pass
    with pytest.raises(KlvaeError, match=r"no readable training images in data: 6 unreadable in a row, through a "):
        run.keep(empty(True))


# ---- validation --------------------------------------------------------------------------------------------------
def test_validation_averages_per_image_over_clamped_mean_reconstructions(tmp_path: Path) -> None:
    vae = perturbed_vae().train()
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.8)  # pushes part of the output past 1, which validation clamps
    batches = [tiny_batch(1), tiny_batch(2)[:1]]  # 3 images in batches of 2 and 1: a mean per image, not per batch
    got = validate(vae, batches, torch.device("cpu"), None, None)
    assert vae.training  # validation hands the model back in training mode
    with torch.no_grad():
        x = torch.cat(batches)
        y = vae.eval()(x, sample_posterior=False)[0]
    assert y.max() > 1.05
    assert got["psnr"] == pytest.approx(psnr(x, y.clamp(-1, 1), data_range=2.0).mean().item(), rel=1e-5)


def test_validation_images_are_centre_crops_whatever_the_training_augmentation(tmp_path: Path) -> None:
    noise_folder(tmp_path / "val", 4, hw=(20, 28))
    cfg = tiny_train_config(tmp_path, f"data.val={tmp_path / 'val'}", "data.crop=random", "data.flip=1.0",
                            "data.scale_min=0.5", "data.val_images=3")
    batches = build_val_batches(cfg)
    assert [b.shape[0] for b in batches] == [2, 1]  # the first data.val_images of 4, in batches of data.batch_size
    centre = ImageTransform(TransformConfig(resolution=16, crop="center"))
    want = torch.stack([centre(Image.open(tmp_path / "val" / f"img{i}.png").convert("RGB")) for i in range(3)])
    torch.testing.assert_close(torch.cat(batches), want)


# ---- the data order ----------------------------------------------------------------------------------------------
def test_each_epoch_has_its_own_order_and_augmentation(tmp_path: Path) -> None:
    sampler = GlobalBatchSampler(64, 4, seed=5)
    assert not torch.equal(sampler.epoch_order(0), sampler.epoch_order(1))
    assert sorted(sampler.epoch_order(1).tolist()) == list(range(64))

    class Draws(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[float, float]:
            return torch.rand(()).item(), random.random()

    items = SeededItems(Draws(), seed=5)
    state = random.getstate()
    assert items[(1, 0)] == items[(1, 0)]  # a function of (seed, epoch, index) ...
    assert items[(1, 0)] != items[(1, 1)]  # ... in which the epoch counts: other crops and flips each epoch
    assert random.getstate() == state  # the caller's Python generator is left as it was


def test_random_crops_reach_every_offset() -> None:
    # Column x of the image holds the value 10 * x, so a crop's first column tells its left edge.
    img = Image.fromarray(np.tile((np.arange(20) * 10).astype(np.uint8)[None, :, None], (16, 1, 3)))
    crop = ImageTransform(TransformConfig(resolution=16, crop="random"))
    lefts = set()
    for seed in range(60):
        torch.manual_seed(seed)
        lefts.add(round((crop(img)[0, 0, 0].item() + 1) * 127.5 / 10))
    assert lefts == {0, 1, 2, 3, 4}  # 20 - 16 + 1 positions, the last included


def test_a_resumed_stream_of_tar_shards_goes_on_after_the_consumed_batches(tmp_path: Path) -> None:
    shard = tmp_path / "images-0.tar"
    with tarfile.open(shard, "w") as tf:
        for i in range(5):
            data = noise_png(i, (20, 20))
            info = tarfile.TarInfo(f"img{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cfg = tiny_train_config(tmp_path, f"data.train={shard}", "data.batch_size=1")
    fresh = build_train_loader(cfg, DistInfo())
    keys = [next(fresh)["keys"] for _ in range(4)]
    resumed = build_train_loader(cfg, DistInfo(), start_batch=2)
    assert [next(resumed)["keys"] for _ in range(2)] == keys[2:] == [["images-0.tar:img2"], ["images-0.tar:img3"]]


def test_crop_sides_stay_in_the_scale_range_and_exact_sizes_are_not_upscaling(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    crop = ImageTransform(TransformConfig(resolution=16, scale=(0.5, 0.75)))
    sides = set()
    for seed in range(40):
        torch.manual_seed(seed)
        sides.add(crop.crop_side(40, 30))  # a fraction in [0.5, 0.75] of the shorter side, 30
    assert min(sides) >= 15 and 20 <= max(sides) <= 23
    monkeypatch.setattr(data_module, "_UPSCALE_WARNED", [False])  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="klvae.training.data"):
        ImageTransform(TransformConfig(resolution=16))(Image.new("RGB", (16, 16)))
    assert not caplog.records  # an image at the resolution is not scaled up


# ---- config checks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sets", "message"), [
    (["train.max_steps=0"], r"train\.max_steps must be at least 1, got 0"),
    (["optim.grad_accum=0"], r"optim\.grad_accum must be at least 1, got 0"),
    (["train.max_nonfinite=0"], r"train\.max_nonfinite must be at least 1, got 0"),
    (["data.val_images=0"], r"data\.val_images must be at least 1, got 0"),
    (["train.seed=4294967296"], r"train\.seed must be in \[0, 2\*\*32\)"),
    (["data.scale_min=0.8", "data.scale_max=0.5"], r"data\.scale_max must be in \[data\.scale_min, 1\], got 0\.5"),
    (["data.batch_size=2.5"], r"config field data\.batch_size must be int, got 2\.5"),
])
def test_out_of_range_settings_are_refused(tmp_path: Path, sets: list[str], message: str) -> None:
    with pytest.raises(KlvaeError, match=message):
        tiny_train_config(tmp_path, *sets)


def test_an_override_value_may_hold_an_equals_sign(tmp_path: Path) -> None:
    assert tiny_train_config(tmp_path, "data.train=a=b", "train.seed=4294967295").data.train == "a=b"


# ---- collectives across two processes ----------------------------------------------------------------------------
_COLLECTIVES = """
import sys, torch, torch.distributed as dist
from klvae.distributed import DistInfo, all_mean, all_ranks, all_ranks_each, average_gradients
rank, folder = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
info, cpu = DistInfo(rank=rank, world=2), torch.device("cpu")
p = torch.nn.Parameter(torch.zeros(3))
p.grad = torch.full((3,), 1.0 + 2 * rank)  # 1 on rank 0, 3 on rank 1
average_gradients([p], info)
out = {"grad": p.grad, "mean": all_mean(torch.tensor([2.0 + 4 * rank]), info),
       "all": all_ranks(rank == 0, info, cpu), "each": all_ranks_each([True, rank == 1], info, cpu)}
torch.save(out, f"{folder}/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_processes_average_gradients_and_agree_on_flags(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _COLLECTIVES, str(rank), str(tmp_path)]) for rank in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["grad"], torch.full((3,), 2.0))  # the mean of 1 and 3, not their sum
        assert torch.equal(got["mean"], torch.tensor([4.0]))
        assert got["all"] is False and got["each"] == [True, False]  # a flag holds only where it holds on every rank
