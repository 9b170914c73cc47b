"""State-dict layouts of the KL autoencoder and pure conversions between them (state_dict -> state_dict).

Layouts: "diffusers" (what AutoencoderKL's own keys are), "diffusers_legacy" (diffusers before 0.14: attention
as query/key/value/proj_attn) and "ldm" (CompVis/SAI checkpoints: encoder.down.N.block.M, mid.attn_1.q ...;
BFL's FLUX.2 ae.safetensors is LDM with its quant convs inside the encoder and decoder and a latent BatchNorm).
Converters rename the keys they know and pass every other key through untouched, so that strict loading can name
a stray key exactly as the checkpoint spells it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Literal

from torch import Tensor

from klvae.errors import WeightsError

log = logging.getLogger(__name__)

Layout = Literal["diffusers", "diffusers_legacy", "ldm"]
StateDict = dict[str, Tensor]

# Prefixes under which a VAE sits inside a larger checkpoint (full SD checkpoints, ComfyUI bundles).
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# LDM training state that rides along in autoencoder checkpoints but is no part of the network.
TRAINING_PREFIXES = ("loss.", "model_ema.")

_LDM_SIGNATURE = re.compile(r"^(encoder\.(down\.\d+|mid\.|norm_out)|decoder\.(up\.\d+|mid\.|norm_out))")
_LEGACY_SIGNATURE = re.compile(r"\.attentions\.\d+\.(query|key|value|proj_attn)\.")

# Vanilla attention: LDM 1x1-conv names -> diffusers Linear names. Linear attention keeps its names.
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DIFFUSERS_ATTN = {v: k for k, v in _LDM_ATTN.items()}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LINEAR_WEIGHTS = ("to_q", "to_k", "to_v", "to_out.0")


def detect_layout(sd: StateDict) -> Layout:
    """Which layout the (prefix-free) keys of `sd` are in; WeightsError when they are no autoencoder's."""
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        shown = ", ".join(list(sd)[:5]) or "none"
        raise WeightsError(f"not a KL autoencoder state dict: no encoder./decoder. keys (first keys: {shown})")
    if any(_LDM_SIGNATURE.match(k) for k in sd):
        return "ldm"
    if any(_LEGACY_SIGNATURE.search(k) for k in sd):
        return "diffusers_legacy"
    return "diffusers"


def vae_names(keys: Iterable[str]) -> tuple[dict[str, str], str]:
    """{key as stored: its name without wrappers and prefix} for the VAE's keys, and the full checkpoint's prefix
    they had ("" for none): module. and _orig_mod. seen through, first_stage_model./vae. (other keys dropped)."""
    names = {k: k for k in keys}
    # Until none is left, in either order: torch.compile(DDP(model)) saves _orig_mod.module.*, DDP(compile(...))
    # module._orig_mod.*.
    while names and (w := next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) for n in names.values())), None)):
        names = {k: n[len(w):] for k, n in names.items()}
    prefix = next((p for p in VAE_PREFIXES if any(n.startswith(p) for n in names.values())), "")
    return {k: n[len(prefix):] for k, n in names.items() if n.startswith(prefix)}, prefix


def strip_prefix(sd: StateDict) -> StateDict:
    """The VAE part of `sd` without its prefix: first_stage_model./vae. (other keys dropped), module., _orig_mod."""
    names, prefix = vae_names(sd)
    if len(names) < len(sd):
        log.info("kept the %d %s* keys, ignored %d others", len(names), prefix, len(sd) - len(names))
    return {n: sd[k] for k, n in names.items()}


def drop_training_keys(sd: StateDict) -> StateDict:
    """`sd` without LDM training state (loss.*: discriminator, LPIPS, logvar; model_ema.*)."""
    out = {k: v for k, v in sd.items() if not k.startswith(TRAINING_PREFIXES)}
    if len(out) < len(sd):
        log.info("dropped %d training-only keys (loss.*, model_ema.*)", len(sd) - len(out))
    return out


def _squeeze_linear(key: str, t: Tensor) -> Tensor:
    # Attention projections stored as 1x1 convs ([C, C, 1, 1]) or conv1d ([C, C, 1]) become Linear [C, C]; any
    # other shape stays as it is, for strict loading to name as a shape mismatch.
    if (key.rsplit(".", 1)[0].endswith(_LINEAR_WEIGHTS) and key.endswith(".weight") and t.ndim > 2
            and all(s == 1 for s in t.shape[2:])):
        return t.reshape(t.shape[0], t.shape[1])
    return t


