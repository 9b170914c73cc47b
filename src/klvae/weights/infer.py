"""An AutoencoderKLConfig from the tensor shapes of a diffusers-layout state dict, and the check that they fit one.

Shapes give the architecture but not everything:
- norm_num_groups leaves no trace in a GroupNorm's [C] weights: 32 is assumed (every released VAE), or the
  largest of 32/16/8/4/2/1 that divides all widths.
- the latent factors are no architecture at all. 4 latent channels -> SD 1.x's (0.18215); 16 latent channels
  -> FLUX's (0.3611, shift 0.1159), since FLUX's ae.safetensors is the 16-channel VAE most often met as a lone
  file, while SD3's comes with a config.json or inside a full checkpoint whose other keys name it (see
  `guess_family`). 32 latent channels -> FLUX.2's 2x2 latent patches, whose statistics come with its weights
  (bn.*, see weights.latent_bn; a file with them names the family itself). Any other count -> 1.0. A warning
  asks the user to pass config="sdxl" etc. when guessed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import Tensor

from klvae.errors import WeightsError
from klvae.model.config import MAX_LAYERS, MAX_LEVELS, PRESETS, AutoencoderKLConfig, inferring, single_channel_groups
from klvae.weights.convert import indices

log = logging.getLogger(__name__)

# Fields that the tensor shapes determine; everything else is a convention or a statistic.
ARCH_FIELDS = (
    "in_channels", "out_channels", "block_out_channels", "decoder_block_out_channels", "layers_per_block",
    "latent_channels",
    "use_quant_conv", "use_post_quant_conv", "attention",
)

# Keys of the rest of a full checkpoint that tell which model the VAE came with (checked in this order).
_FAMILY_HINTS = (
    ("edm_mean", "playground25"),  # Playground v2.5: SDXL's keys, its latents normalised per channel (EDM)
    ("model.diffusion_model.joint_blocks.", "sd3"),
    ("model.diffusion_model.double_blocks.", "flux"),
    ("double_blocks.", "flux"),
    ("conditioner.embedders.", "sdxl"),
    ("cond_stage_model.model.", "sd2"),  # OpenCLIP text encoder
    ("cond_stage_model.transformer.", "sd15"),  # CLIP ViT-L text encoder
)


def guess_family(keys: Iterable[str]) -> str | None:
    """The preset whose full checkpoint has these keys (SD3, FLUX, SDXL, SD2, SD1.x), or None."""
    keys = list(keys)
    for prefix, name in _FAMILY_HINTS:
        if any(k.startswith(prefix) for k in keys):
            return name
    return None


# Words in a lone VAE file's name that tell its family where shapes cannot (SDXL's VAE is SD's network, SD3's is
# FLUX.1's): sdxl_vae.safetensors, sd3_vae.safetensors ... Each starts a word (not "ssd1b", SSD-1B's SDXL VAE, as
# sd1; nor "influx"), separators inside it optional (sd_xl, sd-1.5); Playground v2 (SDXL's factors) is no v2.5,
# nor its 512px repo's playground-v2-512px.
_SEP = r"[-_. ]?"
# A version is its major digit and at most one minor one (sd1.5, sd21, flux2): sd_1024px and flux_2024 name no version.
_V = rf"(?:{_SEP}\d)?(?!\d)"
_NAME_HINTS = tuple((re.compile(rf"(?<![a-z]){word}"), family) for word, family in (
    (rf"playground{_SEP}v?2{_SEP}5(?!\d)", "playground25"), (rf"sd{_SEP}xl", "sdxl"), (rf"sd{_SEP}3{_V}", "sd3"),
    (rf"flux{_SEP}2{_V}", "flux2"), ("flux", "flux"), (rf"sd{_SEP}2{_V}", "sd2"), (rf"sd{_SEP}1{_V}", "sd15"),
    (rf"vae{_SEP}ft{_SEP}(?:mse|ema)", "sd15"),
))


def family_from_name(filename: str) -> str | None:
    """The preset a weights file's name points to (sdxl_vae.safetensors -> 'sdxl'), None when none or several."""
    stem = filename.lower().rsplit(".", 1)[0]
    found = {family for word, family in _NAME_HINTS if word.search(stem)}
    if "flux2" in found:
        found.discard("flux")
    return found.pop() if len(found) == 1 else None


