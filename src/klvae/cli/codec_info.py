"""`klvae info`: a model's config, factors, parameter counts, and the dtype its weights are stored in."""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path

import torch

from klvae.cli.common import NO_WEIGHTS, default_model, preset_on_meta, preset_to_describe
from klvae.model.autoencoder import AutoencoderKL
from klvae.weights.convert import VAE_PREFIXES
from klvae.weights.load import WeightsSource, load_source, locate, read_state_dict

# safetensors' dtype codes, and torch's, as --dtype and `convert --dtype` spell them.
_SHORT = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16",
          torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOAT_CODES = ("F", "BF")  # F8_E4M3, F16, BF16 ...: I64 (a BatchNorm's counter) is no weight's dtype


def describe(vae: AutoencoderKL, model: str) -> dict:
    """The model's config, factors and parameter counts as a plain dict."""
    return {"model": model, "config": vae.config.to_dict(), "parameters": vae.num_parameters(),
            "downsample_factor": vae.downsample_factor}


def _safetensors_values(path: Path) -> collections.Counter[str]:
    """Values per stored dtype over the VAE's floating-point tensors, from the header alone (no tensor is read)."""
    from safetensors import safe_open

    counts: collections.Counter[str] = collections.Counter()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        # As loading does: a full SD checkpoint's UNet and text encoder are not the VAE.
        prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in keys)), "")
        for k in keys:
            if k.startswith(prefix):
                part = f.get_slice(k)
                if part.get_dtype().startswith(_FLOAT_CODES):
                    counts[_SHORT.get(part.get_dtype(), part.get_dtype().lower())] += math.prod(part.get_shape())
    return counts


def _pickle_values(path: Path) -> collections.Counter[str]:
    """Values per stored dtype over the VAE's floating-point tensors of a .ckpt/.pt/.bin file."""
    # A pickle has no header to read: its tensors are read again (the VAE's only, as loading reads them).
    counts: collections.Counter[str] = collections.Counter()
    for t in read_state_dict(path).values():
        if t.is_floating_point():
            counts[_SHORT.get(t.dtype, str(t.dtype).removeprefix("torch."))] += t.numel()
    return counts


def stored_dtype(path: Path) -> str:
    """The dtype a weights file stores the VAE in, e.g. 'fp16'; a mix names the minority, e.g. 'fp16 (fp32 for
    0.1 % of the values)'."""
    counts = _safetensors_values(path) if path.suffix.lower() == ".safetensors" else _pickle_values(path)
    if not counts:
        return "none"
    (main, _), *rest = counts.most_common()
    total = sum(counts.values())
    others = ", ".join(f"{name} for {100 * n / total:.2g} % of the values" for name, n in rest)
    return f"{main} ({others})" if others else main


def _load(args: argparse.Namespace) -> tuple[AutoencoderKL, WeightsSource]:
    """The model --model names, on the CPU in fp32 as loading gives it, and the files it came from."""
    source = locate(default_model(args), args.subfolder)
    return load_source(AutoencoderKL, source, config=args.config, device=torch.device("cpu")), source


def info(args: argparse.Namespace) -> tuple[dict, AutoencoderKL]:
    """What `klvae info` shows, as a plain dict, and the model it describes."""
    if preset := preset_to_describe(args):
        # A preset's architecture needs no weights: built on meta, so even flux2's costs no memory or download.
        vae = preset_on_meta(preset)
        return {**describe(vae, preset), "weights": NO_WEIGHTS, "stored_dtype": None}, vae
    vae, source = _load(args)
    return {**describe(vae, str(args.model)), "weights": str(source.weights),
            "stored_dtype": stored_dtype(source.weights)}, vae


def cmd_info(args: argparse.Namespace) -> int:
    """Print the config, parameter counts and the weights' stored dtype."""
    d, vae = info(args)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"model: {d['model']}")
    print(f"weights: {d['weights']}")
    # The weights are computed in --dtype whatever they are stored in: this is the file's own precision.
    print(f"stored dtype: {d['stored_dtype'] or 'none (no weights)'}")
    for k, v in d["config"].items():
        print(f"  {k}: {v}")
    n = d["parameters"]
    print(f"parameters: {n['total']:,} (encoder {n['encoder']:,}, decoder {n['decoder']:,})")
    print(f"downsample factor: {d['downsample_factor']}")
    p = vae.config.latent_patch_size
    if p > 1:
        print(f"diffusion latent: {p}x{p} patches, {vae.config.latent_channels * p * p} channels at "
              f"1/{vae.config.size_multiple} of the image's size")
    return 0
