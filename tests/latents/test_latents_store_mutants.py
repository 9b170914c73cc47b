"""Pins what a mutation audit of the cache's verify, integrity, resume and reader modules found untested: the
verify summary's counts, plural and "and N more", the unfinished reasons (no index, no cache index, how many
shards it lists), the hashed/unverified flags and their log lines, a hash mismatch winning over a header's,
unreadable bytes, the index's recorded hashes and "stored" layout checks (bools, zeros, empty lists), the
trusted shards' layout vote and the inferred shapes' rounding; read_header's permission error and folder
message, rows_problem's messages, the SHA-256 kept off a dropped line, its "dropped" name and the deletions;
the refusal messages' old/new order, world size, fingerprint prefix and OptionError type; and the reader's
checks, verify=True, per-item and per-epoch noise, handles, pickling, collate and the bucket sampler's guards."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import klvae
from helpers import cache_vae, copy_cache, one_line, read_index, small_cache
from klvae.errors import KlvaeError, LatentsError, OptionError
from klvae.latents import dataset as dataset_mod
from klvae.latents import integrity, repair_cache, verify_cache
from klvae.latents import verify as verify_mod
from klvae.latents.cache import read_manifest
from klvae.latents.dataset import BucketBatchSampler, LatentDataset, collate_latents
from klvae.latents.resume import refusal
from klvae.latents.verify import CacheReport, ShardCheck

SHARDS = [f"rank000-0000{n}.safetensors" for n in range(3)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished moments cache of six 32x32 images in three shards of two rows (tests change copies of it)."""
    return small_cache(tmp_path_factory.mktemp("finished"), 6, cache_vae())


def _manifest_path(out: Path) -> Path:
    return out / "manifest-rank000.jsonl"


def _write_manifest(out: Path, records: list[dict]) -> None:
    _manifest_path(out).write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_index(out: Path, index: dict) -> None:
    (out / "index.json").write_text(json.dumps(index))


def _reshape_shard(out: Path, name: str, rehash: bool) -> None:
    # The shard's tensors cropped by one latent row (a whole file of another shape); with `rehash`, its manifest
    # line records the new file's SHA-256, so that the hash matches and the header alone tells the damage.
    path = out / name
    save_file({k: v[:, :-1].contiguous() for k, v in load_file(path).items()}, path)
    if rehash:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        _write_manifest(
            out, [{**r, "sha256": digest} if r.get("shard") == name else r for r in read_manifest(_manifest_path(out))]
        )


def _drop_hashes(out: Path, names: list[str]) -> None:
    _write_manifest(
        out,
        [
            {k: v for k, v in r.items() if not (k == "sha256" and r.get("shard") in names)}
            for r in read_manifest(_manifest_path(out))
        ],
    )


# ---- CacheReport.summary -----------------------------------------------------------------------------------------


def test_summary_counts_plural_unverified_damaged_more_and_unfinished(tmp_path: Path) -> None:
    damaged = [ShardCheck(f"s{i}", 1, "cut", True) for i in range(7)]
    report = CacheReport(
        tmp_path, "manifests", [ShardCheck("ok", 1, None, True), ShardCheck("old", 1, None, False), *damaged], "why not"
    )
    assert report.summary() == (
        f"{tmp_path}: 1 shard ok, 1 unverified (written by an older klvae: header checked "
        "only), 7 damaged: s0, s1, s2, s3, s4 and 2 more; unfinished: why not"
    )
    assert [c.name for c in report.unverified] == ["old"] and not report.ok
    assert CacheReport(tmp_path, "manifests", []).summary() == f"{tmp_path}: 0 shards ok"


# ---- verify_cache --------------------------------------------------------------------------------------------------


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(KlvaeError, match=r"is not a klvae cache: not a folder$"):
        verify_cache(tmp_path / "f")


def test_a_whole_cache_logs_nothing_and_is_all_hashed(finished: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="klvae"):
        report = verify_cache(finished)
    assert report.ok and report.unfinished is None and report.source == "manifests"
    assert [(c.name, c.rows, c.hashed) for c in report.shards] == [(n, 2, True) for n in SHARDS]
    assert "no recorded SHA-256" not in caplog.text and "damaged" not in caplog.text


