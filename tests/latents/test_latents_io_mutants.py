"""Pins, found by a mutation audit, what the latent-file and cache-input modules do that users see: the values,
dtypes, metadata and size checks of klvae's latents files (latents/file.py), ComfyUI `.latent` files' crop,
channels, names and old-format multiplier (latents/comfy.py), the ids and skip reasons of `klvae cache` sources
(latents/sources.py), aspect buckets and cover crops (latents/buckets.py), and build_cache's option checks and
CacheSummary (latents/build.py, latents/options.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import klvae
from helpers import noise_folder
from klvae.errors import ImageError, KlvaeError, LatentsError, OptionError
from klvae.images import MAX_PIXELS, MAX_RESOLUTION
from klvae.latents import CacheSummary, LatentItem, LatentsFile, build_cache, load_latents, save_latents
from klvae.latents.buckets import cover_size, make_buckets, nearest_bucket, resize_crop
from klvae.latents.comfy import (
    LATENT_KEY,
    comfy_channels,
    comfy_crop,
    comfy_item_names,
    comfy_latents_file,
    comfy_norm,
    is_comfy_latent,
    load_comfy_latent,
    save_comfy_latent,
)
from klvae.latents.file import check_sizes
from klvae.latents.options import CacheOptions, check_at_least, check_resolution, check_whole_latents
from klvae.latents.sources import item_error, open_source, tar_reason
from klvae.model.latent_norm import LatentNorm

# ---------------------------------------------------------------- latents/file.py


def _lf(shape: tuple[int, ...] = (4, 2, 3), height: int = 4, width: int = 6, **kw: object) -> LatentsFile:
    return LatentsFile(latents={"000000": torch.randn(shape)}, items=[LatentItem("a.png", "000000", height, width)],
                       **kw)


def _rewrite(path: Path, meta_changes: dict[str, str | None], tensors: dict | None = None) -> Path:
    """`path` (a saved latents file) rewritten with metadata fields changed (None: removed) and/or other tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    for k, v in meta_changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), meta)
    return path


def _items(*items: dict) -> str:
    return json.dumps(list(items))


def test_latents_file_round_trip_keeps_model_factors_extra_and_stores_float32(tmp_path: Path) -> None:
    z = torch.randn(4, 2, 3).half()
    lf = LatentsFile(latents={"000000": z}, items=[LatentItem("a.png", "000000", 4, 6)], model="org/vae",
                     scaling_factor=0.5, latents_mean=(0.1, 0.2, 0.3, 0.4),
                     latents_std=(1.0, 2.0, 3.0, 4.0),
                     extra={"posterior": "mode", "model_fingerprint": "abc", "encoder_fingerprint": "def"})
    back = load_latents(save_latents(lf, tmp_path / "z.safetensors"), downsample_factor=2)
    assert back.model == "org/vae"
    assert back.extra == {"posterior": "mode", "model_fingerprint": "abc", "encoder_fingerprint": "def"}
    assert back.latents["000000"].dtype == torch.float32
    assert torch.equal(back.latents["000000"], z.float())
    assert back.norm == lf.norm and back.items == lf.items


def test_a_file_without_latent_patch_size_is_unpatched(tmp_path: Path) -> None:
    path = _rewrite(save_latents(_lf(), tmp_path / "z.safetensors"), {"latent_patch_size": None})
    assert load_latents(path).latent_patch_size == 1


def test_float64_latents_are_read_as_they_are(tmp_path: Path) -> None:
    path = _rewrite(save_latents(_lf(), tmp_path / "z.safetensors"), {},
                    {"000000": torch.ones(4, 2, 3, dtype=torch.float64)})
    assert load_latents(path).latents["000000"].dtype == torch.float64


