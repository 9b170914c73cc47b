"""The trainer on tiny configs: config files, the loss falling, exact resume, atomic checkpoints, the
non-finite guard, decoder-only fine-tuning, export, 2 gloo processes matching one process, and the data position
and learned logvar kept through unreadable batches and across ranks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.training import checkpoint as ckpt
from klvae.training.config import load_config
from klvae.training.loop import fit
from klvae.training.trainer import Trainer, lr_factor


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's bundled photographs, shrunk, as an image folder (plus one unreadable file)."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        img.resize((96, 64), Image.Resampling.LANCZOS).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def photos_with_a_broken_file(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photographs plus a truncated JPEG, which training must skip and count."""
    import shutil

    root = tmp_path_factory.mktemp("photos_broken")
    for p in photos.iterdir():
        shutil.copy(p, root / p.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def _config(tmp: Path, data: Path, *overrides: str) -> list[str]:
    base = [
        "model.preset=tiny", f"data.train={data}", "data.resolution=32", "data.batch_size=2",
        "data.num_workers=0", "train.log_every=1", "train.val_every=1000", "train.ckpt_every=1000",
        f"train.out_dir={tmp / 'run'}", "train.device=cpu", "optim.lr=1e-3", "optim.grad_clip=1.0",
        "loss.preset=ldm", "loss.perceptual_weight=0", "loss.kl_weight=1e-4",
    ]
    return [*base, *overrides]


def _train(tmp: Path, data: Path, *overrides: str, resume: bool = False) -> Trainer:
    tr = Trainer(load_config(None, _config(tmp, data, *overrides)))
    if resume:
        assert tr.resume()
    fit(tr)
    return tr


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["total"] for r in rows if r["split"] == "train"}


def test_config_file_overrides_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train: somewhere\n  resolution: 64\noptim:\n  lr: 1e-4\nloss:\n  preset: ft-mse\n")
    cfg = load_config(f, ["train.max_steps=7", "optim.betas=[0.9, 0.99]"])
    assert (cfg.data.resolution, cfg.optim.lr, cfg.train.max_steps, cfg.optim.betas) == (64, 1e-4, 7, (0.9, 0.99))
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\ntrain = "x"\n[train]\nprecision = "bf16"\n')
    assert load_config(toml).train.precision == "bf16"
    shouted = toml.rename(tmp_path / "C.TOML")  # read as TOML whatever its case, as --resume tells config files
    assert load_config(shouted).train.precision == "bf16"
    with pytest.raises(KlvaeError, match="unknown config field"):
        load_config(f, ["train.max_step=7"])
    with pytest.raises(KlvaeError, match="precision"):
        load_config(f, ["train.precision=fp8"])
    with pytest.raises(KlvaeError, match="must be int"):
        load_config(f, ["data.batch_size=two"])
    for empty in ("=5", "train.=5", "data..train=x"):  # "=5" was "unknown config field(s) " with no name
        with pytest.raises(KlvaeError, match="names no field before '='"):
            load_config(f, [empty])


def test_lr_schedule() -> None:
    assert lr_factor(0, 10, "constant", 100) == pytest.approx(0.1)
    assert lr_factor(50, 10, "constant", 100) == 1.0
    assert lr_factor(10, 10, "cosine", 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, "cosine", 110) == pytest.approx(0.5)
    assert lr_factor(110, 10, "cosine", 110) == pytest.approx(0.0)


