"""Options and helpers that several commands share: the model, the device and the dtype."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from klvae.atomic import inside, temp_path
from klvae.errors import KlvaeError, cut
from klvae.images import IMAGE_EXTENSIONS
from klvae.inference.precision import resolve_dtype, usable_device
from klvae.inference.speed import SpeedOptions, optimize_for_inference
from klvae.inference.tiling import TileOptions
from klvae.model.autoencoder import AutoencoderKL
from klvae.weights.load import BuiltinName

if TYPE_CHECKING:
    from klvae.weights.load import WeightsSource

log = logging.getLogger("klvae")


def add_model_args(p: argparse.ArgumentParser, run: bool = True) -> None:
    """--model/--subfolder/--config, and with `run` the options of running it (`add_run_args`)."""
    p.add_argument("--model", "-m", default=None,
                   help="a diffusers folder, a .safetensors/.ckpt file, a hub id, a preset name (sd15, sdxl, ...) "
                        "whose released weights come from the hub, or 'demo' (the default: klvae's small built-in "
                        "model, which runs offline); a hub id or preset may pin a branch, tag or commit as "
                        "org/name@revision")
    p.add_argument("--subfolder", default=None, help="subfolder of a pipeline folder or hub repo (e.g. vae)")
    p.add_argument("--config", default=None,
                   help="preset whose config (and factors) a single weights file uses, e.g. sdxl")
    if run:
        add_run_args(p)
    else:  # a model only described: loaded on the CPU in fp32, with nothing to speed up
        p.set_defaults(device="cpu", dtype="fp32", batch_size=None, compile=False, fused_norm=False)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--device/--dtype/--batch-size/--compile/--no-fused-norm."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on GPUs that have it, else fp32), fp32, bf16, fp16 (on most CPUs tens of times "
                        "slower than fp32)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and decoder (GPU speed; the first batch of each size compiles)")
    p.add_argument("--no-fused-norm", dest="fused_norm", action="store_false", default=None,
                   help="on a GPU, run GroupNorm and SiLU with PyTorch's ops instead of klvae's Triton kernels")


def load_model(args: argparse.Namespace, before_cast: Callable[[AutoencoderKL], object] | None = None
               ) -> tuple[AutoencoderKL, torch.device, torch.dtype]:
    """The model named by --model on --device, with the compute dtype from --dtype; `before_cast` sees it as loaded,
    before optimize_for_inference may cast its weights to that dtype (fingerprints are of the weights as stored)."""
    if args.batch_size is not None and args.batch_size < 1:
        raise KlvaeError(f"--batch-size must be at least 1, got {args.batch_size}")
    # The batching (itertools.islice) takes no more; a batch past the image count is all of them anyway.
    if args.batch_size is not None and args.batch_size > sys.maxsize:
        raise KlvaeError(f"--batch-size must be at most {sys.maxsize}, got {args.batch_size}")
    device = usable_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype, device)
    default_model(args)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder=args.subfolder, config=args.config, device=device)
    log.info("model %s on %s, compute dtype %s", args.model, device, str(dtype).split(".")[-1])
    if before_cast is not None:
        before_cast(vae)
    optimize_for_inference(vae, dtype, SpeedOptions(compile=args.compile, fused_norm=args.fused_norm))
    return vae, device, dtype


def default_model(args: argparse.Namespace) -> str:
    """args.model, set to the built-in demo model (with a log line saying so) when --model was not given."""
    if args.model is None:
        args.model = BuiltinName("demo")
        log.info("no --model given: using klvae's built-in demo model (a small VAE trained by klvae, "
                 "not Stable Diffusion's; see docs/demo-model.md)")
    return args.model


NO_WEIGHTS = "preset, no weights (random init)"


def preset_to_describe(args: argparse.Namespace) -> str | None:
    """The preset `info` describes without weights: --config alone, or --model naming one with none released."""
    from klvae.model.config import PRESET_HUB_FILES, PRESET_HUB_IDS, PRESETS

    if args.model is None:
        name = args.config if args.config in PRESETS else None
    elif Path(args.model).expanduser().exists():  # a local folder or file comes first, as weights.load.locate has it
        name = None
    else:
        released = args.model in PRESET_HUB_IDS or args.model in PRESET_HUB_FILES
        # --config naming another preset is a config for weights, which such a preset lacks: loading says so.
        name = args.model if args.model in PRESETS and not released and args.config in (None, args.model) else None
    if name is not None and getattr(args, "subfolder", None):  # no files to look into: it would be ignored
        raise KlvaeError(f"--subfolder {args.subfolder!r} given, but preset {name!r} is described without weights")
    return name


def preset_on_meta(name: str) -> AutoencoderKL:
    """The preset's model built on the meta device: its shapes and counts, no memory for its weights."""
    with torch.device("meta"):
        return AutoencoderKL(name)


