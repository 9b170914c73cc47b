"""Building blocks of the KL autoencoder. Module names follow diffusers so a state dict is its layout."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (x, weight, bias, groups, eps, silu) -> norm(x), then SiLU when silu: the signature of a fused kernel.
NormKernel = Callable[[Tensor, Tensor, Tensor, int, float, bool], Tensor]


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and keys) that also applies the SiLU after it, fused when a kernel is set."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__(num_groups=groups, num_channels=channels, eps=eps, affine=True)
        # Set by klvae.inference.speed (a Triton kernel on CUDA); None runs PyTorch's ops. The kernel has no
        # backward, so it only runs where autograd records nothing.
        self.kernel: NormKernel | None = None

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        """[B, C, H, W] (or [B, C, L]) -> the normalised map (then SiLU when `silu`), same shape, dtype and layout
        (NCHW, though, for an NHWC input needing no gradient under trainable norms on the CPU: see below)."""
        grads = x.requires_grad or self.weight.requires_grad or self.bias.requires_grad
        if self.kernel is not None and not (torch.is_grad_enabled() and grads):  # the kernels record no gradients
            return self.kernel(x, self.weight, self.bias, self.num_groups, self.eps, silu)
        if grads and not x.requires_grad and x.device.type == "cpu" and torch.is_grad_enabled():
            # torch 2.13's CPU backward crashes (segfault) for an NHWC input that needs no gradient while the
            # affine parameters do (a frozen part before trainable norms); in NCHW it is the same arithmetic.
            x = x.contiguous()
        y = super().forward(x)
        return F.silu(y) if silu else y


def group_norm(channels: int, groups: int, eps: float) -> GroupNorm:
    """GroupNorm with the autoencoder's affine parameters."""
    return GroupNorm(channels, groups, eps)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, Cin, H, W] -> [B, Cout, H, W]."""
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head softmax self-attention over the H*W positions, with a residual (LDM's AttnBlock)."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.group_norm = group_norm(channels, groups, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list so the key is `to_out.0.*`, as diffusers names it (its slot 1 is a parameter-free dropout).
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]: x plus attention over its H*W positions."""
        b, c, h, w = x.shape
        # Normalised on the [B, C, H*W] view, as diffusers does. That view of a channels-last map (encode's mode()
        # at batch 2+, a channels-last latent or image) has no channels-last layout, so PyTorch's CPU GroupNorm
        # sums it in NCHW order; the 4-D map would take its channels-last kernel and sum in another order (~1e-5
        # at the output; on CUDA both run as NCHW). A fused kernel (klvae.inference.speed), which reads NHWC 4-D
        # maps in place and is not bit-exact anyway, keeps the 4-D map.
        norm = self.group_norm
        t = norm(x.flatten(2)) if norm.kernel is None else norm(x).flatten(2)
        t = t.transpose(1, 2)  # [B, C, H*W] -> [B, H*W, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
        a = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)
        # a first, as diffusers adds: the sum takes a's channels-last strides, and the convolutions after it pick
        # their kernels by layout, so the other order differs from diffusers by rounding at batch > 1.
        return a + x


class LinearAttention(nn.Module):
    """LDM's `linear` attention (LinAttnBlock): softmax over positions of k, no norm and no residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.to_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, c, h * w).unbind(1)  # each [B, C, HW]
        context = torch.einsum("bdn,ben->bde", k.softmax(dim=-1), v)  # [B, C, C]
        out = torch.einsum("bde,bdn->ben", context, q).reshape(b, c, h, w)
        return self.to_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv: the asymmetric LDM downsampler."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2] (H, W even)."""
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


def fold_upsample_kernel(weight: Tensor) -> Tensor:
    """The [Cin, Cout, 4, 4] conv_transpose2d(stride 2, padding 1) kernel equal to nearest x2 then `weight` (3x3)."""

    def fold(w: Tensor, dim: int) -> Tensor:
        # Along one axis, even outputs read source taps (w0) and (w1 + w2), odd ones (w0 + w1) and (w2); the
        # transposed conv's taps 0..3 hold them in this order.
        a, b, c = w.unbind(dim)
        return torch.stack([c, b + c, a + b, a], dim)

    # Summed in fp32 or wider (plain adds: autocast leaves them alone) so half weights are rounded once, after the
    # sum, and fp64 weights keep their precision.
    wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return fold(fold(wide, 2), 3).transpose(0, 1).to(weight.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        # True: run as one stride-2 transposed conv with a folded 4x4 kernel. Each output pixel then reads 2x2
        # source pixels instead of 3x3 upsampled ones (2.25x fewer multiply-adds, no upsampled map); equal up
        # to the order of sums. Off by default so that outputs match diffusers bit for bit.
        self.fold = False

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        if self.fold:
            w, b = fold_upsample_kernel(self.conv.weight), self.conv.bias
            return F.conv_transpose2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), stride=2, padding=1)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, eps: float, attention: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, eps) for _ in range(2)])
        if attention == "vanilla":
            self.attentions = nn.ModuleList([Attention(channels, groups, eps)])
        elif attention == "linear":
            self.attentions = nn.ModuleList([LinearAttention(channels)])
        else:
            self.attentions = nn.ModuleList()

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, C, h, w]."""
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then an optional downsampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, eps: float, down: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, eps) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if down else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, Cin, H, W] -> [B, Cout, H, W], halved when the level downsamples."""
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then an optional upsampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, eps: float, up: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, eps) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if up else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, Cin, H, W] -> [B, Cout, H, W], doubled when the level upsamples."""
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x
