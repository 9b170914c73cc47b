"""The training configuration: typed sections, read from YAML or TOML, overridable as `section.field=value`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

from klvae.checks import FLOAT32_MAX
from klvae.errors import KlvaeError, cut, quote
from klvae.images import MAX_RESOLUTION
from klvae.model.config import PRESETS, AutoencoderKLConfig, check_field
from klvae.nets.lpips import LPIPS_MIN_SIDE
from klvae.training.config_text import YAML11_EXPONENT, parse_problem, parse_yaml, yaml11_number
from klvae.training.data import CROPS
from klvae.training.losses import LOSS_PRESETS, LossConfig, get_loss_preset

log = logging.getLogger(__name__)


@dataclass
class ModelSection:
    """Which autoencoder to train and from where."""

    # A preset name (sd15, tiny, ...) for the architecture when training from scratch; unused with `pretrained`,
    # whose weights bring their own config.
    preset: str = "sd15"
    # Start from these weights instead (anything from_pretrained reads); empty: from scratch.
    pretrained: str = ""
    # Freeze the encoder and quant_conv (sd-vae-ft-mse style): the latent space stays the diffusion model's.
    decoder_only: bool = False
    # Recompute block activations in backward: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    # Config changes on top of the preset (or of the pretrained weights' own config), e.g.
    # {block_out_channels: [64, 128, 256, 256]} from scratch, {scaling_factor: 0.13} on pretrained weights.
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
    # Decay min(ema_decay, (1 + n) / (10 + n)) after n updates, as diffusers' EMAModel (and LDM's LitEma) do,
    # so that the early average follows the weights rather than their initialisation.
    ema_warmup: bool = True
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
    # Measure LPIPS at validation: it needs the VGG16 and LPIPS-head weights, which an offline run without
    # loss.lpips_vgg_path/lpips_lin_path would try (and fail) to download each run; false: PSNR and SSIM only.
    val_lpips: bool = True


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

    def resolved_dict(self) -> dict[str, Any]:
        """`to_dict` with every loss field spelled out as the preset and overrides give it (what the run uses);
        loadable as a config again."""
        d = self.to_dict()
        if self.model.pretrained:  # the weights' own config is the architecture: a preset shown would mislead
            del d["model"]["preset"]
        d["loss"] = {"preset": self.loss.get("preset", "ldm"), **dataclasses.asdict(build_loss_config(self.loss))}
        return d


def _build(cls: type, data: object, where: str) -> Any:
    if not isinstance(data, dict):
        if where:
            raise KlvaeError(_not_a_value(where.rstrip("."), data))
        raise KlvaeError(f"config section top level must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise KlvaeError(f"unknown config field(s) {_names(unknown, where)}")
    kwargs = {}
    for name, value in data.items():
        t, full = hints[name], f"{where}{name}"
        if value is None and ((isinstance(t, type) and dataclasses.is_dataclass(t)) or get_origin(t) is dict):
            value = {}  # `train:` with every field under it commented out: its defaults, as an empty file's
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, value, f"{full}.")
        elif get_origin(t) is tuple:
            kwargs[name] = _floats(value, len(get_args(t)), full)
        elif get_origin(t) is dict and not isinstance(value, dict):
            raise KlvaeError(f"config field {full} must be a mapping (set its keys as {full}.KEY=VALUE), "
                             f"got {quote(value)}")
        elif t in (int, float, str, bool):
            kwargs[name] = _coerce(t, value, full)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _floats(value: Any, n: int, name: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or len(value) != n:
        raise KlvaeError(f"config field {name} must be a list of {n} numbers, got {quote(value)}")
    return tuple(_coerce(float, v, name) for v in value)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if not isinstance(value, int | float):
        raise KlvaeError(f"config field {name} must be float, got {quote(value)}")
    if isinstance(value, int) and abs(value) > FLOAT32_MAX:  # before isfinite, which overflows on such an int
        raise KlvaeError(f"config field {name} must lie within float32's range (±3.4e38), got {quote(value)}")
    if not math.isfinite(value):
        raise KlvaeError(f"config field {name} must be a finite number, got {quote(value)}")
    # Every number here ends up in float32 (tensors, the optimisers' steps), where larger ones are inf.
    if abs(value) > FLOAT32_MAX:
        raise KlvaeError(f"config field {name} must lie within float32's range (±3.4e38), got {quote(value)}")
    return float(value)


def _coerce(t: Any, value: Any, name: str) -> Any:
    args = get_args(t)
    if type(None) in args:  # `X | None`: None stays, anything else must be an X
        if value is None:
            return None
        (t,) = (a for a in args if a is not type(None))
    if t is str and value is None:  # `--set data.val=` or `val:` with nothing after it: YAML's null
        raise KlvaeError(f"config field {name} must be str, got null (nothing after '=' or ':' is null in YAML; "
                         f"an empty string is written \"\", as in --set '{name}=\"\"')")
    if t is bool and not isinstance(value, bool):
        raise KlvaeError(f"config field {name} must be true or false, got {quote(value)}")
    if t is not bool and isinstance(value, bool):  # bool is an int to Python, not to a person: true steps?
        hint = f" (YAML reads on/off/yes/no as booleans: for the text, quote it, as in --set '{name}=\"...\"')" \
            if t is str else ""
        raise KlvaeError(f"config field {name} must be {t.__name__}, got {quote(value)}{hint}")
    if t is float:
        return _as_float(value, name)
    if t is int and isinstance(value, str) and YAML11_EXPONENT.match(value):
        value = float(value)  # YAML 1.1 reads 1e3 (no dot) as a string, 1.0e3 as a float
    if t is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, t):
        # YAML reads 2023, on or 0x10 as a number or a boolean: a text field takes them quoted.
        numeric = t is str and isinstance(value, int | float)
        hint = f" (YAML read a number: for the text, quote it, as in --set '{name}=\"...\"')" if numeric else ""
        raise KlvaeError(f"config field {name} must be {t.__name__}, got {quote(value)}{hint}")
    return value


def apply_override(d: dict[str, Any], assignment: str) -> None:
    """Set `section.field=value` (value parsed as YAML) in a nested dict."""
    if "=" not in assignment:
        raise KlvaeError(f"override {quote(assignment, 200)} is not of the form section.field=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):  # "=5", "train.=5", "a..b=5": no field to set
        raise KlvaeError(f"override {quote(assignment, 200)} names no field before '=' (section.field=value)")
    node = d
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:  # missing, or a section left empty in the file (`train:`)
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            if _is_section(parts[: i + 1]):  # the file (or an earlier --set) gave the section a value
                raise KlvaeError(_not_a_value(".".join(parts[: i + 1]), node))
            raise KlvaeError(f"override {quote(assignment, 200)}: {cut(p)} is not a section")
    try:
        value = parse_yaml(raw)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise KlvaeError(f"override {quote(assignment, 200)}: cannot parse the value: {parse_problem(e)}") from None
    if _is_section(parts) and not isinstance(value, dict):
        raise KlvaeError(f"override {quote(assignment, 200)}: {_not_a_value(key.strip(), value)}")
    node[parts[-1]] = _merged(node.get(parts[-1]), value)


def _merged(old: Any, new: Any) -> Any:
    """`new` over `old`, mapping by mapping: `--set 'train={seed: 1}'` keeps the file's other train fields."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}


