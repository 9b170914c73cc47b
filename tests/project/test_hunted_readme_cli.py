"""Pins what a hunt found walking README.md's Set-up, Quick start and Training sections, and docs/training.md, as a
newcomer runs them (on the tiny preset, in this process):

- docs/training.md: "A dataset with fewer items than one global batch is refused ... `klvae train` checks this
  before it builds the model". Over WebDataset `.tar` shards nothing is counted: 3 images with data.batch_size 4
  train, every step on 3 images, while the start-up line says "4 images ... a step";
- (pinned, not a bug: docs/training.md now says so) over shards each worker's last batch of a pass may be short,
  since streams are read in one order and dropping the left-overs would leave the same images out of every pass;
- `--set data.train=2023` (or on, 0x10: YAML reads numbers and booleans) was refused without saying to quote it;
- the warning of a skipped non-finite step names the step before it (0-based), while metrics.jsonl, the progress
  bar and "trained to step N" count the steps done: "step 1: non-finite loss" is logged for the row of step 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from helpers import noise_folder, noise_shards, one_error_line, tiny_train_cli
from klvae.cli.main import main
from klvae.training import trainer as trainer_module


def _shards(root: Path, counts: tuple[int, ...], side: int = 16) -> str:
    return noise_shards(root, counts, side)


def _batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The images in each micro-batch of each optimiser step the trainer takes from here on."""
    sizes: list[list[int]] = []
    real = trainer_module.Trainer.train_step

    def spy(self: trainer_module.Trainer, micro: list) -> dict[str, float]:
        sizes.append([int(m.shape[0]) for m in micro])
        return real(self, micro)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", spy)
    return sizes


def test_shards_with_fewer_images_than_one_batch_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """3 images in .tar shards with data.batch_size 4 train (every step on 3 images, said to be 4) instead of the
    one-line refusal an image folder of 3 gets."""
    spec = _shards(tmp_path / "shards", (1, 1, 1))
    sizes = _batch_sizes(monkeypatch)
    rc = main(tiny_train_cli(tmp_path, f"data.train={spec}", "data.batch_size=4", "train.max_steps=2"))
    err = capsys.readouterr().err
    assert sizes == [] and rc == 2, sizes  # now: rc 0, sizes [[3], [3]]
    assert "data.batch_size" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_an_image_folder_with_fewer_images_than_one_batch_is_refused(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The folder case the shards above should match: one error line naming the batch size that fits."""
    noise_folder(tmp_path / "images", 3, hw=(16, 16))
    assert main(tiny_train_cli(tmp_path, "data.batch_size=4", "train.max_steps=2")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "fewer than one global batch of 4" in line and "data.batch_size to 3 or less" in line, line
    assert not (tmp_path / "run").exists()


def test_a_pass_over_shards_trains_on_every_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 images in 2 shards at data.batch_size 2: a pass ends in a short batch, since streams are read in one order
    and dropping the left-over image would leave the same one out of every pass (docs/training.md says so)."""
    spec = _shards(tmp_path / "shards", (3, 2))
    sizes = _batch_sizes(monkeypatch)
    assert main(tiny_train_cli(tmp_path, f"data.train={spec}", "data.batch_size=2", "data.num_workers=0",
                               "train.max_steps=3")) == 0
    assert sizes == [[2], [2], [1]]


def test_the_non_finite_warning_names_the_step_metrics_jsonl_logs(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The second step diverges: metrics.jsonl's row of step 2 says skipped, the warning says "step 1"."""
    noise_folder(tmp_path / "images", 4, hw=(16, 16))
    with caplog.at_level(logging.WARNING):
        assert main(tiny_train_cli(tmp_path, "optim.lr=1e30", "optim.grad_clip=0", "train.max_steps=2",
                                   "train.log_every=1")) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    warned = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert skipped == [2] and len(warned) == 1, (skipped, warned)
    assert warned[0].startswith("step 2: "), warned  # now: "step 1: non-finite loss, step skipped (1 in a row)"


def test_the_shard_refusal_names_the_short_rank(tmp_path: Path) -> None:
    """The refusal of shards says which process is short and the batch size that would fit."""
    from helpers import tiny_train_config
    from klvae.errors import KlvaeError
    from klvae.training.data_setup import check_train_data

    spec = _shards(tmp_path / "shards", (2, 2, 1))
    cfg = tiny_train_config(tmp_path, f"data.train={spec}", "data.batch_size=2")
    check_train_data(cfg, 1, val=False)  # one process reads all five
    with pytest.raises(KlvaeError) as e:  # ranks get whole shards: the third holds one image
        check_train_data(cfg, 3, val=False)
    assert "rank 2 of 3 process(es) reads 1 image sample(s)" in str(e.value) and "to 1 or less" in str(e.value)


@pytest.mark.parametrize(("value", "read"), [("2023", "2023"), ("0x10", "16"), ("on", "True")])
def test_a_text_field_given_what_yaml_reads_as_a_number_says_to_quote_it(
        value: str, read: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--set data.train=2023 (a folder named 2023) was refused as "must be str, got 2023" with no way out said."""
    assert main(tiny_train_cli(tmp_path, f"data.train={value}")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"must be str, got {read}" in line and "quote it, as in --set 'data.train=\"...\"'" in line, line
    from helpers import tiny_train_config

    assert tiny_train_config(tmp_path, f'data.train="{value}"').data.train == value  # the way out works


@pytest.mark.parametrize(("option", "value"), [("--val-every", "1"), ("--val-every", "0"), ("--max-side", "0")])
def test_the_demo_data_script_refuses_numbers_that_cannot_work(option: str, value: str, tmp_path: Path) -> None:
    """prepare_data.py --val-every 0 or --max-side 0 ended in a traceback; --val-every 1 wrote no training image."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "recipes" / "demo" / "prepare_data.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "d"), option, value],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"argument {option}: must be at least" in done.stderr
    assert not (tmp_path / "d").exists()
