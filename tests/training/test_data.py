"""Training data: transforms, datasets (folder, parquet, save_to_disk, tar shards), skipping bad items, splits."""

from __future__ import annotations

import io
import logging
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

import klvae.images
import klvae.training.data as data_module
from klvae.errors import ImageError, KlvaeError
from klvae.latents.sources import open_source
from klvae.training.data import (
    HFDiskDataset,
    ImageFolderDataset,
    TransformConfig,
    WebDatasetShards,
    build_dataloader,
    build_dataset,
    build_transform,
    collate_skip_none,
    expand_shards,
    resolve_rank,
    set_epoch,
    split_plan,
)

TINY = TransformConfig(resolution=16)


def _encoded(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _tiny(i: int) -> np.ndarray:
    return np.full((8, 12, 3), i * 10 % 256, np.uint8)


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small photos in png/jpg/webp (one in a subfolder), a truncated JPEG and a text file named .png."""
    root = tmp_path_factory.mktemp("folder")
    photos = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
              "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket(),
              "camera": np.stack([skimage.data.camera()] * 3, -1)}
    small = {k: np.asarray(Image.fromarray(v).resize((48, 32), Image.Resampling.LANCZOS)) for k, v in photos.items()}
    Image.fromarray(small["astronaut"]).save(root / "astronaut.png")
    Image.fromarray(small["coffee"]).save(root / "coffee.jpg")
    Image.fromarray(small["chelsea"]).save(root / "chelsea.webp")
    (root / "more").mkdir()
    Image.fromarray(small["rocket"]).save(root / "more" / "rocket.png")
    Image.fromarray(small["camera"]).save(root / "more" / "camera.jpg")
    big = _encoded(skimage.data.coffee(), "JPEG")
    (root / "broken.jpg").write_bytes(big[: len(big) // 3])
    (root / "fake.png").write_text("not a png")
    return root


GOOD = {"astronaut.png", "coffee.jpg", "chelsea.webp", "more/rocket.png", "more/camera.jpg"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three shards of 4 samples each (an image and a caption per sample)."""
    root = tmp_path_factory.mktemp("shards")
    return [_write_tar(root / f"shard-{s:03d}.tar",
                       [(f"s{s}_{i}", {"png": _encoded(_tiny(4 * s + i)), "txt": b"caption"}) for i in range(4)])
            for s in range(3)]


def _keys(ds: WebDatasetShards) -> list[str]:
    return [it["key"] for it in ds if it is not None]


def _photo(w: int = 96, h: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(96, 64), (40, 120), (10, 7), (16, 16)])
@pytest.mark.parametrize("crop", ["center", "random"])
@pytest.mark.parametrize(("resize", "scale"), [(True, (1.0, 1.0)), (True, (0.5, 1.0)), (False, (1.0, 1.0))])
def test_transforms_give_the_resolution(size: tuple[int, int], crop: str, resize: bool,
                                        scale: tuple[float, float]) -> None:
    t = build_transform(TransformConfig(resolution=32, crop=crop, resize=resize, scale=scale, flip=0.5))
    x = t(_photo(*size))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


