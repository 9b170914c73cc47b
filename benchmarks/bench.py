"""klvae vs diffusers AutoencoderKL side by side: same random weights, same inputs, one process.

Times are medians of CUDA-event (GPU) or perf_counter (CPU) timings after warm-ups, the variants taking
turns; peak memory (GPU only) is torch.cuda.max_memory_allocated during the timed calls above what was
resident, plus the variant's own weights and input. Accuracy columns compare each output with klvae's fp32
untiled output (equal to diffusers' in fp32: see tests/weights/test_parity.py), as PSNR in dB over [-1, 1] and max
abs difference; above 2048² on a GPU, where untiled fp32 does not fit, with klvae's exact strips in fp32
(row key "reference").
Variants: klvae (fp32 weights under autocast), klvae-fast (optimize_for_inference: folded upsampling; on
GPUs also weights in the compute dtype, channels_last and the fused GroupNorm + SiLU kernels), klvae-unfused
(klvae-fast with PyTorch's GroupNorm and SiLU, to weigh the kernels), klvae-unfolded (klvae-fast without the folded
upsampling, to weigh that lever), klvae-nchw (klvae-fast in NCHW: eager GroupNorm on CUDA may not keep
channels_last), klvae-compiled (klvae-fast plus torch.compile), diffusers (weights in the
compute dtype) and diffusers-compiled (plus channels_last and torch.compile, the peer's fastest setting).

    python benchmarks/bench.py --device cpu --dtype fp32 --cases decode:256:1 encode:256:1 --json out.json
    python benchmarks/bench.py --device cuda --dtype bf16        # the GPU table of docs/benchmarks.md
    python benchmarks/bench.py --device cuda --variants klvae-fast diffusers --cases decode:512:8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the diffusers import can hang looking for the hub

import torch

import klvae
from klvae import inference
from klvae.evaluation.report import json_safe
from klvae.inference import SpeedOptions, TileOptions, optimize_for_inference

# A model a variant runs: a klvae.AutoencoderKL, or a diffusers one (untyped: its tiling switches and sizes are
# plain attributes that torch's Module stub cannot see).
Model = Any

GPU_CASES = [
    "decode:512:1", "decode:512:8", "encode:512:1", "encode:512:8", "decode:1024:1", "encode:1024:1",
    "decode:2048:1:tiled", "encode:2048:1:tiled", "decode:4096:1:tiled", "encode:4096:1:tiled",
]
CPU_CASES = ["decode:256:1", "encode:256:1", "decode:256:1:tiled", "encode:256:1:tiled"]


def make_pair(preset: str, device: torch.device, seed: int = 0) -> tuple[klvae.AutoencoderKL, Model]:
    """A klvae model with random weights and a diffusers model holding the same tensors."""
    from diffusers import AutoencoderKL as DiffusersVAE

    torch.manual_seed(seed)
    ours = klvae.AutoencoderKL(preset).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    c = ours.config
    n = len(c.block_out_channels)
    theirs: Model = DiffusersVAE(
        in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=list(c.block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=c.layers_per_block, latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
        use_quant_conv=c.use_quant_conv, use_post_quant_conv=c.use_post_quant_conv,
        sample_size=c.sample_size, scaling_factor=c.scaling_factor,
    )
    theirs.eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # klvae's keys are diffusers' layout
    return ours.to(device), theirs.to(device)


def time_once(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """Milliseconds of one fn() call and the peak GiB it allocated on top of what was resident (0 on the CPU)."""
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, 0.0
    with torch.cuda.device(device):  # --device cuda:N: the events, the waits and the peak are that GPU's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / 2**30


def timed_round_robin(fns: dict[str, Callable[[], torch.Tensor]], device: torch.device, warmup: int,
                      iters: int) -> dict[str, tuple[float, float]]:
    """Median ms and max peak GiB of each fn; the variants take turns, so drift in the machine's speed (other
    load, clocks) reaches all of them alike instead of whichever ran during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0.0)
    for _ in range(iters):
        for name, fn in fns.items():
            ms, peak = time_once(fn, device)
            times[name].append(ms)
            peaks[name] = max(peaks[name], peak)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}


