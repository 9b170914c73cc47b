"""Pins what a mutation audit of klvae.inference.streaming and klvae.inference.channel_sums found untested: the
strip height each streamed step takes from the budget (3x3 and upsampling convs, statistics passes, lazy input
convs, recomputed ResNet blocks, attention's K/V projection; fp32 and bf16); a downsampler streamed over odd-sized
maps; the map pool counting the compute dtype's bytes; stored maps' sums being of the values stored; statistics
passes counted; float64 sums over many strips whose first strip is unlike the rest; inputs uploaded in strips
within the budget only when they cross to the device; what `recompute` leaves unmaterialised and what it does not;
attention's query/key chunks (the most that fit, K and V on the device or not, fused) and one attention call per
query chunk when it takes every key; linear attention tiled in bf16; tiled == untiled under a budget alone, with
maps split between the device and (simulated) host memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import perturbed_vae
from klvae import inference
from klvae.inference import tiling
from klvae.inference.channel_sums import ChannelSums
from klvae.inference.streaming import LazyConv, Streamer
from klvae.model.blocks import Attention, Downsample, ResnetBlock, Upsample


def _elem(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


class _Strips(Streamer):
    """Records the rows of each strip written into a map, read from a map, and put into a K/V token map."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.written: list[int] = []
        self.read: list[int] = []
        self.tokens: list[int] = []  # token rows (tokens / width) of each K or V strip

    def write(self, out: torch.Tensor, a: int, e: int, y: torch.Tensor, sums: ChannelSums) -> None:
        self.written.append(e - a)
        super().write(out, a, e, y, sums)

    def rows_of(self, x: torch.Tensor | LazyConv, a: int, e: int) -> torch.Tensor:
        self.read.append(e - a)
        return super().rows_of(x, a, e)

    def put(self, dst: torch.Tensor, y: torch.Tensor) -> None:
        if dst.ndim == 3:
            self.tokens.append(dst.shape[1])
        super().put(dst, y)


# ---- strip heights from the budget ----------------------------------------------------------------------------
# Each step's cost per output row (bytes), as Streamer.strip_rows documents it: inputs in the compute dtype plus
# fp32 temporaries (elem + 8 per value), outputs twice in the compute dtype and twice in fp32 (2 elem + 8).
W, H = 6, 10


def _run_conv(st: _Strips, dtype: torch.dtype) -> int:
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    st.conv(torch.randn(1, 8, H, W).to(dtype), conv)
    return st.written[0]


