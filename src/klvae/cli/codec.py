"""`klvae encode | decode | reconstruct | info`: images to latents and back."""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from klvae import inference
from klvae.cli.common import add_model_args, add_tiling_args, load_model, tiling_from_args
from klvae.errors import ImageError, KlvaeError
from klvae.images import find_images, load_image, pil_to_tensor, save_image_atomic, tensor_to_pil
from klvae.latents.file import LatentItem, LatentsFile, load_latents, save_latents
from klvae.model.autoencoder import AutoencoderKL

log = logging.getLogger("klvae")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the codec subcommands."""
    p = sub.add_parser("encode", help="images or folders -> one latents .safetensors (scaled latents + metadata)")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="latents file to write (.safetensors)")
    p.add_argument("--sample", action="store_true", help="store a posterior sample instead of its mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    add_model_args(p)
    add_tiling_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="a latents file -> PNG images")
    p.add_argument("latents", help="latents file written by `klvae encode`")
    p.add_argument("-o", "--output", required=True, help="folder for the PNGs")
    add_model_args(p)
    add_tiling_args(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="encode + decode one image; prints PSNR and SSIM")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="reconstruction to write (.png)")
    add_model_args(p)
    add_tiling_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("info", help="the model's config, factors and parameter counts")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def _load_all(paths: list[Path]) -> tuple[dict[Path, torch.Tensor], list[Path]]:
    # Decoding everything first is fine for a CLI batch of images; `klvae cache` streams for datasets.
    loaded, bad = {}, []
    for path in tqdm(paths, desc="reading", unit="img", disable=len(paths) < 2):
        try:
            loaded[path] = pil_to_tensor(load_image(path))
        except ImageError as e:
            log.warning("skipping %s", e)
            bad.append(path)
    return loaded, bad


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode images to scaled latents in one safetensors file."""
    paths = find_images(args.inputs)
    if not paths:
        raise KlvaeError(f"no images found in {' '.join(args.inputs)}")
    if len(paths) == 1 and Path(args.inputs[0]).is_file():
        load_image(paths[0])  # a single named file that cannot be read is an error, not a skip
    vae, _, dtype = load_model(args)
    tiling = tiling_from_args(args)
    images, bad = _load_all(paths)
    if not images:
        raise KlvaeError(f"none of the {len(paths)} images could be read")
    gen = torch.Generator(device=vae.device).manual_seed(args.seed)
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for p, t in images.items():
        by_size[tuple(t.shape[-2:])].append(p)
    latents: dict[Path, torch.Tensor] = {}
    with tqdm(total=len(images), desc="encoding", unit="img") as bar:
        for group in by_size.values():
            for i in range(0, len(group), args.batch_size):
                chunk = group[i : i + args.batch_size]
                post = inference.encode(vae, torch.stack([images[p] for p in chunk]), dtype, tiling)
                z = post.sample(gen) if args.sample else post.mode()
                for p, zi in zip(chunk, vae.scale_latents(z).cpu(), strict=True):
                    latents[p] = zi
                bar.update(len(chunk))
    ordered = [p for p in paths if p in latents]
    items = [
        LatentItem(name=p.name, key=f"{n:06d}", height=images[p].shape[-2], width=images[p].shape[-1])
        for n, p in enumerate(ordered)
    ]
    lf = LatentsFile(
        latents={it.key: latents[p] for it, p in zip(items, ordered, strict=True)},
        items=items, model=str(args.model),
        scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.shift_factor,
        extra={"posterior": "sample" if args.sample else "mean"},
    )
    save_latents(lf, args.output)
    log.info("encoded %d image(s) to %s%s", len(items), args.output, f", skipped {len(bad)}" if bad else "")
    return 1 if bad else 0


def _unique_png_names(items: list[LatentItem]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for it in items:
        stem = Path(it.name).stem or it.key
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
    return names


def cmd_decode(args: argparse.Namespace) -> int:
    """Decode a latents file to PNGs."""
    lf = load_latents(args.latents)
    vae, _, dtype = load_model(args)
    c = vae.config
    if lf.scaling_factor != c.scaling_factor or (lf.shift_factor or 0.0) != (c.shift_factor or 0.0):
        log.warning("latents were scaled with %s/%s, the model's factors are %s/%s; using the file's",
                    lf.scaling_factor, lf.shift_factor, c.scaling_factor, c.shift_factor)
    tiling = tiling_from_args(args)
    for it in lf.items:  # check all before writing any image
        inference.check_latents(vae, lf.latents[it.key][None])
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for it, name in tqdm(list(zip(lf.items, _unique_png_names(lf.items), strict=True)), desc="decoding", unit="img"):
        z = lf.latents[it.key][None] / lf.scaling_factor + (lf.shift_factor or 0.0)
        img = inference.decode(vae, z, dtype, size=(it.height, it.width), tiling=tiling)
        save_image_atomic(tensor_to_pil(img[0]), out / name)
    log.info("decoded %d image(s) to %s", len(lf.items), out)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Encode and decode one image; print PSNR and SSIM against the original."""
    from klvae.evaluation.metrics import psnr, ssim

    x = pil_to_tensor(load_image(args.image))[None]
    vae, _, dtype = load_model(args)
    tiling = tiling_from_args(args)
    z = inference.encode(vae, x, dtype, tiling).mode()
    y = inference.decode(vae, z, dtype, size=tuple(x.shape[-2:]), tiling=tiling).cpu()
    save_image_atomic(tensor_to_pil(y[0]), args.output)
    # Metrics on the 8-bit images that were actually written, as a viewer would see them.
    y8 = pil_to_tensor(tensor_to_pil(y[0]))[None]
    print(f"PSNR {psnr(x, y8).item():.2f} dB  SSIM {ssim(x, y8).item():.4f}  -> {args.output}")
    return 0


def describe(vae: AutoencoderKL, model: str) -> dict:
    """The model's config, factors and parameter counts as a plain dict."""
    return {"model": model, "config": vae.config.to_dict(), "parameters": vae.num_parameters(),
            "downsample_factor": vae.downsample_factor}


def cmd_info(args: argparse.Namespace) -> int:
    """Print the config and parameter counts."""
    vae, _, _ = load_model(args)
    d = describe(vae, str(args.model))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"model: {d['model']}")
    for k, v in d["config"].items():
        print(f"  {k}: {v}")
    n = d["parameters"]
    print(f"parameters: {n['total']:,} (encoder {n['encoder']:,}, decoder {n['decoder']:,})")
    print(f"downsample factor: {d['downsample_factor']}")
    return 0
