"""Host <-> GPU traffic of klvae's exact tiling at a given size, counted on the meta device (no GPU, no time).

When the GPU budget is small the tiled path keeps big maps in host memory and moves strips across the bus; at
4096² that traffic, not arithmetic, bounds the tiled decode's time. This counts the bytes each way, as the
GPU path would move them (same budget, same placement of maps), for the sd15 architecture.

    python benchmarks/traffic.py --size 4096 2048 --max-memory 2
"""

from __future__ import annotations

import argparse

import torch

import klvae
from klvae.inference import TileOptions, tiling
from klvae.inference.streaming import Streamer


class CountingStreamer(Streamer):
    """A Streamer that counts the bytes its strips would carry between host maps and the device."""

    up: int = 0
    down: int = 0

    def new_map(self, b: int, c: int, h: int, w: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, sums = super().new_map(b, c, h, w)
        out.on_host = b * c * h * w * out.element_size() > self.resident  # where the GPU path would put it
        return out, sums

    def to_dev(self, t: torch.Tensor) -> torch.Tensor:
        if getattr(t if t._base is None else t._base, "on_host", True):  # input images and latents: host
            self.up += t.numel() * t.element_size()
        return super().to_dev(t)

    def write(self, out: torch.Tensor, a: int, e: int, y: torch.Tensor, sums: list[torch.Tensor]) -> None:
        if out.on_host:
            self.down += y.numel() * out.element_size()
        super().write(out, a, e, y, sums)


def count(vae: klvae.AutoencoderKL, op: str, size: int, max_memory: int) -> CountingStreamer:
    """Run one tiled encode or decode of a size² image on the meta device; the streamer holds the counts."""
    meta = torch.device("meta")
    budget, resident = tiling.budgets(TileOptions(max_memory=max_memory))
    st = CountingStreamer(device=meta, storage=meta, dtype=torch.bfloat16, budget=budget, image_height=size,
                          channels_last=True, resident=resident, recompute=True)  # as on a GPU
    f, c = vae.downsample_factor, vae.config.latent_channels
    with torch.no_grad():
        if op == "decode":
            tiling.tiled_decode(vae, torch.zeros(1, c, size // f, size // f, device=meta, dtype=torch.bfloat16), st)
        else:
            tiling.tiled_encode_moments(vae, torch.zeros(1, 3, size, size, device=meta, dtype=torch.bfloat16), st)
    return st


def meta_model(preset: str) -> klvae.AutoencoderKL:
    """The preset's architecture on the meta device, in bf16, with its upsamplers folded (the GPU default)."""
    with torch.device("meta"):
        vae = klvae.AutoencoderKL(preset).eval().to(torch.bfloat16)
    for m in vae.modules():
        if hasattr(m, "fold"):
            m.fold = True
    return vae


def main() -> None:
    """Count both directions for each size and print them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--max-memory", type=float, default=2.0, help="GPU budget in GiB (default 2)")
    ap.add_argument("--preset", default="sd15")
    args = ap.parse_args()
    vae = meta_model(args.preset)
    for size in args.size:
        for op in ("decode", "encode"):
            st = count(vae, op, size, int(args.max_memory * 2**30))
            print(f"{op} {size}²: host->GPU {st.up / 2**30:6.1f} GiB, GPU->host {st.down / 2**30:6.1f} GiB, "
                  f"statistics passes {st.stat_passes}")


if __name__ == "__main__":
    main()
