"""`klvae cache`: shards + index, exactly once across a kill -9, 2 gloo processes, the reader, buckets, scale."""

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import klvae
from helpers import saved_tiny_model
from klvae import inference
from klvae.cli.main import main
from klvae.errors import LatentsError
from klvae.images import load_image, pil_to_tensor
from klvae.latents.buckets import make_buckets, nearest_bucket, resize_crop
from klvae.latents.cache import keyed_generator, read_manifest
from klvae.latents.dataset import BucketBatchSampler, LatentDataset, collate_latents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("model"), scaling_factor=0.5, shift_factor=0.1)


def _images(root: Path, n: int, bad: int = 0, sizes: tuple[tuple[int, int], ...] = ((48, 64), (64, 40))) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    for i in range(bad):
        (root / f"bad{i}.png").write_bytes(b"not an image")
    return root


def _cache(args: list[str]) -> int:
    return main(["cache", *args])


def test_cache_writes_shards_index_and_the_reader_returns_scaled_latents(tmp_path: Path, model_dir: Path) -> None:
    data = _images(tmp_path / "data", 5, bad=1)
    out = tmp_path / "cache"
    rc = _cache(["--data", str(data), "-o", str(out), "--model", str(model_dir), "--resolution", "32",
                 "--shard-size", "2", "--num-workers", "0", "--flip", "--batch-size", "2"])
    assert rc == 1  # one unreadable file: skipped, counted, the rest finished
    index = json.loads((out / "index.json").read_text())
    assert len(index["items"]) == 10 and index["failed"] == ["bad0.png"]
    assert sorted({(it["source"], it["flip"]) for it in index["items"]}) == sorted(
        (f"img{i:03d}.png", f) for i in range(5) for f in (False, True))
    ds = LatentDataset(out, mode="mean")
    vae = klvae.AutoencoderKL.from_pretrained(model_dir)
    row = next(i for i, it in enumerate(ds.items) if it["source"] == "img002.png" and not it["flip"])
    img, _ = resize_crop(load_image(data / "img002.png"), (32, 32))
    expected = vae.scale_latents(inference.encode(vae, pil_to_tensor(img)[None]).mode())[0]
    torch.testing.assert_close(ds[row]["latents"], expected, atol=1e-5, rtol=1e-5)
    assert ds[row]["latents"].shape == (4, 16, 16)  # the tiny preset downsamples by 2
    sampled = LatentDataset(out, mode="sample", seed=0)[row]["latents"]
    # A posterior sample, scaled like the mean: (mean + std * eps - shift) * scale, eps from (seed, epoch, row).
    moments = inference.encode_moments(vae, pil_to_tensor(img)[None])
    eps = torch.randn(expected.shape, generator=keyed_generator(0, 0, row))
    mean, logvar = moments[0].chunk(2)
    z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
    torch.testing.assert_close(sampled, vae.scale_latents(z), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sampled, expected, atol=1e-3)


def test_an_image_too_elongated_to_cover_the_crop_is_refused_before_scaling() -> None:
    from klvae.errors import ImageError

    strip = Image.new("RGB", (1, 20000))  # to cover 256x256 it would be scaled to 256x5120000
    with pytest.raises(ImageError, match=r"a 1x20000 image is too elongated to cover 256x256: scaled to 256x5120000"):
        resize_crop(strip, (256, 256))
    assert resize_crop(Image.new("RGB", (1, 2000)), (64, 64))[0].size == (64, 64)  # 64x128000 is within bounds


def test_buckets_have_equal_area_and_match_aspect() -> None:
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and abs(h * w - 1024**2) / 1024**2 < 0.13
    assert nearest_bucket(900, 1600, buckets)[1] > nearest_bucket(900, 1600, buckets)[0]


