"""The dtypes a weights file stores the VAE's tensors in, counted as loading picks them (the VAE's tensors only,
under `first_stage_model.` in a full SD checkpoint, without an LDM checkpoint's loss.* and model_ema.*): shared by
the trainer's note on half-precision `model.pretrained` weights and by `klvae info`."""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from klvae.weights.convert import TRAINING_PREFIXES, vae_names
from klvae.weights.read import is_shard_index, read_state_dict, shard_files, sniff_format

# safetensors' dtype codes, and torch's, as --dtype and `convert --dtype` spell them.
_SHORT = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16",
          torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOAT_CODES = ("F", "BF")  # F8_E4M3, F16, BF16 ...: I64 (a BatchNorm's counter) is no weight's dtype


def stored_values(path: Path) -> Counter[str]:
    """Values per stored dtype ('fp16', 'fp32', ...) over the VAE's floating-point tensors of a weights file (of
    every shard, given a shard index)."""
    if is_shard_index(path):
        return sum((stored_values(f) for f in shard_files(path)), Counter())
    if sniff_format(path) == "safetensors":  # by content, as loading reads it: a misnamed file is common
        return _safetensors_values(path)
    return _pickle_values(path)


def main_dtype(path: Path) -> str | None:
    """The dtype most of the VAE's values are stored in; None when the file cannot be read or holds none."""
    try:
        counts = stored_values(path)
    except Exception:  # read just before by the loader: a file that changed since is its concern, not a note's
        return None
    return counts.most_common(1)[0][0] if counts else None


def vae_keys(keys: list[str]) -> list[str]:
    """The keys loading takes as the VAE's: through wrappers (module., _orig_mod.) and a full checkpoint's prefix
    (its UNet and text encoder are not the VAE), without an LDM checkpoint's loss.* and model_ema.*."""
    return [k for k, n in vae_names(keys)[0].items() if not n.startswith(TRAINING_PREFIXES)]


def _safetensors_values(path: Path) -> Counter[str]:
    """From the header alone: no tensor is read."""
    from safetensors import safe_open

    counts: Counter[str] = Counter()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for k in vae_keys(list(f.keys())):
            part = f.get_slice(k)
            code = part.get_dtype()
            if code.startswith(_FLOAT_CODES):
                counts[_SHORT.get(code, code.lower())] += math.prod(part.get_shape())
    return counts


def _pickle_values(path: Path) -> Counter[str]:
    """A pickle has no header to read: its VAE tensors are read again (mapped, as loading maps them)."""
    counts: Counter[str] = Counter()
    with _quiet_reader():
        tensors = read_state_dict(path)
    for k in vae_keys(list(tensors)):
        if (t := tensors[k]).is_floating_point():
            counts[_SHORT.get(t.dtype, str(t.dtype).removeprefix("torch."))] += t.numel()
    return counts


@contextlib.contextmanager
def _quiet_reader() -> Iterator[None]:
    """The reader's INFO notes (e.g. 'x.pt is a klvae training checkpoint: loading the EMA weights') left out: the
    load just before gave them, and a second copy would read as a second load."""
    logger = logging.getLogger(read_state_dict.__module__)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
