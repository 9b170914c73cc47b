"""A training run's runtime behaviour: an interrupt during a checkpoint write, logs after a resume, and log lines
next to the progress bar."""

import argparse
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from klvae.cli.main import _run, main, setup_logging
from klvae.progress import progress_bar
from klvae.training.checkpoint import load_training_state
from klvae.training.config import load_config
from klvae.training.loop import fit
from klvae.training.trainer import Trainer

BASE = ("model.preset=tiny", "data.resolution=32", "data.batch_size=1", "data.num_workers=0", "train.device=cpu",
        "loss.preset=mse", "train.log_every=1", "train.val_every=1000")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of four small random PNGs."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
    return root


def _overrides(tmp: Path, photos: Path, *extra: str) -> list[str]:
    return [*BASE, f"data.train={photos}", f"train.out_dir={tmp / 'run'}", *extra]


# ---- 1. an interrupt while a checkpoint is written ----------------------------------------------------------
class _SignalMidWrite:
    """A file that sends `signum` to this process on torch.save's third write into it."""

    def __init__(self, f: Any, signum: int) -> None:
        self.f, self.signum, self.calls = f, signum, 0

    def write(self, data: bytes) -> int:
        n = self.f.write(data)
        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), self.signum)
        return n

    def flush(self) -> None:
        self.f.flush()


@pytest.mark.parametrize(("signum", "status", "line"), [
    (signal.SIGINT, 130, "klvae: interrupted"),
    (signal.SIGTERM, 143, "klvae: terminated"),
], ids=["sigint", "sigterm"])
def test_a_signal_during_a_checkpoint_write_completes_it_then_stops(
        signum: int, status: int, line: str, tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    real_save, saves = torch.save, [0]

    def save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
        saves[0] += 1
        real_save(obj, _SignalMidWrite(f, signum) if saves[0] == 2 else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    sets = _overrides(tmp_path, photos, "train.max_steps=3", "train.ckpt_every=1")
    # Was exit 1 with "klvae: internal error: RuntimeError: [enforce fail at inline_container.cc...] unexpected pos".
    assert main(["-q", "train", *[a for o in sets for a in ("--set", o)]]) == status
    assert capsys.readouterr().err.strip().splitlines() == [line]
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000001.pt", "step_00000002.pt"]  # no .tmp
    assert load_training_state(folder / "step_00000001.pt")["step"] == 1
    assert load_training_state(folder / "step_00000002.pt")["step"] == 2  # the held signal let it complete
    assert not (tmp_path / "run" / "final").exists()


def test_an_interrupt_buried_under_a_writers_error_still_reads_as_interrupted(
        capsys: pytest.CaptureFixture[str]) -> None:
    def command(args: argparse.Namespace) -> int:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64") from None

    assert _run(argparse.Namespace(func=command, debug=False)) == 130
    assert capsys.readouterr().err == "klvae: interrupted\n"


@pytest.mark.parametrize("nested", [False, True])
def test_a_second_ctrl_c_stops_a_held_write_at_once(nested: bool) -> None:
    import contextlib

    from klvae.training.checkpoint import signals_held

    reached = []
    with pytest.raises(KeyboardInterrupt), signals_held() if nested else contextlib.nullcontext(), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("first held")
        os.kill(os.getpid(), signal.SIGINT)  # the user insists: a save stuck on a network disk
        reached.append("after the second")  # was reached, and the write went on until it ended
    assert reached == ["first held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_pending_interrupt_follows_an_error_in_the_held_block() -> None:
    from klvae.training.checkpoint import signals_held

    with pytest.raises(KeyboardInterrupt) as caught, signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        raise OSError("disk full")
    assert isinstance(caught.value.__context__, OSError)  # neither lost: the error is the interrupt's context


# ---- 2. the logs of a run resumed from a checkpoint before its last logged step -------------------------------
def test_a_resume_logs_each_step_once(tmp_path: Path, photos: Path) -> None:
    cfg = load_config(None, _overrides(tmp_path, photos, "train.max_steps=4", "train.ckpt_every=2"))
    fit(Trainer(cfg))
    run = tmp_path / "run"
    # As if killed after logging steps 3 and 4 but before their checkpoint: resume from step 2.
    tr = Trainer(cfg)
    assert tr.resume(run / "checkpoints" / "step_00000002.pt") and tr.step == 2
    fit(tr)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]  # was [1, 2, 3, 4, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/total")] == [1, 2, 3, 4]


# ---- 4. log lines beside a progress bar ---------------------------------------------------------------------
def test_a_log_line_prints_on_its_own_line_above_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(logging.INFO)
    bar = progress_bar(total=2, desc="train", mininterval=0)
    bar.update(1)
    logging.getLogger("klvae.test").info("downloading something")
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    # Was "train:  50%|...| 1/2 [00:00<00:00, ...]INFO: downloading something" on one line.
    assert "INFO: downloading something" in err.replace("\r", "\n").splitlines(), err