def test_bucketed_cache_batches_by_size(tmp_path: Path, model_dir: Path) -> None:
    data = _images(tmp_path / "data", 6, sizes=((64, 128), (128, 64), (64, 64)))
    out = tmp_path / "cache"
    assert _cache(["--data", str(data), "-o", str(out), "--model", str(model_dir), "--resolution", "64",
                   "--buckets", "--num-workers", "0"]) == 0
    ds = LatentDataset(out, mode="mean")
    for it in ds.items:  # each image in the bucket of its own aspect: (h, w) as the image, never swapped
        bh, bw = it["bucket"]
        h, w = it["size"]
        assert (bh > bw) == (h > w) and (bh < bw) == (h < w), it
    assert len({tuple(it["bucket"]) for it in ds.items}) == 3
    seen: list[int] = []
    for batch in BucketBatchSampler(ds, batch_size=4):
        assert len({ds[i]["latents"].shape for i in batch}) == 1
        seen += batch
    assert sorted(seen) == list(range(len(ds)))  # every row once
    # The collate stacks the tensors and keeps each item's plain fields whole; mixed sizes are named.
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds, batch_size=2, shuffle=False),
                        collate_fn=collate_latents)
    batch, first = next(iter(loader)), next(iter(BucketBatchSampler(ds, batch_size=2, shuffle=False)))
    assert batch["latents"].shape == (2, *ds[first[0]]["latents"].shape)
    assert batch["add_time_ids"].shape == (2, 6) and batch["add_time_ids"].dtype == torch.int64
    assert batch["size"] == [ds.items[i]["size"] for i in first] and batch["flip"] == [False, False]
    assert torch.equal(batch["latents"][1], ds[first[1]]["latents"])
    mixed = [ds[i] for i in range(len(ds))]
    with pytest.raises(LatentsError, match=r"^latents of 3 sizes in one batch .*BucketBatchSampler"):
        collate_latents(mixed)


