"""Inference edge cases that a mutation audit of klvae.inference found unpinned.

Each test kills mutants that the other inference tests let through: budgets exactly at their thresholds (the map
pool, the tiling estimate, the delivered result, the host-maps warning), the pool's bookkeeping, tiling turned off
over a budget, strip heights that follow the image's rows level by level, sums of a dead map left at a new map's
address, GroupNorm sums of half-precision maps, the online softmax with scores far below zero or falling between
key chunks, the NaN guard on infinite (not NaN) half output and on an fp32 model, a half-stored model computing in
its own dtype, right/bottom edge padding, the clamp of finite output only, infinite latents.
"""

import logging
import weakref

import pytest
import torch
import torch.nn.functional as F

import klvae
from helpers import counting_tiled_calls, perturbed_vae
from klvae import inference
from klvae.inference import TileOptions, tiling
from klvae.inference.channel_sums import ChannelSums
from klvae.inference.streaming import Streamer
from klvae.model.blocks import Upsample


def _stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (float64) GroupNorm mean and 1/std per (sample, group) of the values x holds."""
    g = x.double().reshape(x.shape[0], groups, -1)
    return g.mean(-1), torch.rsqrt(g.var(-1, unbiased=False) + eps)


# ---- the map pool --------------------------------------------------------------------------------------------
def test_a_map_that_exactly_fills_the_pool_stays_on_the_device_and_fills_it(device: torch.device) -> None:
    shape = (1, 4, 6, 5)
    # Storage on the meta device: a map placed there says so by its device.
    st = Streamer(device=device, storage=torch.device("meta"), dtype=torch.float32, pool=4 * 6 * 5 * 4)
    first = st.empty(shape)
    assert first.device == device  # it fits, with not a byte to spare
    second = st.empty(shape)
    assert second.device.type == "meta"  # the pool is full while the first map lives
    del first
    assert st.empty(shape).device == device  # and has room again once it dies


def test_sums_of_a_dead_map_are_not_taken_for_a_new_map_at_its_address(device: torch.device) -> None:
    # Maps' sums are keyed by id(); CPython reuses the address of a freed tensor, so a dead entry must be ignored.
    norm = torch.nn.GroupNorm(2, 4, eps=1e-6)
    st = Streamer(device=device, storage=device, dtype=torch.float32, rows=3, image_height=8)
    x = torch.randn(1, 4, 8, 8, device=device)
    dead = torch.empty(1)
    ref = weakref.ref(dead)
    del dead
    stale = ChannelSums.zeros(1, 4, device)
    stale.add(torch.full((1, 4, 8, 8), 100.0, device=device))
    st._sums[id(x)] = (ref, stale)  # as a map that died at x's address left it
    mean, rstd = st.group_stats(x, norm)
    want_mean, want_rstd = _stats(x, 2, 1e-6)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-5, atol=0)


# ---- GroupNorm sums of half-precision maps -------------------------------------------------------------------
def test_groupnorm_sums_of_an_fp16_map_do_not_overflow(device: torch.device) -> None:
    # Decoder activations reach thousands; their squared deviations pass fp16's 65504, so the sums are float32 /
    # float64 whatever the map's dtype.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 8, 24, 16, generator=g) * 400 + 50).half().to(device)
    sums = ChannelSums.zeros(1, 8, device)
    for a in range(0, 24, 5):  # strips, the last one partial
        sums.add(x[:, :, a : a + 5])
    mean, rstd = sums.group_stats(torch.nn.GroupNorm(2, 8, eps=1e-6), 24 * 16)
    want_mean, want_rstd = _stats(x, 2, 1e-6)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(rstd.double(), want_rstd, rtol=1e-6, atol=0)


# ---- the online softmax --------------------------------------------------------------------------------------
def test_online_softmax_keeps_scores_far_below_zero_and_falling_between_chunks(device: torch.device) -> None:
    # Scores of -200 and -400 underflow exp() unless each is taken relative to the running maximum; a later chunk
    # far below an earlier one must rescale nothing upwards (exp(+200) overflows float32).
    c = 4
    k = torch.zeros(1, 4, c, device=device)
    k[0, :, 0] = torch.tensor([-1.0, -2.0, -0.995, -1.5])
    v = torch.randn(1, 4, c, device=device)
    q = torch.zeros(1, 2, c, device=device)
    q[0, 0, 0], q[0, 1, 0] = 400.0, 2.0  # scores (q.k / sqrt(4)): -200, -400, -199, -300; and -1, -2, ...
    st = Streamer(device=device, storage=device, dtype=torch.float32)
    want = torch.softmax((q.double() @ k.double().transpose(1, 2)) / c**0.5, -1) @ v.double()
    for chunk in (1, 2, 3):
        out = st._attend(q, k, v, chunk, fused=False)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


# ---- strip heights ------------------------------------------------------------------------------------------
def _tallest_strip_per_map(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], int]:
    """The most rows of one strip written into each map, keyed by (map height, map id), from here on."""
    seen: dict[tuple[int, int], int] = {}
    real = Streamer.write

    def write(self: Streamer, out: torch.Tensor, a: int, e: int, *rest: object) -> None:
        key = (out.shape[2], id(out))
        seen[key] = max(seen.get(key, 0), e - a)
        real(self, out, a, e, *rest)

    monkeypatch.setattr(Streamer, "write", write)
    return seen


def test_tile_size_counts_rows_of_the_image_and_scales_down_with_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    # TileOptions.tile_size: rows of the full-resolution image; a level at 1/f of it gets tile_size // f rows
    # (no attention: its query chunks come from the budget, not from tile_size).
    vae = perturbed_vae("tiny", attention="none")  # downsample factor 2
    seen = _tallest_strip_per_map(monkeypatch)
    z = torch.randn(1, 4, 8, 6)  # a 16x12 image
    for fold in (True, False):  # the upsampler as a folded transposed conv, or nearest x2 + conv in strips
        for m in vae.modules():
            if isinstance(m, Upsample):
                m.fold = fold
        inference.decode(vae, z, tiling=TileOptions(tile_size=4))
        assert {(h, rows) for (h, _), rows in seen.items()} == {(8, 2), (16, 4)}  # every map, the upsampler's too
        seen.clear()
    inference.encode_moments(vae, torch.rand(1, 3, 12, 20) * 2 - 1, tiling=TileOptions(tile_size=4))
    assert {rows for (h, _), rows in seen.items() if h == 12} == {4}  # the image's height sets the scale, not its width


# ---- budgets exactly at their thresholds ---------------------------------------------------------------------
def test_a_budget_exactly_at_the_estimate_runs_untiled(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture, device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device)
    z = torch.randn(1, 4, 6, 5, device=device)
    calls = counting_tiled_calls(monkeypatch)
    at = inference.estimate_bytes(vae, "decode", (1, 3, 12, 10), torch.float32)
    with caplog.at_level(logging.INFO, logger="klvae"):
        inference.decode(vae, z, tiling=TileOptions(max_memory=at))
    assert calls["decode"] == 0 and "exceeds" not in caplog.text
    with caplog.at_level(logging.INFO, logger="klvae"):
        inference.decode(vae, z, tiling=TileOptions(max_memory=at - 1))
    assert calls["decode"] == 1 and "decode of 12x10 exceeds" in caplog.text


def test_tiling_turned_off_wins_over_a_budget_and_a_strip_height(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    vae = perturbed_vae("tiny")
    calls = counting_tiled_calls(monkeypatch)
    x = torch.rand(1, 3, 12, 10) * 2 - 1
    off = TileOptions(enabled=False, max_memory=1, tile_size=4)
    with caplog.at_level(logging.INFO, logger="klvae"):
        m = inference.encode_moments(vae, x, tiling=off)
        inference.decode(vae, m[:, :4], tiling=off)
    assert calls == {"encode": 0, "decode": 0} and "exceeds" not in caplog.text


def test_a_tiled_result_exactly_the_pool_is_delivered_and_one_more_is_not() -> None:
    vae = perturbed_vae("tiny").to("meta")  # the model's device; the result waits on the CPU
    weights = tiling.weight_bytes(vae)
    budget = 32 * (weights // 16)  # a multiple of 32: the pool (5/8 of it, less the weights) is whole floats
    pool = budget * 5 // 8 - weights
    assert pool > 0 and pool % 4 == 0
    opts = TileOptions(max_memory=budget)
    assert tiling.deliver(vae, torch.zeros(pool // 4), opts).device.type == "meta"
    over = torch.zeros(pool // 4 + 1)
    assert tiling.deliver(vae, over, opts) is over  # the pool counts the weights: one float over stays


@pytest.fixture
def fresh_host_maps_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host-maps warning is once per process: each test starts with none given."""
    monkeypatch.setattr(tiling, "_host_maps_warned", set())