def with_edm_stats(cfg: AutoencoderKLConfig, extras: dict[str, Tensor], name: str) -> AutoencoderKLConfig:
    """`cfg` with the per-channel latent statistics a full Playground v2.5 checkpoint carries (edm_mean/edm_std
    beside its VAE, as diffusers' single-file loader reads them); unchanged without them."""
    if "edm_mean" not in extras or "edm_std" not in extras:
        return cfg
    if not all(_plain_float(extras[k]) for k in ("edm_mean", "edm_std")):
        log.warning("%s: edm_mean/edm_std are not plain float tensors: ignored", name)
        return cfg
    mean, std = (extras[k].detach().double().flatten() for k in ("edm_mean", "edm_std"))
    if len(mean) != cfg.latent_channels or len(std) != len(mean):
        log.warning("%s: edm_mean/edm_std have %d/%d entries, not one per latent channel (%d): ignored", name,
                    len(mean), len(std), cfg.latent_channels)
        return cfg
    try:
        return cfg.replace(latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()), shift_factor=None)
    except ValueError as e:  # not finite, a std of 0 ...
        raise WeightsError(f"{name}: its edm_mean/edm_std are no latent statistics: {e}") from None


def _plain_float(t: Tensor) -> bool:
    """A dense floating-point tensor with values: not quantized, nested, sparse, meta, integer or complex."""
    return (t.is_floating_point() and not (t.is_quantized or t.is_nested or t.is_meta)
            and t.layout == torch.strided)


def _shape(sd: dict[str, Tensor], key: str) -> tuple[int, ...]:
    """The shape of the convolution weight `key`: [out, in, kh, kw]."""
    if key not in sd:
        raise WeightsError(f"cannot infer the config: the weights have no {key}")
    shape = tuple(sd[key].shape)
    if len(shape) != 4:
        raise WeightsError(f"cannot infer the config: {key} has shape {list(shape)}, not a convolution's "
                           "[out, in, height, width]")
    return shape


def _attention(sd: dict[str, Tensor], side: str) -> str:
    prefix = f"{side}.mid_block.attentions.0."
    if prefix + "to_q.weight" in sd:
        return "vanilla"
    if prefix + "to_qkv.weight" in sd:
        return "linear"
    return "none"


def _groups(widths: tuple[int, ...]) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in widths))


def _count(sd: dict[str, Tensor], prefix: str, most: int) -> int:
    """How many of `prefix`.N the keys hold, numbered 0..N-1; WeightsError for a gap or more than `most`."""
    found = indices(sd, "^" + re.escape(prefix) + r"\.(\d+)\.")
    n = len(found)
    if found and max(found) != n - 1:
        gap = next(i for i in range(n + 1) if i not in found)
        raise WeightsError(
            f"cannot infer the config: the weights have {prefix}.{max(found)}.* but no {prefix}.{gap}.*"
        )
    if n > most:
        raise WeightsError(f"cannot infer the config: {n} {prefix}.* in the weights, more than any VAE has "
                           f"(at most {most})")
    return n


