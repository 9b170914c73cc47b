"""Pins what a mutation audit of the training data pipeline (training/data.py) and the command line's entry
(cli/main.py) found untested: the transform's messages word for word and its smallest resolution, crop sides rounded
to the nearest pixel, never zero and never past a small image at native size, the upscale warning's threshold; a
single image's key, a folder read without its subfolders, an empty folder's message, max_pixels; tar shards'
directory members, upper-case extensions, a caption before a compound-extension image, the image key preferred in
image_keys order, a sample without an image named, a compressed or unpadded shard not taken for a torn one,
per-sample and per-shard seeds; build_dataset's rank, split, column and recursive; split_plan's whole shards when
there are exactly as many as parts, negative or missing ranks; the loaders' seed, order and drop_last; and in main:
no "(default: None/False/[])" in the help, --version, the --set hint among several overrides, one log handler per
run, the SIGTERM handler put back and main in a thread, and _run's statuses and lines (a multi-line error, OSError,
an interrupt or a SIGTERM buried under an OSError, a command's own status)."""

from __future__ import annotations

import argparse
import errno
import gzip
import io
import logging
import signal
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import klvae
import klvae.training.data as data_module
from klvae.cli import main as main_module
from klvae.cli.main import _run, build_parser, main
from klvae.errors import KlvaeError
from klvae.training.data import (
    HFDiskDataset,
    ImageFolderDataset,
    ImageTransform,
    TransformConfig,
    WebDatasetShards,
    build_dataloader,
    build_dataset,
    build_transform,
    collate_skip_none,
    resolve_rank,
    split_plan,
)


def _png(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar of (name, bytes) members, in order; None makes a directory member."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _parquet(path: Path, images: list[bytes], column: str = "image") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: [{"bytes": b, "path": None} for b in images]}), path)
    return path


# ---- transforms ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("resolution", 0, "transform: resolution must be at least 1, got 0"),
        ("crop", "top", "transform: crop must be one of center, random, got 'top'"),
        ("flip", -0.5, "transform: flip is a probability, got -0.5"),
        ("scale", (0.9, 0.5), "transform: scale must satisfy 0 < min <= max <= 1, got (0.9, 0.5)"),
        ("scale", (0.5, 1.5), "transform: scale must satisfy 0 < min <= max <= 1, got (0.5, 1.5)"),
        ("resample", "nearest", "transform: resample must be one of bicubic, lanczos, bilinear, got 'nearest'"),
    ],
)
def test_bad_transform_settings_are_refused_word_for_word(field: str, value: object, message: str) -> None:
    with pytest.raises(KlvaeError) as caught:
        build_transform(TransformConfig(**{field: value}))  # type: ignore[arg-type]
    assert str(caught.value) == message


