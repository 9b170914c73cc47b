"""Pins mismatches between the documentation (README.md, docs/training.md) and what the code does, found by a hunt
that ran the docs' commands and code blocks as a newcomer would:

- docs/training.md: a resume from a checkpoint older than others of the run "renames the later ones to
  *.superseded ... the resumed run goes another way". Resumed at train.max_steps (nothing left to train), the run
  says "weights in <out_dir>/final" while final/ still holds the export of the abandoned, superseded steps: an
  export newer than the resumed checkpoint is taken as this run's; and a second resume from the same earlier
  checkpoint renames the second try's later checkpoint over the first try's *.superseded one, losing it;
- README.md: "With no `--model`, every command that runs a model ... uses klvae's small built-in `demo` model"
  (and each --help: "'demo' (the default ...)"). Run in a folder that holds an entry named `demo` (a project's
  demo/ folder, or `prepare_data.py --out demo`), the default loads that instead and fails, while the log says
  "using klvae's built-in demo model".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import klvae
from helpers import noise_folder, rgb_image, tiny_train_cli
from klvae.cli.main import main
from klvae.training import checkpoint as ckpt


def _images(tmp: Path, n: int = 4) -> Path:
    return noise_folder(tmp / "images", n, hw=(16, 16))


def _train_args(tmp: Path, *extra: str) -> list[str]:
    return tiny_train_cli(tmp, "train.ckpt_every=1", *extra)


def test_a_resume_from_an_earlier_checkpoint_exports_that_checkpoint_not_the_superseded_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _images(tmp_path)
    run = tmp_path / "run"
    assert main(_train_args(tmp_path, "train.max_steps=2")) == 0  # checkpoints 1 and 2; final/ holds step 2
    earlier = run / "checkpoints" / "step_00000001.pt"
    capsys.readouterr()
    assert main([*_train_args(tmp_path, "train.max_steps=1"), "--resume", str(earlier)]) == 0
    assert (run / "checkpoints" / "step_00000002.pt.superseded").is_file()
    assert f"weights in {run / 'final'}" in capsys.readouterr().out
    step1 = ckpt.load_checkpoint(earlier)["vae"]
    final = klvae.AutoencoderKL.from_pretrained(run / "final").state_dict()
    stale = [k for k in step1 if not torch.equal(final[k], step1[k])]
    # now: final/ still holds step 2's weights, of the run the resume superseded
    assert not stale, f"final/ holds the superseded step-2 export, not step 1's weights: {stale[:3]}"


def test_a_second_resume_from_an_earlier_checkpoint_keeps_the_first_superseded_checkpoint(tmp_path: Path) -> None:
    # Two tries from one milestone (say, two learning rates from step 6): each try's later checkpoints are set
    # aside as *.superseded, "kept, not deleted: they may be wanted" (set_aside_later's docstring).
    d = tmp_path / "checkpoints"
    d.mkdir()
    (d / "step_00000006.pt").write_bytes(b"milestone")
    (d / "step_00000008.pt.superseded").write_bytes(b"first try, step 8")
    (d / "step_00000008.pt").write_bytes(b"second try, step 8")
    assert [p.name for p in ckpt.set_aside_later(d, 6)] == ["step_00000008.pt"]
    kept = sorted(p.read_bytes() for p in d.iterdir())
    # now: the second try's step 8 is renamed over the first's, whose checkpoint is silently lost
    assert kept == [b"first try, step 8", b"milestone", b"second try, step 8"]


@pytest.mark.parametrize("argv", [
    ["info", "--json"],
    ["reconstruct", "img.png", "-o", "recon.png"],
    ["eval", "--data", "images", "-o", "report", "--no-lpips", "--no-fid", "--resolution", "16"],
], ids=["info", "reconstruct", "eval"])
def test_no_model_means_the_built_in_demo_even_beside_a_folder_named_demo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / "train").mkdir(parents=True)  # e.g. `python recipes/demo/prepare_data.py --out demo`
    rgb_image(tmp_path / "img.png")
    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    # now: exit 2, "klvae: error: demo has no diffusion_pytorch_model.safetensors ... (a pipeline folder? ...)"
    assert main(["-q", *argv]) == 0, capsys.readouterr().err
