"""Pins bugs a hunt of precision and the NaN guard (half-precision passes rerun in fp32) found:

- the fp32 rerun of an overflowing half-precision pass ignores the memory budget: tiling was decided for the half
  pass's estimate, and the rerun, which needs twice the memory, still runs untiled over a `max_memory` it exceeds
  (on a GPU the budget is the documented bound on GPU memory);
- a model whose halves are stored in different dtypes (a bf16/fp16 decoder beside an fp32 encoder, or the other
  way round) fails inference.decode untiled with torch's "Input type (float) and bias type (c10::BFloat16)"
  RuntimeError, even with fp32 asked for, while the same call tiled works: the pass's dtype is taken from the
  model's first parameter (the encoder's), not from the part that runs;
- `klvae encode` (decode, cache, eval alike) with a model that overflows in fp16 logs the same "rerunning this step
  in fp32" warning for every batch: a flood of identical lines through the progress bar, where klvae's other
  precision warnings come once per process;
- `klvae noise` never checks what the decoder gives back: a model whose pixels are inf/NaN (in fp32 too, so after the
  rerun) writes a mostly white sheet and exits 0, where encode, decode and reconstruct stop with one error line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

import klvae
from helpers import counting_tiled_calls, noise_folder, one_error_line, perturbed_vae, rgb_image
from klvae import inference
from klvae.cli.main import main
from klvae.inference import TileOptions, tiling


def _overflowing_decoder_vae() -> klvae.AutoencoderKL:
    vae = perturbed_vae("tiny")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)  # activations past fp16's 65504 (finite in fp32)
    return vae


def _latents(seed: int = 0) -> Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- the fp32 rerun and the memory budget -------------------------------------------------------------------------

def test_the_fp32_rerun_of_an_overflow_tiles_when_its_untiled_pass_exceeds_the_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Now: the fp16 pass fits the budget untiled, overflows, and its fp32 rerun (estimated at twice the budget's
    # half) runs untiled too: no tiled pass at all, the budget exceeded.
    vae, z = _overflowing_decoder_vae(), _latents()
    shape = (1, 3, 16, 16)
    half = tiling.estimate_bytes(vae, "decode", shape, torch.float16)
    full = tiling.estimate_bytes(vae, "decode", shape, torch.float32)
    budget = (half + full) // 2  # the fp16 pass fits untiled, the fp32 one does not
    reference = inference.decode(vae, z, torch.float32)
    calls = counting_tiled_calls(monkeypatch)
    out = inference.decode(vae, z, torch.float16, tiling=TileOptions(max_memory=budget))
    assert torch.isfinite(out).all()
    assert calls["decode"] >= 1  # the rerun in fp32 went tiled, as a plain fp32 call with this budget does
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)


# ---- a model whose encoder and decoder are stored in different dtypes ------------------------------------------

@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_decoder_beside_an_fp32_encoder_decodes_untiled_as_it_does_tiled(half: torch.dtype) -> None:
    # Now: RuntimeError "Input type (float) and bias type (c10::BFloat16) should be the same" untiled (fp32 asked
    # for or not), while tiling=TileOptions(tile_size=4) decodes the same latents.
    vae, z = perturbed_vae("tiny"), _latents()
    vae.decoder.to(half)
    vae.post_quant_conv.to(half)
    rounded = perturbed_vae("tiny")  # the same weights, the decoder's rounded to `half`, all in fp32
    rounded.decoder.to(half).float()
    rounded.post_quant_conv.to(half).float()
    reference = inference.decode(rounded, z, torch.float32)
    tiled = inference.decode(vae, z, torch.float32, tiling=TileOptions(tile_size=4))
    torch.testing.assert_close(tiled, reference, atol=1e-4, rtol=0)
    asked = inference.decode(vae, z, torch.float32)
    torch.testing.assert_close(asked, reference, atol=1e-4, rtol=0)
    default = inference.decode(vae, z)  # the decoder's own precision, as the tiled path computes
    assert (default - reference).abs().max().item() < 0.1
    assert vae.decoder.conv_in.weight.dtype == half and vae.encoder.conv_in.weight.dtype == torch.float32


def test_a_half_encoder_beside_an_fp32_decoder_decodes_untiled() -> None:
    # Now: RuntimeError "Input type (c10::Half) and bias type (float) should be the same": the latents are cast to
    # the encoder's fp16 and fed to the fp32 decoder.
    vae, z = perturbed_vae("tiny"), _latents()
    reference = inference.decode(vae, z, torch.float32)
    vae.encoder.half()
    vae.quant_conv.half()
    out = inference.decode(vae, z)
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max().item() < 1e-2


# ---- one rerun warning, not one per batch --------------------------------------------------------------------------

def test_encode_in_fp16_warns_about_the_fp32_rerun_once_not_per_batch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Now: "encode produced non-finite values in float16; rerunning this step in fp32" once per batch (three here;
    # thousands for a folder), interleaved with the progress bar, where the fp16-on-the-CPU and host-maps warnings
    # of the same module come once per process.
    vae = perturbed_vae("tiny")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e5)
    model = vae.save_pretrained(tmp_path / "model")
    images = noise_folder(tmp_path / "images", 3, hw=(16, 16))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main(["-q", "encode", str(images), "-o", str(tmp_path / "z.safetensors"), "--model", str(model),
                     "--dtype", "fp16", "--device", "cpu", "--batch-size", "1"]) == 0
    reruns = [r for r in caplog.records if "rerunning this step in fp32" in r.getMessage()]
    # At most one (none when an earlier call in this process already said it, should the fix warn once per process).
    assert len(reruns) <= 1, [r.getMessage() for r in reruns]


# ---- klvae noise and a decoder that yields non-finite pixels ------------------------------------------------------

def test_noise_with_a_decoder_that_yields_non_finite_pixels_is_an_error_not_a_picture(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Now: exit 0, "wrote s.png": the inf/NaN pixels (after the fp32 rerun too) are clamped into a mostly white
    # sheet, where encode, decode and reconstruct stop with "the model produced non-finite pixels" and write nothing.
    vae = klvae.AutoencoderKL("tiny-f8")
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.fill_(3e38)  # finite weights (a file's must be) whose sums overflow float32
    model = vae.save_pretrained(tmp_path / "model")
    img = rgb_image(tmp_path / "a.png")
    out = tmp_path / "s.png"
    code = main(["-q", "noise", str(img), "-o", str(out), "--model", str(model), "--device", "cpu",
                 "--steps", "0", "500"])
    assert code == 2
    assert "non-finite" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_dtype_asked_of_an_fp64_model_is_refused(half: torch.dtype) -> None:
    """inference.decode(fp64 model, dtype=bf16) computed in fp64 (autocast leaves fp64 alone) without a word."""
    vae = perturbed_vae("tiny").double()
    z = torch.randn(1, vae.config.latent_channels, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64, which autocast does not lower"):
        inference.decode(vae, z, dtype=half)
    assert inference.decode(vae, z, dtype=torch.float32).dtype == torch.float32
