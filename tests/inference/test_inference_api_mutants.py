"""Pins what a mutation audit of klvae.inference's api, precision, speed and tiling modules found untested: padding
of an image whose width alone is off the grid; image and latent checks for channels, emptiness, dtype, type and
the batch hint; a crop checked against each side of a non-square image, with both sides in the message; encode
passing its dtype and tiling on; device resolution (CUDA asked for without CUDA, meta, MPS, a GPU index past the
count, other backends, the one-line reason); "auto" dtype on CPU vs CUDA and the listed names; autocast for half
dtypes only; the dtype asked for winning over the weights'; fp32 asked of a bf16-stored model; the rerun warning's
dtype; optimize_for_inference's eval switch, fp16 weight cast, upsampler folding off, fused kernels, cuDNN switch,
compile calls and the fused-norm choice; wants_tiling with tiling off; estimate_bytes' exact formula; budgets'
split and default; an encoder/decoder without (post-)quant convs tiled; the budget log's sizes; _mib at 1 MiB."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F

import klvae
from helpers import perturbed_vae
from klvae import inference
from klvae.errors import ImageError, KlvaeError, LatentsError
from klvae.inference import fused_norm, precision, speed, tiling
from klvae.inference.speed import SpeedOptions, optimize_for_inference
from klvae.inference.tiling import TileOptions
from klvae.model.blocks import GroupNorm, Upsample

# ---------------------------------------------------------------- api


def test_an_image_off_the_grid_in_width_only_is_padded() -> None:
    vae = perturbed_vae("tiny")  # size multiple 2
    x = torch.rand(1, 3, 8, 7) * 2 - 1
    m = inference.encode_moments(vae, x)
    want = inference.encode_moments(vae, F.pad(x, (0, 1, 0, 0), mode="replicate"))
    assert m.shape == (1, 8, 4, 4)
    torch.testing.assert_close(m, want)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(1, 4, 8, 8), r"\(1, 4, 8, 8\) do not fit this model, which takes \[B, 3, H, W\]$"),
        (torch.zeros(0, 3, 8, 8), r"\(0, 3, 8, 8\) do not fit"),
        (torch.zeros(3, 8, 8), r"a single image needs a batch dimension"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), r"floating point in \[-1, 1\], got torch.uint8"),
        ([[0.0]], r"must be a torch.Tensor \[B, 3, H, W\] in \[-1, 1\], got list$"),
    ],
)
def test_images_that_do_not_fit_are_refused_with_the_reason(x: object, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        inference.encode_moments(perturbed_vae("tiny"), x)  # type: ignore[arg-type]


def test_a_matrix_gets_no_batch_dimension_hint() -> None:
    with pytest.raises(ImageError) as e:
        inference.encode_moments(perturbed_vae("tiny"), torch.zeros(8, 8))
    assert "batch dimension" not in str(e.value)


@pytest.mark.parametrize(
    ("z", "match"),
    [
        (torch.zeros(1, 3, 8, 8), r"\(1, 3, 8, 8\) do not fit this model, which takes \[B, 4, h, w\]"),
        (torch.zeros(1, 4, 0, 8), r"\(1, 4, 0, 8\) do not fit"),
        (torch.zeros(1, 4, 8, 8, dtype=torch.int32), r"latents must be floating point, got torch.int32"),
        ("latents", r"latents must be a torch.Tensor \[B, 4, h, w\], got str"),
    ],
)
def test_latents_that_do_not_fit_are_refused_with_the_reason(z: object, match: str) -> None:
    with pytest.raises(LatentsError, match=match):
        inference.decode(perturbed_vae("tiny"), z)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [(4, 17), (21, 3), (4, 0), (1, 2, 3)])
def test_a_crop_is_checked_against_each_side_of_a_non_square_image(size: tuple[int, ...]) -> None:
    vae = perturbed_vae("tiny")
    z = torch.randn(1, 4, 10, 8)  # decodes to 20x16
    with pytest.raises(KlvaeError, match=r"between 1 and the decoded 20x16, got"):
        inference.decode(vae, z, size=size)


def test_a_crop_may_take_a_whole_side() -> None:
    vae = perturbed_vae("tiny")
    z = torch.randn(1, 4, 10, 8)
    full = inference.decode(vae, z)
    torch.testing.assert_close(inference.decode(vae, z, size=(20, 16)), full, rtol=0, atol=0)
    torch.testing.assert_close(inference.decode(vae, z, size=(20, 1)), full[..., :1], rtol=0, atol=0)


def test_double_precision_images_and_latents_are_taken_in_the_models_dtype() -> None:
    # run_guarded hands the model its own dtype: a float64 tensor would meet fp32 weights in the first conv.
    vae = perturbed_vae("tiny-f8")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(inference.encode_moments(vae, x.double()), inference.encode_moments(vae, x))
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(inference.decode(vae, z.double()), inference.decode(vae, z))


def test_encode_passes_its_dtype_and_tiling_on(monkeypatch: pytest.MonkeyPatch) -> None:
    vae = perturbed_vae("tiny")
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    seen: list[tuple[torch.dtype, str]] = []
    real, real_tiled = precision.run_guarded, inference.api.tiled_encode_moments

    def spy(model: torch.nn.Module, fn: object, t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
        seen.append((dtype, what))
        return real(model, fn, t, dtype, what)  # type: ignore[arg-type]

    def tiled_spy(*args: object) -> torch.Tensor:
        seen.append((torch.float64, "tiled"))
        return real_tiled(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(inference.tiling, "run_guarded", spy)
    monkeypatch.setattr(inference.api, "tiled_encode_moments", tiled_spy)
    post = inference.encode(vae, x, torch.bfloat16, TileOptions(tile_size=4))
    assert seen == [(torch.bfloat16, "encode"), (torch.float64, "tiled")]
    assert post.mean.dtype == torch.float32


# ---------------------------------------------------------------- precision: devices and dtypes


def test_cuda_asked_for_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(KlvaeError, match=r"^--device 'cuda:0' asked for, but CUDA is not available here$"):
        inference.resolve_device("cuda:0", "--device")


def test_the_meta_device_is_refused() -> None:
    with pytest.raises(KlvaeError, match=r"^train\.device meta: the meta device holds no data"):
        inference.usable_device("meta", "train.device")


def test_mps_without_the_backend_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(KlvaeError, match=r"^device mps: Apple's MPS backend is not available here$"):
        inference.usable_device("mps")


def test_a_gpu_index_past_the_count_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert inference.usable_device("cuda:0") == torch.device("cuda:0")
    assert inference.usable_device("cuda") == torch.device("cuda")
    with pytest.raises(KlvaeError, match=r"^device cuda:1 is not available here: 1 GPU\(s\)$"):
        inference.usable_device("cuda:1")


def test_another_backend_that_cannot_hold_data_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("No XPU here. Build torch with XPU support.\nMore lines\nand more")

    monkeypatch.setattr(torch, "empty", fail)
    with pytest.raises(KlvaeError) as e:
        inference.usable_device("xpu", "--device")
    assert str(e.value) == "--device xpu is not available here: No XPU here"


def test_auto_dtype_is_bf16_on_a_bf16_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert inference.resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference.resolve_dtype("auto", torch.device("cuda")) == torch.float32


def test_an_unknown_dtype_lists_the_names() -> None:
    with pytest.raises(KlvaeError) as e:
        inference.resolve_dtype("fp8", torch.device("cpu"))
    assert str(e.value) == ("unknown dtype 'fp8'; use one of auto, bf16, bfloat16, float16, float32, fp16, fp32")


def test_autocast_is_for_half_dtypes_only() -> None:
    assert isinstance(precision.autocast(torch.device("cpu"), torch.float32), contextlib.nullcontext)
    with precision.autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_the_dtype_asked_for_wins_over_the_weights() -> None:
    vae = perturbed_vae("tiny")
    assert precision.compute_dtype(vae, torch.bfloat16) == torch.bfloat16
    assert precision.compute_dtype(vae, None) == torch.float32


def test_fp32_asked_of_a_bf16_model_computes_in_fp32_and_keeps_its_weights() -> None:
    vae = perturbed_vae("tiny").to(torch.bfloat16)
    ref = perturbed_vae("tiny").to(torch.bfloat16).float()  # the same rounded weights, in fp32
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    got = inference.encode_moments(vae, x, torch.float32)
    torch.testing.assert_close(got, inference.encode_moments(ref, x), rtol=1e-5, atol=1e-5)
    assert next(vae.parameters()).dtype == torch.bfloat16


def test_the_rerun_warning_names_the_dtype_that_overflowed(caplog: pytest.LogCaptureFixture) -> None:
    vae = perturbed_vae("tiny")
    calls: list[torch.dtype] = []

    def fn(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        calls.append(dt)
        return t * float("inf") if dt == torch.bfloat16 else t

    x = torch.ones(2)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = precision.run_guarded(vae, fn, x, torch.bfloat16, "decode")
    assert calls == [torch.bfloat16, torch.float32] and torch.equal(out, x)
    assert [r.getMessage() for r in caplog.records] == [
        "decode produced non-finite values in bfloat16; rerunning this step in fp32 (said once; later reruns of "
        "this kind are logged at debug level)"
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="klvae"):
        precision.run_guarded(vae, fn, x, torch.bfloat16, "decode")
        precision.run_guarded(vae, fn, x, torch.bfloat16, "encode")  # another kind: said once too
    assert [(r.levelno, r.getMessage()[:6]) for r in caplog.records if "rerunning" in r.getMessage()] == [
        (logging.DEBUG, "decode"), (logging.WARNING, "encode")]


# ---------------------------------------------------------------- speed levers


def test_optimize_switches_to_eval_and_casts_fp16_weights_when_asked() -> None:
    vae = perturbed_vae("tiny").train()
    optimize_for_inference(vae, torch.float16, SpeedOptions(cast_weights=True))
    assert not vae.training and not any(m.training for m in vae.modules())
    assert {p.dtype for p in vae.parameters()} == {torch.float16}


def test_cpu_defaults_are_channels_last_and_leave_weights_and_cudnn_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    vae = perturbed_vae("tiny")
    optimize_for_inference(vae, torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
    assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # oneDNN's own layout
    assert torch.backends.cudnn.benchmark is False
    nchw = optimize_for_inference(perturbed_vae("tiny"), torch.float32, SpeedOptions(channels_last=False))
    assert nchw.encoder.conv_in.weight.is_contiguous()
    with torch.device("meta"):  # other backends keep NCHW unless asked
        other = optimize_for_inference(klvae.AutoencoderKL("tiny"), torch.float32)
    assert other.encoder.conv_in.weight.is_contiguous()
    assert all(m.kernel is None for m in vae.modules() if isinstance(m, GroupNorm))
    optimize_for_inference(vae, torch.float32, SpeedOptions(cudnn_benchmark=True, channels_last=True))
    assert torch.backends.cudnn.benchmark is True
    assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_norm_asked_for_sets_the_kernels_and_fold_can_be_turned_off() -> None:
    vae = perturbed_vae("tiny")
    optimize_for_inference(vae, torch.float32, SpeedOptions(fused_norm=True, fold_upsample=False))
    norms = [m for m in vae.modules() if isinstance(m, GroupNorm)]
    assert norms and all(m.kernel is fused_norm.group_norm_act for m in norms)
    assert not any(m.fold for m in vae.modules() if isinstance(m, Upsample))


def test_fused_norm_without_triton_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_norm, "available", lambda: False)
    with pytest.raises(KlvaeError, match=r"^fused GroupNorm kernels need Triton: pip install triton$"):
        optimize_for_inference(perturbed_vae("tiny"), torch.float32, SpeedOptions(fused_norm=True))


def test_fused_norm_default_is_on_for_cuda_unless_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_norm, "available", lambda: True)
    assert speed._fused_norm(SpeedOptions(), cuda=True)
    assert not speed._fused_norm(SpeedOptions(compile=True), cuda=True)
    assert not speed._fused_norm(SpeedOptions(), cuda=False)
    assert speed._on(None, True) and not speed._on(None, False) and not speed._on(False, True)


def test_compile_compiles_encoder_and_decoder_in_the_mode_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, object]]] = []

    def fake_compile(self: torch.nn.Module, **kwargs: object) -> None:
        calls.append((type(self).__name__, kwargs))

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    optimize_for_inference(
        perturbed_vae("tiny"), torch.float32, SpeedOptions(compile=True, compile_mode="max-autotune")
    )
    want = {"mode": "max-autotune", "dynamic": False}
    assert calls == [("Encoder", want), ("Decoder", want)]


# ---------------------------------------------------------------- tiling


def test_tiling_turned_off_is_not_wanted_whatever_the_strip_height() -> None:
    assert not TileOptions(enabled=False, tile_size=8).wants_tiling()
    assert TileOptions(tile_size=8).wants_tiling() and TileOptions(enabled=True).wants_tiling()
    assert not TileOptions(max_memory=8).wants_tiling()


def test_estimate_bytes_follows_its_formula() -> None:
    vae = perturbed_vae("tiny", decoder_block_out_channels=(16, 48))
    n = sum(p.numel() for p in vae.parameters())
    enc_w, dec_w = vae.config.block_out_channels[0], vae.config.decoder_widths[0]
    assert enc_w != dec_w
    assert tiling.estimate_bytes(vae, "encode", (2, 3, 12, 10), torch.bfloat16) == int(
        n * 2 + 2 * 120 * enc_w * 2 * 7.0
    )
    assert tiling.estimate_bytes(vae, "decode", (3, 3, 12, 10), torch.float32) == int(
        n * 4 + 3 * 120 * dec_w * 4 * 10.0
    )


def test_resident_map_bytes_count_the_batch_and_widths() -> None:
    vae = perturbed_vae("tiny", decoder_block_out_channels=(16, 48))
    w = vae.config.decoder_widths
    assert tiling.resident_map_bytes(vae, "encode", (2, 3, 4, 5), torch.float32) == 2 * 20 * 3 * 32 * 4
    assert tiling.resident_map_bytes(vae, "decode", (2, 3, 4, 5), torch.float32) == 2 * 20 * (2 * w[0] + w[1]) * 4
    # Four levels: the last (full-resolution) one reads the upsampled map of the level before it, not the deepest.
    deep = perturbed_vae("tiny-f8", decoder_block_out_channels=(16, 24, 40, 56))
    assert tiling.resident_map_bytes(deep, "decode", (1, 3, 8, 8), torch.bfloat16) == 64 * (2 * 16 + 24) * 2


def test_budgets_split_the_memory_and_default_to_two_gib() -> None:
    assert tiling.budgets(TileOptions(max_memory=800), 100) == (200, 400)
    assert tiling.budgets(TileOptions(max_memory=800), 900) == (200, 0)
    assert tiling.budgets(TileOptions()) == (2**29, 5 * 2**28)


def test_a_model_without_quant_convs_tiles_as_it_runs_untiled() -> None:
    vae = perturbed_vae("tiny", use_quant_conv=False, use_post_quant_conv=False)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    opts = TileOptions(tile_size=4)
    m = inference.encode_moments(vae, x)
    torch.testing.assert_close(inference.encode_moments(vae, x, tiling=opts), m, rtol=1e-4, atol=1e-4)
    z = m[:, :4]
    torch.testing.assert_close(inference.decode(vae, z, tiling=opts), inference.decode(vae, z), rtol=1e-4, atol=1e-4)


def test_the_budget_log_names_the_output_size(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tiling, "_host_maps_warned", {"cpu"})
    vae = perturbed_vae("tiny")
    with caplog.at_level(logging.INFO, logger="klvae"):
        inference.decode(vae, torch.randn(1, 4, 6, 4), tiling=TileOptions(max_memory=2**20))
        inference.encode_moments(vae, torch.zeros(1, 3, 6, 4), tiling=TileOptions(max_memory=2**20))
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "decode of 12x8 exceeds the 1 MiB memory budget: tiling",
        "encode of 6x4 exceeds the 1 MiB memory budget: tiling",
    ]


def test_mib_formats_at_one_mib() -> None:
    assert tiling._mib(2**20) == "1 MiB"
    assert tiling._mib(2**20 - 2**10) == "1.00 MiB"
    assert tiling._mib(5243) == "0.01 MiB" and tiling._mib(5242) == "5,242 bytes"


def test_the_host_maps_warning_comes_for_a_strip_height_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tiling, "_host_maps_warned", set())
    with caplog.at_level(logging.WARNING, logger="klvae"):
        inference.decode(
            perturbed_vae("tiny"), torch.randn(1, 4, 8, 8), tiling=TileOptions(tile_size=4, max_memory=1024)
        )
    (record,) = caplog.records
    assert "whole-image maps that a tiled decode holds" in record.getMessage()


def test_the_host_maps_warning_is_not_for_a_gpu(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiling, "_host_maps_warned", set())
    vae = perturbed_vae("tiny")
    monkeypatch.setattr(type(vae), "device", property(lambda self: torch.device("cuda")))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        tiling.warn_host_maps(vae, "decode", (1, 3, 64, 64), torch.float32, TileOptions(max_memory=1))
    assert caplog.records == [] and tiling._host_maps_warned == set()
    assert klvae.AutoencoderKL is type(vae)
