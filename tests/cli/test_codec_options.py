"""Follow-ups on encode/decode/reconstruct/info, the tiling options and the image metrics: tile sizes, the weights'
stored dtype in `info`, the metrics' value range, and a newcomer's odd inputs."""

import copy
import json
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import noise_png, one_error_line, perturbed_vae, saved_tiny_model
from klvae import inference
from klvae.cli import common
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.evaluation import metrics, psnr, ssim
from klvae.inference import TileOptions, tiling
from klvae.weights.save import export_ldm

# ---- 1. tile sizes: strip heights in image rows, exact at any height from 1 ----


@pytest.mark.parametrize("tile", [7, 100])
def test_every_tile_size_from_one_gives_the_untiled_result(tile: int) -> None:
    # 7 is no multiple of the factor 8 and below it, 100 above the image: each conv reads its strip's neighbour
    # rows and GroupNorm uses whole-map statistics, so no height is wrong (test_inference tries 1, 5, 8 and 16).
    vae = perturbed_vae("tiny-f8")
    x = torch.rand(1, 3, 37, 53) * 2 - 1
    m = inference.encode_moments(vae, x)
    assert (inference.encode_moments(vae, x, tiling=TileOptions(tile_size=tile)) - m).abs().max() < 1e-4
    z = m[:, :4]
    d = inference.decode(vae, z, size=(37, 53))
    assert (inference.decode(vae, z, size=(37, 53), tiling=TileOptions(tile_size=tile)) - d).abs().max() < 1e-4


def test_tile_options_take_numpy_integers_and_refuse_what_is_no_whole_number() -> None:
    opts = TileOptions(tile_size=np.int64(64), max_memory=np.uint32(2**20))  # e.g. a size computed with numpy
    assert (opts.tile_size, opts.max_memory) == (64, 2**20) and type(opts.tile_size) is int
    for bad in (0, -8, 8.0, "8", True, np.bool_(True), np.float64(8.0), torch.tensor(8)):
        with pytest.raises(KlvaeError, match=r"^TileOptions.tile_size must be a whole number of at least 1"):
            TileOptions(tile_size=bad)


@pytest.mark.parametrize(("text", "size"), [("1T", 2**40), ("2TiB", 2**41), ("0.5tb", 2**39)])
def test_memory_sizes_take_terabytes(text: str, size: int) -> None:
    assert common.parse_bytes(text) == size  # a budget written as on a large host's spec sheet


def test_a_budget_of_a_few_bytes_is_shown_in_bytes_not_as_zero_mib(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tiling, "_host_maps_warned", set())  # as in a new process
    with caplog.at_level(logging.WARNING, logger="klvae"):
        inference.decode(perturbed_vae("tiny"), torch.randn(1, 4, 8, 8), tiling=TileOptions(max_memory=1024))
    (record,) = caplog.records
    assert "over the 1,024 bytes budget" in record.getMessage() and "0.00 MiB" not in record.getMessage()


# ---- 2. info names the dtype the weights are stored in ----