def test_kill_and_resume_encodes_every_image_exactly_once(tmp_path: Path, model_dir: Path) -> None:
    data = _images(tmp_path / "data", 10, sizes=((64, 64),))
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "klvae.cli.main", "cache", "--data", str(data), "-o", str(out), "--model",
           str(model_dir), "--resolution", "64", "--shard-size", "1", "--batch-size", "1", "--num-workers", "0"]
    # The child kills itself (SIGKILL, no cleanup) right after writing its 4th shard and before recording it,
    # so the test does not race a timer against this machine's speed, and an unrecorded shard is left behind.
    child = ("import os, signal, sys\n"
             "from klvae.latents import cache\n"
             "real, calls = cache._write_shard, []\n"
             "def write_then_die(*a):\n"
             "    rows = real(*a)\n"
             "    calls.append(1)\n"
             "    if len(calls) == 4:\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return rows\n"
             "cache._write_shard = write_then_die\n"
             "from klvae.cli.main import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    killed = subprocess.run([sys.executable, "-c", child, *cmd[3:]], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    manifest = out / "manifest-rank000.jsonl"
    assert len(list(out.glob("*.safetensors"))) == 4  # the 4th shard is on disk but not in the manifest
    first = len(read_manifest(manifest))
    assert first == 3
    assert not (out / "index.json").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    index = json.loads((out / "index.json").read_text())
    sources = [it["source"] for it in index["items"]]
    assert sorted(sources) == [f"img{i:03d}.png" for i in range(10)]  # all, each once
    shards = {p.name for p in out.glob("*.safetensors")}
    assert shards == {it["shard"] for it in index["items"]}  # no orphan shard left behind
    assert len(LatentDataset(out)) == 10


def test_two_gloo_processes_split_the_data_and_write_one_index(tmp_path: Path, model_dir: Path) -> None:
    data = _images(tmp_path / "data", 7)
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "klvae.cli.main", "cache", "--data", str(data), "-o", str(out), "--model", str(model_dir),
           "--resolution", "32", "--num-workers", "0", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert index["world_size"] == 2
    assert sorted(it["source"] for it in index["items"]) == [f"img{i:03d}.png" for i in range(7)]
    assert {it["shard"].split("-")[0] for it in index["items"]} == {"rank000", "rank001"}


def test_scale_estimate_matches_the_latent_statistics(tmp_path: Path, model_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.latents.scale import estimate_factors

    data = _images(tmp_path / "data", 4, sizes=((32, 32),))
    vae = klvae.AutoencoderKL.from_pretrained(model_dir)
    f = estimate_factors(vae, str(data), resolution=32, sample=False)
    zs = torch.cat([inference.encode(vae, pil_to_tensor(load_image(p))[None]).mode().flatten()
                    for p in sorted(data.glob("*.png"))]).double()
    assert f["shift_factor"] == pytest.approx(zs.mean().item(), rel=1e-4)
    assert f["scaling_factor"] == pytest.approx(1 / zs.std(unbiased=False).item(), rel=1e-4)
    saved = tmp_path / "scaled-model"
    args = ["scale", "--data", str(data), "--model", str(model_dir), "--resolution", "32", "--save", str(saved)]
    assert main(args) == 0
    assert "scaling_factor" in capsys.readouterr().out
    cfg = klvae.AutoencoderKL.from_pretrained(saved).config
    # The CLI measures posterior samples (the default, seed 0): the same figures as the library's call.
    sampled = estimate_factors(vae, str(data), resolution=32)
    assert sampled["scaling_factor"] != pytest.approx(f["scaling_factor"], rel=1e-3)  # not the mean's
    assert cfg.scaling_factor == round(sampled["scaling_factor"], 6)  # saved to six decimals
    assert cfg.shift_factor == round(sampled["shift_factor"], 6)


def test_cache_bad_input_is_a_one_line_error(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cache(["--data", str(tmp_path / "missing"), "-o", str(tmp_path / "c"), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such data" in err[0]


@pytest.mark.parametrize(("where", "line"), [
    *(("manifest-rank000.jsonl", line) for line in ["5", "[1, 2]", '{"rows": [5]}', '{"options": 5}', '{"shard": 3}']),
    *(("index.json", line) for line in ["5", "[1, 2]", '{"options": 5}', "{not json"]),
])
def test_a_damaged_manifest_or_index_is_a_one_line_error(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], where: str, line: str
) -> None:
    data, out = _images(tmp_path / "data", 2), tmp_path / "cache"
    args = ["--data", str(data), "-o", str(out), "--model", str(model_dir), "--resolution", "32", "--num-workers", "0"]
    assert _cache(args) == 0
    capsys.readouterr()
    (out / where).write_text(line + "\n")
    assert _cache(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("klvae: error: ") and "the cache is damaged" in err[0], err


def test_a_full_disk_while_writing_a_shard_is_a_one_line_error(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import SafetensorError

    from klvae import atomic

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(atomic, "save_file", full)
    data, out = _images(tmp_path / "data", 2), tmp_path / "cache"
    assert _cache(["--data", str(data), "-o", str(out), "--model", str(model_dir), "--resolution", "32",
                   "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("klvae: error: cannot write ") and "No space left" in err[-1], err
    assert "internal error" not in "".join(err) and not list(out.glob("*.safetensors")) and not list(out.glob(".*"))


def test_a_line_torn_by_a_kill_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    from klvae.latents.cache import _append_line

    manifest = tmp_path / "manifest-rank000.jsonl"
    record = {"shard": "rank000-00000.safetensors", "rows": [{"source": "a.png", "flip": False}], "failed": []}
    manifest.write_text(json.dumps(record) + "\n" + '{"shard": "rank000-000')  # a kill mid-append
    _append_line(manifest, {**record, "shard": "rank000-00001.safetensors"})
    assert [r["shard"] for r in read_manifest(manifest)] == ["rank000-00000.safetensors", "rank000-00001.safetensors"]


class _Killed(BaseException):
    """Stands in for a SIGKILL landing at a chosen write (BaseException: nothing on the way catches it)."""


@pytest.mark.parametrize(("target", "nth", "batch_size"), [
    ("_write_shard", 2, 8),  # killed before the 2nd shard is written
    ("_append_line", 2, 8),  # the 2nd shard written but not recorded: an orphan to delete
    ("_append_line", 2, 3),  # encoder batches of 3 that split an image's two rows as well
])
def test_kill_between_an_images_original_and_flipped_rows_loses_neither(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, target: str, nth: int, batch_size: int
) -> None:
    from klvae.latents import cache

    data = _images(tmp_path / "data", 3, sizes=((32, 32),))
    out = tmp_path / "cache"
    vae = klvae.AutoencoderKL.from_pretrained(model_dir)
    # 3 images x 2 rows in shards of 3: image 1's original and flipped rows fall in different shards.
    opts = cache.CacheOptions(resolution=32, flip=True, shard_size=3, batch_size=batch_size, num_workers=0)
    real, calls = getattr(cache, target), []

    def dying(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == nth:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, target, dying)
    with pytest.raises(_Killed):
        cache.cache_rank(vae, str(data), out, opts, torch.float32)
    monkeypatch.setattr(cache, target, real)
    counts = cache.cache_rank(vae, str(data), out, opts, torch.float32)
    assert counts["failed"] == 0
    index = json.loads(cache.write_index(vae, "tiny", out, opts, 1).read_text())
    assert sorted((it["source"], it["flip"]) for it in index["items"]) == sorted(
        (f"img{i:03d}.png", f) for i in range(3) for f in (False, True))  # all six rows, each once
    assert {p.name for p in out.glob("*.safetensors")} == {it["shard"] for it in index["items"]}
    ds = LatentDataset(out, mode="mean")
    for row, it in enumerate(ds.items):  # and each row holds what its metadata says
        x = pil_to_tensor(load_image(data / it["source"]))[None]
        x = x.flip(-1) if it["flip"] else x
        expected = vae.scale_latents(inference.encode(vae, x).mode())[0]
        torch.testing.assert_close(ds[row]["latents"], expected, atol=1e-5, rtol=1e-5)


def test_a_sampled_cache_resumed_after_a_kill_equals_an_uninterrupted_one(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from klvae.latents import cache

    data = _images(tmp_path / "data", 3, sizes=((32, 32),))
    vae = klvae.AutoencoderKL.from_pretrained(model_dir)

    def rows(out: Path, batch_size: int) -> dict[tuple[str, bool], torch.Tensor]:
        opts = cache.CacheOptions(resolution=32, flip=True, store="sample", seed=7, shard_size=2,
                                  batch_size=batch_size, num_workers=0)
        cache.cache_rank(vae, str(data), out, opts, torch.float32)
        cache.write_index(vae, "tiny", out, opts, 1)
        ds = LatentDataset(out)
        return {(it["source"], it["flip"]): ds[r]["latents"] for r, it in enumerate(ds.items)}

    whole = rows(tmp_path / "whole", batch_size=6)
    real, calls = cache._append_line, []

    def dying(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "_append_line", dying)
    with pytest.raises(_Killed):
        rows(tmp_path / "resumed", batch_size=1)
    monkeypatch.setattr(cache, "_append_line", real)
    resumed = rows(tmp_path / "resumed", batch_size=4)
    assert whole.keys() == resumed.keys() and len(whole) == 6
    for k in whole:  # other batches and a resume, the same noise: it depends on (seed, image, flip) alone
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-5, rtol=0)
    assert not torch.allclose(whole[("img000.png", False)], whole[("img001.png", False)])


@pytest.mark.parametrize(("change", "named"), [
    (["--flip"], "flip"), (["--store", "sample"], "store"), (["--resolution", "128"], "resolution"),
    (["--buckets"], "buckets"),
])
def test_resume_with_other_options_is_refused_before_anything_is_written(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str], change: list[str], named: str
) -> None:
    data = _images(tmp_path / "data", 3, sizes=((64, 64),))
    out = tmp_path / "cache"
    base = ["--data", str(data), "-o", str(out), "--model", str(model_dir), "--resolution", "64",
            "--num-workers", "0", "--shard-size", "1"]
    assert _cache(base) == 0
    for interrupted in (False, True):  # a finished cache (index.json), then one killed before its index
        if interrupted:
            (out / "index.json").unlink()
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        capsys.readouterr()
        assert _cache([*base, *change]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing removed
    # What does not change the rows (shard size, batch size, workers) may change on resume.
    assert _cache([*base, "--shard-size", "2", "--batch-size", "3"]) == 0


def test_sampled_latents_depend_on_seed_and_item_not_on_the_loader_worker(tmp_path: Path, model_dir: Path) -> None:
    import shutil

    from torch.utils.data import DataLoader

    data = _images(tmp_path / "data", 1, sizes=((32, 32),))
    for i in range(1, 4):  # identical images: equal moments, so equal noise would give equal samples
        shutil.copy(data / "img000.png", data / f"img{i:03d}.png")
    out = tmp_path / "cache"
    assert _cache(["--data", str(data), "-o", str(out), "--model", str(model_dir), "--resolution", "32",
                   "--num-workers", "0"]) == 0

    def draw(workers: int, seed: int = 0) -> list[torch.Tensor]:
        loader = DataLoader(LatentDataset(out, mode="sample", seed=seed), batch_size=None, num_workers=workers)
        return [item["latents"] for item in loader]

    two = draw(2)
    assert all(not torch.equal(two[i], two[j]) for i in range(4) for j in range(i))  # workers 0 and 1 too
    for again in (draw(2), draw(0)):  # the same seed: the same noise, whichever worker serves an item
        assert all(torch.equal(a, b) for a, b in zip(two, again, strict=True))
    assert not torch.equal(draw(0, seed=1)[0], two[0])
    ds = LatentDataset(out, mode="sample", seed=0)
    ds.set_epoch(1)  # a new epoch, new noise (augmentation), still reproducible
    assert not torch.equal(ds[0]["latents"], two[0])
    assert torch.equal(ds[0]["latents"], ds[0]["latents"])


def test_scale_skips_and_counts_unreadable_images(tmp_path: Path, model_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.latents.scale import estimate_factors

    data = _images(tmp_path / "data", 3, bad=2, sizes=((32, 32),))
    vae = klvae.AutoencoderKL.from_pretrained(model_dir)
    f = estimate_factors(vae, str(data), resolution=32, seed=5)
    assert f["images"] == 3 and f["skipped"] == 2
    assert estimate_factors(vae, str(data), resolution=32, seed=5) == f  # a seed gives the same samples
    assert main(["scale", "--data", str(data), "--model", str(model_dir), "--resolution", "32"]) == 1
    assert "skipped 2 unreadable" in capsys.readouterr().out


def test_cache_under_torchrun_loads_the_model_on_the_local_ranks_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import klvae.cli.latents as cli_latents
    from klvae import distributed

    events: list[str] = []

    def init(device_type: str) -> distributed.DistInfo:
        events.append(f"init {device_type}")
        return distributed.DistInfo(rank=3, world=4, local_rank=1)

    def load(args: object, before_cast: object = None) -> None:
        events.append(f"load {args.device}")  # type: ignore[attr-defined]
        raise _Killed

    monkeypatch.setattr(distributed, "init_distributed", init)
    monkeypatch.setattr(distributed, "shutdown", lambda info: events.append("shutdown"))
    monkeypatch.setattr(cli_latents, "load_model", load)
    monkeypatch.setattr("klvae.inference.precision.usable_device", lambda d, what="device": torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(f"set_device {d}"))
    data = _images(tmp_path / "data", 1)
    with pytest.raises(_Killed):
        _cache(["--data", str(data), "-o", str(tmp_path / "c"), "--device", "cuda"])
    assert events == ["init cuda", "set_device cuda:1", "load cuda:1", "shutdown"]


def test_rank_device_picks_the_local_ranks_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from klvae.distributed import DistInfo, rank_device

    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    two = DistInfo(rank=3, world=4, local_rank=1)
    assert rank_device(torch.device("cuda"), two) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert rank_device(torch.device("cpu"), two) == torch.device("cpu")
    assert rank_device(torch.device("cuda", 1), DistInfo()) == torch.device("cuda", 1)  # one process: as asked


class _Rows:
    """A stand-in LatentDataset: only `items` with their buckets, which is all the sampler reads."""

    def __init__(self, buckets: list[tuple[int, int]]) -> None:
        self.items = [{"bucket": list(b)} for b in buckets]


def test_bucket_batches_shard_over_ranks_disjoint_equal_in_number_and_covering_the_epoch() -> None:
    rows = _Rows([(8, 8)] * 7 + [(8, 12)] * 5 + [(12, 8)] * 2)  # 14 rows; batches of 3: 3 + 2 + 1 = 6
    ds = cast(LatentDataset, rows)
    whole = list(BucketBatchSampler(ds, batch_size=3, seed=5))
    assert len(whole) == 6
    for world in (2, 4, 8):
        shares = [BucketBatchSampler(ds, batch_size=3, seed=5, num_replicas=world, rank=r) for r in range(world)]
        got = [list(s) for s in shares]
        # Each rank runs as many steps as the others (a collective waits for all) and as its len says.
        assert {len(b) for b in got} == {len(shares[0])} == {-(-6 // world)}
        flat = [tuple(b) for share in got for b in share]
        assert set(flat) == {tuple(b) for b in whole}  # the epoch's batches, every one
        assert len(flat) - len(set(flat)) == len(shares[0]) * world - 6  # repeated only to even the ranks out
        for share in got:
            assert all(len({tuple(rows.items[i]["bucket"]) for i in b}) == 1 for b in share)
    # set_epoch on every rank: a new order, still disjoint.
    a, b = (BucketBatchSampler(ds, batch_size=3, seed=5, num_replicas=2, rank=r) for r in (0, 1))
    for s in (a, b):
        s.set_epoch(1)
    first = list(a) + list(b)
    assert sorted(i for batch in first for i in batch) == list(range(14)) and first != whole


def test_bucket_batches_drop_last_keeps_full_batches_and_bad_ranks_are_refused() -> None:
    ds = cast(LatentDataset, _Rows([(8, 8)] * 7 + [(8, 12)] * 5))
    batches = list(BucketBatchSampler(ds, batch_size=3, drop_last=True))
    assert len(batches) == len(BucketBatchSampler(ds, batch_size=3, drop_last=True)) == 3
    assert all(len(b) == 3 for b in batches)
    with pytest.raises(ValueError, match="rank must be in"):
        BucketBatchSampler(ds, batch_size=3, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(ds, batch_size=0)
