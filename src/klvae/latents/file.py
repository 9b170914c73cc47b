"""The latents file that `klvae encode` writes and `klvae decode` reads: one safetensors with metadata."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from klvae.atomic import atomic_save_file
from klvae.errors import LatentsError, quote
from klvae.images import MAX_PIXELS
from klvae.model.latent_norm import LatentNorm

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
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    latent_patch_size: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def norm(self) -> LatentNorm:
        """The factors the latents were scaled with."""
        return LatentNorm(self.scaling_factor, self.shift_factor, self.latents_mean, self.latents_std,
                          self.latent_patch_size)


def save_latents(lf: LatentsFile, path: str | Path, replace: bool = True) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename (atomic_write makes missing folders,
    and removes them again should the write fail); with replace=False, a file at `path` is kept (KlvaeError)."""
    path = Path(path)
    # Items that load_latents would refuse are refused here, before a file is written that could not be read back.
    missing = [i.key for i in lf.items if i.key not in lf.latents]
    if missing:
        raise LatentsError(f"{path}: items name latents the file would not hold: {quote(', '.join(missing[:5]))}")
    for n, it in enumerate(lf.items):
        _check_tensor(lf.latents[it.key], f"{path}: item {n} ({quote(it.name)})")
    meta = {
        "format": FORMAT,
        "model": lf.model,
        **{k: json.dumps(v) for k, v in lf.norm.to_dict().items()},
        "items": json.dumps([asdict(i) for i in lf.items]),
        **lf.extra,
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lf.latents.items()}
    return atomic_save_file(path, tensors, meta, replace)


# Metadata that `klvae encode` writes beside the factors and that a reader keeps: how each latent was taken
# (posterior mean or sample), and hashes of the encoding model and of its encoder alone (its weights and
# architecture, see klvae.latents.fingerprint) by which decode tells latents of another model.
EXTRA_KEYS = ("posterior", "model_fingerprint", "encoder_fingerprint")


