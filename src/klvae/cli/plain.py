"""`klvae decode z.safetensors|z.pt|z.npy`: a plain tensor of latents (see klvae.latents.plain)."""

from __future__ import annotations

import argparse
import logging

from torch import Tensor

from klvae.cli.codec import check_clashes, check_items, unique_png_names, write_pngs
from klvae.cli.common import check_output_path, load_model, tiling_from_args
from klvae.errors import KlvaeError
from klvae.latents.file import LatentItem, batch_item_names, batch_latents_file
from klvae.latents.plain import load_plain_latents, plain_batch
from klvae.model.latent_norm import LatentNorm

log = logging.getLogger("klvae")


def decode_plain(args: argparse.Namespace) -> int:
    """Decode each latent of a plain tensor file to out/<file stem>_NN.png, read as the diffusion model's (scaled)
    latents, or with --unscaled as the VAE's own; checked whole before any is written."""
    t = load_plain_latents(args.latents)
    out = check_output_path(args.output, folder=True)
    item_names = batch_item_names(args.latents, t.shape[0] if t.ndim == 4 else 1)
    names = unique_png_names([LatentItem(name=n, key=n, height=1, width=1) for n in item_names])
    check_clashes(out, names, args.overwrite)
    tiling = tiling_from_args(args)
    vae, _, dtype = load_model(args)
    norm = LatentNorm() if args.unscaled else vae.config.latent_norm
    _check_reading(t, vae.config.latent_channels, vae.config.latent_norm.latent_patch_size, args)
    t = plain_batch(t, vae.config.latent_channels * norm.latent_patch_size ** 2, args.latents)
    # Read the wrong way the pictures come out washed out or noisy, not as an error: say which way was taken.
    log.info("%s holds a plain tensor %s, with no record of its scaling: read as %s", args.latents, list(t.shape),
             "the VAE's own latents (--unscaled)" if args.unscaled else
             "the diffusion model's latents, scaled by the model's factors (add --unscaled for vae.encode's)")
    cell = vae.downsample_factor * norm.latent_patch_size
    lf = batch_latents_file(t.float(), item_names, norm, cell, str(args.model))
    check_items(vae, lf, args.latents)
    write_pngs(vae, lf, names, out, dtype, tiling, args.latents, args.overwrite)
    log.info("decoded %d image(s) to %s", len(names), out)
    return 0


def _check_reading(t: Tensor, channels: int, patch: int, args: argparse.Namespace) -> None:
    """Refuse a FLUX.2 tensor read the other way: its channels (c unscaled, c x p x p patched and scaled) show it."""
    got = t.shape[1] if t.ndim == 4 else t.shape[0] if t.ndim == 3 else None
    if patch == 1 or got is None:
        return
    if args.unscaled and got == channels * patch**2:
        raise KlvaeError(f"{args.latents} holds {got}-channel latents, this model's scaled {patch}x{patch} patches, "
                         f"not its own {channels}-channel ones: drop --unscaled")
    if not args.unscaled and got == channels:
        raise KlvaeError(f"{args.latents} holds {got}-channel latents, this model's own (vae.encode's), not its "
                         f"scaled {patch}x{patch} patches of {channels * patch**2}: add --unscaled")
