"""Exact tiled execution: each layer runs over horizontal strips with halos, in bounded device memory.

Why this and not diffusers' tiling: tiles that each run the whole network see their own GroupNorm
statistics and their own attention context, which leaves seams. Here the network runs layer by layer.
A full activation map stays on the device while a pool of device memory has room for it, else it waits on a
`storage` device (pinned host memory on a GPU). A convolution reads one strip plus the rows its kernel reaches.
A GroupNorm normalises each strip with whole-map statistics, from the per-channel sums gathered while its input
map was written. The mid-block attention runs on the whole latent-resolution map: K and V are placed like maps,
queries go in chunks, and keys too (an online softmax) when a chunk's scores would overflow the budget. When maps
cross the bus, the big ones are recomputed from smaller ones rather than stored (`recompute`). The result equals
the untiled computation up to the order of floating-point sums.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from klvae.inference.channel_sums import ChannelSums, Stats
from klvae.model.blocks import (
    Attention,
    Downsample,
    LinearAttention,
    MidBlock,
    ResnetBlock,
    Upsample,
    fold_upsample_kernel,
)


@dataclass
class LazyConv:
    """conv(src) left unmaterialised where src is the smaller map (a folded upsampler's source, the encoder's
    input image): with `recompute`, the next ResNet block computes the rows it reads from src, so the larger
    map is never written nor read back."""

    src: Tensor  # the source map [B, C, H, W]
    conv: nn.Conv2d  # a 3x3 "same" conv, or the conv of a folded upsampler
    up: bool  # nearest x2 first (folded into a stride-2 transposed conv)
    weight: Tensor  # in the compute dtype; for `up` the folded [C, Cout, 4, 4] kernel
    bias: Tensor | None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the map it stands for."""
        b, _, h, w = self.src.shape
        s = 2 if self.up else 1
        return b, self.conv.out_channels, s * h, s * w


Map = Tensor | LazyConv


