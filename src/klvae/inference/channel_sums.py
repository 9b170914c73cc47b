"""Whole-map GroupNorm statistics gathered strip by strip: shifted per-channel sums, merged per group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

Stats = tuple[Tensor, Tensor]  # per (batch, group) mean and 1/std, float32, shape [B, G]


@dataclass
class ChannelSums:
    """Per-channel sums of (x - shift) and their squares [B, C] (float64), the shift being each channel's mean in
    the first strip added.

    Why shifted: var = E[x²] - E[x]² cancels catastrophically when a channel's mean dwarfs its spread (decoder
    activations reach thousands), and the float32 squares' rounding would then swamp the variance. Around a shift
    near the mean the squares are of the spread's size, so their rounding stays that small.
    """

    s1: Tensor  # sum of (x - shift) over the pixels added
    s2: Tensor  # sum of (x - shift)²
    shift: Tensor | None = None  # [B, C] float32, set by the first strip

    @classmethod
    def zeros(cls, b: int, c: int, device: torch.device) -> ChannelSums:
        """Empty sums for a [B, C, ...] map whose statistics will be gathered on `device`."""
        return cls(*(torch.zeros(b, c, dtype=torch.float64, device=device) for _ in range(2)))

    def add(self, t: Tensor) -> None:
        """Add a strip [B, C, rows, W] (as the map stores it)."""
        v = t.to(torch.float32, copy=True)  # one float32 temporary besides the squares, as the budget counts
        if self.shift is None:
            self.shift = v.mean((2, 3))
        v.sub_(self.shift[:, :, None, None])
        self.s1 += v.sum((2, 3), dtype=torch.float64)
        self.s2 += v.square().sum((2, 3), dtype=torch.float64)

    def group_stats(self, norm: nn.GroupNorm, pixels: int) -> Stats:
        """Mean and 1/std of each (sample, group), the map having `pixels` pixels per channel."""
        b, c = self.s1.shape
        g = norm.num_groups
        shift = torch.zeros_like(self.s1) if self.shift is None else self.shift.double()
        # Each channel's mean and sum of squared deviations, then the groups' by the parallel-variance merge
        # (Chan et al.): the squared deviations add, plus each channel's offset from the group mean.
        mean_c = (shift + self.s1 / pixels).reshape(b, g, -1)
        dev_c = (self.s2 - self.s1.square() / pixels).clamp_min(0.0).reshape(b, g, -1)
        mean = mean_c.mean(-1)
        dev = dev_c.sum(-1) + pixels * (mean_c - mean[..., None]).square().sum(-1)
        var = dev / ((c // g) * pixels)
        return mean.float(), torch.rsqrt(var + norm.eps).float()