def indices(sd: StateDict, pattern: str) -> set[int]:
    """The indices that `pattern`'s first group captures in the keys: of levels, blocks, layers."""
    return {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}


def count_indices(sd: StateDict, pattern: str) -> int:
    """1 + the largest index `pattern`'s first group captures in any key (0 if none): levels, blocks, layers."""
    idx = indices(sd, pattern)
    return max(idx) + 1 if idx else 0


def _ldm_key(key: str, n_up: int) -> str:
    """One LDM key in diffusers naming (unknown keys unchanged)."""
    if m := re.match(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"
    if m := re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.match(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$", key):
        i = n_up - 1 - int(m[1])  # LDM builds the decoder levels from the bottom up
        return f"decoder.up_blocks.{i}.resnets.{m[2]}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"
    if m := re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$", key):
        return f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3].replace('nin_shortcut', 'conv_shortcut')}"
    if m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", key):
        return f"{m[1]}.mid_block.attentions.0.{_LDM_ATTN[m[2]]}.{m[3]}"
    if m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(to_qkv|to_out)\.(weight|bias)$", key):
        return f"{m[1]}.mid_block.attentions.0.{m[2]}.{m[3]}"
    if m := re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    if m := re.match(r"^(encoder\.quant_conv|decoder\.post_quant_conv)\.(.+)$", key):  # BFL's FLUX.2 layout
        return f"{m[1].split('.')[1]}.{m[2]}"
    return key


def _diffusers_key(key: str, n_up: int, bfl: bool) -> str:
    """One diffusers key in LDM naming (unknown keys unchanged)."""
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        i = n_up - 1 - int(m[1])
        return f"decoder.up.{i}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)$",
                     key):
        return f"{m[1]}.mid.attn_1.{_DIFFUSERS_ATTN[m[2]]}.{m[3]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_qkv|to_out)\.(weight|bias)$", key):
        return f"{m[1]}.mid.attn_1.{m[2]}.{m[3]}"
    if m := re.match(r"^(encoder|decoder)\.conv_norm_out\.(.+)$", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if bfl and (m := re.match(r"^(quant_conv|post_quant_conv)\.(.+)$", key)):
        return f"{'encoder' if m[1] == 'quant_conv' else 'decoder'}.{m[1]}.{m[2]}"
    return key


def ldm_to_diffusers(sd: StateDict) -> StateDict:
    """LDM keys -> diffusers keys; attention 1x1-conv weights become Linear weights."""
    n_up = count_indices(sd, r"^decoder\.up\.(\d+)\.")
    out: StateDict = {}
    for k, v in sd.items():
        new = _ldm_key(k, n_up)
        out[new] = _squeeze_linear(new, v)
    return out


def diffusers_to_ldm(sd: StateDict) -> StateDict:
    """Diffusers keys -> LDM keys; attention Linear weights become 1x1-conv weights [C, C, 1, 1]. With FLUX.2's
    latent BatchNorm (bn.*) in `sd`, BFL's layout: the quant convs move into the encoder and the decoder."""
    n_up = count_indices(sd, r"^decoder\.up_blocks\.(\d+)\.")
    bfl = "bn.running_mean" in sd
    out: StateDict = {}
    for k, v in sd.items():
        new = _diffusers_key(k, n_up, bfl)
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", new) and v.ndim == 2:
            v = v[:, :, None, None]
        out[new] = v
    return out


def legacy_to_diffusers(sd: StateDict) -> StateDict:
    """Diffusers < 0.14 attention names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0, squeezed to 2-D."""
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        new = f"{m[1]}.{_LEGACY_ATTN[m[2]]}.{m[3]}" if m else k
        out[new] = _squeeze_linear(new, v)
    return out


def to_diffusers(sd: StateDict) -> StateDict:
    """Any supported checkpoint dict (prefixed, LDM, legacy, with training keys) -> modern diffusers keys."""
    sd = drop_training_keys(strip_prefix(sd))
    layout = detect_layout(sd)
    log.debug("state dict layout: %s", layout)
    if layout == "ldm":
        return ldm_to_diffusers(sd)
    if layout == "diffusers_legacy":
        return legacy_to_diffusers(sd)
    # Some converted checkpoints keep modern names but 1x1-conv shaped attention weights.
    return {k: _squeeze_linear(k, v) for k, v in sd.items()}
