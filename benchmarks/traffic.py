"""Host <-> GPU traffic and peak GPU memory of klvae's exact tiling, counted on the meta device (no GPU, no time).

When the GPU budget is small the tiled path keeps big maps in host memory and moves strips across the bus; at
4096² that traffic, not arithmetic, bounds the tiled decode's time. This counts the bytes each way, as the
GPU path would move them (same budget, same placement of maps), for the sd15 architecture, and the peak of
the bytes held on the GPU: every tensor the job allocates there, while it lives, plus the weights. The peak
leaves out what the meta device cannot see: the caching allocator's slack, cuDNN workspaces, CUDA context.
Attention is counted as plain math (its score chunks materialised), which a fused kernel only lowers.

    python benchmarks/traffic.py --size 4096 2048 --max-memory 2
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import klvae
from klvae.inference import TileOptions, tiling
from klvae.inference.streaming import Streamer
from klvae.model.blocks import Upsample


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while it lives (the next one, if `host`, not at all)."""

    def __init__(self, known: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.now = self.peak = 0
        self.host = False  # set just before a host map is allocated
        # Storages made before counting (the weights, counted apart, and the input, in host memory): a view of
        # one, such as a strip of the input, is not a new allocation.
        self._seen: set[int] = {t.untyped_storage()._cdata for t in known}

    def __torch_dispatch__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self._seen:
                st = t.untyped_storage()
                n = 0 if self.host else st.nbytes()
                self.host = False
                self._seen.add(st._cdata)
                self.now += n
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._free, st._cdata, n)  # a storage's Python object lives as long as it
        return out

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.now -= n


class CountingStreamer(Streamer):
    """A Streamer that counts the bytes its strips would carry between host maps and the device."""

    up: int = 0
    down: int = 0
    live: LiveBytes | None = None
    peak: int = 0  # set by count(): the most bytes held on the GPU at once, weights included
    flops: int = 0  # set by count(): the arithmetic the job did

    @property
    def separate_storage(self) -> bool:
        return True  # the meta device stands for both the GPU and host memory

    def empty(self, shape: tuple[int, ...], fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        host = not self.on_device(shape)  # where the GPU path would put it
        if self.live is not None:
            self.live.host = host
        out = super().empty(shape, fmt)
        out.on_host = host  # type: ignore[attr-defined]  # a mark to_dev and put read back off the storage's base
        return out

    def to_dev(self, t: torch.Tensor) -> torch.Tensor:
        if getattr(t if t._base is None else t._base, "on_host", True):  # input images and latents: host
            self.up += t.numel() * t.element_size()
        return super().to_dev(t)

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.up += src.numel() * src.element_size()
        super().upload(dst, src)

    def put(self, dst: torch.Tensor, y: torch.Tensor) -> None:
        if getattr(dst if dst._base is None else dst._base, "on_host", False):
            self.down += y.numel() * dst.element_size()
        super().put(dst, y)


def count(vae: klvae.AutoencoderKL, op: str, size: int, max_memory: int) -> CountingStreamer:
    """Run one tiled encode or decode of a size² image on the meta device; the streamer holds the counts, and
    `peak` the most bytes held on the GPU at once (weights included) and `flops` the arithmetic done."""
    meta = torch.device("meta")
    weights = tiling.weight_bytes(vae)
    budget, pool = tiling.budgets(TileOptions(max_memory=max_memory), weights)
    st = CountingStreamer(device=meta, storage=meta, dtype=torch.bfloat16, budget=budget, image_height=size,
                          channels_last=True, pool=pool, recompute=True)  # as on a GPU
    x = meta_input(vae, op, size)  # made before counting: the input waits in host memory, as the API leaves it
    st.live = LiveBytes(known=[x, *vae.parameters(), *vae.buffers()])
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), st.live, flops:
        if op == "decode":
            tiling.tiled_decode(vae, x, st)
        else:
            tiling.tiled_encode_moments(vae, x, st)
    st.peak = st.live.peak + weights
    st.flops = flops.get_total_flops()
    return st


def untiled_flops(vae: klvae.AutoencoderKL, op: str, size: int) -> int:
    """The arithmetic of the same job untiled (whole maps, whole-map attention), for comparison."""
    flops = FlopCounterMode(display=False)
    x = meta_input(vae, op, size)
    with torch.no_grad(), flops:
        vae.decode(x) if op == "decode" else vae.encode_moments(x)
    return flops.get_total_flops()


def meta_input(vae: klvae.AutoencoderKL, op: str, size: int) -> torch.Tensor:
    """The bf16 meta-device input of a size² job: latents to decode, or an image to encode."""
    f, c = vae.downsample_factor, vae.config.latent_channels
    shape = (1, c, size // f, size // f) if op == "decode" else (1, 3, size, size)
    return torch.zeros(shape, device="meta", dtype=torch.bfloat16)


def meta_model(preset: str) -> klvae.AutoencoderKL:
    """The preset's architecture on the meta device, in bf16, with its upsamplers folded (the GPU default)."""
    with torch.device("meta"):
        vae = klvae.AutoencoderKL(preset).eval().to(torch.bfloat16)
    for m in vae.modules():
        if isinstance(m, Upsample):
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
            plain = untiled_flops(vae, op, size) / 1e12
            print(f"{op} {size}²: host->GPU {st.up / 2**30:6.1f} GiB, GPU->host {st.down / 2**30:6.1f} GiB, "
                  f"peak GPU {st.peak / 2**30:5.2f} GiB, {st.flops / 1e12:6.1f} TFLOP ({plain:.1f} untiled), "
                  f"statistics passes {st.stat_passes}")


if __name__ == "__main__":
    main()
