"""The early checks of `klvae train`, made before any model is built: a --resume file (mapped, not read whole),
data.val on rank 0 only, and a dataset under one global batch (with what would fit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_error_line
from klvae.cli.main import main
from klvae.cli.train import check_inputs
from klvae.errors import KlvaeError
from klvae.training import data_setup
from klvae.training import trainer as trainer_module
from klvae.training.config import load_config
from klvae.training.sampler import GlobalBatchSampler


def _images(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _sets(tmp_path: Path, *extra: str) -> list[str]:
    return ["model.preset=tiny", f"data.train={tmp_path / 'data'}", "data.resolution=16", "data.batch_size=1",
            "data.num_workers=0", "loss.preset=mse", "train.device=cpu", "train.val_lpips=false",
            f"train.out_dir={tmp_path / 'run'}", *extra]


def _sets_at(run: Path, data: Path | str, *extra: str) -> list[str]:
    """A tiny run's overrides: two images a batch from `data`, written to `run`."""
    return ["model.preset=tiny", f"data.train={data}", "data.resolution=16", "data.batch_size=2",
            "data.num_workers=0", "loss.preset=mse", "train.device=cpu", "train.val_lpips=false",
            f"train.out_dir={run}", *extra]


# ---- 1. a --resume file and data.val ------------------------------------------------------------------------------
def _minimal_checkpoint(path: Path, **save: object) -> Path:
    torch.save({"step": 1, "batches_done": 1, "nonfinite_run": 0, "vae": {"w": torch.zeros(4)}, "loss": {},
                "opt_ae": {}, "scaler": {}, "d_scaler": {}, "rng": {}}, path, **save)
    return path


def test_the_resume_precheck_maps_the_checkpoint_rather_than_reading_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _images(tmp_path / "data", 2)
    cfg = load_config(None, _sets(tmp_path))
    ckpt = _minimal_checkpoint(tmp_path / "step.pt")
    calls: list[dict[str, object]] = []
    real = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    check_inputs(cfg, str(ckpt))  # Trainer.resume reads it whole later: the check must not read GBs first
    assert [c.get("mmap") for c in calls] == [True]
    # A file torch cannot map (its format before zip archives) is read as before; foreign files are still refused.
    calls.clear()
    check_inputs(cfg, str(_minimal_checkpoint(tmp_path / "old.pt", _use_new_zipfile_serialization=False)))
    assert [c.get("mmap") for c in calls] == [True, None]
    with pytest.raises(KlvaeError, match=r"0\.png is not a klvae checkpoint"):
        check_inputs(cfg, str(tmp_path / "data" / "0.png"))


@pytest.mark.parametrize(("rank", "refused"), [("0", True), ("1", False)])
def test_data_val_is_checked_only_where_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str,
                                                   refused: bool) -> None:
    # Rank 0 alone validates: on a machine of a multi-node run other than rank 0's, data.val need not exist.
    _images(tmp_path / "data", 2)
    cfg = load_config(None, _sets(tmp_path, f"data.val={tmp_path / 'on-node-0-only'}"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    if refused:
        with pytest.raises(KlvaeError, match=r"data\.val: no such data"):
            check_inputs(cfg, None)
    else:
        check_inputs(cfg, None)


# ---- 2. too few images for one global batch -----------------------------------------------------------------------
@pytest.mark.parametrize(("n", "local", "world", "fix"), [
    (3, 2, 2, "set the batch size per process to 1 or less"),
    (5, 8, 1, "set the batch size per process to 5 or less"),
    (1, 1, 2, "set the batch size per process to 1 and run at most 1 process(es)"),
    (0, 1, 1, "add images"),
])
def test_the_sampler_says_what_would_fit(n: int, local: int, world: int, fix: str) -> None:
    with pytest.raises(KlvaeError) as e:
        GlobalBatchSampler(n, local, rank=0, world=world)
    assert str(e.value).endswith(f"({local} per process x {world} process(es)): {fix}")


@pytest.mark.parametrize(("world", "extra", "expected"), [
    ("1", [], "has 3 item(s) (files or rows found; 0 of them unreadable), fewer than one global batch of 4 "
              "(data.batch_size 4 x 1 process(es)): set data.batch_size to 3 or less, or add images"),
    ("2", ["--set", "data.batch_size=2"], "fewer than one global batch of 4 (data.batch_size 2 x 2 process(es)): "
                                          "set data.batch_size to 1 or less, or add images"),
    ("1", ["--set", "data.val=nowhere"], "klvae: error: data.val: no such data: nowhere"),
    ("1", ["--resume", "few/0.png"], "few/0.png is not a klvae checkpoint"),
])
def test_train_refuses_bad_inputs_before_building_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], world: str,
    extra: list[str], expected: str,
) -> None:
    def built_first(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model (and LPIPS, and the process group) were built before the inputs were checked")

    monkeypatch.setattr(trainer_module.Trainer, "__init__", built_first)
    monkeypatch.setenv("WORLD_SIZE", world)  # what torchrun sets: the process group itself is not up yet
    monkeypatch.chdir(tmp_path)
    sets = _sets_at(tmp_path / "run", _images(tmp_path / "few", 3), "data.batch_size=4")
    assert main(["train", *(a for s in sets for a in ("--set", s)), *extra]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(("world", "fix"), [(1, "set data.batch_size to 3 or less"),
                                            (2, "set data.batch_size to 1 or less")])
def test_the_batch_size_advice_counts_only_the_readable_items(world: int, fix: str) -> None:
    # Five files found, two unreadable: a batch of 4 or 5 would still come up short of images.
    items = [object(), None, object(), None, object()]
    with pytest.raises(KlvaeError) as e:
        data_setup._check_one_global_batch(items, 8, world, "imgs")
    assert str(e.value) == (f"imgs has 5 item(s) (files or rows found; 2 of them unreadable), fewer than one global "
                            f"batch of {8 * world} (data.batch_size 8 x {world} process(es)): {fix}, or add images")
