"""`klvae encode | decode | reconstruct | info`: images to latents and back."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from klvae import inference
from klvae.atomic import atomic_write_all
from klvae.cli.codec_info import cmd_info
from klvae.cli.common import (
    add_model_args,
    add_overwrite_arg,
    add_tiling_args,
    check_new_file,
    check_output_path,
    check_seed,
    load_model,
    tiling_from_args,
)
from klvae.errors import ImageError, ImageTooLarge, KlvaeError, LatentsError, none_read
from klvae.images import (
    IMAGE_EXTENSIONS,
    as_written,
    check_format_size,
    find_images,
    image_format_for,
    image_size,
    load_image,
    pil_to_tensor,
    save_image_atomic,
    tensor_to_pil,
    write_image,
)
from klvae.latents.comfy import SUFFIX, is_comfy_latent
from klvae.latents.file import LatentItem, LatentsFile, check_sizes, load_latents, save_latents
from klvae.latents.fingerprint import encoder_fingerprint, model_fingerprint
from klvae.latents.keyed_noise import image_generators
from klvae.latents.plain import plain_kind
from klvae.model.autoencoder import AutoencoderKL
from klvae.model.latent_norm import LatentNorm
from klvae.progress import progress_bar

log = logging.getLogger("klvae")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the codec subcommands."""
    p = sub.add_parser("encode", help="images or folders -> one latents .safetensors (scaled latents + metadata), "
                                      "or a ComfyUI .latent")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True,
                   help="latents file to write: .safetensors (klvae's), or .latent (ComfyUI's LoadLatent reads it: "
                        "one batch, so images of one size, cropped to whole latent cells as ComfyUI's VAEEncode does)")
    p.add_argument("--sample", action="store_true", help="store a posterior sample instead of its mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    add_overwrite_arg(p, "an existing --output file")
    add_model_args(p)
    add_tiling_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="a latents file -> PNG images")
    p.add_argument("latents", help="latents file written by `klvae encode`, a ComfyUI .latent (SaveLatent's), or "
                                   "a plain [B, C, h, w] tensor (safetensors, torch.save or numpy.save)")
    p.add_argument("-o", "--output", required=True, help="folder for the PNGs")
    p.add_argument("--unscaled", action="store_true",
                   help="a plain tensor holds the VAE's own latents (vae.encode's), not the diffusion model's "
                        "scaled ones (a pipeline's output_type='latent')")
    add_overwrite_arg(p, "files in --output that have the PNGs' names")
    add_model_args(p)
    add_tiling_args(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="encode + decode one image; prints PSNR and SSIM")
    p.add_argument("image", help="the image to encode and decode")
    p.add_argument("-o", "--output", required=True,
                   help="reconstruction to write (.png, or by the extension .jpg, .jpeg, .webp, .bmp, .tif, .tiff)")
    add_overwrite_arg(p, "an existing --output file")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (input, output, psnr, ssim, size [width, height], model)")
    add_model_args(p)
    add_tiling_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("info", help="the model's config, factors and parameter counts; a preset alone "
                                    "(--config PRESET, or --model tiny) is described without weights")
    add_model_args(p, run=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def _group_by_size(paths: list[Path], bad: list[Path]) -> dict[tuple[int, int], list[Path]]:
    """The paths by image size, in order, from their headers; those that cannot be read are logged and added to bad."""
    # Only headers here: the pixels are decoded a batch at a time as they are encoded, so memory holds one batch.
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for path in progress_bar(paths, desc="reading", unit="img", disable=len(paths) < 2):
        try:
            by_size[image_size(path)].append(path)
        except ImageError as e:
            log.warning("skipping %s", e)
            bad.append(path)
    return by_size


def loaded_images(paths: list[Path], bad: list[Path]) -> Iterator[tuple[Path, torch.Tensor]]:
    """Each image that loads, as a tensor; one that does not (a truncated file) is logged and added to bad."""
    for path in paths:
        try:
            yield path, pil_to_tensor(load_image(path))
        except ImageError as e:
            log.warning("skipping %s", e)
            bad.append(path)


def _left_out(inputs: list[str]) -> str:
    """What the named folders hold that a folder does not contribute, e.g. ' (they hold 3 .gif files, ...)'."""
    counts: collections.Counter[str] = collections.Counter()
    for given in inputs:
        if Path(given).is_dir():
            for p in itertools.islice(Path(given).rglob("*"), 100_000):
                if p.suffix and not p.name.startswith(".") and p.is_file():
                    counts[p.suffix.lower()] += 1
    if not counts:
        return ""
    held = ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common(3))
    return (f" (it holds {held} files; a folder contributes {' '.join(sorted(IMAGE_EXTENSIONS))} files only: name "
            ".gif and .ppm files on their own; `klvae cache --data` reads .tar shards)")


