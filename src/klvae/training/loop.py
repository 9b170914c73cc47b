"""`fit`: the outer loop around Trainer.train_step — data, logging, validation, checkpoints, export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from klvae.progress import progress_bar
from klvae.training.data_setup import build_train_loader, build_val_batches
from klvae.training.distributed import DistInfo, all_ranks
from klvae.training.trainer import Trainer
from klvae.training.validate import validate

log = logging.getLogger(__name__)


class RunLog:
    """Scalars to TensorBoard (when installed) and to metrics.jsonl, on rank 0 only."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled, self.path, self.tb = enabled, out / "metrics.jsonl", None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            log.warning("tensorboard is not installed: scalars go to %s only", self.path)

    def write(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        """Record `scalars` at `step` under `prefix/`."""
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def _micro_batches(it: Iterator[dict[str, Any]], n: int, skipped: list[int], dist: DistInfo,
                   device: torch.device) -> tuple[list[torch.Tensor], int]:
    """`n` non-empty micro-batches, and how many loader batches were read for them (the resume position)."""
    out, read = [], 0
    while len(out) < n:
        batch = next(it)
        read += 1
        skipped[0] += int(batch.get("skipped", 0))
        # A batch with no readable image is dropped on every rank alike, so that all ranks read the same
        # number of batches (one data position to save) and run the same number of micro-steps.
        if all_ranks(batch["pixels"].shape[0] > 0, dist, device):
            out.append(batch["pixels"])
    return out, read


def fit(tr: Trainer) -> dict[str, float]:
    """Train to max_steps; validate, checkpoint and log on the way; export at the end. Returns the last logs."""
    cfg, main = tr.cfg, tr.dist.is_main
    accum = cfg.optim.grad_accum
    it = iter(build_train_loader(cfg, tr.dist, start_batch=tr.batches_done))
    val = build_val_batches(cfg) if main and cfg.data.val else None
    runlog = RunLog(tr.out, main)
    last: dict[str, float] = {}
    skipped = [0]
    bar = progress_bar(total=cfg.train.max_steps, initial=tr.step, disable=not main, desc="train", unit="step")
    t0, n0 = time.perf_counter(), tr.step
    try:
        while tr.step < cfg.train.max_steps:
            micro, read = _micro_batches(it, accum, skipped, tr.dist, tr.device)
            tr.batches_done += read  # batches read, not kept: a dropped empty batch is consumed data too
            last = tr.train_step(micro)
            bar.update(1)
            bar.set_postfix(loss=f"{last.get('total', float('nan')):.4g}", rec=f"{last.get('rec', float('nan')):.4g}")
            if tr.step % cfg.train.log_every == 0 or tr.step == cfg.train.max_steps:
                rate = (tr.step - n0) / max(time.perf_counter() - t0, 1e-9)
                runlog.write(tr.step, {**last, "steps_per_s": rate, "bad_images": float(skipped[0])}, "train")
            if val is not None and (tr.step % cfg.train.val_every == 0 or tr.step == cfg.train.max_steps):
                grid = tr.out / "samples" / f"step_{tr.step:08d}.png"
                metrics = validate(tr.exported_model(), val, tr.device, grid, tr.lpips_files())
                runlog.write(tr.step, metrics, "val")
                log.info("step %d validation: %s", tr.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if tr.step % cfg.train.ckpt_every == 0 or tr.step == cfg.train.max_steps:
                tr.save()
    finally:
        bar.close()
        runlog.close()
    if skipped[0]:
        # Counted per read, and every epoch reads each image again: the warnings on the way name the files.
        log.warning("unreadable training images were skipped %d time(s) (once per read, so once per epoch each)",
                    skipped[0])
    if main and (last or not (tr.out / "final").is_dir()):  # a finished run resumed keeps its export as it is
        log.info("exported weights to %s", tr.export())
    return last