def _is_section(path: list[str]) -> bool:
    """Whether `path` names one of TrainConfig's sections (model, data, optim, train), not a field."""
    t: Any = TrainConfig
    for p in path:
        fields = {f.name: f for f in dataclasses.fields(t)} if dataclasses.is_dataclass(t) else {}
        if p not in fields:
            return False
        t = get_type_hints(t)[p]
    return dataclasses.is_dataclass(t)


def _not_a_value(name: str, value: Any) -> str:
    """The message for a section given a value (`train: 5`, `--set train=5`)."""
    return (f"{cut(name)} is a section and cannot be set to a value (got {quote(value)}): set its fields, "
            f"as {cut(name)}.FIELD=VALUE")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read YAML (.yaml/.yml) or TOML (.toml), apply overrides, and check every field."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            what = "a folder, FIFO or device, not a config file" if p.exists() else None
            raise KlvaeError(f"{p} is {what}" if what else f"no such config file: {p}")
        try:
            d = tomllib.loads(p.read_text()) if p.suffix.lower() == ".toml" else (parse_yaml(p.read_text()) or {})
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # TOMLDecodeError, UnicodeDecodeError: ValueErrors
            raise KlvaeError(f"cannot parse {p}: {parse_problem(e)}") from None
        if not isinstance(d, dict):
            raise KlvaeError(f"config section top level must be a mapping, got {type(d).__name__}")
    for o in overrides or []:
        apply_override(d, o)
    _check_size(d)
    cfg = _build(TrainConfig, d, "")
    cfg.model.overrides = {k: yaml11_number(v) for k, v in cfg.model.overrides.items()}
    _check(cfg)
    model = d.get("model")
    if cfg.model.pretrained and isinstance(model, dict) and "preset" in model:
        log.warning("model.preset %s is unused with model.pretrained: the weights' own config is the architecture "
                    "(model.overrides change it)", quote(cfg.model.preset))
    return cfg


