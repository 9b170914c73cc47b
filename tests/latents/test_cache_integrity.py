"""Damage that used to pass as done: a recorded cache shard cut short or altered since it was written (a resume
re-encodes its rows, exactly once, and no index names it), and a .tar shard cut inside a member's header."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import klvae
from helpers import CACHE_ROWS, cache_args, cache_images, copy_cache, finished_cache, saved_tiny_model
from klvae.cli.main import main
from klvae.errors import KlvaeError, LatentsError
from klvae.latents import cache, integrity
from klvae.latents.dataset import LatentDataset
from klvae.latents.sources import open_source

ROWS = CACHE_ROWS


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cache_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, model: Path, data: Path) -> Path:
    return finished_cache(tmp_path_factory, model, data)


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _rows_once(out: Path, flips: tuple[bool, ...] = (False,)) -> None:
    # Every row of every image exactly once, each readable, and no file but the cache's own.
    ds = LatentDataset(out, mode="mean")
    assert sorted((it["source"], it["flip"]) for it in ds.items) == sorted((s, f) for s in ROWS for f in flips)
    assert all(torch.isfinite(ds[i]["latents"]).all() for i in range(len(ds)))
    named = {it["shard"] for it in ds.items}
    assert {p.name for p in out.iterdir()} == {"index.json", "manifest-rank000.jsonl", *named}


# ---- 1. a recorded shard damaged since: found on resume, its rows encoded again once ----


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong-shape", "missing-row"])
def test_a_resume_re_encodes_the_rows_of_a_damaged_shard_once(
    tmp_path: Path, model: Path, data: Path, finished: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    out = copy_cache(finished, tmp_path)
    shard = out / "rank000-00001.safetensors"
    if damage in ("truncated", "empty"):
        _cut(shard, 100 if damage == "truncated" else 0)
    else:  # a whole safetensors file, but not the rows its line records
        shape = (4, 8, 8) if damage == "wrong-shape" else (4, 16, 16)
        rows = range(3) if damage == "wrong-shape" else range(2)
        save_file({f"{r:06d}.{f}": torch.zeros(shape) for r in rows for f in ("mean", "logvar")}, str(shard))
    capsys.readouterr()
    assert main(cache_args(data, out, model)) == 0
    captured = capsys.readouterr()
    assert "encoded 3 images" in captured.out and "5 were done before" in captured.out
    assert f"{shard} is damaged" in captured.err and "its 3 row(s) will be encoded again" in captured.err
    _rows_once(out)
    dropped = [json.loads(ln) for ln in (out / "manifest-rank000.jsonl").read_text().splitlines()]
    assert [rec.get("dropped") for rec in dropped].count(shard.name) == 1
    assert main(cache_args(data, out, model)) == 0  # and the next resume finds all done
    assert "8 were done before" in capsys.readouterr().out


def test_with_flip_only_the_damaged_shards_rows_are_encoded_again(
    tmp_path: Path, model: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "latents"
    assert main(cache_args(data, out, model, "--flip")) == 0
    # Shards of three rows: the second holds img1's flipped row and both of img2's.
    _cut(out / "rank000-00001.safetensors", 1000)
    capsys.readouterr()
    assert main(cache_args(data, out, model, "--flip")) == 0
    assert "encoded 2 images" in capsys.readouterr().out
    _rows_once(out, (False, True))


@pytest.mark.parametrize("kill", ["before-the-manifest", "before-the-delete"])
def test_a_kill_while_dropping_a_damaged_shard_leaves_a_cache_a_resume_finishes(
    tmp_path: Path, model: Path, data: Path, finished: Path, monkeypatch: pytest.MonkeyPatch, kill: str
) -> None:
    out = copy_cache(finished, tmp_path)
    _cut(out / "rank000-00001.safetensors", 100)
    real = integrity.atomic_write_text

    def killed(path: Path, text: str) -> Path:
        if kill == "before-the-delete":
            real(path, text)
        (path.parent / f".{path.name}.123.deadbeef.tmp").write_text(text[:10])  # as a kill mid-write leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(integrity, "atomic_write_text", killed)
    assert main(cache_args(data, out, model)) not in (0, 1)  # "klvae: interrupted"
    assert not (out / "index.json").exists()  # it named the shard: gone first, whatever comes after
    assert (out / "rank000-00001.safetensors").exists()
    named = [json.loads(ln).get("shard") for ln in (out / "manifest-rank000.jsonl").read_text().splitlines()]
    assert ("rank000-00001.safetensors" in named) == (kill == "before-the-manifest")
    monkeypatch.setattr(integrity, "atomic_write_text", real)
    assert main(cache_args(data, out, model)) == 0
    _rows_once(out)


def test_the_index_is_never_written_over_a_damaged_shard(
    tmp_path: Path, model: Path, data: Path, finished: Path
) -> None:
    # Damaged after this rank's resume checked it (or by another rank): write_index refuses, naming it.
    out = copy_cache(finished, tmp_path)
    (out / "index.json").unlink()
    _cut(out / "rank000-00002.safetensors", 300)
    vae = klvae.AutoencoderKL.from_pretrained(model)
    opts = cache.CacheOptions(resolution=32, shard_size=3, num_workers=0)
    with pytest.raises(KlvaeError, match=r"rank000-00002\.safetensors is damaged \(.*\): run the same"):
        cache.write_index(vae, str(model), out, opts, 1)
    assert not (out / "index.json").exists()


def test_the_shard_check_accepts_every_store_and_bucket_it_writes(tmp_path: Path, data: Path) -> None:
    for preset, changes in (("tiny", {}), ("tiny", {"latent_patch_size": 2})):
        vae = klvae.AutoencoderKL(klvae.get_preset(preset).replace(**changes))
        for store in ("moments", "sample", "scaled"):
            out = tmp_path / f"{preset}-{changes}-{store}"
            opts = cache.CacheOptions(resolution=64, buckets=True, store=store, shard_size=3, num_workers=0)
            cache.cache_rank(vae, str(data), out, opts, torch.float32)
            shapes = integrity.row_shapes(vae.config, store)
            for rec in cache.read_manifest(out / "manifest-rank000.jsonl", shards=True):
                assert integrity.shard_problem(out / rec["shard"], rec["rows"], shapes) is None


# ---- 1b. the reader: a damaged or missing shard is a one-line LatentsError naming it ----


def test_the_reader_names_a_damaged_or_missing_shard_in_one_line(tmp_path: Path, finished: Path) -> None:
    out = copy_cache(finished, tmp_path)
    ds = LatentDataset(out)
    rows = {it["shard"]: i for i, it in enumerate(ds.items)}
    _cut(out / "rank000-00001.safetensors", 100)
    (out / "rank000-00002.safetensors").unlink()
    with pytest.raises(LatentsError, match=r"rank000-00001\.safetensors: cannot read 00000\d\.mean \(.*header") as e:
        ds[rows["rank000-00001.safetensors"]]
    assert "\n" not in str(e.value)
    with pytest.raises(LatentsError, match=r"rank000-00002\.safetensors, which .*index\.json names, is missing"):
        ds[rows["rank000-00002.safetensors"]]
    ds[rows["rank000-00000.safetensors"]]  # the whole one still reads
    (out / "index.json").write_text("{not json")
    with pytest.raises(LatentsError, match="is not a klvae latent cache index"):
        LatentDataset(out)


# ---- 2. a .tar shard cut inside a member's header is cut short, not complete ----


def _tar_bytes(n: int, fmt: int = tarfile.PAX_FORMAT) -> tuple[bytes, list[tarfile.TarInfo]]:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for k in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(png, format="PNG")
            info = tarfile.TarInfo(f"{k:05d}.png")
            info.size = len(png.getvalue())
            info.pax_headers = {"comment": "x"} if fmt == tarfile.PAX_FORMAT else {}  # a header of 3 blocks
            tf.addfile(info, io.BytesIO(png.getvalue()))
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        return buf.getvalue(), tf.getmembers()


@pytest.mark.parametrize(("fmt", "where"), [
    (tarfile.PAX_FORMAT, 100), (tarfile.PAX_FORMAT, 700), (tarfile.USTAR_FORMAT, 300), (tarfile.USTAR_FORMAT, 0),
], ids=["pax-header", "pax-ustar-block", "ustar-header", "between-members"])
@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_a_tar_cut_inside_a_members_header_is_a_shard_cut_short(tmp_path: Path, fmt: int, where: int,
                                                                gz: bool) -> None:
    whole, members = _tar_bytes(5, fmt)
    cut = whole[: members[3].offset + where]  # three members whole, the fourth's header cut (or not begun)
    path = tmp_path / ("trunc.tar.gz" if gz else "trunc.tar")
    path.write_bytes(gzip.compress(cut) if gz else cut)
    source = open_source(str(path))
    assert source.ids == [f"{path.name}:{k:05d}.png" for k in range(3)]
    assert len(source.unreadable) == 1
    # A cut in a PAX header's own data tarfile always raised for; the others it took for the archive's end.
    said = "" if where == 700 else f": the archive ends at byte {len(cut)}, inside a member's header"
    assert source.unreadable[0][1].startswith(f"cut short after 3 image(s){said}")
    assert source.load(source.ids[2]).size == (48, 40)


def test_whole_tars_are_not_taken_for_cut_ones(tmp_path: Path) -> None:
    for fmt in (tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        whole, members = _tar_bytes(3, fmt)
        last = members[-1]
        end = last.offset_data + -(-last.size // 512) * 512  # the members' end: the end-of-archive zeros follow
        for name, body in (("whole.tar", whole), ("one-zero-block.tar", whole[: end + 512]),
                           ("whole.tar.gz", gzip.compress(whole))):
            (tmp_path / name).write_bytes(body)
            source = open_source(str(tmp_path / name))
            assert len(source.ids) == 3 and source.unreadable == [], (fmt, name)


def test_a_block_past_the_members_that_is_no_header_is_reported(tmp_path: Path) -> None:
    whole, members = _tar_bytes(4, tarfile.USTAR_FORMAT)
    at = members[2].offset
    (tmp_path / "junk.tar").write_bytes(whole[:at] + b"\x07" * 512 + whole[at + 512 :])
    source = open_source(str(tmp_path / "junk.tar"))
    assert len(source.ids) == 2 and source.unreadable[0][1] == f"cut short after 2 image(s): no tar header at byte {at}"


@pytest.mark.parametrize("job", ["cache", "eval"])
def test_cache_and_eval_count_a_tar_cut_in_a_header_as_skipped(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], job: str
) -> None:
    whole, members = _tar_bytes(5)
    path = tmp_path / "trunc.tar"
    path.write_bytes(whole[: members[3].offset + 100])
    out = tmp_path / "out"
    argv = ["-q", job, "--data", str(path), "-o", str(out), "--model", str(model), "--resolution", "32",
            "--device", "cpu", *(["--num-workers", "0"] if job == "cache" else ["--no-lpips", "--no-fid"])]
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert f"skipping tar shard {path}: cut short after 3 image(s)" in captured.err
    if job == "cache":
        assert "cached 3 rows" in captured.out and "1 unreadable tar shard skipped" in captured.out
    else:
        skipped = json.loads((out / "summary.json").read_text())["images"]["skipped_items"]
        assert [s["id"] for s in skipped] == [str(path)]