def _run_up_conv(st: _Strips, dtype: torch.dtype) -> int:
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)  # nearest x2, then the conv: an output row reads half a source row
    st.conv(torch.randn(1, 8, H // 2, W).to(dtype), conv, mode="up")
    return st.written[0]


def _run_stats_pass(st: _Strips, dtype: torch.dtype) -> int:
    st.group_stats(torch.randn(1, 8, H, W).to(dtype), torch.nn.GroupNorm(2, 8))
    return st.read[0]


def _run_lazy_input_conv(st: _Strips, dtype: torch.dtype) -> int:
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)  # an image's input conv, its rows computed from the 3 channels
    st.materialize(st.lazy(torch.randn(1, 3, H, W).to(dtype), conv))
    return st.written[0]


def _run_recomputed_resnet(st: _Strips, dtype: torch.dtype) -> int:
    st.recompute = True  # pool 0: conv1's map would not stay on the device, so it is recomputed
    with torch.no_grad():
        st.resnet(torch.randn(1, 8, H, W).to(dtype), ResnetBlock(8, 16, 2, 1e-6))
    return st.written[0]


def _run_attention_kv(st: _Strips, dtype: torch.dtype) -> int:
    with torch.no_grad():
        st.attention(torch.randn(1, 8, H, W).to(dtype), Attention(8, 2, 1e-6))
    return st.tokens[0] // W


STEPS = {  # what runs, and its cost per output row in units of (elem + 8) and (2 elem + 8) bytes per pixel
    "3x3 conv": (_run_conv, W * 8, W * 8),
    "upsampling conv": (_run_up_conv, W * 8, 2 * W * 8),
    "statistics pass": (_run_stats_pass, W * 8, 0),
    "lazy input conv": (_run_lazy_input_conv, W * 3, W * 8),
    "recomputed resnet": (_run_recomputed_resnet, W * (8 + 16), W * 16),
    "attention keys and values": (_run_attention_kv, W * 8, W * 16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", list(STEPS))
def test_each_streamed_step_takes_the_tallest_strips_that_fit_the_budget(step: str, dtype: torch.dtype) -> None:
    run, inputs, outputs = STEPS[step]
    e = _elem(dtype)
    per_row = inputs * (e + 8) + outputs * (2 * e + 8)
    st = _Strips(device=torch.device("cpu"), storage=torch.device("cpu"), dtype=dtype, budget=int(3.5 * per_row))
    assert run(st, dtype) == 3  # 3.5 rows' worth: three rows, not two (an overcount) nor four (an undercount)


def test_strip_heights_count_the_compute_dtypes_bytes() -> None:
    # The same budget gives bf16 strips more rows than fp32 ones, by the element sizes' ratio in the cost.
    cpu = torch.device("cpu")
    per_row = {dt: W * (8 * (_elem(dt) + 8) + 8 * (2 * _elem(dt) + 8)) for dt in (torch.float32, torch.bfloat16)}
    budget = 10 * per_row[torch.float32]
    rows = {dt: Streamer(device=cpu, storage=cpu, dtype=dt, budget=budget).strip_rows(1, 8, 8, W, H)
            for dt in per_row}
    assert rows == {torch.float32: 10, torch.bfloat16: budget // per_row[torch.bfloat16]} and rows[torch.bfloat16] > 10


@pytest.mark.parametrize("shape", [(1, 4, 7, 9), (2, 4, 6, 5), (1, 4, 3, 2)])
def test_a_downsampler_streamed_over_an_odd_sized_map_equals_the_module(shape: tuple[int, ...]) -> None:
    # Pad right/bottom by one, then a valid stride-2 conv: floor(n / 2) rows and columns, whatever their parity.
    torch.manual_seed(0)
    down = Downsample(4)
    x = torch.randn(*shape)
    cpu = torch.device("cpu")
    for rows in (1, 2, 100):
        st = Streamer(device=cpu, storage=cpu, dtype=torch.float32, rows=rows, image_height=shape[2])
        with torch.no_grad():
            got, want = st.conv(x, down.conv, mode="down"), down(x)
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5


# ---- the pool and the maps' sums --------------------------------------------------------------------------------
def test_the_pool_counts_a_half_precision_maps_own_bytes() -> None:
    shape = (1, 4, 6, 5)
    st = Streamer(device=torch.device("cpu"), storage=torch.device("meta"), dtype=torch.bfloat16,
                  pool=4 * 6 * 5 * 2)  # one bf16 map, not one fp32 map
    first = st.empty(shape)
    assert first.device.type == "cpu" and st.empty(shape).device.type == "meta"
    del first


def test_a_stored_maps_sums_are_of_the_values_it_holds() -> None:
    # A bf16 streamer storing an fp32 result: the GroupNorm statistics must be the stored (rounded) map's, as the
    # untiled network's norm would see it. 1 + 3 * 2**-10 rounds down to 1 in bf16 (its spacing there is 2**-7).
    st = Streamer(device=torch.device("cpu"), storage=torch.device("cpu"), dtype=torch.bfloat16)
    y = torch.full((1, 4, 5, 6), 1 + 3 * 2**-10)
    y[:, :, ::2] = -1 - 3 * 2**-10  # some spread, so rstd is finite and meaningful
    y[:, :, :, 0] += 0.5
    out = st.store(y)
    norm = torch.nn.GroupNorm(2, 4, eps=1e-6)
    mean, rstd = st.group_stats(out, norm)
    exact = out.double().reshape(1, 2, -1)
    torch.testing.assert_close(mean.double(), exact.mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(exact.var(-1, unbiased=False) + 1e-6), rtol=1e-6, atol=0)
    assert st.stat_passes == 0


def test_statistics_passes_are_counted_for_maps_without_sums_only() -> None:
    cpu = torch.device("cpu")
    st = Streamer(device=cpu, storage=cpu, dtype=torch.float32, rows=2, image_height=8)
    norm = torch.nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 8, 8)
    st.group_stats(x, norm)  # a tensor from outside: read back once for its sums
    assert st.stat_passes == 1
    st.group_stats(st.store(x), norm)  # a map this streamer wrote carries its sums
    st.group_stats(st.lazy(torch.randn(1, 3, 8, 8), torch.nn.Conv2d(3, 4, 3, padding=1)), norm)  # computed, not read
    assert st.stat_passes == 1


def test_statistics_over_many_strips_keep_a_first_strip_unlike_the_rest() -> None:
    # The sums are shifted by the first strip's means; where the rest of the map sits far from them, the shifted
    # squares reach millions, and float32 accumulators would drift strip after strip (1e-5 off over 128 strips).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 128, 128, generator=g, dtype=torch.float64) + 3000
    x[:, :, 0] -= 3000
    x = x.float()
    cpu = torch.device("cpu")
    st = Streamer(device=cpu, storage=cpu, dtype=torch.float32, rows=1, image_height=128)
    mean, rstd = st.group_stats(x, torch.nn.GroupNorm(2, 4, eps=1e-6))
    exact = x.double().reshape(1, 2, -1)
    torch.testing.assert_close(mean.double(), exact.mean(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(exact.var(-1, unbiased=False) + 1e-6), rtol=1e-6, atol=0)


# ---- inputs placed on the device ---------------------------------------------------------------------------------
class _Uploads(Streamer):
    """Records the bytes of each strip of an input uploaded to the device."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.uploads: list[int] = []

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.uploads.append(src.numel() * src.element_size())
        super().upload(dst, src)


def test_an_input_crosses_to_the_device_in_strips_within_the_budget() -> None:
    t = torch.randn(1, 3, 10, W)  # fp32 rows of 72 bytes; a bf16 map: the copy stages them in fp32
    row = 3 * W * 4
    # Storage elsewhere (meta: it holds no values). The map fits the pool, so it goes to the device in strips
    # whose staging (twice the source strip) fits the budget: 3 rows here, the most that do.
    st = _Uploads(device=torch.device("cpu"), storage=torch.device("meta"), dtype=torch.bfloat16,
                  budget=2 * row * 3 + row, pool=2**20)
    out = st.place(t)
    assert out.device.type == "cpu" and torch.equal(out, t.bfloat16())
    assert st.uploads == [3 * row, 3 * row, 3 * row, row]
    # A map that stays in storage is copied there whole: nothing crosses to the device.
    st = _Uploads(device=torch.device("cpu"), storage=torch.device("meta"), dtype=torch.bfloat16, budget=row, pool=0)
    assert st.place(t).device.type == "meta" and st.uploads == []


# ---- what recompute leaves unmaterialised --------------------------------------------------------------------
class _Streamed(Streamer):
    """Records the convs streamed into whole maps and the lazy maps materialised."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.convs: list[torch.nn.Conv2d] = []
        self.materialised = 0

    def conv(self, x: object, conv: torch.nn.Conv2d, *args: object, **kwargs: object) -> torch.Tensor:
        self.convs.append(conv)
        return super().conv(x, conv, *args, **kwargs)

    def materialize(self, x: torch.Tensor | LazyConv) -> torch.Tensor:
        self.materialised += isinstance(x, LazyConv)
        return super().materialize(x)


@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_streams_no_map_that_it_can_recompute(recompute: bool) -> None:
    vae = perturbed_vae("tiny")  # one folded upsampler in the decoder
    for m in vae.modules():
        if isinstance(m, Upsample):
            m.fold = True
    z = torch.randn(1, 4, 5, 6)
    cpu = torch.device("cpu")
    # pool 0: no map would stay on the device, so with recompute each one that can be is recomputed.
    st = _Streamed(device=cpu, storage=cpu, dtype=torch.float32, rows=4, image_height=10, recompute=recompute)
    d = tiling.tiled_decode(vae, z, st)
    assert (d - vae.decode(z)).abs().max() < 1e-4
    dec = vae.decoder
    resnet_convs = [c for m in dec.modules() if isinstance(m, ResnetBlock) for c in (m.conv1, m.conv2)]
    if recompute:  # the input conv and the upsampler are computed row by row from their sources, conv1 twice
        assert st.convs == [vae.post_quant_conv, dec.conv_out] and st.materialised == 0
    else:  # every map is written once: the input conv's, each ResNet conv's, the upsampler's
        assert st.convs[:2] == [vae.post_quant_conv, dec.conv_in] and st.convs[-1] is dec.conv_out
        assert set(st.convs[2:-1]) == set(resnet_convs) and len(st.convs) == len(resnet_convs) + 3
        assert st.materialised == 1


# ---- attention's chunks ---------------------------------------------------------------------------------------
# b = 2, c = 8, a 10 x 6 map (60 tokens), fp32: a query row costs b c (4 elem + 4) w = 1920 bytes against a quarter
# of the budget, and its scores against every key b w 60 * 12 = 8640 bytes against half of it.
@pytest.mark.parametrize(("budget", "fused", "kv_on_device", "want"), [
    (60_480, False, True, (3, 60)),  # 3.5 query rows' scores against all keys fit: 3 rows, no key chunks
    (16_000, False, True, (2, 27)),  # not one row's do: the rows a quarter takes (2), and the keys that fit (27)
    (60_480, False, False, (7, 30)),  # K and V in host memory: the most query rows (7), keys in chunks that fit
    (16_000, True, True, (2, 60)),  # a fused kernel keeps the scores on chip: every key at once
])
def test_attention_chunks_are_the_most_that_fit_the_budget(budget: int, fused: bool, kv_on_device: bool,
                                                           want: tuple[int, int]) -> None:
    st = Streamer(device=torch.device("cpu"), storage=torch.device("cpu"), dtype=torch.float32, budget=budget)
    assert st._attention_chunks(2, 8, 10, 6, fused, kv_on_device, None, None) == want


def test_queries_against_every_key_take_one_attention_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keys in one chunk: the library's attention (on a GPU its fused kernel, which never holds the scores), not
    # the online softmax; keys in chunks: the online softmax only.
    calls: list[int] = []
    real = F.scaled_dot_product_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    torch.manual_seed(0)
    attn = Attention(8, 2, 1e-6)
    x = torch.randn(1, 8, 5, 4)
    st = Streamer(device=torch.device("cpu"), storage=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        want = attn(x)
        calls.clear()
        torch.testing.assert_close(st.attention(x, attn, rows=2, key_chunk=20), want, atol=1e-5, rtol=1e-5)
        assert len(calls) == 3  # query rows 2 + 2 + 1, each against all 20 keys at once
        calls.clear()
        torch.testing.assert_close(st.attention(x, attn, rows=2, key_chunk=19), want, atol=1e-5, rtol=1e-5)
        assert calls == []


class _HostMaps(Streamer):
    """Maps that leave the pool go to `storage` as if across a bus (the same CPU memory, so they keep values)."""

    separate_storage = True  # type: ignore[assignment]

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)
        self.chunks: list[tuple[int, int]] = []

    def _attention_chunks(self, *args: object) -> tuple[int, int]:
        self.chunks.append(super()._attention_chunks(*args))  # type: ignore[arg-type]
        return self.chunks[-1]


@pytest.mark.parametrize(("pool", "want"), [(2**20, (3, 60)), (0, (7, 30))])
def test_attention_takes_big_query_chunks_only_when_keys_and_values_wait_in_host_memory(
        pool: int, want: tuple[int, int]) -> None:
    torch.manual_seed(0)
    attn = Attention(8, 2, 1e-6)
    x = torch.randn(2, 8, 10, 6)
    cpu = torch.device("cpu")
    st = _HostMaps(device=cpu, storage=cpu, dtype=torch.float32, budget=60_480, pool=pool)
    with torch.no_grad():
        out = st.attention(x, attn)
        torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=1e-5)
    assert st.chunks == [want]


class _HostStrips(_Strips):
    """_Strips whose maps outside the pool count as host memory (as _HostMaps)."""

    separate_storage = True


# ---- whole passes ----------------------------------------------------------------------------------------------
def test_linear_attention_tiles_in_bf16_and_its_map_carries_its_sums() -> None:
    vae = perturbed_vae("tiny", attention="linear")
    z = torch.randn(1, 4, 5, 7)
    want = inference.decode(vae, z, torch.bfloat16)
    cpu = torch.device("cpu")
    st = Streamer(device=cpu, storage=cpu, dtype=torch.bfloat16, rows=3, image_height=10)
    got = tiling.tiled_decode(vae, z, st).clamp(-1, 1)
    assert (got - want).abs().max() < 0.1
    assert st.stat_passes == 0  # the attention's output map was stored with its sums, like every other


@pytest.mark.parametrize(("budget", "pool"), [(20_000, 0), (60_000, 40_000)])
def test_tiled_equals_untiled_with_strips_from_a_budget_alone(budget: int, pool: int) -> None:
    # Odd sizes, a batch of 2, strips of one row at the widest levels (20 kB), and maps split between the device
    # and (simulated) host memory with recompute: as make_streamer sets a GPU up.
    vae = perturbed_vae("tiny")
    x = torch.rand(2, 3, 14, 22) * 2 - 1
    cpu = torch.device("cpu")
    with torch.no_grad():
        m_plain = vae.encode_moments(x)
        d_plain = vae.decode(m_plain[:, :4])

    def streamer() -> _Strips:
        kind = _HostStrips if pool else _Strips
        return kind(device=cpu, storage=cpu, dtype=torch.float32, budget=budget, pool=pool, recompute=pool > 0,
                    channels_last=pool > 0)

    st = streamer()
    assert (tiling.tiled_encode_moments(vae, x, st) - m_plain).abs().max() < 1e-4
    st_dec = streamer()
    assert (tiling.tiled_decode(vae, m_plain[:, :4], st_dec) - d_plain).abs().max() < 1e-4
    assert st.stat_passes == st_dec.stat_passes == 0
    if budget == 20_000:
        assert min(st.written) == 1 and max(st.written) > 1


def test_strip_heights_count_every_image_of_the_batch() -> None:
    # A strip holds its rows of each image: a batch of four gets a quarter of one image's rows (a memory hunt:
    # tiled batches of four went over a GPU budget by a third).
    cpu = torch.device("cpu")
    st = Streamer(device=cpu, storage=cpu, dtype=torch.float32, budget=40 * W * (8 * 12 + 8 * 16))
    assert [st.strip_rows(b, 8, 8, W, H) for b in (1, 2, 4, 64)] == [40, 20, 10, 1]
