"""Options and helpers that several commands share: the model, the device and the dtype."""

from __future__ import annotations

import argparse
import logging

import torch

from klvae.inference.precision import resolve_device, resolve_dtype
from klvae.inference.speed import SpeedOptions, optimize_for_inference
from klvae.inference.tiling import TileOptions
from klvae.model.autoencoder import AutoencoderKL

log = logging.getLogger("klvae")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--config/--device/--dtype/--batch-size/--compile/--no-fused-norm."""
    p.add_argument("--model", "-m", default=None,
                   help="a diffusers folder, a .safetensors/.ckpt file, a hub id, a preset name (sd15, sdxl, ...) "
                        "whose released weights come from the hub, or 'demo' (the default: klvae's small built-in "
                        "model, which runs offline)")
    p.add_argument("--subfolder", default=None, help="subfolder of a pipeline folder or hub repo (e.g. vae)")
    p.add_argument("--config", default=None,
                   help="preset whose config (and factors) a single weights file uses, e.g. sdxl")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp32), fp32, bf16, fp16")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and decoder (GPU speed; the first batch of each size compiles)")
    p.add_argument("--no-fused-norm", dest="fused_norm", action="store_false", default=None,
                   help="on a GPU, run GroupNorm and SiLU with PyTorch's ops instead of klvae's Triton kernels")


def load_model(args: argparse.Namespace) -> tuple[AutoencoderKL, torch.device, torch.dtype]:
    """The model named by --model on --device, with the compute dtype from --dtype."""
    if args.batch_size is not None and args.batch_size < 1:
        from klvae.errors import KlvaeError

        raise KlvaeError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model is None:
        args.model = "demo"
        log.info("no --model given: using klvae's built-in demo model (a small VAE trained by klvae, "
                 "not Stable Diffusion's; see docs/demo-model.md)")
    vae = AutoencoderKL.from_pretrained(args.model, subfolder=args.subfolder, config=args.config, device=device)
    log.info("model %s on %s, compute dtype %s", args.model, device, str(dtype).split(".")[-1])
    optimize_for_inference(vae, dtype, SpeedOptions(compile=args.compile, fused_norm=args.fused_norm))
    return vae, device, dtype


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'2GiB', '1.5G', '512M' or a plain byte count -> bytes."""
    import re

    from klvae.errors import KlvaeError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise KlvaeError(f"cannot read the memory size {text!r}; write e.g. 2GiB, 512M or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """--tile-size/--max-memory: exact tiling of large images in bounded device memory."""
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile (strip) height in image pixels; turns exact tiling on")
    p.add_argument("--max-memory", default=None,
                   help="device memory budget, e.g. 2GiB: tiles when the untiled pass would not fit")


def tiling_from_args(args: argparse.Namespace) -> TileOptions | None:
    """The TileOptions that --tile-size/--max-memory describe (None: untiled with the OOM fall-back)."""
    from klvae.errors import KlvaeError

    if args.tile_size is None and args.max_memory is None:
        return None
    if args.tile_size is not None and args.tile_size < 1:
        raise KlvaeError(f"--tile-size must be at least 1, got {args.tile_size}")
    budget = parse_bytes(args.max_memory) if args.max_memory else None
    return TileOptions(tile_size=args.tile_size, max_memory=budget)