def test_loss_falls_and_the_export_loads(tmp_path: Path, photos_with_a_broken_file: Path) -> None:
    tr = _train(tmp_path, photos_with_a_broken_file, "train.max_steps=40", "loss.preset=mse", "optim.lr=2e-3")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_images"] >= 1  # the truncated file was met, skipped and counted
    losses = list(_losses(tmp_path / "run").values())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    vae = klvae.AutoencoderKL.from_pretrained(tmp_path / "run" / "final")
    for a, b in zip(vae.state_dict().values(), tr.vae.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_resume_continues_exactly(tmp_path: Path, photos: Path) -> None:
    # The full LDM loss path: posterior sampling, KL, the discriminator switched on at step 2, EMA,
    # gradient accumulation and random crops/flips (per-item seeded) are all part of the state.
    common = ("loss.disc_start=2", "loss.disc_weight=0.5", "train.ema_decay=0.9", "optim.grad_accum=2",
              "data.crop=random", "data.scale_min=0.5", "optim.warmup_steps=2", "train.ckpt_every=3")
    a = _train(tmp_path / "a", photos, "train.max_steps=6", *common)
    whole = _losses(tmp_path / "a" / "run")
    _train(tmp_path / "b", photos, "train.max_steps=3", *common)
    b = _train(tmp_path / "b", photos, "train.max_steps=6", *common, resume=True)
    resumed = _losses(tmp_path / "b" / "run")
    assert resumed[2] > 0 and whole[5] != whole[4]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7)
    # The rest of the state, which the losses do not show: the EMA (the export), the critic and both optimisers.
    sa, sb = a.state_dict(), b.state_dict()
    for part in ("vae", "loss", "ema", "opt_ae", "opt_d"):
        torch.testing.assert_close(sb[part], sa[part], rtol=1e-5, atol=1e-7, msg=lambda m, p=part: f"{p}: {m}")
    final_a, final_b = (klvae.AutoencoderKL.from_pretrained(tr.out / "final").state_dict() for tr in (a, b))
    torch.testing.assert_close(final_b, final_a, rtol=1e-5, atol=1e-7)


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ck"
    ckpt.save_checkpoint({"step": 1, "w": torch.ones(3)}, d, 1)

    def dying_save(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2}, d, 2)
    latest = ckpt.latest_checkpoint(d)
    assert latest is not None and latest.name == "step_00000001.pt"
    assert ckpt.load_checkpoint(latest)["step"] == 1
    assert [p.name for p in d.iterdir()] == ["step_00000001.pt"]


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path: Path, photos: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Trainer(load_config(None, _config(tmp_path, photos, "train.max_steps=10", "train.max_nonfinite=3")))
    before = [p.detach().clone() for p in tr.vae.parameters()]
    real = tr.loss.generator_loss

    def nan_loss(*args: object, **kwargs: object) -> tuple[torch.Tensor, dict]:
        loss, logs = real(*args, **kwargs)
        return loss * float("nan"), logs

    monkeypatch.setattr(tr.loss, "generator_loss", nan_loss)
    with pytest.raises(KlvaeError, match="non-finite"):
        fit(tr)
    assert tr.step == 3
    for a, b in zip(before, tr.vae.parameters(), strict=True):
        assert torch.equal(a, b)  # skipped steps changed nothing


def test_decoder_only_fine_tuning_keeps_the_encoder(tmp_path: Path, photos: Path) -> None:
    tr = Trainer(load_config(None, _config(tmp_path, photos, "train.max_steps=3", "model.decoder_only=true",
                                           "loss.preset=ft-mse", "loss.perceptual_weight=0")))
    enc = {k: v.clone() for k, v in tr.vae.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in tr.vae.decoder.state_dict().items()}
    fit(tr)
    assert all(torch.equal(v, tr.vae.encoder.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(v, tr.vae.decoder.state_dict()[k]) for k, v in dec.items())


def test_two_gloo_processes_follow_the_single_process_trajectory(tmp_path: Path, photos: Path) -> None:
    steps = "train.max_steps=4"
    single = _config(tmp_path / "one", photos, steps, "data.batch_size=4")
    r = subprocess.run([sys.executable, "-m", "klvae.cli.main", "train", *[a for o in single for a in ("--set", o)]],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    double = _config(tmp_path / "two", photos, steps, "data.batch_size=2")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29531", "-m", "klvae.cli.main", "train", *[a for o in double for a in ("--set", o)]],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = _losses(tmp_path / "one" / "run"), _losses(tmp_path / "two" / "run")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4)


def test_resume_after_a_wholly_unreadable_batch_reads_on_where_it_stopped(
        tmp_path: Path, photos_with_a_broken_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One image per batch, and seed 2 puts broken.jpg first in epoch 0: step 1 reads two loader batches.
    seen: list[torch.Tensor] = []

    def record(self: Trainer, micro: list[torch.Tensor]) -> dict[str, float]:
        seen.append(torch.cat(micro))  # the data path only: no model step
        self.step += 1
        return {}

    monkeypatch.setattr(Trainer, "train_step", record)
    common = ("data.batch_size=1", "train.seed=2", "loss.preset=mse", "train.ckpt_every=2")
    _train(tmp_path / "a", photos_with_a_broken_file, "train.max_steps=4", *common)
    whole, seen[:] = list(seen), []
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["bad_images"] == 1  # the empty batch was met in step 1
    _train(tmp_path / "b", photos_with_a_broken_file, "train.max_steps=2", *common)
    tr = _train(tmp_path / "b", photos_with_a_broken_file, "train.max_steps=4", *common, resume=True)
    assert tr.batches_done == 5
    assert len(seen) == 4
    for a, b in zip(whole[2:], seen[2:], strict=True):
        assert torch.equal(a, b)


_DUMP_RANK_STATE = """
import sys, torch
from klvae.training.config import load_config
from klvae.training.loop import fit
from klvae.training.trainer import Trainer
tr = Trainer(load_config(None, sys.argv[2:]))
fit(tr)
torch.save({"logvar": tr.loss.logvar.detach(), "batches_done": tr.batches_done}, f"{sys.argv[1]}/rank{tr.dist.rank}.pt")
"""


def test_two_gloo_processes_keep_one_learned_logvar_and_one_data_position(
        tmp_path: Path, photos_with_a_broken_file: Path) -> None:
    # logvar lives outside DDP, so its gradient must be averaged by hand. Seed 2 with one image per rank puts
    # broken.jpg in rank 0's first batch: both ranks must drop that global batch, or their positions part.
    script = tmp_path / "dump.py"
    script.write_text(_DUMP_RANK_STATE)
    cfg = _config(tmp_path, photos_with_a_broken_file, "train.max_steps=3", "loss.learn_logvar=true",
                  "data.batch_size=1", "train.seed=2")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path), *cfg], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]
    assert ranks[0]["logvar"] != 0.0  # it was trained
    assert torch.equal(ranks[0]["logvar"], ranks[1]["logvar"])
    assert ranks[0]["batches_done"] == ranks[1]["batches_done"] > 3
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest is not None
    tr = Trainer(load_config(None, cfg))
    assert tr.resume(latest)
    assert torch.equal(tr.loss.logvar.detach(), ranks[0]["logvar"])


