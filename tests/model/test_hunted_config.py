"""Pins bugs a hunt of the model configuration, its public API and `klvae info` found:

- AutoencoderKLConfig's size cap (MAX_PARAMETERS, "not a VAE klvae builds") counts only the widths, so a config
  with a huge in_channels, out_channels or latent_channels passes and AutoencoderKL(cfg) then tries to allocate
  terabytes instead of a ValueError.
- config_from_diffusers takes max() of a list sample_size before checking it, so [64, 0] or [64, -3] pass.
- LatentNorm.from_dict of a dict without scaling_factor (a damaged latent cache index.json) raises a bare
  KeyError instead of a ValueError naming the field.
"""

from __future__ import annotations

import pytest

from klvae.errors import WeightsError
from klvae.model.config import MAX_PARAMETERS, AutoencoderKLConfig, get_preset
from klvae.model.latent_norm import LatentNorm
from klvae.weights.diffusers_config import config_from_diffusers, config_to_diffusers


@pytest.mark.parametrize("field", ["in_channels", "out_channels", "latent_channels"])
def test_config_refuses_channel_counts_past_the_parameter_cap(field: str) -> None:
    changes = {field: 2**22}
    # conv_in, conv_out or the quant/latent convs alone: 3x3 (or 1x1) kernels of 2**22 x 128..512 channels.
    assert MAX_PARAMETERS < 9 * 128 * 2**22
    with pytest.raises(ValueError, match="parameters"):
        AutoencoderKLConfig(**changes)


@pytest.mark.parametrize("sample_size", [[64, 0], [64, -3]])
def test_diffusers_sample_size_list_with_a_non_positive_side_is_refused(sample_size: list[int]) -> None:
    d = config_to_diffusers(get_preset("tiny"))
    with pytest.raises(WeightsError, match="sample_size"):
        config_from_diffusers({**d, "sample_size": sample_size})


def test_latent_norm_from_dict_without_scaling_factor_names_the_field() -> None:
    with pytest.raises(ValueError, match="scaling_factor"):
        LatentNorm.from_dict({"shift_factor": 0.1})
