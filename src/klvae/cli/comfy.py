"""`klvae encode -o x.latent` and `klvae decode x.latent`: ComfyUI's latent files (see klvae.latents.comfy)."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import torch

from klvae import inference
from klvae.cli.codec import (
    check_clashes,
    check_finite,
    check_items,
    loaded_images,
    unique_png_names,
    write_pngs,
)
from klvae.cli.common import check_output_path, load_model, tiling_from_args
from klvae.errors import KlvaeError, LatentsError, none_read
from klvae.latents.comfy import (
    comfy_channels,
    comfy_crop,
    comfy_item_names,
    comfy_latents_file,
    load_comfy_latent,
    save_comfy_latent,
    to_comfy,
)
from klvae.latents.file import LatentItem
from klvae.latents.keyed_noise import image_generators
from klvae.model.autoencoder import AutoencoderKL
from klvae.progress import progress_bar

log = logging.getLogger("klvae")


def _batch_size_of(by_size: dict[tuple[int, int], list[Path]], multiple: int, output: str) -> tuple[int, int]:
    """The one (height, width) that every image crops to (KlvaeError naming two that differ, or one too small)."""
    crops: dict[tuple[int, int], tuple[Path, tuple[int, int]]] = {}
    for (h, w), group in by_size.items():
        _, _, ch, cw = comfy_crop(h, w, multiple)
        if ch == 0 or cw == 0:
            raise KlvaeError(f"{group[0]} is {h}x{w} pixels, smaller than one latent cell of this model "
                             f"({multiple}x{multiple}); ComfyUI's VAEEncode would crop it to nothing")
        crops.setdefault((ch, cw), (group[0], (h, w)))
    if len(crops) > 1:
        (pa, a), (pb, b) = list(crops.values())[:2]
        raise KlvaeError(f"--output {output}: a ComfyUI latent is one batch of one size, but {pa} is {a[0]}x{a[1]} "
                         f"and {pb} {b[0]}x{b[1]} (height x width, each side cropped to a multiple of {multiple} as "
                         "ComfyUI's VAEEncode does); encode each size to a .latent of its own")
    (size,) = crops
    cropped = sum(len(g) for s, g in by_size.items() if s != size)
    if cropped:
        log.warning("cropping %d image(s) to %dx%d (height x width), centred, as ComfyUI's VAEEncode does",
                    cropped, *size)
    return size


def _cropped(chunk: list[tuple[Path, torch.Tensor]], size: tuple[int, int], multiple: int, bad: list[Path]
             ) -> list[tuple[Path, torch.Tensor]]:
    """Each image cropped as ComfyUI's VAEEncode does; one whose pixels differ from the size its header gave (a
    file changed since the sizes were read) cannot join the batch, and is skipped and counted like an unreadable
    one."""
    kept = []
    for path, x in chunk:
        top, left, h, w = comfy_crop(x.shape[-2], x.shape[-1], multiple)
        if (h, w) != size:
            log.warning("skipping %s: it loaded as %dx%d, not the size its header gave; it cannot join the batch of "
                        "%dx%d images", path, x.shape[-2], x.shape[-1], *size)
            bad.append(path)
            continue
        kept.append((path, x[:, top:top + h, left:left + w]))
    return kept


def _encode_batch(vae: AutoencoderKL, paths: list[Path], size: tuple[int, int], args: argparse.Namespace,
                  dtype: torch.dtype, tiling: inference.TileOptions | None, bad: list[Path]
                  ) -> tuple[list[Path], torch.Tensor | None]:
    """The images that load, cropped, and their latents in ComfyUI's convention as one batch."""
    f, norm = vae.config.size_multiple, vae.config.latent_norm
    done: list[Path] = []
    parts: list[torch.Tensor] = []
    bad_before = len(bad)
    with progress_bar(total=len(paths), desc="encoding", unit="img") as bar:
        stream = loaded_images(paths, bad)
        while chunk := list(itertools.islice(stream, args.batch_size)):
            if kept := _cropped(chunk, size, f, bad):
                post = inference.encode(vae, torch.stack([t for _, t in kept]), dtype, tiling)
                gens = image_generators(args.seed, [p.name for p, _ in kept])
                z = to_comfy(post.sample(gens) if args.sample else post.mode(), norm).cpu()
                check_finite(z, "latents", kept[0][0] if len(kept) == 1 else f"{kept[0][0]} (or its batch)")
                parts.append(z)
                done += [p for p, _ in kept]
            bar.update(len(done) + len(bad) - bad_before - bar.n)
    return done, torch.cat(parts) if parts else None


def _warn_without_statistics(vae: AutoencoderKL) -> None:
    norm = vae.config.latent_norm
    if norm.latent_patch_size > 1 and norm.latents_mean is None:
        log.warning("this model has latent patches but no latent statistics (FLUX.2's BatchNorm): its latents are "
                    "patched but not normalised, unlike those of ComfyUI's FLUX.2 VAE")


def encode_comfy(args: argparse.Namespace, paths: list[Path], by_size: dict[tuple[int, int], list[Path]],
                 tiling: inference.TileOptions | None, bad: list[Path]) -> int:
    """Encode images of one size to a ComfyUI `.latent`: the posterior's mode (or --sample), unscaled."""
    vae, _, dtype = load_model(args)
    _warn_without_statistics(vae)
    size = _batch_size_of(by_size, vae.config.size_multiple, args.output)
    readable = {p for group in by_size.values() for p in group}
    done, z = _encode_batch(vae, [p for p in paths if p in readable], size, args, dtype, tiling, bad)
    if z is None:
        raise KlvaeError(none_read(len(paths)))
    meta = {"klvae.model": str(args.model), "klvae.posterior": "sample" if args.sample else "mean",
            "klvae.images": json.dumps([p.name for p in done])}
    save_comfy_latent(args.output, z, meta, replace=args.overwrite)
    log.info("encoded %d image(s) to %s, latents %s%s", len(done), args.output, list(z.shape),
             f", skipped {len(bad)}" if bad else "")
    return 1 if bad else 0


def decode_comfy(args: argparse.Namespace) -> int:
    """Decode every latent of a ComfyUI `.latent` to out/<file stem>_NN.png; checked whole before any is written."""
    cl = load_comfy_latent(args.latents)
    if cl.old_format:
        log.info("%s has no %s marker: ComfyUI's first format, its latents multiplied by 1/0.18215 as LoadLatent "
                 "does", args.latents, "latent_format_version_0")
    out = check_output_path(args.output, folder=True)
    item_names = comfy_item_names(args.latents, cl.samples.shape[0])
    names = unique_png_names([LatentItem(name=n, key=n, height=1, width=1) for n in item_names])
    check_clashes(out, names, args.overwrite)
    tiling = tiling_from_args(args)
    vae, _, dtype = load_model(args)
    _warn_without_statistics(vae)
    norm = vae.config.latent_norm
    want, got = comfy_channels(vae.config.latent_channels, norm), cl.samples.shape[1]
    if got != want:
        raise LatentsError(f"{args.latents}: its latents have {got} channels, but this model's ComfyUI latents have "
                           f"{want} (SD 1.x/2.x and SDXL 4, SD3 and FLUX.1 16, FLUX.2 128): latents of another VAE?")
    lf = comfy_latents_file(cl.samples, item_names, norm, vae.config.size_multiple, str(args.model))
    check_items(vae, lf, args.latents)
    write_pngs(vae, lf, names, out, dtype, tiling, args.latents, args.overwrite)
    log.info("decoded %d image(s) to %s", len(names), out)
    return 0