@pytest.mark.parametrize(
    ("index", "why"),
    [
        (None, "no index.json yet"),
        ("garbage", "its index.json is no klvae cache index"),
        ("no-str-shard", "its index.json is no klvae cache index"),
        ("first-shard-only", "index.json lists 1 of the 3 shards the manifests record"),
        ("first-shard-and-a-stranger", "index.json lists 1 of the 3 shards the manifests record"),
    ],
)
def test_an_unfinished_cache_says_why(finished: Path, tmp_path: Path, index: str | None, why: str) -> None:
    out = copy_cache(finished, tmp_path)
    full = read_index(out)
    if index is None:
        (out / "index.json").unlink()
    elif index == "garbage":
        (out / "index.json").write_text("{")
    elif index == "no-str-shard":
        _write_index(out, {**full, "items": [{**it, "shard": 5} for it in full["items"]]})
    else:
        items = [it for it in full["items"] if it["shard"] == SHARDS[0]]
        if index == "first-shard-and-a-stranger":
            items.append({**items[0], "shard": "rank001-00000.safetensors"})
        _write_index(out, {**full, "items": items})
    report = verify_cache(out)
    # A shard the index lists is checked, whether or not a manifest records it: the stranger is not there.
    stranger = [("rank001-00000.safetensors", "it is missing")] if index == "first-shard-and-a-stranger" else []
    assert [(c.name, c.problem) for c in report.damaged] == stranger
    assert report.unfinished == f"{why} (a `klvae cache` run is under way or was stopped: the same command finishes it)"
    assert report.summary().endswith(f"; unfinished: {report.unfinished}")


