"""Tiling options of the inference API: strip heights exact at any size from 1, TileOptions' checks of its
numbers, and a memory budget of a few bytes shown in bytes."""

import logging

import numpy as np
import pytest
import torch

from helpers import perturbed_vae
from klvae import inference
from klvae.errors import KlvaeError
from klvae.inference import TileOptions, tiling

# ---- tile sizes: strip heights in image rows, exact at any height from 1 ----


@pytest.mark.parametrize("tile", [7, 100])
def test_every_tile_size_from_one_gives_the_untiled_result(tile: int) -> None:
    # 7 is no multiple of the factor 8 and below it, 100 above the image: each conv reads its strip's neighbour
    # rows and GroupNorm uses whole-map statistics, so no height is wrong (test_inference tries 1, 5, 8 and 16).
    vae = perturbed_vae("tiny-f8")
    x = torch.rand(1, 3, 37, 53) * 2 - 1
    m = inference.encode_moments(vae, x)
    assert (inference.encode_moments(vae, x, tiling=TileOptions(tile_size=tile)) - m).abs().max() < 1e-4
    z = m[:, :4]
    d = inference.decode(vae, z, size=(37, 53))
    assert (inference.decode(vae, z, size=(37, 53), tiling=TileOptions(tile_size=tile)) - d).abs().max() < 1e-4


def test_tile_options_take_numpy_integers_and_refuse_what_is_no_whole_number() -> None:
    opts = TileOptions(tile_size=np.int64(64), max_memory=np.uint32(2**20))  # e.g. a size computed with numpy
    assert (opts.tile_size, opts.max_memory) == (64, 2**20) and type(opts.tile_size) is int
    for bad in (0, -8, 8.0, "8", True, np.bool_(True), np.float64(8.0), torch.tensor(8)):
        with pytest.raises(KlvaeError, match=r"^TileOptions.tile_size must be a whole number of at least 1"):
            TileOptions(tile_size=bad)


def test_a_budget_of_a_few_bytes_is_shown_in_bytes_not_as_zero_mib(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tiling, "_host_maps_warned", set())  # as in a new process
    with caplog.at_level(logging.WARNING, logger="klvae"):
        inference.decode(perturbed_vae("tiny"), torch.randn(1, 4, 8, 8), tiling=TileOptions(max_memory=1024))
    (record,) = caplog.records
    assert "over the 1,024 bytes budget" in record.getMessage() and "0.00 MiB" not in record.getMessage()
