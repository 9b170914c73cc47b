"""`klvae train CONFIG`: the trainer from a YAML/TOML file, with command-line overrides."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from klvae.atomic import check_not_in_data
from klvae.cli.common import check_named, check_output_path
from klvae.errors import KlvaeError, quote

if TYPE_CHECKING:
    from klvae.training.config import TrainConfig
    from klvae.training.trainer import Trainer

log = logging.getLogger("klvae")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the train subcommand."""
    p = sub.add_parser("train", help="train or fine-tune an autoencoder from a YAML/TOML config (torchrun for DDP)")
    p.add_argument("config", nargs="?", default=None, help="config file (.yaml, .yml or .toml); see docs/training.md")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint of train.out_dir, or from the given file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=cmd_train)


# What a run writes into train.out_dir that a second run would mix with its own.
_RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "samples", "tensorboard")


def check_fresh_run(out: Path) -> None:
    """Refuse to start a new run in a folder that holds another: its checkpoints would outrank the new run's
    (pruned as the oldest, while --resume would pick the old run's), final/ would be replaced, metrics mixed."""
    held = [name for name in _RUN_FILES if (out / name).exists()]
    if held:
        raise KlvaeError(f"train.out_dir {out} already holds a run ({', '.join(held)}): add --resume to continue "
                         "it, or choose another train.out_dir (or remove that one) to start over")


_CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")


def check_resume_arg(resume: str | None) -> None:
    """Refuse an empty --resume, and a config file given to it: `klvae train --resume ft.yaml` parses ft.yaml as the
    checkpoint (--resume takes an optional value), leaving no config."""
    if resume == "":
        raise KlvaeError("--resume '' names no checkpoint: give a checkpoint file, or --resume alone for the newest "
                         "of train.out_dir")
    if resume is not None and Path(resume).suffix.lower() in _CONFIG_SUFFIXES:
        raise KlvaeError(f"--resume {quote(resume, 200)} is a config file, not a checkpoint: put the config first, "
                         f"as in klvae train CONFIG --resume [CHECKPOINT]")


def check_inputs(cfg: TrainConfig, resume: str | None) -> None:
    """Refuse a device, a --resume file or data that cannot serve, before the model and LPIPS are built (or
    downloaded): the Trainer and fit() check them again, later, for the library's users."""
    from klvae.inference.precision import usable_device
    from klvae.training.checkpoint import load_training_state
    from klvae.training.data_setup import check_train_data

    usable_device(cfg.train.device, "train.device")
    check_named(cfg.train.out_dir, "train.out_dir")
    for name in ("checkpoints", "final", "samples", "tensorboard"):  # else "File exists" at the first save
        if (held := Path(cfg.train.out_dir) / name).exists() and not held.is_dir():
            raise KlvaeError(f"train.out_dir {cfg.train.out_dir}: {name} is a file where the run keeps a folder; "
                             "move it away")
    # A resumed run would scan its own sample grids (out_dir/samples) as training or validation images.
    for field in ("train", "val"):
        if data := getattr(cfg.data, field):  # "" when unset
            check_not_in_data(cfg.train.out_dir, "train.out_dir", str(data), f"data.{field}")
    if resume not in (None, "latest"):
        # An explicit file may be anything at all. Mapped, not read: Trainer.resume reads it (GBs for a large
        # model with its EMA and optimiser state), and a check that read it too would double that wait.
        load_training_state(resume, mmap=True)
    # Under torchrun the process group is not up yet, but its size and this process's rank are in the environment.
    # Only rank 0 validates, so only it needs data.val (on another machine it may not be there).
    check_train_data(cfg, int(os.environ.get("WORLD_SIZE", "1")), val=int(os.environ.get("RANK", "0")) == 0)


def cmd_train(args: argparse.Namespace) -> int:
    """Train, resuming when asked, and export the weights at the end."""
    import yaml

    from klvae.training.config import load_config

    check_resume_arg(args.resume)
    if args.config is None and not any(o.strip().startswith("data.train=") for o in args.overrides):
        raise KlvaeError("no config given: `klvae train CONFIG.yaml` (recipes/demo/train.yaml is one to copy), or "
                         "the fields on their own, at least --set data.train=IMAGES")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.resolved_dict(), sort_keys=False))
        return 0
    check_output_path(cfg.train.out_dir, "train.out_dir", folder=True)  # before minutes of model building
    if args.resume is None:
        check_fresh_run(Path(cfg.train.out_dir))
    check_inputs(cfg, args.resume)
    from klvae.distributed import shutdown
    from klvae.training.checkpoint import latest_checkpoint, run_lock, saved_model_config
    from klvae.training.loop import fit
    from klvae.training.trainer import Trainer

    resume = (None if args.resume is None else latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
              if args.resume == "latest" else Path(args.resume))
    trainer = Trainer(cfg, saved_model_config(resume))
    try:
        with run_lock(trainer.out, trainer.dist, trainer.device):
            if args.resume is None:
                check_fresh_run(trainer.out)  # again, locked: another run may have begun since the first look
            else:
                _resume(trainer, args.resume, resume)
            logs = fit(trainer)
    finally:
        shutdown(trainer.dist)
    if trainer.dist.is_main:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(logs.items())) or "no step left to train"
        print(f"trained to step {trainer.step}: {shown}; weights in {cfg.train.out_dir}/final")
    return 0


def _resume(trainer: Trainer, asked: str, resume: Path | None) -> None:
    """Resume `trainer` as --resume asked (`resume`: the file it names, or the newest checkpoint)."""
    found = trainer.resume(None if asked == "latest" else resume)  # None: the torn-newest hint
    cfg = trainer.cfg
    if not found:  # as accelerate does: a new run, said loudly, since a mistyped out_dir lands here
        log.warning("--resume: no checkpoint in %s/checkpoints, so training starts from step 0", cfg.train.out_dir)
    elif trainer.step > cfg.train.max_steps:  # else "trained to step N" for a max_steps below N, silently
        log.warning("resumed at step %d, past train.max_steps %d: no step to train (a longer run needs a larger "
                    "train.max_steps)", trainer.step, cfg.train.max_steps)