def infer_architecture(sd: dict[str, Tensor]) -> dict[str, object]:
    """The ARCH_FIELDS (plus norm_num_groups, assumed) that a diffusers-layout state dict's shapes imply."""
    levels = _count(sd, "encoder.down_blocks", MAX_LEVELS)
    if levels == 0:
        raise WeightsError("cannot infer the config: the weights have no encoder.down_blocks.* keys")
    widths = tuple(_shape(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    layers = _count(sd, "encoder.down_blocks.0.resnets", MAX_LAYERS)
    dec_levels = _count(sd, "decoder.up_blocks", MAX_LEVELS)
    if dec_levels != levels:
        raise WeightsError(f"unsupported weights: {levels} encoder levels but {dec_levels} decoder levels")
    # up_blocks.0 is the deepest level: reversed, the widths line up with the encoder's.
    dec_widths = tuple(_shape(sd, f"decoder.up_blocks.{i}.resnets.0.conv1.weight")[0]
                       for i in reversed(range(levels)))
    dec_layers = _count(sd, "decoder.up_blocks.0.resnets", MAX_LAYERS + 1)
    if dec_layers != layers + 1:
        raise WeightsError(
            f"unsupported weights: {layers} ResNet blocks per encoder level but {dec_layers} per decoder level "
            f"(expected {layers + 1})"
        )
    attention, dec_attention = _attention(sd, "encoder"), _attention(sd, "decoder")
    if dec_attention != attention:
        raise WeightsError(f"unsupported weights: encoder attention {attention!r}, decoder {dec_attention!r}")
    return {
        "in_channels": _shape(sd, "encoder.conv_in.weight")[1],
        "out_channels": _shape(sd, "decoder.conv_out.weight")[0],
        "block_out_channels": widths,
        "decoder_block_out_channels": None if dec_widths == widths else dec_widths,
        "layers_per_block": layers,
        "latent_channels": _shape(sd, "decoder.conv_in.weight")[1],
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "attention": attention,
        "norm_num_groups": _groups(widths + dec_widths),
    }


def infer_config(sd: dict[str, Tensor], family: str | None = None,
                 named: tuple[str, str] | None = None) -> AutoencoderKLConfig:
    """A config from the shapes of diffusers-layout weights; factors from `family` (a preset), else from `named`
    (the preset a file's name points to, and that name) where its latent channels fit, else guessed."""
    arch = infer_architecture(sd)
    if named is not None and PRESETS[named[0]].latent_channels != arch["latent_channels"]:
        named = None
    if family is not None:
        base, guessed = PRESETS[family], False
    elif named is not None:
        base, guessed = PRESETS[named[0]], True
    elif arch["latent_channels"] == 4:
        base, guessed = PRESETS["sd15"], True
    elif arch["latent_channels"] == 16:
        base, guessed = PRESETS["flux"], True
    elif arch["latent_channels"] == 32:  # FLUX.2's, whose statistics come with its weights (weights.latent_bn)
        base, guessed = PRESETS["flux2"], True
    else:
        base, guessed = AutoencoderKLConfig(scaling_factor=1.0, force_upcast=False), True
    try:
        with inferring():  # norm_num_groups is a guess: the note below words its warning as one
            cfg = base.replace(**arch)
    except ValueError as e:  # shapes no config allows: widths beyond the parameter cap, 0 channels ...
        raise WeightsError(f"cannot infer the config: {e}") from None
    groups = f"norm_num_groups assumed {cfg.norm_num_groups}"
    if (w := single_channel_groups(cfg)) is not None:
        # The guess, not the user, chose a count that leaves each channel alone: say so instead of advising.
        groups += (f", a guess that leaves one channel per GroupNorm group at width {w}: if the model was trained "
                   "with fewer groups, pass its config")
    if guessed:
        how = "guessed" if named is None else f"of {named[0]!r}, after the file's name {named[1]}"
        log.warning(
            "config inferred from the weights' shapes (%s); latent factors %s (scaling %s, shift %s): pass "
            "config='sdxl', 'sd3', 'flux' ... (--config on the command line) if the weights belong to another model",
            groups, how, cfg.scaling_factor, cfg.shift_factor,
        )
    else:
        (log.info if w is None else log.warning)("config inferred from the weights' shapes (%s), factors of %s",
                                                 groups, family)
    return cfg


def check_fits(sd: dict[str, Tensor], config: AutoencoderKLConfig, name: str) -> None:
    """WeightsError naming every architecture field where the weights' shapes and `config` disagree."""
    try:
        arch = infer_architecture(sd)
    except WeightsError:
        return  # too broken to infer from: strict loading names the offending keys instead
    diffs = [
        f"{f} {_fmt(arch[f])} in the weights vs {_fmt(getattr(config, f))} in the config"
        for f in ARCH_FIELDS
        if arch[f] != getattr(config, f)
    ]
    if diffs:
        raise WeightsError(f"the weights do not fit config {name}: " + "; ".join(diffs))


def _fmt(v: object) -> str:
    return str(list(v)) if isinstance(v, tuple) else str(v)
