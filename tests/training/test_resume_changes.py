"""What changed between a run and its resume.

A resume needs the checkpoint, not model.pretrained: the checkpoint replaces every weight, and records the
architecture, so a run resumes where the pretrained weights cannot be read (offline, a cleared hub cache, a
moved folder) and ends with the weights of the run that was never interrupted. Training images added or removed
since the checkpoint change every epoch's order (a permutation of all items): said, not silent."""

from __future__ import annotations

import itertools
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch

import klvae
from helpers import noise_folder
from klvae.cli.main import main
from klvae.training import checkpoint as ckpt
from klvae.training.config import load_config
from klvae.training.resume import resumed_batch
from klvae.training.sampler import GlobalBatchSampler
from klvae.training.trainer import Trainer


def _args(tmp: Path, run: str, pretrained: Path, steps: int) -> list[str]:
    sets = [f"model.pretrained={pretrained}", f"data.train={tmp / 'images'}", "data.resolution=16",
            "data.batch_size=2", "data.num_workers=0", "train.device=cpu", f"train.out_dir={tmp / run}",
            "loss.preset=mse", "train.val_lpips=false", f"train.max_steps={steps}", "train.ckpt_every=1",
            "optim.lr=1e-3"]
    return ["-q", "train", *(a for s in sets for a in ("--set", s))]


@pytest.fixture
def start(tmp_path: Path) -> Path:
    noise_folder(tmp_path / "images", 4, hw=(16, 16))
    torch.manual_seed(3)
    klvae.AutoencoderKL("tiny").save_pretrained(tmp_path / "start")
    return tmp_path / "start"


def test_a_resume_whose_pretrained_weights_are_gone_ends_as_the_uninterrupted_run(
        tmp_path: Path, start: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, "whole", start, 3)) == 0
    assert main(_args(tmp_path, "split", start, 2)) == 0
    moved = shutil.move(start, tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main([*_args(tmp_path, "split", start, 3), "--resume"]) == 0
    assert "resumes with the architecture its checkpoint records" in caplog.text
    whole = klvae.AutoencoderKL.from_pretrained(tmp_path / "whole" / "final").state_dict()
    split = klvae.AutoencoderKL.from_pretrained(tmp_path / "split" / "final").state_dict()
    assert torch.equal(torch.cat([v.flatten() for v in whole.values()]),
                       torch.cat([v.flatten() for v in split.values()]))
    assert Path(moved).is_dir()


def test_without_a_checkpoint_missing_pretrained_weights_are_still_an_error(
        tmp_path: Path, start: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(start)
    assert main([*_args(tmp_path, "run", start, 1), "--resume"]) == 2
    assert "model.pretrained" in capsys.readouterr().err


def test_a_resume_over_more_images_than_the_checkpoint_saw_says_the_order_is_drawn_anew(
        tmp_path: Path, start: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path, "run", start, 1)) == 0
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main([*_args(tmp_path, "run", start, 2), "--resume"]) == 0
    assert "when the checkpoint was written" not in caplog.text
    noise_folder(tmp_path / "images", 6, hw=(16, 16))  # two more: 6 images
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main([*_args(tmp_path, "run", start, 3), "--resume"]) == 0
    assert "data.train holds 6 item(s), 4 when the checkpoint was written" in caplog.text
    # The next checkpoint records the new count: a later resume over the same images says nothing.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main([*_args(tmp_path, "run", start, 4), "--resume"]) == 0
    assert "when the checkpoint was written" not in caplog.text


@pytest.mark.parametrize("seed", range(40))
def test_a_resume_with_another_global_batch_goes_on_where_the_epoch_stopped(seed: int) -> None:
    # Epoch orders are permutations of all items, whatever the batch: a resume with another global batch goes on
    # at the same place in the same epoch's order, reading no image twice and skipping less than one batch.
    rng = random.Random(seed)
    n = rng.randint(4, 40)
    old_g, new_g = rng.randint(1, n), rng.randint(1, n)
    old_pe = n // old_g
    done = rng.randint(0, 3 * old_pe)
    seen = [i for batch in itertools.islice(GlobalBatchSampler(n, old_g, seed=5), done) for i, _ in batch]
    epoch, k = divmod(done, old_pe)
    start = resumed_batch(done, old_g, new_g, n, n)
    new = GlobalBatchSampler(n, new_g, seed=5, start_batch=start)
    rest = [i for batch in itertools.islice(new, n // new_g - start % (n // new_g) if start // (n // new_g) == epoch
                                            else 0) for i, e in batch]
    this_epoch = seen[epoch * old_pe * old_g:]
    assert len(this_epoch) == k * old_g
    assert not set(this_epoch) & set(rest), (n, old_g, new_g, done, start)
    order = GlobalBatchSampler(n, new_g, seed=5).epoch_order(epoch).tolist()
    unread = [i for i in order[k * old_g: (n // new_g) * new_g] if i not in rest]
    assert len(unread) < new_g, (n, old_g, new_g, done, start)


def test_a_resume_by_one_process_of_a_two_process_checkpoint_says_so_and_moves_the_position(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    images = noise_folder(tmp_path / "images", 5, hw=(16, 16))
    sets = ["model.preset=tiny", f"data.train={images}", "data.resolution=16", "data.batch_size=1",
            "data.num_workers=0", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}", "loss.preset=mse"]
    tr = Trainer(load_config(None, sets))
    tr.step = tr.batches_done = 1  # 1 global batch of 2 images (1 per process x 2 processes)
    path = tr.save()
    real = ckpt.load_training_state
    monkeypatch.setattr(ckpt, "load_training_state", lambda p: {**real(p), "world": 2})
    resumed = Trainer(load_config(None, sets))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert resumed.resume(path)
    assert "global batch of 1 images (1 process(es) x data.batch_size 1), 2 when the checkpoint" in caplog.text
    assert resumed.start_batch(5) == 2  # images 0 and 1 of epoch 0's order were read: go on at image 2
    # 2 processes x data.batch_size 1 resumed by 1 process x 2: the same trajectory, nothing to say of the batch.
    caplog.clear()
    again = Trainer(load_config(None, [*sets, "data.batch_size=2"]))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert again.resume(path)
    assert "batch" not in caplog.text and again.start_batch(5) == 1
