"""Pins what a mutation audit of model.blocks, model.autoencoder and the posterior found untested: when a fused
GroupNorm kernel runs (and what it is handed: the SiLU flag, attention's 4-D map); the SiLU after both norms of a
ResNet block and after the encoder's last norm; attention's output strides (diffusers' at batch 2); the folded
upsampler kernel's precision (fp16 summed wide and rounded once, fp64 kept) and its input-dtype path; the
upsampler unfolded by default; every ResNet block of a level built; checkpointing recomputing only when asked,
and not cutting the gradient to stages after a frozen conv_in; the default config; quant_conv and
post_quant_conv following their own flags; the device and downsample_factor properties; the arguments that
from_pretrained, from_single_file and save_pretrained pass on; the folder in from_single_file's refusal; and the
channel count in the posterior's refusal of odd moments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention as DiffusersAttention

import klvae.weights.load
import klvae.weights.save
from helpers import perturbed_vae
from klvae import AutoencoderKL
from klvae.model.blocks import Attention, DownBlock, GroupNorm, ResnetBlock, Upsample, fold_upsample_kernel
from klvae.model.config import PRESETS, AutoencoderKLConfig
from klvae.posterior import DiagonalGaussian


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(seed), dtype=p.dtype) * 0.1)


class _Kernel:
    """A stand-in fused kernel: records its arguments and returns a marker tensor."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, float, bool]] = []

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                 silu: bool) -> torch.Tensor:
        self.calls.append((x.dim(), groups, eps, silu))
        return torch.full_like(x, 7.0)


def test_the_fused_kernel_runs_only_where_autograd_records_nothing() -> None:
    norm, kernel, x = GroupNorm(4, 2, 0.25), _Kernel(), torch.randn(1, 4, 2, 3, generator=_gen(0))
    norm.kernel = kernel
    with torch.no_grad():  # the weight requires grad, but nothing is recorded
        assert torch.equal(norm(x, silu=True), torch.full_like(x, 7.0))
    assert kernel.calls == [(4, 2, 0.25, True)]
    norm.requires_grad_(False)  # frozen weights, an input without grad: the kernel, even with grad mode on
    assert torch.equal(norm(x), torch.full_like(x, 7.0)) and kernel.calls[-1] == (4, 2, 0.25, False)
    norm.requires_grad_(True)  # trainable weights: PyTorch's differentiable ops
    torch.testing.assert_close(norm(x, silu=True), F.silu(F.group_norm(x, 2, norm.weight, norm.bias, 0.25)))
    norm.requires_grad_(False)  # an input that requires grad: also PyTorch's ops
    torch.testing.assert_close(norm(x.requires_grad_()), F.group_norm(x, 2, norm.weight, norm.bias, 0.25))
    assert len(kernel.calls) == 2


def test_attention_hands_a_fused_kernel_the_4d_map() -> None:
    attn, kernel = Attention(8, 2, 1e-6), _Kernel()
    attn.group_norm.kernel = kernel
    with torch.no_grad():
        attn(torch.randn(2, 8, 3, 3, generator=_gen(1)).contiguous(memory_format=torch.channels_last))
    assert kernel.calls == [(4, 2, 1e-6, False)]


def test_a_resnet_block_is_norm_silu_conv_twice_plus_the_projected_shortcut() -> None:
    block = ResnetBlock(4, 8, 2, 1e-6)
    _perturb(block)
    x = torch.randn(2, 4, 5, 6, generator=_gen(2))
    h = block.conv1(F.silu(F.group_norm(x, 2, block.norm1.weight, block.norm1.bias, 1e-6)))
    h = block.conv2(F.silu(F.group_norm(h, 2, block.norm2.weight, block.norm2.bias, 1e-6)))
    assert block.conv_shortcut is not None
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.conv_shortcut(x) + h)


