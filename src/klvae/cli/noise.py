"""`klvae noise IMAGE`: what the diffusion model sees — the image's latents noised at several t, decoded."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw

from klvae import inference
from klvae.cli.codec import check_finite
from klvae.cli.common import add_model_args, add_overwrite_arg, check_new_file, check_seed, load_model
from klvae.errors import KlvaeError
from klvae.images import (
    MAX_PIXELS,
    check_format_size,
    image_format_for,
    load_image,
    pil_to_tensor,
    save_image_atomic,
    tensor_to_pil,
)

if TYPE_CHECKING:
    from klvae.diffusion import NoiseSchedule
    from klvae.flow import FlowSchedule
    from klvae.model.config import AutoencoderKLConfig

_DEFAULT_STEPS = (0, 100, 250, 500, 750, 999)  # of Stable Diffusion's 1000: clean, then ever noisier, pure noise
_DEFAULT_FLOW_STEPS = (1, 100, 250, 500, 750, 1000)  # the flow table's positions: nearly clean .. sigma = 1

# Diffusion schedules in use have a thousand steps, a few thousand at most.
MAX_NUM_STEPS = 100_000


def register(sub: argparse._SubParsersAction) -> None:
    """Add the noise subcommand."""
    p = sub.add_parser("noise", help="a sheet of the image's latents noised at several timesteps and decoded")
    p.add_argument("image", help="the image whose latents are noised")
    p.add_argument("-o", "--output", required=True, help="sheet to write (.png, .jpg, .webp, .bmp, .tif ...)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="timesteps t to show (0 <= t < --num-steps; default 0, 100, 250, 500, 750, 999 of 1000, "
                        "the same fractions of another --num-steps); with --schedule flow the training positions "
                        "1 <= t <= --num-steps, at sigma = t / num-steps shifted (diffusers' timestep is "
                        "sigma * num-steps; default 1, 100, 250, 500, 750, 1000 of 1000)")
    p.add_argument("--schedule", choices=["scaled_linear", "linear", "cosine", "squaredcos_cap_v2", "flow"],
                   default="scaled_linear",
                   help="beta schedule (scaled_linear 0.00085..0.012 is Stable Diffusion's; squaredcos_cap_v2 is "
                        "diffusers' name for cosine), or flow: rectified flow, (1 - sigma) x0 + sigma noise, as SD3 "
                        "and FLUX are trained")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the betas to zero terminal SNR, so that the last t is pure noise (diffusers' "
                        "rescale_betas_zero_snr, as SD 2.1-style zero-SNR models are trained)")
    p.add_argument("--shift", default=None,
                   help="flow only: the shift of sigma towards noise, a number > 0 (default 1; SD3: 3), or auto: "
                        "the model's own, SD3's 3 or FLUX.1's / FLUX.2's (at 50 steps) from this image's size")
    p.add_argument("--num-steps", type=int, default=1000, help="length of the schedule, as Stable Diffusion's")
    p.add_argument("--beta-start", type=float, default=None,
                   help="first beta of a linear or scaled_linear schedule (default 0.00085 for scaled_linear, "
                        "1e-4 for linear)")
    p.add_argument("--beta-end", type=float, default=None,
                   help="last beta of a linear or scaled_linear schedule (default 0.012 for scaled_linear, "
                        "0.02 for linear)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one noise draw all timesteps share")
    add_overwrite_arg(p, "an existing --output file")
    add_model_args(p)
    p.set_defaults(func=cmd_noise)


def cmd_noise(args: argparse.Namespace) -> int:
    """Encode, scale, noise at each t with one noise draw, unscale, decode, and label the tiles."""
    if not 1 <= args.num_steps <= MAX_NUM_STEPS:
        # The schedule holds several float64 tables of this length: a typo of a few digits must not fill memory.
        raise KlvaeError(f"--num-steps must lie in [1, {MAX_NUM_STEPS}], got {args.num_steps}")
    flow = args.schedule == "flow"
    _check_steps(args, flow)
    _check_betas(args)
    schedule = None if flow else _ddpm_schedule(args)  # before the work: a schedule the options cannot make
    shift = _check_shift(args, flow)
    check_seed(args.seed)
    check_new_file(args.output, overwrite=args.overwrite, inputs=[args.image])  # before the work, not after it
    image_format_for(args.output)
    x = pil_to_tensor(load_image(args.image))[None]
    width, height = x.shape[-1] * len(args.steps), x.shape[-2] + _strip_bound(x.shape[-1], args.steps)
    check_format_size(args.output, width, height)
    if width * height > MAX_PIXELS:  # every tile is held in memory before the sheet is written
        raise KlvaeError(f"the sheet would be {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{MAX_PIXELS:,}: show fewer --steps, or noise a smaller image")
    vae, _, dtype = load_model(args)
    family = _flow_family(vae.config) if shift == "auto" else None  # before the work, not after it
    # The pipelines count tokens on the image cut down to whole latent cells, not on klvae's padded latent.
    cells = (x.shape[-2] // vae.config.size_multiple, x.shape[-1] // vae.config.size_multiple)
    _check_tokens(cells, family, vae.config.size_multiple, args.image)
    z0 = inference.encode(vae, x, dtype).mode()
    check_finite(z0, "latents", args.image)  # else a sheet of noise over NaN, as if the model were fine
    z0 = vae.scale_latents(z0)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed)).to(z0.device)
    if flow:
        assert shift is not None  # _check_shift gives a flow schedule its shift
        zts, labels, what = _flow_noised(z0, noise, args, shift, family, cells)
    else:
        zts, labels, what = _ddpm_noised(z0, noise, args, schedule)
    # --batch-size noised latents per decoder pass
    images = [inference.decode(vae, vae.unscale_latents(chunk), dtype, size=tuple(x.shape[-2:])).cpu()
              for chunk in zts.split(args.batch_size or 1)]
    for img, t in zip(torch.cat(images), args.steps, strict=True):
        check_finite(img, "pixels", f"{args.image} noised to t={t}")  # unclamped inf would pass for white
    tiles = [(label, tensor_to_pil(img)) for label, img in zip(labels, torch.cat(images), strict=True)]
    save_image_atomic(_sheet(tiles), args.output, replace=args.overwrite)
    print(f"wrote {args.output}: t = {', '.join(str(t) for t in args.steps)} ({what})")
    return 0


def _ddpm_schedule(args: argparse.Namespace) -> NoiseSchedule:
    from klvae.diffusion import NoiseSchedule

    try:
        return NoiseSchedule.from_name(args.schedule, args.num_steps, beta_start=args.beta_start,
                                       beta_end=args.beta_end, rescale_betas_zero_snr=args.zero_terminal_snr)
    except ValueError as e:  # e.g. zero terminal SNR of betas whose alpha-bar underflows before the end
        raise KlvaeError(str(e)) from None


def _ddpm_noised(z0: torch.Tensor, noise: torch.Tensor, args: argparse.Namespace,
                 schedule: NoiseSchedule | None = None) -> tuple[torch.Tensor, list[str], str]:
    schedule = schedule or _ddpm_schedule(args)
    zts = torch.cat([schedule.q_sample(z0, t, noise=noise) for t in args.steps])
    labels = [f"t={t}  SNR={float(schedule.snr(t).item()):.3g}" for t in args.steps]
    return zts, labels, f"{args.schedule} schedule{', zero terminal SNR' if args.zero_terminal_snr else ''}"


def _flow_noised(z0: torch.Tensor, noise: torch.Tensor, args: argparse.Namespace, shift: float | str,
                 family: str | None, cells: tuple[int, int]) -> tuple[torch.Tensor, list[str], str]:
    from klvae.flow import noisy

    schedule, how = _flow_schedule(cells, args.num_steps, shift, family)
    sigmas = [float(schedule.sigma_at(t)) for t in args.steps]
    zts = torch.cat([noisy(z0, noise, sigma) for sigma in sigmas])
    labels = [f"t={t}  sigma={_sigma_text(sigma)}" for t, sigma in zip(args.steps, sigmas, strict=True)]
    return zts, labels, f"flow schedule, {how}; sigma = {', '.join(_sigma_text(s, 4) for s in sigmas)}"


def _sigma_text(sigma: float, digits: int = 3) -> str:
    """σ to `digits` significant digits, but never "1" for a tile that still holds some of the image."""
    text = f"{sigma:.{digits}g}"
    while float(text) == 1.0 and sigma < 1.0 and digits < 17:
        digits += 1
        text = f"{sigma:.{digits}g}"
    return text


def _flow_schedule(cells: tuple[int, int], num_steps: int, shift: float | str, family: str | None
                   ) -> tuple[FlowSchedule, str]:
    """The flow table for a numeric shift or the model family's rule (for a diffusion latent of `cells`, h x w),
    and how it was shifted, in words."""
    from klvae.flow import FlowSchedule, flux2_image_seq_len, flux2_mu, flux_image_seq_len, flux_mu

    if family not in ("flux", "flux2"):  # a number, or SD3's fixed shift
        value, name = (_SD3_SHIFT, "SD3's shift") if family == "sd3" else (float(shift), "shift")
        return FlowSchedule(num_steps, shift=value), f"{name} {value:g}"
    try:  # the image's token count, as the family's pipeline counts it
        tokens = flux_image_seq_len(cells) if family == "flux" else flux2_image_seq_len(cells)
        mu = flux_mu(cells) if family == "flux" else flux2_mu(cells)
    except ValueError as e:  # a latent too small for FLUX.1's 2x2 patches
        raise KlvaeError(f"--shift auto: {e}") from None
    name = "FLUX.1" if family == "flux" else "FLUX.2 (50 steps)"
    return FlowSchedule(num_steps, mu=mu), f"{name} mu {mu:.4g} for {tokens} tokens"


# SD3's and SD3.5's scheduler config: FlowMatchEulerDiscreteScheduler(shift=3.0), no dynamic shifting.
_SD3_SHIFT = 3.0


def _check_tokens(cells: tuple[int, int], family: str | None, cell: int, image: str) -> None:
    """KlvaeError for an image too small for one token of FLUX's resolution rule (--shift auto)."""
    if family not in ("flux", "flux2"):
        return
    side = cell * (2 if family == "flux" else 1)  # FLUX.1 packs 2x2 latent cells into a token
    if min(cells) * cell < side:
        name = "FLUX.1" if family == "flux" else "FLUX.2"
        raise KlvaeError(f"--shift auto: {image} ({cells[1] * cell}x{cells[0] * cell} pixels in whole latent cells) "
                         f"is smaller than one {name} token ({side}x{side} pixels): give --shift a number")


