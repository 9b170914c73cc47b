"""Writing weights: a diffusers folder (config.json + weights) or one LDM-layout .safetensors, atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from klvae.atomic import atomic_write
from klvae.errors import WeightsError
from klvae.weights.convert import diffusers_to_ldm
from klvae.weights.diffusers_config import config_to_diffusers

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS = "diffusion_pytorch_model.bin"


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    # safetensors wants contiguous CPU tensors that share no storage.
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _save_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def save_pretrained(model: nn.Module, directory: str | Path, safe_serialization: bool = True) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors (or .bin) into `directory`; returns it."""
    config = getattr(model, "config", None)
    if config is None:
        raise WeightsError(f"{type(model).__name__} has no config to save")
    d = config_to_diffusers(config)  # raises before anything is written when diffusers cannot express it
    directory = Path(directory)
    tensors = _tensors(model)
    if safe_serialization:
        _save_safetensors(tensors, directory / SAFE_WEIGHTS)
    else:
        atomic_write(directory / PICKLE_WEIGHTS, lambda tmp: torch.save(tensors, tmp))
    text = json.dumps(d, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / "config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("saved %s", directory)
    return directory


def export_ldm(model: nn.Module, path: str | Path) -> Path:
    """Write the weights in LDM layout (keys without prefix) to one .safetensors file; returns its path."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"export_ldm writes .safetensors, not {path.name}")
    _save_safetensors(diffusers_to_ldm(_tensors(model)), path)
    log.info("exported LDM-layout weights to %s", path)
    return path
