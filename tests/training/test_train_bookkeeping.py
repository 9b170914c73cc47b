"""What a training run counts and shows: the unreadable-image count across a resume (carried by rank 0 alone, 0 for
older checkpoints), the samples grid gathered across validation batches, and the message for a dataset under one
batch, which counts its items and the unreadable ones; the line a run starts with, and the one its export ends
with."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import noise_images_and_a_broken_one, noise_png
from klvae.distributed import DistInfo
from klvae.errors import KlvaeError
from klvae.training.config import load_config
from klvae.training.data_setup import build_train_loader
from klvae.training.loop import fit
from klvae.training.trainer import Trainer
from klvae.training.validate import validate


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Four small noise images and one unreadable file."""
    return noise_images_and_a_broken_one(tmp_path / "images")


def _cfg(out: Path, data: Path, *overrides: str) -> object:
    return load_config(None, [
        "model.preset=tiny", f"data.train={data}", "data.resolution=16", "data.batch_size=1", "data.num_workers=0",
        "train.log_every=1", "train.val_every=1000", f"train.out_dir={out}", "train.device=cpu", "loss.preset=mse",
        *overrides])


def _bad_counts(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["bad_images"] for r in rows if r["split"] == "train"}


def test_a_run_says_what_it_trains_before_its_first_step_and_its_export_once(
        tmp_path: Path, images: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tmp_path / "run", images, "train.max_steps=2", "data.batch_size=2", "optim.grad_accum=3")
    tr = Trainer(cfg)
    with caplog.at_level(logging.DEBUG, logger="klvae"):
        fit(tr)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    total = tr.vae.num_parameters()["total"]
    assert info[0] == (f"training an autoencoder of {total:,} parameters on cpu (fp32), steps 0 to 2, 6 images of "
                       f"16x16 pixels a step (1 process(es) x data.batch_size 2 x optim.grad_accum 3); writing to "
                       f"{tmp_path / 'run'}")
    final = tmp_path / "run" / "final"
    assert [m for m in info if str(final) in m] == [f"exported weights to {final}"]  # once, not "saved" as well


# ---- 1. bad_images goes on across a resume --------------------------------------------------------------------
def test_bad_images_count_continues_across_a_resume(tmp_path: Path, images: Path) -> None:
    # Five items a pass, one unreadable: ten steps read it two or three times. Was: the resumed run counted from 0
    # again, so its rows after step 5 were lower than the uninterrupted run's.
    fit(Trainer(_cfg(tmp_path / "a", images, "train.max_steps=10", "train.ckpt_every=5")))
    whole = _bad_counts(tmp_path / "a")
    fit(Trainer(_cfg(tmp_path / "b", images, "train.max_steps=5", "train.ckpt_every=5")))
    tr = Trainer(_cfg(tmp_path / "b", images, "train.max_steps=10", "train.ckpt_every=5"))
    assert tr.resume() and tr.step == 5 and whole[5] >= 1
    fit(tr)
    assert _bad_counts(tmp_path / "b") == whole


def test_bad_images_resume_on_rank_0_only_and_old_checkpoints_start_at_0(tmp_path: Path, images: Path) -> None:
    tr = Trainer(_cfg(tmp_path / "run", images, "train.max_steps=1"))
    tr.bad_images = 3
    state = tr.state_dict()
    assert state["bad_images"] == 3
    other = Trainer(_cfg(tmp_path / "run", images, "train.max_steps=1"))
    other.dist = DistInfo(rank=1, world=2)  # the sum is carried by rank 0 alone, so that it counts once
    other.load_state_dict(state)
    assert other.bad_images == 0
    del state["bad_images"]  # a checkpoint written before the count was saved
    tr.load_state_dict(state)
    assert tr.bad_images == 0


# ---- 2. the samples grid shows up to 8 held-out images, across batches ------------------------------------------
def test_samples_grid_gathers_images_across_validation_batches(tmp_path: Path) -> None:
    tr = Trainer(_cfg(tmp_path / "run", tmp_path, "train.max_steps=1"))
    batches = [torch.rand(2, 3, 16, 16) * 2 - 1 for _ in range(3)]  # 6 images, batch 2: was a grid of the first 2
    validate(tr.vae, batches, tr.device, tmp_path / "six.png", None)
    assert Image.open(tmp_path / "six.png").size == (6 * 16, 2 * 16)
    validate(tr.vae, batches * 2, tr.device, tmp_path / "twelve.png", None)
    assert Image.open(tmp_path / "twelve.png").size == (8 * 16, 2 * 16)  # at most 8


# ---- 3. a dataset under one global batch ------------------------------------------------------------------------
def test_too_small_dataset_counts_items_and_unreadable_ones(tmp_path: Path) -> None:
    root = tmp_path / "few"
    root.mkdir()
    (root / "a.png").write_bytes(noise_png(0))
    (root / "broken.jpg").write_bytes(b"not an image")
    cfg = _cfg(tmp_path / "run", root, "data.batch_size=4")
    with pytest.raises(KlvaeError) as e:
        build_train_loader(cfg, DistInfo())
    # Was: "the dataset has 2 images, fewer than one global batch of 4".
    assert "has 2 item(s) (files or rows found; 1 of them unreadable), fewer than one global batch of 4" in str(e.value)
