"""Image helpers: guarded loading, folder walking, PIL <-> tensor, padding, atomic saves."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from helpers import fifo_watchdog
from klvae.errors import ImageError, KlvaeError
from klvae.images import (
    MAX_PIXELS,
    crop_to_size,
    find_images,
    image_from_cell,
    image_size,
    load_image,
    open_image_bytes,
    pad_to_multiple,
    pil_to_tensor,
    save_image_atomic,
    tensor_to_pil,
    tensor_to_uint8,
    uint8_to_tensor,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """astronaut.png, coffee.jpg, sub/chelsea.webp, plus files that must not be listed."""
    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(root / "astronaut.png")
    Image.fromarray(skimage.data.coffee()[::4, ::4]).save(root / "coffee.jpg", quality=95)
    (root / "sub").mkdir()
    Image.fromarray(skimage.data.chelsea()[::4, ::4]).save(root / "sub" / "chelsea.webp", lossless=True)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes((root / "astronaut.png").read_bytes())
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes((root / "astronaut.png").read_bytes())
    return root


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no pixel data: a decompression-bomb stand-in."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_load_image_formats_are_rgb(photos: Path) -> None:
    for name in ("astronaut.png", "coffee.jpg", "sub/chelsea.webp"):
        img = load_image(photos / name)
        assert img.mode == "RGB" and min(img.size) > 50
    exact = np.asarray(load_image(photos / "sub" / "chelsea.webp"))
    assert np.array_equal(exact, skimage.data.chelsea()[::4, ::4])  # lossless formats round-trip exactly


def test_truncated_and_fake_files_raise_one_line_image_errors(photos: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((photos / "coffee.jpg").read_bytes()[:3000])
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot decode") as e:
        load_image(cut)
    assert "\n" not in str(e.value)
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    with pytest.raises(ImageError, match=r"fake\.png: not an image"):
        load_image(fake)
    with pytest.raises(ImageError, match=r"nope\.png: no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="empty image data"):
        open_image_bytes(b"", "x")


@pytest.mark.parametrize("fmt", ["EPS", "XBM", "PCX"])
def test_only_raster_formats_are_opened_whatever_the_name(tmp_path: Path, fmt: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    def no_ghostscript(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("Ghostscript was run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    path = tmp_path / "x.png"
    Image.new("RGB" if fmt != "XBM" else "1", (8, 8)).save(path, format=fmt)
    with pytest.raises(ImageError, match=r"x\.png: not an image, or not one of PNG, JPEG"):
        load_image(path)
    with pytest.raises(ImageError, match=r"cell: not an image"):
        open_image_bytes(path.read_bytes(), "cell")


def test_decompression_bomb_guard_reads_only_the_header(tmp_path: Path) -> None:
    ok = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(ok)
    with pytest.raises(ImageError, match=r"20x10 is 200 pixels, over the limit of 100"):
        load_image(ok, max_pixels=100)
    assert load_image(ok, max_pixels=200).size == (20, 10)
    # 12000² is past PIL's warning threshold but below MAX_PIXELS: our limit decides, and PIL's warning is
    # not passed on. Refused by a smaller limit before any decoding; with the default, decoding fails.
    header = tmp_path / "big.png"
    header.write_bytes(_png_header(12000, 12000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="over the limit of 100,000,000"):
            load_image(header, max_pixels=100_000_000)
        with pytest.raises(ImageError, match="cannot decode"):
            load_image(header)
    # Beyond PIL's own hard limit, PIL's DecompressionBombError arrives as an ImageError.
    huge = _png_header(100_000, 100_000)
    assert MAX_PIXELS < 100_000**2
    with pytest.raises(ImageError, match=r"^huge: 10,000,000,000 pixels, over Pillow's limit of 178,956,970 \(its "
                       r"guard against decompression bombs\)$"):
        open_image_bytes(huge, "huge", max_pixels=None)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be turned 90° clockwise for display
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = np.asarray(load_image(tmp_path / "r.jpg")).astype(int)
    assert out.shape == (20, 10, 3)
    assert out[:8, :, 0].mean() > 200 and out[12:, :, 0].mean() < 60  # red is now on top


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


def test_alpha_and_odd_modes_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[:2, :, 3] = 255  # top opaque blue, bottom fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert (out[:2] == (0, 0, 255)).all() and (out[2:] == 255).all()  # transparent on white
    p = Image.new("P", (3, 3), 0)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (10, 20, 30) and (out[1:] == 255).all()
    g16 = Image.fromarray(np.full((3, 3), 65535, np.uint16))
    g16.save(tmp_path / "g16.png")
    assert (np.asarray(load_image(tmp_path / "g16.png")) == 255).all()
    # Float TIFFs: [0, 1] values scaled to 8 bits (they came out nearly black), NaN black without a warning.
    Image.fromarray(np.array([[0.5, 1.0], [np.nan, 0.0]], np.float32), "F").save(tmp_path / "f.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        px = np.asarray(load_image(tmp_path / "f.tif"))[..., 0]
    assert px.tolist() == [[128, 255], [0, 0]]
    Image.fromarray(np.array([[100.0, 300.0]], np.float32), "F").save(tmp_path / "f255.tif")
    assert np.asarray(load_image(tmp_path / "f255.tif"))[..., 0].tolist() == [[100, 255]]  # already 0..255


def test_32_bit_integer_image_is_refused_by_name(tmp_path: Path) -> None:
    p = tmp_path / "deep.tif"
    Image.fromarray(np.full((8, 8), 1_000_000, np.int32), "I").save(p)
    with pytest.raises(ImageError, match=r"deep\.tif: 32-bit integer image"):
        load_image(p)


def test_16_bit_values_in_mode_i_still_scale(tmp_path: Path) -> None:
    p = tmp_path / "sixteen.tif"
    Image.fromarray(np.full((8, 8), 32768, np.int32), "I").save(p)
    assert np.asarray(load_image(p))[0, 0, 0] == 128


def test_find_images_mixes_files_and_folders(photos: Path, tmp_path: Path) -> None:
    found = find_images([photos])
    assert [p.relative_to(photos).as_posix() for p in found] == ["astronaut.png", "coffee.jpg", "sub/chelsea.webp"]
    assert find_images([photos / "coffee.jpg", photos, photos / "notes.txt"]) == sorted(
        [*found, photos / "notes.txt"], key=lambda p: p.as_posix())  # a named file is taken, once each
    assert [p.name for p in find_images(photos, recursive=False)] == ["astronaut.png", "coffee.jpg"]
    assert find_images([str(photos / "sub")]) == [photos / "sub" / "chelsea.webp"]
    with pytest.raises(ImageError, match="no such file or folder"):
        find_images([photos, tmp_path / "missing"])


def test_a_folder_that_cannot_be_listed_is_named_in_a_warning(
        photos: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import os

    real = os.scandir

    def locked(path: object = ".") -> object:  # as chmod 000 does for anyone but root
        if Path(str(path)).name == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", locked)
    with caplog.at_level("WARNING"):
        found = find_images([photos])
    assert [p.name for p in found] == ["astronaut.png", "coffee.jpg"]
    assert f"cannot read folder {photos / 'sub'} (Permission denied): its images are left out" in caplog.text


def test_a_fifo_is_refused_unopened_when_loaded_listed_or_named(photos: Path, tmp_path: Path) -> None:
    from klvae.latents.sources import open_source

    with fifo_watchdog(tmp_path / "fifo.png") as watchdog:
        with pytest.raises(ImageError, match=r"fifo\.png: not a regular file \(a FIFO"):
            load_image(tmp_path / "fifo.png")
        # a folder lists it, so that a job counts it as a bad item; named on its own it is an error
        assert find_images([tmp_path]) == [tmp_path / "fifo.png"]
        with pytest.raises(ImageError, match=r"fifo\.png: not a regular file"):
            find_images([photos, tmp_path / "fifo.png"])
        with pytest.raises(KlvaeError, match=r"fifo\.png: not a regular file"):
            open_source(str(tmp_path / "fifo.png"))
    assert not watchdog["fired"], "a reader blocked on the FIFO"


def test_a_fifo_among_tar_shards_is_skipped_unopened(tmp_path: Path) -> None:
    from klvae.latents.sources import open_source

    with fifo_watchdog(tmp_path / "shard.tar") as watchdog, pytest.raises(KlvaeError, match=r"shard\.tar: not a reg"):
        open_source(str(tmp_path))
    assert not watchdog["fired"], "a reader blocked on the FIFO"


def test_symlink_loops_end(photos: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes((photos / "astronaut.png").read_bytes())
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    assert [p.name for p in find_images([tmp_path])] == ["x.png"]



class _Listing:
    """os.scandir's iterator, in an order of our choosing (filesystems list folders in any order)."""

    def __init__(self, entries: list[object]) -> None:
        self.entries = iter(entries)

    def __enter__(self) -> _Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __iter__(self) -> _Listing:
        return self

    def __next__(self) -> object:
        return next(self.entries)


