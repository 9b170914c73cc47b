"""`klvae convert`: write a model in another weights format (a diffusers folder, or one LDM-layout file)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from klvae.cli.common import check_model_output, check_named, check_not_the_model, check_output_path
from klvae.errors import KlvaeError, WeightsError
from klvae.inference.precision import DTYPES

if TYPE_CHECKING:
    from klvae.model.autoencoder import AutoencoderKL

FORMATS = ("diffusers", "ldm")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the convert subcommand."""
    p = sub.add_parser("convert", help="write a model as a diffusers folder or one LDM-layout .safetensors file "
                                       "(the single-file form ComfyUI and the SD web UIs load)")
    p.add_argument("--model", "-m", required=True,
                   help="a diffusers folder, a .safetensors/.ckpt file (full SD checkpoints too), a hub id or a preset")
    p.add_argument("--subfolder", default=None, help="subfolder of a pipeline folder or hub repo (e.g. vae)")
    p.add_argument("--config", default=None, help="preset whose config a single weights file uses, e.g. sdxl")
    p.add_argument("-o", "--output", required=True,
                   help="a folder (diffusers layout) or a .safetensors file (LDM layout)")
    p.add_argument("--to", choices=FORMATS, default=None,
                   help="the format; by default ldm when --output ends in .safetensors or .sft, else diffusers")
    p.add_argument("--dtype", default="fp32", help="storage dtype: fp32 (default), fp16 or bf16 (half the size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, or the config.json and weights of an existing folder")
    p.set_defaults(func=cmd_convert)


def _target(args: argparse.Namespace) -> tuple[str, Path]:
    from klvae.weights.read import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

    check_named(args.output, "--output")  # Path("") is the working folder
    out = Path(args.output)
    single = out.suffix.lower() in SAFETENSORS_SUFFIXES  # .sft too, the name ComfyUI also reads
    fmt = args.to or ("ldm" if single else "diffusers")
    if fmt == "ldm" and not single:
        raise KlvaeError(f"--output {out}: an LDM-layout file must end in .safetensors (or .sft)")
    if out.suffix.lower() in PICKLE_SUFFIXES:
        raise KlvaeError(f"--output {out}: klvae writes weights as safetensors, not pickles; name a .safetensors "
                         "file (LDM layout) or a folder (diffusers layout)")
    if fmt == "diffusers" and single:
        raise KlvaeError(f"--output {out}: the diffusers layout is a folder; name a folder, or use --to ldm")
    check_output_path(out, folder=fmt == "diffusers")
    check_model_output(out, "--output", overwrite=args.overwrite)
    return fmt, out


def cmd_convert(args: argparse.Namespace) -> int:
    """Load the model, cast its weights to --dtype, and write them in the other format."""
    from klvae.model.autoencoder import AutoencoderKL
    from klvae.weights.load import load_source, locate
    from klvae.weights.save import export_ldm

    dtype = DTYPES.get(str(args.dtype).lower())
    if dtype is None:
        raise KlvaeError(f"--dtype must be one of fp32, fp16, bf16, got {args.dtype!r}")
    fmt, out = _target(args)  # all refused before the (perhaps large, perhaps downloaded) weights load
    source = locate(args.model, args.subfolder)
    # The files that will be read, wherever --model found them.
    check_not_the_model(out, "--output", source, folder=fmt == "diffusers", what="the model being converted")
    # Weights that are inf or NaN, or become so in --dtype, are refused here: none is written for others to load.
    vae = load_source(AutoencoderKL, source, config=args.config, dtype=dtype)
    if fmt == "ldm":
        export_ldm(vae, out)
    else:
        check_diffusers_can_hold(vae, "write it as one LDM-layout file instead, -o NAME.safetensors (or --to ldm)")
        vae.save_pretrained(out)
    n = vae.num_parameters()["total"]
    print(f"wrote {out} ({fmt} layout, {args.dtype} weights, {n:,} parameters)")
    return 0


def check_diffusers_can_hold(vae: AutoencoderKL, fix: str) -> None:
    """KlvaeError, ending in `fix`, when a diffusers folder cannot hold this model (before any work is done)."""
    from klvae.weights.diffusers_config import LDM_HINT, config_to_diffusers

    try:
        config_to_diffusers(vae.config)
    except WeightsError as e:
        raise KlvaeError(f"{str(e).removesuffix(LDM_HINT)}: {fix}") from None
