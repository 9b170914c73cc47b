"""Content checksums of cache shards: the SHA-256 recorded when each is written, `klvae cache --verify` reading
every shard against it (damage inside the tensor data, which a resume's header check misses), old caches without
hashes, and the repair path that has the next run encode exactly the damaged shard's rows again."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import klvae
from helpers import CACHE_ROWS, cache_args, cache_images, copy_cache, finished_cache, saved_tiny_model
from klvae.cli.main import main
from klvae.errors import KlvaeError, LatentsError
from klvae.latents import cache, integrity, repair_cache, verify_cache
from klvae.latents.dataset import LatentDataset

ROWS = CACHE_ROWS
SHARDS = [f"rank000-0000{n}.safetensors" for n in range(3)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cache_images(tmp_path_factory.mktemp("data"))


def _verify(out: Path, *extra: str) -> int:
    return main(["-q", "cache", "--verify", "-o", str(out), *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, model: Path, data: Path) -> Path:
    return finished_cache(tmp_path_factory, model, data)


def _flip_a_data_byte(path: Path) -> None:
    # One byte in the middle of the tensor data: the header, and so the file's length, stay whole.
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[(start + len(raw)) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _manifest(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "manifest-rank000.jsonl").read_text().splitlines()]


def _make_old(out: Path) -> None:
    # As an older klvae wrote it: no SHA-256 on the manifest lines, no "shards" in index.json.
    recs = [{k: v for k, v in rec.items() if k != "sha256"} for rec in _manifest(out)]
    (out / "manifest-rank000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    index = json.loads((out / "index.json").read_text())
    del index["shards"]
    (out / "index.json").write_text(json.dumps(index))


def _latents_by_row(out: Path) -> dict[tuple[str, bool], torch.Tensor]:
    ds = LatentDataset(out, mode="mean")
    return {(it["source"], it["flip"]): ds[i]["latents"] for i, it in enumerate(ds.items)}


# ---- the recorded hashes ----


def test_each_shard_s_sha256_is_recorded_in_its_manifest_line_and_the_index(finished: Path) -> None:
    lines = [rec for rec in _manifest(finished) if rec.get("shard")]
    assert [rec["shard"] for rec in lines] == SHARDS
    index = json.loads((finished / "index.json").read_text())
    for rec in lines:
        digest = hashlib.sha256((finished / rec["shard"]).read_bytes()).hexdigest()
        assert rec["sha256"] == digest
        assert index["shards"][rec["shard"]] == {"sha256": digest}
    assert set(index["shards"]) == {it["shard"] for it in index["items"]}


def test_a_whole_cache_verifies(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_cache(finished)
    assert report.ok and report.source == "manifests" and report.unverified == []
    assert [(c.name, c.rows, c.problem, c.hashed) for c in report.shards] == [
        (SHARDS[0], 3, None, True), (SHARDS[1], 3, None, True), (SHARDS[2], 2, None, True)]
    capsys.readouterr()
    assert _verify(finished) == 0
    assert capsys.readouterr().out == f"{finished}: 3 shards ok\n"
    assert len(LatentDataset(finished, verify=True)) == 8


# ---- damage inside the tensor data: missed by the header check, found by --verify ----


def test_one_flipped_byte_in_the_tensor_data_is_found(
    tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_cache(finished, tmp_path)
    shard = out / SHARDS[1]
    _flip_a_data_byte(shard)
    rows = next(rec["rows"] for rec in _manifest(out) if rec.get("shard") == SHARDS[1])
    shapes = integrity.row_shapes(klvae.get_preset("tiny"), "moments")
    assert integrity.shard_problem(shard, rows, shapes) is None  # the resume's check sees nothing
    report = verify_cache(out)
    assert not report.ok and [c.name for c in report.damaged] == [SHARDS[1]]
    assert report.damaged[0].problem.startswith("its bytes differ from those written (SHA-256 ")
    capsys.readouterr()
    assert _verify(out) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{out}: 2 shards ok, 1 damaged: {SHARDS[1]}; to encode their rows again, run "
                                   f"`klvae cache --verify --repair -o {out}`, then the same `klvae cache` command")
    assert captured.out.count("\n") == 1
    with pytest.raises(LatentsError, match=rf"1 damaged: {SHARDS[1]}: `klvae cache --verify --repair"):
        LatentDataset(out, verify=True)
    assert len(LatentDataset(out)) == 8  # without verify=True, construction reads no shard


@pytest.mark.parametrize("damage", ["truncated", "missing", "wrong-shape"])
def test_a_cut_missing_or_swapped_shard_is_damaged(tmp_path: Path, finished: Path, damage: str) -> None:
    out = copy_cache(finished, tmp_path)
    shard = out / SHARDS[2]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:300])
    elif damage == "missing":
        shard.unlink()
    else:
        save_file({f"{r:06d}.{f}": torch.zeros(4, 8, 8) for r in range(2) for f in ("mean", "logvar")}, str(shard))
    (problem,) = [c.problem for c in verify_cache(out).damaged]
    assert {"truncated": "header", "missing": "it is missing", "wrong-shape": "its bytes differ"}[damage] in problem


# ---- the repair path: exactly the damaged shard's rows encoded again ----


def test_repair_then_the_same_cache_command_re_encodes_exactly_the_damaged_rows(
    tmp_path: Path, model: Path, data: Path, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_cache(finished, tmp_path)
    before = _latents_by_row(finished)
    damaged_rows = {(m["source"], m["flip"]) for rec in _manifest(out) if rec.get("shard") == SHARDS[1]
                    for m in rec["rows"]}
    _flip_a_data_byte(out / SHARDS[1])
    capsys.readouterr()
    assert _verify(out, "--repair") == 1
    assert "dropped them: run the same `klvae cache` command again" in capsys.readouterr().out
    assert not (out / SHARDS[1]).exists() and not (out / "index.json").exists()
    assert [rec.get("dropped") for rec in _manifest(out)].count(SHARDS[1]) == 1
    assert main(cache_args(data, out, model)) == 0
    assert "encoded 3 images" in (said := capsys.readouterr().out) and "5 were done before" in said
    new = [rec for rec in _manifest(out) if rec.get("shard") == "rank000-00003.safetensors"]
    assert len(new) == 1 and {(m["source"], m["flip"]) for m in new[0]["rows"]} == damaged_rows
    after = _latents_by_row(out)
    assert after.keys() == before.keys()
    for key in before:
        # The same rows, to rounding: the repair encodes them in other batches, and channels_last convolutions
        # (the CLI's on the CPU, as on a GPU) round by the batch.
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    report = verify_cache(out)
    assert report.ok and sorted(c.name for c in report.shards) == [SHARDS[0], SHARDS[2], "rank000-00003.safetensors"]


def test_deleting_a_shard_by_hand_is_refused_by_a_resume_but_repair_mends_it(
    tmp_path: Path, model: Path, data: Path, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Why --repair exists: a resume takes a shard its manifest names but that is gone for a loss it did not
    # cause, and refuses to touch the folder.
    out = copy_cache(finished, tmp_path)
    (out / SHARDS[0]).unlink()
    capsys.readouterr()
    assert main(cache_args(data, out, model)) == 2
    assert f"names '{SHARDS[0]}', which is missing" in capsys.readouterr().err
    assert _verify(out, "--repair") == 1
    assert main(cache_args(data, out, model)) == 0
    assert "encoded 3 images" in capsys.readouterr().out
    assert verify_cache(out).ok and len(LatentDataset(out, verify=True)) == 8


def test_repair_with_nothing_damaged_changes_nothing(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    assert repair_cache(out) == []
    assert _verify(out, "--repair") == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


# ---- caches written by an older klvae, and a copy of index.json and shards alone ----


def test_an_old_cache_without_hashes_is_checked_by_header_and_resumes(
    tmp_path: Path, model: Path, data: Path, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_cache(finished, tmp_path)
    _make_old(out)
    report = verify_cache(out)
    assert report.ok and len(report.unverified) == 3
    capsys.readouterr()
    assert _verify(out) == 0
    assert capsys.readouterr().out == (f"{out}: 0 shards ok, 3 unverified (written by an older klvae: header "
                                       "checked only)\n")
    _flip_a_data_byte(out / SHARDS[0])
    assert verify_cache(out).ok  # no hash to compare: data damage in an old shard cannot be seen
    assert len(LatentDataset(out, verify=True)) == 8
    # A resume across old and new lines: the cut shard is dropped and its rows written to a hashed shard.
    (out / SHARDS[1]).write_bytes((out / SHARDS[1]).read_bytes()[:100])
    assert [c.name for c in verify_cache(out).damaged] == [SHARDS[1]]
    assert main(cache_args(data, out, model)) == 0
    report = verify_cache(out)
    assert report.ok and [(c.name, c.hashed) for c in report.shards] == [
        (SHARDS[0], False), (SHARDS[2], False), ("rank000-00003.safetensors", True)]
    assert json.loads((out / "index.json").read_text())["shards"][SHARDS[0]] == {}


def test_an_old_shard_of_the_wrong_shape_is_found_by_its_header(tmp_path: Path, finished: Path) -> None:
    out = copy_cache(finished, tmp_path)
    _make_old(out)
    save_file({f"{r:06d}.{f}": torch.zeros(4, 8, 8) for r in range(3) for f in ("mean", "logvar")},
              str(out / SHARDS[1]))
    (damaged,) = verify_cache(out).damaged
    assert damaged.name == SHARDS[1] and damaged.problem == "its 000000.logvar is [4, 8, 8], not [4, 16, 16]"


def test_the_inferred_shapes_fit_every_store_bucket_and_latent_patch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i, (h, w) in enumerate([(64, 128), (128, 64), (64, 64)] * 2):  # three buckets, mixed within shards
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(data / f"img{i}.png")
    for changes in ({}, {"latent_patch_size": 2}):
        vae = klvae.AutoencoderKL(klvae.get_preset("tiny").replace(**changes))
        for store in ("moments", "sample", "scaled"):
            out = tmp_path / f"{changes}-{store}"
            opts = cache.CacheOptions(resolution=64, buckets=True, store=store, shard_size=3, num_workers=0)
            cache.cache_rank(vae, str(data), out, opts, torch.float32)
            assert len({tuple(m["bucket"]) for rec in _manifest(out) for m in rec["rows"]}) == 3
            assert verify_cache(out).ok
            recs = [{k: v for k, v in r.items() if k != "sha256"} for r in _manifest(out)]
            (out / "manifest-rank000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            report = verify_cache(out)  # no hashes: the shapes come from the shards' votes alone
            assert report.ok and len(report.unverified) == len(report.shards), (changes, store)


def test_a_copy_without_manifests_is_verified_from_the_index(tmp_path: Path, finished: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_cache(finished, tmp_path)
    (out / "manifest-rank000.jsonl").unlink()
    assert verify_cache(out).source == "index.json" and verify_cache(out).ok
    _flip_a_data_byte(out / SHARDS[2])
    report = verify_cache(out)
    assert [c.name for c in report.damaged] == [SHARDS[2]]
    capsys.readouterr()
    assert _verify(out) == 1
    assert "this copy has no manifests: encode their rows again where the cache was made" in capsys.readouterr().out
    with pytest.raises(KlvaeError, match="has no manifests"):
        repair_cache(out, report)
    index = json.loads((out / "index.json").read_text())
    del index["shards"]
    (out / "index.json").write_text(json.dumps(index))
    assert verify_cache(out).ok and len(verify_cache(out).unverified) == 3


# ---- exit statuses and arguments ----


def test_a_folder_that_is_no_cache_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad-index").mkdir()
    (tmp_path / "bad-index" / "index.json").write_text("{not json")
    (tmp_path / "a-file").write_text("x")
    for name, said in (("empty", "is not a klvae cache: it has no manifest-rank*.jsonl or index.json"),
                       ("nowhere", "is not a klvae cache: no such folder"),
                       ("a-file", "is not a klvae cache: not a folder"),
                       ("bad-index", "index.json is not a klvae latent cache index")):
        capsys.readouterr()
        assert _verify(tmp_path / name) == 2, name
        assert said in capsys.readouterr().err, name
    assert not (tmp_path / "nowhere").exists()


def test_repair_needs_verify_and_caching_needs_data(tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["-q", "cache", "--repair", "-o", str(finished)]) == 2
    assert "--repair goes with --verify" in capsys.readouterr().err
    assert main(["-q", "cache", "-o", str(tmp_path / "out")]) == 2
    assert "cache needs --data" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _verify(finished, "--repair") == 2
    assert "not under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- a cache still being written or stopped, shards that are folders or unreadable, a hand-made index ----


def test_an_unfinished_two_rank_cache_is_verified_said_unfinished_and_repaired(
    tmp_path: Path, model: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As torchrun leaves it before rank 0 writes index.json (or while a run goes on): two ranks' manifests.
    vae, out = klvae.AutoencoderKL.from_pretrained(model), tmp_path / "latents"
    opts = cache.CacheOptions(resolution=32, shard_size=3, num_workers=0)
    for rank in (0, 1):
        cache.cache_rank(vae, str(data), out, opts, torch.float32, rank=rank, world=2)
    report = verify_cache(out)
    assert report.ok and len(report.shards) == 4 and report.unfinished.startswith("no index.json yet")
    capsys.readouterr()
    assert _verify(out) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"{out}: 4 shards ok; unfinished: no index.json yet (a `klvae cache` run is under way")
    assert said.count("\n") == 1
    _flip_a_data_byte(out / "rank001-00001.safetensors")
    assert repair_cache(out) == ["rank001-00001.safetensors"]
    assert [rec.get("dropped") for rec in map(json.loads, (out / "manifest-rank001.jsonl").read_text().splitlines())
            ] == [None, "rank001-00001.safetensors"]
    for rank in (0, 1):
        assert cache.cache_rank(vae, str(data), out, opts, torch.float32, rank=rank, world=2)["encoded"] == rank
    cache.write_index(vae, "tiny", out, opts, 2)
    report = verify_cache(out)
    assert report.ok and report.unfinished is None and len(report.shards) == 4
    # An index.json older than the manifests (a run that grows the cache has not written its index yet).
    index = json.loads((out / "index.json").read_text())
    index["items"] = [it for it in index["items"] if it["shard"] != "rank000-00001.safetensors"]
    (out / "index.json").write_text(json.dumps(index))
    assert verify_cache(out).unfinished.startswith("index.json lists 3 of the 4 shards the manifests record")


def test_a_shard_that_is_a_folder_is_named_so_and_repair_refuses_it(
    tmp_path: Path, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_cache(finished, tmp_path)
    (out / SHARDS[1]).unlink()
    (out / SHARDS[1]).mkdir()
    (damaged,) = verify_cache(out).damaged
    assert (damaged.name, damaged.problem) == (SHARDS[1], "it is not a file")
    snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    # Dropped, its line would be gone while the folder stayed, and every resume would fail to delete it.
    assert _verify(out, "--repair") == 2
    assert f"{out / SHARDS[1]} is not a file: move it aside, then repair again" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == snapshot


def test_a_shard_without_read_permission_is_refused_not_dropped(
    tmp_path: Path, model: Path, data: Path, finished: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors calls a shard it may not open "No such file or directory": verify named it damaged, and repair
    # (or a resume) deleted a whole file, as an older klvae's 0600 shards of a shared cache are to the rest.
    out = copy_cache(finished, tmp_path)
    shard = out / SHARDS[1]
    if os.geteuid() == 0:  # root reads anything: stand in for the permission check
        real_open = Path.open

        def locked(self: Path, *args: object, **kwargs: object) -> object:
            if self == shard:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "open", locked)
    else:
        shard.chmod(0)
    capsys.readouterr()
    for args in ([], ["--repair"]):
        assert _verify(out, *args) == 2
        assert f"cannot read {shard}: Permission denied; fix its permissions" in capsys.readouterr().err
    assert main(cache_args(data, out, model)) == 2  # a resume's header check refuses it too
    assert f"cannot read {shard}: Permission denied" in capsys.readouterr().err
    shard.chmod(0o644)
    monkeypatch.undo()
    assert shard.read_bytes() == (finished / SHARDS[1]).read_bytes() and (out / "index.json").exists()
    assert verify_cache(out).ok


def test_an_index_row_without_a_source_is_damage_not_a_crash(tmp_path: Path, finished: Path) -> None:
    out = copy_cache(finished, tmp_path)
    (out / "manifest-rank000.jsonl").unlink()
    index = json.loads((out / "index.json").read_text())
    del index["items"][3]["source"], index["items"][3]["row"]
    (out / "index.json").write_text(json.dumps(index))
    (damaged,) = verify_cache(out).damaged
    assert (damaged.name, damaged.problem) == (SHARDS[1], "its manifest line gives a row no row number or bucket")
