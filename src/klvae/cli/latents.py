"""`klvae cache | scale`: datasets to latent shards, and latent statistics from data."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from klvae.atomic import check_not_in_data
from klvae.cli.common import (
    add_model_args,
    check_model_output,
    check_named,
    check_not_the_model,
    check_output_path,
    check_seed,
    load_model,
)
from klvae.cli.convert import check_diffusers_can_hold
from klvae.errors import KlvaeError, flag_errors
from klvae.model.autoencoder import AutoencoderKL
from klvae.model.latent_norm import LatentNorm

log = logging.getLogger("klvae")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the cache and scale subcommands."""
    p = sub.add_parser("cache", help="encode a dataset to latent shards + index (resumable; torchrun for many GPUs)")
    p.add_argument("--data", help="image folder, datasets folder, parquet, or .tar shards (glob); required unless "
                                   "--verify")
    p.add_argument("--image-column", default="image", help="image column of a dataset or parquet table")
    p.add_argument("-o", "--output", required=True, help="cache folder (shards, manifests, index.json)")
    p.add_argument("--verify", action="store_true",
                   help="encode nothing: read every shard of the cache in -o and check it against the SHA-256 "
                        "recorded when it was written (exit 1 if any is damaged, 2 if -o is no cache)")
    p.add_argument("--repair", action="store_true",
                   help="with --verify: drop the damaged shards, so that the next `klvae cache` run on -o encodes "
                        "their rows again")
    p.add_argument("--resolution", type=int, default=512, help="square side, or the bucket area's side")
    p.add_argument("--buckets", action="store_true", help="aspect-ratio buckets of equal pixel count (SDXL style)")
    p.add_argument("--flip", action="store_true", help="also store horizontally flipped copies")
    p.add_argument("--store", choices=["moments", "sample", "scaled"], default="moments",
                   help="posterior mean+logvar (default), one sample, or scaled mean latents")
    p.add_argument("--shard-size", type=int, default=256, help="rows per shard file")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--seed", type=int, default=0,
                   help="with --store sample: each row's noise comes from (seed, image, flip), whatever the batch")
    add_model_args(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("scale", help="estimate scaling_factor = 1/std and shift_factor = mean of the latents")
    p.add_argument("--data", required=True, help="image folder, datasets folder, parquet, or .tar shards (glob)")
    p.add_argument("--image-column", default="image", help="image column of a dataset or parquet table")
    p.add_argument("--limit", type=int, default=256, help="images to sample")
    p.add_argument("--resolution", type=int, default=256, help="side of the centre crop each image is encoded at")
    p.add_argument("--save", default=None, help="write the model with these factors to this folder (diffusers layout)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --save: replace the config.json and weights of a model already in that folder")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--no-shift", action="store_true", help="keep shift_factor unset (SD 1.x/XL style)")
    form.add_argument("--per-channel", action="store_true",
                      help="estimate latents_mean and latents_std per channel, with scaling_factor 1, instead of "
                           "one scale and shift (the form Playground v2.5's VAE config uses)")
    add_model_args(p)
    p.set_defaults(func=cmd_scale)


@flag_errors
def cmd_cache(args: argparse.Namespace) -> int:
    """Check everything that needs no model, load it, then `build_cache` (under torchrun, this process's share)."""
    from dataclasses import asdict

    from klvae.distributed import init_distributed, rank_device, shutdown
    from klvae.inference.precision import usable_device
    from klvae.latents.build import build_cache
    from klvae.latents.cache import check_resume, model_fingerprints
    from klvae.latents.options import CacheOptions
    from klvae.latents.sources import open_source

    if args.verify or args.repair:
        return _verify_cache(args)
    if not args.data:
        raise KlvaeError("cache needs --data (or --verify, to check a finished cache)")
    opts = CacheOptions(resolution=args.resolution, buckets=args.buckets, flip=args.flip, store=args.store,
                        shard_size=args.shard_size, batch_size=args.batch_size, num_workers=args.num_workers,
                        seed=check_seed(args.seed))
    check_output_path(args.output, folder=True)
    check_not_in_data(args.output, "--output", args.data)  # a rerun would cache its own files as images
    source = open_source(args.data, args.image_column)  # bad data is reported before the model is loaded
    if not source.ids:
        raise KlvaeError(f"no images in {args.data}")
    device = usable_device(args.device, "--device")
    dist = init_distributed(device.type)  # first: the model goes to this rank's GPU
    try:
        check_resume(args.output, opts, dist.world)  # a mismatched resume is refused before the model loads
        args.device = str(rank_device(device, dist))
        prints: dict[str, str] = {}  # of the weights as stored: a run in another --dtype resumes the cache
        vae, _, dtype = load_model(args, lambda m: prints.update(model_fingerprints(m, opts.store)))
        summary = build_cache(vae, source, args.output, **asdict(opts), dtype=dtype, model_name=str(args.model),
                              dist=dist, fingerprints=prints)
        if dist.is_main:
            print(summary.summary())
    finally:
        shutdown(dist)
    return 0 if summary.ok else 1  # finished either way; 1: some images are not in the cache


def _verify_cache(args: argparse.Namespace) -> int:
    """--verify [--repair]: the one-line summary, and how to encode the damaged shards' rows again."""
    from klvae.latents.verify import repair_cache, verify_cache

    if not args.verify:
        raise KlvaeError("--repair goes with --verify: `klvae cache --verify --repair -o CACHE`")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would check, and repair, the same files
        raise KlvaeError("run `klvae cache --verify` in one process, not under torchrun")
    report = verify_cache(args.output)
    if report.ok:
        print(report.summary())
        return 0
    if report.source != "manifests":
        # Nothing to drop them from (repair_cache refuses): the same line whether or not --repair was asked for.
        cannot = ", so --repair cannot drop them" if args.repair else ""
        print(f"{report.summary()}; this copy has no manifests{cannot}: encode their rows again where the cache was "
              "made (or copy its manifest-rank*.jsonl files here, then --repair)")
    elif args.repair:
        repair_cache(args.output, report)
        print(f"{report.summary()}; dropped them: run the same `klvae cache` command again to encode their rows anew")
    else:
        # Deleting a shard by hand is no repair: a resume refuses a manifest naming a shard that is gone.
        print(f"{report.summary()}; to encode their rows again, run `klvae cache --verify --repair -o "
              f"{args.output}`, then the same `klvae cache` command")
    return 1


@flag_errors
def cmd_scale(args: argparse.Namespace) -> int:
    """Print the factors; optionally save the model with them."""
    from klvae.latents.scale import check_scale_options, estimate_factors
    from klvae.latents.sources import open_source

    check_scale_options(args.limit, args.resolution)
    check_named(args.data, "--data")
    if args.save is not None:  # before the work, not after it ("" is refused as empty, not taken as none)
        check_output_path(args.save, "--save", folder=True)
        check_model_output(Path(args.save), "--save", overwrite=args.overwrite)
        check_not_in_data(args.save, "--save", args.data)
    source = open_source(args.data, args.image_column)  # bad data is reported before the model is loaded
    if not source.ids:
        raise KlvaeError(f"no images in {args.data}")
    if args.save:
        _check_save_is_not_the_model(args)
    # --save writes the weights as read: on a GPU optimize_for_inference casts them to the compute dtype.
    as_read: dict[str, torch.Tensor] = {}
    vae, _, dtype = load_model(args, before_cast=(lambda v: as_read.update(
        (k, t.detach().to("cpu", copy=True)) for k, t in v.state_dict().items())) if args.save else None)
    if args.save:  # --save writes a diffusers folder: what it cannot hold is said before the images are encoded
        check_diffusers_can_hold(vae, "--save writes a diffusers folder; run without --save for the factors, then "
                                 "write the model with them from Python (klvae.weights.export_ldm)")
    if args.save and not args.per_channel and vae.config.latent_patch_size > 1:
        # Its formats (diffusers' AutoencoderKLFlux2, BFL's) hold a latent BatchNorm and no factors.
        raise KlvaeError("a model with latent patches (FLUX.2) keeps per-channel statistics only: "
                         "add --per-channel to --save")
    f = estimate_factors(vae, source, limit=args.limit, resolution=args.resolution, dtype=dtype,
                         batch_size=args.batch_size)
    shards = f", {len(source.unreadable)} unreadable tar shards skipped" if source.unreadable else ""
    if args.per_channel:
        means, stds = tuple(round(v, 6) for v in f["latents_mean"]), tuple(_round_positive(v) for v in f["latents_std"])
        norm = LatentNorm(1.0, None, means, stds, vae.config.latent_patch_size)
        found = f"latents_mean {list(norm.latents_mean or ())}  latents_std {list(norm.latents_std or ())}"
    else:
        norm = LatentNorm(_round_positive(f["scaling_factor"]), None if args.no_shift else round(f["shift_factor"], 6),
                          latent_patch_size=vae.config.latent_patch_size)
        found = f"scaling_factor {f['scaling_factor']:.6g}  shift_factor {norm.shift_factor}"
    old = ", ".join(f"{k} {v}" for k, v in vae.config.latent_norm.to_dict().items()
                    if v is not None and (k, v) != ("latent_patch_size", 1))
    print(f"{found}  (latent std {f['std']:.6g} over {int(f['images'])} images, skipped {int(f['skipped'])} "
          f"unreadable{shards}; the model's: {old})")
    if args.save:
        rescaled = AutoencoderKL(vae.config.replace(**norm.to_dict()))
        rescaled.load_state_dict(as_read)
        print(f"saved to {rescaled.save_pretrained(args.save)}")
    return 1 if f["skipped"] or source.unreadable else 0  # as cache: finished, but some images were unreadable


def _check_save_is_not_the_model(args: argparse.Namespace) -> None:
    """KlvaeError when --save would replace, or sit over, the files the model is read from (as convert's)."""
    from klvae.weights.load import BuiltinName, locate

    # The files load_model will read: --model's, wherever it found them (the built-in demo when none is given).
    source = locate(args.model or BuiltinName("demo"), args.subfolder)
    check_not_the_model(Path(args.save), "--save", source, folder=True, what="the model being read")


def _round_positive(factor: float) -> float:
    # Six decimals, as configs hold them; but a factor below 0.1 keeps six significant digits, or the
    # scaling_factor of a model with huge latents (std 1e7, say) would round to 0, which no config may hold.
    return round(factor, 6) if abs(factor) >= 0.1 else float(f"{factor:.6g}")
