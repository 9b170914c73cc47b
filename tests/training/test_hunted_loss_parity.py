"""Bugs found by hunting for LDM-loss parity issues (klvae.training.losses and their use in the trainer).

The loss terms themselves (rec, NLL, weighted NLL, KL, g_loss, adaptive d_weight, adopt_weight, hinge/vanilla,
the PatchGAN's layout and init, the last layer) agree with LDM / taming; what fails here is what surrounds them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import noise_folder
from klvae.cli.main import main


def _sets(tmp: Path, *overrides: str) -> list[str]:
    cfg = ("model.preset=tiny", f"data.train={tmp / 'images'}", "data.batch_size=2", "data.num_workers=0",
           "train.device=cpu", f"train.out_dir={tmp / 'run'}", "train.max_steps=1", "train.val_lpips=false",
           "loss.lpips_pretrained=false", *overrides)
    return [a for o in cfg for a in ("--set", o)]


@pytest.mark.parametrize("loss", [("loss.preset=ft-mse",), ("loss.preset=ldm", "loss.disc_weight=0")],
                         ids=["ft-mse", "ldm-without-critic"])
def test_a_resolution_too_small_for_the_lpips_term_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], loss: tuple[str, ...]) -> None:
    # Now: data.resolution 8 (a multiple of tiny's factor 2) passes every check, the model and LPIPS are built, and
    # the first step dies in LPIPS's VGG pooling: "klvae: internal error: RuntimeError: ... Output size is too
    # small", exit status 1 (the PatchGAN's own resolution limit is refused up front with exit 2).
    noise_folder(tmp_path / "images", 4)
    code = main(["train", *_sets(tmp_path, "data.resolution=8", *loss)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("klvae:")]
    assert code == 2, err[-1500:]
    assert len(lines) == 1 and lines[0].startswith("klvae: error: "), lines
    assert "data.resolution" in lines[0] and ("perceptual" in lines[0] or "LPIPS" in lines[0]), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
