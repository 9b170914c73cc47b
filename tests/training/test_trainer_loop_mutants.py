"""Pins what a mutation audit of the training loop (training/trainer.py and training/loop.py) found untested: the
critic frozen in the generator pass and the step skipped on a non-finite critic loss; the critic's gradients
averaged over ranks; under DDP only the last micro-batch syncing gradients; the learned logvar inside the clipped
global norm; the generator's GAN term starting at loss.disc_start together with the critic's, row by row of
metrics.jsonl; the decoder's last layer for the adaptive weight; bf16 autocast; validation measuring the weights
export writes, with the LPIPS files; steps_per_s counting only this session's steps; the end-of-run warning about
unreadable images; the fields a resume may change without a warning, and those it warns about (model.overrides as
one value); rank 1 neither warning nor writing a checkpoint; an fp32 checkpoint resumed in fp16 and one without an
EMA resumed with one; a critic the checkpoint lacks refused in one line; an explicitly named torn checkpoint not
blamed on a neighbour; and RunLog's disabled writer and the rows (and line ends) a resume keeps."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from helpers import CRITIC, noise_folder, noise_images_and_a_broken_one, one_line, tiny_batch, tiny_train_config
from klvae.distributed import DistInfo
from klvae.errors import KlvaeError
from klvae.training import loop as loop_module
from klvae.training import trainer as trainer_module
from klvae.training.config import TrainConfig, load_config
from klvae.training.loop import RunLog, fit
from klvae.training.trainer import Trainer, config_changes


def _cfg(tmp: Path, *sets: str) -> TrainConfig:
    return tiny_train_config(tmp, "train.log_every=1", "train.val_every=1000", "train.ckpt_every=1000", *sets)


def _rows(run: Path, split: str = "train") -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _fake_step(self: Trainer, micro: list[torch.Tensor]) -> dict[str, float]:
    self.step += 1  # the loop's bookkeeping only: no model step
    return {"total": 1.0}


# ---- one optimiser step ----------------------------------------------------------------------------------------
def test_the_generator_pass_leaves_the_critic_without_gradients(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # With the critic's own loss zeroed, whatever gradient the critic holds after the step came from the
    # generator's loss (its GAN term runs the critic on the reconstructions): there must be none.
    tr = Trainer(_cfg(tmp_path, *CRITIC, "loss.disc_start=0"))
    real = tr.loss.discriminator_loss

    def no_critic_loss(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d_loss, logs = real(*args, **kwargs)
        return d_loss * 0, logs

    monkeypatch.setattr(tr.loss, "discriminator_loss", no_critic_loss)
    logs = tr.train_step([tiny_batch()])
    assert logs["g_loss"] != 0 and logs["d_weight"] > 0  # the GAN term was in the generator's loss
    grads = [p.grad for p in tr.disc_params]
    assert all(g is not None for g in grads)  # the critic's step ran
    assert all(torch.count_nonzero(g) == 0 for g in grads if g is not None)
    assert all(p.requires_grad for p in tr.disc_params)  # and the critic is left trainable


def test_a_non_finite_critic_loss_skips_the_whole_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Trainer(_cfg(tmp_path, *CRITIC, "loss.disc_start=0", "train.max_nonfinite=5"))
    real = tr.loss.discriminator_loss

    def nan_critic_loss(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d_loss, logs = real(*args, **kwargs)
        return d_loss * float("nan"), logs

    monkeypatch.setattr(tr.loss, "discriminator_loss", nan_critic_loss)
    before = [p.detach().clone() for p in [*tr.vae.parameters(), *tr.disc_params]]
    logs = tr.train_step([tiny_batch()])
    assert logs["skipped"] == 1.0 and tr.nonfinite_run == 1 and tr.step == 1
    after = [*tr.vae.parameters(), *tr.disc_params]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # no NaN reached any weight


def test_the_critics_gradients_are_averaged_over_ranks_once_it_trains(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The loss module is not under DDP: its critic's gradients are averaged by hand, as logvar's are.
    averaged: list[list[torch.nn.Parameter]] = []
    monkeypatch.setattr(trainer_module, "average_gradients", lambda params, dist: averaged.append(list(params)))
    tr = Trainer(_cfg(tmp_path, *CRITIC, "loss.disc_start=1"))
    tr.train_step([tiny_batch()])
    assert all(p not in tr.disc_params for params in averaged for p in params)  # the critic is off at step 0
    averaged.clear()
    tr.train_step([tiny_batch(1)])
    critic = [params for params in averaged if params and params[0] is tr.disc_params[0]]
    assert len(critic) == 1 and len(critic[0]) == len(tr.disc_params)


def test_the_adaptive_weight_is_taken_at_the_decoders_last_layer(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tr = Trainer(_cfg(tmp_path, *CRITIC, "loss.disc_start=0"))
    seen: list[torch.Tensor | None] = []
    real = tr.loss.generator_loss

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("last_layer"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tr.loss, "generator_loss", recording)
    tr.train_step([tiny_batch()])
    assert len(seen) == 1 and seen[0] is tr.vae.decoder.conv_out.weight


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_forward_runs_in_the_precision_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     precision: str, dtype: torch.dtype) -> None:
    tr = Trainer(_cfg(tmp_path, f"train.precision={precision}"))
    seen: list[torch.dtype] = []
    real = tr.loss.generator_loss

    def recording(inputs: torch.Tensor, rec: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(rec.dtype)
        return real(inputs, rec, *args, **kwargs)

    monkeypatch.setattr(tr.loss, "generator_loss", recording)
    tr.train_step([tiny_batch()])
    assert seen == [dtype]
    assert not tr.scaler.is_enabled() and not tr.d_scaler.is_enabled()  # only fp16 scales its losses


class _FakeDDP(torch.nn.Module):
    """Stands in for DistributedDataParallel: runs the module, noting for each call whether it ran under no_sync."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.unsynced: list[bool] = []
        self._inside = False

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    def forward(self, *args: Any) -> Any:
        self.unsynced.append(self._inside)
        return self.module(*args)


