"""Guards around inference: the out-of-memory fall-back runs after the failed pass is freed; non-finite images are
refused before any pass, while a decode's own infinite pixels are left for the caller to see; fp16 on the CPU, and
a CPU memory budget below the maps a tiled pass holds, are warned about once."""

import logging
import weakref
from pathlib import Path

import pytest
import torch

import klvae
from helpers import perturbed_vae
from klvae import inference
from klvae.compat import as_diffusers
from klvae.inference import api, precision, tiling
from klvae.inference.streaming import Streamer
from klvae.inference.tiling import TileOptions


def test_out_of_memory_fall_back_runs_after_the_failed_pass_is_freed(monkeypatch: pytest.MonkeyPatch,
                                                                      device: torch.device) -> None:
    # An exception's traceback holds the frames it passed through, and with them the activations of the pass that
    # ran out of memory: the tiled retry, and empty_cache before it, must come once the exception is gone.
    vae = perturbed_vae("tiny", device=device)
    z = torch.randn(1, 4, 8, 8, device=device)
    expected = inference.decode(vae, z)
    activation: list[weakref.ref] = []
    freed: dict[str, bool] = {}

    def oom(t: torch.Tensor) -> None:
        h = torch.empty(1024, device=t.device)  # what a real pass holds when its next allocation fails
        activation.append(weakref.ref(h))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def tiled(*args: object, _real=api.tiled_decode, **kwargs: object) -> torch.Tensor:
        freed["tiled"] = activation[0]() is None
        return _real(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", oom)
    monkeypatch.setattr(api, "tiled_decode", tiled)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.setdefault("empty_cache", activation[0]() is None))
    out = inference.decode(vae, z)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert freed == {"empty_cache": True, "tiled": True}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_refused_before_any_pass(bad: float, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # As non-finite latents are: otherwise a bf16 pass "overflows", is rerun in fp32 with a warning that blames
    # the precision, and returns NaN moments anyway.
    vae = perturbed_vae("tiny")
    passes = []
    real = vae.encode_moments
    monkeypatch.setattr(vae, "encode_moments", lambda t: passes.append(1) or real(t))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    x[0, 1, 3, 5] = bad
    with caplog.at_level(logging.WARNING), pytest.raises(klvae.ImageError, match="NaN or infinite"):
        inference.encode_moments(vae, x, torch.bfloat16)
    assert passes == [] and "rerunning" not in caplog.text


@pytest.fixture
def fresh_fp16_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: the once-per-process fp16 warning not yet given."""
    monkeypatch.setattr(precision, "_slow_half_warned", set(), raising=False)


def _slow_fp16_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "fp16 on the CPU" in r.getMessage()]


@pytest.mark.usefixtures("fresh_fp16_warning")
def test_fp16_on_the_cpu_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    # PyTorch's CPU fp16 convolutions run some 100x slower than fp32 or bf16: fp16 is still computed as asked (to
    # reproduce its numerics), with one warning per process that names the fast choices, not one per batch or tile.
    vae = perturbed_vae("tiny")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with caplog.at_level(logging.WARNING, logger="klvae"):
        z = inference.encode(vae, x, torch.float16).mode()
        inference.decode(vae, z, torch.float16)
        inference.decode(vae, z, torch.float16, tiling=TileOptions(tile_size=4))
    (record,) = _slow_fp16_warnings(caplog)
    assert record.levelno == logging.WARNING and "bf16" in record.getMessage() and "fp32" in record.getMessage()


@pytest.mark.usefixtures("fresh_fp16_warning")
@pytest.mark.parametrize("stored", ["model", "adapter"])
def test_fp16_weights_on_the_cpu_are_warned_about(stored: str, caplog: pytest.LogCaptureFixture) -> None:
    # A model stored in fp16 computes in fp16 by default, through klvae's API and behind diffusers' alike.
    vae = perturbed_vae("tiny").half()
    z = torch.randn(1, 4, 4, 4, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="klvae"), torch.no_grad():
        out = inference.decode(vae, z) if stored == "model" else as_diffusers(vae).decode(z).sample
    assert out.shape == (1, 3, 8, 8) and len(_slow_fp16_warnings(caplog)) == 1


@pytest.mark.usefixtures("fresh_fp16_warning")
def test_fp16_weights_behind_diffusers_api_are_warned_about_with_gradients_on(caplog: pytest.LogCaptureFixture) -> None:
    # The adapter runs a pass that records gradients without run_guarded (whose fp32 rerun a graph could not
    # backpropagate through): it skipped the warning, though fp16 is as slow there.
    vae = perturbed_vae("tiny").half()
    z = torch.randn(1, 4, 4, 4, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = as_diffusers(vae).decode(z).sample
    assert out.requires_grad and len(_slow_fp16_warnings(caplog)) == 1


@pytest.mark.usefixtures("fresh_fp16_warning")
@pytest.mark.parametrize("kind", ["mps", "cuda", "xpu"])
def test_fp16_off_the_cpu_is_not_warned_about(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    # (Not a bug) fp16 is fast on GPUs, Apple's MPS included: only the CPU is warned about.
    with caplog.at_level(logging.WARNING, logger="klvae"):
        precision.warn_if_slow(torch.device(kind), torch.float16)
    assert _slow_fp16_warnings(caplog) == []


@pytest.mark.usefixtures("fresh_fp16_warning")
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
def test_fp32_and_bf16_on_the_cpu_are_not_warned_about(dtype: torch.dtype | None,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # The default (the weights' fp32) and "auto" (fp32 on the CPU) never pick fp16, and bf16 is fast there.
    vae = perturbed_vae("tiny")
    assert inference.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with caplog.at_level(logging.WARNING, logger="klvae"):
        inference.decode(vae, torch.randn(1, 4, 4, 4), dtype)
    assert _slow_fp16_warnings(caplog) == []


@pytest.fixture
def fresh_host_maps_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: the once-per-process warning about the maps a CPU budget does not bound not yet given."""
    monkeypatch.setattr(tiling, "_host_maps_warned", set(), raising=False)


def test_resident_map_bytes_are_the_maps_a_tiled_cpu_pass_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    # The figure the docs and the warning give: the most bytes of whole-image maps alive at once, however small
    # the budget (on the CPU they live in the memory the budget is meant to bound).
    vae = perturbed_vae("tiny")
    live, peak = [0], [0]
    real = Streamer.empty

    def counted(self: Streamer, shape: tuple[int, ...], *args: object) -> torch.Tensor:
        out = real(self, shape, *args)
        n = out.nbytes
        live[0] += n
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out, lambda: live.__setitem__(0, live[0] - n))
        return out

    monkeypatch.setattr(Streamer, "empty", counted)
    for op, t in (("decode", torch.randn(1, 4, 16, 16)), ("encode", torch.rand(1, 3, 32, 32) * 2 - 1)):
        live[0] = peak[0] = 0
        opts = TileOptions(max_memory=1)  # strips of one row: nothing but the maps is kept between them
        out = inference.decode(vae, t, tiling=opts) if op == "decode" else inference.encode_moments(vae, t, tiling=opts)
        assert out.shape[0] == 1 and peak[0] == tiling.resident_map_bytes(vae, op, (1, 3, 32, 32), torch.float32)


