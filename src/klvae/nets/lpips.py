"""LPIPS (v0.1, VGG16 trunk): a perceptual distance written without torchvision or the `lpips` package.

The VGG16 `features` stack mirrors torchvision's layer indexing, so torchvision's ImageNet checkpoint
(vgg16-397923af.pth) loads unchanged; the five 1x1 linear layers use the `lpips` package's v0.1 key layout
(lin{0..4}.model.1.weight). Inputs are images in [-1, 1]; the distance is per sample, shaped [B, 1, 1, 1].
Weights found automatically are checked against their SHA-256 (see klvae.nets.pretrained.fetch).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from klvae.nets.pretrained import FrozenNet, check_sha256, fetch, hash_prefix, load_strict, read_weights

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
# At the commit that last changed the file (its git blob 47e943cf is the wheel's file): a branch could move.
LIN_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/c33f89e9f46522a584cf41d8880eb0afa982708b/"
           "lpips/weights/v0.1/vgg.pth")
# A distinct cache name: a bare "vgg.pth" in the shared hub cache could be anybody's file.
LIN_FILE = "lpips-v0.1-vgg.pth"
# The heads' SHA-256 (7,289 bytes): the file at LIN_URL's path, lpips/weights/v0.1/vgg.pth, as the lpips 0.1.4
# wheel ships it (its RECORD lists the same hash).
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

# torchvision's VGG16 "D" configuration up to relu5_3 (the final max-pool is never tapped, so it is left out).
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# The LPIPS ScalingLayer: maps [-1, 1] input to roughly ImageNet-normalised statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


# The VGG trunk pools four times before its last tap: a side under 16 px has nothing left to pool.
LPIPS_MIN_SIDE = 16

class VGG16Features(nn.Module):
    """torchvision's `vgg16().features[:30]`, returning the five ReLU taps LPIPS compares."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # In-place ReLU is safe: conv backward needs its input, and every tap is followed by a pool.
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The activations at relu1_2 .. relu5_3."""
        taps: list[Tensor] = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    """A 1x1 channel weighting; `model.0` is the (never active) dropout that keeps the lpips key layout."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, 1, H, W]."""
        return self.model(x)


class LinLayers(nn.Module):
    """The five linear heads, named lin0..lin4 as in the lpips checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        for i, c in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{i}", NetLinLayer(c))

    def heads(self) -> Iterator[NetLinLayer]:
        """lin0..lin4 in tap order."""
        for i in range(len(TAP_CHANNELS)):
            yield getattr(self, f"lin{i}")


def _unit_normalise(f: Tensor, eps: float = 1e-10) -> Tensor:
    # fp32 on purpose: under fp16 autocast eps underflows to 0 and an all-zero ReLU column gives 0/0.
    f = f.float()
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(FrozenNet):
    """Learned perceptual distance between two image batches in [-1, 1]; returns [B, 1, 1, 1].

    pretrained=True fetches the VGG16 ImageNet weights and the LPIPS v0.1 heads (see `resolve_*`);
    explicit vgg_path / lin_path files win over any download. pretrained=False with no paths gives a random
    backbone (for tests) with non-negative heads, so the value is still a distance >= 0.
    The whole module is frozen and stays in eval mode, but gradients flow to its inputs.
    """

    shift: Tensor  # buffers: ImageNet's normalisation, in the [-1, 1] scale of the inputs
    scale: Tensor

    def __init__(
        self,
        pretrained: bool = True,
        vgg_path: str | Path | None = None,
        lin_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lin = LinLayers()
        for head in self.lin.heads():
            conv = head.model[1]
            assert isinstance(conv, nn.Conv2d)
            nn.init.uniform_(conv.weight, 0.0, 1.0 / conv.in_channels)
        # A file named here may be any file, so its errors name it; the ones found for us are hash-checked.
        if vgg_path is not None:
            self.load_vgg(read_weights(vgg_path, "VGG16"), f"VGG16 weights in {vgg_path}")
        elif pretrained:
            self.load_vgg(resolve_vgg_weights())
        if lin_path is not None:
            self.load_lin(read_weights(lin_path, "LPIPS linear"), f"LPIPS linear weights in {lin_path}")
        elif pretrained:
            self.load_lin(resolve_lin_weights())
        self.freeze()

    def load_vgg(self, state_dict: Mapping[str, Any], what: str = "VGG16 weights") -> None:
        """Load a torchvision-layout VGG16 state dict (classifier.* ignored), checking keys and shapes."""
        features = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        load_strict(self.net, features, what)

    def load_lin(self, state_dict: Mapping[str, Any], what: str = "LPIPS linear weights") -> None:
        """Load an lpips-layout head state dict (lin{0..4}.model.1.weight), checking keys and shapes."""
        load_strict(self.lin, state_dict, what)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS(x, y) per sample, [B, 1, 1, 1]; x and y are [B, 3, H, W] in [-1, 1], H and W >= LPIPS_MIN_SIDE."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two [B, 3, H, W] batches of one shape, got {list(x.shape)}, {list(y.shape)}")
        if min(x.shape[-2:]) < LPIPS_MIN_SIDE:  # else torch's "Output size is too small" from the last pooling
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIDE} px a side, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        n = x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad != y.requires_grad:
            # A loss (gradients to one side only): one pass over both batches would run the VGG's backward,
            # and keep its activations, for the side that needs none as well.
            pairs = list(zip(self.net((x - self.shift) / self.scale), self.net((y - self.shift) / self.scale),
                             strict=True))
        else:
            # A metric: one pass over both batches, half the kernel launches, same numbers.
            pairs = [(f[:n], f[n:]) for f in self.net((torch.cat([x, y]) - self.shift) / self.scale)]
        total = x.new_zeros((n, 1, 1, 1), dtype=torch.float32)
        for (fx, fy), head in zip(pairs, self.lin.heads(), strict=True):
            diff = (_unit_normalise(fx) - _unit_normalise(fy)).pow(2)
            total = total + head(diff).float().mean(dim=(2, 3), keepdim=True)
        return total


def installed_lpips_lin() -> Path | None:
    """The v0.1 VGG heads shipped inside an installed `lpips` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(root) / "weights" / "v0.1" / "vgg.pth"
        if p.is_file():
            return p
    return None


def resolve_vgg_weights(hint: str = "set loss.lpips_vgg_path (LPIPS(vgg_path=...))") -> dict[str, Any]:
    """torchvision's VGG16 ImageNet state dict: the torch hub cache, else a download; `hint` says how to name a
    file instead, in the caller's terms."""
    # As torch.hub's check_hash: the hash prefix in torchvision's file name.
    return fetch(VGG16_URL, (VGG16_FILE,), "VGG16 ImageNet", hint, sha256=hash_prefix(VGG16_FILE))


def resolve_lin_weights(hint: str = "set loss.lpips_lin_path (LPIPS(lin_path=...))") -> dict[str, Any]:
    """The LPIPS v0.1 VGG heads: an installed lpips package, the torch hub cache, else a download; each checked
    against LIN_SHA256."""
    local = installed_lpips_lin()
    if local is not None:
        check_sha256(local, LIN_SHA256, f"LPIPS v0.1 linear file {local} of the installed lpips package",
                     f"reinstall lpips, or {hint}")
        return read_weights(local, "LPIPS linear")
    return fetch(LIN_URL, (LIN_FILE,), "LPIPS v0.1 linear", hint, sha256=LIN_SHA256)