def test_under_ddp_only_the_last_micro_batch_syncs_gradients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "DistributedDataParallel", _FakeDDP)
    tr = Trainer(_cfg(tmp_path, "optim.grad_accum=3"))
    net = _FakeDDP(tr.net)
    monkeypatch.setattr(tr, "net", net)
    tr.train_step([tiny_batch(0), tiny_batch(1), tiny_batch(2)])
    assert net.unsynced == [True, True, False]  # the all-reduce runs once, in the last micro-batch's backward


def test_clipping_counts_the_learned_logvar_in_the_global_norm(tmp_path: Path) -> None:
    tr = Trainer(_cfg(tmp_path, "loss.preset=mse", "loss.learn_logvar=true", "optim.grad_clip=1e-4"))
    assert tr.loss_ae_params
    tr.train_step([tiny_batch()])
    params = [*tr.vae.parameters(), *tr.loss_ae_params]
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None))
    assert norm == pytest.approx(1e-4, rel=1e-3)
    grad = tr.loss_ae_params[0].grad
    assert grad is not None and float(grad.abs()) > 0  # logvar took part


# ---- the loop ----------------------------------------------------------------------------------------------------
def test_the_gan_terms_start_at_disc_start_on_both_sides_row_by_row(tmp_path: Path) -> None:
    # Row k of metrics.jsonl is the k-th step, whose step counter was k - 1: disc_start=2 first shows in row 3.
    noise_folder(tmp_path / "images", 4, hw=(16, 16))
    fit(Trainer(_cfg(tmp_path, *CRITIC, "loss.disc_start=2", "train.max_steps=3")))
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["disc_factor"] for r in rows] == [0.0, 0.0, 1.0]  # the generator's GAN term ...
    assert ["d_loss" in r for r in rows] == [False, False, True]  # ... and the critic's own step
    assert rows[2]["g_loss"] != 0 and rows[1]["g_loss"] == 0


