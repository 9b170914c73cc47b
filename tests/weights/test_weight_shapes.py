"""Malformed weight shapes are WeightsErrors (a shape mismatch, not a crash), and folded upsampling keeps float64
precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import perturbed_vae
from klvae import AutoencoderKL, WeightsError
from klvae.model.blocks import Upsample
from klvae.weights import diffusers_to_ldm


def test_attention_weight_of_no_1x1_shape_is_a_shape_mismatch_not_a_crash(tmp_path: Path) -> None:
    # A 3x3 kernel where LDM has a 1x1 conv: the squeeze to Linear raised torch's RuntimeError from reshape.
    sd = diffusers_to_ldm(perturbed_vae("tiny").state_dict())
    sd["decoder.mid.attn_1.q.weight"] = torch.zeros(64, 64, 3, 3)
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    key = r"decoder\.mid_block\.attentions\.0\.to_q\.weight"
    with pytest.raises(WeightsError, match=key + r" \[64, 64, 3, 3\] vs \[64, 64\]"):
        AutoencoderKL.from_pretrained(path, config="tiny")


@pytest.mark.parametrize(("width", "latent", "message"), [
    (8192, 4, "make about 6.04 billion parameters"),  # a 221k-element tensor asks for a 6-billion-parameter model
    (32, 0, "latent_channels must be a positive integer"),
])
def test_shapes_no_config_allows_are_a_weights_error(tmp_path: Path, width: int, latent: int, message: str) -> None:
    sd = {
        "encoder.conv_in.weight": torch.zeros(width, 3, 1, 1),
        "encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(width, 1, 1, 1),
        "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(width, 1, 1, 1),
        "decoder.up_blocks.0.resnets.1.conv1.weight": torch.zeros(1),
        "decoder.conv_in.weight": torch.zeros(width, latent, 1, 1),
        "decoder.conv_out.weight": torch.zeros(3, width, 1, 1),
    }
    path = tmp_path / "crafted.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=f"^cannot infer the config: .*{message}"):
        AutoencoderKL.from_pretrained(path)


def test_folded_upsampler_keeps_float64_precision() -> None:
    # The folded kernel was summed in fp32 and cast back, so fp64 weights lost half their digits (~1e-7 off).
    torch.manual_seed(0)
    m = Upsample(4).double()
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        plain = m(x)
        m.fold = True
        folded = m(x)
    assert (folded - plain).abs().max().item() < 1e-12
