"""Review findings in the CLI and the image, data-source and latents-file helpers: each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_error_line
from klvae.cli.main import main
from klvae.datasources import expand_shards
from klvae.errors import KlvaeError
from klvae.images import image_size, load_image
from klvae.latents.file import LatentItem, LatentsFile, save_latents


def _image(path: Path, w: int = 16, h: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_image_size_of_an_oriented_tiff_is_the_loaded_size(tmp_path: Path, orientation: int) -> None:
    # Pillow turns a TIFF by its orientation tag itself (and, from Pillow 11, reports the turned size on open):
    # image_size turned it a second time, so encode batched such TIFFs under the wrong size.
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "r.tif"
    Image.new("RGB", (24, 8), (10, 20, 30)).save(p, exif=exif)
    w, h = load_image(p).size
    assert image_size(p) == (h, w)


def test_an_empty_brace_range_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # {10..1} names no shard: the spec resolved to a table of no files, and the job died of an IndexError.
    spec = str(tmp_path / "shard-{10..1}.tar")
    with pytest.raises(KlvaeError, match="no shards"):
        expand_shards(spec)
    assert main(["scale", "--data", spec]) == 2
    assert "no shards" in one_error_line(capsys.readouterr().err)


def test_a_path_that_is_not_utf8_is_printed_not_an_internal_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Linux file names are bytes; Python hands undecodable ones over as lone surrogates, which a strict UTF-8
    # stdout (any UTF-8 locale but C.UTF-8) cannot print: the reconstruction was written, then exit 1.
    img = _image(tmp_path / "a.png")
    out = tmp_path / "r\udcff.png"
    try:
        out.touch()
        out.unlink()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    assert main(["reconstruct", str(img), "-o", str(out)]) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert printed.startswith("PSNR ") and "r\\udcff.png" in printed


def test_a_failed_latents_write_leaves_no_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # atomic_write removes the folders it made when the write fails; save_latents made them itself, first.
    import klvae.atomic

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(klvae.atomic, "save_file", full_disk)
    lf = LatentsFile(latents={"k": torch.zeros(4, 2, 2)}, items=[LatentItem("a.png", "k", 16, 16)])
    with pytest.raises(OSError, match="No space left"):
        save_latents(lf, tmp_path / "new" / "deeper" / "l.safetensors")
    assert list(tmp_path.iterdir()) == []
