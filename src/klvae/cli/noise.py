"""`klvae noise IMAGE`: what the diffusion model sees — the image's latents noised at several t, decoded."""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from klvae import inference
from klvae.cli.common import add_model_args, check_output_path, check_seed, load_model
from klvae.errors import KlvaeError
from klvae.images import (
    check_format_size,
    image_format_for,
    load_image,
    pil_to_tensor,
    save_image_atomic,
    tensor_to_pil,
)

_DEFAULT_STEPS = (0, 100, 250, 500, 750, 999)  # of Stable Diffusion's 1000: clean, then ever noisier, pure noise

# Diffusion schedules in use have a thousand steps, a few thousand at most.
MAX_NUM_STEPS = 100_000


def register(sub: argparse._SubParsersAction) -> None:
    """Add the noise subcommand."""
    p = sub.add_parser("noise", help="a sheet of the image's latents noised at several timesteps and decoded")
    p.add_argument("image", help="the image whose latents are noised")
    p.add_argument("-o", "--output", required=True, help="sheet to write (.png, .jpg, .webp, .bmp, .tif ...)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="timesteps t to show (0 <= t < --num-steps; default 0, 100, 250, 500, 750, 999 of 1000, "
                        "the same fractions of another --num-steps)")
    p.add_argument("--schedule", choices=["scaled_linear", "linear", "cosine"], default="scaled_linear",
                   help="beta schedule (scaled_linear 0.00085..0.012 is Stable Diffusion's)")
    p.add_argument("--num-steps", type=int, default=1000, help="length of the schedule (Stable Diffusion: 1000)")
    p.add_argument("--beta-start", type=float, default=None,
                   help="first beta of a linear or scaled_linear schedule (default 0.00085 for scaled_linear, "
                        "1e-4 for linear)")
    p.add_argument("--beta-end", type=float, default=None,
                   help="last beta of a linear or scaled_linear schedule (default 0.012 for scaled_linear, "
                        "0.02 for linear)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one noise draw all timesteps share")
    add_model_args(p)
    p.set_defaults(func=cmd_noise)


def cmd_noise(args: argparse.Namespace) -> int:
    """Encode, scale, q_sample at each t with one noise draw, unscale, decode, and label the tiles."""
    from klvae.diffusion import NoiseSchedule

    if not 1 <= args.num_steps <= MAX_NUM_STEPS:
        # The schedule holds several float64 tables of this length: a typo of a few digits must not fill memory.
        raise KlvaeError(f"--num-steps must lie in [1, {MAX_NUM_STEPS}], got {args.num_steps}")
    if args.steps is None:
        last = args.num_steps - 1
        args.steps = sorted({round(f * last / 999) for f in _DEFAULT_STEPS})
    bad = [t for t in args.steps if t < 0 or t >= args.num_steps]
    if bad:
        raise KlvaeError(f"--steps must lie in [0, {args.num_steps - 1}] (--num-steps {args.num_steps}), got {bad[0]}")
    _check_betas(args)
    check_seed(args.seed)
    check_output_path(args.output, inputs=[args.image])  # before the work, not after it
    image_format_for(args.output)
    x = pil_to_tensor(load_image(args.image))[None]
    check_format_size(args.output, x.shape[-1] * len(args.steps), x.shape[-2] + _LABEL_HEIGHT)  # the sheet's size
    vae, _, dtype = load_model(args)
    schedule = NoiseSchedule.from_name(args.schedule, args.num_steps, beta_start=args.beta_start,
                                       beta_end=args.beta_end)
    z0 = vae.scale_latents(inference.encode(vae, x, dtype).mode())
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed)).to(z0.device)
    zts = torch.cat([schedule.q_sample(z0, t, noise=noise) for t in args.steps])
    # --batch-size noised latents per decoder pass (one at a time when it is left unset)
    images = [inference.decode(vae, vae.unscale_latents(chunk), dtype, size=tuple(x.shape[-2:])).cpu()
              for chunk in zts.split(args.batch_size or 1)]
    tiles = [(t, tensor_to_pil(img), float(schedule.snr(t).item()))
             for t, img in zip(args.steps, torch.cat(images), strict=True)]
    save_image_atomic(_sheet(tiles), args.output)
    print(f"wrote {args.output}: t = {', '.join(str(t) for t in args.steps)} ({args.schedule} schedule)")
    return 0


def _check_betas(args: argparse.Namespace) -> None:
    given = {name: v for name, v in (("--beta-start", args.beta_start), ("--beta-end", args.beta_end)) if v is not None}
    if given and args.schedule == "cosine":
        verb = "sets" if len(given) == 1 else "set"
        raise KlvaeError(f"{' and '.join(given)} {verb} the range of a linear or scaled_linear schedule, not of cosine")
    for name, v in given.items():
        if not 0 < v < 1:  # also refuses nan
            raise KlvaeError(f"{name} must lie strictly between 0 and 1, got {v}")


_LABEL_HEIGHT = 18  # the strip above each picture for its t and SNR


def _sheet(tiles: list[tuple[int, Image.Image, float]]) -> Image.Image:
    w, h = tiles[0][1].size
    sheet = Image.new("RGB", (w * len(tiles), h + _LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (t, img, snr) in enumerate(tiles):
        sheet.paste(img, (i * w, _LABEL_HEIGHT))
        draw.text((i * w + 4, 3), f"t={t}  SNR={snr:.3g}", fill="black")
    return sheet