@pytest.mark.usefixtures("fresh_host_maps_warning")
def test_a_cpu_budget_below_the_maps_of_a_tiled_pass_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    # Off a GPU the budget sizes the strips, but a tiled pass still holds whole-image maps in that same memory (a
    # user saw +400 MB under 64 MiB): a budget below them must not look honoured. Once per process, not per batch.
    vae = perturbed_vae("tiny")
    z = torch.randn(1, 4, 8, 8)
    maps = 16 * 16 * (2 * 32 + 64) * 4  # the last level's input (64 wide), middle and output maps, fp32
    with caplog.at_level(logging.WARNING, logger="klvae"):
        inference.decode(vae, z, tiling=TileOptions(tile_size=4))  # no budget given: nothing to warn about
        inference.decode(vae, z, tiling=TileOptions(tile_size=4, max_memory=maps))  # the maps fit it
        assert caplog.records == []
        out = inference.decode(vae, z, tiling=TileOptions(max_memory=maps // 2))
        inference.decode(vae, z, tiling=TileOptions(tile_size=4, max_memory=maps // 2))
    torch.testing.assert_close(out, inference.decode(vae, z), atol=1e-4, rtol=0)  # behaviour as before
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "whole-image maps" in record.getMessage()
    assert f"{maps / 2**20:.2f} MiB" in record.getMessage()


def test_decode_leaves_infinite_pixels_for_the_caller_to_see(tmp_path: Path) -> None:
    from klvae import AutoencoderKL, inference

    vae = AutoencoderKL("tiny").eval()
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] = float("inf")  # a broken model: its red channel overflows
        out = inference.decode(vae, torch.zeros(1, vae.config.latent_channels, 2, 2), torch.float32)
        assert torch.isinf(out[:, 0]).all()
        vae.decoder.conv_out.bias[0] = 100.0  # finite but out of range: clamped as before
        out = inference.decode(vae, torch.zeros(1, vae.config.latent_channels, 2, 2), torch.float32)
    assert out.max() == 1 and torch.isfinite(out).all()