def _check_encode_args(args: argparse.Namespace, paths: list[Path]) -> None:
    # All refused before the model loads: a wrong output must not cost an encode, nor replace an input.
    check_seed(args.seed)
    if Path(args.output).suffix.lower() not in (".safetensors", SUFFIX):
        raise KlvaeError(f"--output {args.output}: the latents file must end in .safetensors (klvae's latents) "
                         f"or {SUFFIX} (ComfyUI's)")
    check_new_file(args.output, overwrite=args.overwrite, inputs=[*paths, *args.inputs])


def check_finite(t: torch.Tensor, what: str, where: object) -> None:
    """KlvaeError unless every value of `t` is finite."""
    # Inference reruns a half-precision overflow in fp32; what is still inf/NaN comes from the weights.
    if not torch.isfinite(t).all():
        raise KlvaeError(f"the model produced non-finite {what} for {where}: inf or NaN in its weights?")


def _encode_batch(vae: AutoencoderKL, batch: list[tuple[Path, torch.Tensor]], args: argparse.Namespace,
                  dtype: torch.dtype, tiling: inference.TileOptions | None) -> dict[Path, torch.Tensor]:
    post = inference.encode(vae, torch.stack([t for _, t in batch]), dtype, tiling)
    z = post.sample(image_generators(args.seed, [p.name for p, _ in batch])) if args.sample else post.mode()
    z = vae.scale_latents(z).cpu()
    first = batch[0][0]
    check_finite(z, "latents", first if len(batch) == 1 else f"{first} (or its batch)")
    return dict(zip([p for p, _ in batch], z, strict=True))


