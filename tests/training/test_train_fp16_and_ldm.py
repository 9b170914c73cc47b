"""Training in and from half precision: the dtype a fine-tune of fp16/bf16 weights trains and exports in (and the note
saying so, which counts a full checkpoint's VAE only and is given once for a training checkpoint), the EMA on fp16
overflow steps, a loss scale past float32's range; and a full-LDM run offline (LPIPS from files, the critic from
disc_start, resume, export, then encode and reconstruct with the export)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import klvae
from helpers import block_metric_downloads, perturbed_vae
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.training.checkpoint import latest_checkpoint, load_training_state
from klvae.training.config import load_config
from klvae.training.loop import fit
from klvae.training.model_setup import build_model
from klvae.training.trainer import Trainer
from klvae.weights import read_state_dict
from klvae.weights.save import export_ldm


def _noise_images(root: Path, n: int, size: int = 24) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _sets(run: Path, data: Path | str, *extra: str) -> list[str]:
    return ["model.preset=tiny", f"data.train={data}", "data.resolution=16", "data.batch_size=2",
            "data.num_workers=0", "loss.preset=mse", "train.device=cpu", "train.val_lpips=false",
            f"train.out_dir={run}", *extra]


def _sets_in(tmp_path: Path, *extra: str) -> list[str]:
    """A tiny run's overrides: one image a batch from tmp_path/data, written to tmp_path/run."""
    return ["model.preset=tiny", f"data.train={tmp_path / 'data'}", "data.resolution=16", "data.batch_size=1",
            "data.num_workers=0", "loss.preset=mse", "train.device=cpu", "train.val_lpips=false",
            f"train.out_dir={tmp_path / 'run'}", *extra]


# ---- 1. a fine-tune of half-precision weights ---------------------------------------------------------------------
@pytest.mark.parametrize(("stored", "overrides"), [
    (torch.float16, ""), (torch.float16, "{scaling_factor: 0.5}"), (torch.bfloat16, "{scaling_factor: 0.5}"),
    (torch.float32, ""),
])
def test_a_fine_tune_trains_and_exports_float32_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            stored: torch.dtype, overrides: str) -> None:
    torch.manual_seed(0)
    src = klvae.AutoencoderKL("tiny").to(stored).save_pretrained(tmp_path / "src")
    run = tmp_path / "run"
    sets = _sets(run, _noise_images(tmp_path / "data", 2), f"model.pretrained={src}", "train.max_steps=1")
    with caplog.at_level(logging.INFO, logger="klvae.training"):
        tr = Trainer(load_config(None, sets + ([f"model.overrides={overrides}"] if overrides else [])))
        fit(tr)
    assert tr.vae.dtype == torch.float32  # the master weights, with or without overrides
    exported = read_state_dict(run / "final" / "diffusion_pytorch_model.safetensors")
    saved = load_training_state(latest_checkpoint(run / "checkpoints"))["vae"]
    assert {t.dtype for t in exported.values()} == {t.dtype for t in saved.values()} == {torch.float32}
    notes = [r.getMessage() for r in caplog.records if "master weights" in r.getMessage()]
    if stored == torch.float32:
        assert notes == []
    else:  # the export is twice the size of what was loaded: said once, with the way back
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[stored]
        assert len(notes) == 1 and f"stores {name} weights" in notes[0] and f"--dtype {name}" in notes[0]


# ---- 2. the stored dtype: the VAE's tensors, read without a second note -------------------------------------------
def test_a_fine_tune_note_counts_the_vae_of_a_full_checkpoint_not_its_unet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A full SD checkpoint whose VAE is fp32 beside a (here larger) fp16 UNet: the VAE is what the run trains.
    export_ldm(perturbed_vae("tiny"), tmp_path / "vae.safetensors")
    sd = {f"first_stage_model.{k}": v for k, v in load_file(tmp_path / "vae.safetensors").items()}
    sd |= {f"model.diffusion_model.block{i}.weight": torch.zeros(4, dtype=torch.float16) for i in range(len(sd) + 1)}
    save_file(sd, tmp_path / "sd.safetensors")
    cfg = load_config(None, _sets_in(tmp_path, f"model.pretrained={tmp_path / 'sd.safetensors'}"))
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
        vae = build_model(load_config(None, _sets_in(tmp_path, f"model.pretrained={ckpt}")))
    assert len(notes()) == 1 and isinstance(vae, klvae.AutoencoderKL)


# ---- 3. the EMA follows the optimiser through fp16 overflow -------------------------------------------------------
def _set_scale(scaler: torch.amp.GradScaler, value: float) -> None:
    state = scaler.state_dict()
    state["scale"] = value
    scaler.load_state_dict(state)