def load_latents(path: str | Path, downsample_factor: int | None = None) -> LatentsFile:
    """Read and check a latents file; anything malformed is a LatentsError naming the item and field.

    With `downsample_factor` the items' sizes are also checked against their latents (see check_sizes).
    """
    path = Path(path)
    if path.is_dir():
        raise LatentsError(f"{path} is a folder; a latents file is one .safetensors file, as `klvae encode` writes")
    if not path.is_file():
        raise LatentsError(f"{path} is not a regular file" if path.exists() else f"no such latents file: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LatentsError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        why = f"format {quote(meta['format'])}" if "format" in meta else "no klvae format in its metadata"
        raise LatentsError(f"{path} is not a klvae latents file ({why})")
    items_json = _meta_json(meta, "items", path)
    if not isinstance(items_json, list):
        raise LatentsError(f"{path} has malformed metadata: items is {type(items_json).__name__}, not a list")
    items = [_parse_item(d, n, path) for n, d in enumerate(items_json)]
    if not items:  # `klvae encode` never writes one; decoding it would do nothing and say nothing
        raise LatentsError(f"{path} holds no latents (its items list is empty)")
    missing = [i.key for i in items if i.key not in tensors]
    if missing:
        raise LatentsError(f"{path} lists latents it does not hold: {quote(', '.join(missing[:5]))}")
    for n, it in enumerate(items):
        _check_tensor(tensors[it.key], f"{path}: item {n} ({quote(it.name)})")
    norm = _parse_norm(meta, path)
    _check_channels(norm, items, tensors, path)
    extra = {k: meta[k] for k in EXTRA_KEYS if k in meta}
    lf = LatentsFile(latents=tensors, items=items, model=meta.get("model", ""), **asdict(norm), extra=extra)
    if downsample_factor is not None:
        check_sizes(lf, downsample_factor, path)
    return lf


def check_sizes(lf: LatentsFile, downsample_factor: int, where: str | Path = "latents") -> None:
    """Each item's size must be what its latents decode to, cropped by less than one latent cell (of the diffusion
    latent, so a patch for FLUX.2), and the decoded image must stay within klvae.images.MAX_PIXELS; else a
    LatentsError naming the item."""
    f = downsample_factor * lf.latent_patch_size
    for n, it in enumerate(lf.items):
        label = f"{where}: item {n} ({quote(it.name)})"
        h, w = lf.latents[it.key].shape[-2:]
        for field_name, size, cells in (("height", it.height, h), ("width", it.width, w)):
            # encode pads each side to a multiple of f, so the size lies within the last latent cell.
            if not (cells - 1) * f < size <= cells * f:
                raise LatentsError(f"{label}: {field_name} {size} does not fit latents {cells} cells "
                                   f"{'high' if field_name == 'height' else 'wide'} "
                                   f"(x{f}: {(cells - 1) * f + 1} to {cells * f})")
        if h * f * w * f > MAX_PIXELS:
            raise LatentsError(f"{label}: latents of {h}x{w} decode to {h * f}x{w * f} = {h * f * w * f:,} "
                               f"pixels, over the limit of {MAX_PIXELS:,}")


def batch_item_names(path: str | Path, count: int) -> list[str]:
    """Image names for the latents of a file that holds one batch and no names: its name's stem and the index,
    `x_00.png`, `x_01.png`... (two digits at least)."""
    stem = Path(path).stem or Path(path).name
    digits = max(2, len(str(count - 1)))
    return [f"{stem}_{n:0{digits}d}.png" for n in range(count)]


def batch_latents_file(samples: Tensor, names: list[str], norm: LatentNorm, cell: int, model: str = "") -> LatentsFile:
    """One [B, C, h, w] batch, scaled by `norm`, as a LatentsFile of one item per latent, each decoded whole
    (`cell` pixels per stored cell), so that the latents file's checks and decoding apply."""
    if len(names) != samples.shape[0]:
        raise ValueError(f"{len(names)} names for a batch of {samples.shape[0]} latents")
    h, w = samples.shape[-2:]
    items = [LatentItem(name=n, key=f"{i:06d}", height=h * cell, width=w * cell) for i, n in enumerate(names)]
    return LatentsFile(latents={it.key: samples[i] for i, it in enumerate(items)}, items=items, model=model,
                       **asdict(norm))


_ITEM_FIELDS = ("name", "key", "height", "width")


def _meta_json(meta: dict[str, str], name: str, path: Path) -> object:
    if name not in meta:
        raise LatentsError(f"{path} has malformed metadata: no {name} field")
    try:
        return json.loads(meta[name])
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise LatentsError(f"{path} has malformed metadata: {name} is not JSON ({e})") from None


def _parse_norm(meta: dict[str, str], path: Path) -> LatentNorm:
    scaling = _meta_number(_meta_json(meta, "scaling_factor", path), "scaling_factor", path)
    if scaling is None or scaling == 0:
        raise LatentsError(f"{path} has malformed metadata: scaling_factor must be a non-zero number, got {scaling}")
    shift = _meta_number(_meta_json(meta, "shift_factor", path), "shift_factor", path)
    # Files written before the per-channel statistics (or the patches) have no such fields.
    # Any: values as the file gives them, which LatentNorm checks (its message is then the file's problem).
    per_channel: dict[str, Any] = {k: _meta_json(meta, k, path) if k in meta else None
                                   for k in ("latents_mean", "latents_std")}
    patch: Any = _meta_json(meta, "latent_patch_size", path) if "latent_patch_size" in meta else 1
    try:
        return LatentNorm(scaling, shift, **per_channel, latent_patch_size=patch)
    except ValueError as e:
        raise LatentsError(f"{path} has malformed metadata: {e}") from None


def _check_channels(norm: LatentNorm, items: list[LatentItem], tensors: dict[str, Tensor], path: Path) -> None:
    if norm.channels is None:
        return
    for n, it in enumerate(items):
        if tensors[it.key].shape[0] != norm.channels:
            raise LatentsError(f"{path}: item {n} ({quote(it.name)}) has {tensors[it.key].shape[0]} channels, "
                               f"but latents_mean/latents_std describe {norm.channels}")


def _meta_number(value: object, name: str, path: Path) -> float | None:
    # bool is an int to Python, but `true` is no factor; NaN/inf would turn every latent non-finite.
    if value is None:
        return None
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # a JSON integer past float's range
        number = math.nan
    if not math.isfinite(number):
        raise LatentsError(f"{path} has malformed metadata: {name} must be a finite number, got {quote(value)}")
    return number


def _parse_item(d: object, n: int, path: Path) -> LatentItem:
    if not isinstance(d, dict):
        raise LatentsError(f"{path}: item {n} is {type(d).__name__}, not an object with {', '.join(_ITEM_FIELDS)}")
    missing, unknown = [k for k in _ITEM_FIELDS if k not in d], [k for k in d if k not in _ITEM_FIELDS]
    if missing or unknown:
        what = "; ".join(s for s in (missing and f"no {', '.join(missing)}",
                                     unknown and f"unknown {quote(', '.join(map(str, unknown)))}") if s)
        raise LatentsError(f"{path}: item {n} has malformed fields: {what}")
    label = f"{path}: item {n}"
    for k in ("name", "key"):
        if not isinstance(d[k], str):
            raise LatentsError(f"{label}: {k} must be a string, got {quote(d[k])}")
    if not d["key"]:
        raise LatentsError(f"{label}: key is empty")
    for k in ("height", "width"):
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LatentsError(f"{label} ({quote(d['name'])}): {k} must be a positive integer, got {quote(v)}")
    if d["height"] * d["width"] > MAX_PIXELS:
        raise LatentsError(f"{label} ({quote(d['name'])}): {quote(d['height'], 20)}x{quote(d['width'], 20)} is over "
                           f"the limit of {MAX_PIXELS:,} pixels")
    return LatentItem(name=d["name"], key=d["key"], height=d["height"], width=d["width"])


LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_filled_float(t: Tensor, label: str, what: str = "latents") -> None:
    """LatentsError, `label: ...`, unless `t` holds values in one of LATENT_DTYPES."""
    if 0 in t.shape:
        raise LatentsError(f"{label}: empty {what} of shape {list(t.shape)}")
    if t.dtype not in LATENT_DTYPES:  # float8 too: torch cannot even check it for NaN
        raise LatentsError(f"{label}: {what} of dtype {str(t.dtype).removeprefix('torch.')}; "
                           "expected float32, float16, bfloat16 or float64")


def _check_tensor(t: Tensor, label: str) -> None:
    if t.ndim != 3:
        raise LatentsError(f"{label}: latents of shape {list(t.shape)}; each item holds one image's "
                           "[channels, height, width]")
    check_filled_float(t, label)
