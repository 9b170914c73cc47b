"""`klvae encode | decode | reconstruct` when the model or the disk fails: a model that makes inf or NaN is a
one-line error naming what overflowed, not a grey picture; an image too small for SSIM still reconstructs; a
failed latents write leaves nothing behind. Exit 2, nothing written."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

import klvae
from helpers import files_under, handmade_latents, one_error_line, rgb_image
from klvae.cli.main import main

# A latents item of the demo model (x8): 2x2 cells decode to 16x16 pixels.
GOOD = {"name": "good.png", "key": "g", "height": 16, "width": 16}


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# 1. a model that makes inf/NaN is an error, not a grey picture


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for part in ("encoder", "decoder"):
        vae = klvae.AutoencoderKL("tiny-f8")
        with torch.no_grad():
            # Finite weights (a file's must be, or loading refuses it) whose sums overflow float32.
            for p in getattr(vae, part).parameters():
                p.fill_(3e38)
        vae.save_pretrained(root / part)
        out[part] = root / part
    return out


@pytest.mark.parametrize(
    ("command", "part", "message"),
    [
        ("encode", "encoder", "non-finite latents"),
        ("reconstruct", "encoder", "non-finite latents"),
        ("reconstruct", "decoder", "non-finite pixels"),
    ],
)
def test_non_finite_results_are_an_error(tmp_path: Path, broken_models: dict[str, Path], command: str, part: str,
                                         message: str, capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "in" / "a.png")
    out = tmp_path / "out" / ("z.safetensors" if command == "encode" else "r.png")
    assert main([command, str(img), "-o", str(out), "--model", str(broken_models[part])]) == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_decode_with_a_non_finite_decoder_is_an_error(tmp_path: Path, broken_models: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = handmade_latents(tmp_path / "z.safetensors", [GOOD])
    assert main(["decode", str(src), "-o", str(tmp_path / "out"), "--model", str(broken_models["decoder"])]) == 2
    assert "non-finite pixels" in _err_line(capsys)
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("scaling", "values", "message"),
    [
        ("1e-30", (1.0, 1.0), "item 0 ('good.png'): the model produced non-finite pixels: its unscaled latents "
                              "reach 1e+30"),
        ("1e-8", (0.0, 1e30), "item 1 ('bad.png'): the model produced non-finite pixels: its unscaled latents "
                              "reach 1e+38"),
    ],
)
def test_latents_that_overflow_the_decoder_name_the_item_and_write_nothing(
    tmp_path: Path, scaling: str, values: tuple[float, float], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [GOOD, {**GOOD, "key": "b", "name": "bad.png"}]
    tensors = {"g": torch.full((4, 2, 2), values[0]), "b": torch.full((4, 2, 2), values[1])}
    src = handmade_latents(tmp_path / "z.safetensors", items, tensors, {"scaling_factor": scaling})
    assert main(["decode", str(src), "-o", str(tmp_path / "out")]) == 2
    line = _err_line(capsys)
    assert message in line and str(src) in line and "weights" not in line
    assert files_under(tmp_path) == ["z.safetensors"]


# 2. images too small for SSIM


def test_reconstruct_of_a_tiny_image_prints_ssim_as_not_available(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "tiny.png", w=9, h=6)
    out = tmp_path / "r.png"
    assert main(["reconstruct", str(img), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "SSIM n/a" in text
    assert Image.open(out).size == (9, 6)


# 3. a failed latents write is a one-line error that leaves nothing behind


def test_a_failed_latents_write_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "in" / "a.png")

    def fail(_tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half")
        raise SafetensorError(f"Error while serializing: I/O error: Permission denied (os error 13) at {filename}")

    monkeypatch.setattr("klvae.atomic.save_file", fail)
    assert main(["encode", str(img), "-o", str(tmp_path / "out" / "z.safetensors")]) == 2
    assert "cannot write" in _err_line(capsys)
    assert files_under(tmp_path / "out") == []