def _encode_groups(vae: AutoencoderKL, by_size: dict[tuple[int, int], list[Path]], args: argparse.Namespace,
                   dtype: torch.dtype, tiling: inference.TileOptions | None, bad: list[Path]
                   ) -> dict[Path, tuple[torch.Tensor, tuple[int, int]]]:
    """Scaled latents and size of every image that loads, loaded a batch of one size at a time."""
    out: dict[Path, tuple[torch.Tensor, tuple[int, int]]] = {}
    total, bad_before = sum(map(len, by_size.values())), len(bad)
    with progress_bar(total=total, desc="encoding", unit="img") as bar:
        for size, group in by_size.items():
            stream = loaded_images(group, bad)
            # Batches of the images that load, as when all were loaded first: the same batches, the same latents.
            while chunk := list(itertools.islice(stream, args.batch_size)):
                # An image its header mispredicted (a late EXIF block, a file changed meanwhile) is encoded alone.
                fit = [c for c in chunk if c[1].shape[-2:] == size]
                for batch in [fit, *([c] for c in chunk if c[1].shape[-2:] != size)]:
                    if batch:
                        z = _encode_batch(vae, batch, args, dtype, tiling)
                        out.update((p, (z[p], (t.shape[-2], t.shape[-1]))) for p, t in batch)
                bar.update(len(out) + len(bad) - bad_before - bar.n)
    return out


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode images to scaled latents in one safetensors file."""
    for given in args.inputs:
        if Path(given).suffix.lower() == ".tar" and Path(given).is_file():
            raise KlvaeError(f"{given}: encode reads image files and folders, not .tar shards (`klvae cache --data "
                             "shards/*.tar` encodes shards)")
    unlisted: list[str] = []  # folders that cannot be listed: skipped parts of the input, counted as bad
    paths = find_images(args.inputs, unreadable=unlisted)
    if not paths:
        raise KlvaeError(f"no images found in {' '.join(args.inputs)}{_left_out(args.inputs)}")
    _check_encode_args(args, paths)
    if len(paths) == 1 and Path(args.inputs[0]).is_file():
        load_image(paths[0])  # a single named file that cannot be read is an error, not a skip
    tiling = tiling_from_args(args)
    bad = [Path(f) for f in unlisted]
    by_size = _group_by_size(paths, bad)
    if not by_size:
        raise KlvaeError(none_read(len(paths)))
    if Path(args.output).suffix.lower() == SUFFIX:
        from klvae.cli.comfy import encode_comfy  # it builds on this module's helpers

        return encode_comfy(args, paths, by_size, tiling, bad)
    prints: dict[str, str] = {}  # of the weights as stored: an fp16 cast for speed must not make another model
    vae, _, dtype = load_model(args, lambda m: prints.update(model_fingerprint=model_fingerprint(m, with_factors=False),
                                                            encoder_fingerprint=encoder_fingerprint(m)))
    encoded = _encode_groups(vae, by_size, args, dtype, tiling, bad)
    if not encoded:
        raise KlvaeError(none_read(len(paths)))
    ordered = [p for p in paths if p in encoded]
    items = [LatentItem(name=p.name, key=f"{n:06d}", height=encoded[p][1][0], width=encoded[p][1][1])
             for n, p in enumerate(ordered)]
    lf = LatentsFile(
        latents={it.key: encoded[p][0] for it, p in zip(items, ordered, strict=True)},
        items=items, model=str(args.model),
        **dataclasses.asdict(vae.config.latent_norm),
        extra={"posterior": "sample" if args.sample else "mean", **prints},
    )
    save_latents(lf, args.output, replace=args.overwrite)  # one written meanwhile by another run is kept too
    log.info("encoded %d image(s) to %s%s", len(items), args.output, f", skipped {len(bad)}" if bad else "")
    return 1 if bad else 0


# Room for "_NNN.png" within the 255 bytes most file systems allow in a name.
_MAX_STEM_BYTES = 200


def _plain_stem(it: LatentItem, n: int) -> str:
    """A file-name stem for an item, from its name, else its key, else its position: the last path component,
    without control characters or leading dots, so that the PNG lands inside --output and is not hidden."""
    for text in (it.name, it.key):
        parts = [q for q in re.split(r"[/\\]+", text) if q not in ("", ".", "..")]
        if not parts:
            continue
        stem = re.sub(r"[\x00-\x1f\x7f]", "_", Path(parts[-1]).stem).strip().lstrip(".").strip()
        # Lone surrogates (valid in JSON) become '?'; a cut through a character drops that character.
        stem = stem.encode("utf-8", "replace")[:_MAX_STEM_BYTES].decode("utf-8", "ignore").strip()
        if stem:
            return stem
    return f"{n:06d}"


def unique_png_names(items: list[LatentItem]) -> list[str]:
    """One plain PNG file name per item, no two alike (nor differing only in case): a repeated stem gets the
    first free `_1`, `_2` ... that no other item of the run asks for, so no image overwrites another."""
    stems = [_plain_stem(it, n) for n, it in enumerate(items)]
    taken = {s.casefold() for s in stems}
    given: set[str] = set()
    next_n: dict[str, int] = defaultdict(lambda: 1)
    names = []
    for it, stem in zip(items, stems, strict=True):
        name = stem
        if stem.casefold() in given:
            while f"{stem}_{next_n[stem.casefold()]}".casefold() in taken:
                next_n[stem.casefold()] += 1
            name = f"{stem}_{next_n[stem.casefold()]}"
            taken.add(name.casefold())
        given.add(name.casefold())
        source = it.name or it.key
        if stem != Path(source).stem or re.search(r"[/\\]", source):
            log.warning("%r is not a plain file name; writing that item as %s.png", source[:80], name)
        names.append(f"{name}.png")
    return names


def check_clashes(out: Path, names: list[str], overwrite: bool) -> None:
    """KlvaeError when a PNG would replace a file in `out` (unless `overwrite`), or a folder (always)."""
    # Decoding into the folder the images were encoded from would otherwise replace the originals.
    clashes = [n for n in names if os.path.lexists(out / n)]
    folders = [n for n in clashes if (out / n).is_dir()]
    if folders:
        raise KlvaeError(f"--output {out}: {folders[0]} is a folder; a PNG of that name cannot replace it")
    if clashes and not overwrite:
        raise KlvaeError(f"--output {out}: {clashes[0]} already exists ({len(clashes)} of the {len(names)} PNGs "
                         "would replace files there); add --overwrite to replace them")


def _unscaled(lf: LatentsFile, it: LatentItem) -> torch.Tensor:
    return lf.norm.unscale(lf.latents[it.key][None].float())


# Factors equal to this relative difference are one: statistics read back from float32 BatchNorm buffers differ
# from the float64 figures they were written from by ~1e-8.
_SAME_FACTOR = 1e-6


def _norm_differences(file: LatentNorm, model: LatentNorm) -> list[str]:
    """What differs between the file's and the model's latent normalisation, each in a few words."""
    out = []
    for name in ("latent_patch_size", "scaling_factor", "shift_factor"):
        a, b = getattr(file, name) or 0, getattr(model, name) or 0  # a shift of None and of 0 scale alike
        if not math.isclose(a, b, rel_tol=_SAME_FACTOR, abs_tol=_SAME_FACTOR):
            out.append(f"{name} {a:g} (the model's {b:g})")
    for name in ("latents_mean", "latents_std"):
        a, b = getattr(file, name), getattr(model, name)
        if (a is None) != (b is None) or (a is not None and b is not None and len(a) != len(b)):
            out.append(f"{name} {'only in the file' if b is None else 'only in the model' if a is None else 'sizes'}")
        elif a is not None and b is not None:
            worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))
            if worst > _SAME_FACTOR:
                out.append(f"{name} (largest relative difference {worst:.3g})")
    return out


def _latent_kind(channels: int, patch: int) -> str:
    return f"{channels}-channel latents" + (f" in {patch}x{patch} patches" if patch > 1 else "")


def _check_layout(vae: AutoencoderKL, lf: LatentsFile, where: str) -> None:
    """LatentsError when the file's latents are another family's than the model's (channels, patches)."""
    c, p = vae.config.latent_channels, vae.config.latent_patch_size
    for n, it in enumerate(lf.items):
        stored, fp = lf.latents[it.key].shape[0], lf.latent_patch_size
        if stored != c * fp * fp and stored % (fp * fp) == 0:  # else no patches at all: unscaling says so
            raise LatentsError(f"{where}: item {n} ({it.name[:60]!r}): its {_latent_kind(stored, fp)} do not fit "
                               f"this model, whose files hold {_latent_kind(c * p * p, p)} ([B, {c}, h, w] "
                               "unscaled): latents of another VAE?")


