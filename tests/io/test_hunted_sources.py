"""Data sources hunt: what `cache`, `scale`, `eval` and training read from tar shards, parquet and folders.

Found: training's tar reader leaves out .bmp/.tif members that the README says a shard contributes; a folder or
shard whose path holds `[` is "no shards"; hidden (AppleDouble `._`) shards and parquet files beside the data are
read and fail; a gzip-compressed shard named .tar is called torn by training; parquet files in a config subfolder
(the Hub's `push_to_hub(config_name=...)` layout) are taken for an image folder with no images.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import noise_png
from klvae.datasources import resolve_spec
from klvae.latents.sources import open_source
from klvae.training.data import build_dataset

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"\0" * 120  # macOS's `._NAME` beside each file on exFAT


def _encoded(seed: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(noise_png(seed, (32, 32)))).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _keys(ds: object) -> list[str | None]:
    return [it and it["key"] for it in ds]  # type: ignore[attr-defined]


def test_training_reads_the_bmp_and_tif_members_a_shard_contributes(tmp_path: Path) -> None:
    # README: a .tar shard contributes its .bmp/.tif/.tiff files; cache and eval read them.
    shard = _tar(tmp_path / "s.tar", [("a.bmp", _encoded(0, "BMP")), ("b.tif", _encoded(1, "TIFF")),
                                      ("c.png", noise_png(2, (32, 32)))])
    assert len(open_source(str(shard)).ids) == 3
    # now: [None, None, 's.tar:c']: "skipping s.tar:a: no jpg/jpeg/png/webp member", each pass
    assert None not in _keys(build_dataset(str(shard)))


@pytest.mark.parametrize("reader", ["cache", "train"])
def test_a_folder_of_shards_with_brackets_in_its_name_is_read(tmp_path: Path, reader: str) -> None:
    folder = tmp_path / "shards [v2]"
    _tar(folder / "00000.tar", [("k.png", noise_png(0, (32, 32)))])
    # now: KlvaeError "no shards at .../shards [v2]": the existing path is taken for a glob
    if reader == "cache":
        assert open_source(str(folder)).ids == ["00000.tar:k.png"]
    else:
        assert _keys(build_dataset(str(folder))) == ["00000.tar:k"]


def test_training_reads_one_shard_named_with_brackets(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "part[0].tar", [("k.png", noise_png(0, (32, 32)))])
    assert open_source(str(shard)).ids == ["part[0].tar:k.png"]
    # now: KlvaeError "no shards at .../part[0].tar" (cache reads it; training re-expands it as a glob)
    assert _keys(build_dataset(str(shard))) == ["part[0].tar:k"]


def test_hidden_files_beside_the_shards_of_a_folder_are_left_out(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # README: hidden files in an input folder are left out and not counted as skipped (a glob leaves them out).
    folder = tmp_path / "shards"
    _tar(folder / "00000.tar", [("k.png", noise_png(0, (32, 32)))])
    (folder / "._00000.tar").write_bytes(APPLEDOUBLE)
    with caplog.at_level(logging.WARNING):
        source = open_source(str(folder))
        keys = _keys(build_dataset(str(folder)))
    # now: "skipping tar shard .../._00000.tar: not a tar file" (cache exits 1), and a skipped sample in training
    assert source.unreadable == []
    assert keys == ["00000.tar:k"]
    assert "._00000.tar" not in caplog.text


def test_a_hidden_parquet_file_beside_the_data_is_left_out(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "ds" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"image": [noise_png(0, (32, 32))]}), data / "train-00000-of-00001.parquet")
    (data / "._train-00000-of-00001.parquet").write_bytes(APPLEDOUBLE)
    # now: KlvaeError "cannot read parquet file .../._train-00000-of-00001.parquet: Parquet magic bytes not found"
    assert open_source(str(tmp_path / "ds")).ids == ["row0"]


def test_a_gzip_compressed_shard_named_tar_is_not_called_torn_by_training(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shard = _tar(tmp_path / "s.tar", [(f"k{k}.png", noise_png(k, (32, 32))) for k in range(3)], mode="w:gz")
    assert open_source(str(shard)).unreadable == []  # the cache's reader judges by content: whole
    with caplog.at_level(logging.WARNING):
        keys = _keys(build_dataset(str(shard)))
    # now: ['s.tar:k0', 's.tar:k1', 's.tar:k2', None] and "has no end-of-archive marker: torn", every pass
    assert keys == ["s.tar:k0", "s.tar:k1", "s.tar:k2"]
    assert "torn" not in caplog.text


def test_parquet_files_in_a_config_subfolder_are_a_table(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # push_to_hub(config_name="sharp") lays a dataset out as sharp/train-00000-of-00001.parquet, sharp/test-...
    root = tmp_path / "ds"
    (root / "sharp").mkdir(parents=True)
    for split, n in (("train", 2), ("test", 1)):
        pq.write_table(pa.table({"image": [noise_png(k, (32, 32)) for k in range(n)]}),
                       root / "sharp" / f"{split}-00000-of-00001.parquet")
    # now: kind "folder" with no images: `klvae scale/cache/eval --data ds` say "no images in ds"
    assert resolve_spec(root).kind == "table"
    assert open_source(str(root)).ids == ["row0", "row1"]  # the train split alone



def test_photos_whose_names_share_a_first_dot_are_said_to_be_one_training_sample(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Left as WebDataset groups them (one sample per key), but no longer silent: cache and eval list 3 images here.
    dated = ["2023.05.01.jpg", "2023.05.02.jpg", "2023.06.01.png"]
    shard = _tar(tmp_path / "s.tar", [(n, noise_png(k, (32, 32))) for k, n in enumerate(dated)]
                 + [("b.jpg", noise_png(5, (32, 32))), ("b.seg.png", noise_png(6, (32, 32)))])
    assert len(open_source(str(shard)).ids) == 5
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert _keys(build_dataset(str(shard))) == ["s.tar:2023", "s.tar:b"]
    said = [r.getMessage() for r in caplog.records]
    assert said == ["shard s.tar: sample 2023 holds 3 images (2023.05.01.jpg, 2023.05.02.jpg, 2023.06.01.png): a "
                    "WebDataset key is a name up to its first dot, so one of them is trained on (cache and eval "
                    "read each file); rename them without dots to train on all"]  # b.jpg with its mask: no word
