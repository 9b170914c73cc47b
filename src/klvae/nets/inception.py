"""FID's Inception-v3: the TensorFlow FID Inception (2015-12-05 graph) as ported by pytorch-fid and torch-fidelity.

Written out here because both packages (and torchmetrics, clean-fid) import torchvision. Parameter names
follow their converted checkpoint, so `weights-inception-2015-12-05-6726825d.pth` loads unchanged.
Preprocessing follows torch-fidelity, which matches the TF reference: 8-bit pixels, TF1 bilinear resize
to 299x299 (no half-pixel offset), then (x - 128) / 128.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klvae.nets.pretrained import FrozenNet, fetch, load_strict, read_weights

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid caches the same converted checkpoint (same hash) under this name; reuse it when present.
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
# Both files' full SHA-256 (95,628,359 bytes); the names carry its first 8 digits.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm(eps=1e-3) + ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        """The activation."""
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    # TF's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """The 35x35 block (Mixed_5b..5d)."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenated branches."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """The 35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenated branches."""
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """The 17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenated branches."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """The 17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenated branches."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """The 8x8 block; the TF graph's second one (Mixed_7c) pools with max instead of average."""

    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenated branches."""
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


def tf_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TF1 does it with align_corners=False: source = target * (in / out), no half-pixel shift."""

    def axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        # float32 positions, as TF computes them (torch-fidelity's "slow" path is bit-exact with it this way).
        src = torch.arange(n_out, dtype=torch.float32, device=x.device) * torch.tensor(n_in / n_out)
        lo = src.long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo.float()).to(x.dtype)

    (h_in, w_in), (h_out, w_out) = x.shape[-2:], size
    y0, y1, fy = axis(h_in, h_out)
    x0, x1, fx = axis(w_in, w_out)
    rows = [x[..., y, :] for y in (y0, y1)]
    r0, r1 = (r[..., x0] + (r[..., x1] - r[..., x0]) * fx for r in rows)
    return r0 + (r1 - r0) * fy.view(-1, 1)


class InceptionV3Features(FrozenNet):
    """FID's Inception-v3: images [B, 3, H, W] in [-1, 1] -> pool3 features [B, 2048] (fp32).

    pretrained=True reads `weights` when given, else the torch hub cache, else downloads the converted
    TF checkpoint; without weights it raises KlvaeError. pretrained=False keeps the random init (tests).
    """

    def __init__(self, pretrained: bool = True, weights: str | Path | None = None) -> None:
        super().__init__()
        state_dict = None  # fetched first, so a missing file fails before 22M parameters are initialised
        if weights is not None or pretrained:
            state_dict = read_weights(weights, "Inception") if weights is not None else resolve_inception_weights()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        if state_dict is not None:
            self.load(state_dict)
        self.freeze()

    def load(self, state_dict: Mapping[str, Any]) -> None:
        """Load the converted TF checkpoint (the unused 1008-way `fc` is dropped), checking keys and shapes."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        for k, v in self.state_dict().items():
            if k.endswith("num_batches_tracked"):
                sd.setdefault(k, v)  # absent from older conversions, and unused in eval mode anyway
        load_strict(self, sd, "Inception weights")

    def forward(self, x: Tensor) -> Tensor:
        """Pool3 features; the input is quantised to 8 bits first, as the reference feeds it PNG pixels."""
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
        x = (tf_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE)) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def resolve_inception_weights(
    hint: str = "pass InceptionV3Features(weights=<file>) (klvae eval: --inception-weights <file>)",
) -> dict[str, Any]:
    """The converted TF Inception state dict: the torch hub cache (either package's file name), else a download;
    `hint` says how to name a file instead, in the caller's terms."""
    # The download and any cached copy are checked against the full hash: a file damaged in its data, or another
    # release, still loads (right keys and shapes) and gives plausible but wrong rFIDs. Both packages skip it.
    return fetch(INCEPTION_URL, (INCEPTION_FILE, PYTORCH_FID_FILE), "FID Inception", hint, sha256=INCEPTION_SHA256)
