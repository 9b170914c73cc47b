"""`klvae eval`: reconstruction quality of one or more models on a data set, as a report folder."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klvae.cli.common import (
    add_overwrite_arg,
    add_run_args,
    add_tiling_args,
    check_named,
    check_output_path,
    exists_error,
    tiling_from_args,
)
from klvae.errors import KlvaeError, first_line, flag, flag_errors

if TYPE_CHECKING:
    import torch

    from klvae.evaluation.evaluate import EvalOptions

log = logging.getLogger("klvae")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the eval subcommand."""
    p = sub.add_parser(
        "eval", help="PSNR/SSIM/LPIPS per image and rFID of one or more models on a data set; writes a report",
        description="Reconstruct a data set with each --model and write metrics.csv, summary.json and index.html.",
    )
    p.add_argument("--model", "-m", action="append", default=None,
                   help="a diffusers folder, weights file, hub id, preset or 'demo' (the default); repeat to "
                        "compare models side by side")
    p.add_argument("--subfolder", action="append", default=None,
                   help="subfolder of a pipeline folder or hub repo; once for all models, or once per --model")
    p.add_argument("--config", action="append", default=None,
                   help="preset whose config a single weights file uses; once for all models, or once per --model")
    p.add_argument("--data", "-d", required=True,
                   help="image folder, Hugging Face dataset folder, parquet file(s) or .tar shards")
    p.add_argument("--image-column", default="image", help="image column of a dataset or parquet table")
    p.add_argument("-o", "--output", required=True,
                   help="report folder (created; an existing one must not hold an earlier report)")
    add_overwrite_arg(p, "an earlier report's index.html, summary.json, metrics.csv and example PNGs in --output, "
                         "leaving other files there")
    p.add_argument("--resolution", type=int, default=None,
                   help="side of the centre crop (default 256); smaller images are enlarged to cover it")
    p.add_argument("--crop", choices=("center", "none"), default="center",
                   help="center: resize to cover and centre-crop to --resolution; none: the full image")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--examples", type=int, default=4, help="best and worst N images per model in index.html")
    add_run_args(p)
    add_tiling_args(p)
    p.add_argument("--no-lpips", action="store_true", help="leave LPIPS out")
    p.add_argument("--lpips-vgg", default=None, help="torchvision VGG16 weights file (vgg16-397923af.pth) for LPIPS")
    p.add_argument("--lpips-lin", default=None, help="LPIPS v0.1 linear heads file (the lpips package's vgg.pth)")
    p.add_argument("--no-fid", action="store_true", help="leave rFID out")
    p.add_argument("--inception-weights", default=None,
                   help="FID Inception weights file (weights-inception-2015-12-05-6726825d.pth)")
    p.set_defaults(func=cmd_eval)


