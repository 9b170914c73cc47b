"""Compute precision: pick a dtype for the device, run under autocast, rerun in fp32 when a half step overflows."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from klvae.errors import KlvaeError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None, what: str = "device") -> torch.device:
    """`None`/"auto" -> CUDA when present, else CPU; anything else as given (checked); `what` names the setting."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        # torch's own message lists twenty backends; these are the ones a VAE runs on.
        raise KlvaeError(f"{what} {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KlvaeError(f"{what} {device!r} asked for, but CUDA is not available here")
    return dev


def usable_device(device: str | torch.device | None, what: str = "device") -> torch.device:
    """`resolve_device`, then checked to hold data on this machine; `what` names the setting in the error."""
    dev = resolve_device(device, what)
    if dev.type == "meta":
        raise KlvaeError(f"{what} {device}: the meta device holds no data and cannot run a model; "
                         "use auto, cpu or cuda")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KlvaeError(f"{what} {device}: Apple's MPS backend is not available here")
    if dev.type == "cuda":
        # Counted, not allocated: under torchrun every rank would otherwise open a context on GPU 0.
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KlvaeError(f"{what} {device} is not available here: {torch.cuda.device_count()} GPU(s)")
        return dev
    if dev.type != "cpu":
        try:
            # xpu and the like fail here, in one line, not deep inside a model load.
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError, ValueError, ImportError) as e:  # ImportError: torch.hpu absent
            # torch's messages run to several lines and a list of backends; the first sentence says it.
            reason = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0][:160]
            raise KlvaeError(f"{what} {device} is not available here: {reason}") from None
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto" -> bf16 on GPUs that support it, fp32 elsewhere; names as in DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        dtype = dtype.lower()  # FP16 and BF16 as they are often written (convert --dtype took them already)
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise KlvaeError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(DTYPES)))}") from None


HALF_DTYPES = (torch.float16, torch.bfloat16)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to a half dtype (GroupNorm and softmax stay fp32 under it), or nothing for fp32 (and fp64)."""
    if dtype not in HALF_DTYPES:  # autocast to fp64 warns on every call and does nothing
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _computing_in(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    # A full-precision pass turns off a caller's own autocast, which would otherwise run it in half precision.
    return autocast(device, dtype) if dtype in HALF_DTYPES else torch.autocast(device.type, enabled=False)


@contextlib.contextmanager
def _fp32_weights(model: nn.Module) -> Iterator[None]:
    # Weights stored in another precision are upcast for the rerun only, then given back as they were: each its own
    # tensor (a model may mix dtypes; a cast back would round fp64 ones, or make tensors of inference_mode).
    saved = [(t, t.data) for t in (*model.parameters(), *model.buffers())
             if t.is_floating_point() and t.dtype != torch.float32]
    for t, data in saved:
        t.data = data.float()
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


def _run_fp32(model: nn.Module, fn: Callable[[Tensor, torch.dtype], Tensor], x: Tensor) -> Tensor:
    # The weights' device computes (x may wait in host memory): its autocast is the one to turn off.
    with _fp32_weights(model), _computing_in(next(model.parameters()).device, torch.float32):
        return fn(x.float(), torch.float32).float()


def pass_modules(vae: nn.Module, op: str) -> nn.Module:
    """The modules an encode or a decode runs, whose weights' dtype and device are the pass's: a pipeline may keep
    the encoder in another dtype, or place, than the decoder."""
    names = ("encoder", "quant_conv") if op == "encode" else ("post_quant_conv", "decoder")
    return nn.ModuleList(m for m in (getattr(vae, n, None) for n in names) if m is not None)


def compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a pass computes in: the one asked for, else the dtype the model's weights are stored in."""
    stored = next(model.parameters()).dtype
    if dtype is None or dtype == stored:
        return stored
    # autocast runs only these; any other dtype (an integer one, float64, "bf16") would be taken in silence as fp32.
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16 (or the weights' own "
                        f"{stored}), got {dtype!r}")
    if dtype in HALF_DTYPES and stored in HALF_DTYPES:
        # Weights stored in half precision compute in it (autocast would mix the two types); the other half type
        # would be a silent no-op, while fp32 is honoured with a temporary upcast.
        raise ValueError(f"dtype {dtype} asked of weights stored in {stored}: compute in {stored} (dtype=None) or "
                         f"torch.float32, or cast the model to {dtype} first")
    if dtype in HALF_DTYPES and stored == torch.float64:
        # autocast leaves float64 tensors alone: the pass would compute in fp64, as if nothing had been asked.
        raise ValueError(f"dtype {dtype} asked of weights stored in torch.float64, which autocast does not lower: "
                         f"cast the model to torch.float32 (or {dtype}) first")
    return dtype


