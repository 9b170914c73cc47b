"""Options and helpers that several commands share: the model, the device and the dtype."""

from __future__ import annotations

import argparse
import logging

import torch

from klvae.inference.precision import resolve_device, resolve_dtype
from klvae.model.autoencoder import AutoencoderKL

log = logging.getLogger("klvae")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--config/--device/--dtype/--batch-size."""
    p.add_argument("--model", "-m", required=True,
                   help="a diffusers folder, a .safetensors/.ckpt file, a hub id, or a preset name (sd15, sdxl, ...)")
    p.add_argument("--subfolder", default=None, help="subfolder of a pipeline folder or hub repo (e.g. vae)")
    p.add_argument("--config", default=None,
                   help="preset whose config (and factors) a single weights file uses, e.g. sdxl")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp32), fp32, bf16, fp16")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")


def load_model(args: argparse.Namespace) -> tuple[AutoencoderKL, torch.device, torch.dtype]:
    """The model named by --model on --device, with the compute dtype from --dtype."""
    if args.batch_size is not None and args.batch_size < 1:
        from klvae.errors import KlvaeError

        raise KlvaeError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder=args.subfolder, config=args.config, device=device)
    log.info("model %s on %s, compute dtype %s", args.model, device, str(dtype).split(".")[-1])
    return vae, device, dtype