def check_seed(seed: int, flag: str = "--seed") -> int:
    """A seed torch's generators take: 0 to 2**63 - 1."""
    if not 0 <= seed < 2**63:
        raise KlvaeError(f"{flag} must be between 0 and {2**63 - 1}, got {seed}")
    return seed


_FILE_SUFFIXES = frozenset({*IMAGE_EXTENSIONS, ".gif", ".safetensors", ".latent", ".ckpt", ".pt", ".pth", ".bin",
                            ".json", ".onnx", ".gguf", ".zip", ".npy", ".npz", ".sft"})


def check_named(path: str | Path, flag: str) -> None:
    """KlvaeError for an empty or blank path (Path("") is the working folder, which no one names that way), or one
    starting with a ~ that no shell expanded."""
    if not str(path).strip():
        raise KlvaeError(f"{flag} is empty: name a {'file or folder' if flag != '--data' else 'data set'}")
    if str(path).startswith("~"):  # `--output=~/x` and `--set key=~/x` reach us unexpanded: a folder named ~
        raise KlvaeError(f"{flag} {path}: the shell left ~ unexpanded there; write the path out "
                         f"({Path(path).expanduser()})")


def check_output_path(path: str | Path, flag: str = "--output", *, folder: bool = False,
                      inputs: Iterable[str | Path] = ()) -> Path:
    """KlvaeError unless `path` can be written as a file (a folder with `folder`) and is none of `inputs`;
    creates nothing, so a bad output is refused before any work."""
    check_named(path, flag)
    if not folder and str(path).endswith(("/", os.sep)):  # Path() drops the slash: a file would be written
        raise KlvaeError(f"{flag} {path} ends in a slash, as a folder's name does; name a file")
    p = Path(path)
    # The nearest folder that exists is where the write (or the first mkdir) happens. Names are measured before
    # anything stats `p`: a name over the file system's limit makes every stat below it raise.
    parent = _nearest_existing(p if folder else p.parent, p, flag)
    _check_name_lengths(p, parent, flag, folder)
    if p.is_dir() and not folder:
        raise KlvaeError(f"{flag} {p} is a folder; name a file")
    if p.exists() and not p.is_dir() and folder:
        raise KlvaeError(f"{flag} {p} is a file, not a folder")
    if folder and not p.exists() and p.suffix.lower() in _FILE_SUFFIXES:
        # A new folder named like a file is almost always a file meant: `decode -o out.png` wants one image.
        raise KlvaeError(f"{flag} {p} is a folder to create, but its name ends like a file's; name a folder")
    # samefile: a symlink or hard link to an input is that input too.
    if p.is_file() and any(os.path.exists(q) and os.path.samefile(p, q) for q in inputs):
        raise KlvaeError(f"{flag} {p} is one of the inputs; it would be overwritten")
    if not parent.is_dir():
        raise KlvaeError(f"{flag} {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KlvaeError(f"{flag} {p}: no permission to write in {parent}")
    return p


def _nearest_existing(start: Path, p: Path, flag: str) -> Path:
    """`start` or its nearest ancestor that exists; KlvaeError for a link on the way that leads nowhere (mkdir
    would meet it as "File exists", after the work)."""
    while not os.path.exists(start) and start.parent != start:  # False, not an error, for names too long
        if os.path.islink(start):
            raise KlvaeError(f"{flag} {p}: {start} is a link to {os.readlink(start)}, which does not exist")
        start = start.parent
    return start


def _check_name_lengths(p: Path, parent: Path, flag: str, folder: bool) -> None:
    """KlvaeError when a folder still to be made below `parent`, or the file's temporary name (which is longer
    than its own), is longer than the file system's limit on one name; found before the work, not after it."""
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX") if parent.is_dir() else 255
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no limit it can tell
        limit = 255
    new = p.relative_to(parent).parts if p.is_relative_to(parent) else ()
    for name in new if folder else new[:-1]:
        if len(os.fsencode(name)) > limit:
            raise KlvaeError(f"{flag}: the folder name {cut(name, 35, tail=12)} is too long for this file system, "
                             f"which takes names of up to {limit} bytes")
    if not folder and p.name:  # "." and ".." name no file: they are refused as folders after this
        own, written = len(os.fsencode(p.name)), len(os.fsencode(temp_path(p).name))
        if written > limit:
            how = "" if own > limit else f" (klvae first writes it under a temporary name {written - own} bytes longer)"
            raise KlvaeError(f"{flag}: the file name {cut(p.name, 35, tail=12)} is too long for this file "
                             f"system{how}; it takes names of up to {limit} bytes")


def package_dir() -> Path:
    """The installed klvae package, which holds its built-in models (assets/demo)."""
    return Path(__file__).resolve().parents[1]


def check_model_output(out: Path, flag: str, *, overwrite: bool) -> None:
    """KlvaeError when writing a model to `out` (a file, or a folder's config.json and weights) would replace one
    there without --overwrite, or would write into klvae's own package (its built-in models)."""
    from klvae.weights.hub import CONFIG_NAME
    from klvae.weights.load import FOLDER_WEIGHTS

    if inside(out, package_dir()):
        raise KlvaeError(f"{flag} {out} is inside the installed klvae package ({package_dir()}), which holds its "
                         "built-in models; name another place")
    if not overwrite:
        # A link to nothing is held too, as check_new_file holds it: the write would replace it.
        held = [out] if out.is_file() or (out.is_symlink() and not out.exists()) else \
            [out / n for n in (CONFIG_NAME, *FOLDER_WEIGHTS) if (out / n).exists()]
        if held:
            # As decode does: a model written over another is lost, so it takes a word from the user.
            raise exists_error(flag, out, held[0])


def add_overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--overwrite, which lets the command replace `what` (said in its help)."""
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (refused without it)")


def exists_error(flag: str, out: Path, held: Path, note: str = "") -> KlvaeError:
    """The one error of every command whose output would replace `held`: `out` itself, or a file in the folder
    `out`; `note` (e.g. " (an earlier report)") follows the name of what is there."""
    where = f"{flag} {out}" if held == out else f"{flag} {out}: {held}"
    return KlvaeError(f"{where} already exists{note}; add --overwrite to replace it")


def check_new_file(path: str | Path, flag: str = "--output", *, overwrite: bool,
                   inputs: Iterable[str | Path] = ()) -> Path:
    """check_output_path for a file, and KlvaeError when a file (or a link) is already there, unless `overwrite`."""
    p = check_output_path(path, flag, inputs=inputs)
    # An earlier result (latents of a long encode, a reconstruction kept) is lost once replaced; the rename that
    # lands the new file would replace it silently, so it takes a word from the user. lexists: a dangling link too.
    if not overwrite and os.path.lexists(p):
        raise exists_error(flag, p, p)
    return p


def check_not_the_model(out: Path, flag: str, source: WeightsSource, *, folder: bool, what: str) -> None:
    """KlvaeError when writing `out` would replace, or (a `folder`) sit over, a file that the model is read from;
    `what` names that model in the message, e.g. "the model being converted"."""
    if not out.exists():
        return  # nothing there yet, so no file being read is there
    for f in source.files:
        # samefile: a link to a read file, or a hub cache entry (a link to a blob), is that file too.
        if os.path.samefile(out, f):
            raise KlvaeError(f"{flag} {out} would overwrite {what} ({f}); name another place")
        # A folder output gets its config.json and weights replaced, and whatever else is in it (a pipeline's
        # vae/, another weights file) becomes part of the new model's folder.
        if folder and inside(f, out):
            raise KlvaeError(f"{flag} {out} holds {what} ({f}); name another place")


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'2GiB', '1.5G', '512M', '1TiB', '1e9' or a plain byte count -> bytes (K, M, G, T are powers of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise KlvaeError(f"cannot read the memory size {text!r}; write e.g. 2GiB, 512M or 1000000")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value):  # '1e999' is inf, which int() cannot take
        raise KlvaeError(f"the memory size {text!r} is too large")
    return int(value)


def add_tiling_args(p: argparse.ArgumentParser) -> None:
    """--tile-size/--max-memory: exact tiling of large images in bounded device memory."""
    p.add_argument("--tile-size", type=int, default=None,
                   help="strip height in image pixel rows (any value from 1; exact whatever it is, as the tiling "
                        "has no seams; small strips only run slower); turns exact tiling on, and overrides the strip "
                        "heights that --max-memory would choose")
    p.add_argument("--max-memory", default=None,
                   help="device memory budget, e.g. 2GiB, 512M or a byte count: tiles when the untiled pass "
                        "would not fit. On a GPU it bounds GPU memory; on the CPU only each strip's work, as a "
                        "tiled pass still holds whole-image maps in RAM: about 2 KiB per output pixel for an "
                        "SD-sized decoder in fp32 (1.5 KiB encoding, half in bf16), half what untiled takes")


def tiling_from_args(args: argparse.Namespace) -> TileOptions | None:
    """The TileOptions that --tile-size/--max-memory describe (None: untiled with the OOM fall-back)."""
    if args.tile_size is None and args.max_memory is None:
        return None
    if args.tile_size is not None and args.tile_size < 1:
        raise KlvaeError(f"--tile-size must be at least 1, got {args.tile_size}")
    budget = parse_bytes(args.max_memory) if args.max_memory is not None else None
    # 0 (or 0.5 bytes, rounded down) would otherwise mean "no budget given", i.e. the 2 GiB default.
    if budget is not None and budget < 1:
        raise KlvaeError(f"--max-memory must be at least 1 byte, got {args.max_memory!r}")
    return TileOptions(tile_size=args.tile_size, max_memory=budget)