def test_an_fp16_overflow_skips_the_ema_update_with_the_optimiser_step(tmp_path: Path) -> None:
    sets = _sets(tmp_path / "run", "x", "train.precision=fp16", "train.ema_decay=0.9", "optim.lr=0.01")
    tr = Trainer(load_config(None, sets))
    torch.manual_seed(1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    _set_scale(tr.scaler, 1.0)  # no overflow: both steps update
    assert [tr.train_step([x])["skipped"] for _ in range(2)] == [0.0, 0.0]
    assert int(tr.ema.n_averaged) == 2
    weights = [p.detach().clone() for p in tr.vae.parameters()]
    ema = [p.detach().clone() for p in tr.ema.module.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(weights, ema, strict=True))  # an EMA update would show

    _set_scale(tr.scaler, 2.0**127)  # the scaled loss overflows float32: inf gradients, the step is skipped
    logs = tr.train_step([x])
    assert tr.scaler.get_scale() == 2.0**126  # the scaler saw the overflow and backed off
    assert all(torch.equal(a, b) for a, b in zip(weights, tr.vae.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ema, tr.ema.module.parameters(), strict=True))
    assert int(tr.ema.n_averaged) == 2  # was 3: the decay warm-up counted a step that never happened
    assert logs["skipped"] == 1.0 and tr.nonfinite_run == 0  # routine under fp16, not a non-finite loss

    _set_scale(tr.scaler, 1.0)
    assert tr.train_step([x])["skipped"] == 0.0 and int(tr.ema.n_averaged) == 3


# ---- 4. fp16: a loss scale past float32's range -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [2.0**-130, 0.0])  # ~140 and ~165 halvings from 65536 (a checkpoint may hold them)
def test_an_fp16_scale_past_float32s_range_stops_the_run_before_it_corrupts_the_weights(
    tmp_path: Path, scale: float
) -> None:
    tr = Trainer(load_config(None, _sets_in(tmp_path, "train.precision=fp16", "train.ema_decay=0.9")))
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


# ---- 5. a newcomer's full-LDM run, offline ------------------------------------------------------------------------
def _skimage_pngs(root: Path, names: list[str]) -> Path:
    import skimage.data

    root.mkdir(parents=True)
    for name in names:  # scikit-image's bundled photographs, made small so that the steps stay quick
        Image.fromarray(getattr(skimage.data, name)()).resize((48, 48), Image.BICUBIC).save(root / f"{name}.png")
    return root


def _rows(run: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_a_newcomer_trains_the_full_ldm_loss_offline_then_uses_the_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    block_metric_downloads(monkeypatch, tmp_path)  # the LPIPS weights come from the files the config names
    monkeypatch.chdir(tmp_path)
    from klvae.nets.lpips import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS(pretrained=False)  # stand-ins for torchvision's VGG16 and the lpips heads, in their layouts
    torch.save(lpips.net.state_dict(), "vgg16.pth")
    torch.save(lpips.lin.state_dict(), "lin.pth")
    data = _skimage_pngs(tmp_path / "data", ["astronaut", "chelsea", "coffee", "rocket"])
    Path("tiny.yaml").write_text(
        "model: {preset: tiny-f8}\n"
        f"data: {{train: {data}, resolution: 32, batch_size: 2, num_workers: 0}}\n"
        "loss: {preset: ldm, lpips_vgg_path: vgg16.pth, lpips_lin_path: lin.pth, disc_start: 1, disc_ndf: 8}\n"
        "optim: {lr: 1.0e-3}\n"
        "train: {max_steps: 1, log_every: 1, ckpt_every: 1, ema_decay: 0.9, out_dir: runs/t, device: cpu}\n")
    assert main(["-q", "train", "tiny.yaml"]) == 0
    assert main(["-q", "train", "tiny.yaml", "--resume", "--set", "train.max_steps=2"]) == 0
    rows = _rows(Path("runs/t"))
    assert sorted(rows) == [1, 2]
    # Step 1 is global step 0, before disc_start: no critic loss, no adaptive weight. Step 2 (after the resume) has
    # both, finite.
    assert "d_loss" not in rows[1] and rows[1]["d_weight"] == 0.0 and rows[1]["g_loss"] == 0.0
    r = rows[2]
    assert np.isfinite(r["d_loss"]) and 0.0 < r["d_weight"] <= 1e4 * 0.5 and r["disc_factor"] == 1.0
    assert r["total"] == pytest.approx(r["nll"] + 1e-6 * r["kl"] + r["d_weight"] * r["g_loss"], rel=1e-4)
    assert all(r["skipped"] == 0.0 and r["rec"] > 0 for r in rows.values())
    final = klvae.AutoencoderKL.from_pretrained("runs/t/final").state_dict()  # re-exported after the resume
    last = klvae.AutoencoderKL.from_pretrained("runs/t/checkpoints/step_00000002.pt").state_dict()
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    capsys.readouterr()

    assert main(["-q", "encode", str(data), "-o", "lat.safetensors", "--model", "runs/t/final"]) == 0
    with safe_open("lat.safetensors", "pt") as f:  # one 4-channel latent per image, 48 px / 8
        assert sorted(tuple(f.get_tensor(k).shape) for k in f.keys()) == [(4, 6, 6)] * 4  # noqa: SIM118
    capsys.readouterr()
    assert main(["reconstruct", str(data / "chelsea.png"), "-o", "rec.png", "--model", "runs/t/final", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["size"] == [48, 48] and np.isfinite(result["psnr"]) and Image.open("rec.png").size == (48, 48)