def check_items(vae: AutoencoderKL, lf: LatentsFile, where: str) -> None:
    """LatentsError naming the first item that does not fit the model, or is not finite once unscaled."""
    _check_layout(vae, lf, where)
    check_sizes(lf, vae.downsample_factor, where)
    for n, it in enumerate(lf.items):
        try:
            if not torch.isfinite(lf.latents[it.key]).all():
                raise LatentsError("latents contain NaN or infinite values")
            try:  # the model takes them unscaled, and for FLUX.2 out of their patches
                z = _unscaled(lf, it)
            except ValueError as e:
                raise LatentsError(str(e)) from None
            # As decoded: a tiny scaling_factor or a huge value overflows only after the division.
            if not torch.isfinite(z).all():
                raise LatentsError(f"latents overflow to inf once unscaled (/ scaling_factor {lf.scaling_factor:g})")
            inference.check_latents(vae, z)
        except LatentsError as e:
            raise LatentsError(f"{where}: item {n} ({it.name[:60]!r}): {e}") from None


def _png_writer(vae: AutoencoderKL, lf: LatentsFile, n: int, dtype: torch.dtype,
                tiling: inference.TileOptions | None, where: str) -> Callable[[Path], None]:
    """A writer for atomic_write_all that decodes item n and saves it as PNG."""
    it = lf.items[n]

    def write(tmp: Path) -> None:
        z = _unscaled(lf, it)
        img = inference.decode(vae, z, dtype, size=(it.height, it.width), tiling=tiling)
        if not torch.isfinite(img).all():
            peak = z.abs().max().item()
            why = (f"its unscaled latents reach {peak:.3g}, far beyond an encoder's (scaling_factor "
                   f"{lf.scaling_factor:g})" if peak > _PLAUSIBLE_LATENT else "inf or NaN in the model's weights?")
            raise KlvaeError(f"{where}: item {n} ({it.name[:60]!r}): the model produced non-finite pixels: {why}")
        write_image(tensor_to_pil(img[0]), tmp, "PNG")

    return write


