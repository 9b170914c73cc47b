"""`fit`: the outer loop around Trainer.train_step — data, logging, validation, checkpoints, export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from klvae.atomic import append_text, atomic_write_text, signals_held
from klvae.distributed import DistInfo, all_ranks_each, all_sum
from klvae.errors import KlvaeError
from klvae.evaluation.report import json_safe
from klvae.progress import progress_bar
from klvae.training.checkpoint import latest_checkpoint
from klvae.training.data_setup import build_train_loader, build_val_batches
from klvae.training.trainer import Trainer
from klvae.training.validate import validate

log = logging.getLogger(__name__)


class RunLog:
    """Scalars to TensorBoard (when installed) and to metrics.jsonl, on rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resumed_at: int = 0) -> None:
        """`resumed_at`: the step of the checkpoint resumed from (0 for a fresh run)."""
        self.enabled, self.path, self.tb = enabled, out / "metrics.jsonl", None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        # The interrupted run logged past its last checkpoint (or, resumed with none yet, past step 0): those
        # steps are run again, and logged again.
        _drop_rows_after(self.path, resumed_at)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resumed_at + 1)
        except ImportError:
            log.warning("tensorboard is not installed: scalars go to %s only", self.path)

    def write(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        """Record `scalars` at `step` under `prefix/`."""
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        # Strict JSON (a perfect validation's PSNR is inf, which JSON has no word for): non-finite values as null.
        row = json_safe({"step": step, "split": prefix, **scalars})
        append_text(self.path, json.dumps(row, allow_nan=False) + "\n")

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without its rows for steps after `step` (and any line torn by a kill)."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [line for line in lines if (n := _row_step(line)) is not None and n <= step]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def _row_step(line: str) -> int | None:
    """The step of one metrics.jsonl row, or None for a line that is not a row."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class DroppedRun:
    """Loader batches dropped in a row; a whole pass over the data of them stops the run.

    Data with no readable image (zero-byte files, text, a table of numbers) would otherwise be read again and
    again for ever, one warning per item and no step ever taken."""

    def __init__(self, source: str, dist: DistInfo, device: torch.device) -> None:
        self.source, self.dist, self.device = source, dist, device
        self.starts = self.unreadable = self.readable = 0

    def keep(self, batch: dict[str, Any]) -> bool:
        """Whether every rank's share of this global batch has a readable image; raises after a dropped pass."""
        good = int(batch["pixels"].shape[0])
        starts = self.starts + bool(batch.get("new_pass", False))
        # A pass that starts inside the run after one that did: every batch of the pass between was dropped.
        # One collective for both flags, so that all ranks drop alike (one data position) and stop together.
        keep, whole_pass = all_ranks_each([good > 0, starts >= 2], self.dist, self.device)
        if keep:
            self.starts = self.unreadable = self.readable = 0
            return True
        self.starts = starts
        self.unreadable += int(batch.get("skipped", 0))
        self.readable += good
        if whole_pass:
            self._fail()
        return False

    def _fail(self) -> None:
        counts = all_sum(torch.tensor([self.unreadable, self.readable], device=self.device), self.dist).tolist()
        unreadable, readable = (int(c) for c in counts)
        if readable == 0:
            raise KlvaeError(f"no readable training images in {self.source}: {unreadable} unreadable in a row, "
                             f"through a whole pass over the data")
        # Only under DDP: some rank's share (its shards) had no readable image in each of its batches.
        raise KlvaeError(f"no usable training batch in {self.source} in a whole pass over the data: some process "
                         f"had no readable image each time ({unreadable} unreadable, {readable} readable)")


def _micro_batches(it: Iterator[dict[str, Any]], n: int, tr: Trainer,
                   run: DroppedRun) -> tuple[list[torch.Tensor], int]:
    """`n` non-empty micro-batches, and how many loader batches were read for them (the resume position)."""
    out: list[torch.Tensor] = []
    read = 0
    while len(out) < n:
        batch = next(it)
        read += 1
        tr.bad_images += int(batch.get("skipped", 0))  # kept in the trainer: checkpoints carry it over a resume
        # A batch with no readable image is dropped on every rank alike, so that all ranks read the same
        # number of batches (one data position to save) and run the same number of micro-steps.
        if run.keep(batch):
            out.append(batch["pixels"])
    return out, read


def fit(tr: Trainer) -> dict[str, float]:
    """Train to max_steps; validate, checkpoint and log on the way; export at the end. Returns the last logs."""
    cfg, main = tr.cfg, tr.dist.is_main
    accum = cfg.optim.grad_accum
    it = iter(build_train_loader(cfg, tr.dist, start_batch=tr.batches_done, start_at=tr.start_batch))
    # An empty list (no readable image in data.val: build_val_batches warns) validates nothing: no PSNR 0 logged.
    val = (build_val_batches(cfg) or None) if main and cfg.data.val else None
    runlog = RunLog(tr.out, main, resumed_at=tr.step)
    last: dict[str, float] = {}
    dropped, bad = DroppedRun(cfg.data.train, tr.dist, tr.device), 0.0
    if main:
        log.info("training an autoencoder of %s parameters on %s (%s), steps %d to %d, %d images of %dx%d pixels a "
                 "step (%d process(es) x data.batch_size %d x optim.grad_accum %d); writing to %s",
                 f"{tr.vae.num_parameters()['total']:,}", tr.device, cfg.train.precision, tr.step, cfg.train.max_steps,
                 cfg.data.batch_size * accum * tr.dist.world, cfg.data.resolution, cfg.data.resolution,
                 tr.dist.world, cfg.data.batch_size, accum, tr.out)
    bar = progress_bar(total=cfg.train.max_steps, initial=tr.step, disable=not main, desc="train", unit="step")
    t0, n0 = time.perf_counter(), tr.step
    try:
        while tr.step < cfg.train.max_steps:
            micro, read = _micro_batches(it, accum, tr, dropped)
            tr.batches_done += read  # batches read, not kept: a dropped empty batch is consumed data too
            last = tr.train_step(micro)
            bar.update(1)
            bar.set_postfix(loss=f"{last.get('total', float('nan')):.4g}", rec=f"{last.get('rec', float('nan')):.4g}")
            if tr.step % cfg.train.log_every == 0 or tr.step == cfg.train.max_steps:
                rate = (tr.step - n0) / max(time.perf_counter() - t0, 1e-9)
                # Every rank reads its own share: the count is the sum over ranks (a collective, as all log alike).
                bad = float(all_sum(torch.tensor(tr.bad_images, device=tr.device), tr.dist).item())
                runlog.write(tr.step, {**last, "steps_per_s": rate, "bad_images": bad}, "train")
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
    if main and bad:
        # Counted per read, and every epoch reads each image again: the warnings on the way name the files.
        log.warning("unreadable training images were skipped %d time(s) in this run, its resumed parts and all "
                    "processes together (once per read, so once per epoch each)", bad)
    # A finished run resumed keeps its export as it is, unless that export is older than the last checkpoint
    # (killed after the checkpoint was written: it would hold an earlier one's weights) or of steps the resume
    # superseded.
    if main and (last or tr.export_stale or not _export_is_current(tr.out)):
        with signals_held():  # a Ctrl-C waits for the export to be whole
            final = tr.export()
        log.info("exported weights to %s", final)
    return last


def _export_is_current(out: Path) -> bool:
    """Whether out/final was written after the run's newest checkpoint (the export follows the last save)."""
    weights, newest = out / "final" / "diffusion_pytorch_model.safetensors", latest_checkpoint(out / "checkpoints")
    return weights.is_file() and (newest is None or weights.stat().st_mtime_ns >= newest.stat().st_mtime_ns)
