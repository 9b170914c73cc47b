"""GroupNorm + SiLU as Triton kernels that read NHWC (channels_last) half-precision maps in place.

Eager PyTorch spends a decode's non-convolution time in GroupNorm and SiLU: its CUDA GroupNorm has long turned
channels_last input into NCHW (two transposes per norm), and the SiLU after it is one more read and write of the
map. Here a norm is three launches and three passes over the NHWC map:

1. `stats_kernel`: each program reduces a run of positions of one image to a per-group mean and M2 (sum of
   squared deviations), merged block by block with Chan's formula, so the variance never subtracts two large
   sums (E[x^2] - E[x]^2 loses digits when the mean is large against the spread);
2. `finalize_kernel`: one program per image merges the runs into each group's mean and rstd, and spreads them
   over the channels as a mean and a scale (rstd * weight);
3. `apply_kernel`: y = (x - mean) * scale + bias, then SiLU, in fp32 registers, written once in x's dtype.

Statistics are fp32 throughout, like PyTorch's GroupNorm on half inputs. Triton is imported only when a kernel
first runs; on the CPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1 (the tests do that), and
otherwise `group_norm_act` falls back to PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of a tile held in registers by one program of the statistics and apply kernels: 4096 fp32 values over
# 8 warps is 16 per thread (Inductor's heuristics also give 8 warps to elementwise blocks of this size). ptxas
# reports 34-59 registers per thread with 8 warps, 48-64 with 4 (tests/triton_aot.py --registers).
_TILE = 4096
_WARPS = 8
# Fused multiply-adds, named rather than left to Triton's default, which 3.10 turns off: the kernels' rounding
# then stays what the tests measured, whichever Triton a CUDA build of torch brings.
_FMA = True
# Aim for about this many statistics programs per norm: several waves on a 132-SM H100, few partial results.
_STATS_PROGRAMS = 1024


@functools.cache  # asked on every norm; the answer cannot change within a process
def available() -> bool:
    """True when Triton is installed (the kernels then run on CUDA tensors, or anywhere under its interpreter)."""
    return importlib.util.find_spec("triton") is not None


def _runs_here(x: Tensor) -> bool:
    return available() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def group_norm_act(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool) -> Tensor:
    """F.group_norm (then F.silu when `silu`) on a [B, C, H, W] map, fused when channels_last; x's dtype and layout."""
    if x.dim() != 4 or not _runs_here(x) or not x.is_contiguous(memory_format=torch.channels_last):
        # NCHW stays with PyTorch, whose kernel for that layout is native; the tiles here are rows of positions
        # across all channels, contiguous only in NHWC.
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y
    # Triton launches on the current CUDA device, which need not be x's (cuda:1 from the CLI, say).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return _launch(x, weight, bias, groups, eps, silu)


def _launch(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool) -> Tensor:
    k = _kernels()
    b, c, h, w = x.shape
    hw, cpg = h * w, c // groups
    g_p, cpg_p = triton_next_pow2(groups), triton_next_pow2(cpg)
    block = max(1, _TILE // (g_p * cpg_p))
    rows = max(block, -(-b * hw // _STATS_PROGRAMS) // block * block)  # positions per stats program
    progs = -(-hw // rows)
    part = torch.empty(b, progs, 2, g_p, device=x.device, dtype=torch.float32)  # per run: mean, M2
    # Positions of a channels_last-dense map are C apart. Not stride(3): PyTorch ignores a size-1 dim's stride when
    # it judges contiguity, so a map one position wide may carry any width stride (y, empty_like(x), too).
    sx = (x.stride(0), x.stride(1), c)
    k.stats_kernel[(b, progs)](x, part, hw, *sx, rows, progs,
                               G=groups, CPG=cpg, G_P=g_p, CPG_P=cpg_p, BLOCK_HW=block, num_warps=_WARPS,
                               enable_fp_fusion=_FMA)
    mean = torch.empty(b, c, device=x.device, dtype=torch.float32)  # per channel: its group's mean
    scale = torch.empty_like(mean)  # rstd * weight
    k.finalize_kernel[(b,)](part, weight, mean, scale, hw, c, rows, progs, eps,
                            G=groups, CPG=cpg, G_P=g_p, CPG_P=cpg_p, BLOCK_P=max(1, _TILE // g_p // 2),
                            enable_fp_fusion=_FMA)
    y = torch.empty_like(x)
    c_p = triton_next_pow2(c)
    block = max(1, _TILE // c_p)
    k.apply_kernel[(-(-hw // block), b)](x, y, mean, scale, bias, hw, c, *sx, SILU=silu, C_P=c_p, BLOCK_HW=block,
                                             num_warps=_WARPS, enable_fp_fusion=_FMA)
    return y


def triton_next_pow2(n: int) -> int:
    """Smallest power of two >= n (tl.arange lengths must be powers of two)."""
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _kernels() -> ModuleType:
    # Imported late so that klvae imports without Triton, and so that TRITON_INTERPRET, which Triton reads when a
    # kernel is defined, takes effect when a test sets it before the first call.
    return importlib.import_module("klvae.inference.fused_norm_kernels")