@pytest.fixture
def warned(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this process had already said that small images are scaled up (the flag is left as it was)."""
    monkeypatch.setattr(data_module, "_UPSCALE_WARNED", [True])


@pytest.mark.usefixtures("warned")
def test_a_one_pixel_resolution_and_every_resample_filter_are_accepted() -> None:
    img = Image.fromarray(np.full((6, 9, 3), 200, np.uint8))
    for resample in ("bicubic", "lanczos", "bilinear"):
        x = build_transform(TransformConfig(resolution=1, resample=resample))(img)
        assert x.shape == (3, 1, 1) and x[0, 0, 0].item() == pytest.approx(200 / 127.5 - 1, abs=1e-6)


@pytest.mark.usefixtures("warned")
def test_crop_sides_round_to_the_nearest_pixel_are_never_zero_and_never_exceed_a_small_image() -> None:
    assert ImageTransform(TransformConfig(resolution=4, scale=(0.7, 0.7))).crop_side(9, 7) == 5  # 4.9, not 4
    assert ImageTransform(TransformConfig(resolution=4, scale=(0.1, 0.1))).crop_side(3, 1) == 1  # 0.1 px: still 1
    native = ImageTransform(TransformConfig(resolution=32, resize=False))
    assert native.crop_side(10, 7) == 7 and native.crop_side(100, 70) == 32
    # The one-pixel crop of a 3x1 image at scale 0.1 is its middle (white) pixel, scaled up to the resolution.
    row = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255], [0, 0, 0]]], np.uint8))
    x = build_transform(TransformConfig(resolution=4, scale=(0.1, 0.1)))(row)
    assert x.shape == (3, 4, 4) and x.mean() > 0


def test_the_upscale_warning_names_the_threshold(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(data_module, "_UPSCALE_WARNED", [False])
    with caplog.at_level(logging.WARNING, logger="klvae.training.data"):
        build_transform(TransformConfig(resolution=32))(Image.new("RGB", (40, 20)))
    assert caplog.records[0].getMessage() == (
        "data.resolution 32 is larger than the images: one of 20 px on its shorter side was scaled up, as is every "
        "image under 32 px, which blurs the targets; consider a data.resolution of at most 20 (a multiple of the "
        "model's downsample factor; said once per process)"
    )


# ---- image folders and tables -------------------------------------------------------------------------------------
@pytest.fixture
def nested(tmp_path: Path) -> Path:
    """top.png (20x10) and sub/low.png (6x6) under tmp_path/data."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "top.png").write_bytes(_png(20, 10))
    (root / "sub" / "low.png").write_bytes(_png(6, 6, 1))
    return root


def test_a_single_image_is_keyed_by_its_file_name(nested: Path) -> None:
    ds = build_dataset(nested / "top.png")
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 1
    item = ds[0]
    assert item is not None and item["key"] == "top.png" and item["pixels"].shape == (3, 10, 20)


def test_a_folder_read_without_recursion_leaves_out_its_subfolders(nested: Path) -> None:
    everything = build_dataset(nested)
    assert [everything.key(i) for i in range(len(everything))] == ["sub/low.png", "top.png"]
    flat = build_dataset(nested, recursive=False)
    assert isinstance(flat, ImageFolderDataset) and [flat.key(i) for i in range(len(flat))] == ["top.png"]


def test_an_empty_folder_names_the_extensions_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(KlvaeError) as caught:
        ImageFolderDataset(tmp_path)
    assert str(caught.value).startswith("no images (.") and str(caught.value).endswith(f") under {tmp_path}")
    assert ".png" in str(caught.value) and ".jpg" in str(caught.value)


def test_max_pixels_skips_larger_images_in_folders_and_tables(
    nested: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = ImageFolderDataset(nested, max_pixels=100)  # 6x6 fits, 20x10 does not
    with caplog.at_level(logging.WARNING, logger="klvae.training.data"):
        assert folder[1] is None and folder[0] is not None
    assert "skipping unreadable image" in caplog.text and "top.png" in caplog.text
    table = HFDiskDataset(_parquet(tmp_path / "t.parquet", [_png(20, 10), _png(6, 6)]), max_pixels=100)
    assert table[0] is None and table[1] is not None


# ---- tar shards ---------------------------------------------------------------------------------------------------
def test_directory_members_of_a_shard_are_not_samples(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "s.tar", [("imgs", None), ("imgs/a.png", _png(8, 8)), ("imgs/b.png", _png(8, 8, 1))])
    ds = WebDatasetShards(tar)
    assert [it and it["key"] for it in ds] == ["s.tar:imgs/a", "s.tar:imgs/b"] and ds.skipped == 0


def test_upper_case_extensions_are_images(tmp_path: Path) -> None:
    ds = WebDatasetShards(_tar(tmp_path / "s.tar", [("a.PNG", _png(8, 8)), ("b.Jpg", _png(8, 8, 1, "JPEG"))]))
    assert [it and it["key"] for it in ds] == ["s.tar:a", "s.tar:b"]


def test_a_caption_before_a_compound_extension_image_is_not_taken_for_the_image(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "s.tar", [("a.txt", b"a caption"), ("a.seg.png", _png(8, 6))])
    items = list(WebDatasetShards(tar))
    assert len(items) == 1 and items[0] is not None and items[0]["pixels"].shape == (3, 6, 8)


def test_the_image_keys_order_picks_among_a_samples_images(tmp_path: Path) -> None:
    # The png comes first in the shard, but "jpg" comes first in image_keys.
    tar = _tar(tmp_path / "s.tar", [("a.png", _png(8, 8)), ("a.jpg", _png(16, 12, 1, "JPEG"))])
    first = next(iter(WebDatasetShards(tar)))
    assert first is not None and first["pixels"].shape == (3, 12, 16)
    own = next(iter(WebDatasetShards(tar, image_keys=(".PNG", "jpg"))))  # lower-cased, dot stripped
    assert own is not None and own["pixels"].shape == (3, 8, 8)


def test_a_sample_without_an_image_is_named_with_the_keys_looked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tar = _tar(tmp_path / "s.tar", [("a.txt", b"only a caption")])
    with caplog.at_level(logging.WARNING, logger="klvae.training.data"):
        assert list(WebDatasetShards(tar)) == [None]
    assert caplog.records[0].getMessage() == "skipping s.tar:a: no jpg/jpeg/png/webp/bmp/tif/tiff member"


def test_a_whole_compressed_shard_is_not_taken_for_a_torn_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = _tar(tmp_path / "s.tar", [(f"{i}.png", _png(8, 8, i)) for i in range(3)])
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="klvae.training.data"):
        items = list(WebDatasetShards(gz))
    assert [it and it["key"] for it in items] == ["s.tar.gz:0", "s.tar.gz:1", "s.tar.gz:2"] and not caplog.records


def test_a_shard_ending_in_zero_blocks_without_padding_is_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = _tar(tmp_path / "s.tar", [(f"{i}.png", _png(8, 8, i)) for i in range(2)]).read_bytes()
    with tarfile.open(tmp_path / "s.tar", "r|") as tf:
        for _ in tf:
            pass
        end = tf.offset  # where the last member ends and the end-of-archive blocks begin
    # Two zero blocks and no padding to tar's 10 KiB record (other writers'), or the first zero block alone.
    for keep in (1024, 512):
        cut = tmp_path / f"cut{keep}.tar"
        cut.write_bytes(whole[: end + keep])
        with caplog.at_level(logging.WARNING, logger="klvae.training.data"):
            items = list(WebDatasetShards(cut))
        assert [it and it["key"] for it in items] == [f"cut{keep}.tar:0", f"cut{keep}.tar:1"] and not caplog.records


def test_seeded_shards_crop_each_sample_and_each_shard_on_its_own(tmp_path: Path) -> None:
    # The same picture everywhere: only the seeds can tell the samples' crops apart.
    same = _png(40, 40, 7)
    shards = [_tar(tmp_path / f"s{s}.tar", [(f"{i}.png", same) for i in range(4)]) for s in range(2)]
    ds = WebDatasetShards(shards, build_transform(TransformConfig(resolution=8, crop="random", scale=(0.2, 1.0))))
    ds.seed = 3
    crops = [it["pixels"] for it in ds if it is not None]
    assert len(crops) == 8
    assert not all(torch.equal(crops[0], c) for c in crops[1:4])  # samples of one shard
    assert not all(torch.equal(crops[i], crops[4 + i]) for i in range(4))  # the same places in two shards
    assert torch.equal(torch.stack(crops), torch.stack([it["pixels"] for it in ds if it is not None]))


# ---- build_dataset, split_plan, resolve_rank ----------------------------------------------------------------------
def test_build_dataset_passes_rank_split_and_image_column_on(tmp_path: Path) -> None:
    ds = build_dataset(_tar(tmp_path / "s.tar", [("a.png", _png(8, 8))]), rank=1, world_size=3)
    assert isinstance(ds, WebDatasetShards) and (ds.rank, ds.world_size) == (1, 3)
    _parquet(tmp_path / "t" / "train-00000-of-00001.parquet", [_png(8, 8)] * 3, column="picture")
    _parquet(tmp_path / "t" / "test-00000-of-00001.parquet", [_png(8, 8)], column="picture")
    test = build_dataset(tmp_path / "t", image_column="picture", split="test")
    assert isinstance(test, HFDiskDataset) and len(test) == 1 and test[0] is not None
    with pytest.raises(KlvaeError, match="no column 'image'"):
        build_dataset(tmp_path / "t")


def test_split_plan_reads_whole_shards_when_there_are_exactly_as_many_as_parts() -> None:
    assert split_plan(2, [(1, 2)]) == [(1, 1, 0)]
    assert split_plan(4, [(1, 2), (1, 2)]) == [(3, 1, 0)]
    assert split_plan(1, [(1, 2), (1, 2)]) == [(0, 4, 3)]  # one shard: every fourth sample, from the fourth
    assert split_plan(3, [(0, 1), (0, 1)]) == [(0, 1, 0), (1, 1, 0), (2, 1, 0)]


@pytest.mark.parametrize(("rank", "world"), [(-1, 2), (None, 2), (2, 2), (0, "2"), (0.0, 2)])
def test_a_rank_outside_the_world_missing_or_no_integer_is_refused(rank: object, world: object) -> None:
    with pytest.raises(KlvaeError) as caught:
        resolve_rank(rank, world)  # type: ignore[arg-type]
    assert str(caught.value) == (f"rank {rank!r} of world size {world!r}: give both, integers with "
                                 f"0 <= rank < world size")


# ---- loaders ------------------------------------------------------------------------------------------------------
class _Numbers(Dataset):
    def __init__(self, n: int = 21) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"pixels": torch.full((3, 1, 1), float(i)), "key": str(i)}