def _flow_family(cfg: AutoencoderKLConfig) -> str:
    """sd3, flux or flux2: whose resolution rule `--shift auto` follows, told by the VAE's latent normalisation."""
    from klvae.model.config import PRESETS

    if cfg.latent_patch_size == 2:  # only FLUX.2's diffusion latent is made of 2x2 patches
        return "flux2"
    for name in ("sd3", "flux"):  # both have 16 channels; their scaling and shift factors differ
        p = PRESETS[name]
        if (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (p.latent_channels, p.scaling_factor,
                                                                            p.shift_factor):
            return name
    raise KlvaeError("--shift auto knows the VAEs of SD3, FLUX.1 and FLUX.2 (by their latent normalisation) and "
                     "this model's is none of theirs; give --shift a number (SD3: 3)")


def _check_steps(args: argparse.Namespace, flow: bool) -> None:
    lo, hi = (1, args.num_steps) if flow else (0, args.num_steps - 1)
    if args.steps is None:
        # the default's fractions of Stable Diffusion's 1000 (and of a flow schedule's 1..1000)
        ends = (_DEFAULT_FLOW_STEPS, 1000) if flow else (_DEFAULT_STEPS, 999)
        args.steps = sorted({max(lo, round(f * hi / ends[1])) for f in ends[0]})
    bad = [t for t in args.steps if t < lo or t > hi]
    if bad:
        on = " on the flow schedule" if flow else ""
        raise KlvaeError(f"--steps must lie in [{lo}, {hi}]{on} (--num-steps {args.num_steps}), got {bad[0]}")


def _check_shift(args: argparse.Namespace, flow: bool) -> float | str | None:
    if args.shift is None:
        return 1.0 if flow else None
    if not flow:
        raise KlvaeError(f"--shift shifts the flow schedule, not {args.schedule}; add --schedule flow")
    if args.shift.strip().lower() == "auto":
        return "auto"
    try:
        value = float(args.shift)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):  # also refuses nan and inf
        raise KlvaeError(f"--shift must be a number > 0 or auto, got {args.shift}")
    return value


