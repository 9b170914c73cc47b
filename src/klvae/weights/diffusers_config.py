"""diffusers' AutoencoderKL (and AutoencoderKLFlux2) config.json <-> AutoencoderKLConfig."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from klvae.errors import WeightsError
from klvae.model.config import AutoencoderKLConfig
from klvae.weights.latent_bn import check_flux2_format

log = logging.getLogger(__name__)

# diffusers' own defaults, so a config.json that leaves a key out means what it means to diffusers.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": [64], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    "latents_mean": None, "latents_std": None,
}
# Keys diffusers writes that change nothing here.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_klvae_version", "down_block_types",
            "up_block_types", "act_fn", "_klvae_latents_mean", "_klvae_latents_std"}
# diffusers has no such field: its AutoencoderKL always uses this GroupNorm epsilon.
_DIFFUSERS_NORM_EPS = 1e-6
# FLUX.2's class: AutoencoderKL's network plus a latent BatchNorm over patches (see weights.latent_bn). Its
# pipelines read no scaling_factor, shift_factor or latents_mean: the BatchNorm's statistics replace them.
FLUX2_CLASS = "AutoencoderKLFlux2"
_FLUX2_DEFAULTS: dict[str, Any] = {
    "latent_channels": 32, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 1024,
    "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1, "patch_size": [2, 2], "decoder_block_out_channels": None,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_FLUX2_UNUSED = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
# The statistics as klvae had them (float64), beside the float32 bn.* buffers that FLUX.2's loaders read: diffusers
# ignores config keys that start with "_", and klvae keeps these where they agree with the buffers.
_EXACT_STATS = {"_klvae_latents_mean": "latents_mean", "_klvae_latents_std": "latents_std"}


def _check_block_types(d: dict[str, Any], levels: int) -> None:
    for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d.get(key, [expected])
        if not isinstance(types, list):
            raise WeightsError(f"config.json: {key} must be a list, got {types!r}")
        if any(t != expected for t in types):
            raise WeightsError(f"config.json: {key} {types} is unsupported (only {expected})")
        if len(types) != levels:
            raise WeightsError(f"config.json: {key} has {len(types)} entries but block_out_channels has {levels}")


def _int(value: Any, key: str) -> int:
    # JSON may write 2 as 2.0; 1.5 or "2" are not integers (int() would truncate or parse them).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WeightsError(f"config.json: {key} must be an integer, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    # bool("no") is True: only JSON's true and false are flags.
    if not isinstance(value, bool):
        raise WeightsError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _widths(widths: Any, key: str = "block_out_channels") -> tuple[int, ...]:
    if not isinstance(widths, list) or not widths:
        raise WeightsError(f"config.json: {key} must be a non-empty list of integers, got {widths!r}")
    return tuple(_int(w, f"every {key} entry") for w in widths)


def _patch_size(value: Any) -> int:
    sizes = value if isinstance(value, list) else [value, value]
    if len(sizes) != 2 or _int(sizes[0], "patch_size") != _int(sizes[1], "patch_size"):
        raise WeightsError(f"config.json: patch_size {value!r} is unsupported (only square patches)")
    return _int(sizes[0], "patch_size")


def _flux2_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The AutoencoderKLFlux2 keys as ours: the patch size, the decoder's own widths (its small decoder's), and
    none of the factors its pipelines ignore."""
    v = {**_FLUX2_DEFAULTS, **d}
    dec = v["decoder_block_out_channels"]
    patch = _patch_size(v["patch_size"])
    exact = d.get("_klvae_latents_mean")
    if isinstance(exact, list) and len(exact) != _int(v["latent_channels"], "latent_channels") * patch * patch:
        raise WeightsError(f"config.json: patch_size {v['patch_size']} does not fit the {len(exact)} latent "
                           f"statistics klvae saved for {v['latent_channels']} latent channels")
    ignored = [k for k in _FLUX2_UNUSED if d.get(k) is not None]
    if ignored:
        log.warning("config.json: %s ignored, as FLUX.2's pipelines do (its latent BatchNorm normalises)",
                    ", ".join(ignored))
    return {**{k: v[k] for k in ("latent_channels", "block_out_channels", "layers_per_block", "sample_size",
                                 "down_block_types", "up_block_types")},
            **{ours: d.get(key) for key, ours in _EXACT_STATS.items()},
            "latent_patch_size": patch, "scaling_factor": 1.0, "shift_factor": None,
            "decoder_block_out_channels": None if dec is None else _widths(dec, "decoder_block_out_channels")}


def batch_norm_eps(d: dict[str, Any]) -> float:
    """The epsilon FLUX.2's pipelines add to the latent BatchNorm's variance (BFL's 1e-4 unless `d` says)."""
    eps = d.get("batch_norm_eps", _FLUX2_DEFAULTS["batch_norm_eps"])
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps < 1:
        raise WeightsError(f"config.json: batch_norm_eps must be a number in [0, 1), got {eps!r}")
    return float(eps)