def test_train_command_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such config file" in err[0]


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[2] / "recipes").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid_configs(recipe: Path) -> None:
    from klvae.training.config import load_config
    from klvae.training.trainer import build_loss_config

    cfg = load_config(recipe)
    assert cfg.data.train and cfg.train.max_steps > 0
    build_loss_config(cfg.loss)


@pytest.fixture(scope="module")
def step0(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """A tiny run's overrides and its step-0 checkpoint (no training: building the Trainer is enough)."""
    tmp = tmp_path_factory.mktemp("step0")
    cfg = _config(tmp, tmp / "no-images-needed", "train.max_steps=2")
    path = Trainer(load_config(None, cfg)).save()
    assert path is not None
    return cfg, path


def test_resume_with_another_architecture_names_the_mismatch_in_one_line(step0: tuple[list[str], Path]) -> None:
    cfg, path = step0
    tr = Trainer(load_config(None, [*cfg, "model.preset=tiny-f8", "data.resolution=64"]))
    expected = (r"cannot resume from .*step_00000000\.pt: the weights do not fit this config's model "
                r"\(model\.preset 'tiny-f8'; the checkpoint's was model\.preset 'tiny'\): "
                r".*shape mismatches \(weights vs model\): \S+ \[\d+(, \d+)*\] vs")
    with pytest.raises(KlvaeError, match=expected) as e:
        tr.resume(path)
    assert "\n" not in str(e.value)
    tr = Trainer(load_config(None, [*cfg, "model.decoder_only=true"]))  # fewer parameters to optimise
    with pytest.raises(KlvaeError, match="the optimiser state does not fit this config"):
        tr.resume(path)


def test_resume_without_a_checkpoint_warns_and_a_finished_run_keeps_its_export(
        tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [a for o in _config(tmp_path, photos, "train.max_steps=1") for a in ("--set", o)]
    assert main(["-q", "train", *args, "--resume"]) == 0
    out = capsys.readouterr()
    assert "WARNING: --resume: no checkpoint in" in out.err and "starts from step 0" in out.err
    final = tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors"
    before = final.stat().st_mtime_ns
    assert main(["-q", "train", *args, "--resume"]) == 0  # already at max_steps: nothing to train or rewrite
    assert "trained to step 1: no step left to train;" in capsys.readouterr().out
    assert final.stat().st_mtime_ns == before
    # A recipe's stage 2 started before stage 1 exported: the message names the setting and the cause.
    missing = tmp_path / "stage1" / "final"
    elsewhere = ["--set", f"train.out_dir={tmp_path / 'b'}"]
    assert main(["train", *args, "--set", f"model.pretrained={missing}", *elsewhere]) == 2
    err = capsys.readouterr().err
    assert f"klvae: error: model.pretrained: no such file or folder, preset or hub id: {missing} (train the run" in err


def test_a_new_run_never_lands_in_the_folder_of_another(tmp_path: Path, photos: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Without --resume, an out_dir holding a run is refused before any work, and the old run stays intact."""
    args = [a for o in _config(tmp_path, photos, "train.max_steps=1") for a in ("--set", o)]
    assert main(["-q", "train", *args]) == 0
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["-q", "train", *args, "--set", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"klvae: error: train.out_dir {run} already holds a run (checkpoints, final, metrics.jsonl")
    assert "--resume" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert main(["-q", "train", *args, "--set", "train.max_steps=2", "--resume"]) == 0  # continuing is allowed


def _not_checkpoints(tmp: Path, good: Path) -> dict[str, Path]:
    whole = good.read_bytes()
    files = {"random.ckpt": b"\x8a\x0b" + bytes(range(256)) * 4, "image.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
             "truncated.pt": whole[:5000], "torn.pt": whole[: len(whole) // 2], "passwd": b"root:x:0:0::/root\n"}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    from safetensors.torch import save_file

    save_file({"decoder.conv_in.bias": torch.zeros(2)}, str(tmp / "weights.safetensors"))
    torch.save({"step": 3, "weights": torch.zeros(2)}, tmp / "other.pt")
    torch.save({"step": 1, "callback": _Payload()}, tmp / "evil.pt")
    return {p.name: p for p in tmp.iterdir()}


class _Payload:
    """Unpickling this would call print: weights_only must refuse it."""

    def __reduce__(self) -> tuple:
        return (print, ("payload ran",))


def test_resume_from_a_file_that_is_not_a_checkpoint_is_one_line(
        tmp_path: Path, step0: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, good = step0
    tr = Trainer(load_config(None, cfg))
    for name, path in _not_checkpoints(tmp_path, good).items():
        with pytest.raises(KlvaeError, match=r"is not a (complete )?klvae (training )?checkpoint") as e:
            tr.resume(path)
        assert "\n" not in str(e.value), name
    with pytest.raises(KlvaeError, match=r"passwd is not a klvae checkpoint: it is not a PyTorch file \(neither"):
        tr.resume(tmp_path / "passwd")  # was "...: list index out of range"
    assert "payload ran" not in capsys.readouterr().out
    args = [a for o in cfg for a in ("--set", o)]
    assert main(["train", *args, "--resume", str(tmp_path / "image.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a klvae checkpoint" in err[0], err


def test_a_garbage_newest_checkpoint_is_named_with_the_one_before(tmp_path: Path,
                                                                 step0: tuple[list[str], Path]) -> None:
    cfg, good = step0
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step_00000001.pt").write_bytes(good.read_bytes())
    (run / "step_00000009.pt").write_bytes(b"garbage\n")
    tr = Trainer(load_config(None, [*cfg, f"train.out_dir={tmp_path / 'run'}"]))
    with pytest.raises(KlvaeError, match=r"step_00000009\.pt is not a klvae checkpoint.*resume from step_00000001\.pt"):
        tr.resume()
    (run / "step_00000009.pt").unlink()
    assert tr.resume() and tr.step == 0


@pytest.mark.parametrize("export_ema", [True, False])
def test_a_training_checkpoint_loads_as_the_model_its_run_exports(tmp_path: Path, photos: Path,
                                                                  export_ema: bool) -> None:
    """`--model step_*.pt`: the weights final/ holds (the EMA's when the run exports it), with the model's config."""
    tr = _train(tmp_path, photos, "train.max_steps=2", "train.ema_decay=0.5", f"train.export_ema={export_ema}")
    (path,) = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1:]
    vae = klvae.AutoencoderKL.from_pretrained(path)
    final = klvae.AutoencoderKL.from_pretrained(tmp_path / "run" / "final")
    assert vae.config == tr.vae.config == final.config
    for (k, a), b in zip(vae.state_dict().items(), final.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    raw = tr.vae.state_dict()
    assert any(not torch.equal(a, raw[k]) for k, a in vae.state_dict().items()) == export_ema  # EMA != raw
    # An older checkpoint, without the model's config: its shapes tell the network.
    state = torch.load(path, weights_only=True)
    del state["model_config"]
    torch.save(state, tmp_path / "old.pt")
    old = klvae.AutoencoderKL.from_pretrained(tmp_path / "old.pt")
    assert old.config.block_out_channels == tr.vae.config.block_out_channels
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), vae.state_dict().values(), strict=True))
    assert main(["-q", "info", "--model", str(path)]) == 0
