"""Bugs found hunting ComfyUI `.latent` files and plain latents files (encode -o x.latent, decode of plain tensors).

- `encode -o x.latent` sizes its one batch from the images' headers and skips an image that loads at another size;
  a PNG whose EXIF rotation follows its pixels (legal, and handled by `-o x.safetensors`) loads turned, so it is
  dropped: a single such image ends in "the only image could not be read".
- a plain torch file holding a sparse tensor whose indices lie outside its shape is densified unchecked: COO kills
  the process with SIGSEGV, CSR ends in an internal error, instead of one `klvae: error:` line.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import saved_tiny_model
from klvae import inference
from klvae.cli.main import main
from klvae.images import load_image, pil_to_tensor
from klvae.latents.comfy import load_comfy_latent

CPU = ["--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset: one latent cell is 2x2 pixels."""
    return saved_tiny_model(tmp_path_factory.mktemp("tiny"))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def late_exif_png(path: Path, h: int, w: int, orientation: int = 6) -> Path:
    """A PNG stored h x w whose eXIf chunk (orientation 6: a quarter turn) comes after its IDAT, before IEND."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    png, iend = buf.getvalue(), _chunk(b"IEND", b"")
    assert png.endswith(iend)
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes().removeprefix(b"Exif\x00\x00")
    path.write_bytes(png[: -len(iend)] + _chunk(b"eXIf", raw) + iend)
    return path


def test_encode_to_latent_takes_a_png_whose_exif_rotation_follows_its_pixels(tmp_path: Path, tiny_dir: Path) -> None:
    # Now: "skipping late.png: it loaded as 16x12, not the size its header gave" and "the only image could not be
    # read" (exit 2), while `-o x.safetensors` encodes the same image.
    img = late_exif_png(tmp_path / "late.png", 12, 16)
    loaded = pil_to_tensor(load_image(img))
    assert tuple(loaded.shape[-2:]) == (16, 12)  # turned on load, as ComfyUI's LoadImage turns it (exif_transpose)
    out = tmp_path / "x.latent"
    assert main(["encode", str(img), "-o", str(out), "--model", str(tiny_dir), *CPU]) == 0
    samples = load_comfy_latent(out).samples
    vae = klvae.AutoencoderKL.from_pretrained(tiny_dir).eval()
    want = inference.encode(vae, loaded[None]).mode()
    assert samples.shape == want.shape
    torch.testing.assert_close(samples, want, rtol=1e-4, atol=1e-4)


_BAD_SPARSE = {
    # an index of 10**12 (COO) or 100000 (CSR) in a side of 4 or 5: densifying it writes far outside the dense tensor
    "coo": "torch.sparse_coo_tensor(torch.tensor([[0], [0], [10**12], [0]]), torch.tensor([1.0]), (1, 4, 4, 5), "
           "check_invariants=False)",
    "csr": "torch.sparse_csr_tensor(torch.tensor([0, 1, 2, 3, 9]), torch.tensor([0, 1, 100000, 2]), "
           "torch.tensor([1.0, 2.0, 3.0, 4.0]), (4, 5), check_invariants=False)",
}


@pytest.mark.parametrize("layout", sorted(_BAD_SPARSE))
def test_a_plain_file_of_a_sparse_tensor_with_indices_outside_its_shape_is_one_error_line(
        tmp_path: Path, tiny_dir: Path, layout: str) -> None:
    # Now: COO kills the process with SIGSEGV (return code -11); CSR prints "klvae: internal error: IndexError".
    path = tmp_path / "z.pt"
    code = ("import warnings, torch; warnings.simplefilter('ignore')\n"
            f"torch.save({_BAD_SPARSE[layout]}, {str(path)!r})\n"
            "from klvae.cli.main import main\n"
            f"raise SystemExit(main(['decode', {str(path)!r}, '-o', {str(tmp_path / 'out')!r}, '--unscaled', "
            f"'--model', {str(tiny_dir)!r}, '--device', 'cpu']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("klvae")]
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert lines and lines[-1].startswith("klvae: error: ") and str(path) in lines[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_reads_a_late_exif_rotation_without_decoding(tmp_path: Path, orientation: int) -> None:
    # The fix: image_size walks the PNG's chunk headers to the eXIf after the pixels (a planner's size, e.g. the
    # cache's buckets, was the stored one for such a PNG).
    from klvae.images import image_size

    img = late_exif_png(tmp_path / "late.png", 12, 16, orientation)
    assert image_size(img) == tuple(pil_to_tensor(load_image(img)).shape[-2:])
    assert image_size(img) == ((16, 12) if orientation >= 5 else (12, 16))