def config_from_diffusers(d: dict[str, Any]) -> AutoencoderKLConfig:
    """Our config from a diffusers AutoencoderKL(Flux2) config dict; WeightsError for what the model cannot build."""
    cls = d.get("_class_name", "AutoencoderKL")
    if cls not in ("AutoencoderKL", FLUX2_CLASS):
        raise WeightsError(f"config.json describes a {cls}, not an AutoencoderKL")
    if d.get("act_fn", "silu") != "silu":
        raise WeightsError(f"config.json: act_fn {d['act_fn']!r} is unsupported (only 'silu')")
    flux2 = _flux2_fields(d) if cls == FLUX2_CLASS else {}
    unknown = sorted(set(d) - set(_DIFFUSERS_DEFAULTS) - _IGNORED - (set(_FLUX2_DEFAULTS) if flux2 else set()))
    if unknown:
        log.warning("config.json: ignoring unknown keys %s", ", ".join(unknown))
    v = {k: d.get(k, default) for k, default in _DIFFUSERS_DEFAULTS.items()} | flux2
    widths = _widths(v["block_out_channels"])
    _check_block_types(d | {k: v[k] for k in ("down_block_types", "up_block_types") if k in v}, len(widths))
    ints: dict[str, Any] = {k: _int(v[k], k) for k in ("in_channels", "out_channels", "layers_per_block",
                                                       "latent_channels", "norm_num_groups")}
    # The flags and factors pass as they are: AutoencoderKLConfig checks their types and ranges itself.
    same: dict[str, Any] = {k: v[k] for k in ("use_quant_conv", "use_post_quant_conv", "force_upcast",
                                              "scaling_factor", "shift_factor", "latents_mean", "latents_std")}
    if same["shift_factor"] is not None and same["latents_mean"] is not None:
        # diffusers' SDXL-family pipelines, the ones that read latents_mean, never read shift_factor.
        log.warning("config.json sets both shift_factor and latents_mean: using latents_mean/latents_std")
        same["shift_factor"] = None
    try:
        return AutoencoderKLConfig(
            block_out_channels=widths, **ints, **same, norm_eps=_DIFFUSERS_NORM_EPS,
            decoder_block_out_channels=v.get("decoder_block_out_channels"),
            attention="vanilla" if _bool(v["mid_block_add_attention"], "mid_block_add_attention") else "none",
            sample_size=_sample_size(v["sample_size"]), latent_patch_size=v.get("latent_patch_size", 1),
        )
    except (TypeError, ValueError) as e:
        raise WeightsError(f"config.json: {e}") from None


def _sample_size(s: Any) -> int:
    # diffusers allows [H, W]; the tile size we use is square.
    sides = [_int(x, "sample_size") for x in s] if isinstance(s, list) and s else [_int(s, "sample_size")]
    if min(sides) < 1:  # checked side by side: max() would pass [64, 0]
        raise WeightsError(f"config.json: sample_size must be a positive integer or [H, W] of them, got {s!r}")
    return max(sides)


# The way out for what a diffusers config cannot express (the CLI names its own).
LDM_HINT = "; use export_ldm instead"


def config_to_diffusers(cfg: AutoencoderKLConfig) -> dict[str, Any]:
    """A diffusers AutoencoderKL config dict for `cfg` (AutoencoderKLFlux2 with latent patches); WeightsError for
    what diffusers cannot express."""
    if cfg.attention == "linear":
        raise WeightsError(f"attention 'linear' cannot be expressed in a diffusers config{LDM_HINT}")
    if cfg.norm_eps != _DIFFUSERS_NORM_EPS:
        raise WeightsError(f"norm_eps {cfg.norm_eps} cannot be expressed in a diffusers config (fixed at 1e-6)"
                           f"{LDM_HINT}")
    from klvae import __version__

    n = len(cfg.block_out_channels)
    d = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",  # the oldest release that reads every key below
        "_klvae_version": __version__,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.sample_size,
        **cfg.latent_norm.to_dict(),
        "force_upcast": cfg.force_upcast,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.attention == "vanilla",
    }
    p = d.pop("latent_patch_size")
    if p == 1:
        if cfg.decoder_block_out_channels is not None:
            raise WeightsError("decoder_block_out_channels cannot be expressed in diffusers' AutoencoderKL config "
                               f"(only AutoencoderKLFlux2 has them){LDM_HINT}")
        return d
    if cfg.decoder_block_out_channels is not None:
        d["decoder_block_out_channels"] = list(cfg.decoder_block_out_channels)
    check_flux2_format(cfg)
    # The statistics travel as the weights' bn.* buffers (weights.latent_bn), and exactly as private keys.
    for key in (*_FLUX2_UNUSED, "force_upcast"):
        d.pop(key)
    d |= {key: list(getattr(cfg, ours)) for key, ours in _EXACT_STATS.items() if getattr(cfg, ours) is not None}
    return d | {"_class_name": FLUX2_CLASS, "_diffusers_version": "0.36.0",  # the first release with the class
                **{k: _FLUX2_DEFAULTS[k] for k in ("batch_norm_eps", "batch_norm_momentum")}, "patch_size": [p, p]}


def read_config_json(path: str | Path) -> AutoencoderKLConfig:
    """Our config from a diffusers config.json file."""
    return config_from_diffusers(read_json_object(path))


# Far above any config.json or shard index (kilobytes): more is read into memory for nothing but an error.
MAX_JSON_BYTES = 16 * 2**20


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A config.json's (or a shard index's) object; WeightsError when it is unreadable, huge or no object."""
    path = Path(path)
    try:
        if (size := path.stat().st_size) > MAX_JSON_BYTES:
            raise WeightsError(f"{path} is {size:,} bytes, too large to be a model's JSON (at most "
                               f"{MAX_JSON_BYTES:,})")
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, an int of 5000 digits
        raise WeightsError(f"cannot read {path}: {e}") from None
    except RecursionError:
        raise WeightsError(f"cannot read {path}: its JSON is nested too deeply to be a config") from None
    if not isinstance(d, dict):
        raise WeightsError(f"{path} is not a JSON object")
    return d