def surprises(cfg: TrainConfig) -> list[str]:
    """Valid settings that are almost certainly not what was meant, in words for a warning each."""
    found = []
    if cfg.model.decoder_only and not cfg.model.pretrained:
        found.append("model.decoder_only without model.pretrained freezes a randomly initialised encoder: its "
                     "latent space is noise no diffusion model was trained on, so the decoder learns nothing of use; "
                     "set model.pretrained to the weights whose latents to keep")
    loss = build_loss_config(cfg.loss)
    if cfg.loss.get("preset") == "ft-mse" and loss.kl_weight == 0 and not cfg.model.decoder_only:
        # ft-mse is a decoder fine-tune's recipe: with the encoder training too and no KL, its latents drift from
        # those the diffusion model knows.
        found.append("loss.preset ft-mse (no KL) with model.decoder_only false: the encoder trains too, and nothing "
                     "keeps its latents where the diffusion model knows them; set model.decoder_only=true, as "
                     "sd-vae-ft-mse was trained")
    # Explicit weight files load whatever lpips_pretrained says (nets.lpips.LPIPS): only without both is it random.
    random_lpips = not loss.lpips_pretrained and not (loss.lpips_vgg_path and loss.lpips_lin_path)
    if random_lpips and loss.perceptual_weight > 0:
        found.append(f"loss.lpips_pretrained is false with loss.perceptual_weight {loss.perceptual_weight:g}: the "
                     "perceptual loss compares features of a random VGG, which is no LPIPS; set "
                     "loss.lpips_pretrained=true (or loss.perceptual_weight=0)")
    return found + _schedule_surprises(cfg, loss)


def _schedule_surprises(cfg: TrainConfig, loss: LossConfig) -> list[str]:
    """Step counts that leave part of the run's recipe unreached by train.max_steps."""
    found, steps = [], cfg.train.max_steps
    # Steps count from 0 (LDM's global_step), so the last one is max_steps - 1.
    if loss.uses_discriminator and loss.disc_start >= steps:
        found.append(f"loss.disc_start {loss.disc_start} is not below train.max_steps {steps}: the PatchGAN critic is "
                     "built and saved but never trains, and the GAN term stays off for the whole run; lower "
                     "loss.disc_start, or set loss.disc_weight=0 to train without it")
    if cfg.optim.warmup_steps > steps:
        found.append(f"optim.warmup_steps {cfg.optim.warmup_steps} is above train.max_steps {steps}: the learning "
                     f"rate never reaches optim.lr (it ends at {steps / cfg.optim.warmup_steps:.3g} of it)")
    return found


# A config is a few dozen values. YAML anchors and aliases let a file of a few hundred bytes expand to billions
# (an "alias bomb"), which any walk over or message about the value would spend memory on without end.
MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 10_000, 32