def _check_betas(args: argparse.Namespace) -> None:
    given = {name: v for name, v in (("--beta-start", args.beta_start), ("--beta-end", args.beta_end)) if v is not None}
    if args.zero_terminal_snr and args.schedule == "flow":
        raise KlvaeError("--zero-terminal-snr rescales a beta schedule; the flow schedule ends in pure noise already")
    if args.zero_terminal_snr and args.num_steps < 2:
        raise KlvaeError("--zero-terminal-snr needs --num-steps 2 or more: it keeps the first step and makes the "
                         "last pure noise")
    if given and args.schedule in ("cosine", "squaredcos_cap_v2", "flow"):
        verb = "sets" if len(given) == 1 else "set"
        raise KlvaeError(f"{' and '.join(given)} {verb} the range of a linear or scaled_linear schedule, "
                         f"not of {args.schedule}")
    for name, v in given.items():
        if not 0 < v < 1:  # also refuses nan
            raise KlvaeError(f"{name} must lie strictly between 0 and 1, got {v}")


_LABEL_HEIGHT = 18  # the least strip above each picture for its t and SNR (sigma on the flow schedule)
_MARGIN = 4


def _label_text(draw: ImageDraw.ImageDraw, label: str, width: int) -> str:
    """The label on one line, or one part a line where the tile is narrower than the label (small images)."""
    return label if draw.textlength(label) <= width - 2 * _MARGIN else label.replace("  ", "\n")