# Real latents, unscaled, stay within a few dozen; a decode that overflows from far past this is the file's doing.
_PLAUSIBLE_LATENT = 1e4


def write_pngs(vae: AutoencoderKL, lf: LatentsFile, names: list[str], out: Path, dtype: torch.dtype,
               tiling: inference.TileOptions | None, where: str, replace: bool = True) -> None:
    """Decode every item of `lf` to out/names[n], all landing together (atomic_write_all, `replace` passed on)."""
    with progress_bar(total=len(names), desc="decoding", unit="img") as bar:

        def counted(write: Callable[[Path], None]) -> Callable[[Path], None]:
            def run(tmp: Path) -> None:
                write(tmp)
                bar.update(1)

            return run

        atomic_write_all([(out / name, counted(_png_writer(vae, lf, n, dtype, tiling, where)))
                          for n, name in enumerate(names)], replace)


def _warn_if_another_model(vae: AutoencoderKL, lf: LatentsFile, model: str) -> None:
    # Latents of another VAE with the same channels decode to something, but not to the encoded images (SD 1.x
    # latents through SDXL's VAE, say); a fine-tune of the same VAE is a fair choice, hence a warning only. A model
    # whose encoder is the encoding one's (a decoder-only fine-tune: sd-vae-ft-mse) is what the latents are for.
    if (enc := lf.extra.get("encoder_fingerprint")) is not None:
        other = enc != encoder_fingerprint(vae)
    else:  # written before klvae recorded the encoder's own hash
        other = (written := lf.extra.get("model_fingerprint")) is not None and written != model_fingerprint(
            vae, with_factors=False)
    if other:
        log.warning("these latents were encoded by another model (%s) than %s, whose encoder differs: the images "
                    "will be %s's reading of them", lf.model or "not named", model, model)


def _is_image(path: str) -> bool:
    """Whether `path` is an image in a format klvae reads, however many pixels it has (its header only)."""
    try:
        image_size(path, max_pixels=None)
    except ImageTooLarge:
        # Pillow itself refuses a header past its decompression-bomb limit, whatever max_pixels says: such a
        # file is an image all the same, not latents "with a header too large".
        return True
    except ImageError:
        return False
    return True


def _read_latents(path: str) -> LatentsFile:
    """load_latents, naming an image given in place of latents as such (safetensors would say 'header too large')."""
    try:
        return load_latents(path)
    except LatentsError:
        if not _is_image(path):
            raise  # the latents error says what is wrong with the file
        raise LatentsError(f"{path} is an image, not a latents file: decode reads what `klvae encode` writes (or a "
                           "ComfyUI .latent, or a plain tensor); `klvae reconstruct` encodes and decodes an image"
                           ) from None