def _check_size(d: object) -> None:
    """Refuse a config that expands to more than MAX_CONFIG_VALUES values or MAX_CONFIG_DEPTH levels."""
    count, stack = 0, [(d, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
            raise KlvaeError(f"the config expands to more than {MAX_CONFIG_VALUES} values or {MAX_CONFIG_DEPTH} "
                             f"levels of nesting (YAML aliases?): not a training config")
        if isinstance(node, dict):
            stack += [(x, depth + 1) for kv in node.items() for x in kv]
        elif isinstance(node, list | tuple):
            stack += [(x, depth + 1) for x in node]


def _names(names: list[str], prefix: str = "") -> str:
    """At most five field names for a message, each cut short."""
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(cut(prefix + n) for n in names[:5]) + more


def _check(cfg: TrainConfig) -> None:
    if not cfg.data.train:
        raise KlvaeError("data.train is not set: name an image folder, dataset or shards")
    choices = (("train.precision", cfg.train.precision, ("fp32", "bf16", "fp16")),
               ("optim.schedule", cfg.optim.schedule, ("constant", "cosine")),
               ("data.crop", cfg.data.crop, CROPS))
    for name, value, allowed in choices:
        if value not in allowed:
            raise KlvaeError(f"{name} must be one of {', '.join(allowed)}, got {quote(value)}")
    for name, value, ok, rule in _ranges(cfg):
        if not ok:
            raise KlvaeError(f"{name} must be {rule}, got {quote(value)}")
    arch = model_config(cfg.model)
    if arch is not None and cfg.data.resolution % arch.downsample_factor:
        raise KlvaeError(f"data.resolution must be a multiple of {arch.downsample_factor} (the model's downsample "
                         f"factor), got {cfg.data.resolution}")
    loss = build_loss_config(cfg.loss)
    if loss.uses_discriminator:
        _check_critic(loss, cfg.data.resolution)
    if loss.perceptual_weight > 0 and cfg.data.resolution < LPIPS_MIN_SIDE:
        # Else the first step fails inside the VGG's pooling, after the model and the VGG were built.
        raise KlvaeError(f"data.resolution {cfg.data.resolution} is too small for the LPIPS term "
                         f"(loss.perceptual_weight {loss.perceptual_weight:g}): its VGG needs at least "
                         f"{LPIPS_MIN_SIDE} px a side; raise data.resolution or set loss.perceptual_weight=0")


# The PatchGAN's first-layer width. LDM uses 64; at 1024 the critic already has ~0.7 billion parameters
# (~11 GB with gradients and AdamW moments) and the width grows its size quadratically, so a larger value is
# a typo that would try to allocate hundreds of GB when the trainer builds it.
MAX_DISC_NDF = 1024


def _check_critic(loss: LossConfig, resolution: int) -> None:
    """Refuse a discriminator that cannot run on data.resolution images, before a model is built: it would
    otherwise fail only at loss.disc_start, possibly hours into the run."""
    n = loss.disc_num_layers
    if loss.disc_ndf > MAX_DISC_NDF:
        raise KlvaeError(f"loss.disc_ndf must be at most {MAX_DISC_NDF} (LDM uses 64), got {quote(loss.disc_ndf)}")
    if loss.disc_in_channels != 3:
        raise KlvaeError(f"loss.disc_in_channels must be 3 (the critic sees RGB images), "
                         f"got {quote(loss.disc_in_channels)}")
    # Each of the n layers halves the side and the last two 4x4 convolutions take 2 off it: the critic's
    # output is resolution / 2**n - 2 patches a side, and its last BatchNorm needs more than one value.
    if n > MAX_RESOLUTION.bit_length() or resolution // 2**n - 2 < 1:
        need = f"at least {3 * 2**n}" if n <= MAX_RESOLUTION.bit_length() else f"above {MAX_RESOLUTION}"
        raise KlvaeError(f"data.resolution {resolution} is too small for loss.disc_num_layers {quote(n)}: the PatchGAN "
                         f"critic needs data.resolution / 2**disc_num_layers - 2 >= 1, i.e. a resolution {need}; "
                         f"lower loss.disc_num_layers, raise data.resolution, or set loss.disc_weight=0")


def _ranges(cfg: TrainConfig) -> list[tuple[str, Any, bool, str]]:
    """(field, value, whether it is in range, the range in words) for every numeric field."""
    d, o, t = cfg.data, cfg.optim, cfg.train
    return [
        ("data.resolution", d.resolution, 1 <= d.resolution <= MAX_RESOLUTION,
         f"between 1 and {MAX_RESOLUTION} (resolution² <= klvae.images.MAX_PIXELS)"),
        ("data.batch_size", d.batch_size, d.batch_size >= 1, "at least 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, "at least 0 (0 loads in the main process)"),
        ("data.val_images", d.val_images, d.val_images >= 1, "at least 1"),
        ("data.flip", d.flip, 0 <= d.flip <= 1, "a probability in [0, 1]"),
        ("data.scale_min", d.scale_min, 0 < d.scale_min <= 1, "in (0, 1]"),
        ("data.scale_max", d.scale_max, d.scale_min <= d.scale_max <= 1, "in [data.scale_min, 1]"),
        ("optim.lr", o.lr, o.lr >= 0, "at least 0"),
        ("optim.disc_lr", o.disc_lr, o.disc_lr >= 0, "at least 0"),
        ("optim.betas", list(o.betas), all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, "at least 0"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, "at least 0"),
        ("optim.grad_accum", o.grad_accum, o.grad_accum >= 1, "at least 1"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, "at least 0 (0 disables clipping)"),
        ("train.max_steps", t.max_steps, t.max_steps >= 1, "at least 1"),
        # The posterior noise seeds torch with seed * 1_000_003 + step * max(101, grad_accum) + micro, which must
        # stay under 2**64.
        ("train.seed", t.seed, 0 <= t.seed < 2**32, "in [0, 2**32)"),
        ("train.ema_decay", t.ema_decay, 0 <= t.ema_decay < 1, "in [0, 1) (0 disables the EMA)"),
        ("train.log_every", t.log_every, t.log_every >= 1, "at least 1"),
        ("train.val_every", t.val_every, t.val_every >= 1, "at least 1"),
        ("train.ckpt_every", t.ckpt_every, t.ckpt_every >= 1, "at least 1"),
        ("train.max_nonfinite", t.max_nonfinite, t.max_nonfinite >= 1, "at least 1"),
    ]


def model_config(m: ModelSection) -> AutoencoderKLConfig | None:
    """The architecture that `m` asks for from scratch; None with pretrained weights, whose own config (read when
    they are loaded) model.overrides then changes (trainer.build_model)."""
    if m.preset not in PRESETS:
        raise KlvaeError(f"model.preset must be one of {', '.join(PRESETS)}, got {quote(m.preset)}")
    known = [f.name for f in dataclasses.fields(AutoencoderKLConfig)]
    unknown = sorted(set(map(str, m.overrides)) - set(known))
    if unknown:
        raise KlvaeError(f"unknown model.overrides field(s) {_names(unknown)}; known: {', '.join(known)}")
    if m.pretrained:
        # The weights' config is known once they load: each value alone now, how they fit together then.
        for name, value in m.overrides.items():
            try:
                check_field(name, value)
            except (TypeError, ValueError) as e:
                raise KlvaeError(f"model.overrides: {cut(str(e), 300)}") from None
        return None
    try:
        return PRESETS[m.preset].replace(**m.overrides)
    except (TypeError, ValueError) as e:
        raise KlvaeError(f"model.overrides: {cut(str(e), 300)}") from None


def build_loss_config(d: dict[str, Any]) -> LossConfig:
    """A loss preset with field overrides from the config's `loss` mapping."""
    d = dict(d)
    preset = d.pop("preset", "ldm")
    if not isinstance(preset, str):
        raise KlvaeError(f"loss.preset must be one of {', '.join(LOSS_PRESETS)}, got {quote(preset)}")
    base = get_loss_preset(preset)
    hints = get_type_hints(LossConfig)
    unknown = sorted(set(map(str, d)) - set(hints))
    if unknown:
        raise KlvaeError(f"unknown loss field(s) {_names(unknown, 'loss.')}")
    for name, value in d.items():
        if hints[name] not in (int, float):  # LossConfig converts and checks its numbers itself
            _coerce(hints[name], value, f"loss.{name}")
    return base.replace(**d)
