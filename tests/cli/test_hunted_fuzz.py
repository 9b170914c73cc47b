"""Pins what a fuzz of every `klvae` subcommand with hostile-but-plausible option values found: bad input that ends
in an internal error, a hang, a false or Python-worded message, or a silently ignored (or misread) output path,
instead of one true `klvae: error:` line and exit status 2.

- `--device hpu` (Intel Gaudi without its PyTorch plug-in) or `--device privateuseone`: torch raises
  ModuleNotFoundError, which usable_device does not catch.
- `convert -o ""` writes the model into the working folder (Path("") is "."), where every other command refuses an
  empty output name.
- `scale --save ""` is silently not saved (exit 0), as if --save were not given.
- `train --resume FIFO`, and `train --resume` with a FIFO among train.out_dir/checkpoints, block forever on it.
- `decode MISSING.pt --unscaled` (or an image) is told that the file records its scaling.
- `noise` with betas that round out of (0, 1) in float64 (`--beta-end 1e-17 --zero-terminal-snr`, the mirror of the
  pinned `--beta-start 1e-17` case; `--beta-start`/`--beta-end 0.9999999999999999`, which the CLI accepts as "strictly
  between 0 and 1") gets the library's Python advice ("use NoiseSchedule.from_name(...)", "pass
  zero_terminal_snr=True").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers import fifo_watchdog, files_under, noise_folder, one_error_line, rgb_image, saved_tiny_model
from klvae.cli.main import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("tiny"))


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `klvae -q argv`; it must exit 2 with one `klvae: error:` line (no traceback, no internal error)."""
    status = main(["-q", *argv])
    err = capsys.readouterr().err
    assert status == 2, (status, err[-500:])
    return one_error_line(err)


# -- devices whose torch backend module is missing -------------------------------------------------------------

@pytest.mark.parametrize("device", ["hpu", "privateuseone"])
def test_a_device_whose_torch_backend_is_not_installed_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str) -> None:
    # Now: `klvae: internal error: ModuleNotFoundError: No module named 'torch.hpu'`, exit 1.
    img = rgb_image(tmp_path / "a.png", 16, 16)
    line = _refused(capsys, ["reconstruct", str(img), "-o", str(tmp_path / "r.png"), "--device", device])
    assert device in line, line
    assert not (tmp_path / "r.png").exists()


# -- empty output names ----------------------------------------------------------------------------------------

def test_convert_with_an_empty_output_name_is_refused_not_written_into_the_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    # Now: exit 0, "wrote . (diffusers layout ...)": config.json and the weights land in the current folder.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    line = _refused(capsys, ["convert", "--model", str(tiny_model), "-o", ""])
    assert "--output" in line, line
    assert files_under(work) == []


def test_scale_with_an_empty_save_name_is_refused_not_silently_left_unsaved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    # Now: exit 0 after the estimate, and no model is saved anywhere (`if args.save:` reads "" as not given).
    data = noise_folder(tmp_path / "data", 2, hw=(32, 32))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    line = _refused(capsys, ["scale", "--data", str(data), "--model", str(tiny_model), "--device", "cpu",
                             "--resolution", "16", "--limit", "2", "--save", ""])
    assert "--save" in line, line
    assert files_under(work) == []


# -- a checkpoint that is a FIFO -------------------------------------------------------------------------------

def _train_args(tmp_path: Path) -> list[str]:
    data = noise_folder(tmp_path / "images", 4, hw=(16, 16))
    return ["train", "--set", "model.preset=tiny", "--set", f"data.train={data}", "--set", "data.resolution=16",
            "--set", "data.batch_size=2", "--set", "data.num_workers=0", "--set", "train.device=cpu",
            "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "loss.preset=mse", "--set", "train.max_steps=1"]


def test_train_resume_from_a_fifo_is_refused_without_blocking_on_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Now: `klvae train ... --resume ckpt.pt` (a FIFO) blocks on opening it until something writes to it.
    argv = _train_args(tmp_path)
    with fifo_watchdog(tmp_path / "ckpt.pt", after=3.0) as watchdog:
        status = main(["-q", *argv, "--resume", str(tmp_path / "ckpt.pt")])
    err = capsys.readouterr().err
    assert not watchdog["fired"], "train --resume blocked on the FIFO"
    assert status == 2, (status, err[-500:])
    assert "ckpt.pt" in one_error_line(err)


def test_train_resume_latest_with_a_fifo_among_the_checkpoints_does_not_block_on_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Now: `klvae train ... --resume` picks run/checkpoints/step_00000001.pt (a FIFO) and blocks on it.
    argv = _train_args(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with fifo_watchdog(tmp_path / "run" / "checkpoints" / "step_00000001.pt", after=3.0) as watchdog:
        status = main(["-q", *argv, "--resume"])
    err = capsys.readouterr().err
    assert not watchdog["fired"], "train --resume blocked on the FIFO among the checkpoints"
    # Refusing the FIFO (2) or passing over it as no checkpoint (0, with its warning) are both fair; neither an
    # internal error nor a traceback is.
    assert status in (0, 2), (status, err[-500:])
    assert "internal error" not in err and "Traceback" not in err, err[-500:]


# -- decode --unscaled of something that is not a latents file --------------------------------------------------

@pytest.mark.parametrize(("kind", "expected"), [("missing", "no such"), ("image", "image")])
def test_decode_unscaled_names_what_the_file_is_not_that_it_records_its_scaling(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, expected: str) -> None:
    # Now: "--unscaled is for plain tensor files, which do not record their scaling; typo.pt does" (it does not
    # exist) and the same of a PNG; without --unscaled they are "no such latents file" / "is an image".
    path = tmp_path / "typo.pt" if kind == "missing" else rgb_image(tmp_path / "a.png", 16, 16)
    line = _refused(capsys, ["decode", str(path), "-o", str(tmp_path / "out"), "--unscaled"])
    assert "record their scaling" not in line, line
    assert expected in line, line
    assert not (tmp_path / "out").exists()


# -- noise: betas that round out of (0, 1) ----------------------------------------------------------------------

@pytest.mark.parametrize(("options", "named"), [
    (["--beta-end", "1e-17", "--zero-terminal-snr"], r"1e-17"),
    (["--beta-start", "0.9999999999999999"], r"beta.start|0\.9999999999999999"),
    (["--beta-end", "0.9999999999999999"], r"beta.end|0\.9999999999999999|--zero-terminal-snr"),
])
def test_noise_betas_that_round_out_of_range_are_refused_in_the_cli_s_words(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], named: str) -> None:
    # Now: "betas must be a non-empty 1-D tensor with every value in (0, 1); for a named schedule use
    # NoiseSchedule.from_name('scaled_linear') or NoiseSchedule.sd()" (untrue of the values given, which the CLI
    # accepts as strictly between 0 and 1), or "... pass zero_terminal_snr=True": Python calls offered to a CLI user.
    src = rgb_image(tmp_path / "a.png", 16, 16)
    line = _refused(capsys, ["noise", str(src), "-o", str(tmp_path / "s.png"), "--steps", "0", *options])
    assert "NoiseSchedule" not in line and "from_name" not in line and "=True" not in line, line
    assert re.search(named, line), line
    assert not os.path.exists(tmp_path / "s.png")


def test_a_config_that_is_no_regular_file_is_not_called_missing(capsys: pytest.CaptureFixture[str]) -> None:
    # A doubtful item of the hunt, then fixed: "no such config file: /dev/null" for a file that is there.
    assert main(["-q", "train", "/dev/null"]) == 2
    assert "/dev/null is a folder, FIFO or device, not a config file" in capsys.readouterr().err