def _params(layer: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """A conv's or linear layer's weight and bias in `dtype`."""
    assert isinstance(layer, nn.Conv2d | nn.Linear)
    bias = layer.bias
    return layer.weight.to(dtype), None if bias is None else bias.to(dtype)


def _resnets(block: nn.Module) -> list[ResnetBlock]:
    """A level's (or the mid block's) ResNet blocks."""
    resnets = block.resnets
    assert isinstance(resnets, nn.ModuleList)
    return cast(list[ResnetBlock], list(resnets))


@dataclass
class Streamer:
    """Runs layers strip by strip: maps on `storage`, compute on `device` in `dtype`, strips of `budget` bytes."""

    device: torch.device
    storage: torch.device
    dtype: torch.dtype
    budget: int = 256 * 2**20  # bytes that one strip's working set may take on the device
    rows: int | None = None  # fixed strip height in image rows (tests, --tile-size); None: from the budget
    image_height: int = 0  # rows of the full-resolution image, so `rows` scales down with the level
    # NHWC maps and strips: a row strip of a one-image map is then one contiguous block, so each host <-> GPU
    # copy is a single DMA transfer (an NCHW strip is C scattered pieces, staged through pageable memory).
    channels_last: bool = False
    # Bytes of maps that may stay on `device` at once (a pool, counted while they live); a map that would overflow
    # it goes to `storage`. Small jobs then make no host round trips, and big ones stay within the budget.
    pool: int = 0
    # Whole-map statistics passes run (reading a map back only for its GroupNorm sums); the maps this streamer
    # writes carry their per-channel sums, gathered while each strip is still on the device.
    stat_passes: int = 0
    # For maps that would not stay on the device: recompute a ResNet block's first conv rather than store it
    # (per block the input crosses the bus twice and the output once, instead of three reads and two writes),
    # and let the next block compute a folded upsampler's or an input conv's rows from their smaller source.
    # Worth it when maps live in host memory; on a single device it only adds arithmetic.
    recompute: bool = False
    _sums: dict[int, tuple[weakref.ref, ChannelSums]] = field(default_factory=dict, repr=False)
    _live: int = field(default=0, repr=False)  # bytes of the maps now held on `device` from the pool

    def strip_rows(self, batch: int, cin: int, cout: int, width: int, height: int, scale: int = 1) -> int:
        """Output rows per strip so that one strip's inputs, fp32 temporaries and outputs, for each of the batch's
        `batch` images, fit the budget (the output counts twice in the compute dtype, with the residual, and twice
        in fp32, for its sums)."""
        if self.rows is not None:
            return max(1, self.rows * height * scale // max(self.image_height, 1))
        elem = torch.finfo(self.dtype).bits // 8
        # A strip holds its rows of every image of the batch.
        per_row = batch * width * scale * (cin * (elem + 8) / scale + cout * (elem * 2 + 8))
        return max(1, int(self.budget // max(per_row, 1)))

    @property
    def separate_storage(self) -> bool:
        """Whether maps on `storage` are in another memory than the device's (reading them crosses a bus)."""
        return self.storage != self.device

    def to_dev(self, t: Tensor) -> Tensor:
        """A strip to the compute device (non-blocking from pinned memory)."""
        return t.to(self.device, non_blocking=True)

    # ---- maps -----------------------------------------------------------------------------------
    def on_device(self, shape: tuple[int, ...]) -> bool:
        """Whether a new map of this shape would be kept on the device (it fits what is left of the pool)."""
        return self._live + self._nbytes(shape) <= self.pool

    def _nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * (torch.finfo(self.dtype).bits // 8)

    def _release(self, n: int) -> None:
        self._live -= n

    def recomputes(self, shape: tuple[int, ...]) -> bool:
        """Whether a map of this shape is recomputed rather than stored: with `recompute`, when it would not
        stay on the device (recomputing a map that need not cross the bus only adds arithmetic)."""
        return self.recompute and not self.on_device(shape)

    def new_map(self, b: int, c: int, h: int, w: int) -> tuple[Tensor, ChannelSums]:
        """An empty map (on the device while the pool has room, else on storage) and its per-channel sum buffers."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.empty((b, c, h, w), fmt), ChannelSums.zeros(b, c, self.device)

    def empty(self, shape: tuple[int, ...], fmt: torch.memory_format = torch.contiguous_format) -> Tensor:
        """An uninitialised tensor on the device, taken from the pool while it has room, else on storage."""
        on_device = self.on_device(shape)
        where = self.device if on_device else self.storage
        pin = where.type == "cpu" and self.device.type == "cuda"  # pinned: asynchronous uploads
        out = torch.empty(shape, dtype=self.dtype, device=where, pin_memory=pin, memory_format=fmt)
        if on_device:  # back to the pool when the map dies
            self._live += self._nbytes(shape)
            weakref.finalize(out, self._release, self._nbytes(shape))
        return out

    def write(self, out: Tensor, a: int, e: int, y: Tensor, sums: ChannelSums) -> None:
        """Store output rows [a, e) and add the stored values to the map's per-channel sums."""
        y = y.to(self.dtype)
        self.put(out[:, :, a:e], y)
        sums.add(y)

    def put(self, dst: Tensor, y: Tensor) -> None:
        """Copy computed values into (part of) a map."""
        # Asynchronous into pinned host memory: the GPU goes on computing. Later uploads of these rows queue on
        # the same stream, after the copy; host code reads a map only after `finish`.
        dst.copy_(y, non_blocking=True)

    def finish(self, t: Tensor) -> Tensor:
        """Wait for pending copies, so that the host may read `t` (the last map)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return t

    def seal(self, out: Tensor, sums: ChannelSums) -> Tensor:
        """Remember a finished map's sums (weakly: the entry dies with the map) and return the map."""
        self._sums[id(out)] = (weakref.ref(out), sums)
        return out

    def place(self, t: Tensor) -> Tensor:
        """An input (image or latents) as a map: on the device while the pool has room, else on storage."""
        uploads = self.on_device(tuple(t.shape)) and self.separate_storage
        out, _ = self.new_map(*t.shape)
        if not uploads:
            return out.copy_(t)
        # In strips: a copy across devices and dtypes stages the source on the device in its own dtype first, a
        # transient that must stay within the strip budget.
        step = max(1, self.budget // (2 * t[:, :, :1].numel() * t.element_size()))
        for a in range(0, t.shape[2], step):
            self.upload(out[:, :, a : a + step], t[:, :, a : a + step])
        return out

    def upload(self, dst: Tensor, src: Tensor) -> None:
        """Copy input values from where they wait (host memory, as a rule) into part of a map on the device."""
        dst.copy_(src, non_blocking=True)

    def store(self, t: Tensor) -> Tensor:
        """A whole map computed on the device, placed like `new_map` places maps, with its sums."""
        out, sums = self.new_map(*t.shape)
        self.write(out, 0, t.shape[2], t, sums)
        return self.seal(out, sums)

    # ---- GroupNorm ------------------------------------------------------------------------------
    def group_stats(self, x: Map, norm: nn.GroupNorm) -> Stats:
        """Mean and 1/std of each (sample, group) over the whole map: from the sums gathered while the map was
        written, or else from a pass over it strip by strip."""
        b, c, h, w = x.shape
        entry = self._sums.get(id(x))
        if entry is not None and entry[0]() is x:
            return entry[1].group_stats(norm, h * w)
        if isinstance(x, Tensor):  # a lazy map is computed from its small source instead
            self.stat_passes += 1
        sums = ChannelSums.zeros(b, c, self.device)
        step = self.strip_rows(b, c, 0, w, h)
        for a in range(0, h, step):
            sums.add(self.rows_of(x, a, min(a + step, h)).to(self.dtype))
        return sums.group_stats(norm, h * w)

    @staticmethod
    def apply_norm(t: Tensor, norm: nn.GroupNorm, stats: Stats, act: bool) -> Tensor:
        """GroupNorm of a strip with whole-map statistics (in fp32), then SiLU when `act`."""
        mean, rstd = (s.repeat_interleave(t.shape[1] // norm.num_groups, dim=1) for s in stats)  # [B, C]
        # As PyTorch's own GroupNorm kernels: one per-channel scale and shift, elementwise, in any memory layout.
        scale = rstd * norm.weight.float()
        shift = norm.bias.float() - mean * scale
        y = t.float() * scale[:, :, None, None] + shift[:, :, None, None]
        return F.silu(y) if act else y

    # ---- convolutions ---------------------------------------------------------------------------
    def conv(
        self,
        x: Map,
        conv: nn.Conv2d,
        pre: Callable[[Tensor], Tensor] | None = None,
        residual: Callable[[int, int], Tensor] | None = None,
        mode: str = "same",
    ) -> Tensor:
        """conv(pre(x)) (+ residual rows) over strips; mode "same" (3x3/1x1), "down" (pad 0,1 + s2), "up" (x2)."""
        x = self.materialize(x)
        b, cin, h, w = x.shape
        k = conv.kernel_size[0]
        ho, wo = {"same": (h, w), "down": (h // 2, w // 2), "up": (2 * h, 2 * w)}[mode]
        scale = 2 if mode == "up" else 1
        out, sums = self.new_map(b, conv.out_channels, ho, wo)
        if mode == "down":  # each output row reads two input rows, twice its width: count them at the output's size
            step = self.strip_rows(b, 4 * cin, conv.out_channels, wo, ho)
        else:
            step = self.strip_rows(b, cin, conv.out_channels, w, h, scale)
        for a in range(0, ho, step):
            e = min(a + step, ho)
            y = self._valid_conv(self._conv_input(x, a, e, k, mode, pre), conv)
            if residual is not None:
                y = y + residual(a, e)
            self.write(out, a, e, y, sums)
        return self.seal(out, sums)

    def _valid_conv(self, t: Tensor, conv: nn.Conv2d) -> Tensor:
        # Padding is already in t (only where the strip meets the map's edge).
        return F.conv2d(t.to(self.dtype), *_params(conv, self.dtype), stride=conv.stride, padding=0)

    def _conv_input(
        self, x: Tensor, a: int, e: int, k: int, mode: str, pre: Callable[[Tensor], Tensor] | None
    ) -> Tensor:
        # The input rows that output rows [a, e) read, after `pre`, zero-padded where they leave the map
        # (zero padding applies to the conv's input, i.e. after norm and activation, as in the network).
        h = x.shape[2]
        if mode == "down":  # LDM pads right/bottom by one, then a valid stride-2 conv
            lo, hi, cols = 2 * a, 2 * e + 1, (0, 1)
        elif k == 1:
            lo, hi, cols = a, e, (0, 0)
        else:
            lo, hi, cols = a - 1, e + 1, (1, 1)
        size = 2 * h if mode == "up" else h
        src_lo, src_hi = max(lo, 0), min(hi, size)
        if mode == "up":  # nearest x2: fetch the source rows, upsample, cut to the rows wanted
            s_lo, s_hi = src_lo // 2, (src_hi - 1) // 2 + 1
            t = self.to_dev(x[:, :, s_lo:s_hi])
            t = F.interpolate(pre(t) if pre else t, scale_factor=2.0, mode="nearest")
            t = t[:, :, src_lo - 2 * s_lo : src_hi - 2 * s_lo]
        else:
            t = self.to_dev(x[:, :, src_lo:src_hi])
            t = pre(t) if pre else t
        return F.pad(t, (cols[0], cols[1], src_lo - lo, hi - src_hi))

    # ---- blocks ---------------------------------------------------------------------------------
    def resnet(self, x: Map, block: ResnetBlock) -> Tensor:
        """A ResNet block: two normalised convs and the (projected) shortcut, each streamed."""
        s1 = self.group_stats(x, block.norm1)
        b, _, h, w = x.shape
        if isinstance(x, LazyConv) or self.recomputes((b, block.conv1.out_channels, h, w)):
            return self._resnet_recomputed(x, block, s1)
        y = self.conv(x, block.conv1, pre=lambda t: self.apply_norm(t, block.norm1, s1, act=True))
        s2 = self.group_stats(y, block.norm2)

        def shortcut(a: int, e: int) -> Tensor:
            return self._shortcut(self.to_dev(x[:, :, a:e]), block)

        return self.conv(y, block.conv2, pre=lambda t: self.apply_norm(t, block.norm2, s2, act=True),
                         residual=shortcut)

    def _resnet_recomputed(self, x: Map, block: ResnetBlock, s1: Stats) -> Tensor:
        # Pass 1 gathers the sums of h = conv1(silu(norm1(x))) strip by strip and keeps nothing else; pass 2
        # recomputes h with a one-row halo from a two-row halo of x, then conv2 and the shortcut.
        b, cin, rows, w = x.shape
        cout = block.conv2.out_channels
        pre1 = lambda t: self.apply_norm(t, block.norm1, s1, act=True)  # noqa: E731
        step = self.strip_rows(b, cin + cout, cout, w, rows)
        h_sums = ChannelSums.zeros(b, cout, self.device)
        for a in range(0, rows, step):
            e = min(a + step, rows)
            t = pre1(self.rows_of(x, max(a - 1, 0), min(e + 1, rows)))
            h = self._valid_conv(F.pad(t, (1, 1, int(a == 0), int(e == rows))), block.conv1)
            h_sums.add(h.to(self.dtype))  # as a stored h would hold it
        s2 = h_sums.group_stats(block.norm2, rows * w)
        out, sums = self.new_map(b, cout, rows, w)
        for a in range(0, rows, step):
            e = min(a + step, rows)
            x_lo, x_hi = max(a - 2, 0), min(e + 2, rows)
            xs = self.rows_of(x, x_lo, x_hi)
            h = self._valid_conv(F.pad(pre1(xs), (1, 1, int(x_lo == 0), int(x_hi == rows))), block.conv1)
            h_lo = x_lo + 1 - int(x_lo == 0)  # first row of h computed
            h = h[:, :, max(a - 1, 0) - h_lo : min(e + 1, rows) - h_lo]
            t = F.pad(self.apply_norm(h, block.norm2, s2, act=True), (1, 1, int(a == 0), int(e == rows)))
            y = self._valid_conv(t, block.conv2)
            self.write(out, a, e, y + self._shortcut(xs[:, :, a - x_lo : e - x_lo], block), sums)
        return self.seal(out, sums)

    def _shortcut(self, t: Tensor, block: ResnetBlock) -> Tensor:
        # The block's input rows, projected by its 1x1 conv when the widths differ.
        t = t.to(self.dtype)
        sc = block.conv_shortcut
        return t if sc is None else F.conv2d(t, *_params(sc, self.dtype))

    def attention(self, x: Map, attn: nn.Module, rows: int | None = None, key_chunk: int | None = None) -> Tensor:
        """Whole-map attention at latent resolution, in bounded memory: K and V are computed strip by strip into
        token maps placed like any map (on the device while the pool has room), then chunks of query rows attend
        to them; keys go in chunks too (online softmax) when one chunk's scores would overflow the strip budget.
        `rows` / `key_chunk` force the chunking (tests)."""
        x = self.materialize(x)
        if isinstance(attn, LinearAttention):
            return self._linear(self.to_dev(x), attn)
        assert isinstance(attn, Attention)
        b, c, h, w = x.shape
        stats = self.group_stats(x, attn.group_norm)
        projections = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
        lin = [_params(m, self.dtype) for m in projections]

        def tokens(a: int, e: int) -> Tensor:  # normalised rows [a, e) as tokens [B, (e - a) * W, C]
            y = self.apply_norm(self.rows_of(x, a, e), attn.group_norm, stats, act=False).to(self.dtype)
            return y.flatten(2).transpose(1, 2)

        kv_on_device = not self.separate_storage or self.on_device((2, b, h * w, c))
        k, v = self.empty((b, h * w, c)), self.empty((b, h * w, c))  # token-major: a key chunk is one block
        step = self.strip_rows(b, c, 2 * c, w, h)
        for a in range(0, h, step):
            e = min(a + step, h)
            n = tokens(a, e)
            for dst, i in ((k, 1), (v, 2)):
                self.put(dst[:, a * w : e * w], F.linear(n, *lin[i]))
        fused = kv_on_device and self._fused_attention(k)
        rows, key_chunk = self._attention_chunks(b, c, h, w, fused, kv_on_device, rows, key_chunk)
        out, sums = self.new_map(b, c, h, w)
        for a in range(0, h, rows):
            e = min(a + rows, h)
            o = self._attend(F.linear(tokens(a, e), *lin[0]), k, v, key_chunk, fused)
            o = F.linear(o, *lin[3]).transpose(1, 2).reshape(b, c, e - a, w)  # [B, C, rows, W]
            self.write(out, a, e, self.rows_of(x, a, e).to(self.dtype) + o, sums)
        return self.seal(out, sums)

    def _attention_chunks(
        self, b: int, c: int, h: int, w: int, fused: bool, kv_on_device: bool, rows: int | None, key_chunk: int | None
    ) -> tuple[int, int]:
        # (query rows, keys) per step. Query tokens cost their q, fp32 accumulator, projection and residual:
        # a quarter of the budget. Scores cost ~12 bytes each (fp32, its exponent, a cast) unless a fused kernel
        # keeps them on chip. With K and V in host memory every query chunk uploads them all: big query chunks.
        tokens = h * w
        elem = torch.finfo(self.dtype).bits // 8
        most = max(1, self.budget // 4 // (b * c * (4 * elem + 4) * w))
        if rows is None:
            whole_keys = self.budget // 2 // (b * tokens * 12) // w
            rows = most if fused or not kv_on_device or whole_keys < 1 else whole_keys
        rows = max(1, min(rows, h))
        if key_chunk is None:
            key_chunk = tokens if fused else max(1, self.budget // 2 // (b * rows * w * 12))
        return rows, min(key_chunk, tokens)

    def _fused_attention(self, k: Tensor) -> bool:
        # Whether SDPA's memory-efficient kernel takes this head (its score matrix never reaches memory): only on
        # CUDA. Flash attention stops at head size 256; the VAE's is 128-512.
        if self.device.type != "cuda":
            return False
        t = k[:1, :8].unsqueeze(1)
        try:
            params = torch.backends.cuda.SDPAParams(t, t, t, None, 0.0, False, False)
            return bool(torch.backends.cuda.can_use_efficient_attention(params))
        except (AttributeError, RuntimeError, TypeError):  # an older or newer signature: take the bounded path
            return False

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, chunk: int, fused: bool) -> Tensor:
        """softmax(q k^T / sqrt(C)) v for q [B, T, C] against the token maps k, v [B, N, C], `chunk` keys at a time.
        Key chunks are merged by their running maximum and sum (online softmax), exact up to rounding."""
        n = k.shape[1]
        if chunk >= n:
            # Fused: the memory-efficient kernel only, never the math fallback that would hold every score.
            kernel = sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if fused else contextlib.nullcontext()
            k, v = self.to_dev(k), self.to_dev(v)
            with kernel:
                return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        q = q * q.shape[-1] ** -0.5
        top = torch.full((*q.shape[:2], 1), -math.inf, device=q.device)  # running max of the scores
        total = torch.zeros_like(top)  # running sum of exp(score - top)
        acc = torch.zeros(q.shape, device=q.device)  # running sum of exp(score - top) * value, fp32
        for s in range(0, n, chunk):
            ks, vs = self.to_dev(k[:, s : s + chunk]), self.to_dev(v[:, s : s + chunk])
            scores = torch.bmm(q, ks.transpose(1, 2)).float()  # [B, T, chunk]
            new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
            p = scores.sub_(new_top).exp_()
            fade = (top - new_top).exp_()  # rescales what earlier chunks added
            total = total.mul_(fade).add_(p.sum(-1, keepdim=True))
            acc = acc.mul_(fade).add_(torch.bmm(p.to(vs.dtype), vs).float())
            top = new_top
        return acc.div_(total).to(q.dtype)

    def _linear(self, t: Tensor, attn: LinearAttention) -> Tensor:
        # No norm, so the module itself runs on the whole map, in the compute dtype.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.store(attn(t))

    def mid(self, x: Map, block: MidBlock) -> Tensor:
        """ResNet -> attention -> ResNet."""
        first, second = _resnets(block)
        x = self.resnet(x, first)
        for attn in block.attentions:
            x = self.attention(x, attn)
        return self.resnet(x, second)

    def level(self, x: Map, block: nn.Module) -> Map:
        """A down or up level: its ResNet blocks, then its resampler."""
        for r in _resnets(block):
            x = self.resnet(x, r)
        samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None)
        for s in samplers or ():
            assert isinstance(s, Downsample | Upsample)
            if isinstance(s, Upsample) and s.fold:  # with recompute the next ResNet block reads it row by row
                up = self.lazy(self.materialize(x), s.conv, up=True)  # x: the last ResNet's output, in memory
                x = up if self.recomputes(up.shape) else self.materialize(up)
            else:
                x = self.conv(x, s.conv, mode="down" if isinstance(s, Downsample) else "up")
        return x

    def input_conv(self, x: Tensor, conv: nn.Conv2d) -> Map:
        """The first conv of a small input (image, latents): with `recompute` the next block computes its rows."""
        lazy = self.lazy(x, conv)
        return lazy if self.recomputes(lazy.shape) else self.conv(x, conv)

    def lazy(self, x: Tensor, conv: nn.Conv2d, up: bool = False) -> LazyConv:
        """conv(x), or nearest x2 + conv as the folded transposed conv (`Upsample.fold`), not yet computed."""
        weight = fold_upsample_kernel(conv.weight) if up else conv.weight
        return LazyConv(x, conv, up, weight.to(self.dtype), _params(conv, self.dtype)[1])

    def materialize(self, x: Map) -> Tensor:
        """A map in memory (storage or device), with its sums."""
        if isinstance(x, Tensor):
            return x
        b, c, h, w = x.shape
        out, sums = self.new_map(b, c, h, w)
        step = self.strip_rows(b, x.src.shape[1], c, w, h)
        for a in range(0, h, step):
            e = min(a + step, h)
            self.write(out, a, e, self.rows_of(x, a, e), sums)
        return self.seal(out, sums)

    def rows_of(self, x: Map, a: int, e: int) -> Tensor:
        """Rows [a, e) of a map on the device: a slice, or computed from a lazy conv's source."""
        if isinstance(x, Tensor):
            return self.to_dev(x[:, :, a:e])
        if not x.up:
            t = self._conv_input(x.src, a, e, x.conv.kernel_size[0], "same", None)
            return F.conv2d(t.to(self.dtype), x.weight, x.bias)  # padding is in t
        # Output row y reads source rows (y-1)//2 .. (y+1)//2; rows beyond the map contribute nothing, exactly
        # as the zero padding of the upsampled map.
        lo, hi = max((a - 1) // 2, 0), min(e // 2 + 1, x.src.shape[2])
        t = self.to_dev(x.src[:, :, lo:hi]).to(self.dtype)
        y = F.conv_transpose2d(t, x.weight, x.bias, stride=2, padding=1)  # rows 2*lo .. 2*hi of the output
        return y[:, :, a - 2 * lo : e - 2 * lo]

    def head(self, x: Map, norm: nn.GroupNorm, conv: nn.Conv2d) -> Tensor:
        """GroupNorm -> SiLU -> conv_out."""
        s = self.group_stats(x, norm)
        return self.conv(x, conv, pre=lambda t: self.apply_norm(t, norm, s, act=True))
