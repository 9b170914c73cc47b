"""Pins what a mutation audit of model.config and the posterior found untested: the empty block_out_channels
message, a decoder with more levels than the encoder, bytes and non-sequence widths, the type checks of
in_channels, out_channels, sample_size and use_post_quant_conv, the sorted unknown field names, the "in 2x2
patches" wording kept off unpatched latents, the 16-level cap, the parameter cap's "at most" figure, the known
presets in get_preset's refusal, the sd2/flux2/tiny presets' remaining fields, the narrow decoder's GroupNorm
warning, the inferring() flag reset after a refused replace; and the posterior's zeros on the moments' device and
dtype, kl's and nll's dims, and to_deterministic keeping the gradient."""

from __future__ import annotations

import logging

import pytest
import torch

import klvae
from klvae.model.config import PRESETS, AutoencoderKLConfig, single_channel_groups
from klvae.posterior import DiagonalGaussian


def test_empty_block_out_channels_are_refused_with_their_own_message() -> None:
    with pytest.raises(ValueError, match="block_out_channels must name at least one level"):
        AutoencoderKLConfig(block_out_channels=())


def test_a_decoder_with_more_levels_than_the_encoder_is_refused() -> None:
    with pytest.raises(ValueError, match="decoder_block_out_channels has 3 levels but block_out_channels 2"):
        PRESETS["tiny"].replace(decoder_block_out_channels=(32, 64, 64))


@pytest.mark.parametrize("widths", [b"abc", 64])
def test_bytes_and_single_numbers_are_not_width_lists(widths: object) -> None:
    with pytest.raises(ValueError, match=r"block_out_channels must be a list of positive integers, got "):
        PRESETS["tiny"].replace(block_out_channels=widths)


@pytest.mark.parametrize("name", ["in_channels", "out_channels", "sample_size"])
def test_every_size_field_must_be_a_positive_integer(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be a positive integer, got 0$"):
        PRESETS["tiny"].replace(**{name: 0})


def test_use_post_quant_conv_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"^use_post_quant_conv must be true or false, got 'no'$"):
        PRESETS["tiny"].replace(use_post_quant_conv="no")


def test_unknown_config_fields_are_listed_sorted() -> None:
    with pytest.raises(ValueError, match=r"^unknown config fields: alpha, beta, zeta$"):
        AutoencoderKLConfig.from_dict({"zeta": 1, "alpha": 2, "beta": 3})


def test_unpatched_latent_statistics_message_names_no_patches() -> None:
    with pytest.raises(ValueError) as info:
        PRESETS["tiny"].replace(latents_mean=(0.0,) * 3, latents_std=(1.0,) * 3)
    assert str(info.value) == "latents_mean/latents_std have 3 entries for 4 latent channels"


def test_sixteen_levels_are_allowed() -> None:
    cfg = AutoencoderKLConfig(block_out_channels=(8,) * 16, layers_per_block=1, norm_num_groups=4)
    assert cfg.downsample_factor == 2**15


def test_the_parameter_cap_message_gives_the_cap() -> None:
    with pytest.raises(ValueError, match=r"\(at most 4\.29 billion\)$"):
        PRESETS["tiny"].replace(block_out_channels=(65536, 65536))


def test_an_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        klvae.get_preset("sd9")
    assert str(info.value) == f"unknown preset 'sd9'; known: {', '.join(PRESETS)}"
    assert "sd15, sd2, sdxl" in str(info.value)


def test_the_remaining_preset_fields() -> None:
    assert PRESETS["sd2"] == PRESETS["sd15"].replace(sample_size=768)
    assert PRESETS["flux2"].force_upcast and PRESETS["flux2-small-decoder"].force_upcast
    assert PRESETS["flux2-small-decoder"] == PRESETS["flux2"].replace(decoder_block_out_channels=(96, 192, 384, 384))
    for name, widths in (("tiny", (32, 64)), ("tiny-f8", (32, 32, 64, 64))):
        cfg = PRESETS[name]
        assert (cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups, cfg.sample_size) == (
            widths,
            1,
            8,
            64,
        )
        assert not cfg.force_upcast and cfg.scaling_factor == 0.18215 and cfg.latent_channels == 4


def test_a_narrow_decoder_gets_the_group_warning(caplog: pytest.LogCaptureFixture) -> None:
    cfg = PRESETS["tiny"]
    with caplog.at_level(logging.WARNING):
        narrow = cfg.replace(decoder_block_out_channels=(8, 64))
    assert single_channel_groups(narrow) == 8
    assert "one channel per GroupNorm group at width 8: use norm_num_groups <= 4" in caplog.text


def test_a_refused_replace_leaves_no_inferring_flag_behind(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="scaling_factor"):
        PRESETS["tiny"].replace(scaling_factor=float("nan"))
    with caplog.at_level(logging.WARNING):
        AutoencoderKLConfig(block_out_channels=(16, 32), norm_num_groups=16)
    assert "use norm_num_groups <= 8" in caplog.text


def _moments() -> torch.Tensor:
    return torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_deterministic_zeros_follow_the_moments_device_and_dtype() -> None:
    d = DiagonalGaussian(_moments().to("meta"), deterministic=True)
    for t in (d.kl(), d.nll(d.mean), d.var, d.std):
        assert (t.device.type, t.dtype) == ("meta", torch.float64)
    assert d.kl().shape == d.nll(d.mean).shape == (2,)


def test_kl_and_nll_sum_over_the_given_dims() -> None:
    d = DiagonalGaussian(_moments())
    x = torch.randn_like(d.mean)
    full_kl, full_nll = d.kl(), d.nll(x)
    torch.testing.assert_close(d.kl(dims=[1]).sum(dim=(1, 2)), full_kl)
    torch.testing.assert_close(d.nll(x, dims=[1, 2]).sum(dim=1), full_nll)
    other = DiagonalGaussian(_moments().flip(0))
    torch.testing.assert_close(d.kl(other, dims=(1, 3)).sum(dim=1), d.kl(other))


def test_to_deterministic_keeps_the_gradient_to_the_moments() -> None:
    m = _moments().requires_grad_()
    DiagonalGaussian(m).to_deterministic().sample().sum().backward()
    assert m.grad is not None and (m.grad[:, :4] == 1).all() and (m.grad[:, 4:] == 0).all()
