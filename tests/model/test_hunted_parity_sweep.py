"""A hunt of klvae's diffusers-compatible API (klvae.AutoencoderKL, klvae.compat.as_diffusers) against
diffusers.AutoencoderKL over the config knobs, image sizes, layouts, dtypes and posterior draws. One bug found:

- as_diffusers(vae) with tiling forced (enable_tiling(tile_size=N), or a max_memory the image exceeds) given an
  image smaller than one latent cell (a 1x1 image, a one-pixel-wide strip) fails with a ZeroDivisionError from the
  strip planner's attention chunks, or torch's "Kernel size can't be greater than actual input size", where the
  untiled pass (and klvae.AutoencoderKL.encode) says "images of HxW pixels are smaller than one latent cell".

The rest pins what was checked to agree bit for bit (fp32, bf16 and fp16 on the CPU) with diffusers.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from torch import Tensor, nn

from klvae import AutoencoderKL
from klvae.compat import DiffusersVAE, as_diffusers
from klvae.model.config import PRESETS, AutoencoderKLConfig
from oracles import diffusers_vae

# Every AutoencoderKL knob klvae maps to diffusers': level counts (factor 1, 2, 4), blocks per level, groups,
# latent and image channels, the quant convs, the mid-block attention, the flags and all latent factors.
KNOBS: dict[str, dict[str, object]] = {
    "one-level": dict(block_out_channels=(16,), norm_num_groups=4),
    "three-blocks": dict(block_out_channels=(16, 32), layers_per_block=3, force_upcast=False, sample_size=40),
    "three-levels-shift": dict(block_out_channels=(8, 16, 16), norm_num_groups=4, latent_channels=3,
                               use_quant_conv=False, scaling_factor=2.0, shift_factor=-0.5),
    "no-attention": dict(use_post_quant_conv=False, attention="none"),
    "channels-and-stats": dict(norm_num_groups=16, in_channels=1, out_channels=4, latents_mean=(0.0, 1.0, 2.0, 3.0),
                               latents_std=(1.0, 0.5, 0.25, 2.0)),
    "no-quant-convs": dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=1,
                           use_quant_conv=False, use_post_quant_conv=False),
    "one-group": dict(norm_num_groups=1),
}
BASE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)


def _comparable(config: dict) -> dict:
    """Public keys, sequences as lists (diffusers keeps tuples from keyword arguments, lists from JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


def _pair(cfg: AutoencoderKLConfig) -> tuple[nn.Module, DiffusersVAE]:
    theirs = diffusers_vae(cfg)
    ours = as_diffusers(AutoencoderKL(cfg))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("knobs", list(KNOBS))
def test_every_config_knob_loads_both_ways_and_computes_diffusers_bits(knobs: str, tmp_path: Path) -> None:
    """A diffusers folder with this knob loads as the same config and the same bits, and saves back unchanged."""
    cfg = AutoencoderKLConfig(**{**BASE, **KNOBS[knobs]})  # type: ignore[arg-type]
    theirs = diffusers_vae(cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = AutoencoderKL.from_pretrained(tmp_path / "theirs")
    wrapped = DiffusersVAE.from_pretrained(tmp_path / "theirs")
    assert ours.config == cfg and _comparable(wrapped.config) == _comparable(theirs.config)
    f = cfg.downsample_factor
    g = _gen(1)
    # Batch 2, a non-square size that is no multiple of the factor, channels-last too.
    x = torch.rand(2, cfg.in_channels, 3 * f + 1, 5 * f + f // 2 + 1, generator=g) * 2 - 1
    z = torch.randn(2, cfg.latent_channels, 3, 5, generator=g)
    with torch.no_grad():
        for image in (x, x.contiguous(memory_format=torch.channels_last)):
            expected = theirs.encode(image).latent_dist.parameters
            assert _same(ours.encode_moments(image), expected)
            assert _same(wrapped.encode(image).latent_dist.parameters, expected)
        assert _same(ours.decode(z), theirs.decode(z).sample)
        assert _same(wrapped.decode(z, return_dict=False)[0], theirs.decode(z).sample)
    wrapped.save_pretrained(tmp_path / "ours")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert _comparable(back.config) == _comparable(theirs.config)
    with torch.no_grad():
        assert _same(back.decode(z).sample, theirs.decode(z).sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_posterior_draws_and_statistics_equal_diffusers_in_the_same_dtype(dtype: torch.dtype) -> None:
    """sample(generator), a list of generators, the global RNG, forward's sample, kl(other=) and nll are diffusers'."""
    theirs, ours = _pair(PRESETS["tiny"])
    theirs.to(dtype)
    ours.to(dtype)
    ours.enable_slicing()
    theirs.enable_slicing()
    x = (torch.rand(2, 3, 12, 20, generator=_gen(2)) * 2 - 1).to(dtype)
    with torch.no_grad():
        p, q = ours.encode(x).latent_dist, theirs.encode(x).latent_dist
        other_p, other_q = ours.encode(x.flip(0)).latent_dist, theirs.encode(x.flip(0)).latent_dist
        z = q.sample(_gen(3))
        assert _same(p.sample(_gen(3)), z)
        assert _same(p.sample([_gen(4), _gen(5)]), q.sample([_gen(4), _gen(5)]))
        torch.manual_seed(6)
        drawn = p.sample()
        torch.manual_seed(6)
        assert _same(drawn, q.sample())
        assert _same(p.mode(), q.mode())
        assert _same(p.kl(), q.kl()) and _same(p.kl(other_p), q.kl(other_q))
        assert _same(p.nll(z), q.nll(z))
        for sampled in (False, True):
            a = ours(x, sample_posterior=sampled, generator=_gen(7), return_dict=False)[0]
            assert _same(a, theirs(x, sample_posterior=sampled, generator=_gen(7)).sample)
        theirs.disable_slicing()  # the whole batch at once, as klvae's own forward runs it
        native, _ = ours.klvae_model(x, generator=_gen(7))  # LDM's forward samples by default
        assert _same(native, theirs(x, sample_posterior=True, generator=_gen(7)).sample)


@pytest.mark.parametrize("size", [(1, 1), (6, 1)])
@pytest.mark.parametrize("tiling", [{"tile_size": 4}, {"max_memory": 1}])
def test_a_tiled_encode_of_an_image_smaller_than_a_latent_cell_says_so(size: tuple[int, int],
                                                                       tiling: dict[str, int]) -> None:
    """Tiled, an image under one latent cell is a ZeroDivisionError or torch's kernel-size error, not klvae's line."""
    ours = as_diffusers(AutoencoderKL("tiny")).eval()  # factor 2: a side of 1 pixel is under a cell
    x = torch.zeros(1, 3, *size)
    with torch.no_grad(), pytest.raises(ValueError, match="smaller than one latent cell"):
        ours.encode(x)  # untiled: the clear error
    ours.enable_tiling(**tiling)
    with torch.no_grad(), pytest.raises(ValueError, match="smaller than one latent cell"):
        ours.encode(x)
