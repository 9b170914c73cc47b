"""Pins bugs a hunt of `klvae train` runs as a user does them (interrupt, resume, fine-tune, export) found:

- a resume with changed `optim.betas` or `optim.weight_decay` warns that the config differs (a different run from
  here on), then trains on with the checkpoint's betas and weight decay: AdamW's load_state_dict puts the saved
  hyper-parameters back, and only the learning rate is set again each step;
- `klvae train --resume` over a torn newest checkpoint stops without the hint the trainer has for it ("move it
  away to resume from step_...pt"): the command names the newest file itself, and the trainer gives the hint only
  when it looked for the newest;
- (doubtful) a finished run resumed with `train.export_ema` switched off says "weights in .../final" and leaves the
  EMA's export there: there is no other command that exports the trained weights of an EMA run.

It also pins what was checked and found right: an interrupted `klvae train` resumed ends bit for bit as the
uninterrupted run (critic, EMA, accumulation, warm-up and cosine, validation rows), a decoder-only fine-tune of a
diffusers folder starts from its weights and keeps its encoder, its final/ gives diffusers' outputs, gradient
accumulation equals the bigger batch, and the EMA follows diffusers' EMAModel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import klvae
from helpers import CRITIC, noise_folder, one_error_line, tiny_train_cli, tiny_train_config
from klvae.cli.main import main
from klvae.training.checkpoint import load_checkpoint
from klvae.training.loop import fit
from klvae.training.trainer import Trainer


def _images(tmp: Path, n: int = 4) -> Path:
    return noise_folder(tmp / "images", n, hw=(16, 16))


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl without its timing column."""
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 1. optimiser hyper-parameters changed at a resume -------------------------------------------------------------
def test_a_resume_with_new_betas_and_weight_decay_trains_with_them(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A resume warns that optim.betas / weight_decay changed, then trains on with the checkpoint's values."""
    _images(tmp_path)
    critic = [*CRITIC, "loss.disc_start=0"]
    fit(Trainer(tiny_train_config(tmp_path, "train.max_steps=1", "train.val_lpips=false", *critic)))
    new = ("optim.betas=[0.9, 0.99]", "optim.weight_decay=0.1")
    tr = Trainer(tiny_train_config(tmp_path, "train.max_steps=2", "train.val_lpips=false", *critic, *new))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert tr.resume()
    assert "optim.betas [0.5, 0.9] → [0.9, 0.99]" in caplog.text  # said to change the run from here on ...
    fit(tr)
    for name, opt in (("opt_ae", tr.opt_ae), ("opt_d", tr.opt_d)):
        assert opt is not None
        group = opt.param_groups[0]
        # ... so step 2 must be taken with them, not with the checkpoint's (0.5, 0.9) and 0.0.
        assert (tuple(group["betas"]), group["weight_decay"]) == ((0.9, 0.99), 0.1), name


# ---- 2. a torn newest checkpoint, through the command ------------------------------------------------------------
def test_the_train_command_names_the_checkpoint_before_a_torn_newest_one(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`klvae train --resume` over a torn newest checkpoint does not say which earlier one it can resume from."""
    _images(tmp_path)
    assert main(tiny_train_cli(tmp_path, "train.max_steps=1")) == 0
    (tmp_path / "run" / "checkpoints" / "step_00000009.pt").write_bytes(b"garbage\n")  # copied in half, say
    capsys.readouterr()
    assert main([*tiny_train_cli(tmp_path, "train.max_steps=2"), "--resume"]) == 2
    # Trainer.resume() says it ("...; move it away to resume from step_00000001.pt"): the command should too.
    assert "step_00000001.pt" in one_error_line(capsys.readouterr().err)


# ---- 3. (doubtful) export_ema switched off on a finished run ---------------------------------------------------------
def test_a_finished_run_resumed_with_export_ema_off_exports_the_trained_weights(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A finished EMA run resumed with train.export_ema=false still leaves the EMA in final/, without a word."""
    _images(tmp_path)
    sets = ("train.max_steps=2", "train.ema_decay=0.9", "optim.lr=1e-2")
    assert main(tiny_train_cli(tmp_path, *sets)) == 0
    assert main([*tiny_train_cli(tmp_path, *sets, "train.export_ema=false"), "--resume"]) == 0
    assert "weights in" in capsys.readouterr().out
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.pt")["vae"]
    final = klvae.AutoencoderKL.from_pretrained(tmp_path / "run" / "final").state_dict()
    other = [k for k in trained if not torch.equal(final[k], trained[k])]
    assert not other, f"final/ still holds the EMA's weights: {other[:3]}"


# ---- pinned: what was checked and found right --------------------------------------------------------------------
def test_an_interrupted_train_command_resumed_ends_as_the_uninterrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An interrupted and resumed `klvae train` ends with other weights, state or log rows than one never stopped."""
    _images(tmp_path, 5)
    noise_folder(tmp_path / "val", 2, hw=(16, 16))
    common = [*CRITIC, "loss.disc_start=1", "loss.kl_weight=1e-3", "loss.learn_logvar=true", "train.ema_decay=0.9",
              "optim.schedule=cosine", "optim.warmup_steps=1", "train.ckpt_every=2", "train.val_every=3",
              "train.log_every=1", "train.max_steps=4", "data.batch_size=1", f"data.val={tmp_path / 'val'}"]

    def args(run: str) -> list[str]:
        return tiny_train_cli(tmp_path, f"train.out_dir={tmp_path / run}", *common)

    assert main(args("whole")) == 0
    real = Trainer.train_step

    def ctrl_c_before_step_4(self: Trainer, micro: list[torch.Tensor]) -> dict[str, float]:
        if self.step == 3:
            raise KeyboardInterrupt  # after step 2's checkpoint, with step 3 logged and validated
        return real(self, micro)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_before_step_4)
    assert main(args("split")) == 130
    monkeypatch.undo()
    assert main([*args("split"), "--resume"]) == 0
    capsys.readouterr()
    assert _rows(tmp_path / "split") == _rows(tmp_path / "whole")
    whole, split = (load_checkpoint(tmp_path / r / "checkpoints" / "step_00000004.pt") for r in ("whole", "split"))
    for part in ("vae", "loss", "ema", "opt_ae", "opt_d", "scaler", "d_scaler", "batches_done"):
        torch.testing.assert_close(split[part], whole[part], rtol=0, atol=0, msg=lambda m, p=part: f"{p}: {m}")
    finals = [klvae.AutoencoderKL.from_pretrained(tmp_path / r / "final").state_dict() for r in ("whole", "split")]
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=0)
    ema = {k.removeprefix("module."): v for k, v in whole["ema"].items() if k.startswith("module.")}
    torch.testing.assert_close(finals[0], ema, rtol=0, atol=0)  # export_ema: final/ is the EMA


def test_a_decoder_only_fine_tune_of_a_diffusers_folder_exports_what_diffusers_reads_alike(tmp_path: Path) -> None:
    """A fine-tune of a diffusers folder starts elsewhere, trains its encoder, or exports what diffusers reads
    otherwise."""
    import diffusers

    _images(tmp_path)
    torch.manual_seed(0)
    start = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=16,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=0.3611,
        shift_factor=0.1159)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    start.save_pretrained(tmp_path / "start")
    before = start.state_dict()
    tr = Trainer(tiny_train_config(tmp_path, "train.max_steps=2", "train.val_lpips=false", "train.ema_decay=0.5",
                                   f"model.pretrained={tmp_path / 'start'}", "model.decoder_only=true"))
    torch.testing.assert_close(tr.vae.state_dict(), before, rtol=0, atol=0)
    fit(tr)
    final = tmp_path / "run" / "final"
    ours = klvae.AutoencoderKL.from_pretrained(final).eval()
    theirs = diffusers.AutoencoderKL.from_pretrained(final).eval()
    assert (theirs.config.scaling_factor, theirs.config.shift_factor) == (0.3611, 0.1159)
    exported = ours.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert not any(torch.equal(exported[k], v) for k, v in before.items() if k.startswith("decoder.conv"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x, sample_posterior=False)[0], theirs(x, sample_posterior=False).sample,
                                   rtol=0, atol=1e-6)


def test_gradient_accumulation_gives_the_gradient_of_the_bigger_batch(tmp_path: Path) -> None:
    """optim.grad_accum 2 of batch 1 steps with another gradient than one batch of 2 images."""
    _images(tmp_path)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, sets in (("big", ["data.batch_size=2"]), ("accum", ["data.batch_size=1", "optim.grad_accum=2"])):
        tr = Trainer(tiny_train_config(tmp_path, "train.max_steps=1", "train.val_lpips=false",
                                       f"train.out_dir={tmp_path / name}", *sets))
        real = tr._apply_gradients

        def capture(disc_on: bool, _tr: Trainer = tr, _name: str = name, _real=real) -> bool:
            grads[_name] = {n: p.grad.clone() for n, p in _tr.vae.named_parameters()}
            return _real(disc_on)

        tr._apply_gradients = capture  # type: ignore[method-assign]
        fit(tr)
    for k, g in grads["big"].items():
        if "to_k.bias" not in k:  # softmax ignores a key bias: its gradient is rounding noise around 0
            torch.testing.assert_close(grads["accum"][k], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=k)


def test_the_ema_follows_diffusers_ema_model() -> None:
    """The EMA's warm-up departs from diffusers' EMAModel, which the docs say it follows."""
    from diffusers.training_utils import EMAModel

    from klvae.training.ema import make_ema

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ours, theirs = make_ema(net, 0.95, True), EMAModel(net.parameters(), decay=0.95)
    for _ in range(25):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ours.update_parameters(net)
        theirs.step(net.parameters())
        torch.testing.assert_close(ours.module.weight, theirs.shadow_params[0], rtol=1e-6, atol=1e-6)
