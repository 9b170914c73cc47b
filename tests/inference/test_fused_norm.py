"""The fused GroupNorm + SiLU kernels equal PyTorch's ops, and compile for an H100 without one.

On the CPU they run in Triton's interpreter (conftest.py sets TRITON_INTERPRET); `--device cuda` runs the same
tests on the compiled kernels.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import perturbed_vae
from klvae import inference
from klvae.errors import KlvaeError
from klvae.inference import SpeedOptions, fused_norm, optimize_for_inference
from klvae.model.blocks import GroupNorm

# The interpreter's numpy exp overflows for a SiLU input far below zero; the sigmoid is then 0, as on a GPU.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, groups: int, silu: bool) -> torch.Tensor:
    y = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-6)
    return F.silu(y) if silu else y


# (batch, channels, height, width, groups): power-of-two groups and widths as in every released VAE, then
# channels per group (3) and a group count (6) that are not powers of two, and a map of one position.
SHAPES = [(2, 64, 9, 7, 32), (1, 96, 5, 6, 32), (2, 48, 4, 4, 6), (1, 128, 40, 33, 32), (3, 32, 1, 1, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("silu", [False, True])
def test_fp32_equals_group_norm(device: torch.device, shape: tuple[int, ...], silu: bool) -> None:
    b, c, h, w, g = shape
    torch.manual_seed(0)
    x = (torch.randn(b, c, h, w) * 3 + 2).to(device).to(memory_format=torch.channels_last)
    wt, bs = torch.randn(c, device=device), torch.randn(c, device=device)
    y = fused_norm.group_norm_act(x, wt, bs, g, 1e-6, silu)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), _reference(x, wt, bs, g, silu), atol=2e-5, rtol=1e-5)


def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_norm, "_kernels", lambda: pytest.fail("a Triton kernel was launched"))


def test_nchw_and_cpu_without_the_interpreter_stay_with_pytorch(device: torch.device,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _no_kernels(monkeypatch)
    x = torch.randn(2, 16, 3, 5, device=device)
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    ref = F.silu(F.group_norm(x, 4, w, b, 1e-6))
    torch.testing.assert_close(fused_norm.group_norm_act(x, w, b, 4, 1e-6, True), ref)  # NCHW
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = x.cpu().to(memory_format=torch.channels_last)
    torch.testing.assert_close(fused_norm.group_norm_act(x, w.cpu(), b.cpu(), 4, 1e-6, True), ref.cpu())


def test_runs_of_positions_merge_exactly_with_a_large_mean(device: torch.device,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Few statistics programs: each loops over several blocks, the last one partial, and the finalize kernel
    # merges runs of unequal length. A mean 500x the spread is where E[x^2] - E[x]^2 in fp32 loses the variance.
    monkeypatch.setattr(fused_norm, "_STATS_PROGRAMS", 3)
    torch.manual_seed(1)
    x = (torch.randn(1, 64, 37, 29) + 500).to(device).to(memory_format=torch.channels_last)
    wt, bs = torch.ones(64, device=device), torch.zeros(64, device=device)
    y = fused_norm.group_norm_act(x, wt, bs, 32, 1e-6, False)
    ref = _reference(x, wt, bs, 32, False)
    assert (y.double() - ref).abs().max().item() < 2e-3  # the input's own fp32 rounding at 500 is 3e-5 of std 1


def test_bf16_channels_last_within_one_rounding(device: torch.device) -> None:
    torch.manual_seed(2)
    x = (torch.randn(2, 128, 16, 12) * 3 + 5).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    wt, bs = torch.randn(128, device=device).bfloat16(), torch.randn(128, device=device).bfloat16()
    y = fused_norm.group_norm_act(x, wt, bs, 32, 1e-6, True)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    ref = _reference(x, wt, bs, 32, True)
    # One bf16 step of the output (2^-7 relative): the GPU rounds to nearest, Triton's interpreter truncates.
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()


def test_a_map_one_position_wide_whatever_its_width_stride(device: torch.device,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # PyTorch ignores the stride of a size-1 dim when it judges contiguity, so a [B, C, H, 1] map with any width
    # stride is channels_last-contiguous; its positions are still C apart (the height stride), not stride(3) apart.
    torch.manual_seed(4)
    x = torch.randn(2, 5, 16, device=device).transpose(1, 2).unsqueeze(-1)  # [2, 16, 5, 1], strides (80, 1, 16, 1)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride(3) != 16
    wt, bs = torch.randn(16, device=device), torch.randn(16, device=device)
    launches = []
    kernels = fused_norm._kernels
    monkeypatch.setattr(fused_norm, "_kernels", lambda: launches.append(1) or kernels())
    y = fused_norm.group_norm_act(x, wt, bs, 4, 1e-6, True)
    assert launches and y.shape == x.shape
    torch.testing.assert_close(y.double(), _reference(x, wt, bs, 4, True), atol=2e-5, rtol=1e-5)


def test_model_with_fused_norms_decodes_as_without(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    vae = perturbed_vae(device=device)
    z = torch.randn(1, vae.config.latent_channels, 8, 8, device=device)
    ref = inference.decode(vae, z, torch.float32)
    optimize_for_inference(vae, torch.float32, SpeedOptions(fused_norm=True, channels_last=True, fold_upsample=False))
    norms = [m for m in vae.modules() if isinstance(m, GroupNorm)]
    assert norms and all(m.kernel is fused_norm.group_norm_act for m in norms)
    launches = []
    kernels = fused_norm._kernels
    monkeypatch.setattr(fused_norm, "_kernels", lambda: launches.append(1) or kernels())
    torch.testing.assert_close(inference.decode(vae, z, torch.float32), ref, atol=1e-5, rtol=1e-5)
    decoder_norms = sum(isinstance(m, GroupNorm) for m in vae.decoder.modules())
    assert len(launches) == decoder_norms  # every norm of the decoder ran fused, the attention's too


def test_autograd_falls_back_to_pytorch(device: torch.device) -> None:
    norm = GroupNorm(32, 8, 1e-6).to(device)
    norm.kernel = fused_norm.group_norm_act
    x = torch.randn(1, 32, 4, 4, device=device, requires_grad=True)
    norm(x, silu=True).sum().backward()  # the kernel has no backward: with autograd on, PyTorch's ops run
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(norm(x, silu=True), F.silu(F.group_norm(x, 8, norm.weight, norm.bias, 1e-6)))


def test_default_is_off_on_the_cpu_and_asking_without_triton_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    vae = optimize_for_inference(perturbed_vae(), torch.float32)
    assert all(m.kernel is None for m in vae.modules() if isinstance(m, GroupNorm))
    monkeypatch.setattr(fused_norm, "available", lambda: False)
    with pytest.raises(KlvaeError, match="Triton"):
        optimize_for_inference(vae, torch.float32, SpeedOptions(fused_norm=True))


def test_kernels_compile_for_an_h100() -> None:
    # The interpreter runs Python, not the GPU compiler: this catches what only fails when Triton compiles
    # (types, constants Triton substitutes for arguments equal to 1) before a GPU session does.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "triton_aot.py"
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(r.stdout.splitlines()) == 9 and all("bytes of cubin" in line for line in r.stdout.splitlines())


def test_launch_grids_stay_within_cuda_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # CUDA allows 2^31 - 1 programs on grid axis 0 but 65535 on axes 1 and 2; a whole 2048² decode's last norms
    # have 4M positions of 128 channels. Recorded on the meta device with launches that do nothing.
    grids = []

    class Launcher:
        def __getitem__(self, grid: tuple[int, ...]) -> object:
            grids.append(grid)
            return lambda *args, **kwargs: None

    launcher = Launcher()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # meta tensors take the kernel path, also in a --device cuda run
    monkeypatch.setattr(fused_norm, "_kernels", lambda: SimpleNamespace(
        stats_kernel=launcher, finalize_kernel=launcher, apply_kernel=launcher))
    for b, c, side in ((1, 128, 2048), (8, 128, 1024), (8, 512, 64), (300, 128, 8)):
        x = torch.empty(b, c, side, side, device="meta").to(memory_format=torch.channels_last)
        w = torch.empty(c, device="meta")
        fused_norm.group_norm_act(x, w, w, 32, 1e-6, True)
    assert len(grids) == 12
    assert all(g[0] < 2**31 and all(d <= 65535 for d in g[1:]) for g in grids), grids
