"""Tiled encode/decode in bounded device memory, and the choice of when to tile."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from klvae.checks import is_integer
from klvae.errors import KlvaeError, quote
from klvae.inference.precision import run_guarded
from klvae.inference.streaming import Map, Streamer
from klvae.model.autoencoder import AutoencoderKL

log = logging.getLogger(__name__)

# Peak bytes per output pixel of an untiled pass, per unit of (first-level width x element size), read off
# diffusers' measured peaks on an H100 (decode 2048^2: 9.70 GiB, encode 1024^2: 1.70 GiB; bf16, width 128).
_PEAK_PER_PIXEL = {"decode": 10.0, "encode": 7.0}


@dataclass
class TileOptions:
    """When and how to tile: a forced strip height, a device memory budget, or automatic.

    On a GPU `max_memory` bounds GPU memory: the whole-image maps between layers that do not fit it wait in host
    memory. On the CPU host memory is the device, and the budget bounds only what one strip works on: a tiled pass
    still holds whole-image maps, about (2 C + C') x element size bytes per output pixel, C and C' the widths of
    the widest full-resolution level and of its input (`resident_map_bytes`): 2 KiB per pixel for an SD-sized
    decoder in fp32 (8 GiB at 2048x2048), 1.5 KiB for its encoder, half that in bf16; the untiled pass holds about
    twice as much. Tiling there lowers the peak of a large image but does not meet a smaller budget (a warning
    says so), and for an image whose maps are small next to the budget its strips and the allocator's slack can
    take more than an untiled pass would.
    """

    # Strip height in rows of the full-resolution image; a level at 1/f of it uses tile_size // f rows, at least 1.
    # Any height from 1 up gives the untiled result (each conv reads its strip's neighbour rows, and GroupNorm uses
    # whole-map statistics), so it need not be a multiple of the downsample factor; small strips only cost more
    # kernel calls. It overrides the heights max_memory would pick (max_memory still sizes the maps kept on a GPU
    # and the attention chunks). None: derived from max_memory.
    tile_size: int | None = None
    # Bytes the device may use; tiling is picked when the untiled estimate exceeds it. None: no limit
    # (untiled, falling back to tiling when the GPU runs out of memory). On the CPU: see the class docstring.
    max_memory: int | None = None
    # Force tiling on (True) or off (False); None decides from max_memory and the out-of-memory fall-back.
    enabled: bool | None = None

    def __post_init__(self) -> None:
        # 0 or a negative number would not fail here but deep in the strip planner, or mean "no budget".
        for name in ("tile_size", "max_memory"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _whole_number(name, v))
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise KlvaeError(f"TileOptions.enabled must be True, False or None, got {quote(self.enabled)}")

    def wants_tiling(self) -> bool:
        """Whether tiling was asked for outright (a forced flag or a strip height)."""
        return bool(self.enabled) or (self.enabled is None and self.tile_size is not None)


def _whole_number(name: str, v: object) -> int:
    """`v` as a plain int of at least 1, else KlvaeError; numpy integers (a size computed with numpy) count."""
    if not is_integer(v) or v < 1:
        raise KlvaeError(f"TileOptions.{name} must be a whole number of at least 1 (or None), got {quote(v)}")
    return int(v)


def estimate_bytes(vae: AutoencoderKL, op: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Rough untiled peak device memory of encoding/decoding a batch of this image shape [B, C, H, W]."""
    b, _, h, w = shape
    elem = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in vae.parameters()) * elem
    # The widest activations per image pixel: the first encoder level's, or the last decoder level's (as measured
    # for _PEAK_PER_PIXEL), unless a deeper level is more than twice as wide per level (a custom config).
    width = _widest_per_pixel(vae.config.block_out_channels if op == "encode" else vae.config.decoder_widths)
    return int(weights + b * h * w * width * elem * _PEAK_PER_PIXEL[op])


def _widest_per_pixel(widths: tuple[int, ...]) -> float:
    # Level i's maps have 4**i times fewer pixels than the image (the mid block's, the last level's).
    return max(c / 4**i for i, c in enumerate(widths))


