"""The latents file that `klvae encode` writes and `klvae decode` reads: one safetensors with metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from klvae.atomic import atomic_write
from klvae.errors import LatentsError

FORMAT = "klvae.latents/1"


@dataclass
class LatentItem:
    """One encoded image: its latent key and the size to crop the decoded image back to."""

    name: str
    key: str
    height: int
    width: int


@dataclass
class LatentsFile:
    """Scaled latents of several images (sizes may differ), the model that made them, and its factors."""

    latents: dict[str, Tensor]
    items: list[LatentItem]
    model: str = ""
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def save_latents(lf: LatentsFile, path: str | Path) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "model": lf.model,
        "scaling_factor": json.dumps(lf.scaling_factor),
        "shift_factor": json.dumps(lf.shift_factor),
        "items": json.dumps([asdict(i) for i in lf.items]),
        **lf.extra,
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lf.latents.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_latents(path: str | Path) -> LatentsFile:
    """Read a latents file; anything malformed is a LatentsError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise LatentsError(f"no such latents file: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LatentsError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise LatentsError(f"{path} is not a klvae latents file (format {meta.get('format')!r})")
    try:
        items = [LatentItem(**d) for d in json.loads(meta["items"])]
        lf = LatentsFile(
            latents=tensors,
            items=items,
            model=meta.get("model", ""),
            scaling_factor=float(json.loads(meta["scaling_factor"])),
            shift_factor=json.loads(meta["shift_factor"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LatentsError(f"{path} has malformed metadata: {e}") from None
    missing = [i.key for i in items if i.key not in tensors]
    if missing:
        raise LatentsError(f"{path} lists latents it does not hold: {', '.join(missing[:5])}")
    return lf
