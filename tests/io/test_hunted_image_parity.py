"""Pins bugs a hunt of image pre- and post-processing parity (files -> [-1, 1] tensors -> PNGs) found:

- `pil_to_tensor` of a palette image whose palette carries alpha (what Pillow's `RGBA.convert("P")` and
  `quantize()` give) keeps the transparent pixels' stored colour: they are not composited on white, as the same
  image saved as a PNG and read back with `load_image` is ("non-RGB modes are converted as load_image does").
- A PNG whose EXIF orientation sits in ImageMagick's "Raw profile type exif" text chunk is turned by `load_image`
  (Pillow reads that chunk) but not by `image_size`, which looks for an eXIf chunk only: `klvae encode x.png -o
  x.latent` then skips the image ("it loaded as 24x8, not the size its header gave") and fails.
- A 2- or 4-bit greyscale PNG with a transparent grey (tRNS) keeps that grey: Pillow scales the pixels to 8 bits
  but keeps the raw key, so no pixel matches it and nothing is composited on white.

And pins what was checked and found right: the 8-bit <-> [-1, 1] arithmetic equals diffusers' VaeImageProcessor
bit for bit (0.0 -> 127.5 -> 128, as numpy's round-half-even), and alpha is composited on white exactly.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, PngImagePlugin

from helpers import perturbed_vae
from klvae.cli.main import main
from klvae.images import image_size, load_image, open_image_bytes, pil_to_tensor, tensor_to_uint8, to_rgb
from klvae.latents.comfy import load_comfy_latent


def _png(row: bytes, width: int, depth: int, trns: int) -> bytes:
    """A one-row greyscale PNG of `depth` bits written chunk by chunk (Pillow cannot save 2- or 4-bit grey), with
    a tRNS transparent grey `trns` (a raw sample value)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, depth, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", trns)) + chunk(b"IDAT", zlib.compress(b"\x00" + row))
            + chunk(b"IEND", b""))


def test_pil_to_tensor_of_a_palette_image_with_alpha_composites_it_on_white() -> None:
    """pil_to_tensor(rgba.convert("P")) shows transparent pixels in their hidden colour, not white."""
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[0, :, 3] = 255  # top row opaque blue, bottom row fully transparent (blue underneath)
    pal = Image.fromarray(rgba, "RGBA").convert("P")
    assert pal.mode == "P" and np.asarray(pal.convert("RGBA"))[1, 0, 3] == 0  # Pillow keeps the alpha
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    from_file = np.asarray(open_image_bytes(buf.getvalue(), "p.png"))
    assert from_file[1].tolist() == [[255, 255, 255]] * 2  # the file path composites on white
    assert np.asarray(to_rgb(pal)).tolist() == from_file.tolist()
    assert pil_to_tensor(pal)[:, 1].eq(1).all()  # was: [-1, -1, 1], the hidden blue


def _raw_profile_png(path: Path, orientation: int) -> Path:
    """A 24x8 PNG whose EXIF (its orientation) is kept as ImageMagick 6 keeps it: a "Raw profile type exif"
    zTXt chunk before the pixels, in hex, not an eXIf chunk."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes()
    hexed = raw.hex()
    text = f"\nexif\n{len(raw):8d}\n" + "\n".join(hexed[i:i + 72] for i in range(0, len(hexed), 72)) + "\n"
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", text, zip=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 24, 3), dtype=np.uint8)).save(path, pnginfo=info)
    return path


def test_a_png_turned_by_a_raw_profile_exif_encodes_to_a_comfyui_latent(tmp_path: Path) -> None:
    """`klvae encode x.png -o x.latent` fails when the PNG's orientation is in ImageMagick's raw EXIF profile."""
    src = _raw_profile_png(tmp_path / "turned.png", 6)
    h, w = np.asarray(load_image(src)).shape[:2]
    assert (h, w) == (24, 8)  # load_image turns it (Pillow reads the raw profile)
    assert image_size(src) == (h, w)  # was: (8, 24), the stored size
    model = tmp_path / "vae"
    perturbed_vae("tiny-f8").save_pretrained(model)
    out = tmp_path / "z.latent"
    assert main(["-q", "encode", str(src), "-o", str(out), "--model", str(model), "--device", "cpu"]) == 0
    assert tuple(load_comfy_latent(out).samples.shape[-2:]) == (3, 1)


@pytest.mark.parametrize(("depth", "row", "expected"), [
    (2, bytes([0b00_01_10_11]), [0, 255, 170, 255]),  # samples 0 1 2 3 (0, 85, 170, 255); 1 is transparent
    (4, bytes([0x01, 0x2F]), [0, 255, 34, 255]),  # samples 0 1 2 15 (0, 17, 34, 255); 1 is transparent
], ids=["2-bit", "4-bit"])
def test_a_low_bit_greyscale_png_with_a_transparent_grey_is_composited_on_white(
        depth: int, row: bytes, expected: list[int]) -> None:
    """A 2- or 4-bit grey PNG's transparent grey stays grey instead of becoming white."""
    data = _png(row, 4, depth, trns=1)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 1  # Pillow's key is the raw sample
    assert np.asarray(open_image_bytes(data, "g.png"))[0, :, 0].tolist() == expected


# -- pinned: what was checked and found right ---------------------------------------------------------------------

def test_8_bit_pixels_to_tensors_and_back_equal_diffusers_vae_image_processor() -> None:
    """pil_to_tensor / tensor_to_uint8 must equal diffusers' preprocess / postprocess bit for bit."""
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    img = Image.fromarray(np.ascontiguousarray(skimage.data.astronaut()[:64:2, :48:2]))  # a 24x32 photo
    assert torch.equal(pil_to_tensor(img)[None], proc.preprocess(img))
    # Decoded values around every rounding boundary (k + 0.5) / 127.5 - 1, within 40 float32 steps, and beyond
    # [-1, 1]: the two roundings must agree on every one (0.0 -> 127.5 -> 128, half to even).
    edges = (torch.arange(-1, 257, dtype=torch.float32) + 0.5) / 127.5 - 1
    steps = [edges]
    for direction in (2.0, -2.0):
        v = edges
        for _ in range(40):
            v = torch.nextafter(v, torch.full_like(v, direction))
            steps.append(v)
    values = torch.cat([*steps, torch.linspace(-1.5, 1.5, 6001), torch.tensor([0.0, -0.0, 1.0, -1.0])])
    side = int(np.ceil(values.numel() ** 0.5))
    grid = torch.cat([values, torch.zeros(side * side - values.numel())]).view(1, 1, side, side).expand(1, 3, -1, -1)
    theirs = np.asarray(proc.postprocess(grid.contiguous(), output_type="pil")[0])
    assert np.array_equal(tensor_to_uint8(grid[0]), theirs)
    assert tensor_to_uint8(torch.zeros(3, 1, 1)).ravel().tolist() == [128, 128, 128]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white_exactly(mode: str) -> None:
    """Every (value, alpha) pair composites to round(v * a / 255 + 255 * (255 - a) / 255), as documented."""
    v, a = np.meshgrid(np.arange(256), np.arange(256))
    bands = [v, v, v, a] if mode == "RGBA" else [v, a]
    out = np.asarray(to_rgb(Image.fromarray(np.stack(bands, -1).astype(np.uint8), mode)))[..., 0].astype(int)
    assert np.array_equal(out, np.rint((a * v + (255 - a) * 255) / 255).astype(int))