def _order(**kwargs: object) -> list[str]:
    return [k for b in build_dataloader(_Numbers(), 4, **kwargs) for k in b["keys"]]  # type: ignore[arg-type]


def test_a_shuffled_loader_follows_its_seed_not_the_global_generator() -> None:
    torch.manual_seed(1)
    a = _order(seed=5)
    torch.manual_seed(2)
    assert _order(seed=5) == a and sorted(a, key=int) == [str(i) for i in range(21)]
    assert _order(seed=6) != a


def test_distributed_loaders_keep_order_seed_and_drop_last() -> None:
    assert _order(shuffle=False, distributed=True, rank=1, world_size=2) == [str(i) for i in range(1, 21, 2)] + ["0"]
    dropped = build_dataloader(_Numbers(), 4, shuffle=False, distributed=True, rank=1, world_size=2, drop_last=True)
    assert len(dropped.sampler) == 10  # of 21 for each of 2 ranks, none repeated to even them out
    assert [k for b in dropped for k in b["keys"]] == [str(i) for i in range(1, 16, 2)]  # and no partial batch
    shuffled = {s: _order(seed=s, distributed=True, rank=0, world_size=2) for s in (3, 4)}
    assert shuffled[3] != shuffled[4] and len(shuffled[3]) == 11


def test_a_batch_of_only_unreadable_items_is_empty() -> None:
    out = collate_skip_none([None, None, None])
    assert out["pixels"].shape == (0, 3, 0, 0) and out["keys"] == [] and out["skipped"] == 3