def _info(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["-q", "info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _full_checkpoint(vae: torch.nn.Module, path: Path, tmp_path: Path) -> Path:
    """A full SD checkpoint: the VAE in fp16 under first_stage_model., beside a UNet tensor in fp32."""
    export_ldm(copy.deepcopy(vae).half(), tmp_path / "vae_ldm.safetensors")
    sd = {f"first_stage_model.{k}": v for k, v in load_file(tmp_path / "vae_ldm.safetensors").items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    save_file(sd, path)
    return path


def test_info_names_the_stored_dtype_of_every_weights_format(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    vae = perturbed_vae("tiny")
    copy.deepcopy(vae).half().save_pretrained(tmp_path / "fp16")  # a diffusers folder saved in fp16
    copy.deepcopy(vae).save_pretrained(tmp_path / "bin", safe_serialization=False)
    export_ldm(copy.deepcopy(vae).to(torch.bfloat16), tmp_path / "bf16.safetensors")
    torch.save({"state_dict": {k: v.half() for k, v in vae.state_dict().items()}}, tmp_path / "fp16.ckpt")
    full = _full_checkpoint(vae, tmp_path / "sd.safetensors", tmp_path)
    cases = [(tmp_path / "fp16", "fp16"), (tmp_path / "bin", "fp32"), (tmp_path / "bf16.safetensors", "bf16"),
             (tmp_path / "fp16.ckpt", "fp16"), (full, "fp16")]  # full: the VAE's dtype, not the UNet's
    for model, want in cases:
        d = _info(capsys, "--model", str(model), "--config", "tiny")
        assert d["stored_dtype"] == want, model
        assert Path(d["weights"]).is_file()
    # Text: one line, beside the file it comes from.
    assert main(["-q", "info", "--model", str(tmp_path / "fp16")]) == 0
    out = capsys.readouterr().out
    assert "stored dtype: fp16\n" in out and "diffusion_pytorch_model.safetensors" in out


def test_info_names_a_mix_of_dtypes_and_none_for_a_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy.deepcopy(perturbed_vae("tiny")).half().save_pretrained(tmp_path / "mixed")
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"].float()  # one tensor kept in fp32
    save_file(sd, weights, metadata={"format": "pt"})
    share = 100 * sd["encoder.conv_in.weight"].numel() / sum(t.numel() for t in sd.values())
    assert _info(capsys, "--model", str(folder))["stored_dtype"] == f"fp16 (fp32 for {share:.2g} % of the values)"
    assert _info(capsys, "--model", "tiny")["stored_dtype"] is None
    assert main(["-q", "info", "--config", "sdxl"]) == 0
    assert "stored dtype: none (no weights)" in capsys.readouterr().out


# ---- 3. the metrics' value range ----


@pytest.fixture
def fresh_range_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a new process: no range warning given yet."""
    monkeypatch.setattr(metrics, "_range_warned", set(), raising=False)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [0, 1] images, the second a noisy copy of the first."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, 24, 24, generator=g)
    return a, (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)


@pytest.mark.usefixtures("fresh_range_warnings")
def test_zero_one_images_scored_with_the_default_range_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        p, s = psnr(a, b), ssim(a, b)
        psnr(a, b)
    (record,) = caplog.records  # once per process, not once per call or batch
    assert "neither image has a negative value" in record.getMessage() and "data_range=1.0" in record.getMessage()
    # The default's numbers are unchanged (those of data_range=2.0): 6.02 dB over the right ones.
    assert torch.equal(p, psnr(a, b, data_range=2.0)) and torch.equal(s, ssim(a, b, data_range=2.0))
    torch.testing.assert_close(p - psnr(a, b, data_range=1.0), torch.full((2,), 20 * math.log10(2)))
    # The remedy scores [0, 1] images as klvae scores the same images in [-1, 1].
    torch.testing.assert_close(psnr(a, b, data_range=1.0), psnr(2 * a - 1, 2 * b - 1))
    torch.testing.assert_close(ssim(a, b, data_range=1.0), ssim(2 * a - 1, 2 * b - 1))


@pytest.mark.usefixtures("fresh_range_warnings")
def test_eight_bit_values_scored_with_the_default_range_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        ssim(a * 255, b * 255)
    (record,) = caplog.records
    assert "far outside the [-1, 1] range" in record.getMessage() and "255 for 8-bit" in record.getMessage()


@pytest.mark.usefixtures("fresh_range_warnings")
def test_klvae_images_and_ranges_said_outright_draw_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    a, b = _pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        psnr(2 * a - 1, 2 * b - 1), ssim(2 * a - 1, 2 * b - 1)
        psnr(a, b, data_range=1.0), ssim(a, b, data_range=1.0), ssim(a * 255, b * 255, data_range=255)
        psnr(a, b, data_range=2.0), ssim(a, b, low=-1.0)  # bright [-1, 1] images, said to be so
    assert caplog.records == []


# ---- 4. a newcomer's odd inputs ----


def _bomb_png(path: Path) -> Path:
    """A PNG whose header claims 100000 x 100000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    return path


def _odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Odd but readable images in `folder`, by name, with their (height, width)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one pixel.png")
    Image.fromarray(rgb).save(folder / "seven by nine.png")
    Image.fromarray(rng.integers(0, 256, (21, 29, 3), dtype=np.uint8)).convert("L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert("LA").save(folder / "la.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (12, 20), dtype=np.uint16)).save(folder / "sixteen bit.png")
    return {"one pixel": (1, 1), "seven by nine": (9, 7), "grey": (21, 29), "la": (12, 20), "palette": (12, 20),
            "cmyk": (12, 20), "sixteen bit": (12, 20)}


def test_odd_images_encode_and_decode_and_bad_ones_are_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(saved_tiny_model(tmp_path / "m"))
    sizes = _odd_images(tmp_path / "my photos")
    (tmp_path / "my photos" / "notes.png").write_text("not an image")
    _bomb_png(tmp_path / "my photos" / "bomb.png")
    lat = tmp_path / "lat ents.safetensors"
    args = ["--model", model, "--tile-size", "7", "--max-memory", "1MiB"]
    assert main(["encode", str(tmp_path / "my photos"), "-o", str(lat), *args]) == 1  # 1: some were skipped
    err = capsys.readouterr().err
    assert "skipping" in err and "notes.png" in err and "decompression bombs" in err and "skipped 2" in err
    assert "Traceback" not in err
    assert main(["decode", str(lat), "-o", str(tmp_path / "out dir"), *args]) == 0
    got = {p.stem: Image.open(p).size[::-1] for p in (tmp_path / "out dir").iterdir()}
    assert got == sizes  # each at its own size, not the padded one
    # One image alone: a bad one is one error line and status 2.
    for bad, words in [("notes.png", "not an image"), ("bomb.png", "over Pillow's limit")]:
        assert main(["reconstruct", str(tmp_path / "my photos" / bad), "-o", str(tmp_path / "r.png"), *args]) == 2
        assert words in one_error_line(capsys.readouterr().err)


def test_decode_given_an_image_says_it_is_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "photo.png").write_bytes(noise_png(0))
    assert main(["decode", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)  # was: "... is not a readable safetensors file: header too large"
    assert "photo.png is an image, not a latents file" in line and "klvae reconstruct" in line
    assert not (tmp_path / "out").exists()