@pytest.mark.parametrize("changes, tensors, message", [
    ({"items": "[]"}, None, "holds no latents"),
    ({"items": _items(*({"name": f"{k}.png", "key": k, "height": 4, "width": 6} for k in "xyz"))}, None,
     "lists latents it does not hold: 'x, y, z'"),
    ({"scaling_factor": "0"}, None, "scaling_factor must be a non-zero number, got 0"),
    ({"scaling_factor": "Infinity"}, None, "scaling_factor must be a finite number"),
    ({"scaling_factor": "true"}, None, "scaling_factor must be a finite number"),
    ({"latents_mean": "[0, 0, 0, 0]", "latents_std": "[1, 1, 1, 1]"}, {"000000": torch.zeros(3, 4, 4)},
     "has 3 channels, but latents_mean/latents_std describe 4"),
    ({"items": _items({"name": "a.png", "key": "", "height": 4, "width": 6})}, {"": torch.zeros(4, 2, 3)},
     "key is empty"),
    ({"items": _items({"name": "a.png", "key": "000000", "height": 0, "width": 6})}, None,
     "height must be a positive integer, got 0"),
    ({"items": _items({"name": "a.png", "key": "000000", "height": True, "width": 6})}, None,
     "height must be a positive integer, got True"),
    ({}, {"000000": torch.zeros(1, 4, 2, 3)}, "latents of shape \\[1, 4, 2, 3\\]"),
    ({}, {"000000": torch.zeros(4, 0, 3)}, "empty latents of shape \\[4, 0, 3\\]"),
])
def test_malformed_latents_files_are_refused_by_name(tmp_path: Path, changes: dict, tensors: dict | None,
                                                     message: str) -> None:
    path = _rewrite(save_latents(_lf(), tmp_path / "z.safetensors"), changes, tensors)
    with pytest.raises(LatentsError, match=message):
        load_latents(path)