def test_the_encoder_applies_silu_after_its_last_norm() -> None:
    vae = perturbed_vae("tiny")
    seen: list[torch.Tensor] = []
    vae.encoder.mid_block.register_forward_hook(lambda _m, _a, out: seen.append(out))
    x = torch.rand(1, 3, 8, 8, generator=_gen(3)) * 2 - 1
    with torch.no_grad():
        moments = vae.encoder(x)
        norm = vae.encoder.conv_norm_out
        ref = vae.encoder.conv_out(F.silu(F.group_norm(seen[0], norm.num_groups, norm.weight, norm.bias, norm.eps)))
    torch.testing.assert_close(moments, ref)


def test_attention_output_has_diffusers_strides_at_batch_2() -> None:
    # The residual sum takes the attention branch's (channels-last) strides, as diffusers' does; the convolutions
    # after it choose their kernels by layout, so the other order is not bit for bit with diffusers at batch > 1.
    ours = Attention(16, 4, 1e-6).eval()
    _perturb(ours, 4)
    theirs = DiffusersAttention(16, heads=1, dim_head=16, rescale_output_factor=1.0, eps=1e-6, norm_num_groups=4,
                                residual_connection=True, bias=True, upcast_softmax=True,
                                _from_deprecated_attn_block=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 3, 5, generator=_gen(5))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.stride() == b.stride() and a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def _fold_reference(w: torch.Tensor) -> torch.Tensor:
    """The folded kernel written tap by tap (the 4 taps per axis: c, b+c, a+b, a)."""
    def fold(t: torch.Tensor, dim: int) -> torch.Tensor:
        a, b, c = t.unbind(dim)
        return torch.stack([c, b + c, a + b, a], dim)

    return fold(fold(w, 2), 3).transpose(0, 1)


def test_a_half_precision_kernel_is_folded_wide_and_rounded_once() -> None:
    w = torch.randn(6, 5, 3, 3, generator=_gen(6)).half()
    folded = fold_upsample_kernel(w)
    assert folded.dtype == torch.float16 and folded.shape == (5, 6, 4, 4)
    assert torch.equal(folded, _fold_reference(w.float()).half())
    assert not torch.equal(folded, _fold_reference(w))  # summing in fp16 rounds twice: some taps differ


def test_a_float64_kernel_is_folded_in_float64() -> None:
    w = torch.randn(4, 4, 3, 3, generator=_gen(7), dtype=torch.float64) / 3
    folded = fold_upsample_kernel(w)
    assert folded.dtype == torch.float64 and torch.equal(folded, _fold_reference(w))


def test_the_folded_upsampler_runs_in_the_inputs_dtype() -> None:
    up = Upsample(3)
    _perturb(up, 8)
    x = torch.randn(1, 3, 4, 5, generator=_gen(9), dtype=torch.float64)
    up.fold = True
    assert up.conv.bias is not None
    with torch.no_grad():
        out = up(x)
        ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight.double(),
                       up.conv.bias.double(), padding=1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref)


def test_upsamplers_are_unfolded_by_default() -> None:
    vae = AutoencoderKL(PRESETS["tiny"])
    ups = [m for m in vae.modules() if isinstance(m, Upsample)]
    assert ups and not any(m.fold for m in ups)


def test_every_resnet_block_of_a_level_is_built_and_run() -> None:
    level = DownBlock(4, 8, 3, 2, 1e-6, down=False)
    resnets = [r for r in level.resnets if isinstance(r, ResnetBlock)]
    assert [(r.conv1.in_channels, r.conv1.out_channels) for r in resnets] == [(4, 8), (8, 8), (8, 8)]
    calls: list[int] = []
    for r in level.resnets:
        r.register_forward_hook(lambda _m, _a, _o: calls.append(1))
    with torch.no_grad():
        level(torch.randn(1, 4, 4, 4, generator=_gen(10)))
    assert len(calls) == 3


def _mid_block_runs_in_forward_and_backward(checkpointing: bool) -> int:
    vae = AutoencoderKL(PRESETS["tiny"])
    vae.enable_gradient_checkpointing(checkpointing)
    calls: list[int] = []  # a pre-hook: the recomputation stops once it has what backward needs
    vae.decoder.mid_block.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    y, _ = vae(torch.randn(1, 3, 8, 8, generator=_gen(11)), sample_posterior=False)
    y.square().mean().backward()
    return len(calls)