# Device types already warned about fp16 being slow there: one log line per process, not one per batch or tile.
_slow_half_warned: set[str] = set()


def warn_if_slow(device: torch.device, dtype: torch.dtype) -> None:
    """Log once per process that fp16 compute on the CPU is far slower than fp32 (or native bf16) there."""
    if dtype != torch.float16 or device.type != "cpu" or device.type in _slow_half_warned:
        return
    _slow_half_warned.add(device.type)
    # PyTorch's CPU fp16 convolutions fall back to slow kernels on most CPUs (the demo model at 128x128 on an AMD
    # EPYC with AVX-512: 50x fp32's time to encode, 110x to decode; bf16 beat fp32). fp16 still runs as asked,
    # as someone reproducing fp16 numerics wants. bf16 is fast only where the CPU has it natively.
    log.warning("fp16 on the CPU is usually tens of times slower than fp32 (PyTorch has fast fp16 convolutions on "
                "few CPUs); use fp32, or bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), unless you need fp16's "
                "numerics")


def run_guarded(
    model: nn.Module, fn: Callable[[Tensor, torch.dtype], Tensor], x: Tensor, dtype: torch.dtype, what: str
) -> Tensor:
    """fn(x, dtype) under autocast; when a half-precision pass yields non-finite values, rerun in fp32 with a
    warning. A caller's own autocast does not lower a full-precision pass."""
    weight = next(model.parameters())
    weight_dtype = weight.dtype
    if dtype == torch.float32 and weight_dtype != torch.float32:
        # fp32 asked outright of a model stored in half precision (optimize_for_inference): upcast for this call.
        return _run_fp32(model, fn, x)
    if weight_dtype != torch.float32:
        dtype = weight_dtype  # a model stored in half precision computes in it; autocast would mix types
    warn_if_slow(weight.device, dtype)
    # Weights stored in the compute dtype need no autocast, and CUDA's would run every PyTorch GroupNorm in fp32,
    # writing fp32 maps for the next conv to cast back: what storing them in half precision is there to avoid.
    computing = (torch.autocast(weight.device.type, enabled=False) if weight_dtype in HALF_DTYPES
                 else _computing_in(weight.device, dtype))  # the weights' device: x may wait in host memory
    with computing:
        out = fn(x.to(weight_dtype), dtype)
    if dtype not in HALF_DTYPES or torch.isfinite(out).all():
        return out.float()  # finite, or nothing higher to fall back to (the caller checks the output)
    if not bool(torch.isfinite(x).all()):
        return out.float()  # NaN in, NaN out, as diffusers gives (klvae's API refuses such input before the pass)
    half = str(dtype).split(".")[-1]
    # Once per process at WARNING, as the other precision notes: a job of many batches would repeat it per batch.
    said = (what, half) in _rerun_warned
    _rerun_warned.add((what, half))
    log.log(logging.DEBUG if said else logging.WARNING, "%s produced non-finite values in %s; rerunning this step in "
            "fp32%s", what, half, "" if said else " (said once; later reruns of this kind are logged at debug level)")
    return _run_fp32(model, fn, x)


# (what, dtype) pairs whose fp32 rerun was already announced at WARNING in this process.
_rerun_warned: set[tuple[str, str]] = set()