def test_an_item_of_exactly_max_pixels_is_accepted(tmp_path: Path) -> None:
    path = _rewrite(save_latents(_lf(), tmp_path / "z.safetensors"),
                    {"items": _items({"name": "a.png", "key": "000000", "height": 2, "width": MAX_PIXELS // 2})})
    assert MAX_PIXELS % 2 == 0
    assert load_latents(path).items[0].width == MAX_PIXELS // 2


def test_load_with_downsample_factor_checks_sizes(tmp_path: Path) -> None:
    path = save_latents(_lf(height=9), tmp_path / "z.safetensors")
    assert load_latents(path).items[0].height == 9
    with pytest.raises(LatentsError, match="height 9 does not fit"):
        load_latents(path, downsample_factor=2)


def test_check_sizes_takes_sizes_within_the_last_cell_and_says_the_range() -> None:
    # latents 2x3 cells at x2: heights 3..4, widths 5..6
    for h, w in ((3, 5), (4, 6)):
        check_sizes(_lf(height=h, width=w), 2)
    with pytest.raises(LatentsError) as e:
        check_sizes(_lf(height=2), 2, "f")
    assert str(e.value) == "f: item 0 ('a.png'): height 2 does not fit latents 2 cells high (x2: 3 to 4)"
    with pytest.raises(LatentsError) as e:
        check_sizes(_lf(width=7), 2, "f")
    assert str(e.value) == "f: item 0 ('a.png'): width 7 does not fit latents 3 cells wide (x2: 5 to 6)"


def test_check_sizes_counts_a_latent_patch_as_part_of_the_cell() -> None:
    check_sizes(_lf(height=8, width=12, latent_patch_size=2), 2)
    with pytest.raises(LatentsError, match=r"\(x4: 5 to 8\)"):
        check_sizes(_lf(height=4, width=12, latent_patch_size=2), 2)


def test_check_sizes_allows_exactly_max_pixels() -> None:
    w = MAX_PIXELS // 2
    lf = LatentsFile(latents={"k": torch.zeros(1, 1, 1).expand(1, 2, w)}, items=[LatentItem("a", "k", 2, w)])
    check_sizes(lf, 1)
    lf = LatentsFile(latents={"k": torch.zeros(1, 1, 1).expand(1, 2, w + 1)}, items=[LatentItem("a", "k", 2, w + 1)])
    with pytest.raises(LatentsError, match="over the limit"):
        check_sizes(lf, 1)


# ---------------------------------------------------------------- latents/comfy.py


def test_comfy_norm_is_none_but_flux2s_patches_and_statistics() -> None:
    assert comfy_norm(LatentNorm(0.18215, 0.1)) == LatentNorm()
    mean, std = (0.1,) * 4, (2.0,) * 4
    assert comfy_norm(LatentNorm(0.3, None, mean, std, 2)) == LatentNorm(1.0, None, mean, std, 2)


def test_comfy_channels_and_crop() -> None:
    assert comfy_channels(4, LatentNorm()) == 4
    assert comfy_channels(32, LatentNorm(latent_patch_size=2)) == 128
    assert comfy_crop(21, 30, 8) == (2, 3, 16, 24)
    assert comfy_crop(16, 24, 8) == (0, 0, 16, 24)


def test_comfy_latent_is_known_by_suffix_in_any_case_or_by_content(tmp_path: Path) -> None:
    assert is_comfy_latent(tmp_path / "x.LATENT")
    assert not is_comfy_latent(save_latents(_lf(), tmp_path / "z.safetensors"))
    assert is_comfy_latent(save_comfy_latent(tmp_path / "c.safetensors", torch.zeros(1, 4, 2, 2)))


def test_comfy_latent_round_trip_keeps_values_and_metadata(tmp_path: Path) -> None:
    z = torch.randn(2, 4, 3, 5)
    back = load_comfy_latent(save_comfy_latent(tmp_path / "x.latent", z, {"prompt": "{}"}))
    assert not back.old_format
    assert torch.equal(back.samples, z)
    assert back.metadata == {"prompt": "{}"}


def test_old_format_latent_is_multiplied_by_one_over_0_18215(tmp_path: Path) -> None:
    z = torch.randn(1, 4, 3, 5)
    save_file({LATENT_KEY: z}, str(tmp_path / "old.latent"))
    back = load_comfy_latent(tmp_path / "old.latent")
    assert back.old_format
    assert torch.equal(back.samples, z * (1.0 / 0.18215))


@pytest.mark.parametrize("t, message", [
    (torch.zeros(4, 3, 5), r"of shape \[4, 3, 5\]"),
    (torch.zeros(1, 4, 0, 5), r"empty latent_tensor"),
    (torch.full((1, 4, 3, 5), float("nan")), "NaN or infinite"),
])
def test_unusable_comfy_latents_are_refused(tmp_path: Path, t: torch.Tensor, message: str) -> None:
    save_file({LATENT_KEY: t, "latent_format_version_0": torch.tensor([])}, str(tmp_path / "x.latent"))
    with pytest.raises(LatentsError, match=message):
        load_comfy_latent(tmp_path / "x.latent")


@pytest.mark.parametrize("shape", [(4, 3, 5), (1, 4, 0, 5)])
def test_save_comfy_latent_refuses_what_is_not_one_non_empty_batch(tmp_path: Path, shape: tuple) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        save_comfy_latent(tmp_path / "x.latent", torch.zeros(shape))


def test_comfy_item_names_and_latents_file() -> None:
    assert comfy_item_names("d/x.latent", 3) == ["x_00.png", "x_01.png", "x_02.png"]
    names = comfy_item_names("x.latent", 100)
    assert (names[0], names[-1]) == ("x_00.png", "x_99.png")
    assert comfy_item_names("x.latent", 101)[-1] == "x_100.png"
    lf = comfy_latents_file(torch.zeros(2, 4, 3, 5), ["a", "b"], LatentNorm(0.5), 8)
    assert [(i.name, i.height, i.width) for i in lf.items] == [("a", 24, 40), ("b", 24, 40)]
    assert lf.scaling_factor == 1.0
    with pytest.raises(ValueError, match="1 names for a batch of 2"):
        comfy_latents_file(torch.zeros(2, 4, 3, 5), ["a"], LatentNorm(), 8)


# ---------------------------------------------------------------- latents/sources.py


def test_item_error_is_one_line_naming_the_item_once() -> None:
    assert item_error("a.png", ImageError("a.png: broken")) == "a.png: broken"
    assert item_error("a.png", ImageError("broken")) == "a.png: broken"
    assert item_error("a.png", ValueError("bad\nmore")) == "a.png: ValueError: bad"


def test_tar_reason_says_not_a_tar_for_tarfiles_list_of_tries() -> None:
    assert tar_reason(OSError("a\nb")) == "not a tar file (nor a gzip, bz2 or xz compressed one)"
    assert tar_reason(OSError("short")) == "short"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path: Path, names: list[str]) -> Path:
    data = _png()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _member_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tf:
        return [m.offset for m in tf]


def test_tar_members_with_upper_case_suffix_are_images(tmp_path: Path) -> None:
    src = open_source(str(_tar(tmp_path / "s.tar", ["A.PNG", "b.txt"])))
    assert src.ids == ["s.tar:A.PNG"]
    assert src.load("s.tar:A.PNG").size == (8, 8)


def test_a_shard_cut_inside_a_header_keeps_its_images_and_is_listed_unreadable(tmp_path: Path) -> None:
    t = _tar(tmp_path / "s.tar", ["a.png", "b.png"])
    cut = _member_offsets(t)[1] + 100
    t.write_bytes(t.read_bytes()[:cut])
    src = open_source(str(t))
    assert src.ids == ["s.tar:a.png"]
    assert src.unreadable == [(str(t), f"cut short after 1 image(s): the archive ends at byte {cut}, inside a "
                                       "member's header or before its end marker")]


def test_a_shard_with_garbage_after_its_members_is_cut_short(tmp_path: Path) -> None:
    t = _tar(tmp_path / "s.tar", ["a.png"])
    end = _member_offsets(t)[0] + 512 + 512 * ((len(_png()) + 511) // 512)
    t.write_bytes(t.read_bytes()[:end] + b"x" * 512 + bytes(1024))
    src = open_source(str(t))
    assert src.ids == ["s.tar:a.png"]
    assert src.unreadable == [(str(t), f"cut short after 1 image(s): no tar header at byte {end}")]


def test_a_shard_cut_inside_a_member_says_how_many_images_came_before(tmp_path: Path) -> None:
    t = _tar(tmp_path / "s.tar", ["a.png", "b.png"])
    t.write_bytes(t.read_bytes()[:_member_offsets(t)[1] + 512 + 10])
    src = open_source(str(t))
    assert src.ids == ["s.tar:a.png", "s.tar:b.png"]  # tarfile lists the cut member, then stops
    assert src.unreadable == [(str(t), "cut short after 2 image(s): unexpected end of data")]


def test_all_shards_unreadable_is_one_error_counting_the_others(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.tar").write_bytes(b"not a tar" * 100)
    (d / "b.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(KlvaeError, match=r"\(nor any of the other 1 shards\)$"):
        open_source(str(d / "*.tar"))


def test_a_single_image_file_is_a_source_of_one(tmp_path: Path) -> None:
    Image.new("RGB", (8, 6)).save(tmp_path / "one.png")
    src = open_source(str(tmp_path / "one.png"))
    assert src.ids == ["one.png"]
    assert src.load("one.png").size == (8, 6)


def test_parquet_rows_are_row0_row1(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = _png()
    pq.write_table(pa.table({"image": [{"bytes": png, "path": "a.png"}, {"bytes": png, "path": "b.png"}]}),
                   tmp_path / "t.parquet")
    src = open_source(str(tmp_path / "t.parquet"))
    assert src.ids == ["row0", "row1"]
    assert src.load("row1").size == (8, 8)


# ---------------------------------------------------------------- latents/buckets.py


def test_make_buckets_lists_and_orders_the_sizes() -> None:
    assert make_buckets(256) == [(512, 128), (448, 128), (384, 128), (320, 192), (256, 256), (192, 320),
                                 (128, 384), (128, 448), (128, 512)]
    # a small resolution: sides never below the step, long buckets up to max_ratio exactly
    assert make_buckets(64) == [(256, 64), (192, 64), (128, 64), (64, 64), (64, 128), (64, 192), (64, 256)]


def test_nearest_bucket_matches_the_aspect_ratio() -> None:
    assert nearest_bucket(100, 300, make_buckets(256)) == (128, 384)
    assert nearest_bucket(300, 100, make_buckets(256)) == (384, 128)


def test_cover_size_and_resize_crop() -> None:
    assert cover_size(100, 300, (64, 64)) == (64, 192)
    assert cover_size(100, 301, (64, 64)) == (64, 193)  # rounded, not truncated
    img = Image.frombytes("RGB", (301, 100), bytes(range(256)) * (301 * 100 * 3 // 256) + bytes(301 * 100 * 3 % 256))
    out, crop = resize_crop(img, (64, 64))
    assert crop == (0, 64, 64, 64)
    assert out.size == (64, 64)
    want = img.resize((193, 64), Image.Resampling.LANCZOS).crop((64, 0, 128, 64))
    assert out.tobytes() == want.tobytes()


def test_resize_crop_refuses_an_image_too_elongated_to_cover() -> None:
    img = Image.new("L", (17896, 1))  # covering 100x100: 1,789,600 x 100 pixels, just over MAX_PIXELS
    with pytest.raises(ImageError, match="too elongated"):
        resize_crop(img, (100, 100))


# ---------------------------------------------------------------- latents/build.py, latents/options.py


def _summary(**kw: int) -> CacheSummary:
    counts = {"rows": 5, "shards": 1, "encoded": 5, "failed": 0, "done_before": 0, "failed_before": 0,
              "unreadable_shards": 0} | kw
    return CacheSummary(root=Path("c"), index=Path("c/index.json"), **counts)


def test_cache_summary_ok_and_line() -> None:
    assert _summary().ok
    assert not _summary(failed_before=1).ok
    assert not _summary(unreadable_shards=1).ok
    assert _summary(enlarged=2, failed_before=3, unreadable_shards=1).summary() == (
        "cached 5 rows in c (this run encoded 5 images and skipped 0 unreadable; 2 of those were smaller than "
        "their crop, so enlarged; 0 were done before; 3 found unreadable before were skipped again; "
        "1 unreadable tar shard skipped)")
    assert _summary(unreadable_shards=2).summary().endswith("; 2 unreadable tar shards skipped)")


@pytest.mark.parametrize("kw, message", [
    ({"batch_size": True}, "batch_size must be an int, got True"),
    ({"seed": 2**63}, "seed must be between 0 and 9223372036854775807"),
    ({"seed": -1}, "seed must be between 0 and 9223372036854775807"),
])
def test_build_cache_checks_option_types_and_seed_first(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        build_cache(None, tmp_path, tmp_path / "out", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny() -> klvae.AutoencoderKL:
    torch.manual_seed(0)
    return klvae.AutoencoderKL("tiny").eval()


def test_build_cache_refuses_bad_out_model_name_and_torchrun_without_group(
        tmp_path: Path, tiny: klvae.AutoencoderKL, monkeypatch: pytest.MonkeyPatch) -> None:
    data = noise_folder(tmp_path / "data", 1, (16, 16))
    (tmp_path / "file").write_text("x")
    with pytest.raises(KlvaeError, match="is a file, not a folder"):
        build_cache(tiny, data, tmp_path / "file", resolution=16)
    with pytest.raises(KlvaeError, match="is inside the data folder"):
        build_cache(tiny, data, data, resolution=16)
    with pytest.raises(KlvaeError, match="model_name must be a str or a path, got int"):
        build_cache(tiny, data, tmp_path / "out", resolution=16, model_name=3)  # type: ignore[arg-type]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KlvaeError, match="under torchrun, build_cache needs the process group"):
        build_cache(tiny, data, tmp_path / "out", resolution=16)


def test_build_cache_summary_counts_rows_shards_and_unreadable_shards(tmp_path: Path,
                                                                      tiny: klvae.AutoencoderKL) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    _tar(d / "a.tar", ["x.png", "y.png"])
    (d / "b.tar").write_bytes(b"not a tar" * 100)
    s = build_cache(tiny, str(d / "*.tar"), tmp_path / "out", resolution=8, flip=True, num_workers=0)
    assert (s.rows, s.shards, s.encoded, s.failed, s.unreadable_shards, s.ok) == (4, 1, 2, 0, 1, False)


def test_cache_option_checks() -> None:
    assert CacheOptions(store="sample").store == "sample"
    assert CacheOptions(num_workers=0).num_workers == 0
    with pytest.raises(OptionError, match="with buckets, resolution must be a multiple of 64, got 96"):
        CacheOptions(resolution=96, buckets=True)
    with pytest.raises(OptionError, match="shard_size must be at least 1, got 0"):
        CacheOptions(shard_size=0)
    with pytest.raises(OptionError, match="x must be at least 1, got 0"):
        check_at_least("x", 0, 1)
    check_resolution(MAX_RESOLUTION)
    with pytest.raises(OptionError, match=f"resolution must be at most {MAX_RESOLUTION}"):
        check_resolution(MAX_RESOLUTION + 1)


def test_whole_latents_count_the_latent_patch() -> None:
    vae = klvae.AutoencoderKL(klvae.get_preset("tiny").replace(latent_patch_size=2))
    check_whole_latents(vae, 8)
    with pytest.raises(OptionError, match=r"resolution must be a multiple of 4 \(the model's downsample factor 2 "
                                          r"x its latent patch 2\), got 6"):
        check_whole_latents(vae, 6)
