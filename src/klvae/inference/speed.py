"""Speed levers for inference: weights in the compute dtype, channels_last, folded upsampling, fused GroupNorm +
SiLU kernels, torch.compile, cuDNN.

The plain API (fp32 weights under autocast) is exact and portable but leaves speed on the table on a GPU:
autocast runs GroupNorm in fp32, so every norm writes fp32 activations that the next convolution casts back,
and NCHW tensors make cuDNN's tensor-core convolutions transpose. `optimize_for_inference` removes both,
runs each GroupNorm and the SiLU after it as Triton kernels that read NHWC maps in place, and on request compiles
the encoder and decoder so that GroupNorm, SiLU and the residual adds fuse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from klvae.errors import KlvaeError
from klvae.inference import fused_norm
from klvae.model.autoencoder import AutoencoderKL
from klvae.model.blocks import GroupNorm, Upsample

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SpeedOptions:
    """Which levers to pull; None means "the right choice for the device" (on for CUDA, off elsewhere, but
    channels_last, on for the CPU too)."""

    # Keep the weights in the half compute dtype: no per-call weight casts, and GroupNorm reads and writes half
    # precision while accumulating its statistics in fp32. The NaN guard still reruns an overflow in fp32.
    cast_weights: bool | None = None
    # NHWC activations and weights: the layout cuDNN's tensor-core convolutions and oneDNN's CPU ones use natively.
    channels_last: bool | None = None
    # Run each decoder upsampler (nearest x2, 3x3 conv) as one stride-2 transposed conv with a folded 4x4 kernel:
    # 2.25x fewer multiply-adds in those convs (15 % of a decode's arithmetic) and no upsampled map; equal up to the
    # order of sums, and exact math on every device, so on by default.
    fold_upsample: bool = True
    # Run each GroupNorm and the SiLU after it as Triton kernels (klvae.inference.fused_norm): three passes over
    # the map in its own layout instead of PyTorch's NHWC->NCHW round trip and a separate SiLU. None: on for CUDA
    # when Triton is installed and nothing is compiled (Inductor fuses the same ops itself).
    fused_norm: bool | None = None
    # torch.compile the encoder and decoder: the first call per input shape compiles (tens of seconds on a
    # GPU); Inductor's on-disk cache makes later processes start fast. Off unless asked for.
    compile: bool = False
    # torch.compile's mode; "reduce-overhead" adds CUDA graphs for repeated shapes.
    compile_mode: str = "default"
    # cuDNN picks the fastest convolution algorithm per shape (a process-wide switch; CUDA only).
    cudnn_benchmark: bool | None = None


def optimize_for_inference(
    vae: AutoencoderKL, dtype: torch.dtype, opts: SpeedOptions | None = None
) -> AutoencoderKL:
    """Apply the levers to `vae` in place (and switch it to eval mode); returns it for chaining."""
    opts = opts or SpeedOptions()
    if opts.compile_mode not in COMPILE_MODES:
        raise KlvaeError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {opts.compile_mode!r}")
    cuda = vae.device.type == "cuda"
    vae.eval()
    if _on(opts.cast_weights, cuda) and dtype in (torch.bfloat16, torch.float16):
        _check_fits(vae, dtype)
        vae.to(dtype)
    # NHWC convolutions are faster on the CPU too (oneDNN's native layout: 7-16 % on SD's VAE, docs/benchmarks.md);
    # other backends keep NCHW unless asked.
    channels_last = _on(opts.channels_last, vae.device.type in ("cuda", "cpu"))
    # Both ways: a model optimised before keeps NHWC weights otherwise, and its convs round differently from NCHW.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    vae.to(memory_format=layout)  # type: ignore[call-overload]  # Module.to takes it; its stub not
    fused = _fused_norm(opts, cuda)
    for m in vae.modules():
        if isinstance(m, Upsample):
            m.fold = opts.fold_upsample
        if isinstance(m, GroupNorm):
            m.kernel = fused_norm.group_norm_act if fused else None
    if _on(opts.cudnn_benchmark, cuda):
        torch.backends.cudnn.benchmark = True
    if opts.compile:
        # In place (nn.Module.compile): the state dict keeps its keys, and the tiled path, which calls the
        # blocks one by one, stays eager.
        vae.encoder.compile(mode=opts.compile_mode, dynamic=False)
        vae.decoder.compile(mode=opts.compile_mode, dynamic=False)
    log.debug("inference levers: weights %s, %s, folded upsampling %s, fused norms %s, compile %s",
              str(next(vae.parameters()).dtype).split(".")[-1], "channels_last" if channels_last else "NCHW",
              "on" if opts.fold_upsample else "off", "on" if fused else "off",
              opts.compile_mode if opts.compile else "off")
    return vae


def _check_fits(vae: AutoencoderKL, dtype: torch.dtype) -> None:
    """KlvaeError for weights that `dtype` would turn into inf (every output NaN, the fp32 rerun's too)."""
    top = torch.finfo(dtype).max
    # Cast as the weights will be: fp16 rounds up to 65519.99... down to its largest value, inf only past that.
    bad = [n for n, t in vae.state_dict().items()
           if t.is_floating_point() and t.numel() and bool(torch.isinf(t.abs().max().to(dtype)))]
    if bad:
        raise KlvaeError(f"{len(bad)} weight(s) ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}) are beyond "
                         f"the range of {str(dtype).removeprefix('torch.')} ({top:g}): use float32 or bfloat16")


def _fused_norm(opts: SpeedOptions, cuda: bool) -> bool:
    if opts.fused_norm is None:
        return cuda and fused_norm.available() and not opts.compile
    if opts.fused_norm and not fused_norm.available():
        raise KlvaeError("fused GroupNorm kernels need Triton: pip install triton")
    return opts.fused_norm


def _on(choice: bool | None, cuda: bool) -> bool:
    return cuda if choice is None else choice
