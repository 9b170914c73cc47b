"""Pins what a bug hunt of the GPU benchmark run (benchmarks/bench.py, gpu.sh and the inference levers they time)
found measuring the wrong thing for a reason visible without a GPU:

- a model stored in bf16 by `optimize_for_inference` (klvae-fast and its -unfused/-nchw variants on a GPU, the CLI's
  default there) still runs under bf16 autocast (`precision.run_guarded`), and CUDA's autocast runs every PyTorch
  GroupNorm in fp32: each norm then writes fp32 activations, where the docs promise "GroupNorm reads and writes
  bf16" (docs/benchmarks.md, SpeedOptions.cast_weights). The GPU table's klvae-fast vs klvae-unfused / klvae-nchw
  rows (which decide the fused kernels and the layout) would weigh the kernels against fp32-writing norms;
- `bench.time_once` ignores the index of `--device cuda:N`: it synchronises, records its events on and reads the
  peak memory of the current device (GPU 0), not the one the work runs on.

CUDA is emulated on the CPU: CUDA's autocast policy for aten::group_norm (fp32) is registered for AutocastCPU, and
torch.cuda's timing and memory calls are replaced by a recording fake.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from helpers import benchmark_script, perturbed_vae
from klvae import inference
from klvae.inference import SpeedOptions, optimize_for_inference
from klvae.model.blocks import GroupNorm


def _bench() -> ModuleType:
    return benchmark_script("bench")


@contextlib.contextmanager
def _cuda_autocast_policy_on_the_cpu() -> Iterator[None]:
    """Make the CPU's autocast treat aten::group_norm as CUDA's does: inputs cast to fp32, an fp32 result."""
    try:  # torch registers an fp32 kernel for group_norm under AutocastCUDA (a fallthrough under AutocastCPU)
        table = torch._C._dispatch_dump_table("aten::group_norm")
    except (AttributeError, RuntimeError):
        table = "AutocastCUDA: registered"
    if "AutocastCUDA: registered" not in table:
        pytest.skip("this torch's CUDA autocast no longer runs group_norm in fp32")
    lib = torch.library.Library("aten", "IMPL")
    skip_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def group_norm_fp32(x, groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
        up = lambda t: None if t is None else t.float()  # noqa: E731
        with torch._C._ExcludeDispatchKeyGuard(skip_autocast):
            return torch.ops.aten.group_norm(up(x), groups, up(weight), up(bias), eps, cudnn_enabled)

    lib.impl("group_norm", group_norm_fp32, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


@pytest.mark.parametrize("variant", ["klvae-unfused", "klvae-nchw"])
def test_bf16_weights_norms_write_bf16_under_cuda_autocast(variant: str) -> None:
    # What a GPU run gets now: every PyTorch GroupNorm of a bf16-stored model writes fp32 activations (autocast's
    # fp32 policy), so klvae-unfused/-nchw time fp32 norms against diffusers' and the fused kernels' bf16 ones.
    vae = perturbed_vae("tiny")
    # The levers bench.make_variants pulls for these variants, as SpeedOptions' None choices resolve on CUDA.
    optimize_for_inference(vae, torch.bfloat16, SpeedOptions(cast_weights=True, channels_last=variant != "klvae-nchw",
                                                              fused_norm=False))
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    for m in vae.modules():
        if isinstance(m, GroupNorm):
            m.register_forward_hook(lambda _m, i, o: seen.append((i[0].dtype, o.dtype)))
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with _cuda_autocast_policy_on_the_cpu():
        inference.decode(vae, z, torch.bfloat16)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}, sorted(set(seen), key=str)


class _FakeCuda:
    """torch.cuda's calls that bench.time_once makes, recording which GPU each one acts on (None: the current)."""

    def __init__(self) -> None:
        self.current = 0
        self.calls: list[tuple[str, int]] = []
        fake = self

        class Stream:
            def __init__(self, index: int) -> None:
                self.device = torch.device("cuda", index)

        class Event:
            def __init__(self, enable_timing: bool = False, **_: object) -> None:
                pass

            def record(self, stream: Stream | None = None) -> None:
                fake.calls.append(("event.record", fake.index(None if stream is None else stream.device)))

            def synchronize(self) -> None:
                pass

            def elapsed_time(self, other: object) -> float:
                return 5.0

        self.Stream, self.Event = Stream, Event

    def index(self, device: object) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        d = torch.device(device) if not isinstance(device, torch.device) else device
        return self.current if d.index is None else d.index

    def patch(self, mp: pytest.MonkeyPatch) -> None:
        fake = self

        def on(name: str, result: object = None):
            def call(device: object = None, *_: object, **kw: object) -> object:
                fake.calls.append((name, fake.index(kw.get("device", device))))
                return result
            return call

        @contextlib.contextmanager
        def device_ctx(device: object) -> Iterator[None]:
            old, fake.current = fake.current, fake.index(device)
            try:
                yield
            finally:
                fake.current = old

        def set_device(device: object) -> None:
            fake.current = fake.index(device)

        mp.setattr(torch.cuda, "synchronize", on("synchronize"))
        mp.setattr(torch.cuda, "reset_peak_memory_stats", on("reset_peak_memory_stats"))
        mp.setattr(torch.cuda, "memory_allocated", on("memory_allocated", 0))
        mp.setattr(torch.cuda, "max_memory_allocated", on("max_memory_allocated", 2**30))
        mp.setattr(torch.cuda, "Event", self.Event)
        mp.setattr(torch.cuda, "current_stream", lambda device=None: self.Stream(fake.index(device)))
        mp.setattr(torch.cuda, "default_stream", lambda device=None: self.Stream(fake.index(device)))
        mp.setattr(torch.cuda, "device", device_ctx)
        mp.setattr(torch.cuda, "set_device", set_device)
        mp.setattr(torch.cuda, "current_device", lambda: fake.current)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 2)


def test_time_once_times_and_measures_the_gpu_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `bench.py --device cuda:1` gets now: events, synchronisation and peak memory of GPU 0, so the times
    # miss the queued work on GPU 1 (near 0 ms for an asynchronous call) and the peak is GPU 0's.
    bench = _bench()
    fake = _FakeCuda()
    fake.patch(monkeypatch)
    ms, peak = bench.time_once(lambda: torch.zeros(1), torch.device("cuda", 1))
    assert ms == 5.0 and peak == 1.0
    assert fake.calls and {i for _, i in fake.calls} == {1}, fake.calls