def resident_gib(model: torch.nn.Module, x: torch.Tensor) -> float:
    """What one job holds before it starts: its model's weights and its input."""
    n = sum(p.numel() * p.element_size() for p in model.parameters()) + x.numel() * x.element_size()
    return n / 2**30


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two tensors in [-1, 1]."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


OURS = ("klvae", "klvae-fast", "klvae-unfused", "klvae-unfolded", "klvae-nchw", "klvae-compiled")
THEIRS = ("diffusers", "diffusers-compiled")


def make_variants(ours: klvae.AutoencoderKL, theirs: Model, dtype: torch.dtype,
                  names: list[str]) -> dict[str, Model]:
    """The models each variant runs: klvae as loaded (fp32 weights under autocast), klvae with the inference
    levers, klvae compiled; diffusers with weights in the compute dtype, eager and compiled + channels_last."""
    out: dict[str, Model] = {}
    for name in names:
        if name == "klvae":
            out[name] = ours
        elif name in OURS:
            opts = SpeedOptions(compile=name == "klvae-compiled", fold_upsample=name != "klvae-unfolded",
                                channels_last=False if name == "klvae-nchw" else None,
                                fused_norm=False if name == "klvae-unfused" else None)
            out[name] = optimize_for_inference(copy.deepcopy(ours), dtype, opts)
        elif name == "diffusers":
            out[name] = copy.deepcopy(theirs).to(dtype)
        elif name == "diffusers-compiled":
            m = copy.deepcopy(theirs).to(dtype).to(memory_format=torch.channels_last)
            m.encoder.compile(dynamic=False)
            m.decoder.compile(dynamic=False)
            out[name] = m
        else:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(OURS + THEIRS)}")
    return out


