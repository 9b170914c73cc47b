"""Review of the follow-ups (training, CLI): an fp16 scale that underflows to 0, the early checks of `klvae train`
(a mapped --resume file, data.val on rank 0 only), argparse errors blamed on the subcommand, and the stored
dtype counted once, over the VAE's tensors only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import klvae
from helpers import perturbed_vae
from klvae.cli.main import main
from klvae.cli.train import check_inputs
from klvae.errors import KlvaeError
from klvae.training.config import load_config
from klvae.training.model_setup import build_model
from klvae.training.trainer import Trainer
from klvae.weights.save import export_ldm


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


# ---- 1. fp16: a loss scale past float32's range ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2.0**-130, 0.0])  # ~140 and ~165 halvings from 65536 (a checkpoint may hold them)
def test_an_fp16_scale_past_float32s_range_stops_the_run_before_it_corrupts_the_weights(
    tmp_path: Path, scale: float
) -> None:
    tr = Trainer(load_config(None, _sets(tmp_path, "train.precision=fp16", "train.ema_decay=0.9")))
    state = tr.scaler.state_dict()
    state["scale"] = scale
    tr.scaler.load_state_dict(state)
    weights = [p.detach().clone() for p in tr.vae.parameters()]
    with pytest.raises(KlvaeError, match=r"overflowed at every loss scale .* cannot be unscaled; train in bf16"):
        tr.train_step([torch.rand(1, 3, 16, 16) * 2 - 1])
    # The scaler found no inf in the scaled gradients, then unscaled them by 1 / scale = inf: the old code stepped
    # with those, writing inf/nan into the weights (and at 0 it logged skipped 0 and advanced the EMA).
    assert int(tr.ema.n_averaged) == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, tr.vae.parameters(), strict=True))


# ---- 2. the early checks of klvae train --------------------------------------------------------------------------
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


# ---- 3. argparse: unknown options blamed on their subcommand -----------------------------------------------------
def test_an_unknown_option_points_at_the_subcommands_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["encode", "x.png", "-o", "y.safetensors", "--tile-szie", "64"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("klvae encode: error: unrecognized arguments: --tile-szie 64 "
                                       "(see 'klvae encode --help')\n")


# ---- 4. the stored dtype: the VAE's tensors, read without a second note -------------------------------------------
def test_a_fine_tune_note_counts_the_vae_of_a_full_checkpoint_not_its_unet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A full SD checkpoint whose VAE is fp32 beside a (here larger) fp16 UNet: the VAE is what the run trains.
    export_ldm(perturbed_vae("tiny"), tmp_path / "vae.safetensors")
    sd = {f"first_stage_model.{k}": v for k, v in load_file(tmp_path / "vae.safetensors").items()}
    sd |= {f"model.diffusion_model.block{i}.weight": torch.zeros(4, dtype=torch.float16) for i in range(len(sd) + 1)}
    save_file(sd, tmp_path / "sd.safetensors")
    cfg = load_config(None, _sets(tmp_path, f"model.pretrained={tmp_path / 'sd.safetensors'}"))
    with caplog.at_level(logging.INFO, logger="klvae"):
        build_model(cfg)
    assert not [r for r in caplog.records if "master weights" in r.getMessage()]


def _training_checkpoint(path: Path) -> Path:
    """What Trainer.state_dict() holds, as far as loading it as a model reads."""
    vae = perturbed_vae("tiny")
    torch.save({"step": 3, "batches_done": 3, "nonfinite_run": 0, "vae": vae.state_dict(), "opt_ae": {},
                "model_config": json.dumps(vae.config.to_dict())}, path)
    return path


def test_a_training_checkpoint_is_noted_once_by_info_and_by_a_fine_tune(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _training_checkpoint(tmp_path / "step_00000003.pt")

    def notes() -> list[str]:
        return [r.getMessage() for r in caplog.records if "is a klvae training checkpoint" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="klvae"):
        assert main(["info", "--model", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stored_dtype"] == "fp32"
    assert len(notes()) == 1  # the dtype is counted on a second read, which said it again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="klvae"):
        vae = build_model(load_config(None, _sets(tmp_path, f"model.pretrained={ckpt}")))
    assert len(notes()) == 1 and isinstance(vae, klvae.AutoencoderKL)