def resident_map_bytes(vae: AutoencoderKL, op: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of the whole-image maps a tiled pass holds at once for this image shape [B, C, H, W], whatever the
    budget, where they live on the device (CPU, MPS): the widest full-resolution ResNet block's input, middle and
    output maps (within 2 % of the peaks measured on the CPU; see TileOptions)."""
    b, _, h, w = shape
    elem = torch.finfo(dtype).bits // 8
    if op == "encode":  # the first level, whose input is the input conv's map of the same width
        channels = 3 * vae.config.block_out_channels[0]
    else:  # the last level, whose first block reads the upsampled output of the level before
        widths = vae.config.decoder_widths
        channels = 2 * widths[0] + widths[min(1, len(widths) - 1)]
    # A deeper level more than twice as wide per level (a custom config) holds more, the mid block's 3-4 maps too.
    deeper = vae.config.block_out_channels if op == "encode" else vae.config.decoder_widths
    channels = max(channels, 3 * _widest_per_pixel(deeper), 4 * deeper[-1] / 4 ** (len(deeper) - 1))
    return int(b * h * w * channels * elem)


def make_streamer(
    vae: AutoencoderKL, opts: TileOptions, dtype: torch.dtype, image_height: int
) -> Streamer:
    """A Streamer whose strips and device-held maps fit the budget; on a GPU the maps that do not fit live in
    pinned host memory, in NHWC so that each strip crosses the bus in one piece. Elsewhere every map stays where
    it is computed (host memory is the device's), so the budget sizes the strips only (see TileOptions)."""
    device = vae.device
    cuda = device.type == "cuda"
    storage = torch.device("cpu") if cuda else device
    budget, pool = budgets(opts, weight_bytes(vae))
    # NHWC maps on a GPU (one transfer per strip), and wherever the weights are NHWC (optimize_for_inference on
    # the CPU): convolutions then read and write their own layout instead of converting every strip.
    nhwc = cuda or vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    return Streamer(device=device, storage=storage, dtype=dtype, budget=budget, rows=opts.tile_size,
                    image_height=image_height, channels_last=nhwc, pool=pool if cuda else 0, recompute=cuda)


def weight_bytes(vae: AutoencoderKL) -> int:
    """Bytes the model's parameters take where they are stored."""
    return sum(p.numel() * p.element_size() for p in vae.parameters())


def budgets(opts: TileOptions, weights: int = 0) -> tuple[int, int]:
    """(bytes one strip's working set may take, bytes of maps that may stay on the GPU) for a memory budget:
    a quarter for strips, five eighths less the weights for maps, and an eighth left for the allocator's slack,
    convolution workspaces and small buffers (the counted peaks in docs/benchmarks.md stay under 80 %)."""
    total = opts.max_memory or 2 * 2**30
    return total // 4, max(0, total * 5 // 8 - weights)


@torch.no_grad()  # inference only: an autograd graph would also keep every map alive through its in-place writes
def tiled_encode_moments(vae: AutoencoderKL, x: Tensor, st: Streamer) -> Tensor:
    """Encoder moments of x [B, C, H, W] (H, W multiples of the factor), layer by layer over strips."""
    vae.check_encodable(x)  # the strips would fail deep inside on a map smaller than a kernel
    enc = vae.encoder
    # Each stage's map is popped straight into the next call, so no local here keeps it alive while later stages
    # run: its device memory goes back to the streamer's pool as soon as the stage that reads it is done.
    box: list[Map] = [st.input_conv(st.place(x), enc.conv_in)]
    for block in enc.down_blocks:
        box.append(st.level(box.pop(), block))
    box.append(st.mid(box.pop(), enc.mid_block))
    box.append(st.head(box.pop(), enc.conv_norm_out, enc.conv_out))
    if vae.quant_conv is not None:
        box.append(st.conv(box.pop(), vae.quant_conv))
    return st.finish(cast(Tensor, box.pop())).float()  # head's or quant_conv's output: a map in memory


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: Tensor, st: Streamer) -> Tensor:
    """Decoder output of unscaled latents z, layer by layer over strips."""
    dec = vae.decoder
    box: list[Map] = [st.place(z)]  # popped into each stage, as in tiled_encode_moments
    if vae.post_quant_conv is not None:
        box.append(st.conv(box.pop(), vae.post_quant_conv))
    box.append(st.input_conv(cast(Tensor, box.pop()), dec.conv_in))  # the latents, or post_quant_conv's output
    box.append(st.mid(box.pop(), dec.mid_block))
    for block in dec.up_blocks:
        box.append(st.level(box.pop(), block))
    return st.finish(st.head(box.pop(), dec.conv_norm_out, dec.conv_out)).float()


def run_maybe_tiled(
    vae: AutoencoderKL,
    op: str,
    x: Tensor,
    dtype: torch.dtype,
    plain: Callable[[Tensor, torch.dtype], Tensor],
    tiled: Callable[[Tensor, torch.dtype], Tensor],
    opts: TileOptions | None,
    guard: nn.Module | None = None,
) -> Tensor:
    """Run `plain`, or `tiled` when asked, when over the budget, or after the GPU runs out of memory. With `guard`
    (the modules the pass runs: precision.pass_modules), the choice runs under run_guarded, so that the fp32 rerun
    of a half pass that overflowed is tiled when fp32's memory needs it, though the half pass was not."""
    options = opts or TileOptions()

    def choose(t: Tensor, dt: torch.dtype) -> Tensor:
        if options.enabled is False:
            return plain(t, dt)
        f = vae.downsample_factor if op == "decode" else 1
        out_shape = (t.shape[0], 3, t.shape[2] * f, t.shape[3] * f)
        if options.wants_tiling():
            warn_host_maps(vae, op, out_shape, dt, options)
            return deliver(vae, tiled(t, dt), options)
        if options.max_memory is not None and estimate_bytes(vae, op, out_shape, dt) > options.max_memory:
            log.info("%s of %dx%d exceeds the %s memory budget: tiling", op, out_shape[2], out_shape[3],
                     _mib(options.max_memory))
            warn_host_maps(vae, op, out_shape, dt, options)
            return deliver(vae, tiled(t, dt), options)
        try:
            return plain(t, dt)
        except torch.cuda.OutOfMemoryError:
            pass
        # Out of the except clause: until it ends, the exception's traceback keeps the failed pass's frames, and
        # with them its activations, alive, so neither empty_cache nor the tiled pass would get their memory back.
        torch.cuda.empty_cache()
        log.warning("%s ran out of GPU memory at %dx%d; retrying tiled", op, out_shape[2], out_shape[3])
        return deliver(vae, tiled(t, dt), options)

    return choose(x, dtype) if guard is None else run_guarded(guard, choose, x, dtype, op)


# Device types already told that the budget does not bound their whole-image maps: once per process, not per batch.
_host_maps_warned: set[str] = set()


def warn_host_maps(vae: AutoencoderKL, op: str, shape: tuple[int, ...], dtype: torch.dtype, opts: TileOptions) -> None:
    """Log once per process when, off a GPU, the maps a tiled pass must hold exceed the memory budget."""
    kind = vae.device.type
    if kind == "cuda" or opts.max_memory is None or kind in _host_maps_warned:
        return
    maps = resident_map_bytes(vae, op, shape, dtype)
    if maps <= opts.max_memory:
        return
    _host_maps_warned.add(kind)
    # Else the budget looks honoured while the process takes several times it (a user trial: 64 MiB, +400 MB).
    # Holding these maps is what tiling off a GPU cannot avoid; it still halves the untiled pass's.
    log.warning("on the %s, the memory budget (max_memory, --max-memory) bounds each strip's work, not the "
                "whole-image maps that a tiled %s holds in the same memory: about %s for %dx%d here, over the %s "
                "budget (untiled takes about twice that)", kind.upper(), op, _mib(maps), shape[2], shape[3],
                _mib(opts.max_memory))


def _mib(n: int) -> str:
    # MiB, not GiB: budgets that a CPU is given are often well under 1 GiB, which "0.06 GiB" reads badly; and
    # a budget of a few KiB or bytes (--max-memory 1k) is not "0.00 MiB".
    if n >= 2**20:
        return f"{n / 2**20:,.0f} MiB"
    return f"{n / 2**20:.2f} MiB" if n >= 0.005 * 2**20 else f"{n:,} bytes"


def deliver(vae: AutoencoderKL, out: Tensor, opts: TileOptions) -> Tensor:
    """A tiled result on the model's device, as the untiled path gives it, unless it alone would exceed the memory
    budget's pool of maps: then it stays in host memory, where the streamer left it, and a log line says so."""
    if out.device == vae.device:
        return out
    pool = budgets(opts, weight_bytes(vae))[1]
    if out.numel() * out.element_size() <= pool:
        return out.to(vae.device)
    log.info("the tiled result (%.2f GiB) exceeds the memory budget's pool; it stays in host memory",
             out.numel() * out.element_size() / 2**30)
    return out
