"""FLUX.2 through `klvae encode` and `klvae decode`: patched latents stored as the library scales them, pictures
as the library decodes them, and an image whose latent grid is odd padded to whole 2x2 patches and cropped back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klvae import AutoencoderKL, inference
from klvae.cli.main import main
from klvae.images import load_image, pil_to_tensor
from klvae.latents.file import load_latents
from oracles import PATCHED, SMALL, klvae_flux2


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("flux2-model")
    klvae_flux2().save_pretrained(d)
    return d


def _png(path: Path, h: int, w: int) -> Path:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    noisy = smooth + rng.normal(0, 20, smooth.shape)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_cli_encode_decode_round_trip_with_patched_latents(tmp_path: Path, flux2_dir: Path) -> None:
    png = _png(tmp_path / "pic.png", 64, 64)
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(png), "-o", str(out), "--model", str(flux2_dir)]) == 0
    lf = load_latents(out)
    (item,) = lf.items
    f = SMALL.downsample_factor
    assert lf.latents[item.key].shape == (PATCHED, 64 // f // 2, 64 // f // 2)
    assert (item.height, item.width) == (64, 64)
    assert lf.norm.latent_patch_size == 2
    vae = AutoencoderKL.from_pretrained(flux2_dir)
    x = pil_to_tensor(load_image(png))[None]
    expected = vae.scale_latents(inference.encode(vae, x).mode())[0]
    torch.testing.assert_close(lf.latents[item.key], expected, atol=1e-5, rtol=1e-5)

    dec = tmp_path / "dec"
    assert main(["decode", str(out), "-o", str(dec), "--model", str(flux2_dir)]) == 0
    (decoded,) = list(dec.iterdir())
    got = np.asarray(Image.open(decoded).convert("RGB"), dtype=np.float64)
    assert got.shape == (64, 64, 3)
    with torch.no_grad():
        ref = inference.decode(vae, vae.unscale_latents(expected[None]), size=(64, 64))[0]
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.abs(got - ref_u8).max() <= 1.5  # PNG quantisation only


def test_cli_encode_of_a_size_whose_latent_grid_is_odd(tmp_path: Path, flux2_dir: Path) -> None:
    """A 40x56 image would be 5x7 latent cells for a factor-8 encoder, which no 2x2 patches cover: encode pads it
    to a multiple of 16 (48x64: 3x4 patches) and decode crops back to 40x56."""
    png = _png(tmp_path / "odd.png", 40, 56)
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(png), "-o", str(out), "--model", str(flux2_dir)]) == 0
    lf = load_latents(out)
    (item,) = lf.items
    c, h, w = lf.latents[item.key].shape
    assert c == PATCHED and (h, w) == (3, 4)
    dec = tmp_path / "dec"
    assert main(["decode", str(out), "-o", str(dec), "--model", str(flux2_dir)]) == 0
    (decoded,) = list(dec.iterdir())
    assert Image.open(decoded).size == (56, 40)