def _strip_height(labels: list[str], width: int) -> tuple[list[str], int]:
    """The labels as drawn on tiles `width` pixels wide, and the height of the strip that holds them."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [_label_text(probe, label, width) for label in labels]
    # ceil: the bounding box is whole pixels with Pillow's fonts, but typed (and maybe one day given) as floats.
    return texts, max(_LABEL_HEIGHT, *(math.ceil(probe.multiline_textbbox((0, 3), t)[3]) + _MARGIN for t in texts))


def _strip_bound(width: int, steps: list[int]) -> int:
    """The label strip's height, known before the labels' numbers are: that of the longest usual label (a narrow
    tile puts each label on two lines)."""
    return _strip_height([f"t={max(steps)}  SNR=8.88e-05", f"t={max(steps)}  sigma=0.888"], width)[1]


def _sheet(tiles: list[tuple[str, Image.Image]]) -> Image.Image:
    w, h = tiles[0][1].size
    texts, top = _strip_height([label for label, _ in tiles], w)
    sheet = Image.new("RGB", (w * len(tiles), h + top), "white")
    for i, (text, (_, img)) in enumerate(zip(texts, tiles, strict=True)):
        # Each label is drawn in its own tile-wide cell, so a long one is cut at its tile's edge rather than
        # written over its neighbour's.
        cell = Image.new("RGB", (w, top), "white")
        ImageDraw.Draw(cell).multiline_text((_MARGIN, 3), text, fill="black")
        sheet.paste(cell, (i * w, 0))
        sheet.paste(img, (i * w, top))
    return sheet
