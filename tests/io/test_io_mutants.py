"""Boundaries of the image and data-source readers and of atomic writes that a mutation audit found unpinned.

Pinned here: every 16-bit value's 8-bit result, where a mode-I image counts as 16-bit and where as 32-bit,
grey+alpha on white, the size image_size reports for every EXIF orientation (JPEG and PNG), pixels as stored when
Pillow cannot apply the EXIF, empty PIL images, a cell's bytes before its path, symlinked folders and upper-case
extensions in folder walks (and in tar shards), reflect padding of a side no longer than its pad, cropping to the
same size, the per-format side limits and output extensions in any case, brace ranges (ends included, padding from
the first number, the name count limit), shard folders of .tar.gz/.tgz, sorted globs, splits whose names begin
alike, which kind a spec is, a save_to_disk folder only when datasets itself would load it, hidden tar members in
training shards, and atomic writes: the temporary's name and folder, fsync before the rename, the mode under any
umask, cleanup on Ctrl-C, safetensors' errors, and file names that are not valid UTF-8.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError

import klvae.atomic
import klvae.datasources
from helpers import noise_png
from klvae.atomic import atomic_save_file, atomic_write, atomic_write_all, atomic_write_text, text_writer
from klvae.datasources import expand_shards, is_disk, parquet_files, resolve_spec
from klvae.errors import ImageError, KlvaeError
from klvae.images import (
    check_format_size,
    crop_to_size,
    find_images,
    image_format_for,
    image_from_cell,
    image_size,
    load_image,
    pad_to_multiple,
    save_image_atomic,
)
from klvae.latents.sources import open_source
from klvae.training.data import WebDatasetShards

# ---- images: pixel values after load ----


def test_every_16_bit_value_maps_to_its_nearest_8_bit_value(tmp_path: Path) -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "ramp.png")  # a 16-bit greyscale PNG
    got = np.asarray(load_image(tmp_path / "ramp.png"))
    assert got.shape == (256, 256, 3) and (got == got[..., :1]).all()
    assert np.array_equal(got[..., 0], np.rint(values / 257.0).astype(np.uint8))  # 65535 / 255 = 257


def _mode_i_tiff(path: Path, values: list[int]) -> Path:
    Image.fromarray(np.array([values], np.int32), "I").save(path)
    return path


def test_mode_i_is_8_bit_up_to_255_16_bit_up_to_65535_and_refused_beyond(tmp_path: Path) -> None:
    eight = load_image(_mode_i_tiff(tmp_path / "eight.tif", [0, 100, 255]))
    assert np.asarray(eight)[0, :, 0].tolist() == [0, 100, 255]  # taken as they are
    sixteen = load_image(_mode_i_tiff(tmp_path / "sixteen.tif", [0, 256, 65535]))
    assert np.asarray(sixteen)[0, :, 0].tolist() == [0, 1, 255]  # scaled by 255 / 65535
    with pytest.raises(ImageError, match=r"deep\.tif: 32-bit integer image \(values up to 65,536\)"):
        load_image(_mode_i_tiff(tmp_path / "deep.tif", [0, 65536]))


def test_grey_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    la = np.array([[[0, 255], [0, 0], [0, 128], [200, 0]]], np.uint8)  # black opaque, black clear, half, clear
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    got = np.asarray(load_image(tmp_path / "la.png")).astype(int)
    assert (got == got[..., :1]).all()
    assert got[0, [0, 1, 3], 0].tolist() == [0, 255, 255]
    assert abs(got[0, 2, 0] - 255 * (1 - 128 / 255)) <= 1


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_is_the_loaded_size_for_every_orientation(tmp_path: Path, fmt: str, orientation: int) -> None:
    # 5 and 7 (transpose, transverse) swap the sides as 6 and 8 do; a PNG keeps its EXIF in an eXIf chunk.
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"r.{fmt}"
    Image.new("RGB", (24, 8), (10, 20, 30)).save(p, exif=exif)
    w, h = load_image(p).size
    assert (w, h) == ((8, 24) if orientation >= 5 else (24, 8))
    assert image_size(p) == (h, w)


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_an_empty_pil_image_in_a_table_cell_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ImageError, match=rf"^row7: empty image \({size[0]}x{size[1]}\)$"):
        image_from_cell(Image.new("RGB", size), "row7")


def test_a_cell_with_bytes_and_a_path_is_read_from_its_bytes() -> None:
    # datasets keeps the original file name beside the bytes; that file is seldom on this machine.
    cell = {"bytes": noise_png(7, (5, 3)), "path": "/nowhere/original.png"}
    assert np.array_equal(np.asarray(image_from_cell(cell, "row0")),
                          np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")))


def test_an_exif_block_pillow_cannot_apply_leaves_the_pixels_as_stored(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (6, 4), (0, 0, 255)).save(tmp_path / "r.png", exif=exif)

    def broken(img: Image.Image, **kwargs: object) -> Image.Image:
        raise SyntaxError("not a TIFF file (header b'MM\\x00\\x00' not valid)")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    img = load_image(tmp_path / "r.png")
    assert img.size == (6, 4) and img.getpixel((5, 3)) == (0, 0, 255)


# ---- images: folder walks ----


def test_folder_walks_follow_symlinked_folders_and_take_any_case_of_extension(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.png").write_bytes(noise_png(0))
    data = tmp_path / "data"
    data.mkdir()
    (data / "sub").symlink_to(elsewhere, target_is_directory=True)
    for name in ("A.PNG", "b.JpEg", "c.Tiff", "d.png.txt", "e.PNGX"):
        (data / name).write_bytes(noise_png(1))
    found = [p.relative_to(data).as_posix() for p in find_images([data])]
    assert found == ["A.PNG", "b.JpEg", "c.Tiff", "sub/linked.png"]


def test_tar_members_with_upper_case_extensions_are_images(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name in ("0.PNG", "1.Png", "1.TXT"):
            data = noise_png(2) if "png" in name.lower() else b"caption"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    source = open_source(str(tmp_path / "s.tar"))
    assert source.ids == ["s.tar:0.PNG", "s.tar:1.Png"]
    assert source.load("s.tar:1.Png").size == (24, 16)


# ---- images: padding, cropping, output formats ----


def test_reflect_padding_of_a_side_no_longer_than_its_pad_replicates() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    padded, size = pad_to_multiple(x, 8, "reflect")  # a pad of 4 on a side of 4: reflect cannot
    assert size == (4, 4) and torch.equal(padded, F.pad(x, (0, 4, 0, 4), mode="replicate"))
    y = x[..., :3, :]
    padded, _ = pad_to_multiple(y, 8, "reflect")  # 5 > 3: also replicate
    assert torch.equal(padded, F.pad(y, (0, 4, 0, 5), mode="replicate"))
    z = torch.arange(3 * 5 * 5, dtype=torch.float32).reshape(1, 3, 5, 5)
    padded, _ = pad_to_multiple(z, 8, "reflect")  # 3 < 5: reflected
    assert torch.equal(padded, F.pad(z, (0, 3, 0, 3), mode="reflect"))


def test_crop_to_the_same_size_is_the_identity() -> None:
    x = torch.rand(1, 3, 8, 16)
    assert torch.equal(crop_to_size(x, (8, 16)), x)
    assert torch.equal(crop_to_size(x, (8, 3)), x[..., :3])
    with pytest.raises(ValueError, match=r"cannot crop \(8, 16\) to the larger \(9, 16\)"):
        crop_to_size(x, (9, 16))


@pytest.mark.parametrize(("name", "limit"), [("a.webp", 16383), ("a.jpg", 65500), ("a.JPEG", 65500)])
def test_format_side_limits_admit_the_limit_itself(name: str, limit: int) -> None:
    check_format_size(name, limit, 1)
    check_format_size(name, 1, limit)
    with pytest.raises(ImageError, match=rf"stores at most {limit} pixels a side"):
        check_format_size(name, 1, limit + 1)


def test_output_extensions_are_taken_in_any_case(tmp_path: Path) -> None:
    assert [image_format_for(n) for n in ("o.PNG", "o.Jpg", "o.TIF", "o.WebP")] == ["PNG", "JPEG", "TIFF", "WEBP"]
    out = save_image_atomic(Image.new("RGB", (4, 2), (1, 2, 3)), tmp_path / "X.PNG")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.getpixel((3, 1)) == (1, 2, 3)


# ---- data sources: brace ranges, shard folders, globs, spec kinds ----


def _touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")
    return folder


def test_brace_ranges_include_their_end_and_pad_to_the_first_number(tmp_path: Path) -> None:
    d = _touch(tmp_path, *[f"s{i}.tar" for i in range(1, 11)], *[f"p{i:02d}.tar" for i in range(0, 11)])
    assert [p.name for p in expand_shards(f"{d}/s{{1..10}}.tar")] == [f"s{i}.tar" for i in range(1, 11)]
    assert [p.name for p in expand_shards(f"{d}/p{{08..10}}.tar")] == ["p08.tar", "p09.tar", "p10.tar"]
    assert [p.name for p in expand_shards(f"{d}/s{{3..3}}.tar")] == ["s3.tar"]


def test_brace_name_count_limit_admits_the_limit_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(klvae.datasources, "MAX_SHARD_NAMES", 6)
    d = _touch(tmp_path, *[f"{a}{i}.tar" for a in "abc" for i in range(1, 4)])
    assert len(expand_shards(f"{d}/{{a,b}}{{1..3}}.tar")) == 6
    with pytest.raises(KlvaeError, match=r"names 9 shards; at most 6 are taken"):
        expand_shards(f"{d}/{{a,b,c}}{{1..3}}.tar")
    with pytest.raises(KlvaeError, match=r"names 7 shards"):
        expand_shards(f"{d}/{{0..6}}.tar")


def test_shard_folders_take_every_tar_suffix_and_globs_are_sorted(tmp_path: Path) -> None:
    d = _touch(tmp_path / "d", "c.tar", "a.tar.gz", "b.tgz", "notes.txt", "d.tar.bz2")
    assert [p.name for p in expand_shards(d)] == ["a.tar.gz", "b.tgz", "c.tar"]
    g = _touch(tmp_path / "g", *[f"s-{i}.tar" for i in (7, 2, 9, 0, 5)])
    assert [p.name for p in expand_shards(f"{g}/s-*.tar")] == ["s-0.tar", "s-2.tar", "s-5.tar", "s-7.tar", "s-9.tar"]


def test_a_split_is_its_own_files_not_those_of_a_split_whose_name_it_begins(tmp_path: Path) -> None:
    d = _touch(tmp_path / "data", "train-00000-of-00001.parquet", "trainval-00000-of-00002.parquet",
               "trainval-00001-of-00002.parquet")
    assert parquet_files(tmp_path, "train") == [d / "train-00000-of-00001.parquet"]
    assert parquet_files(tmp_path, None) == [d / "train-00000-of-00001.parquet"]
    assert [p.name for p in parquet_files(tmp_path, "trainval")] == ["trainval-00000-of-00002.parquet",
                                                                       "trainval-00001-of-00002.parquet"]


def test_spec_kinds(tmp_path: Path) -> None:
    d = _touch(tmp_path / "d", "x.parquet", "y.parquet", "s.tar")
    assert resolve_spec(f"{d}/*.parquet").kind == "table"
    assert resolve_spec(f"{d}/{{x,y}}.parquet").kind == "table"
    assert resolve_spec(f"{d}/*").kind == "tar"  # not all parquet: read as shards (the parquet one is skipped)
    mixed = _touch(tmp_path / "mixed", "s.tar")
    (mixed / "a.png").write_bytes(noise_png(3))
    assert resolve_spec(mixed) == klvae.datasources.DataSpec("folder", (mixed,))  # images beside a tar
    shards = _touch(tmp_path / "shards", "s1.tar", "s0.tar", "notes.txt")
    assert resolve_spec(shards) == klvae.datasources.DataSpec("tar", (shards / "s0.tar", shards / "s1.tar"))


def test_an_image_folder_holding_a_stray_state_json_is_still_an_image_folder(tmp_path: Path) -> None:
    # datasets.load_from_disk wants dataset_info.json and state.json, or dataset_dict.json; either alone is some
    # other tool's file (a labelling tool's state.json), and taking the folder for a table failed in datasets.
    for marker in ("state.json", "dataset_info.json"):
        d = tmp_path / marker.replace(".", "_")
        d.mkdir()
        (d / "a.png").write_bytes(noise_png(4))
        (d / marker).write_text("{}")
        assert not is_disk(d)
        source = open_source(str(d))
        assert (source.kind, source.ids) == ("folder", ["a.png"])
        (d / ({"state.json", "dataset_info.json"} - {marker}).pop()).write_text("{}")
        assert is_disk(d)
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text("{}")
    assert is_disk(tmp_path / "dict")


# ---- training shards ----


def test_hidden_tar_members_are_not_samples(tmp_path: Path) -> None:
    # macOS tar adds an AppleDouble "._NAME" beside each file: not a sample, and not a skipped one either.
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("0001.png", noise_png(5)), ("._0001.png", b"\0\5\26\7 AppleDouble"),
                           ("sub/.hidden.png", b"junk"), ("0002.png", noise_png(6))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ds = WebDatasetShards(tmp_path / "s.tar")
    items = list(ds)
    assert [it and it["key"] for it in items] == ["s.tar:0001", "s.tar:0002"]
    assert ds.skipped == 0


# ---- atomic writes ----


def _recording(seen: list[Path], data: bytes = b"new") -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(data)

    return write


def test_the_temporary_is_a_hidden_unique_name_beside_the_target(tmp_path: Path) -> None:
    target, seen = tmp_path / "sub" / "out.bin", []
    atomic_write(target, _recording(seen))
    atomic_write(target, _recording(seen))
    assert [t.parent for t in seen] == [target.parent] * 2  # same folder: the rename never crosses filesystems
    for t in seen:
        assert t.name.startswith(".out.bin.") and t.name.endswith(".tmp") and f".{os.getpid()}." in t.name
    assert seen[0] != seen[1]  # two writers of one file never share a temporary
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_data_reaches_the_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", Path(src).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    seen: list[Path] = []
    atomic_write(tmp_path / "x.bin", _recording(seen))
    # The folder last: the rename is only durable once its entry reaches the disk.
    assert events == [("fsync", seen[0].name), ("replace", seen[0].name), ("fsync", tmp_path.name)]


def test_each_folder_is_flushed_once_after_every_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[-1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[-1])
    sub = tmp_path / "sub"
    atomic_write_all([(tmp_path / "a", text_writer("1")), (sub / "b", text_writer("2")),
                      (tmp_path / "c", text_writer("3"))])
    after = events[[kind for kind, _ in events].index("replace"):]
    assert after == [("replace", str(tmp_path / "a")), ("replace", str(sub / "b")), ("replace", str(tmp_path / "c")),
                     ("fsync", str(tmp_path)), ("fsync", str(sub))]


@pytest.mark.parametrize(("umask", "mode"), [(0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_of_any_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "a.json", "{}")
        tensors = atomic_save_file(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (text, tensors)] == [mode, mode]


def test_ctrl_c_during_a_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "out.txt", "old")

    def interrupted(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_safetensors_error_is_one_named_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing:\n IoError(No space left on device)")

    monkeypatch.setattr(klvae.atomic, "save_file", full)
    target = tmp_path / "w.safetensors"
    with pytest.raises(OSError, match=r"^cannot write .*w\.safetensors: Error while serializing: IoError\(No space"):
        atomic_save_file(target, {"x": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_text_with_undecodable_file_name_bytes_is_written(tmp_path: Path) -> None:
    # os.fsdecode(b"\xff") is "\udcff"; "\ud800" is a lone surrogate that stands for no byte.
    name = os.fsdecode(b"a\xffb.png")
    out = atomic_write_text(tmp_path / "r.txt", f"skipped {name} and \ud800\n")
    assert out.read_bytes() == b"skipped a\\xffb.png and \\ud800\n"
