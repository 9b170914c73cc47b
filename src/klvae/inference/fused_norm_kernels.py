"""Triton kernels of `klvae.inference.fused_norm`; imported only when a fused norm first runs.

Triton compiles a variant of a kernel per set of argument properties (equal to 1, divisible by 16). Sizes and
run counts change with every resolution, so they are not specialised: a model's norms then need one variant
per width and dtype (about a dozen, compiled on first use and cached on disk by Triton), while the strides,
whose unit channel stride and 16-divisible row stride let loads vectorise, still are.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["HW", "ROWS", "P"])
def stats_kernel(x_ptr, part_ptr, HW, s_n, s_c, s_hw, ROWS, P,
                 G: tl.constexpr, CPG: tl.constexpr, G_P: tl.constexpr, CPG_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Pass 1: per sample and run of ROWS positions, each group's mean and sum of squared deviations (M2)."""
    # The tile is 2-D, [positions, channels], channels being group-major (k = g * CPG_P + j), so its loads are
    # 16-byte runs along the channels at every width; the merge of a group's channels happens on the block's
    # small per-channel vectors.
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    k = tl.arange(0, G_P * CPG_P)
    if G == G_P and CPG == CPG_P:  # k is the channel: Triton then sees unit-stride runs and vectorises the loads
        ch = k
        cmask = (k < G * CPG)[None, :]
    else:
        g, j = k // CPG_P, k % CPG_P
        ch = g * CPG + j
        cmask = ((g < G) & (j < CPG))[None, :]
    jmask = (tl.arange(0, CPG_P) < CPG)[None, :]
    base = x_ptr + n * s_n + ch.to(tl.int64)[None, :] * s_c
    r = tl.arange(0, BLOCK_HW)[:, None]
    mean = tl.zeros((G_P,), tl.float32)
    m2 = tl.zeros((G_P,), tl.float32)
    cnt = tl.zeros((G_P,), tl.float32)
    start = p * ROWS
    for r0 in range(0, ROWS, BLOCK_HW):
        hw = start + r0 + r
        mask = cmask & (hw < HW) & (r0 + r < ROWS)
        x = tl.load(base + hw.to(tl.int64) * s_hw, mask=mask, other=0.0).to(tl.float32)
        valid = tl.maximum(tl.minimum(tl.minimum(HW - start - r0, ROWS - r0), BLOCK_HW), 0).to(tl.float32)
        # Each channel's mean and M2 over the block, then each group's: the channels' M2 plus their means' spread.
        mc = tl.sum(x, axis=0) / tl.maximum(valid, 1.0)
        d = tl.where(mask, x - mc[None, :], 0.0)
        m2c = tl.reshape(tl.sum(d * d, axis=0), (G_P, CPG_P))
        mc = tl.reshape(mc, (G_P, CPG_P))
        mb = tl.sum(tl.where(jmask, mc, 0.0), axis=1) / CPG
        dc = tl.where(jmask, mc - mb[:, None], 0.0)
        m2b = tl.sum(tl.where(jmask, m2c, 0.0) + valid * dc * dc, axis=1)
        nb = valid * CPG
        tot = cnt + nb
        frac = nb / tl.maximum(tot, 1.0)
        delta = mb - mean
        mean = mean + delta * frac
        m2 = m2 + m2b + delta * delta * cnt * frac
        cnt = tot
    out = part_ptr + ((n * P + p) * 2) * G_P + tl.arange(0, G_P)
    tl.store(out, mean)
    tl.store(out + G_P, m2)


@triton.jit(do_not_specialize=["HW", "C", "ROWS", "P"])
def finalize_kernel(part_ptr, w_ptr, mean_ptr, scale_ptr, HW, C, ROWS, P, eps,
                    G: tl.constexpr, CPG: tl.constexpr, G_P: tl.constexpr, CPG_P: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pass 2: merge the blocks' partial statistics per group; store each channel's mean and weight / std."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_P)[None, :]
    total = (HW * CPG).to(tl.float32)
    acc = tl.zeros((G_P,), tl.float32)
    for p0 in range(0, P, BLOCK_P):  # the mean, from each run's mean weighted by its count
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        pm = (p < P) & (g < G)
        cnt = (tl.minimum(ROWS, HW - p * ROWS) * CPG).to(tl.float32)
        mp = tl.load(part_ptr + ((n * P + p) * 2) * G_P + g, mask=pm, other=0.0)
        acc += tl.sum(tl.where(pm, cnt * mp, 0.0), axis=0)
    mean = acc / total
    m2 = tl.zeros((G_P,), tl.float32)
    for p0 in range(0, P, BLOCK_P):  # M2 = sum of the runs' M2 + count * (run mean - mean)^2
        p = p0 + tl.arange(0, BLOCK_P)[:, None]
        pm = (p < P) & (g < G)
        cnt = (tl.minimum(ROWS, HW - p * ROWS) * CPG).to(tl.float32)
        ptr = part_ptr + ((n * P + p) * 2) * G_P + g
        d = tl.load(ptr, mask=pm, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.where(pm, tl.load(ptr + G_P, mask=pm, other=0.0) + cnt * d * d, 0.0), axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    gg = tl.arange(0, G_P)[:, None]
    jj = tl.arange(0, CPG_P)[None, :]
    c = gg * CPG + jj
    cm = (gg < G) & (jj < CPG)
    sc = rstd[:, None] * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(mean_ptr + n * C + c, tl.zeros_like(sc) + mean[:, None], mask=cm)
    tl.store(scale_ptr + n * C + c, sc, mask=cm)


@triton.jit(do_not_specialize=["HW"])
def apply_kernel(x_ptr, y_ptr, mean_ptr, scale_ptr, b_ptr, HW, C: tl.constexpr, s_n, s_c, s_hw,
                 SILU: tl.constexpr, C_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Pass 3: y = (x - mean) * scale + bias, then SiLU when asked, in the input's dtype."""
    # C is a constant (a model has a few widths) so that the channel mask is known per run of channels and the
    # loads and stores vectorise; with C an argument they were 2-byte accesses.
    # Blocks of positions on grid axis 0, which may exceed axis 1's limit of 65535 (131072 at 2048² and C = 128).
    n = tl.program_id(1).to(tl.int64)
    hw = (tl.program_id(0).to(tl.int64) * BLOCK_HW + tl.arange(0, BLOCK_HW)[:, None])
    c = tl.arange(0, C_P)[None, :]
    mask = (hw < HW) & (c < C)
    offs = n * s_n + hw * s_hw + c * s_c  # y is laid out as x (empty_like of a dense map)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) * scale + bias, not x * scale + (bias - mean * scale): that would cancel two products of the
    # mean's size, whose rounding rstd amplifies where a group barely varies.
    mean = tl.load(mean_ptr + n * C + c, mask=c < C, other=0.0)
    scale = tl.load(scale_ptr + n * C + c, mask=c < C, other=0.0)
    y = (x - mean) * scale + tl.load(b_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
