"""Pins bugs a hunt of the training data pipeline found:

- A stream of .tar shards resumed with another `data.num_workers` silently reads other data: each DataLoader worker
  reads its own part of the shards, so the batch order (and the pass length) depends on the worker count, and
  skipping the consumed batches under the new count repeats some samples of the interrupted pass and never shows
  others (and moves every later pass boundary, so later crops differ too). `data.num_workers` is in RESUME_FREE
  and only a change of the process count is warned about.
- Over .tar shards with DataLoader workers, the "images are scaled up" warning, meant to be said once per process,
  comes again from every worker on every pass (the streamed loader starts new workers each pass, forked from a
  main process that never warned), flooding the log of a long run over a small set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import klvae.training.data as data_module
from helpers import noise_shards
from klvae.distributed import DistInfo
from klvae.training.config import TrainConfig, load_config
from klvae.training.data_setup import build_train_loader
from klvae.training.trainer import Trainer


def _shards(root: Path, counts: tuple[int, ...] = (5, 3, 4), side: int = 24) -> str:
    return noise_shards(root, counts, side)


def _cfg(tmp: Path, spec: str, workers: int, *extra: str) -> TrainConfig:
    return load_config(None, [
        "model.preset=tiny", f"data.train={spec}", "data.resolution=16", "data.batch_size=2",
        f"data.num_workers={workers}", "data.crop=random", "data.flip=0.5", "train.device=cpu",
        f"train.out_dir={tmp / 'run'}", "loss.preset=mse", "train.seed=3", "train.log_every=1",
        "train.val_every=1000", "train.ckpt_every=1000", *extra])


def test_resuming_shards_with_another_num_workers_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Saved at 3 batches with 2 workers, resumed with 0: the resumed run reads s1_1 a second time and never s0_4 in
    that pass, without a word. A process-count change over shards warns that the data differs; a worker-count
    change does the same damage and should warn too (or the stream's order should not depend on the workers)."""
    spec = _shards(tmp_path / "shards")
    tr = Trainer(_cfg(tmp_path, spec, 2))
    tr.batches_done = 3
    path = tr.save()
    resumed = Trainer(_cfg(tmp_path, spec, 0))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resumed.resume(path)
    assert resumed.batches_done == 3  # the stream would skip 3 batches of the 0-worker order: other samples
    assert "num_workers" in caplog.text, caplog.text


def test_the_upscale_warning_over_shards_is_not_repeated_every_pass(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """12 images of 24 px at data.resolution 32 with 2 workers: 2 warnings in the first pass, then 2 more in every
    pass after it (8 by the first batch of the fourth pass); the docs promise one per process, DataLoader workers
    included."""
    monkeypatch.setattr(data_module, "_UPSCALE_WARNED", [False])
    spec = _shards(tmp_path / "shards")
    log_file = tmp_path / "warnings.log"
    handler = logging.FileHandler(log_file)  # forked workers inherit it and append to the same file
    logger = logging.getLogger("klvae.training.data")
    logger.addHandler(handler)
    try:
        it = build_train_loader(_cfg(tmp_path, spec, 2, "data.resolution=32"), DistInfo())
        passes = 0
        while passes < 4:  # three whole passes, and the first batch of the fourth
            passes += next(it)["new_pass"]
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert log_file.read_text().count("scaled up") <= 2
