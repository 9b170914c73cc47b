"""Inference: exact tiling (tiled == untiled), the memory-budget choice, the OOM fall-back and the NaN guard."""

import logging
import math

import pytest
import torch

import klvae
from helpers import perturbed_vae
from klvae import inference
from klvae.inference import TileOptions, tiling
from klvae.inference.streaming import LazyConv, Streamer
from klvae.model.blocks import Upsample


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.mark.parametrize(("preset", "rows"), [("tiny-f8", 8), ("tiny-f8", 1), ("tiny", 5), ("sd15", 16)])
def test_tiled_equals_untiled(preset: str, rows: int, device: torch.device) -> None:
    vae = perturbed_vae(preset, device=device)
    x = (torch.rand(2, 3, 48, 72) * 2 - 1).to(device)
    m_plain = inference.encode_moments(vae, x)
    m_tiled = inference.encode_moments(vae, x, tiling=TileOptions(tile_size=rows))
    assert (m_plain - m_tiled).abs().max() < 1e-4
    z = m_plain[:, : vae.config.latent_channels]
    d_plain = inference.decode(vae, z)
    d_tiled = inference.decode(vae, z, tiling=TileOptions(tile_size=rows))
    assert _psnr(d_plain, d_tiled) >= 45.0
    assert (d_plain - d_tiled).abs().max() < 1e-4


def test_tiled_equals_untiled_with_the_configs_own_norm_eps(device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device, norm_eps=0.5)  # far from 1e-6: a fixed eps would show
    x = (torch.rand(1, 3, 24, 40) * 2 - 1).to(device)
    m = inference.encode_moments(vae, x)
    assert (m - inference.encode_moments(vae, x, tiling=TileOptions(tile_size=4))).abs().max() < 1e-4
    z = m[:, :4]
    assert (inference.decode(vae, z) - inference.decode(vae, z, tiling=TileOptions(tile_size=4))).abs().max() < 1e-4


def test_tiled_handles_sizes_that_are_not_multiples_of_eight(device: torch.device) -> None:
    vae = perturbed_vae("tiny-f8", device=device)
    x = (torch.rand(1, 3, 37, 53) * 2 - 1).to(device)
    m_plain = inference.encode_moments(vae, x)
    assert m_plain.shape[-2:] == (5, 7)
    m_tiled = inference.encode_moments(vae, x, tiling=TileOptions(tile_size=8))
    assert (m_plain - m_tiled).abs().max() < 1e-4
    y = inference.decode(vae, m_plain[:, :4], size=(37, 53), tiling=TileOptions(tile_size=8))
    assert y.shape == (1, 3, 37, 53)