def test_crops_cut_the_expected_window() -> None:
    img = _photo(96, 64)
    a = np.asarray(img)
    native = build_transform(TransformConfig(resolution=32, resize=False))(img)
    assert np.array_equal(((native + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), a[16:48, 32:64])
    # Half the shorter side at resolution 32 is a 32-pixel window: the same cut, no resampling.
    half = build_transform(TransformConfig(resolution=32, scale=(0.5, 0.5)))(img)
    assert torch.equal(half, native)
    # Scale 1 is resize-the-shorter-side-then-centre-crop (here done in one resampling pass).
    smooth = Image.fromarray(skimage.data.astronaut()).resize((96, 64))
    ours = build_transform(TransformConfig(resolution=32))(smooth)
    ref = np.asarray(smooth.resize((48, 32), Image.Resampling.LANCZOS).crop((8, 0, 40, 32)), np.float64)
    assert np.abs(((ours + 1) * 127.5).permute(1, 2, 0).numpy() - ref).mean() < 3.0


def test_flips_are_mirror_images_and_random_draws_follow_the_seed() -> None:
    img = _photo(96, 64)
    plain = build_transform(TransformConfig(resolution=32))(img)
    flipped = build_transform(TransformConfig(resolution=32, flip=1.0))(img)
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
    coin = build_transform(TransformConfig(resolution=32, flip=0.5))
    torch.manual_seed(0)
    seen = {torch.equal(coin(img), plain) for _ in range(30)}
    assert seen == {True, False}
    rand = build_transform(TransformConfig(resolution=32, crop="random", scale=(0.3, 1.0), flip=0.5))
    torch.manual_seed(7)
    a = rand(img)
    torch.manual_seed(7)
    assert torch.equal(rand(img), a)
    assert any(not torch.equal(rand(img), a) for _ in range(5))


@pytest.mark.parametrize(("field", "value", "match"), [
    ("resolution", 0, "resolution"), ("crop", "top", "crop"), ("flip", 1.5, "flip"),
    ("scale", (0.0, 1.0), "scale"), ("scale", (0.9, 0.5), "scale"), ("resample", "nearest", "resample")])
def test_bad_transform_settings_are_named(field: str, value: object, match: str) -> None:
    with pytest.raises(KlvaeError, match=match):
        build_transform(TransformConfig(**{field: value}))


def test_upscaling_small_images_warns_once_per_process(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(data_module, "_UPSCALE_WARNED", [False], raising=False)  # as in a fresh process
    small = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
    with caplog.at_level(logging.WARNING, logger="klvae.training.data"):
        build_transform(TransformConfig(resolution=16))(small)  # large enough: no warning
        assert not caplog.records
        for _ in range(3):
            build_transform(TransformConfig(resolution=32, crop="random"))(small)
            build_transform(TransformConfig(resolution=32))(small)  # another transform (validation's): not again
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "data.resolution 32" in msg and "20 px" in msg and "at most 20" in msg


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted(folder: Path, workers: int, caplog: pytest.LogCaptureFixture) -> None:
    ds = build_dataset(folder, build_transform(TINY))
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 7
    loader = build_dataloader(ds, batch_size=3, num_workers=workers, shuffle=False)
    keys, skipped, n = [], 0, 0
    with caplog.at_level(logging.WARNING):
        for batch in loader:
            keys += batch["keys"]
            skipped += batch["skipped"]
            n += batch["pixels"].shape[0]
            assert batch["pixels"].shape[1:] == (3, 16, 16)
    assert (skipped, n, set(keys)) == (2, 5, GOOD)
    if workers == 0:  # worker processes log through their own handlers
        assert "broken.jpg" in caplog.text and "fake.png" in caplog.text


def test_cached_folders_decode_each_image_once(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "coffee.jpg").write_bytes((folder / "coffee.jpg").read_bytes())
    plain = build_dataset(copy, build_transform(TINY))
    cached = build_dataset(copy, build_transform(TINY), cache=True)
    first = cached[0]["pixels"]
    (copy / "coffee.jpg").unlink()  # later reads must come from memory
    assert torch.equal(cached[0]["pixels"], first)
    assert plain[0] is None  # the uncached dataset reads the file again, and it is gone


def test_collate_skip_none() -> None:
    x = torch.zeros(3, 4, 4)
    out = collate_skip_none([None, {"pixels": x, "key": "a"}, x, None])
    assert out["pixels"].shape == (2, 3, 4, 4) and out["keys"] == ["a", None] and out["skipped"] == 2
    empty = collate_skip_none([None, None])
    assert empty["pixels"].shape[0] == 0 and empty["skipped"] == 2
    with pytest.raises(KlvaeError, match="differ in size"):
        collate_skip_none([x, torch.zeros(3, 4, 5)])


def test_build_dataset_picks_the_kind(folder: Path, shards: list[Path], tmp_path: Path) -> None:
    root = shards[0].parent
    for spec in (shards[0], root, f"{root}/shard-{{000..002}}.tar", f"{root}/shard-*.tar"):
        assert isinstance(build_dataset(spec), WebDatasetShards), spec
    assert len(build_dataset(f"{root}/shard-{{000..001}}.tar").shards) == 2
    assert isinstance(build_dataset(folder / "coffee.jpg"), ImageFolderDataset)
    _write_parquet(tmp_path / "p" / "a.parquet", [_encoded(_tiny(1))])
    for spec in (tmp_path / "p" / "a.parquet", tmp_path / "p", f"{tmp_path}/p/*.parquet"):
        assert isinstance(build_dataset(spec), HFDiskDataset), spec
    odd = tmp_path / "photos [1]"
    odd.mkdir()
    (odd / "a.jpg").write_bytes((folder / "coffee.jpg").read_bytes())
    assert isinstance(build_dataset(odd), ImageFolderDataset)  # an existing path is never a pattern
    with pytest.raises(KlvaeError, match="no such data"):
        build_dataset(tmp_path / "nothing")
    with pytest.raises(KlvaeError, match="no shards"):
        build_dataset(f"{root}/none-*.tar")


def test_shards_group_members_and_skip_bad_samples(tmp_path: Path) -> None:
    good = _encoded(_tiny(3), "JPEG")
    tar = _write_tar(tmp_path / "mixed.tar", [
        ("a", {"jpg": good, "json": b"{}"}),
        ("b", {"json": b"{}"}),  # no image
        ("c", {"png": b"garbage"}),  # undecodable
        ("dir/d", {"seg.png": _encoded(_tiny(5)), "txt": b"x"}),  # compound extension, in a folder
        ("e", {"webp": _encoded(_tiny(6), "WEBP"), "jpg": good}),
    ])
    items = list(WebDatasetShards(tar, build_transform(TINY)))
    assert [it and it["key"] for it in items] == ["mixed.tar:a", None, None, "mixed.tar:dir/d", "mixed.tar:e"]
    assert items[0]["pixels"].shape == (3, 16, 16)


def test_an_oversized_tar_member_is_skipped_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # A member's header states its size; one over the limit is refused before its bytes are read, counted as a
    # skipped sample, and the stream goes on. The limit (2 GiB) is lowered here to a size a test can write.
    big, small = _encoded(_tiny(1)), _encoded(np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setattr(klvae.images, "MAX_ENCODED_BYTES", len(small))
    tar = _write_tar(tmp_path / "s.tar", [("a", {"png": big}), ("b", {"png": small})])
    ds = WebDatasetShards(tar, build_transform(TINY))
    with caplog.at_level(logging.WARNING):
        items = list(ds)
    assert [it and it["key"] for it in items] == [None, "s.tar:b"] and ds.skipped == 1
    assert "more than the" in caplog.text
    source = open_source(str(tar))
    with pytest.raises(ImageError, match="more than the"):
        source.load(source.ids[0])
    assert source.load(source.ids[1]).size == (4, 4)


@pytest.mark.parametrize("name", ["torn.tar", "TORN.TAR"])
@pytest.mark.parametrize("cut", [5120, 1000])  # at a block boundary, and inside a member
def test_a_torn_shard_yields_what_it_can(shards: list[Path], tmp_path: Path, cut: int, name: str) -> None:
    torn = tmp_path / name
    torn.write_bytes(shards[0].read_bytes()[:cut])
    items = list(WebDatasetShards([torn, shards[1]]))
    assert items.count(None) == 1 and len(items) - 1 - 4 == (3 if cut == 5120 else 0)
    assert [it["key"] for it in items[-4:]] == [f"shard-001.tar:s1_{i}" for i in range(4)]


def test_split_plan_parts_are_disjoint_and_cover() -> None:
    samples = 7
    for n_shards in range(1, 6):
        for world in range(1, 4):
            for workers in range(1, 4):
                seen: list[tuple[int, int]] = []
                for r in range(world):
                    for w in range(workers):
                        plan = split_plan(n_shards, [(r, world), (w, workers)])
                        seen += [(s, i) for s, k, o in plan for i in range(samples) if i % k == o]
                assert sorted(seen) == [(s, i) for s in range(n_shards) for i in range(samples)], (n_shards, world)


@pytest.mark.parametrize(("n_shards", "world"), [(3, 2), (1, 2), (3, 4), (2, 2)])
def test_ranks_read_disjoint_parts_that_cover_the_shards(shards: list[Path], n_shards: int, world: int) -> None:
    parts = [_keys(WebDatasetShards(shards[:n_shards], rank=r, world_size=world)) for r in range(world)]
    every = [k for p in parts for k in p]
    assert len(every) == len(set(every)) == 4 * n_shards


def test_ranks_and_workers_split_together(shards: list[Path]) -> None:
    keys: list[str] = []
    for rank in range(2):
        ds = WebDatasetShards(shards, build_transform(TINY), rank=rank, world_size=2)
        for batch in build_dataloader(ds, batch_size=2, num_workers=2):
            keys += batch["keys"]
    assert len(keys) == len(set(keys)) == 12


def test_expand_shards_and_rank_resolution(shards: list[Path], tmp_path: Path) -> None:
    root = shards[0].parent
    assert expand_shards(f"{root}/shard-{{000..002}}.tar") == shards
    assert expand_shards(f"{root}/shard-{{002,000}}.tar") == [shards[2], shards[0]]
    assert expand_shards([shards[1], root]) == [shards[1], shards[0], shards[2]]
    with pytest.raises(KlvaeError, match="no shards"):
        expand_shards(root / "shard-009.tar")
    with pytest.raises(KlvaeError, match=r"names 1,000,000,000 shards; at most 1,000,000"):  # was a MemoryError
        expand_shards(f"{root}/nosuch-{{0..999999999}}.tar")
    with pytest.raises(KlvaeError, match=r"names 10,000,000 shards"):  # seven ranges of ten: 15 s, then "no shards"
        expand_shards(f"{root}/s" + "-{0..9}" * 7 + ".tar")
    assert resolve_rank() == (0, 1) and resolve_rank(1, 3) == (1, 3)
    with pytest.raises(KlvaeError, match="rank"):
        resolve_rank(3, 3)
    with pytest.raises(KlvaeError, match="rank"):
        resolve_rank(1, None)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert resolve_rank() == (0, 1) and WebDatasetShards(shards).world_size == 1
    finally:
        dist.destroy_process_group()


def _write_parquet(path: Path, images: list[bytes], row_group_size: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": [{"bytes": b, "path": None} for b in images], "label": list(range(len(images)))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_rows_across_row_groups(tmp_path: Path) -> None:
    images = [_encoded(_tiny(i)) for i in range(5)]
    images[3] = b"not an image"
    path = _write_parquet(tmp_path / "t.parquet", images)
    ds = HFDiskDataset(path)
    assert len(ds) == 5 and ds[3] is None
    backwards = [ds[i] for i in reversed(range(5))]
    ds2 = pickle.loads(pickle.dumps(ds))
    for i, it in zip(reversed(range(5)), backwards, strict=True):
        if it is not None:
            assert torch.equal(it["pixels"], ds2[i]["pixels"]) and it["key"] == f"row{i}"
            assert it["pixels"][0, 0, 0].item() == pytest.approx(i * 10 / 127.5 - 1)
    with pytest.raises(KlvaeError, match="no column 'img'"):
        HFDiskDataset(path, image_column="img")


def test_cache_and_eval_sources_read_the_same_specs(shards: list[Path], tmp_path: Path) -> None:
    root = shards[0].parent
    via_braces = open_source(f"{root}/shard-{{000..001}}.tar")
    assert via_braces.kind == "tar" and len(via_braces.ids) == 8 and via_braces.ids[0] == "shard-000.tar:s0_0.png"
    assert np.array_equal(np.asarray(via_braces.load("shard-001.tar:s1_2.png")), _tiny(6))
    gz = tmp_path / "one.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(shards[2], arcname="inner.tar")  # not an image: not an item
        tf.add(_write_tar(tmp_path / "x.tar", []), arcname="empty.tar")
        data = _encoded(_tiny(9))
        info = tarfile.TarInfo("a/b.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    gz_source = open_source(str(gz))
    assert gz_source.ids == ["one.tar.gz:a/b.png"]
    assert np.array_equal(np.asarray(gz_source.load(gz_source.ids[0])), _tiny(9))
    images = [_encoded(_tiny(i)) for i in range(3)]
    _write_parquet(tmp_path / "p" / "a.parquet", images)
    table = open_source(f"{tmp_path}/p/*.parquet")
    assert table.kind == "table" and table.ids == ["row0", "row1", "row2"]
    assert np.array_equal(np.asarray(table.load("row2")), _tiny(2))
    assert open_source(str(tmp_path / "p")).ids == table.ids


def test_parquet_splits_side_by_side_are_not_mixed(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [_encoded(_tiny(i)) for i in range(3)])
    _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [_encoded(_tiny(9))])
    assert len(build_dataset(tmp_path)) == 3
    assert len(HFDiskDataset(tmp_path, split="test")) == 1


def test_save_to_disk_folders(tmp_path: Path) -> None:
    import datasets
    pics = [Image.fromarray(_tiny(i)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": pics, "text": ["a", "b", "c", "d"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"validation": ds.select([0]), "train": ds}).save_to_disk(str(tmp_path / "dict"))
    one = build_dataset(tmp_path / "one", build_transform(TINY))
    assert isinstance(one, HFDiskDataset) and len(one) == 4 and one[2]["pixels"].shape == (3, 16, 16)
    assert len(pickle.loads(pickle.dumps(one))) == 4
    assert len(build_dataset(tmp_path / "dict")) == 4
    assert len(HFDiskDataset(tmp_path / "dict", split="validation")) == 1
    with pytest.raises(KlvaeError, match="no split 'test'"):
        HFDiskDataset(tmp_path / "dict", split="test")


def test_missing_datasets_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(KlvaeError, match="pip install datasets"):
        build_dataset(tmp_path)


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"pixels": torch.full((3, 2, 2), float(i)), "key": str(i)}


def test_distributed_loaders_split_and_reshuffle_per_epoch() -> None:
    loaders = [build_dataloader(_Numbers(), 4, shuffle=True, seed=3, distributed=True, rank=r, world_size=2)
               for r in range(2)]
    assert all(isinstance(dl.sampler, DistributedSampler) for dl in loaders)
    epoch0 = [[k for b in dl for k in b["keys"]] for dl in loaders]
    assert sorted(epoch0[0] + epoch0[1], key=int) == [str(i) for i in range(20)]
    for dl in loaders:
        set_epoch(dl, 1)
    assert [k for b in loaders[0] for k in b["keys"]] != epoch0[0]
    plain = build_dataloader(_Numbers(), 5, shuffle=False)
    assert [k for b in plain for k in b["keys"]] == [str(i) for i in range(20)]


def _augmenting_stream(tmp_path: Path, workers: int = 0) -> tuple[object, Path]:
    from klvae.training.config import load_config

    shard = tmp_path / "images-0.tar"
    tmp_path.mkdir(exist_ok=True)
    with tarfile.open(shard, "w") as tf:
        for i in range(6):
            data = _encoded(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8))
            info = tarfile.TarInfo(f"img{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return load_config(None, [
        "model.preset=tiny", f"data.train={shard}", "data.resolution=16", "data.batch_size=2",
        f"data.num_workers={workers}", "data.crop=random", "data.flip=0.5", "data.scale_min=0.5",
        "train.device=cpu", f"train.out_dir={tmp_path / 'run'}", "loss.preset=mse", "train.seed=3"]), shard


def test_a_resumed_stream_of_tar_shards_crops_and_flips_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """Before: augmentations came from the global generator, which re-reading the consumed batches on resume moved
    on, so every crop and flip after a resume differed from the uninterrupted run's."""
    from klvae.distributed import DistInfo
    from klvae.training.data_setup import build_train_loader

    cfg, _ = _augmenting_stream(tmp_path)
    torch.manual_seed(0)
    whole = build_train_loader(cfg, DistInfo())
    batches = [next(whole) for _ in range(6)]  # two passes over the six images
    torch.manual_seed(0)  # the generator's state at the checkpoint is restored, then the skip reads 2 batches
    resumed = build_train_loader(cfg, DistInfo(), start_batch=4)
    for b in batches[4:]:
        again = next(resumed)
        assert again["keys"] == b["keys"] and torch.equal(again["pixels"], b["pixels"])
    # The same images get other crops in the second pass (the pass is part of their seeds).
    assert batches[0]["keys"] == batches[3]["keys"] == ["images-0.tar:img0", "images-0.tar:img1"]
    assert not torch.equal(batches[0]["pixels"], batches[3]["pixels"])
    # Reading within a pass leaves the caller's generator where it was (a pass's start draws the loader's seed).
    fresh = build_train_loader(cfg, DistInfo())
    next(fresh)
    state = torch.get_rng_state()
    assert torch.equal(next(fresh)["pixels"], batches[1]["pixels"])
    assert torch.equal(torch.get_rng_state(), state)


def test_a_tar_samples_crop_does_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    from klvae.distributed import DistInfo
    from klvae.training.data_setup import build_train_loader

    crops: list[dict[str, torch.Tensor]] = []
    for workers in (0, 2):
        cfg, _ = _augmenting_stream(tmp_path / str(workers), workers)
        loader = build_train_loader(cfg, DistInfo())
        seen: dict[str, torch.Tensor] = {}
        while len(seen) < 6:
            b = next(loader)
            seen.update(zip([k.split(":")[1] for k in b["keys"]], b["pixels"], strict=True))
        crops.append(seen)
    assert crops[0].keys() == crops[1].keys() and all(torch.equal(crops[0][k], crops[1][k]) for k in crops[0])