def _per_model(values: list[str] | None, n: int, flag: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return [values[0]] * n
    if len(values) != n:
        raise KlvaeError(f"{flag} given {len(values)} times for {n} models; give it once, or once per --model")
    return [*values]


def _model_names(specs: list[str]) -> list[str]:
    # The same model twice (e.g. at two dtypes in a script) still needs distinct report columns.
    names: list[str] = []
    for s in specs:
        name, k = s, 2
        while name in names:
            name, k = f"{s} #{k}", k + 1
        names.append(name)
    return names


def check_report_output(out: Path, overwrite: bool) -> None:
    """KlvaeError when the folder `out` holds an earlier report (any of its files) and not `overwrite`, or a
    folder where the report writes a file (always)."""
    from klvae.evaluation.report import EXAMPLE_PNG, REPORT_FILES

    if not out.is_dir():
        return  # a new folder: nothing to replace
    held = [out / n for n in REPORT_FILES if os.path.lexists(out / n)]
    if (out / "images").is_dir():
        held += sorted(p for p in (out / "images").iterdir() if EXAMPLE_PNG.fullmatch(p.name))
    elif os.path.lexists(out / "images"):
        raise KlvaeError(f"--output {out}: {out / 'images'} is not a folder; the report's example PNGs go there")
    if folders := [p for p in held if p.is_dir()]:
        raise KlvaeError(f"--output {out}: {folders[0]} is a folder; the report's file of that name cannot replace it")
    # One report's table beside another's pictures would be read as one run: mixing them takes a word from the user.
    if held and not overwrite:
        raise exists_error("--output", out, held[0], " (an earlier report)")


def _resolution(args: argparse.Namespace) -> int:
    # --crop none measures full images: a --resolution there would be silently ignored, so it is refused.
    if args.resolution is None:
        return 256
    if args.crop == "none":
        raise KlvaeError("--resolution applies to --crop center only; leave it out with --crop none")
    return args.resolution


def _load_models(args: argparse.Namespace, device: torch.device, opts: EvalOptions) -> dict[str, Any]:
    """Every --model loaded and made ready for inference, keyed by its report name."""
    from klvae.inference import SpeedOptions, optimize_for_inference
    from klvae.model.autoencoder import AutoencoderKL

    subfolders = _per_model(args.subfolder, len(args.model), "--subfolder")
    configs = _per_model(args.config, len(args.model), "--config")
    models = {}
    for name, spec, sub, cfg in zip(_model_names(args.model), args.model, subfolders, configs, strict=True):
        try:
            vae = AutoencoderKL.from_pretrained(spec, subfolder=sub, config=cfg, device=device)
        except KlvaeError as e:
            # With several models, say which one: "weights do not fit config 'sdxl'" alone does not.
            if len(args.model) == 1 or spec in str(e):
                raise
            raise KlvaeError(f"--model {spec}: {first_line(e)}") from None
        # The same levers as encode/decode/reconstruct, so that eval scores what those commands produce.
        models[name] = optimize_for_inference(vae, opts.dtype,
                                              SpeedOptions(compile=args.compile, fused_norm=args.fused_norm))
        log.info("model %s on %s", spec, device)
    return models


def _check_named_weights(args: argparse.Namespace) -> None:
    # A missing file named on the command line fails before the models load; its content is checked when it loads.
    for option, path, off in (("--lpips-vgg", args.lpips_vgg, "--no-lpips"), ("--lpips-lin", args.lpips_lin,
                              "--no-lpips"), ("--inception-weights", args.inception_weights, "--no-fid")):
        if path is not None and getattr(args, off[2:].replace("-", "_")):
            # As --resolution with --crop none: a file that would be silently ignored is refused.
            raise KlvaeError(f"{option} names weights of a metric {off} leaves out; leave one of them out")
        if path is not None and not Path(path).expanduser().is_file():
            raise KlvaeError(f"{option} {Path(path).expanduser()}: no such file")


def _flag(name: str, *value: object) -> str:
    """An option of build_metric_nets named as the flag that sets it (--no-lpips and --no-fid turn metrics off)."""
    if value == (False,) and name in ("lpips", "fid"):
        return f"--no-{name}"
    return flag(name, *value)


@flag_errors  # EvalOptions' checks name its fields
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate the models and write the report; exit 1 when some images were unreadable or a model failed on some."""
    from klvae.evaluation.evaluate import EvalOptions, build_metric_nets, check_report_place, run_evaluation
    from klvae.inference import resolve_dtype, usable_device
    from klvae.latents.sources import open_source
    from klvae.weights.load import BuiltinName

    device = usable_device(args.device, "--device")
    opts = EvalOptions(
        resolution=_resolution(args), crop=args.crop, limit=args.limit, batch_size=args.batch_size,
        dtype=resolve_dtype(args.dtype, device), tiling=tiling_from_args(args), examples=args.examples,
        image_column=args.image_column,
    )
    opts.check()
    check_named(args.data, "--data")
    check_output_path(args.output, folder=True)  # before the work, not after it
    check_report_output(Path(args.output), args.overwrite)
    check_report_place(args.output, args.data, "--output", "--data")
    source = open_source(args.data, image_column=args.image_column)  # bad data before any model or download
    if not source.ids:
        raise KlvaeError(f"--data {args.data} holds no images")
    if not args.model:
        args.model = [BuiltinName("demo")]
        log.info("no --model given: evaluating klvae's built-in demo model (see docs/demo-model.md)")
    _check_named_weights(args)
    # Models before metric nets: a mistyped --model must not cost the VGG16 and Inception downloads first.
    models = _load_models(args, device, opts)
    # Named weight files are checked before the work: a wrong one is an error, not a missing metric.
    nets = build_metric_nets(device, lpips=not args.no_lpips, lpips_vgg=args.lpips_vgg, lpips_lin=args.lpips_lin,
                             fid=not args.no_fid, inception_weights=args.inception_weights, names=_flag)
    summary = run_evaluation(models, args.data, args.output, opts, nets, device, source)
    _print_summary(summary, Path(args.output))
    failed = any(m.get("failed") for m in summary["models"].values())
    return 1 if summary["images"]["skipped"] or failed else 0


def _print_summary(summary: dict, out: Path) -> None:
    from klvae.evaluation.report import failure_note, rfid_sample_note

    def num(stats: dict, digits: int, psnr: bool = False) -> str:
        if stats["mean"] is not None:
            return f"{stats['mean']:.{digits}f}"
        # None: not finite in summary.json; a PSNR over scored images is +inf there (identical reconstructions).
        return "inf" if psnr and stats.get("n") else "n/a"

    for name, m in summary["models"].items():
        bits = [f"PSNR {num(m['psnr'], 2, psnr=True)} dB", f"SSIM {num(m['ssim'], 4)}"]
        if "lpips" in m:
            bits.append(f"LPIPS {num(m['lpips'], 4)}")
        if "rfid" in m and m["rfid"]["value"] is not None:
            bits.append(f"rFID {m['rfid']['value']:.3f} ({rfid_sample_note(m['rfid'])})")
        print(f"{name}: {', '.join(bits)}")
        if m.get("failed"):
            print(f"  {failure_note(name, m, summary['images']['evaluated'])}")
    imgs = summary["images"]
    skipped = f", {imgs['skipped']} skipped" if imgs["skipped"] else ""
    noun = "image" if imgs["evaluated"] == 1 else "images"
    print(f"{imgs['evaluated']} {noun}{skipped}; report: {out / 'index.html'}")
