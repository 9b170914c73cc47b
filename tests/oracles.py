"""The references the parity tests compare against: diffusers' models with the same random weights as klvae's,
the inputs they are fed, and the tolerance (imported by the parity, compat and FLUX.2 tests)."""

from __future__ import annotations

import math

import diffusers
import torch
from torch import Tensor, nn

from klvae import AutoencoderKL
from klvae.model.config import PRESETS, AutoencoderKLConfig
from klvae.weights import config_to_diffusers, diffusers_to_ldm

TOL = 1e-5
# Full-width 4-level topology at small width, groups 32 so that shapes alone determine it (see weights.infer).
SMALL_F8 = AutoencoderKLConfig(
    block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32, sample_size=64, force_upcast=False
)


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Nonzero random values everywhere at a scale that keeps activations O(1) through the whole network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.05, generator=g)


def diffusers_vae(cfg: AutoencoderKLConfig, seed: int = 0) -> nn.Module:
    """diffusers.AutoencoderKL with cfg's architecture and random weights, built without its slow default init."""
    with torch.device("meta"):
        model = diffusers.AutoencoderKL.from_config(config_to_diffusers(cfg))
    model = model.to_empty(device="cpu")
    randomize(model, seed)
    return model.eval()


def inputs(cfg: AutoencoderKLConfig, h: int = 40, w: int = 56) -> tuple[Tensor, Tensor]:
    """A non-square image in [-1, 1] and a latent of the matching size."""
    g = torch.Generator().manual_seed(1)
    f = cfg.downsample_factor
    x = torch.rand(1, cfg.in_channels, h, w, generator=g) * 2 - 1
    return x, torch.randn(1, cfg.latent_channels, h // f, w // f, generator=g)


@torch.no_grad()
def outputs(model: nn.Module, cfg: AutoencoderKLConfig) -> tuple[Tensor, Tensor]:
    """Encoder moments and decoder output of a klvae or a diffusers model, fp32."""
    x, z = inputs(cfg)
    if isinstance(model, AutoencoderKL):
        return model.encode_moments(x), model.decode(z)
    return model.encode(x).latent_dist.parameters, model.decode(z).sample


def assert_parity(ours: AutoencoderKL | tuple[Tensor, Tensor], theirs: nn.Module, cfg: AutoencoderKLConfig,
                  label: str) -> tuple[Tensor, Tensor]:
    """Max abs diffs of encoder moments and decoder outputs within TOL; returns our outputs for reuse."""
    mine = ours if isinstance(ours, tuple) else outputs(ours, cfg)
    other = outputs(theirs, cfg)
    enc, dec = ((a - b).abs().max().item() for a, b in zip(mine, other, strict=True))
    print(f"\nparity {label}: encoder max abs diff {enc:.3g}, decoder max abs diff {dec:.3g} "
          f"(output scale {other[0].abs().max().item():.3g}, {other[1].abs().max().item():.3g})")
    assert enc <= TOL and dec <= TOL, f"{label}: encoder {enc}, decoder {dec}"
    return mine


# SD's 4-level topology at a small width (factor 8), FLUX.2's 32 latent channels -> 128 patched channels.
SMALL = PRESETS["flux2"].replace(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32,
                                 sample_size=64)
PATCHED = SMALL.latent_channels * 4
BN_EPS = 1e-4  # FLUX.2's (BFL's AutoEncoder.bn_eps and diffusers' default batch_norm_eps)
REL = 1e-6


def flux2_diffusers(cfg: AutoencoderKLConfig = SMALL, seed: int = 0, eps: float = BN_EPS) -> torch.nn.Module:
    """diffusers.AutoencoderKLFlux2 with cfg's architecture, random weights and random BatchNorm statistics."""
    with torch.device("meta"):
        model = diffusers.AutoencoderKLFlux2(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.block_out_channels),
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=cfg.sample_size,
            use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
            batch_norm_eps=eps, patch_size=(2, 2), decoder_block_out_channels=cfg.decoder_block_out_channels,
        )
    model = model.to_empty(device="cpu")
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(PATCHED, generator=g) * 0.7)
        model.bn.running_var.copy_(torch.rand(PATCHED, generator=g) * 3 + 0.05)
        model.bn.num_batches_tracked.fill_(1234)
    return model.eval()


def random_stats(seed: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """128 per-channel statistics, deliberately not float32-representable (a round trip must keep them)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(PATCHED, generator=g, dtype=torch.float64) * 0.6
    std = torch.rand(PATCHED, generator=g, dtype=torch.float64) * 2 + 0.3
    return tuple(mean.tolist()), tuple(std.tolist())


def klvae_flux2(stats: bool = True, seed: int = 0, **changes: object) -> AutoencoderKL:
    cfg = SMALL
    if stats:
        mean, std = random_stats()
        cfg = cfg.replace(latents_mean=mean, latents_std=std)
    vae = AutoencoderKL(cfg.replace(**changes)).eval()
    randomize(vae, seed)
    return vae


def bfl_state_dict(theirs: torch.nn.Module) -> dict[str, Tensor]:
    """BFL's ae.safetensors layout from a diffusers model: LDM keys, quant convs inside encoder/decoder, bn.*."""
    out: dict[str, Tensor] = {}
    for k, v in diffusers_to_ldm({k: v.clone() for k, v in theirs.state_dict().items()}).items():
        if k.startswith("quant_conv."):
            k = "encoder." + k
        elif k.startswith("post_quant_conv."):
            k = "decoder." + k
        out[k] = v.contiguous()
    return out
