"""Pins bugs a hunt of tiled/streamed encode and decode in bounded memory found: the memory estimates count only
the first (full-resolution) level's width, so for a model whose deeper levels are more than twice as wide

- `estimate_bytes` underestimates an untiled decode: a `max_memory` budget that the untiled pass cannot meet is
  judged to fit, and the decode runs untiled over the budget, silently (no tiling, no log line);
- `resident_map_bytes` underestimates what a tiled encode holds on the CPU (the wide half-resolution maps of the
  mid block), so the promised warning that the whole-image maps exceed the budget is never given.

Both use the tiny topology with widths (8, 128): every level is legal, only wider than the presets' doubling.
"""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import perturbed_vae
from klvae import AutoencoderKL, inference
from klvae.inference import TileOptions, api, tiling

MiB = 2**20


def _wide_vae() -> AutoencoderKL:
    # Level widths 8 then 128 (16x); groups of 2 channels at the narrow level.
    return perturbed_vae("tiny", block_out_channels=(8, 128), norm_num_groups=4)


def test_a_budget_that_an_untiled_decode_cannot_meet_makes_it_tile(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    vae = _wide_vae()
    z = torch.randn(1, vae.config.latent_channels, 64, 64)  # -> a 128x128 image
    h, w = 128, 128
    # The untiled decode must hold at least two 128-channel full-resolution fp32 maps at once: the upsampler's
    # conv input and output (nearest x2, then the conv), or, folded, the next ResNet block's input and its
    # normalised copy. So it cannot run in less than this (the live peak measured is 24 MiB).
    untiled_floor = 2 * 128 * h * w * 4
    budget = untiled_floor - MiB
    # estimate_bytes says 13.6 MiB: 10 x the width of the first level (8), plus the weights.

    calls: list[int] = []

    def tiled_stub(vae_: AutoencoderKL, t: torch.Tensor, st: object) -> torch.Tensor:
        calls.append(1)  # the tiled path was taken; its result is beside the point here
        return torch.zeros(t.shape[0], 3, t.shape[2] * 2, t.shape[3] * 2)

    monkeypatch.setattr(api, "tiled_decode", tiled_stub)
    with caplog.at_level(logging.INFO):
        inference.decode(vae, z, torch.float32, tiling=TileOptions(max_memory=budget))
    assert calls, (f"a {budget / MiB:.0f} MiB budget was judged to fit an untiled decode that holds at least "
                   f"{untiled_floor / MiB:.0f} MiB; it ran untiled, over the budget, without a word")


def test_a_tiled_encode_whose_maps_exceed_a_cpu_budget_warns(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tiling, "_host_maps_warned", set())  # the warning is once per process
    vae = _wide_vae()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    # The tiled encode's mid block runs at 64x64 with 128 channels: a streamed ResNet block there holds its
    # input, its first conv's output and its own output, three fp32 maps of 2 MiB (and the attention keeps K and
    # V, 2 MiB each, beside its input and output: a live peak of 8.5 MiB measured).
    held = 3 * 128 * 64 * 64 * 4
    budget = 4 * MiB
    assert held > budget
    # resident_map_bytes counts 1.5 MiB: three maps of the first level's width (8) at 128x128.
    with caplog.at_level(logging.WARNING):
        m = inference.encode_moments(vae, x, torch.float32, tiling=TileOptions(max_memory=budget))
    assert m.shape == (1, 2 * vae.config.latent_channels, 64, 64)
    assert "bounds each strip's work" in caplog.text, (
        f"a tiled encode holding at least {held / MiB:.0f} MiB of whole-image maps in a {budget / MiB:.0f} MiB "
        f"CPU budget gave no warning")
