"""The autoencoder a run trains: a preset from scratch, or pretrained weights with model.overrides on top.

Whatever the dtype the pretrained weights are stored in, the model is built in float32: those are the master
weights the optimiser updates (train.precision only sets autocast), and what checkpoints and final/ hold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from klvae.errors import KlvaeError, WeightsError, cut
from klvae.model.autoencoder import AutoencoderKL
from klvae.model.config import AutoencoderKLConfig
from klvae.training.config import TrainConfig, model_config
from klvae.weights import check_state_dict
from klvae.weights.load import load_source, locate
from klvae.weights.stored_dtype import main_dtype

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, resumed: AutoencoderKLConfig | None = None) -> AutoencoderKL:
    """The autoencoder to train, in float32: a preset from scratch, or pretrained weights (`resumed`: the
    architecture of the checkpoint a resume will load, used when model.pretrained cannot be read)."""
    m = cfg.model
    config = model_config(m)  # None with pretrained weights: theirs, changed by model.overrides below
    vae = (_with_overrides(_pretrained_or(m.pretrained, cfg.train.out_dir, resumed), m.overrides) if m.pretrained
           else AutoencoderKL(config))
    vae.enable_gradient_checkpointing(m.gradient_checkpointing)
    if m.decoder_only:
        for mod in (vae.encoder, vae.quant_conv):
            if mod is not None:
                mod.requires_grad_(False)
    return vae.train()


def _pretrained_or(spec: str, out_dir: str, resumed: AutoencoderKLConfig | None) -> AutoencoderKL:
    """The pretrained weights; on a resume, the checkpoint's architecture when they cannot be read."""
    try:
        return _pretrained(spec, out_dir)
    except WeightsError as e:
        if resumed is None:
            raise
        # The checkpoint replaces every weight: the pretrained ones are only its architecture, which it records.
        # A resume on a machine offline, or after the hub cache was cleared, need not fetch gigabytes to discard.
        log.warning("%s; the run resumes with the architecture its checkpoint records", e)
        with torch.random.fork_rng(devices=[]):  # as a load would, the init leaves the run's seed stream alone
            return AutoencoderKL(resumed)


def _pretrained(spec: str, out_dir: str) -> AutoencoderKL:
    """The weights with their own config (config.json, the file's metadata, or inferred from the shapes)."""
    try:
        source = locate(spec)
        vae = load_source(AutoencoderKL, source)  # float32, as from_pretrained gives it
    except WeightsError as e:
        # A run's export (stage 2 of a recipe) that is not there yet: the stage before has not been trained.
        hint = " (train the run that exports it first)" if Path(spec).name == "final" else ""
        raise WeightsError(f"model.pretrained: {e}{hint}") from None
    name = main_dtype(source.weights)
    if name in ("fp16", "bf16"):
        # Said, since a fine-tune of a half-precision file exports one twice its size; half precision would round
        # away part of a fine-tune's small weight changes, so the export keeps float32 and convert halves it.
        final = Path(out_dir) / "final"
        log.info("model.pretrained stores %s weights: the run trains float32 master weights, and its checkpoints "
                 "and final/ hold float32 (klvae convert -m %s -o %s-%s --dtype %s stores a copy at the original "
                 "size)", name, final, final, name, name)
    return vae


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
