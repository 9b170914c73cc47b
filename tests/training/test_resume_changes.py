"""What changed between a run and its resume.

A resume needs the checkpoint, not model.pretrained: the checkpoint replaces every weight, and records the
architecture, so a run resumes where the pretrained weights cannot be read (offline, a cleared hub cache, a
moved folder) and ends with the weights of the run that was never interrupted. Training images added or removed
since the checkpoint change every epoch's order (a permutation of all items): said, not silent."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import klvae
from helpers import noise_folder
from klvae.cli.main import main


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