def cmd_decode(args: argparse.Namespace) -> int:
    """Decode a latents file (or a ComfyUI .latent) to PNGs; every item is checked before the first is written,
    and the PNGs land together, so a failure leaves none of them."""
    comfy = is_comfy_latent(args.latents)
    if not comfy and plain_kind(args.latents) is not None:
        from klvae.cli.plain import decode_plain  # it builds on this module's helpers

        return decode_plain(args)
    lf = None if comfy else _read_latents(args.latents)  # what the file is not (missing, an image) is said first
    if args.unscaled:
        raise KlvaeError(f"--unscaled is for plain tensor files, which do not record their scaling; "
                         f"{args.latents} does")
    if lf is None:
        from klvae.cli.comfy import decode_comfy  # it builds on this module's helpers

        return decode_comfy(args)
    out = check_output_path(args.output, folder=True)
    names = unique_png_names(lf.items)
    check_clashes(out, names, args.overwrite)
    tiling = tiling_from_args(args)
    # The model compared as stored, before a cast to --dtype for speed (which the encoding run may not have made).
    vae, _, dtype = load_model(args, lambda m: _warn_if_another_model(m, lf, args.model))
    # A bad item (sizes, pixel limit, channels, NaN) refuses the whole file, as nothing has been written yet.
    check_items(vae, lf, args.latents)
    if differences := _norm_differences(lf.norm, vae.config.latent_norm):
        log.warning("latents were scaled with other factors than the model's: %s; using the file's",
                    "; ".join(differences))
    write_pngs(vae, lf, names, out, dtype, tiling, args.latents, args.overwrite)
    log.info("decoded %d image(s) to %s", len(lf.items), out)
    return 0


def _quality(x: torch.Tensor, y8: torch.Tensor) -> tuple[float, float | None]:
    """PSNR and SSIM of `y8` against `x`; SSIM None where its window does not fit in the image."""
    from klvae.evaluation.metrics import SSIM_RADIUS, psnr, ssim

    fits = min(x.shape[-2:]) >= 2 * SSIM_RADIUS + 1
    # Said outright: these are [-1, 1] images, so a bright picture (no pixel below mid-grey) draws no range warning.
    return psnr(x, y8, data_range=2.0).item(), ssim(x, y8, data_range=2.0).item() if fits else None


def _print_quality(args: argparse.Namespace, out: Path, x: torch.Tensor, scores: tuple[float, float | None]) -> None:
    """reconstruct's result: the human line, or with --json one JSON object."""
    from klvae.evaluation.metrics import SSIM_RADIUS
    from klvae.evaluation.report import json_safe

    p, s = scores
    if args.json:
        # A lossless reconstruction's PSNR is inf, which JSON has not: null, as eval's summary.json writes it.
        print(json.dumps(json_safe({"input": str(args.image), "output": str(out), "psnr": p, "ssim": s,
                                    "size": [x.shape[-1], x.shape[-2]], "model": str(args.model)}), allow_nan=False))
        return
    shown = f"{s:.4f}" if s is not None else f"n/a (under {2 * SSIM_RADIUS + 1} px a side)"
    print(f"PSNR {p:.2f} dB  SSIM {shown}  -> {out}")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Encode and decode one image; print PSNR and SSIM against the original."""
    out = check_new_file(args.output, overwrite=args.overwrite, inputs=[args.image])
    image_format_for(out)
    x = pil_to_tensor(load_image(args.image))[None]
    check_format_size(out, x.shape[-1], x.shape[-2])
    tiling = tiling_from_args(args)
    vae, _, dtype = load_model(args)
    z = inference.encode(vae, x, dtype, tiling).mode()
    check_finite(z, "latents", args.image)
    y = inference.decode(vae, z, dtype, size=tuple(x.shape[-2:]), tiling=tiling).cpu()
    check_finite(y, "pixels", args.image)
    # Metrics on the image as it is written (8-bit, and after a lossy format's loss), as a viewer sees it;
    # computed first, so nothing fails after.
    picture = tensor_to_pil(y[0])
    scores = _quality(x, pil_to_tensor(as_written(picture, out))[None])
    save_image_atomic(picture, out, replace=args.overwrite)
    _print_quality(args, out, x, scores)
    return 0
