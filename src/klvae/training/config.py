"""The training configuration: typed sections, read from YAML or TOML, overridable as `section.field=value`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import tomllib
import yaml

from klvae.errors import KlvaeError


@dataclass
class ModelSection:
    """Which autoencoder to train and from where."""

    # A preset name (sd15, tiny, ...) for the architecture when training from scratch.
    preset: str = "sd15"
    # Start from these weights instead (anything from_pretrained reads); empty: from scratch.
    pretrained: str = ""
    # Freeze the encoder and quant_conv (sd-vae-ft-mse style): the latent space stays the diffusion model's.
    decoder_only: bool = False
    # Recompute block activations in backward: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # Architecture changes on top of the preset, e.g. {block_out_channels: [64, 128, 256, 256]}.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Where the images come from and how they are cropped."""

    # An image folder, a `datasets` save_to_disk folder, parquet file(s), or WebDataset .tar shards.
    train: str = ""
    # A held-out set for validation; empty: no validation.
    val: str = ""
    # Square crop size fed to the model.
    resolution: int = 256
    # "random" crops for training (data augmentation); validation always uses the centre.
    crop: str = "random"
    # Probability of a horizontal flip.
    flip: float = 0.5
    # Random crops cover this fraction range of the shorter side before resizing (1, 1: plain crop).
    scale_min: float = 1.0
    scale_max: float = 1.0
    # Images per process per micro-batch.
    batch_size: int = 4
    # DataLoader worker processes per rank.
    num_workers: int = 2
    # Keep an image folder's decoded images in memory (each worker its own copy): for small folders seen
    # many times, where PNG/JPEG decoding would cost more than the crop.
    cache_images: bool = False
    # Name of the image column of Hugging Face datasets.
    image_column: str = "image"
    # How many validation images to use (the first N).
    val_images: int = 64


@dataclass
class OptimSection:
    """The two AdamW optimisers and the schedule."""

    lr: float = 4.5e-6
    disc_lr: float = 4.5e-6
    betas: tuple[float, float] = (0.5, 0.9)  # LDM's GAN-friendly betas
    weight_decay: float = 0.0
    # Linear warm-up steps, then `schedule` ("constant" or "cosine" to zero at max_steps).
    warmup_steps: int = 0
    schedule: str = "constant"
    # Micro-batches per optimiser step.
    grad_accum: int = 1
    # Clip the global gradient norm; 0 disables.
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    """Length, precision, EMA, logging and checkpoints."""

    max_steps: int = 1000
    seed: int = 0
    # "fp32", "bf16" (autocast), or "fp16" (autocast + gradient scaler).
    precision: str = "fp32"
    # "auto" (CUDA when present), "cpu", "cuda".
    device: str = "auto"
    # EMA of the autoencoder weights; 0 disables.
    ema_decay: float = 0.0
    log_every: int = 10
    val_every: int = 500
    ckpt_every: int = 500
    # Stop after this many consecutive non-finite losses (each such step is skipped).
    max_nonfinite: int = 10
    # Run folder: checkpoints/, tensorboard/, samples/, final/.
    out_dir: str = "runs/klvae"
    # Export the EMA weights (when kept) instead of the raw ones.
    export_ema: bool = True
    # Sample z from the posterior during training (LDM) rather than using its mean.
    sample_posterior: bool = True


@dataclass
class TrainConfig:
    """Everything `klvae train` needs."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    # A loss preset name (ldm, ft-mse, mse) plus field overrides: {preset: ldm, kl_weight: 1e-6, ...}.
    loss: dict[str, Any] = field(default_factory=lambda: {"preset": "ldm"})
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for YAML and checkpoints)."""
        return dataclasses.asdict(self)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise KlvaeError(f"config section {where or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KlvaeError(f"unknown config field(s) {', '.join(f'{where}{u}' for u in unknown)}")
    kwargs = {}
    for name, value in data.items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, value, f"{where}{name}.")
        elif get_origin(t) is tuple:
            kwargs[name] = tuple(float(v) for v in value)
        elif t in (int, float, str, bool):
            kwargs[name] = _coerce(t, value, f"{where}{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _coerce(t: type, value: Any, name: str) -> Any:
    if t is bool and not isinstance(value, bool):
        raise KlvaeError(f"config field {name} must be true or false, got {value!r}")
    if t is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if t is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if t is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, t):
        raise KlvaeError(f"config field {name} must be {t.__name__}, got {value!r}")
    return value


def apply_override(d: dict[str, Any], assignment: str) -> None:
    """Set `section.field=value` (value parsed as YAML) in a nested dict."""
    if "=" not in assignment:
        raise KlvaeError(f"override {assignment!r} is not of the form section.field=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = d
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise KlvaeError(f"override {assignment!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (.yaml/.yml) or TOML (.toml), apply overrides, and check every field."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise KlvaeError(f"no such config file: {p}")
        try:
            d = tomllib.loads(p.read_text()) if p.suffix == ".toml" else (yaml.safe_load(p.read_text()) or {})
        except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise KlvaeError(f"cannot parse {p}: {str(e).splitlines()[0]}") from None
    for o in overrides or []:
        apply_override(d, o)
    cfg = _build(TrainConfig, d, "")
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    if not cfg.data.train:
        raise KlvaeError("data.train is not set: name an image folder, dataset or shards")
    if cfg.train.precision not in ("fp32", "bf16", "fp16"):
        raise KlvaeError(f"train.precision must be fp32, bf16 or fp16, got {cfg.train.precision!r}")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise KlvaeError(f"optim.schedule must be constant or cosine, got {cfg.optim.schedule!r}")
    for name in ("batch_size", "resolution"):
        if getattr(cfg.data, name) < 1:
            raise KlvaeError(f"data.{name} must be at least 1")
    if cfg.optim.grad_accum < 1 or cfg.train.max_steps < 1:
        raise KlvaeError("optim.grad_accum and train.max_steps must be at least 1")
