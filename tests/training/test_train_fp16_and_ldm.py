"""Training follow-ups: the dtype a fine-tune trains and exports in, the EMA on fp16 overflow steps, the refusal of
a dataset under one global batch, and a newcomer's full-LDM run (LPIPS from files, the critic from disc_start,
resume, export, then encode and reconstruct with the export)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import klvae
from helpers import block_metric_downloads, one_error_line
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.training import trainer as trainer_module
from klvae.training.checkpoint import latest_checkpoint, load_training_state
from klvae.training.config import load_config
from klvae.training.loop import fit
from klvae.training.sampler import GlobalBatchSampler
from klvae.training.trainer import Trainer
from klvae.weights import read_state_dict


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


# ---- 2. the EMA follows the optimiser through fp16 overflow -------------------------------------------------------
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


# ---- 3. too few images for one global batch ------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "local", "world", "fix"), [
    (3, 2, 2, "set the batch size per process to 1 or less"),
    (5, 8, 1, "set the batch size per process to 5 or less"),
    (1, 1, 2, "set the batch size per process to 1 and run at most 1 process(es)"),
    (0, 1, 1, "add images"),
])
def test_the_sampler_says_what_would_fit(n: int, local: int, world: int, fix: str) -> None:
    with pytest.raises(KlvaeError) as e:
        GlobalBatchSampler(n, local, rank=0, world=world)
    assert str(e.value).endswith(f"({local} per process x {world} process(es)): {fix}")


@pytest.mark.parametrize(("world", "extra", "expected"), [
    ("1", [], "has 3 item(s) (files or rows found; 0 of them unreadable), fewer than one global batch of 4 "
              "(data.batch_size 4 x 1 process(es)): set data.batch_size to 3 or less, or add images"),
    ("2", ["--set", "data.batch_size=2"], "fewer than one global batch of 4 (data.batch_size 2 x 2 process(es)): "
                                          "set data.batch_size to 1 or less, or add images"),
    ("1", ["--set", "data.val=nowhere"], "klvae: error: data.val: no such data: nowhere"),
    ("1", ["--resume", "few/0.png"], "few/0.png is not a klvae checkpoint"),
])
def test_train_refuses_bad_inputs_before_building_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], world: str,
    extra: list[str], expected: str,
) -> None:
    def built_first(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model (and LPIPS, and the process group) were built before the inputs were checked")

    monkeypatch.setattr(trainer_module.Trainer, "__init__", built_first)
    monkeypatch.setenv("WORLD_SIZE", world)  # what torchrun sets: the process group itself is not up yet
    monkeypatch.chdir(tmp_path)
    sets = _sets(tmp_path / "run", _noise_images(tmp_path / "few", 3), "data.batch_size=4")
    assert main(["train", *(a for s in sets for a in ("--set", s)), *extra]) == 2
    assert expected in one_error_line(capsys.readouterr().err)


# ---- 4. a newcomer's full-LDM run, offline ----------------------------------------------------------------------
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
