"""klvae vs diffusers AutoencoderKL side by side: same random weights, same inputs, one process.

Times are medians of CUDA-event (GPU) or perf_counter (CPU) timings after warm-ups; peak memory is
torch.cuda.max_memory_allocated (GPU only). Accuracy columns compare each output with the fp32 untiled
output of the same library (PSNR in dB over [-1, 1]; max abs difference).

    python benchmarks/bench.py --device cpu --dtype fp32 --cases decode:256:1 encode:256:1 --json out.json
    python benchmarks/bench.py --device cuda --dtype bf16        # the GPU table of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the diffusers import can hang looking for the hub

import torch

import klvae
from klvae import inference
from klvae.inference import TileOptions

GPU_CASES = [
    "decode:512:1", "decode:512:8", "encode:512:1", "encode:512:8", "decode:1024:1", "encode:1024:1",
    "decode:2048:1:tiled", "encode:2048:1:tiled", "decode:4096:1:tiled", "encode:4096:1:tiled",
]
CPU_CASES = ["decode:256:1", "encode:256:1", "decode:256:1:tiled", "encode:256:1:tiled"]


def make_pair(preset: str, device: torch.device, seed: int = 0) -> tuple[klvae.AutoencoderKL, torch.nn.Module]:
    """A klvae model with random weights and a diffusers model holding the same tensors."""
    from diffusers import AutoencoderKL as DiffusersVAE

    torch.manual_seed(seed)
    ours = klvae.AutoencoderKL(preset).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    c = ours.config
    n = len(c.block_out_channels)
    theirs = DiffusersVAE(
        in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=list(c.block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=c.layers_per_block, latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
        use_quant_conv=c.use_quant_conv, use_post_quant_conv=c.use_post_quant_conv,
        sample_size=c.sample_size, scaling_factor=c.scaling_factor,
    ).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # klvae's keys are diffusers' layout
    return ours.to(device), theirs.to(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds of fn() and the peak GiB it allocated (0 on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two tensors in [-1, 1]."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def run_case(case: str, ours: klvae.AutoencoderKL, theirs: torch.nn.Module, dtype: torch.dtype,
             device: torch.device, warmup: int, iters: int, tile_size: int | None = None) -> list[dict]:
    """Both libraries on one case ("op:size:batch[:tiled]"); rows with ms, images/s, GiB and accuracy."""
    op, size, batch, *rest = case.split(":")
    size, batch, tiled = int(size), int(batch), bool(rest)
    f, c = ours.downsample_factor, ours.config.latent_channels
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1) if op == "encode" else \
        torch.randn(batch, c, size // f, size // f, generator=g)
    x = x.to(device)
    tiling = TileOptions(enabled=False)
    if tiled:
        tiling = TileOptions(enabled=True, max_memory=2 * 2**30, tile_size=tile_size)
    if op == "encode":
        def run_ours(dt: torch.dtype, t: TileOptions = tiling) -> torch.Tensor:
            return inference.encode_moments(ours, x, dt, tiling=t)

        def run_theirs() -> torch.Tensor:
            return theirs.encode(x.to(dtype)).latent_dist.parameters
    else:
        def run_ours(dt: torch.dtype, t: TileOptions = tiling) -> torch.Tensor:
            return inference.decode(ours, x, dt, tiling=t)

        def run_theirs() -> torch.Tensor:
            return theirs.decode(x.to(dtype)).sample.clamp(-1, 1)  # as image pipelines (and klvae) do
    ref = run_ours(torch.float32, TileOptions(enabled=False)) if size <= 2048 or device.type == "cpu" else None
    rows = []
    ms, peak = timed(lambda: run_ours(dtype), device, warmup, iters)
    out = run_ours(dtype)
    rows.append(_row("klvae", case, batch, ms, peak, out, ref))
    theirs.to(dtype)
    if tiled:
        theirs.enable_tiling()
        if size <= theirs.tile_sample_min_size:  # small CPU cases: make diffusers really tile (4 tiles)
            theirs.tile_sample_min_size, theirs.tile_latent_min_size = size // 2, size // 2 // f
    with torch.no_grad():
        ms, peak = timed(run_theirs, device, warmup, iters)
        out = run_theirs()
    theirs.disable_tiling()
    theirs.tile_sample_min_size = ours.config.sample_size
    theirs.tile_latent_min_size = ours.config.sample_size // f
    theirs.float()
    rows.append(_row("diffusers" + (" enable_tiling()" if tiled else ""), case, batch, ms, peak, out, ref))
    return rows


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
    ap.add_argument("--tile-size", type=int, default=None, help="klvae strip height (default: from a 2 GiB budget)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = inference.resolve_dtype(args.dtype, device)
    torch.backends.cudnn.benchmark = True
    cases = args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    ours, theirs = make_pair(args.preset, device)
    rows = []
    for case in cases:
        rows += run_case(case, ours, theirs, dtype, device, args.warmup, args.iters, args.tile_size)
        for r in rows[-2:]:
            print(f"{r['case']:>22} {r['library']:>26} {r['ms']:10.1f} ms {r['images_per_s']:8.2f} img/s "
                  f"{r['peak_gib']:6.2f} GiB  PSNR {r.get('psnr_vs_fp32_untiled', float('nan')):6.1f} dB", flush=True)
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "klvae": klvae.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "dtype": args.dtype, "preset": args.preset}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
