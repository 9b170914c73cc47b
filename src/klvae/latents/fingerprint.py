"""Hashes of what decides a model's latents: the whole model's (caches and latents files record it), its
encoder's alone, by which `klvae decode` and a cache's resume tell a fine-tune of the same VAE's decoder
(sd-vae-ft-mse style: the same latents) from another VAE, and its factors', which scaled latents bake in."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from klvae.model.autoencoder import AutoencoderKL
from klvae.model.latent_norm import NORM_FIELDS
from klvae.weights.latent_bn import BFL_EPS

# The config fields that shape the encoder and its moments; the others belong to the decoder or to the scaling.
_ENCODER_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                   "norm_eps", "use_quant_conv", "attention")


def model_fingerprint(vae: AutoencoderKL, with_factors: bool = True) -> str:
    """A hash of what decides the latents a model gives: its architecture (and factors) and its weights."""
    cfg = vae.config.to_dict()
    # Fields that do not change a latent; two copies of one model may well differ in them.
    for key in ("sample_size", "force_upcast", *(() if with_factors else NORM_FIELDS)):
        cfg.pop(key, None)
    if cfg.get("latents_mean", 0) is None:
        # Absent, as they were before the field existed: the fingerprints of existing caches stay the same.
        cfg.pop("latents_mean"), cfg.pop("latents_std")
    for key, absent in (("latent_patch_size", 1), ("decoder_block_out_channels", None)):  # likewise
        if key in cfg and cfg[key] == absent:
            cfg.pop(key)
    return _digest(cfg, vae.state_dict().items())


def encoder_fingerprint(vae: AutoencoderKL) -> str:
    """A hash of the encoder alone (its architecture and the weights of `encoder.*` and `quant_conv.*`): equal for
    two models whose unscaled latents are equal, whatever their decoders."""
    cfg = {"part": "encoder", **{k: v for k, v in vae.config.to_dict().items() if k in _ENCODER_FIELDS}}
    return _digest(cfg, ((n, t) for n, t in vae.state_dict().items() if n.startswith(("encoder.", "quant_conv."))))


def factors_fingerprint(vae: AutoencoderKL) -> str:
    """A hash of the scaling a model applies to its latents (scaling_factor, shift_factor, latents_mean/std and the
    latent patch): equal for two models whose `scale_latents` agree on equal latents."""
    norm = vae.config.latent_norm.to_dict()
    if vae.config.latent_patch_size > 1 and norm.get("latents_std") is not None:
        norm.update(_as_bfl_buffers(norm["latents_mean"], norm["latents_std"]))
    return _digest({"part": "factors", **norm}, ())


def _as_bfl_buffers(mean: list[float], std: list[float]) -> dict[str, list[float]]:
    """FLUX.2's statistics as its float32 BatchNorm buffers give them back: one model read from klvae's figures
    (float64, in its header or config) and from BFL's file, which holds only the buffers, hashes alike."""
    m = torch.tensor(mean, dtype=torch.float64).float().double()
    var = (torch.tensor(std, dtype=torch.float64).square() - BFL_EPS).float().double()
    return {"latents_mean": m.tolist(), "latents_std": (var + BFL_EPS).sqrt().tolist()}


def _digest(cfg: dict[str, Any], tensors: Any) -> str:
    h = hashlib.blake2b(json.dumps(cfg, sort_keys=True).encode(), digest_size=16)
    for name, t in sorted(tensors):
        # Rounded to bf16: a GPU run casts the weights to bf16 for speed, and must still match a run in fp32.
        t = t.detach().to(torch.bfloat16) if t.is_floating_point() else t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
