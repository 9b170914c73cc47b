"""Pins bugs a hunt of `klvae encode | decode | reconstruct`, the latents files and image reading found:

- `reconstruct -o x.jpg` / `x.webp` prints the PSNR and SSIM of the 8-bit image before the lossy save, not of the
  file it writes (JPEG quality 75, lossy WebP): the scores describe a picture that is nowhere on disk.
- `reconstruct --json` of a perfect reconstruction prints `"psnr": Infinity`, which is not JSON (eval's summary.json
  writes null there).
- `encode --sample`: an image's sample depends on `--batch-size` (one generator drawn across the whole batch), so a
  speed option changes the latents.
- `encode --dtype fp16` on a GPU (weights cast to fp16) records fingerprints of the fp16-rounded weights, so a
  decode with the same model warns that the latents come from another model.
- A 16-bit greyscale PNG with a transparent colour (tRNS) loses its transparency: the pixels are reduced to 8 bits
  through a new image that has no `transparency`, so transparent pixels are not composited on white.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import perturbed_vae, rgb_image
from klvae.cli.main import main
from klvae.evaluation.metrics import psnr, ssim
from klvae.images import load_image, pil_to_tensor
from klvae.latents.comfy import load_comfy_latent
from klvae.latents.file import load_latents


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A perturbed tiny-f8 (SD's factor 8) saved as a diffusers folder."""
    d = tmp_path_factory.mktemp("model")
    perturbed_vae("tiny-f8").save_pretrained(d)
    return d


def _run_stdout(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(argv)
    return status, buf.getvalue()


@pytest.mark.parametrize("ext", [".jpg", ".webp"])
def test_reconstruct_to_a_lossy_format_prints_the_scores_of_the_file_it_writes(
        tmp_path: Path, model: Path, ext: str) -> None:
    # Was: the scores of the 8-bit image before JPEG (quality 75) / lossy WebP compression, e.g. PSNR 9.25 dB
    # printed for a written .jpg whose PSNR against the input is 9.41 dB.
    src = rgb_image(tmp_path / "a.png", 48, 40)
    out = tmp_path / f"r{ext}"
    status, text = _run_stdout(["-q", "reconstruct", str(src), "-o", str(out), "--model", str(model), "--json"])
    assert status == 0
    printed = json.loads(text)
    x, y = (pil_to_tensor(load_image(p))[None] for p in (src, out))
    assert printed["psnr"] == pytest.approx(psnr(x, y, data_range=2.0).item(), abs=1e-3)
    assert printed["ssim"] == pytest.approx(ssim(x, y, data_range=2.0).item(), abs=1e-4)


def test_reconstruct_json_of_a_perfect_reconstruction_is_valid_json(tmp_path: Path) -> None:
    # A decoder that saturates to white reconstructs a white image exactly: PSNR is infinite. Was: `"psnr":
    # Infinity`, which strict JSON readers (jq, JSON.parse) refuse; eval's summary.json writes null instead.
    vae = perturbed_vae("tiny-f8")
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.fill_(2.0)
    vae.save_pretrained(tmp_path / "white")
    src = tmp_path / "w.png"
    Image.new("RGB", (16, 16), (255, 255, 255)).save(src)
    status, text = _run_stdout(["-q", "reconstruct", str(src), "-o", str(tmp_path / "r.png"), "--json",
                                "--model", str(tmp_path / "white")])
    assert status == 0

    def refuse(constant: str) -> float:
        raise ValueError(f"not JSON: {constant}")

    d = json.loads(text, parse_constant=refuse)
    assert d["ssim"] == pytest.approx(1.0)


@pytest.mark.parametrize("suffix", [".safetensors", ".latent"])
def test_encode_sample_does_not_depend_on_batch_size(tmp_path: Path, model: Path, suffix: str) -> None:
    # Was: one generator drawn across each batch, so with --batch-size 1 and 3 the same image, seed and model gave
    # samples 0.5 apart (a 3x3 latent has 36 values, not a multiple of the 16 that torch's CPU normal_ draws in).
    for i in range(3):
        rgb_image(tmp_path / "in" / f"{i}.png", 24, 24, seed=i)
    latents = {}
    for bs in ("1", "3"):
        out = tmp_path / f"z{bs}{suffix}"
        assert main(["-q", "encode", str(tmp_path / "in"), "-o", str(out), "--model", str(model), "--sample",
                     "--seed", "7", "--batch-size", bs]) == 0
        if suffix == ".latent":
            latents[bs] = load_comfy_latent(out).samples
        else:
            lf = load_latents(out)
            latents[bs] = torch.stack([lf.latents[it.key] for it in lf.items])
    torch.testing.assert_close(latents["1"], latents["3"], atol=1e-4, rtol=1e-4)


def test_latents_encoded_with_fp16_weights_are_not_called_another_models(
        tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # On a GPU, --dtype fp16 stores the weights in fp16 (SpeedOptions.cast_weights), and encode fingerprints them
    # after that cast; the fingerprint rounds to bf16, which fp16-then-bf16 rounding misses for ~6 % of the values.
    # Was: decoding with the very model that encoded warned "these latents were encoded by another model".
    from klvae.cli import common
    from klvae.inference.speed import SpeedOptions

    img = rgb_image(tmp_path / "a.png", 16, 16)
    out = tmp_path / "z.safetensors"
    with monkeypatch.context() as m:
        m.setattr(common, "SpeedOptions", functools.partial(SpeedOptions, cast_weights=True))  # as on a GPU
        assert main(["-q", "encode", str(img), "-o", str(out), "--model", str(model), "--dtype", "fp16"]) == 0
    caplog.clear()
    assert main(["decode", str(out), "-o", str(tmp_path / "dec"), "--model", str(model)]) == 0
    assert not [r for r in caplog.records if "another model" in r.getMessage()], caplog.text


def _png(path: Path, pixels: np.ndarray, color_type: int, depth: int, trns: bytes) -> Path:
    """A PNG written chunk by chunk, with a tRNS chunk (Pillow cannot save 16-bit greyscale with one)."""
    a = np.asarray(pixels, dtype=">u2" if depth == 16 else np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in a)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = a.shape[:2]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
                     + chunk(b"tRNS", trns) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_a_16_bit_greyscale_png_with_a_transparent_colour_is_composited_on_white(tmp_path: Path) -> None:
    # The 8-bit twin (grey 100 transparent) reads as [0, 255, 255, 255]. Was: the 16-bit one read as [0, 4, 255, 4]:
    # to_rgb rebuilt the I;16 image as 8-bit L without its `transparency`, so the transparent grey stayed grey.
    eight = _png(tmp_path / "g8.png", np.array([[[0], [100], [255], [100]]]), 0, 8, struct.pack(">H", 100))
    assert np.asarray(load_image(eight))[0, :, 0].tolist() == [0, 255, 255, 255]
    sixteen = _png(tmp_path / "g16.png", np.array([[[0], [1000], [65535], [1000]]]), 0, 16, struct.pack(">H", 1000))
    assert Image.open(sixteen).info.get("transparency") == 1000  # Pillow reads the key; klvae must apply it
    assert np.asarray(load_image(sixteen))[0, :, 0].tolist() == [0, 255, 255, 255]