def run_case(case: str, ours: klvae.AutoencoderKL, models: dict[str, Model], dtype: torch.dtype,
             device: torch.device, warmup: int, iters: int, tile_size: int | None = None) -> list[dict]:
    """Every variant on one case ("op:size:batch[:tiled]"); rows with ms, images/s, GiB and accuracy.
    `ours` is the fp32 klvae model that gives the reference output."""
    op, size_text, batch_text, *rest = case.split(":")
    size, batch, tiled = int(size_text), int(batch_text), bool(rest)
    f, c = ours.downsample_factor, ours.config.latent_channels
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1) if op == "encode" else \
        torch.randn(batch, c, size // f, size // f, generator=g)
    x = x.to(device)
    tiling = TileOptions(enabled=tiled, max_memory=2 * 2**30 if tiled else None, tile_size=tile_size)
    with _true_fp32():
        if size <= 2048 or device.type == "cpu":
            ref, ref_kind = _run_ours(ours, op, x, torch.float32, TileOptions(enabled=False)), "fp32 untiled"
        else:  # untiled fp32 needs ~76 GiB at 4096²; exact strips in fp32 match it to ~120 dB (tests/inference)
            big = TileOptions(enabled=True, max_memory=32 * 2**30)
            ref, ref_kind = _run_ours(ours, op, x, torch.float32, big), "fp32 exact-tiled"
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for name, model in models.items():
        if tiled and name.endswith("-compiled"):
            continue  # the compiled graphs are for whole images; tiling runs the blocks one by one
        if name.startswith("klvae"):
            fns[name] = functools.partial(_run_ours, model, op, x, dtype, tiling)
        else:
            fns[name] = _theirs_fn(model, op, x, dtype, tiled, size, f)
    with torch.no_grad():
        timings = timed_round_robin(fns, device, warmup, iters)
    rows = []
    for name, fn in fns.items():
        ms, peak = timings[name]
        with torch.no_grad():
            out = fn()
        if device.type == "cuda":  # the other variants' weights stay resident: count only this job's
            peak += resident_gib(models[name], x)
        label = name + (" enable_tiling()" if tiled and not name.startswith("klvae") else "")
        rows.append({**_row(label, case, batch, ms, peak, out, ref), "reference": ref_kind})
        del out
    for name in fns:
        if not name.startswith("klvae"):  # back to untiled, with the tile sizes of its config
            models[name].disable_tiling()
            side = ours.config.sample_size
            models[name].tile_sample_min_size, models[name].tile_latent_min_size = side, side // f
    return rows


@contextlib.contextmanager
def _true_fp32() -> Iterator[None]:
    # cuDNN convolutions default to TF32 (10-bit mantissa) in "fp32": the reference must be real fp32.
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _run_ours(m: klvae.AutoencoderKL, op: str, x: torch.Tensor, dt: torch.dtype, t: TileOptions) -> torch.Tensor:
    if op == "encode":
        return inference.encode_moments(m, x, dt, tiling=t)
    return inference.decode(m, x, dt, tiling=t)


def _theirs_fn(m: Model, op: str, x: torch.Tensor, dtype: torch.dtype, tiled: bool, size: int,
               f: int) -> Callable[[], torch.Tensor]:
    if tiled:
        m.enable_tiling()
        if size <= m.tile_sample_min_size:  # small CPU cases: make diffusers really tile (4 tiles)
            m.tile_sample_min_size, m.tile_latent_min_size = size // 2, size // 2 // f
    xd = x.to(dtype)
    if op == "encode":
        return lambda: m.encode(xd).latent_dist.parameters
    return lambda: m.decode(xd).sample.clamp(-1, 1)  # as image pipelines (and klvae) do


def _row(lib: str, case: str, batch: int, ms: float, peak: float, out: torch.Tensor, ref: torch.Tensor | None) -> dict:
    acc = {} if ref is None else {"psnr_vs_fp32_untiled": psnr(out, ref),
                                  "max_abs_vs_fp32_untiled": (out.float() - ref.float()).abs().max().item()}
    return {"library": lib, "case": case, "ms": ms, "images_per_s": batch * 1e3 / ms, "peak_gib": peak, **acc}


def main() -> None:
    """Parse arguments, run every case, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--cases", nargs="*", default=None, help="op:size:batch[:tiled], e.g. decode:512:8")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", nargs="*", default=None, help=f"some of {', '.join(OURS + THEIRS)} "
                    "(default: all on a GPU; klvae, klvae-fast and diffusers on the CPU)")
    ap.add_argument("--tile-size", type=int, default=None, help="klvae strip height (default: from a 2 GiB budget)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = inference.resolve_dtype(args.dtype, device)
    torch.backends.cudnn.benchmark = True
    cases = args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    ours, theirs = make_pair(args.preset, device)
    cpu_names = ["klvae", "klvae-fast", "diffusers"]
    names = args.variants or (list(OURS + THEIRS) if device.type == "cuda" else cpu_names)
    models = make_variants(ours, theirs, dtype, names)
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "klvae": klvae.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "dtype": args.dtype, "preset": args.preset}
    rows = []
    for case in cases:
        new = run_case(case, ours, models, dtype, device, args.warmup, args.iters, args.tile_size)
        for r in new:
            print(f"{r['case']:>22} {r['library']:>34} {r['ms']:10.1f} ms {r['images_per_s']:8.2f} img/s "
                  f"{r['peak_gib']:6.2f} GiB  PSNR {r.get('psnr_vs_fp32_untiled', float('nan')):6.1f} dB", flush=True)
        rows += new
        if args.json:  # after every case: a run stopped at a time limit keeps what it measured
            # An exact result's PSNR is inf, which JSON lacks: null there (its max_abs_vs_fp32_untiled is 0).
            text = json.dumps(json_safe({"env": env, "rows": rows}), indent=2, allow_nan=False)
            Path(args.json + ".tmp").write_text(text)
            os.replace(args.json + ".tmp", args.json)

if __name__ == "__main__":
    main()
