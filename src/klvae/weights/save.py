"""Writing weights: a diffusers folder (config.json + weights) or one LDM-layout .safetensors, atomically."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from klvae.atomic import atomic_write, atomic_write_all, signals_held
from klvae.errors import WeightsError
from klvae.model.config import AutoencoderKLConfig
from klvae.weights.convert import diffusers_to_ldm
from klvae.weights.diffusers_config import config_to_diffusers
from klvae.weights.latent_bn import latent_bn_tensors
from klvae.weights.read import CONFIG_METADATA, SAFETENSORS_SUFFIXES, shard_names

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"


def _tensors(model: nn.Module, config: AutoencoderKLConfig) -> dict[str, Tensor]:
    # safetensors wants contiguous CPU tensors that share no storage.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.latent_patch_size > 1:  # FLUX.2's loaders read the latent statistics from these buffers
        tensors.update(latent_bn_tensors(config))
    return tensors


def _safetensors_writer(tensors: dict[str, Tensor], config: AutoencoderKLConfig) -> Callable[[Path], None]:
    from safetensors.torch import save_file

    metadata = {"format": "pt", CONFIG_METADATA: json.dumps(config.to_dict(), sort_keys=True)}
    return lambda tmp: save_file(tensors, str(tmp), metadata=metadata)


def _pickle_writer(tensors: dict[str, Tensor]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        # Through a file object: a full disk is then an OSError, where torch.save(path) raises a RuntimeError.
        with open(tmp, "wb") as f:
            torch.save(tensors, f)

    return write


def _model_and_config(model: nn.Module, missing: str) -> tuple[nn.Module, AutoencoderKLConfig]:
    """The klvae model inside `model` (torch.compile's wrapper, the diffusers-compatible one) and its config; a
    WeightsError `missing` (after the model's class name) when there is none."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's keys would all start with "_orig_mod."
    model = getattr(model, "klvae_model", model)  # klvae.compat's DiffusersVAE
    config = getattr(model, "config", None)
    if not isinstance(config, AutoencoderKLConfig):
        raise WeightsError(f"{type(model).__name__} {missing}")
    return model, config


def _stale_files(directory: Path, written: str) -> list[str]:
    """The older weights that loaders could read in place of the file just written: the other format's file,
    variants (`diffusion_pytorch_model.fp16.safetensors`, which diffusers reads given variant="fp16") and sharded
    weights, each index before its shards, so that no loader follows an index to removed shards."""
    stale = [PICKLE_WEIGHTS if written == SAFE_WEIGHTS else SAFE_WEIGHTS]
    for kind in ("safetensors", "bin"):
        # diffusers' names: diffusion_pytorch_model.safetensors.index.json, .safetensors.index.fp16.json
        for index in sorted(directory.glob(f"diffusion_pytorch_model.{kind}.index*.json")):
            stale.append(index.name)
            with contextlib.suppress(WeightsError):  # an unreadable index: the index alone goes
                stale += shard_names(index)
        stale += sorted(p.name for p in directory.glob(f"diffusion_pytorch_model.*.{kind}"))
    return [n for n in dict.fromkeys(stale) if n not in (written, "config.json") and (directory / n).is_file()]


def save_pretrained(model: nn.Module, directory: str | Path, safe_serialization: bool = True) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors (or .bin) into `directory`; returns it.

    Both files are renamed into place only once both are written, and older weights there are removed (the other
    format's file, sharded weights and their index): a loader that prefers them would otherwise read old weights.
    """
    model, config = _model_and_config(model, "has no config to save")
    d = config_to_diffusers(config)  # raises before anything is written when diffusers cannot express it
    directory = Path(directory)
    tensors = _tensors(model, config)
    name = SAFE_WEIGHTS if safe_serialization else PICKLE_WEIGHTS
    write_weights = _safetensors_writer(tensors, config) if safe_serialization else _pickle_writer(tensors)
    text = json.dumps(d, indent=2, sort_keys=True) + "\n"
    with signals_held():  # an interrupt waits until the new files are in and the old ones gone
        atomic_write_all([(directory / name, write_weights),
                          (directory / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))])
        for stale in _stale_files(directory, name):
            (directory / stale).unlink(missing_ok=True)
            log.info("removed %s: older weights that a loader could read in place of the new ones", directory / stale)
    log.debug("saved %s", directory)
    return directory


def export_ldm(model: nn.Module, path: str | Path) -> Path:
    """Write the weights in LDM layout (keys without prefix) to one .safetensors file; returns its path. A model
    with latent patches (FLUX.2) is written in BFL's layout, with the latent BatchNorm its AutoEncoder loads.

    The header also holds the config, so that klvae reloads the file as the same model (other loaders ignore it).
    """
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise WeightsError(f"export_ldm writes .safetensors, not {path.name}")
    model, config = _model_and_config(model, "has no AutoencoderKLConfig to export with")
    tensors = diffusers_to_ldm(_tensors(model, config))
    atomic_write(path, _safetensors_writer(tensors, config))
    log.debug("exported LDM-layout weights to %s", path)
    return path
