"""What a resume compares: the config a checkpoint was written with, and where in the data it stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

from klvae.checks import is_integer
from klvae.errors import KlvaeError, quote
from klvae.training.config import TrainConfig, build_loss_config

# Fields a resume is expected to change: the run's length and cadence, where it writes, the machine it runs on,
# and what only validation, speed or memory depend on. The training trajectory depends on none of them.
RESUME_FREE = frozenset({
    "train.max_steps", "train.log_every", "train.val_every", "train.ckpt_every", "train.out_dir", "train.device",
    "train.max_nonfinite", "train.export_ema", "train.val_lpips", "data.num_workers", "data.cache_images",
    "data.val", "data.val_images", "model.gradient_checkpointing", "loss.lpips_vgg_path", "loss.lpips_lin_path",
})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"section.field": value} of a config dict, model.overrides and loss kept as one value per key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix and k != "loss":
            out.update(_flat(v, f"{k}."))
        elif isinstance(v, dict) and k == "loss":
            out.update({f"loss.{lk}": lv for lk, lv in v.items()})
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _with_resolved_loss(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with its loss spelled out field by field, so a preset and its values written out compare equal."""
    with contextlib.suppress(KlvaeError, TypeError, ValueError, AttributeError):
        loss: Any = d.get("loss")  # anything: what is not a mapping of loss fields is left as it is
        d = {**d, "loss": {"preset": loss.get("preset", "ldm"), **dataclasses.asdict(build_loss_config(loss))}}
    return d


def config_changes(saved: object, cfg: TrainConfig) -> list[str]:
    """"field old → new" for each field (outside RESUME_FREE) in which a checkpoint's stored config (its JSON
    text) differs from `cfg`; none when it stored no readable config (older checkpoints)."""
    try:
        old = json.loads(saved) if isinstance(saved, str) else None
    except ValueError:
        return []
    if not isinstance(old, dict):
        return []
    before, now = _flat(_with_resolved_loss(old)), _flat(_with_resolved_loss(cfg.to_dict()))
    # A cosine schedule decays to zero at max_steps: another length re-stretches the lr from the resumed step on.
    free = RESUME_FREE - {"train.max_steps"} if now.get("optim.schedule") == "cosine" else RESUME_FREE
    # Only fields both configs have: one added to klvae since the checkpoint was written is not a change.
    keys = [k for k in now if k in before and k not in free and before[k] != now[k]]
    return [f"{k} {quote(before[k], 100)} → {quote(now[k], 100)}" for k in keys]


def saved_data_field(state: dict[str, Any], name: str) -> Any:
    """data.`name` of the config a checkpoint was written with; None where it cannot be read."""
    try:
        return json.loads(state.get("config") or "{}").get("data", {}).get(name)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None


def saved_global_batch(state: dict[str, Any]) -> int | None:
    """Images per global batch (processes x data.batch_size) of the run that wrote a checkpoint, where it says."""
    batch, world = saved_data_field(state, "batch_size"), state.get("world")
    if not (is_integer(batch) and is_integer(world) and batch > 0 and world > 0):
        return None
    return int(batch) * int(world)


def resumed_batch(done: int, saved_global: int, global_batch: int, saved_items: int, items: int) -> int:
    """The first global batch of `global_batch` images at or after where `done` global batches of `saved_global`
    images of `saved_items` items left off: the same epoch, the same place in its order (data.train of `items`)."""
    epoch, k = divmod(done, max(1, saved_items // saved_global))
    per_epoch = max(1, items // global_batch)
    # The first image the saved run had not read is k * saved_global: start at the batch that begins there or,
    # where no batch does, at the next one (skipping fewer than one batch of images, never repeating one).
    return epoch * per_epoch + min(per_epoch, -(-k * saved_global // global_batch))