def test_a_shard_of_the_wrong_shape_with_a_matching_hash_is_found_by_its_header(
    finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = copy_cache(finished, tmp_path)
    _reshape_shard(out, SHARDS[1], rehash=True)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        report = verify_cache(out)
    (bad,) = report.damaged
    assert bad.name == SHARDS[1] and bad.hashed and bad.problem.startswith("its 000000.")
    assert f"{out / SHARDS[1]} is damaged (its 000000." in caplog.text


def test_an_old_shard_of_the_wrong_shape_stays_unhashed_and_old_ones_are_logged(
    finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = copy_cache(finished, tmp_path)
    _drop_hashes(out, SHARDS[1:])
    _reshape_shard(out, SHARDS[1], rehash=False)
    with caplog.at_level(logging.INFO, logger="klvae"):
        report = verify_cache(out)
    assert [(c.name, c.hashed, c.problem is None) for c in report.shards] == [
        (SHARDS[0], True, True),
        (SHARDS[1], False, False),
        (SHARDS[2], False, True),
    ]
    assert [c.name for c in report.unverified] == [SHARDS[2]]
    assert "1 shard(s) have no recorded SHA-256" in caplog.text


def test_a_hash_mismatch_is_reported_over_the_header_it_also_breaks(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    recorded = next(r["sha256"] for r in read_manifest(_manifest_path(out)) if r.get("shard") == SHARDS[0])
    _reshape_shard(out, SHARDS[0], rehash=False)
    (bad,) = verify_cache(out).damaged
    digest = hashlib.sha256((out / SHARDS[0]).read_bytes()).hexdigest()
    assert bad.problem == (
        f"its bytes differ from those written (SHA-256 {digest[:12]}..., recorded {recorded[:12]}...)"
    )


def test_a_shard_that_cannot_be_read_is_damaged(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(path: Path, update: object = None) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(verify_mod, "file_sha256", fail)
    report = verify_cache(finished)
    assert [c.problem for c in report.shards] == ["it cannot be read: Input/output error"] * 3


def test_a_repaired_cache_verifies_and_repair_returns_every_name_sorted(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    for name in (SHARDS[2], SHARDS[0]):
        _reshape_shard(out, name, rehash=False)
    assert repair_cache(out) == [SHARDS[0], SHARDS[2]]
    assert not (out / SHARDS[0]).exists() and not (out / SHARDS[2]).exists()
    # The dropped lines (of no shard) are no shards to verify.
    report = verify_cache(out)
    assert [c.name for c in report.shards] == [SHARDS[1]] and report.ok


def test_a_whole_copy_without_manifests_is_repaired_with_nothing_to_do(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    _manifest_path(out).unlink()
    report = verify_cache(out)
    assert report.source == "index.json" and report.ok and all(c.hashed for c in report.shards)
    assert repair_cache(out, report) == []


def test_a_copy_without_manifests_ignores_a_recorded_hash_that_is_no_string(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    _manifest_path(out).unlink()
    index = read_index(out)
    index["shards"][SHARDS[1]]["sha256"] = 5
    _write_index(out, index)
    report = verify_cache(out)
    assert report.ok and [c.name for c in report.unverified] == [SHARDS[1]]


def test_a_copy_without_manifests_and_with_a_bad_index_is_named_so(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    _manifest_path(out).unlink()
    (out / "index.json").write_text("[]")
    with pytest.raises(KlvaeError, match=r"index\.json is not a klvae latent cache index$"):
        verify_cache(out)


@pytest.mark.parametrize(
    "stored", [{"channels": True}, {"channels": 0}, {"downsample_factor": False}, {"downsample_factor": 0}]
)
def test_an_index_layout_of_bools_or_zeros_is_no_layout(finished: Path, tmp_path: Path, stored: dict) -> None:
    out = copy_cache(finished, tmp_path)
    index = read_index(out)
    index["stored"].update(stored)
    _write_index(out, index)
    assert verify_cache(out).ok  # the shards' own layout decides


def test_an_index_layout_without_tensors_leaves_the_shards_majority_to_decide(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    index = read_index(out)
    index["stored"]["tensors"] = []
    _write_index(out, index)
    _reshape_shard(out, SHARDS[1], rehash=True)
    assert [c.name for c in verify_cache(out).damaged] == [SHARDS[1]]


def test_without_an_index_layout_the_hashed_shards_outvote_the_unhashed(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    index = read_index(out)
    del index["stored"]
    _write_index(out, index)
    _drop_hashes(out, SHARDS[1:])
    for name in SHARDS[1:]:
        _reshape_shard(out, name, rehash=False)
    assert [c.name for c in verify_cache(out).damaged] == SHARDS[1:]


def test_a_first_row_with_a_bucket_of_strings_gets_no_vote(finished: Path, tmp_path: Path) -> None:
    out = copy_cache(finished, tmp_path)
    index = read_index(out)
    del index["stored"]
    _write_index(out, index)
    records = read_manifest(_manifest_path(out))
    for r in records:
        if r.get("shard") == SHARDS[0]:
            r["rows"][0]["bucket"] = ["32", 32]
    _write_manifest(out, records)
    (bad,) = verify_cache(out).damaged
    assert bad.name == SHARDS[0] and bad.problem.endswith("no row number or bucket")


def test_row_layout_ratios_and_inferred_shapes_round_up() -> None:
    found = {"000000.mean": (4, 4, 6), "000000.logvar": (4, 4, 6)}
    layout = verify_mod._row_layout(found, [{"row": 0, "bucket": [32, 48]}])
    assert layout == (("logvar", "mean"), 4, 8, 8)
    assert verify_mod._row_layout({"000000.mean": (4, 0, 6)}, [{"row": 0, "bucket": [32, 48]}]) is None
    assert verify_mod._layout_shapes(layout)([36, 44]) == {"logvar": (4, 5, 6), "mean": (4, 5, 6)}


# ---- integrity -----------------------------------------------------------------------------------------------------


def test_stored_tensors_and_row_shapes_of_a_patched_model() -> None:
    cfg = klvae.get_preset("tiny").replace(latent_patch_size=2)
    c, f = cfg.latent_channels, cfg.downsample_factor
    assert integrity.stored_tensors(cfg, "moments") == {
        "tensors": ["mean", "logvar"],
        "channels": c,
        "downsample_factor": f,
    }
    assert integrity.stored_tensors(cfg, "sample") == {"tensors": ["latent"], "channels": c, "downsample_factor": f}
    assert integrity.stored_tensors(cfg, "scaled") == {
        "tensors": ["latent"],
        "channels": 4 * c,
        "downsample_factor": 2 * f,
    }
    side = 2 * f  # one padding step
    assert integrity.row_shapes(cfg, "sample")([side + 1, 3 * side]) == {"latent": (c, 4, 6)}
    assert integrity.row_shapes(cfg, "scaled")([side + 1, 3 * side]) == {"latent": (4 * c, 2, 3)}


def test_read_header_of_a_folder_says_so_and_refuses_a_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert integrity.read_header(tmp_path) == "Is a directory"
    shard = tmp_path / "s.safetensors"
    shard.write_bytes(b"")

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(KlvaeError, match=r"cannot read .*s\.safetensors: Permission denied; fix its permissions"):
        integrity.read_header(shard)


def test_rows_problem_messages() -> None:
    def shapes(bucket: list[int]) -> dict[str, tuple[int, ...]]:
        return {"latent": (4, bucket[0] // 8, bucket[1] // 8)}

    found = {"000001.latent": (4, 4, 6)}
    row = {"source": "a.png", "row": 1, "bucket": [32, 48]}
    assert integrity.rows_problem(found, [row], shapes) is None
    assert integrity.rows_problem(found, [{**row, "bucket": [0, 48]}], shapes) == (
        "its manifest line gives a.png no row number or bucket"
    )
    assert integrity.rows_problem(found, [{**row, "row": 2}], shapes) == "it has no tensor 000002.latent"
    assert integrity.rows_problem({"000001.latent": (4, 5, 6)}, [row], shapes) == (
        "its 000001.latent is [4, 5, 6], not [4, 4, 6]"
    )


def test_save_shard_returns_the_files_lowercase_sha256(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    digest = integrity.save_shard(path, {"x": torch.ones(2)}, {"k": "v"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_drop_damaged_warns_drops_the_hash_names_the_shard_and_deletes_it(
    finished: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = copy_cache(finished, tmp_path)
    _reshape_shard(out, SHARDS[1], rehash=False)
    records = read_manifest(_manifest_path(out))
    cfg = klvae.get_preset("tiny")
    with caplog.at_level(logging.WARNING, logger="klvae"):
        kept = integrity.drop_damaged(out, _manifest_path(out), records, integrity.row_shapes(cfg, "moments"))
    assert (
        f"{out / SHARDS[1]} is damaged (its 000000." in caplog.text and "2 row(s) will be encoded again" in caplog.text
    )
    (dropped,) = [r for r in kept if r.get("dropped")]
    assert dropped["dropped"] == SHARDS[1] and dropped["shard"] is None and dropped["rows"] == []
    assert "sha256" not in dropped and "options" in dropped
    assert read_manifest(_manifest_path(out)) == kept
    assert not (out / "index.json").exists() and not (out / SHARDS[1]).exists() and (out / SHARDS[0]).exists()


# ---- resume refusals -------------------------------------------------------------------------------------------------


def test_refusal_messages_name_the_old_value_then_this_runs(tmp_path: Path) -> None:
    old, new = "a" * 12 + "OLDTAIL", "b" * 12 + "NEWTAIL"
    whole = str(refusal(tmp_path, "model_fingerprint", {"model_fingerprint": old}, new))
    assert f"(fingerprint {'a' * 12}, this one's {'b' * 12};" in whole and "TAIL" not in whole
    assert whole.endswith(", or write to another folder")
    assert refusal(tmp_path, "model_fingerprint", {"model_fingerprint": old, "encoder_fingerprint": old}, new) is None
    enc = str(refusal(tmp_path, "encoder_fingerprint", {"encoder_fingerprint": old}, new))
    assert f"(encoder fingerprint {'a' * 12}, this one's {'b' * 12})" in enc
    world = refusal(tmp_path, "world_size", {"world_size": 2}, 1)
    assert type(world) is KlvaeError
    assert str(world) == (
        f"{tmp_path} holds a cache made by 2 processes, not 1: resume it with the same number of "
        "processes (torchrun --nproc-per-node), or write to another folder"
    )
    factors = refusal(tmp_path, "factors_fingerprint", {"factors_fingerprint": old}, new)
    assert type(factors) is KlvaeError and "latents scaled with another model's factors" in str(factors)


def test_an_options_refusal_is_an_option_error_naming_both_values(tmp_path: Path) -> None:
    e = refusal(tmp_path, "shard_size", {"shard_size": 2}, 3)
    assert isinstance(e, OptionError)
    assert str(e) == (
        f"{tmp_path} holds a cache made with shard_size=2 (this run: shard_size=3): resume it with the "
        "same options, or write to another folder"
    )
    assert "--shard-size 2 (this run: --shard-size 3)" in e.flags()


# ---- LatentDataset ---------------------------------------------------------------------------------------------------


def test_the_reader_refuses_a_missing_or_optionless_index_and_a_bad_mode(finished: Path, tmp_path: Path) -> None:
    with pytest.raises(LatentsError, match=r"has no index\.json: run `klvae cache` to completion first"):
        LatentDataset(tmp_path)
    out = copy_cache(finished, tmp_path)
    index = read_index(out)
    with pytest.raises(LatentsError, match="mode must be sample or mean, got 'x'"):
        LatentDataset(out, mode="x")
    del index["options"]["store"]
    _write_index(out, index)
    with pytest.raises(LatentsError, match=r"index\.json is not a klvae latent cache index$"):
        LatentDataset(out)


def test_verify_true_refuses_a_damaged_cache_naming_it(finished: Path, tmp_path: Path) -> None:
    assert LatentDataset(finished, verify=True).mode == "sample"  # whole: no error; sampling by default
    out = copy_cache(finished, tmp_path)
    _reshape_shard(out, SHARDS[1], rehash=False)
    LatentDataset(out)  # without verify, nothing is read
    with pytest.raises(LatentsError) as e:
        LatentDataset(out, verify=True)
    assert one_line(e).startswith(f"{out}: 2 shards ok, 1 damaged: {SHARDS[1]}: `klvae cache --verify --repair -o ")


def test_drawn_noise_depends_on_item_and_epoch_from_epoch_zero(finished: Path) -> None:
    ds, mean = LatentDataset(finished, seed=3), LatentDataset(finished, mode="mean")
    assert ds.epoch == 0
    first = [ds[i]["latents"] - mean[i]["latents"] for i in range(2)]
    ds.set_epoch(1)
    again = ds[0]["latents"] - mean[0]["latents"]
    assert not torch.allclose(first[0], again)
    ds.set_epoch(0)
    assert torch.equal(ds[0]["latents"] - mean[0]["latents"], first[0])
    # Each item its own generator, keyed by (seed, epoch, item).
    seeds = set()
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seeds |= {ds._generator(i).initial_seed() for i in (0, 1)}
    assert len(seeds) == 4 and LatentDataset(finished)._generator(0) is None


def test_the_reader_keeps_one_handle_per_shard_and_pickles_without_them(finished: Path) -> None:
    ds = LatentDataset(finished, mode="mean")
    item = ds[0]
    assert item["flip"] is False and set(ds._handles) == {SHARDS[0]}
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._handles == {} and torch.equal(copy[0]["latents"], item["latents"])


def test_a_shard_that_cannot_be_opened_is_a_latents_error(finished: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dataset_mod, "safe_open", denied)
    with pytest.raises(LatentsError) as e:
        LatentDataset(finished, mode="mean")[0]
    assert one_line(e) == f"{finished / SHARDS[0]}: cannot read 000000.mean: [Errno 13] Permission denied"


def test_collate_refuses_two_sizes_naming_them_and_keeps_each_items_fields(finished: Path) -> None:
    ds = LatentDataset(finished, mode="mean")
    batch = collate_latents([ds[0], ds[1]])
    assert batch["source"] == [ds.items[0]["source"], ds.items[1]["source"]] and batch["latents"].shape[0] == 2
    small = {**ds[1], "latents": ds[1]["latents"][:, :-1]}
    with pytest.raises(LatentsError) as e:
        collate_latents([ds[0], small])
    shapes = sorted({tuple(ds[0]["latents"].shape), tuple(small["latents"].shape)})
    assert one_line(e).startswith(f"latents of 2 sizes in one batch ({shapes[0]}, {shapes[1]}): batch with ")


def test_bucket_sampler_guards_and_default_shuffle(finished: Path) -> None:
    ds = LatentDataset(finished, mode="mean")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        BucketBatchSampler(ds, batch_size=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_replicas=2\), got 2"):
        BucketBatchSampler(ds, batch_size=1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match=r"num_replicas must be an integer >= 1, got 0"):
        BucketBatchSampler(ds, batch_size=1, num_replicas=0)
    with pytest.raises(ValueError, match=r"num_replicas must be an integer >= 1, got '2'"):
        BucketBatchSampler(ds, batch_size=1, num_replicas="2", rank=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank must be an integer >= 0, got 0.0"):
        BucketBatchSampler(ds, batch_size=1, num_replicas=2, rank=0.0)  # type: ignore[arg-type]
    orders = {tuple(i for b in BucketBatchSampler(ds, batch_size=1, seed=s) for i in b) for s in range(4)}
    assert len(orders) > 1 and all(sorted(o) == list(range(6)) for o in orders)


def test_bucket_sampler_shuffles_the_order_of_batches_across_buckets() -> None:
    two_buckets = SimpleNamespace(items=[{"bucket": [32, 32]}] * 4 + [{"bucket": [32, 48]}] * 4)
    runs = []
    for seed in range(8):
        batches = list(BucketBatchSampler(two_buckets, batch_size=2, seed=seed))
        assert sorted(i for b in batches for i in b) == list(range(8))
        runs.append([b[0] < 4 for b in batches])
    # Grouped by bucket (all of one, then all of the other) every time would be no shuffle of the batches.
    assert any(r not in ([True] * 2 + [False] * 2, [False] * 2 + [True] * 2) for r in runs)