# ---- the command line's entry -------------------------------------------------------------------------------------
def test_help_names_no_default_that_says_nothing() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = [parser.format_help(), *(p.format_help() for p in sub.choices.values())]
    for text in texts:
        flat = " ".join(text.split())
        for empty in ("(default: None)", "(default: False)", "(default: [])", "(default: ==SUPPRESS==)"):
            assert empty not in flat


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"klvae {klvae.__version__}\n"


def test_the_set_hint_comes_when_any_override_lacks_its_equals_sign(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["train", "c.yaml", "--set", "train.seed=1", "--set", "train.max_steps", "10"])
    assert stop.value.code == 2 and "; --set takes SECTION.FIELD=VALUE as one word" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "c.yaml", "--set", "train.seed=1", "extra"])
    assert "--set takes" not in capsys.readouterr().err


def _command(monkeypatch: pytest.MonkeyPatch, fn: Callable[[argparse.Namespace], object]) -> None:
    monkeypatch.setattr("klvae.cli.codec.cmd_info", fn)  # register() binds it when main builds the parser


def test_each_run_logs_through_one_handler(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _command(monkeypatch, lambda _args: logging.getLogger("klvae.cli.codec").warning("careful"))
    assert main(["info"]) == 0 and main(["info"]) == 0
    assert capsys.readouterr().err == "WARNING: careful\n" * 2  # not three times: the first run's handler went


def test_main_puts_the_sigterm_handler_back_and_runs_outside_the_main_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    _command(monkeypatch, lambda _args: 4)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["-q", "info"]) == 4  # the command's own status
    assert signal.getsignal(signal.SIGTERM) is before
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(main(["-q", "info"])))
    thread.start()
    thread.join()
    assert got == [4]


def _status(capsys: pytest.CaptureFixture[str], fn: Callable[[argparse.Namespace], object]) -> tuple[int, str]:
    status = _run(argparse.Namespace(func=fn, debug=False))
    return status, capsys.readouterr().err


def _raise(error: BaseException, under: BaseException | None = None) -> Callable[[argparse.Namespace], object]:
    def command(_args: argparse.Namespace) -> object:
        if under is None:
            raise error
        try:
            raise under
        except BaseException:
            raise error from None

    return command


def test_run_turns_each_failure_into_its_line_and_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert _status(capsys, lambda _a: None) == (0, "")
    assert _status(capsys, _raise(KlvaeError("first\n   second\n\n third  "))) == (
        2,
        "klvae: error: first second third\n",
    )
    assert _status(capsys, _raise(OSError(errno.ENOSPC, "No space left on device"))) == (
        2,
        "klvae: error: [Errno 28] No space left on device\n",
    )
    assert _status(capsys, _raise(OSError("disk full"), KeyboardInterrupt())) == (130, "klvae: interrupted\n")
    assert _status(capsys, _raise(OSError("disk full"), main_module._Terminated())) == (143, "klvae: terminated\n")
    assert _status(capsys, _raise(RuntimeError("x"), main_module._Terminated())) == (143, "klvae: terminated\n")
    assert _status(capsys, _raise(ValueError("bad\nvalue"))) == (
        1,
        "klvae: internal error: ValueError: bad value (rerun with --debug for details)\n",
    )
