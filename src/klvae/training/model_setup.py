"""The autoencoder a run trains: a preset from scratch, or pretrained weights with model.overrides on top.

Whatever the dtype the pretrained weights are stored in, the model is built in float32: those are the master
weights the optimiser updates (train.precision only sets autocast), and what checkpoints and final/ hold.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from klvae.errors import KlvaeError, WeightsError, cut
from klvae.model.autoencoder import AutoencoderKL
from klvae.training.config import TrainConfig, model_config
from klvae.weights import check_state_dict, read_state_dict
from klvae.weights.load import load_source, locate

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def build_model(cfg: TrainConfig) -> AutoencoderKL:
    """The autoencoder to train, in float32: a preset from scratch, or pretrained weights."""
    m = cfg.model
    config = model_config(m)  # None with pretrained weights: theirs, changed by model.overrides below
    vae = (_with_overrides(_pretrained(m.pretrained, cfg.train.out_dir), m.overrides) if m.pretrained
           else AutoencoderKL(config))
    vae.enable_gradient_checkpointing(m.gradient_checkpointing)
    if m.decoder_only:
        for mod in (vae.encoder, vae.quant_conv):
            if mod is not None:
                mod.requires_grad_(False)
    return vae.train()


def _pretrained(spec: str, out_dir: str) -> AutoencoderKL:
    """The weights with their own config (config.json, the file's metadata, or inferred from the shapes)."""
    try:
        source = locate(spec)
        vae = load_source(AutoencoderKL, source)  # float32, as from_pretrained gives it
    except WeightsError as e:
        # A run's export (stage 2 of a recipe) that is not there yet: the stage before has not been trained.
        hint = " (train the run that exports it first)" if Path(spec).name == "final" else ""
        raise WeightsError(f"model.pretrained: {e}{hint}") from None
    stored = stored_dtype(source.weights)
    if stored in (torch.float16, torch.bfloat16):
        # Said, since a fine-tune of a half-precision file exports one twice its size; half precision would round
        # away part of a fine-tune's small weight changes, so the export keeps float32 and convert halves it.
        name = "fp16" if stored == torch.float16 else "bf16"
        final = Path(out_dir) / "final"
        log.info("model.pretrained stores %s weights: the run trains float32 master weights, and its checkpoints "
                 "and final/ hold float32 (klvae convert -m %s -o %s-%s --dtype %s stores a copy at the original "
                 "size)", name, final, final, name, name)
    return vae


def stored_dtype(path: Path) -> torch.dtype | None:
    """The floating dtype most of a weights file's tensors are stored in; None when it cannot be told."""
    counts: Counter[torch.dtype] = Counter()
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:  # the header only: no tensor is read
                names = list(f.keys())
                counts.update(_SAFETENSORS_DTYPES.get(f.get_slice(k).get_dtype()) for k in names)
        else:
            counts.update(v.dtype for v in read_state_dict(path).values() if isinstance(v, torch.Tensor))
    except (WeightsError, OSError, ValueError, RuntimeError):
        return None  # the weights were read just before: a file that changed since is the loader's concern
    floating = [(n, d) for d, n in counts.items() if d is not None and d.is_floating_point]
    return max(floating, key=lambda t: t[0])[1] if floating else None


def _with_overrides(vae: AutoencoderKL, overrides: dict[str, Any]) -> AutoencoderKL:
    """`vae` with model.overrides applied to its own config; refused when the weights no longer fit."""
    if not overrides:
        return vae
    try:
        config = vae.config.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise KlvaeError(f"model.overrides: {cut(str(e), 300)}") from None
    if config == vae.config:
        return vae
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation leaves the run's seed stream alone
        changed = AutoencoderKL(config)
    sd = vae.state_dict()
    try:
        check_state_dict(changed, sd, "the architecture that model.overrides make of them", shown=1)
    except WeightsError as e:
        raise KlvaeError(f"model.overrides {', '.join(map(str, overrides))} do not fit model.pretrained: "
                         f"{cut(str(e), 400)}") from None
    changed.load_state_dict(sd)
    return changed