@pytest.mark.parametrize("export_ema", [True, False])
def test_validation_measures_the_weights_export_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       export_ema: bool) -> None:
    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    seen: list[tuple[object, object]] = []

    def recording(vae: object, batches: object, device: object, grid: object, lpips: object) -> dict[str, float]:
        seen.append((vae, lpips))
        return {"psnr": 1.0}

    monkeypatch.setattr(loop_module, "validate", recording)
    monkeypatch.setattr(Trainer, "train_step", _fake_step)
    tr = Trainer(_cfg(tmp_path, "train.max_steps=1", "train.ema_decay=0.9", f"train.export_ema={export_ema}",
                      f"data.val={tmp_path / 'images'}", "loss.lpips_vgg_path=/v.pth", "loss.lpips_lin_path=/l.pth"))
    fit(tr)
    assert tr.ema is not None
    want = tr.ema.module if export_ema else tr.vae
    assert len(seen) == 1 and seen[0][0] is want
    assert seen[0][1] == ("/v.pth", "/l.pth")


def test_steps_per_second_counts_only_the_steps_of_this_session(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))  # each reading 10 s after the one before
    monkeypatch.setattr(loop_module, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(Trainer, "train_step", _fake_step)
    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    tr = Trainer(_cfg(tmp_path, "train.max_steps=4"))
    tr.step = 2  # as resumed at step 2
    fit(tr)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["steps_per_s"] for r in rows] == [pytest.approx(0.1), pytest.approx(0.1)]  # not 3/10, 4/20


@pytest.mark.parametrize("broken", [True, False])
def test_a_run_that_met_unreadable_images_says_so_at_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture, broken: bool) -> None:
    monkeypatch.setattr(Trainer, "train_step", _fake_step)
    if broken:
        noise_images_and_a_broken_one(tmp_path / "images")  # 5 items, 1 unreadable: 5 steps of 1 read it
    else:
        noise_folder(tmp_path / "images", 4, hw=(16, 16))
    tr = Trainer(_cfg(tmp_path, "train.max_steps=5", "data.batch_size=1", "train.log_every=5"))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        fit(tr)
    said = [r.getMessage() for r in caplog.records if "unreadable training images were skipped" in r.getMessage()]
    (row,) = _rows(tmp_path / "run")
    assert (row["bad_images"] > 0) == broken  # the count the warning gives is the one the last row logged
    assert said == ([f"unreadable training images were skipped {row['bad_images']:.0f} time(s) in this run, its "
                     "resumed parts and all processes together (once per read, so once per epoch each)"]
                    if broken else [])


# ---- resuming ----------------------------------------------------------------------------------------------------
_FREE = {
    "train.max_steps": "7", "train.log_every": "3", "train.val_every": "3", "train.ckpt_every": "3",
    "train.out_dir": "/elsewhere", "train.device": "cuda", "train.max_nonfinite": "9", "train.export_ema": "false",
    "train.val_lpips": "false", "data.num_workers": "3", "data.cache_images": "true", "data.val": "/val",
    "data.val_images": "3", "model.gradient_checkpointing": "true", "loss.lpips_vgg_path": "/v.pth",
    "loss.lpips_lin_path": "/l.pth",
}


def _base() -> list[str]:
    return ["model.preset=tiny", "data.train=x", "data.resolution=32", "loss.preset=ldm"]


@pytest.mark.parametrize("field", sorted(_FREE))
def test_a_resume_may_change_what_the_trajectory_does_not_depend_on(field: str) -> None:
    saved = json.dumps(load_config(None, _base()).to_dict())
    assert config_changes(saved, load_config(None, [*_base(), f"{field}={_FREE[field]}"])) == []


@pytest.mark.parametrize("change", [
    "train.seed=1", "optim.grad_accum=2", "train.precision=bf16", "train.sample_posterior=false",
    "train.ema_decay=0.5", "model.decoder_only=true", "loss.disc_start=5", "optim.betas=[0.9, 0.99]",
    "data.crop=center", "optim.warmup_steps=3", "optim.schedule=cosine",
])
def test_a_resume_warns_about_what_the_trajectory_depends_on(change: str) -> None:
    saved = json.dumps(load_config(None, _base()).to_dict())
    field = change.split("=")[0]
    changes = config_changes(saved, load_config(None, [*_base(), change]))
    assert len(changes) == 1 and changes[0].startswith(f"{field} "), changes


