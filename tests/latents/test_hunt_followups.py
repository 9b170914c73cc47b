"""Pins what was done about the doubtful findings of the cache and eval hunts: a second `klvae cache` into a folder
a run is writing is refused (rank 0 holds a lock on it), a folder among tar shards is called a folder, a data
folder of images and tar shards says which it reads, `cache` and `scale` take --image-column, eval refuses a
metric's weights file with the flag that leaves the metric out, FID refuses non-finite features, and a hand-edited
index.json row without its fields is a LatentsError naming the row (was a bare KeyError), and a resume of a cache of
parquet files whose file list changed is refused (row ids are positions across the files: the ids done would be
other images), and a cache begun with weights cast to fp16 for speed resumes in fp32 (fingerprints are taken of
the weights as stored)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import klvae
from helpers import (
    SMALL_CACHE,
    cache_args,
    cache_vae,
    noise_folder,
    noise_png,
    one_error_line,
    read_index,
    saved_tiny_model,
    small_cache,
)
from klvae.atomic import folder_lock
from klvae.cli.main import main
from klvae.datasources import resolve_spec
from klvae.errors import KlvaeError, LatentsError
from klvae.evaluation.fid import FIDReference, feature_statistics
from klvae.latents import build_cache
from klvae.latents.dataset import BucketBatchSampler, LatentDataset


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return cache_vae()


def test_a_second_cache_into_a_folder_being_written_is_refused(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    data, out = noise_folder(tmp_path / "data", 2, hw=(32, 32)), tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "klvae cache"), pytest.raises(KlvaeError) as e:  # as a run under way holds it
        build_cache(vae, data, out, **SMALL_CACHE)
    assert str(e.value) == (f"another `klvae cache` is writing into {out}: wait for it to end, or name another "
                            "folder")
    assert list(out.iterdir()) == []  # nothing written
    assert build_cache(vae, data, out, **SMALL_CACHE).rows == 2  # released: the next run goes ahead


def test_the_cache_folder_stays_locked_until_the_index_is_written(tmp_path: Path, vae: klvae.AutoencoderKL,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Under torchrun rank 0 may finish its share before the others: a job arriving then took the released lock
    # and wrote beside the running job's other ranks, before its index.
    from klvae.latents import cache as cache_mod

    data, out = noise_folder(tmp_path / "data", 2, hw=(32, 32)), tmp_path / "out"
    real, held = cache_mod.write_index, []

    def index_while_another_tries(*args: object, **kwargs: object) -> Path:
        with pytest.raises(KlvaeError, match="another `klvae cache` is writing"), folder_lock(out, "klvae cache"):
            pass
        held.append(True)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_mod, "write_index", index_while_another_tries)
    assert build_cache(vae, data, out, **SMALL_CACHE).rows == 2 and held == [True]


def test_a_folder_among_tar_shards_is_called_a_folder(tmp_path: Path, vae: klvae.AutoencoderKL,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    import tarfile

    shards = tmp_path / "shards"
    (shards / "b.tar").mkdir(parents=True)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(noise_png(0, (32, 32)))
    with tarfile.open(shards / "a.tar", "w") as tf:
        tf.add(tmp_path / "img" / "a.png", "a.png")
    with caplog.at_level(logging.WARNING, logger="klvae"):
        summary = build_cache(vae, f"{shards}/*.tar", tmp_path / "out", **SMALL_CACHE)
    assert (summary.rows, summary.unreadable_shards) == (1, 1)
    assert f"skipping tar shard {shards / 'b.tar'}: a folder, not a file" in caplog.messages


def test_a_folder_of_images_and_tar_shards_says_it_reads_the_images(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = noise_folder(tmp_path / "data", 1, hw=(32, 32))
    (data / "s.tar").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert resolve_spec(data).kind == "folder"
    assert f"{data} holds images and tar shards: reading the images; name the shards ({data}/*.tar) to read them " \
           "instead" in caplog.messages
    caplog.clear()
    (data / "img0.png").unlink()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert resolve_spec(data).kind == "tar"
    assert not caplog.messages


def test_cache_and_scale_take_an_image_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": [{"bytes": noise_png(i, (32, 32)), "path": None} for i in range(2)]}), table)
    model = str(saved_tiny_model(tmp_path / "model"))
    common = ["--model", model, "--data", str(table), "--resolution", "32"]
    assert main(["scale", *common]) == 2  # the default column, "image", is not there
    assert "img" in one_error_line(capsys.readouterr().err)
    assert main(["-q", "scale", *common, "--image-column", "img"]) == 0
    assert main(["-q", "cache", *common, "--image-column", "img", "-o", str(tmp_path / "c"), "--num-workers",
                 "0"]) == 0
    assert "cached 2 rows" in capsys.readouterr().out


@pytest.mark.parametrize(("weights", "off"), [("--inception-weights", "--no-fid"), ("--lpips-vgg", "--no-lpips"),
                                              ("--lpips-lin", "--no-lpips")])
def test_eval_refuses_weights_of_a_metric_it_is_told_to_leave_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: str, off: str) -> None:
    (tmp_path / "w.pth").write_bytes(b"x")
    data = noise_folder(tmp_path / "data", 1, hw=(32, 32))
    argv = ["eval", "--data", str(data), "-o", str(tmp_path / "r"), weights, str(tmp_path / "w.pth"), off]
    assert main(argv) == 2
    assert f"{weights} names weights of a metric {off} leaves out" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_fid_refuses_features_that_are_not_finite() -> None:
    good = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    bad = good.clone()
    bad[1, 2] = float("nan")
    for call in (lambda: feature_statistics(bad), lambda: FIDReference(bad), lambda: FIDReference(good).distance(bad)):
        with pytest.raises(ValueError, match=r"^features hold NaN or inf$"):
            call()


@pytest.mark.parametrize("field", ["row", "bucket", "crop"])
def test_an_index_row_without_its_fields_is_named(tmp_path: Path, vae: klvae.AutoencoderKL, field: str) -> None:
    out = small_cache(tmp_path, 3, vae)
    index = read_index(out)
    del index["items"][1][field]
    (out / "index.json").write_text(json.dumps(index))
    ds = LatentDataset(out, mode="mean")
    assert ds[0]["latents"].ndim == 3  # the others read
    message = (f"{out / 'index.json'} item 1 is not a cache row (shard, row, source, size, crop, flip, bucket): "
               "the index is damaged; `klvae cache` run again on this folder writes it anew")
    with pytest.raises(LatentsError) as e:
        ds[1]
    assert str(e.value) == message
    if field == "bucket":
        with pytest.raises(LatentsError) as e:
            BucketBatchSampler(ds, batch_size=2)
        assert str(e.value) == message


def _parquet(path: Path, seeds: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": noise_png(i, (32, 32)), "path": None} for i in seeds]}), path)


def test_a_resume_of_a_cache_of_parquet_files_that_changed_is_refused(tmp_path: Path,
                                                                       vae: klvae.AutoencoderKL) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    _parquet(data / "b.parquet", [0, 1])
    assert build_cache(vae, str(data), out, **SMALL_CACHE).encoded == 2
    assert build_cache(vae, str(data), out, **SMALL_CACHE).done_before == 2  # unchanged: nothing to do
    _parquet(data / "a.parquet", [2])  # sorts first: row0 is now another image
    with pytest.raises(KlvaeError) as e:
        build_cache(vae, str(data), out, **SMALL_CACHE)
    assert str(e.value).startswith(f"{out} holds a cache of other table data (its parquet files, or their rows, "
                                   "changed)")
    # A cache begun before the data was fingerprinted is resumed as it was.
    for manifest in out.glob("manifest-rank*.jsonl"):
        lines = [json.loads(line) for line in manifest.read_text().splitlines()]
        for rec in lines:
            rec.get("options", {}).pop("data_fingerprint")
        manifest.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    index = read_index(out)
    del index["data_fingerprint"]
    (out / "index.json").write_text(json.dumps(index))
    assert build_cache(vae, str(data), out, **SMALL_CACHE).rows == 3


def test_a_cache_begun_with_weights_cast_to_fp16_resumes_in_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import functools

    from klvae.cli import common
    from klvae.inference.speed import SpeedOptions

    model, data = saved_tiny_model(tmp_path / "model"), noise_folder(tmp_path / "data", 2, hw=(32, 32))
    with monkeypatch.context() as m:  # as on a GPU, where --dtype fp16 stores the weights in fp16 for speed
        m.setattr(common, "SpeedOptions", functools.partial(SpeedOptions, cast_weights=True))
        assert main(cache_args(data, tmp_path / "out", model, "--dtype", "fp16")) == 0
    noise_folder(data, 3, hw=(32, 32))  # one image more
    # Was: "holds a cache made with another model": the fingerprint of fp16-cast weights is another one.
    assert main(cache_args(data, tmp_path / "out", model, "--dtype", "fp32")) == 0
    assert "cached 3 rows" in capsys.readouterr().out