class _Watching(Streamer):
    """Counts where maps go, and lazy maps read by a block whose own output is kept (not recomputed)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.seen = {"device": 0, "storage": 0, "lazy into kept block": 0}

    def empty(self, shape: tuple[int, ...], fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        self.seen["device" if self.on_device(shape) else "storage"] += 1
        return super().empty(shape, fmt)

    def resnet(self, x: object, block: torch.nn.Module) -> torch.Tensor:
        b, _, h, w = x.shape
        if isinstance(x, LazyConv) and not self.recomputes((b, block.conv1.out_channels, h, w)):
            self.seen["lazy into kept block"] += 1
        return super().resnet(x, block)


@pytest.mark.parametrize(("channels_last", "recompute", "fold", "pool"),
                         [(False, False, False, 0), (True, False, True, 0), (False, True, False, 0),
                          (True, True, True, 0), (True, True, True, 120_000)])
def test_tiled_maps_carry_their_statistics(channels_last: bool, recompute: bool, fold: bool, pool: int,
                                           device: torch.device) -> None:
    vae = perturbed_vae("tiny-f8", device=device)
    for m in vae.modules():
        if isinstance(m, Upsample):
            m.fold = fold  # with recompute, a folded upsampler's map is never materialised
    x = (torch.rand(1, 3, 48, 40) * 2 - 1).to(device)
    m_plain = inference.encode_moments(vae, x)
    d_plain = inference.decode(vae, m_plain[:, :4])
    st = _Watching(device=device, storage=torch.device("cpu"), dtype=torch.float32, rows=8, image_height=48,
                   channels_last=channels_last, recompute=recompute, pool=pool)
    with torch.no_grad():
        assert st.conv(x, vae.encoder.conv_in).is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    m = tiling.tiled_encode_moments(vae, x, st)
    d = tiling.tiled_decode(vae, m_plain[:, :4], st).clamp(-1, 1)
    assert st.stat_passes == 0  # every GroupNorm took the sums gathered while its input map was written
    assert (m.to(device) - m_plain).abs().max() < 1e-4 and (d.to(device) - d_plain).abs().max() < 1e-4
    if pool:  # a mixed placement, with a recomputed map feeding a block whose output stays on the device
        assert st.seen["device"] > 0 and st.seen["storage"] > 0 and st.seen["lazy into kept block"] > 0


def test_small_maps_stay_on_the_device(device: torch.device) -> None:
    vae = perturbed_vae("tiny-f8", device=device)
    z = torch.randn(1, 4, 6, 5, device=device)
    # Storage on the meta device holds no values: the result is only right if no map was put there.
    st = Streamer(device=device, storage=torch.device("meta"), dtype=torch.float32, rows=8, image_height=48,
                  pool=2**30)
    d = tiling.tiled_decode(vae, z, st).clamp(-1, 1)
    assert d.device == device and (d - inference.decode(vae, z)).abs().max() < 1e-4


@pytest.mark.parametrize("attention", ["linear", "none"])
def test_tiled_attention_variants(attention: str, device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device, attention=attention)
    z = torch.randn(1, 4, 6, 10, device=device)
    a = inference.decode(vae, z)
    b = inference.decode(vae, z, tiling=TileOptions(tile_size=4))
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize(("rows", "key_chunk", "budget"),
                         [(None, None, 2**28), (2, None, 2**28), (3, 10, 2**28), (1, 1, 2**28), (None, None, 8_000)])
# budget 8_000: the chunks come from the budget alone, and one row of queries against every key would exceed it,
# so keys go in chunks (online softmax)
def test_attention_chunks_do_not_change_the_result(rows: int | None, key_chunk: int | None, budget: int,
                                                   device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device)
    attn = vae.decoder.mid_block.attentions[0]
    x = torch.randn(1, 64, 7, 9, device=device)
    st = Streamer(device=device, storage=device, dtype=torch.float32, budget=budget)
    whole = attn(x)
    torch.testing.assert_close(st.attention(x, attn, rows=rows, key_chunk=key_chunk), whole, atol=1e-5, rtol=1e-5)
    if budget < 2**20:
        assert st._attention_chunks(1, 64, 7, 9, False, True, None, None)[1] < 7 * 9


def test_streamed_groupnorm_statistics_match_groupnorm(device: torch.device) -> None:
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6).to(device)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 13, 7, device=device) * 3 + 1
    st = Streamer(device=device, storage=torch.device("cpu"), dtype=torch.float32, rows=2, image_height=13)
    y = st.apply_norm(x, norm, st.group_stats(x, norm), act=False)
    torch.testing.assert_close(y, norm(x), atol=1e-5, rtol=1e-5)
    # Means thousands of times the spread, a little different in each channel of a group, and a first strip unlike
    # the rest: plain sums of squares would lose the variance to cancellation (float32 squares summed in float64 were
    # off by 8e-4 at 3000 and 5 % at 30000); the shifted sums and the per-group merge keep float32's precision.
    g = torch.Generator().manual_seed(0)
    for level in (3000.0, 30000.0):
        far = torch.randn(1, 16, 96, 96, generator=g, dtype=torch.float64)
        far += level * torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64).repeat_interleave(4)[:, None, None]
        far += torch.arange(16, dtype=torch.float64)[:, None, None] % 4  # the channels of a group differ a little
        far[:, :, :2] += 5  # the rows of the first strip, so its means are off the map's
        far = far.float().to(device)
        mean, rstd = st.group_stats(far, norm)
        exact = far.double().reshape(1, 4, -1)
        want = torch.rsqrt(exact.var(-1, unbiased=False) + 1e-6)
        torch.testing.assert_close(rstd.double(), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(mean.double(), exact.mean(-1), rtol=1e-6, atol=0)


def test_memory_budget_picks_tiling_and_says_so(caplog: pytest.LogCaptureFixture, device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device)
    z = torch.randn(1, 4, 8, 8, device=device)
    small = inference.estimate_bytes(vae, "decode", (1, 3, 32, 32), torch.float32)
    assert inference.estimate_bytes(vae, "decode", (1, 3, 64, 64), torch.float32) > small
    with caplog.at_level(logging.INFO):
        out = inference.decode(vae, z, tiling=TileOptions(max_memory=small // 2))
    assert "tiling" in caplog.text
    torch.testing.assert_close(out, inference.decode(vae, z), atol=1e-4, rtol=0)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        inference.decode(vae, z, tiling=TileOptions(max_memory=10 * small))
    assert "tiling" not in caplog.text
    # The decode is judged by the image it makes (16x16 here), not by its 8x8 latents.
    at_latent = inference.estimate_bytes(vae, "decode", (1, 3, 8, 8), torch.float32)
    at_image = inference.estimate_bytes(vae, "decode", (1, 3, 16, 16), torch.float32)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        inference.decode(vae, z, tiling=TileOptions(max_memory=(at_latent + at_image) // 2))
    assert "decode of 16x16 exceeds" in caplog.text


def test_out_of_memory_falls_back_to_tiling(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                            device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device)
    z = torch.randn(1, 4, 8, 8, device=device)
    expected = inference.decode(vae, z)

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(vae, "decode", oom)  # the untiled path calls vae.decode; the tiled one does not
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with caplog.at_level(logging.WARNING):
        out = inference.decode(vae, z)
    assert "decode ran out of GPU memory at 16x16; retrying tiled" in caplog.text  # the size it gave up at
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tiled", [False, True])
def test_fp16_overflow_is_rerun_in_fp32(tiled: bool, caplog: pytest.LogCaptureFixture, device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's 65504: inf, then NaN after GroupNorm
    z = torch.randn(1, 4, 4, 4, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
        assert not torch.isfinite(vae.decode(z)).all()  # the overflow is real
    tiling = TileOptions(tile_size=8) if tiled else None
    reference = inference.decode(vae, z, torch.float32, tiling=tiling)
    with caplog.at_level(logging.WARNING):
        out = inference.decode(vae, z, torch.float16, tiling=tiling)
    assert "rerunning this step in fp32" in caplog.text
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_half_weights_are_upcast_for_the_rerun_and_restored(device: torch.device) -> None:
    vae = perturbed_vae("tiny", device=device)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    vae.to(torch.float16)
    z = torch.randn(1, 4, 4, 4, device=device)
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(z.half())).all()
    out = inference.decode(vae, z, torch.float16)
    assert torch.isfinite(out).all()
    assert vae.dtype == torch.float16


def test_dtype_defaults_to_the_weights_and_fp32_is_honoured(device: torch.device) -> None:
    # A model stored in bf16 (optimize_for_inference) computes in bf16 by default; asking for fp32 outright
    # upcasts it for the call (a silent bf16 pass would be off by ~1e-2) and puts the bf16 weights back.
    vae = perturbed_vae("tiny", device=device)
    z = torch.randn(1, 4, 4, 4, device=device)
    reference = inference.decode(vae, z)
    vae.to(torch.bfloat16)
    default = inference.decode(vae, z)
    asked = inference.decode(vae, z, torch.float32)
    assert vae.dtype == torch.bfloat16
    # The fp32 call equals an fp32 pass over the bf16-rounded weights; the default pass computed in bf16.
    fp32_of_rounded = inference.decode(perturbed_vae("tiny", device=device).to(torch.bfloat16).float(), z)
    torch.testing.assert_close(asked, fp32_of_rounded, atol=1e-5, rtol=0)
    assert (default - fp32_of_rounded).abs().max() > 1e-3
    assert (default - reference).abs().max() < 0.1  # and it is still the same network


def test_tiled_results_come_back_on_the_models_device_unless_over_budget(caplog: pytest.LogCaptureFixture) -> None:
    # On a GPU the tiled path's last map may sit in host memory; the API hands it back where the untiled path
    # would (the model's device), unless it alone would exceed the budget's pool. The meta device stands in.
    vae = perturbed_vae("tiny").to("meta")
    out = torch.zeros(1, 3, 64, 64)
    assert tiling.deliver(vae, out, TileOptions(max_memory=2**30)).device.type == "meta"
    with caplog.at_level(logging.INFO):
        kept = tiling.deliver(vae, out, TileOptions(max_memory=64 * 1024))
    assert kept is out and "stays in host memory" in caplog.text


def test_bad_latents_are_refused() -> None:
    vae = perturbed_vae("tiny")
    with pytest.raises(klvae.LatentsError, match="do not fit"):
        inference.decode(vae, torch.randn(1, 16, 4, 4))
    z = torch.randn(1, 4, 4, 4)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(klvae.LatentsError, match="NaN"):
        inference.decode(vae, z)
    for bad in (torch.zeros(1, 4, 0, 4), torch.zeros(0, 4, 4, 4)):
        with pytest.raises(klvae.LatentsError, match="do not fit"):
            inference.decode(vae, bad)
    with pytest.raises(klvae.LatentsError, match="floating point"):
        inference.decode(vae, torch.zeros(1, 4, 4, 4, dtype=torch.int64))
    with pytest.raises(klvae.LatentsError, match=r"must be a torch\.Tensor"):
        inference.decode(vae, [[0.0]])


@pytest.mark.parametrize(("x", "match"), [
    (torch.zeros(3, 16, 16), r"do not fit .*a single image needs a batch dimension"),
    (torch.zeros(1, 4, 16, 16), "do not fit"),
    (torch.zeros(1, 3, 0, 16), "do not fit"),
    (torch.zeros(0, 3, 16, 16), "do not fit"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "floating point"),
    ("astronaut.png", "must be a torch.Tensor"),
])
def test_bad_images_are_refused(x: object, match: str) -> None:
    vae = perturbed_vae("tiny")
    with pytest.raises(klvae.ImageError, match=match):
        inference.encode(vae, x)


@pytest.mark.parametrize("size", [(-1, -1), (0, 8), (8, 17), (17, 8), (8,), (8, 8, 8), (8.0, 8), (True, 8), 8])
def test_decode_size_must_crop_within_the_image(size: object) -> None:
    vae = perturbed_vae("tiny")  # downsample 2: 8x8 latents decode to 16x16
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(klvae.KlvaeError, match=r"size must be \(height, width\) with each between 1 and the decoded"):
        inference.decode(vae, z, size=size)
    assert inference.decode(vae, z, size=(16, 5)).shape == (1, 3, 16, 5)


@pytest.mark.parametrize("kwargs", [{"tile_size": 0}, {"tile_size": -8}, {"tile_size": 8.5}, {"max_memory": 0},
                                    {"max_memory": -1}, {"max_memory": "2GiB"}, {"enabled": "yes"}])
def test_tile_options_are_checked(kwargs: dict) -> None:
    with pytest.raises(klvae.KlvaeError, match=r"^TileOptions\.\w+ must be"):
        TileOptions(**kwargs)


def test_dtype_and_device_resolution() -> None:
    cpu = torch.device("cpu")
    assert inference.resolve_dtype("auto", cpu) == torch.float32
    assert inference.resolve_dtype("bf16", cpu) == torch.bfloat16
    # Any case, as `klvae convert --dtype` always took it.
    assert inference.resolve_dtype("FP16", cpu) == inference.resolve_dtype("Float16", cpu) == torch.float16
    assert inference.resolve_dtype("AUTO", cpu) == torch.float32
    with pytest.raises(klvae.KlvaeError, match="unknown dtype"):
        inference.resolve_dtype("fp8", cpu)
    assert inference.resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(klvae.KlvaeError):
        inference.resolve_device("nonsense")



class _StripHeights(Streamer):
    """Records what each strip of a stride-2 downsampler reads and writes, with the level's height."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.down: list[tuple[int, int, int]] = []  # (level height, input rows read, bytes of the strip)
        self.pads: dict[tuple[int, int], int] = {}  # (level height, rows read) -> bytes of a padding row and column

    def _conv_input(self, x: torch.Tensor, a: int, e: int, k: int, mode: str, pre: object) -> torch.Tensor:
        t = super()._conv_input(x, a, e, k, mode, pre)
        if mode == "down":
            # Input in the compute dtype and fp32 temporaries, output twice in each (as strip_rows counts them).
            elem = torch.finfo(self.dtype).bits // 8
            out = (e - a) * (x.shape[3] // 2) * x.shape[1] * (2 * elem + 8)
            self.down.append((x.shape[2], t.shape[2], t[0].numel() * (elem + 8) + out))
            self.pads[x.shape[2], t.shape[2]] = (t[0, :, 0].numel() + t[0, :, :, 0].numel()) * (elem + 8)
        return t


def test_downsampler_strips_keep_the_levels_height(device: torch.device) -> None:
    # A strip of `rows` image rows is rows // f rows at a level 1/f of the image: a downsampler reading that level
    # reads that many (plus its one padding row), not twice as many.
    vae = perturbed_vae("tiny-f8", device=device)
    x = (torch.rand(1, 3, 64, 40) * 2 - 1).to(device)
    st = _StripHeights(device=device, storage=device, dtype=torch.float32, rows=16, image_height=64)
    m = tiling.tiled_encode_moments(vae, x, st)
    assert (m - inference.encode_moments(vae, x)).abs().max() < 1e-4
    assert {h for h, _, _ in st.down} == {64, 32, 16}
    for h, read, _ in st.down:
        assert read <= 16 * h // 64 + 1, (h, read)


def test_downsampler_strips_fit_the_budget(device: torch.device) -> None:
    vae = perturbed_vae("tiny-f8", device=device)
    x = (torch.rand(1, 3, 64, 48) * 2 - 1).to(device)
    budget = 200_000
    st = _StripHeights(device=device, storage=device, dtype=torch.float32, budget=budget)
    m = tiling.tiled_encode_moments(vae, x, st)
    assert (m - inference.encode_moments(vae, x)).abs().max() < 1e-4
    # Each strip fits, but for the odd input row and column (the asymmetric padding) a stride-2 conv reads.
    assert all(nbytes - st.pads[h, read] <= budget for h, read, nbytes in st.down)
    assert min(read for _, read, _ in st.down) >= 9  # several rows per strip, so the count per row matters