def test_model_overrides_compare_as_one_value() -> None:
    # A key added to model.overrides is a change (it alters the model), not a field the checkpoint lacks.
    saved = json.dumps(load_config(None, _base()).to_dict())
    changes = config_changes(saved, load_config(None, [*_base(), "model.overrides={scaling_factor: 0.5}"]))
    assert changes == ["model.overrides {} → {'scaling_factor': 0.5}"]


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A step-0 checkpoint of an fp32 run without EMA (nothing trained: building the Trainer is enough)."""
    tmp = tmp_path_factory.mktemp("fp32")
    path = Trainer(_cfg(tmp)).save()
    assert path is not None
    return path


def test_an_fp32_checkpoint_resumes_in_fp16_with_fresh_loss_scales_and_a_new_ema(
        tmp_path: Path, fp32_checkpoint: Path) -> None:
    tr = Trainer(_cfg(tmp_path, "train.precision=fp16", "train.ema_decay=0.9"))
    assert tr.resume(fp32_checkpoint) and tr.step == 0
    assert tr.scaler.is_enabled() and tr.scaler.get_scale() == 2.0**16 == tr.d_scaler.get_scale()
    assert tr.ema is not None and int(tr.ema.n_averaged) == 0


def test_a_critic_the_checkpoint_lacks_is_refused_in_one_line_naming_the_loss(tmp_path: Path,
                                                                             fp32_checkpoint: Path) -> None:
    tr = Trainer(_cfg(tmp_path, *CRITIC))
    with pytest.raises(KlvaeError) as e:
        tr.resume(fp32_checkpoint)
    assert one_line(e).startswith(f"cannot resume from {fp32_checkpoint}: the weights do not fit this config's loss "
                                  "(loss.* settings): ")
    assert "missing keys: discriminator." in str(e.value)


def test_only_rank_0_warns_about_a_changed_config(tmp_path: Path, fp32_checkpoint: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    noise_folder(tmp_path / "images", 1, hw=(16, 16))
    for rank, warned in ((1, False), (0, True)):
        tr = Trainer(_cfg(tmp_path, "optim.lr=2e-3"))
        tr.dist = DistInfo(rank=rank, world=2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="klvae"):
            assert tr.resume(fp32_checkpoint)
        said = [r.getMessage() for r in caplog.records if "differs from the checkpoint" in r.getMessage()]
        assert len(said) == int(warned), (rank, said)


def test_rank_1_writes_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "all_sum", lambda t, dist: t)
    monkeypatch.setattr(trainer_module, "barrier", lambda dist: None)
    tr = Trainer(_cfg(tmp_path))
    tr.dist = DistInfo(rank=1, world=2)
    assert tr.save() is None
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_torn_checkpoint_named_outright_is_not_blamed_on_its_neighbour(tmp_path: Path,
                                                                         fp32_checkpoint: Path) -> None:
    # Only the newest of a folder picked by resume() has "the one before" to fall back to.
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_00000001.pt").write_bytes(fp32_checkpoint.read_bytes())
    (folder / "step_00000002.pt").write_bytes(b"garbage\n")
    tr = Trainer(_cfg(tmp_path))
    with pytest.raises(KlvaeError) as e:
        tr.resume(folder / "step_00000002.pt")
    assert "is not a klvae checkpoint" in str(e.value) and "move it away" not in str(e.value)
    with pytest.raises(KlvaeError, match=r"; move it away to resume from step_00000001\.pt$"):
        tr.resume()


# ---- RunLog ------------------------------------------------------------------------------------------------------
def test_a_disabled_run_log_writes_nothing(tmp_path: Path) -> None:
    log = RunLog(tmp_path / "run", enabled=False, resumed_at=3)
    log.write(4, {"total": 1.0}, "train")
    log.close()
    assert not (tmp_path / "run").exists()


def test_a_resume_drops_later_rows_torn_lines_and_non_rows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "split": "train"}, {"step": 2, "split": "val"}, {"step": True, "split": "train"},
            {"step": 3, "split": "train"}, [2]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "spl')
    log = RunLog(run, enabled=True, resumed_at=2)
    log.write(3, {"total": 0.5}, "train")
    log.close()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "split": "train"}, {"step": 2, "split": "val"}, {"step": 3, "split": "train", "total": 0.5}]
    # A kept last row without its newline gets one, so that the next row starts a line of its own.
    (run / "metrics.jsonl").write_text('not a row\n{"step": 1, "split": "train"}')
    log = RunLog(run, enabled=True, resumed_at=2)
    log.write(2, {"total": 0.5}, "train")
    log.close()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