@pytest.mark.usefixtures("fresh_host_maps_warning")
def test_the_host_maps_warning_starts_just_over_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    vae = perturbed_vae("tiny")
    shape = (1, 3, 64, 48)
    maps = tiling.resident_map_bytes(vae, "decode", shape, torch.float32)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        tiling.warn_host_maps(vae, "decode", shape, torch.float32, TileOptions(max_memory=maps))
        assert "memory budget (max_memory, --max-memory) bounds each strip" not in caplog.text
        tiling.warn_host_maps(vae, "decode", shape, torch.float32, TileOptions(max_memory=maps - 1))
    assert "memory budget (max_memory, --max-memory) bounds each strip" in caplog.text


# ---- the NaN guard -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiled", [False, True])
def test_infinite_half_output_without_nan_is_rerun_in_fp32(tiled: bool, caplog: pytest.LogCaptureFixture,
                                                           device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device)
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] = 1e5  # past fp16's 65504 in the last layer: +inf, and no norm after it
    z = torch.randn(1, 4, 4, 4, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        half = vae.decode(z)
    assert torch.isinf(half).any() and not torch.isnan(half).any()
    opts = TileOptions(tile_size=4) if tiled else None
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = inference.decode(vae, z, torch.float16, tiling=opts)
    assert "rerunning this step in fp32" in caplog.text
    torch.testing.assert_close(out, inference.decode(vae, z, torch.float32, tiling=opts), atol=1e-5, rtol=0)


def test_an_fp32_model_with_non_finite_output_runs_once_and_returns_it_unclamped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Nothing is higher than fp32 to rerun in; the caller's check must see the inf (clamped, it would be white).
    vae = perturbed_vae("tiny")
    passes = []
    broken = torch.tensor([5.0, -5.0, float("inf"), 0.5]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    monkeypatch.setattr(vae, "decode", lambda u: passes.append(1) or broken.clone())
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = inference.decode(vae, torch.randn(1, 4, 1, 1), torch.float32)
    assert passes == [1] and "rerunning" not in caplog.text
    assert torch.equal(out, broken)


def test_finite_output_is_clamped_to_the_image_range(monkeypatch: pytest.MonkeyPatch) -> None:
    vae = perturbed_vae("tiny")
    monkeypatch.setattr(vae, "decode", lambda u: torch.tensor([5.0, -5.0, 0.5, -0.25]).reshape(1, 1, 2, 2))
    out = inference.decode(vae, torch.randn(1, 4, 1, 1), torch.float32)
    assert torch.equal(out, torch.tensor([1.0, -1.0, 0.5, -0.25]).reshape(1, 1, 2, 2))


def test_a_half_stored_model_refuses_the_other_half_dtype() -> None:
    # It used to compute in its own dtype in silence (a hunt: the dtype asked for was a no-op); now it says so.
    vae = perturbed_vae("tiny").half()
    z = torch.randn(1, 4, 3, 4)
    own = inference.decode(vae, z, torch.float16)
    assert torch.equal(inference.decode(vae, z), own)
    with pytest.raises(ValueError, match=r"^dtype torch.bfloat16 asked of weights stored in torch.float16: "):
        inference.decode(vae, z, torch.bfloat16)
    assert vae.dtype == torch.float16


# ---- inputs --------------------------------------------------------------------------------------------------
def test_odd_sized_images_are_edge_padded_right_and_bottom(device: torch.device) -> None:
    vae = perturbed_vae("tiny-f8", device=device)
    x = (torch.rand(1, 3, 35, 50) * 2 - 1).to(device)
    padded = F.pad(x, (0, 6, 0, 5), mode="replicate")  # to 40x56, whole cells of the f8 latent
    with torch.no_grad():
        want = vae.encode_moments(padded)
    m = inference.encode_moments(vae, x)
    assert m.shape == want.shape == (1, 8, 5, 7)
    torch.testing.assert_close(m, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(inference.encode_moments(vae, x, tiling=TileOptions(tile_size=8)), want,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_latents_are_refused(bad: float) -> None:
    vae = perturbed_vae("tiny")
    z = torch.randn(1, 4, 4, 4)
    z[0, 2, 1, 3] = bad
    with pytest.raises(klvae.LatentsError, match="NaN or infinite"):
        inference.decode(vae, z)
