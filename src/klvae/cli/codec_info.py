"""`klvae info`: a model's config, factors, parameter counts, and the dtype its weights are stored in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from klvae.cli.common import NO_WEIGHTS, default_model, preset_on_meta, preset_to_describe
from klvae.model.autoencoder import AutoencoderKL
from klvae.weights.load import WeightsSource, load_source, locate
from klvae.weights.stored_dtype import stored_values


def describe(vae: AutoencoderKL, model: str) -> dict:
    """The model's config, factors and parameter counts as a plain dict."""
    return {"model": model, "config": vae.config.to_dict(), "parameters": vae.num_parameters(),
            "downsample_factor": vae.downsample_factor}


def stored_dtype(path: Path) -> str:
    """The dtype a weights file stores the VAE in, e.g. 'fp16'; a mix names the minority, e.g. 'fp16 (fp32 for
    0.1 % of the values)'."""
    counts = stored_values(path)
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
