"""Tar shards as a data source: members read at the offsets listed when the shard was opened (not found by walking
every header before them), one open file per reading thread, a shard replaced or turned into a FIFO since it was
listed is a one-line error rather than a hang, GNU sparse members are no images, and shards of one name in two
folders keep every image."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import noise_png
from klvae.datasources import DataSpec, resolve_spec
from klvae.errors import ImageError
from klvae.latents.sources import open_source

LONG = "a-folder-name-long-enough-that-the-member-needs-an-extended-header/" * 2  # over tar's 100-byte name field


def _shard(path: Path, n: int) -> dict[str, bytes]:
    # n samples in WebDataset's layout (an image and a caption each); the last image's name needs a pax header.
    images = {}
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for k in range(n):
            name = f"{LONG if k == n - 1 else ''}{k:05d}.png"
            images[name] = noise_png(k, (8 + k % 5, 8))
            for member, data in ((name, images[name]), (f"{k:05d}.txt", b"a caption")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return images


@pytest.mark.parametrize("name", ["s.tar", "s.tar.gz"])
def test_a_tar_member_is_read_at_its_offset_not_found_by_walking_the_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    images = _shard(tmp_path / name, 80)
    source = open_source(str(tmp_path / name))
    assert len(source.ids) == 80
    real, headers = tarfile.TarInfo.fromtarfile.__func__, []

    def counted(cls: type[tarfile.TarInfo], tf: tarfile.TarFile) -> tarfile.TarInfo:
        headers.append(1)
        return real(cls, tf)

    monkeypatch.setattr(tarfile.TarInfo, "fromtarfile", classmethod(counted))
    last = source.ids[-3:]  # the last one's name is in a pax header
    for item in last:
        want = np.asarray(Image.open(io.BytesIO(images[item.split(":", 1)[1]])).convert("RGB"))
        assert np.array_equal(np.asarray(source.load(item)), want)
    # One header a read (two for the pax one), and the first header at the open (tried once per compression
    # tarfile knows): at most 8. Walking the shard read all 160 headers before each image: 472 or more.
    assert len(headers) <= 8, len(headers)


def test_a_tar_shard_replaced_since_it_was_listed_is_a_one_line_image_error(tmp_path: Path) -> None:
    _shard(tmp_path / "s.tar", 4)
    source = open_source(str(tmp_path / "s.tar"))
    with tarfile.open(tmp_path / "s.tar", "w") as tf:  # other members where the listed ones were
        info = tarfile.TarInfo("other.png")
        info.size = len(data := noise_png(9))
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match=r"^s\.tar:00000\.png: no longer in .*s\.tar$"):
        source.load("s.tar:00000.png")
    (tmp_path / "s.tar").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^s\.tar:00001\.png: cannot read from .*s\.tar: "):
        source.load("s.tar:00001.png")


def _tar(path: Path, n: int) -> dict[str, bytes]:
    images = {f"{k:04d}.png": noise_png(k, (8 + k % 7, 8)) for k in range(n)}
    with tarfile.open(path, "w") as tf:
        for name, data in images.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return images


def test_threads_taking_turns_keep_their_own_open_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One slot for all threads: each turn of another thread reopened the shard (a .tar.gz then decompressed
    # again from its start), and a thread could take or close the file another had just opened.
    images = _tar(tmp_path / "s.tar", 12)
    source = open_source(str(tmp_path / "s.tar"))
    real_open, opened = tarfile.open, []
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    turns = [threading.Semaphore(0), threading.Semaphore(0)]
    wrong: list[str] = []

    def work(me: int) -> None:
        for item in source.ids[me::2]:
            turns[me].acquire()
            if source._tars.read(*source._paths[item], item) != images[item.split(":", 1)[1]]:
                wrong.append(item)
            turns[1 - me].release()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    turns[0].release()
    for t in threads:
        t.join(30)
    assert not wrong and not any(t.is_alive() for t in threads)
    assert len(opened) == 2, len(opened)  # once per thread, not once per turn (12)


def test_a_shard_turned_into_a_fifo_since_it_was_listed_is_an_error_not_a_hang(tmp_path: Path) -> None:
    _tar(tmp_path / "s.tar", 2)
    source = open_source(str(tmp_path / "s.tar"))
    os.remove(tmp_path / "s.tar")
    os.mkfifo(tmp_path / "s.tar")
    errors: list[Exception] = []

    def load() -> None:
        try:
            source.load("s.tar:0000.png")
        except Exception as e:  # any failure: checked below
            errors.append(e)

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)
    hung = reader.is_alive()
    if hung:  # let the blocked open return, so that no thread outlives the test
        os.close(os.open(tmp_path / "s.tar", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert not hung, "reading a shard that became a FIFO blocked"
    assert len(errors) == 1 and isinstance(errors[0], ImageError), errors
    assert "no longer a regular file" in str(errors[0])


def _sparse_header(name: str, stored: int, real_size: int) -> bytes:
    # An old-GNU sparse member ('S'): one data piece of `stored` bytes, the rest of `real_size` a hole.
    info = tarfile.TarInfo(name)
    info.size = stored
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[156:157] = b"S"
    buf[386:410] = b"%011o\0%011o\0" % (0, stored)
    buf[482] = 0
    buf[483:495] = b"%011o\0" % real_size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def test_gnu_sparse_members_are_not_listed_as_images(tmp_path: Path) -> None:
    png = noise_png(1)
    with open(tmp_path / "s.tar", "wb") as f:
        f.write(_sparse_header("holes.png", 1, 2**26) + b"\x89" + bytes(511))
        info = tarfile.TarInfo("a.png")
        info.size = len(png)
        f.write(info.tobuf(format=tarfile.GNU_FORMAT) + png + bytes(-len(png) % 512) + bytes(1024))
    with tarfile.open(tmp_path / "s.tar") as tf:  # the crafted member is one tarfile reads as sparse
        assert [(m.name, m.issparse(), m.size) for m in tf] == [("holes.png", True, 2**26), ("a.png", False, len(png))]
    source = open_source(str(tmp_path / "s.tar"))
    assert source.ids == ["s.tar:a.png"]
    assert np.array_equal(np.asarray(source.load("s.tar:a.png")),
                          np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def _tar_with_one_png(path: Path, colour: tuple[int, int, int], member: str = "000000000.png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "PNG")
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))


def test_tar_shards_of_one_name_in_two_folders_keep_every_image(tmp_path: Path) -> None:
    # Two img2dataset outputs side by side: the same shard and member names, other pictures.
    _tar_with_one_png(tmp_path / "laion" / "00000.tar", (255, 0, 0))
    _tar_with_one_png(tmp_path / "coyo" / "00000.tar", (0, 0, 255))
    for spec in (f"{tmp_path}/*/00000.tar", f"{tmp_path}/{{laion,coyo}}/00000.tar"):
        source = open_source(spec)
        assert len(source.ids) == 2, source.ids  # was one: the second shard's image replaced the first's
        assert {source.load(i).getpixel((0, 0)) for i in source.ids} == {(255, 0, 0), (0, 0, 255)}
    # Shards whose names differ keep their short ids (those of existing caches).
    _tar_with_one_png(tmp_path / "one" / "00001.tar", (0, 255, 0))
    assert open_source(f"{tmp_path}/one/00001.tar").ids == ["00001.tar:000000000.png"]
    assert open_source(f"{tmp_path}/{{laion/00000,one/00001}}.tar").ids == [
        "00000.tar:000000000.png", "00001.tar:000000000.png"]


def test_hidden_tar_members_are_not_listed_as_images(tmp_path: Path) -> None:
    # A shard packed on macOS carries ._name.png resource forks (AppleDouble, not images); a folder walk and the
    # training reader skip hidden names, and so must the cache's and eval's reader, or each is a skipped "image".
    png = noise_png(2)
    with tarfile.open(tmp_path / "mac.tar", "w") as tf:
        for name, data in (("pics/._a.png", b"\x00\x05\x16\x07" + bytes(60)), ("pics/a.png", png),
                           ("pics/.hidden.png", png)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert open_source(str(tmp_path / "mac.tar")).ids == ["mac.tar:pics/a.png"]


def test_tar_shards_are_known_by_their_suffix_in_any_case(tmp_path: Path) -> None:
    # As image names are: a shard named S.TAR was taken for a lone non-image file ("no readable images").
    _tar_with_one_png(tmp_path / "one" / "S.TAR", (255, 0, 0))
    _tar_with_one_png(tmp_path / "two" / "a.Tar", (0, 255, 0))
    _tar_with_one_png(tmp_path / "two" / "b.TGZ", (0, 0, 255))
    assert resolve_spec(tmp_path / "one" / "S.TAR").kind == "tar"
    assert open_source(str(tmp_path / "one" / "S.TAR")).ids == ["S.TAR:000000000.png"]
    assert resolve_spec(tmp_path / "two") == DataSpec("tar", (tmp_path / "two" / "a.Tar", tmp_path / "two" / "b.TGZ"))
    source = open_source(str(tmp_path / "two"))
    assert [source.load(i).getpixel((0, 0)) for i in source.ids] == [(0, 255, 0), (0, 0, 255)]
