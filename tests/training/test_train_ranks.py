"""The trainer across ranks: what rank 0 validates on under DDP, where the model and loss live, validation at
resolutions below SSIM's window, the unreadable-image count summed over ranks, and resuming shards with another
process count."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import klvae.training.loop as loop
import klvae.training.trainer as trainer_module
import klvae.training.validate as validate_module
from helpers import noise_images_and_a_broken_one, noise_png
from klvae.nets.lpips import LPIPS
from klvae.training.config import load_config
from klvae.training.data_setup import build_val_batches
from klvae.training.loop import fit
from klvae.training.trainer import Trainer


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Four small noise images and one unreadable file."""
    return noise_images_and_a_broken_one(tmp_path / "images")


def _sets(tmp: Path, data: Path, *overrides: str) -> list[str]:
    return ["model.preset=tiny", f"data.train={data}", "data.resolution=16", "data.batch_size=1",
            "data.num_workers=0", "train.log_every=1", "train.val_every=1000", "train.ckpt_every=1000",
            f"train.out_dir={tmp / 'run'}", "train.device=cpu", "loss.preset=mse", *overrides]


def test_validation_on_shards_reads_all_of_them_under_ddp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only rank 0 validates, so it must read the whole held-out set, not its rank's share of the shards.
    for s in range(2):
        with tarfile.open(tmp_path / f"val-{s}.tar", "w") as tf:
            for i in range(4):
                data = noise_png(4 * s + i)
                info = tarfile.TarInfo(f"s{s}_{i}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    cfg = load_config(None, ["data.train=x", f"data.val={tmp_path}/val-{{0..1}}.tar", "data.resolution=16",
                             "data.val_images=8", "data.batch_size=4", "loss.preset=mse"])
    single = torch.cat(build_val_batches(cfg))
    assert single.shape[0] == 8
    # As under torchrun, rank 0 of 2 (the loader would otherwise take its rank from the process group).
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    got = torch.cat(build_val_batches(cfg))
    assert got.shape == single.shape and torch.equal(got, single)


def test_the_model_and_loss_live_on_the_rank_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under torchrun with train.device=cuda:0, rank r computes on cuda:r (rank_device): the model, the critic and
    # the EMA must be there too, not on the configured cuda:0 (inputs and weights on two GPUs, NCCL on one).
    other = torch.device("meta")  # a device other than the configured cpu, as cuda:1 is for cuda:0
    monkeypatch.setattr(trainer_module, "rank_device", lambda device, info: other)
    tr = Trainer(load_config(None, _sets(tmp_path, tmp_path, "loss.preset=ldm", "loss.perceptual_weight=0",
                                         "data.resolution=32", "train.ema_decay=0.9")))
    assert tr.device == other
    for name, module in (("vae", tr.vae), ("loss", tr.loss), ("ema", tr.ema)):
        assert {p.device for p in module.parameters()} == {other}, name


def test_validation_below_ssims_window_reports_what_it_can(tmp_path: Path, images: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # SSIM needs 11 px a side and LPIPS's VGG 16: an 8 px run with a held-out set crashed at its first validation,
    # after training (LPIPS whenever its weights could be had, even with loss.perceptual_weight 0).
    monkeypatch.setattr(validate_module, "_pretrained_lpips", lambda *a: LPIPS(pretrained=False))
    tr = Trainer(load_config(None, _sets(tmp_path, images, "data.resolution=8", f"data.val={images}",
                                         "train.val_every=1", "train.max_steps=1")))
    fit(tr)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 1 and np.isfinite(val[0]["psnr"]) and "ssim" not in val[0] and "lpips" not in val[0]
    batches = [torch.rand(2, 3, 16, 16) * 2 - 1]
    assert set(validate_module.validate(tr.vae, batches, tr.device, None)) == {"psnr", "ssim", "lpips"}


def test_bad_images_count_every_ranks_reads(tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each rank reads its own share of the data: the logged count must be the sum over ranks, not rank 0's alone.
    # A second rank that met as many unreadable files as this one, through the sum the loop does:
    monkeypatch.setattr(loop, "all_sum", lambda t, info: t * 2)
    tr = Trainer(load_config(None, _sets(tmp_path, images, "train.max_steps=3")))
    fit(tr)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_images"] == 2  # seed 0 reads broken.jpg second in epoch 0: once in these 3 steps


def test_resuming_shards_with_another_process_count_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture, images: Path) -> None:
    # Shards are split among the processes, so another count reads other data from the resume on: said, once.
    with tarfile.open(tmp_path / "train-0.tar", "w") as tf:
        for i in range(2):
            data = noise_png(i)
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    for data, warns in ((f"{tmp_path}/train-0.tar", True), (str(images), False)):
        tr = Trainer(load_config(None, _sets(tmp_path, Path(data))))
        path = tr.save()
        real = trainer_module.ckpt.load_training_state
        monkeypatch.setattr(trainer_module.ckpt, "load_training_state",
                            lambda p, real=real: {**real(p), "world": 2})  # as if saved by two processes
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert tr.resume(path)
        assert ("saved with 2 process(es) and data.num_workers 0, now 1 and 0" in caplog.text) is warns, caplog.text
        monkeypatch.undo()
