"""What a weights file is when it is not a whole KL autoencoder: a diffusion model alone, TAESD, a lone decoder or
encoder. One line naming the file, what it holds and what to load instead, before any config is guessed."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from klvae.errors import WeightsError
from klvae.weights.convert import StateDict, drop_training_keys, strip_prefix

# Keys that only a diffusion model (LDM UNet, diffusers UNet, MMDiT/FLUX transformers) has.
_DIFFUSION_HINTS = ("model.diffusion_model.", "time_embedding.", "time_embed.", "double_blocks.", "joint_blocks.",
                    "transformer_blocks.", "input_blocks.")
# TAESD: diffusers' AutoencoderTiny (encoder.layers.N...), or madebyollin's bare nn.Sequential (N.conv.0.weight).
_TAESD = re.compile(r"^(?:encoder|decoder)\.layers\.\d+\.")
_NUMBERED = re.compile(r"^\d+\.")
# FLUX.2's latent channels: a lone decoder of that width is BFL's small decoder, which ships whole beside it.
_FLUX2_LATENT_CHANNELS = 32


def _first(keys: Iterable[str], shown: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


def _no_vae(path: Path, keys: list[str]) -> str:
    if any(k.startswith(_DIFFUSION_HINTS) for k in keys):
        return (f"{path} holds a diffusion model (UNet or transformer: {_first(keys)}) and no VAE: load the VAE's "
                "own file (e.g. sdxl_vae.safetensors, ae.safetensors), or a full checkpoint that has one "
                "(first_stage_model.* keys)")
    if keys and all(_NUMBERED.match(k) for k in keys):
        return (f"{path} holds a bare numbered network ({_first(keys)}), as TAESD's taesd_decoder.pth does, not "
                "a KL autoencoder (encoder.*/decoder.* keys); load the VAE itself")
    return (f"{path} holds no VAE weights: none of its keys start with encoder. or decoder. "
            f"(first keys: {_first(keys) or 'none'})")


def _taesd(path: Path, keys: list[str]) -> str:
    return (f"{path} is a TAESD (tiny autoencoder) file ({_first(keys)}): another architecture, not the KL "
            "autoencoder klvae loads; load the VAE whose latents it approximates")


def _lone_half(path: Path, sd: StateDict, half: str) -> str:
    n = sum(k.startswith(half) or k.startswith("post_quant_conv." if half == "decoder." else "quant_conv.")
            for k in sd)
    conv_in = sd.get("decoder.conv_in.weight")
    what = "decoder" if half == "decoder." else "encoder"
    text = (f"{path} holds only a VAE {what} ({n} tensors under {half}*, none of the "
            f"{'encoder' if what == 'decoder' else 'decoder'}): klvae loads whole autoencoders, which encode, "
            "decode, train and convert alike; load the full VAE file it belongs to")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == _FLUX2_LATENT_CHANNELS:
        text += (" (FLUX.2's small decoder ships whole as full_encoder_small_decoder.safetensors in "
                 "black-forest-labs/FLUX.2-small-decoder: --model flux2-small-decoder fetches it)")
    return text


def may_be_vae_key(key: object) -> bool:
    """Whether a tensor name may be a VAE's, under any prefix or wrapper: it holds encoder. or decoder."""
    return isinstance(key, str) and ("encoder." in key or "decoder." in key)


def check_may_be_vae(path: Path, keys: list[str]) -> None:
    """WeightsError saying what the file is when none of its tensor names (a safetensors header's) is a VAE's:
    found before a tensor is read, which for a 23 GB diffusion model is the memory it would take."""
    if keys and not any(map(may_be_vae_key, keys)):  # none at all: read_weights says so
        raise WeightsError(_no_vae(path, keys))


def check_is_vae(path: Path, tensors: StateDict, all_keys: list[str]) -> None:
    """WeightsError saying what the file is, when its tensors (as read: a full checkpoint's VAE part) are a
    diffusion model's, TAESD's, or one half of an autoencoder; silent for anything that may be a KL autoencoder."""
    sd = drop_training_keys(strip_prefix(tensors))
    if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
        raise WeightsError(_no_vae(path, all_keys))
    if any(_TAESD.match(k) for k in sd):
        raise WeightsError(_taesd(path, list(sd)))
    has_encoder = any(k.startswith("encoder.") for k in sd)
    has_decoder = any(k.startswith("decoder.") for k in sd)
    if has_decoder and not has_encoder:
        raise WeightsError(_lone_half(path, sd, "decoder."))
    if has_encoder and not has_decoder:
        raise WeightsError(_lone_half(path, sd, "encoder."))
