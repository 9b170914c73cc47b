"""Pins what a mutation audit of training/trainer.py, training/loop.py and training/resume.py found untested: where a
resume over another number of items and another global batch goes on in the epoch (and that it never starts past
the next epoch's first batch), the item count a checkpoint carries on, a process count of 0, and a
cosine run's new length warned about; and train.max_nonfinite stopping at that many non-finite steps."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from helpers import tiny_batch, tiny_train_config
from klvae.errors import KlvaeError
from klvae.training.resume import config_changes, resumed_batch, saved_global_batch
from klvae.training.trainer import Trainer


# ---- the data position of a resume -----------------------------------------------------------------------------
def test_a_resume_over_other_items_and_batches_goes_on_from_the_same_epoch_and_place() -> None:
    """A resume with more images and another batch would start at the wrong batch, reading or skipping images."""
    # The saved run: 10 items in global batches of 2 (5 a epoch); 7 done = epoch 1, its 4 first images read. Now 12
    # items in batches of 3 (4 a epoch): epoch 1 again, at its batch 2 (images 6 on; none of 4-5 read twice).
    assert resumed_batch(7, 2, 3, 10, 12) == 6


def test_a_resume_never_starts_past_the_next_epochs_first_batch() -> None:
    """A resume whose place falls past the new epoch's last batch would skip a whole epoch's start."""
    # 2 of 3 batches of 3 read (image 6 next); now 7 items in batches of 4, one a epoch: the next epoch's first.
    assert resumed_batch(2, 3, 4, 10, 7) == 1


def test_a_checkpoint_without_a_process_count_gives_no_global_batch() -> None:
    """A checkpoint saying 0 processes would be taken for a run of 0-image batches and move the data position."""
    config = json.dumps({"data": {"batch_size": 2}})
    assert saved_global_batch({"config": config, "world": 2}) == 4
    assert saved_global_batch({"config": config, "world": 0}) is None
    assert saved_global_batch({"config": config, "world": -2}) is None


def _resumed(tmp: Path, data_items: int | None) -> Trainer:
    state = Trainer(tiny_train_config(tmp)).state_dict()
    state["data_items"] = data_items
    tr = Trainer(tiny_train_config(tmp))
    tr.load_state_dict(state)
    return tr


def test_a_resume_over_as_many_items_says_nothing_about_the_order(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Every resume would warn that the epochs' orders are drawn anew, though the data did not change."""
    for n, warned in ((5, False), (6, True)):
        tr = _resumed(tmp_path, 5)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="klvae"):
            assert tr.start_batch(n) == 0
        said = [r.getMessage() for r in caplog.records if "drawn anew" in r.getMessage()]
        assert len(said) == int(warned), (n, said)


def test_a_checkpoint_saved_before_the_loader_started_keeps_the_item_count(tmp_path: Path) -> None:
    """A resume saved again before reading data would forget the count, and the next resume not see it change."""
    tr = _resumed(tmp_path, 5)
    assert tr.state_dict()["data_items"] == 5
    tr.start_batch(7)
    assert tr.state_dict()["data_items"] == 7
    assert _resumed(tmp_path, None).state_dict()["data_items"] is None


@pytest.mark.parametrize(("schedule", "warned"), [("cosine", True), ("constant", False)])
def test_a_cosine_run_resumed_with_another_length_is_warned_about(tmp_path: Path, schedule: str,
                                                                  warned: bool) -> None:
    """A cosine run resumed longer re-stretches its lr from the resumed step on, and nothing would say so."""
    saved = tiny_train_config(tmp_path, f"optim.schedule={schedule}", "train.max_steps=10")
    changes = config_changes(json.dumps(saved.to_dict()),
                             tiny_train_config(tmp_path, f"optim.schedule={schedule}", "train.max_steps=20"))
    assert changes == (["train.max_steps 10 → 20"] if warned else [])


def test_max_nonfinite_stops_the_run_at_that_many_non_finite_steps_in_a_row(tmp_path: Path) -> None:
    """train.max_nonfinite=2 would let a third NaN step run, one more than asked for."""
    tr = Trainer(tiny_train_config(tmp_path, "train.max_nonfinite=2"))
    nan = tiny_batch() * float("nan")
    assert tr.train_step([nan])["skipped"] == 1.0 and tr.nonfinite_run == 1
    with pytest.raises(KlvaeError, match=r"^2 non-finite losses in a row; stopping \(train\.max_nonfinite\)$"):
        tr.train_step([nan])