@pytest.mark.parametrize("backwards", [False, True])
def test_two_symlinks_to_one_folder_give_one_name_on_every_filesystem(
    backwards: bool, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "store" / "real"
    real.mkdir(parents=True)
    (real / "x.png").write_bytes((photos / "astronaut.png").read_bytes())
    data = tmp_path / "data"
    data.mkdir()
    for name in ("b_link", "a_link", "c_link"):
        (data / name).symlink_to(real, target_is_directory=True)
    scandir = os.scandir

    def listing(path: object) -> _Listing:
        with scandir(path) as it:
            return _Listing(sorted(it, key=lambda e: e.name, reverse=backwards))

    monkeypatch.setattr(os, "scandir", listing)
    assert find_images([data]) == [data / "a_link" / "x.png"]


def test_pil_tensor_round_trip_is_exact() -> None:
    a = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    t = pil_to_tensor(Image.fromarray(a))
    assert t.shape == (3, 7, 5) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert pil_to_tensor(Image.fromarray(np.array([[[0, 255, 0]]], np.uint8))).flatten().tolist() == [-1, 1, -1]
    assert np.array_equal(np.asarray(tensor_to_pil(t)), a)
    assert np.array_equal(np.asarray(tensor_to_pil(t[None])), a)
    batch = np.stack([a, a[::-1]])
    assert uint8_to_tensor(batch).shape == (2, 3, 7, 5)
    assert np.array_equal(tensor_to_uint8(uint8_to_tensor(batch)), batch)
    assert pil_to_tensor(Image.new("L", (2, 2), 255)).eq(1).all()


def test_tensor_to_pil_clamps_and_checks_shape() -> None:
    t = torch.tensor([-3.0, 0.0, 5.0, float("nan")]).view(1, 1, 4).expand(3, 1, 4)
    assert np.asarray(tensor_to_pil(t))[0, :, 0].tolist() == [0, 128, 255, 128]
    with pytest.raises(ValueError, match="one image"):
        tensor_to_pil(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError):
        tensor_to_pil(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError):
        uint8_to_tensor(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("mode", ["replicate", "reflect", "constant"])
def test_pad_then_crop_restores_size_and_content(mode: str) -> None:
    x = torch.randn(2, 3, 13, 21)
    padded, size = pad_to_multiple(x, 8, mode)
    assert padded.shape == (2, 3, 16, 24) and size == (13, 21)
    assert torch.equal(padded[..., :13, :21], x)
    if mode == "replicate":
        assert torch.equal(padded[..., 15, :21], x[..., 12, :]) and torch.equal(padded[..., :13, 23], x[..., 20])
    if mode == "constant":
        assert padded[..., 13:, :].abs().sum() == 0
    assert torch.equal(crop_to_size(padded, size), x)
    same, _ = pad_to_multiple(torch.zeros(1, 3, 16, 8))
    assert same.shape == (1, 3, 16, 8)


def test_pad_edge_cases() -> None:
    tiny, size = pad_to_multiple(torch.ones(1, 3, 1, 2), 8, "reflect")  # reflect cannot pad 7 from 1 px
    assert tiny.shape == (1, 3, 8, 8) and tiny.eq(1).all() and size == (1, 2)
    with pytest.raises(ValueError, match="pad mode"):
        pad_to_multiple(torch.zeros(1, 3, 3, 3), mode="wrap")
    with pytest.raises(ValueError, match="larger"):
        crop_to_size(torch.zeros(1, 3, 8, 8), (9, 8))


def test_save_image_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = Image.fromarray(skimage.data.astronaut()[:32, :32])
    out = save_image_atomic(img, tmp_path / "deep" / "er" / "a.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(load_image(out)), np.asarray(img))
    save_image_atomic(Image.new("RGBA", (4, 4)), tmp_path / "b.jpg")
    with Image.open(tmp_path / "b.jpg") as im:
        assert im.format == "JPEG"
    with pytest.raises(KlvaeError, match=r"c\.xyz: cannot write an RGB image with the extension '\.xyz'"):
        save_image_atomic(img, tmp_path / "c.xyz")

    def broken_save(self: Image.Image, fp: io.BufferedWriter, *args: object, **kwargs: object) -> None:
        fp.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image_atomic(Image.new("RGB", (4, 4)), out)
    assert np.array_equal(np.asarray(load_image(out)), np.asarray(img))  # the old file is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]  # and no temporary is left


def test_image_from_cell(photos: Path) -> None:
    data = (photos / "astronaut.png").read_bytes()
    expected = np.asarray(load_image(photos / "astronaut.png"))
    cells = [{"bytes": data, "path": None}, {"bytes": None, "path": str(photos / "astronaut.png")}, data,
             str(photos / "astronaut.png"), Image.open(io.BytesIO(data))]
    for cell in cells:
        assert np.array_equal(np.asarray(image_from_cell(cell, "row0")), expected)
    with pytest.raises(ImageError, match="row3: the image column holds int"):
        image_from_cell(3, "row3")
    with pytest.raises(ImageError, match="over the limit"):
        image_from_cell(Image.new("RGB", (20, 20)), "row4", max_pixels=10)