def test_checkpointing_recomputes_a_stage_only_when_enabled() -> None:
    assert _mid_block_runs_in_forward_and_backward(False) == 1
    assert _mid_block_runs_in_forward_and_backward(True) == 2


def test_checkpointed_stages_after_a_frozen_conv_in_still_get_gradients() -> None:
    # Fine-tuning with the first conv frozen: the stages' input then needs no grad, which the reentrant
    # checkpoint would take to mean that nothing inside them does either.
    vae = AutoencoderKL(PRESETS["tiny"])
    vae.enable_gradient_checkpointing()
    vae.encoder.conv_in.requires_grad_(False)
    vae.encode(torch.randn(1, 3, 8, 8, generator=_gen(12))).mean.square().sum().backward()
    assert all(p.grad is not None for p in vae.encoder.down_blocks.parameters())


def test_the_default_model_has_the_default_config() -> None:
    assert AutoencoderKL().config == AutoencoderKLConfig()


@pytest.mark.parametrize(("quant", "post_quant"), [(True, False), (False, True)])
def test_quant_conv_and_post_quant_conv_follow_their_own_flags(quant: bool, post_quant: bool) -> None:
    vae = AutoencoderKL(PRESETS["tiny"].replace(use_quant_conv=quant, use_post_quant_conv=post_quant))
    assert (vae.quant_conv is not None, vae.post_quant_conv is not None) == (quant, post_quant)


def test_device_and_downsample_factor_come_from_the_model() -> None:
    assert AutoencoderKL(PRESETS["tiny"]).to("meta").device == torch.device("meta")
    assert AutoencoderKL(PRESETS["tiny"]).downsample_factor == 2
    assert AutoencoderKL(PRESETS["tiny-f8"]).downsample_factor == 8


def test_from_pretrained_and_from_single_file_pass_every_argument_on(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[object, dict[str, Any]]] = []

    def load(cls: type, path: object, **kw: Any) -> str:
        seen.append((path, kw))
        return "loaded"

    monkeypatch.setattr(klvae.weights.load, "load_pretrained", load)
    cfg = PRESETS["tiny"]
    assert AutoencoderKL.from_pretrained("org/name", subfolder="vae", config=cfg, dtype=torch.float16,
                                         device="meta", revision="v2", variant="fp16", use_safetensors=True,
                                         local_files_only=True) == "loaded"
    assert seen[-1] == ("org/name", {"subfolder": "vae", "config": cfg, "dtype": torch.float16, "device": "meta",
                                     "revision": "v2", "variant": "fp16", "use_safetensors": True,
                                     "local_files_only": True})
    AutoencoderKL.from_single_file("vae.safetensors", config="tiny", dtype=torch.float64, device="cpu",
                                   local_files_only=True)
    assert seen[-1] == ("vae.safetensors", {"subfolder": None, "config": "tiny", "dtype": torch.float64,
                                            "device": "cpu", "revision": None, "variant": None,
                                            "use_safetensors": None, "local_files_only": True})


def test_save_pretrained_passes_its_options_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def save(model: torch.nn.Module, directory: Path, **kw: Any) -> Path:
        seen.append(kw)
        return Path(directory)

    monkeypatch.setattr(klvae.weights.save, "save_pretrained", save)
    assert AutoencoderKL(PRESETS["tiny"]).save_pretrained(tmp_path, safe_serialization=False) == tmp_path
    assert seen == [{"safe_serialization": False}]


def test_from_single_file_names_the_folder_it_refuses(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        AutoencoderKL.from_single_file(tmp_path)
    assert str(info.value).startswith(f"{tmp_path} is a folder")


def test_odd_moments_are_refused_with_their_channel_count() -> None:
    with pytest.raises(ValueError, match=r"^moments need an even channel count, got 5$"):
        DiagonalGaussian(torch.zeros(1, 5, 2, 2))
