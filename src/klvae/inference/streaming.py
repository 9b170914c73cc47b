"""Exact tiled execution: each layer runs over horizontal strips with halos, in bounded device memory.

Why this and not diffusers' tiling: tiles that each run the whole network see their own GroupNorm
statistics and their own attention context, which leaves seams. Here the network runs layer by layer.
Every full activation map lives on a `storage` device (host memory when the GPU budget is small); a
convolution reads one strip plus the rows its kernel reaches; a GroupNorm first gathers its per-group
sums over the whole map (a statistics pass), then normalises each strip with those global figures; the
mid-block attention runs on the whole latent-resolution map, in query chunks. The result equals the
untiled computation up to the order of floating-point sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klvae.model.blocks import (
    Attention,
    Downsample,
    LinearAttention,
    MidBlock,
    ResnetBlock,
    Upsample,
    fold_upsample_kernel,
)

Stats = tuple[Tensor, Tensor]  # per (batch, group) mean and 1/std, float32, shape [B, G]


@dataclass
class Streamer:
    """Runs layers strip by strip: maps on `storage`, compute on `device` in `dtype`, strips of `budget` bytes."""

    device: torch.device
    storage: torch.device
    dtype: torch.dtype
    budget: int = 256 * 2**20  # bytes that one strip's working set may take on the device
    rows: int | None = None  # fixed strip height in image rows (tests, --tile-size); None: from the budget
    image_height: int = 0  # rows of the full-resolution image, so `rows` scales down with the level

    def strip_rows(self, cin: int, cout: int, width: int, height: int, scale: int = 1) -> int:
        """Output rows per strip so that one strip's inputs, fp32 temporaries and outputs fit the budget."""
        if self.rows is not None:
            return max(1, self.rows * height * scale // max(self.image_height, 1))
        elem = torch.finfo(self.dtype).bits // 8
        per_row = width * scale * (cin * (elem + 8) / scale + cout * elem * 2)
        return max(1, int(self.budget // max(per_row, 1)))

    def to_dev(self, t: Tensor) -> Tensor:
        """A strip to the compute device (non-blocking from pinned memory)."""
        return t.to(self.device, non_blocking=True)

    # ---- GroupNorm ------------------------------------------------------------------------------
    def group_stats(self, x: Tensor, norm: nn.GroupNorm) -> Stats:
        """Mean and 1/std of each (sample, group) over the whole map, gathered strip by strip."""
        b, c, h, w = x.shape
        g = norm.num_groups
        s1 = torch.zeros(b, g, dtype=torch.float64, device=self.device)
        s2 = torch.zeros_like(s1)
        step = self.strip_rows(c, 0, w, h)
        for a in range(0, h, step):
            t = self.to_dev(x[:, :, a : a + step]).float().reshape(b, g, -1)
            s1 += t.sum(-1, dtype=torch.float64)
            s2 += t.square().sum(-1, dtype=torch.float64)
        n = (c // g) * h * w
        mean = s1 / n
        var = (s2 / n - mean.square()).clamp_min(0.0)
        return mean.float(), torch.rsqrt(var + norm.eps).float()

    @staticmethod
    def apply_norm(t: Tensor, norm: nn.GroupNorm, stats: Stats, act: bool) -> Tensor:
        """GroupNorm of a strip with whole-map statistics (in fp32), then SiLU when `act`."""
        b = t.shape[0]
        mean, rstd = stats
        g = norm.num_groups
        y = (t.float().reshape(b, g, -1) - mean[..., None]) * rstd[..., None]
        y = y.reshape(t.shape) * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
        return F.silu(y) if act else y

    # ---- convolutions ---------------------------------------------------------------------------
    def conv(
        self,
        x: Tensor,
        conv: nn.Conv2d,
        pre: Callable[[Tensor], Tensor] | None = None,
        residual: Callable[[int, int], Tensor] | None = None,
        mode: str = "same",
    ) -> Tensor:
        """conv(pre(x)) (+ residual rows) over strips; mode "same" (3x3/1x1), "down" (pad 0,1 + s2), "up" (x2)."""
        b, cin, h, w = x.shape
        k = conv.kernel_size[0]
        ho, wo = {"same": (h, w), "down": (h // 2, w // 2), "up": (2 * h, 2 * w)}[mode]
        scale = 2 if mode == "up" else 1
        pin = self.storage.type == "cpu" and self.device.type == "cuda"  # pinned: asynchronous uploads
        out = torch.empty(b, conv.out_channels, ho, wo, dtype=self.dtype, device=self.storage, pin_memory=pin)
        step = self.strip_rows(cin, conv.out_channels, w, h, scale)
        for a in range(0, ho, step):
            e = min(a + step, ho)
            t = self._conv_input(x, a, e, k, mode, pre)
            y = F.conv2d(t.to(self.dtype), conv.weight.to(self.dtype), conv.bias.to(self.dtype),
                         stride=conv.stride, padding=0)
            if residual is not None:
                y = y + residual(a, e)
            out[:, :, a:e].copy_(y)
        return out

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
    def resnet(self, x: Tensor, block: ResnetBlock) -> Tensor:
        """A ResNet block: two normalised convs and the (projected) shortcut, each streamed."""
        s1 = self.group_stats(x, block.norm1)
        h = self.conv(x, block.conv1, pre=lambda t: self.apply_norm(t, block.norm1, s1, act=True))
        s2 = self.group_stats(h, block.norm2)

        def shortcut(a: int, e: int) -> Tensor:
            t = self.to_dev(x[:, :, a:e]).to(self.dtype)
            sc = block.conv_shortcut
            return t if sc is None else F.conv2d(t, sc.weight.to(self.dtype), sc.bias.to(self.dtype))

        return self.conv(h, block.conv2, pre=lambda t: self.apply_norm(t, block.norm2, s2, act=True),
                         residual=shortcut)

    def attention(self, x: Tensor, attn: nn.Module, query_chunk: int = 4096) -> Tensor:
        """Whole-map attention on the device (it runs at latent resolution), queries in chunks."""
        t = self.to_dev(x)
        if isinstance(attn, LinearAttention):
            return self._linear(t, attn)
        assert isinstance(attn, Attention)
        b, c, h, w = t.shape
        stats = self.group_stats(x, attn.group_norm)
        n = self.apply_norm(t, attn.group_norm, stats, act=False).to(self.dtype).flatten(2).transpose(1, 2)
        lin = [(m.weight.to(self.dtype), m.bias.to(self.dtype)) for m in (attn.to_q, attn.to_k, attn.to_v)]
        k, v = (F.linear(n, *lin[i]).unsqueeze(1) for i in (1, 2))  # [B, 1, HW, C]
        out = torch.empty_like(n)
        for a in range(0, n.shape[1], query_chunk):
            q = F.linear(n[:, a : a + query_chunk], *lin[0]).unsqueeze(1)
            out[:, a : a + query_chunk] = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        o = attn.to_out[0]
        out = F.linear(out, o.weight.to(self.dtype), o.bias.to(self.dtype)).transpose(1, 2).reshape(b, c, h, w)
        return (t.to(self.dtype) + out).to(self.storage)

    def _linear(self, t: Tensor, attn: LinearAttention) -> Tensor:
        # No norm, so the module itself runs on the whole map, in the compute dtype.
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return attn(t).to(self.dtype).to(self.storage)

    def mid(self, x: Tensor, block: MidBlock) -> Tensor:
        """ResNet -> attention -> ResNet."""
        x = self.resnet(x, block.resnets[0])
        for attn in block.attentions:
            x = self.attention(x, attn)
        return self.resnet(x, block.resnets[1])

    def level(self, x: Tensor, block: nn.Module) -> Tensor:
        """A down or up level: its ResNet blocks, then its resampler."""
        for r in block.resnets:
            x = self.resnet(x, r)
        samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None)
        for s in samplers or ():
            assert isinstance(s, Downsample | Upsample)
            if isinstance(s, Upsample) and s.fold:
                x = self.upsample_folded(x, s.conv)
            else:
                x = self.conv(x, s.conv, mode="down" if isinstance(s, Downsample) else "up")
        return x

    def upsample_folded(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        """Nearest x2 + conv as the folded stride-2 transposed conv (`Upsample.fold`), over strips."""
        b, c, h, w = x.shape
        weight = fold_upsample_kernel(conv.weight).to(self.dtype)
        bias = conv.bias.to(self.dtype)
        pin = self.storage.type == "cpu" and self.device.type == "cuda"
        out = torch.empty(b, conv.out_channels, 2 * h, 2 * w, dtype=self.dtype, device=self.storage, pin_memory=pin)
        step = self.strip_rows(c, conv.out_channels, w, h, 2)
        for a in range(0, 2 * h, step):
            e = min(a + step, 2 * h)
            # Output row y reads source rows (y-1)//2 .. (y+1)//2; rows beyond the map contribute nothing,
            # exactly as the zero padding of the upsampled map.
            lo, hi = max((a - 1) // 2, 0), min(e // 2 + 1, h)
            t = self.to_dev(x[:, :, lo:hi]).to(self.dtype)
            y = F.conv_transpose2d(t, weight, bias, stride=2, padding=1)  # rows 2*lo .. 2*hi of the output
            out[:, :, a:e].copy_(y[:, :, a - 2 * lo : e - 2 * lo])
        return out

    def head(self, x: Tensor, norm: nn.GroupNorm, conv: nn.Conv2d) -> Tensor:
        """GroupNorm -> SiLU -> conv_out."""
        s = self.group_stats(x, norm)
        return self.conv(x, conv, pre=lambda t: self.apply_norm(t, norm, s, act=True))
