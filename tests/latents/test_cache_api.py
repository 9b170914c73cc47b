"""`klvae.latents.build_cache`: the Python API of `klvae cache` — the same cache, resumed alike, errors in one line."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import klvae
from helpers import saved_tiny_model
from klvae import inference
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.latents import CacheSummary, build_cache
from klvae.latents.cache import CacheOptions, cache_rank
from klvae.latents.dataset import LatentDataset
from klvae.latents.sources import open_source

# The options of every call here, as build_cache takes them and as the CLI spells them.
OPTIONS = {"resolution": 32, "flip": True, "shard_size": 2, "batch_size": 2, "num_workers": 0}
FLAGS = ["--resolution", "32", "--flip", "--shard-size", "2", "--batch-size", "2", "--num-workers", "0",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("model"), scaling_factor=0.5, shift_factor=0.1)


@pytest.fixture(scope="module")
def vae(model_dir: Path) -> klvae.AutoencoderKL:
    return klvae.AutoencoderKL.from_pretrained(model_dir)


def _images(root: Path, n: int, bad: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = ((48, 64), (64, 40))[i % 2]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    for i in range(bad):
        (root / f"bad{i}.png").write_bytes(b"not an image")
    return root


def _shards(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(out.glob("*.safetensors"))}


def test_build_cache_writes_what_the_cli_writes_and_the_reader_reads_it(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture
) -> None:
    data = _images(tmp_path / "data", 4, bad=1)
    # The CLI's levers (channels_last on the CPU), so that the rows round alike.
    vae = inference.optimize_for_inference(klvae.AutoencoderKL.from_pretrained(model_dir), torch.float32)
    with caplog.at_level(logging.INFO, logger="klvae"):
        summary = build_cache(vae, str(data), tmp_path / "py", model_name=str(model_dir), **OPTIONS)
    assert isinstance(summary, CacheSummary) and summary.index == tmp_path / "py" / "index.json"
    # One unreadable file: skipped and counted, the rest finished; 4 images x 2 flips in shards of 2 rows.
    assert (summary.encoded, summary.failed, summary.done_before, summary.failed_before) == (4, 1, 0, 0)
    assert (summary.rows, summary.shards, summary.ok) == (8, 4, False)
    assert "caching 5 images into" in caplog.text
    ds = LatentDataset(tmp_path / "py", mode="mean")  # readable right away: the index is written
    assert len(ds) == 8 and ds[0]["latents"].shape == (4, 16, 16)

    assert main(["cache", "--data", str(data), "-o", str(tmp_path / "cli"), "--model", str(model_dir), *FLAGS]) == 1
    assert capsys.readouterr().out.strip() == summary.summary().replace(str(tmp_path / "py"), str(tmp_path / "cli"))
    py, cli = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("py", "cli"))
    assert py["items"] == cli["items"] and py["failed"] == cli["failed"] == ["bad0.png"]
    assert py["model_fingerprint"] == cli["model_fingerprint"] and py["options"] == cli["options"]
    a, b = _shards(tmp_path / "py"), _shards(tmp_path / "cli")
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:  # the same latents, row by row
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], atol=1e-6, rtol=1e-6)


def test_a_second_call_encodes_nothing_new_and_a_grown_folder_only_the_new(
    tmp_path: Path, vae: klvae.AutoencoderKL
) -> None:
    data, out = _images(tmp_path / "data", 3, bad=1), tmp_path / "cache"
    first = build_cache(vae, data, out, **OPTIONS)  # a Path is data too
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = build_cache(vae, data, out, **OPTIONS)
    assert (again.encoded, again.failed, again.done_before, again.failed_before) == (0, 0, 3, 1)
    assert (again.rows, again.shards) == (first.rows, first.shards) and not again.ok
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before  # untouched
    (data / "bad0.png").unlink()
    _images(data, 5)  # img003 and img004 are new; the rest are rewritten with the same pixels
    grown = build_cache(vae, data, out, **OPTIONS)
    assert (grown.encoded, grown.done_before, grown.rows, grown.ok) == (2, 3, 10, True)
    assert sorted({it["source"] for it in LatentDataset(out).items}) == [f"img{i:03d}.png" for i in range(5)]


def test_a_cache_left_without_its_index_is_finished_by_build_cache(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    # The user trial's dead end: the shards of cache_rank alone, which LatentDataset cannot read.
    data, out = _images(tmp_path / "data", 2), tmp_path / "cache"
    cache_rank(vae, str(data), out, CacheOptions(**OPTIONS), torch.float32)
    with pytest.raises(KlvaeError, match=r"has no index\.json"):
        LatentDataset(out)
    summary = build_cache(vae, str(data), out, **OPTIONS)
    assert (summary.encoded, summary.done_before, summary.rows, summary.ok) == (0, 2, 4, True)
    assert len(LatentDataset(out)) == 4


def _refused(call: object, match: str) -> str:
    with pytest.raises(KlvaeError, match=match) as e:
        call()  # type: ignore[operator]
    assert len(str(e.value).splitlines()) == 1
    return str(e.value)


def test_bad_input_is_a_one_line_klvae_error_that_leaves_nothing(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    data, out = _images(tmp_path / "data", 2), tmp_path / "cache"
    _refused(lambda: build_cache(vae, str(tmp_path / "missing"), out), "no such data")
    _refused(lambda: build_cache(vae, data, out, store="latents"), "store must be moments, sample or scaled")
    _refused(lambda: build_cache(vae, data, out, resolution="32"), "resolution must be an int")  # type: ignore[arg-type]
    _refused(lambda: build_cache(vae, data, out, flip=1), "flip must be a bool")  # type: ignore[arg-type]
    _refused(lambda: build_cache(vae, data, out, resolution=33), "multiple of the model's downsample factor 2")
    _refused(lambda: build_cache(vae, data, out, seed=-1), "seed must be between 0")
    _refused(lambda: build_cache(vae, data, out, dtype="fp64"), "dtype must be auto, fp32, bf16 or fp16")
    _refused(lambda: build_cache(object(), data, out), "vae must be a klvae AutoencoderKL")  # type: ignore[arg-type]
    _refused(lambda: build_cache(vae, data, data / "cache"), "inside the data folder")
    (tmp_path / "file").write_text("x")
    _refused(lambda: build_cache(vae, data, tmp_path / "file"), "is a file, not a folder")
    assert not out.exists() and not (data / "cache").exists()
    _images(tmp_path / "none", 0, bad=2)
    _refused(lambda: build_cache(vae, tmp_path / "none", out, num_workers=0), "none of the 2 images could be read")


def test_a_resume_with_other_options_is_refused(tmp_path: Path, vae: klvae.AutoencoderKL) -> None:
    data, out = _images(tmp_path / "data", 2), tmp_path / "cache"
    build_cache(vae, data, out, **OPTIONS)
    _refused(lambda: build_cache(vae, data, out, **{**OPTIONS, "flip": False}), "made with flip=True")


def test_under_torchrun_without_a_process_group_it_refuses(
    tmp_path: Path, vae: klvae.AutoencoderKL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As one process, every rank would write rank 0's shards over one another.
    monkeypatch.setenv("WORLD_SIZE", "2")
    _refused(lambda: build_cache(vae, _images(tmp_path / "data", 1), tmp_path / "c"), "needs the process group")
    assert not (tmp_path / "c").exists()


def test_data_as_an_item_source_and_model_name_as_a_path(
    tmp_path: Path, model_dir: Path, vae: klvae.AutoencoderKL
) -> None:
    # A Path as model_name used to fail only at the end, in index.json's json.dumps, after every image was encoded.
    source = open_source(str(_images(tmp_path / "data", 2)))
    summary = build_cache(vae, source, tmp_path / "cache", model_name=model_dir, **OPTIONS)
    assert (summary.encoded, summary.rows, summary.ok) == (2, 4, True)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["model"] == str(model_dir)
    out = tmp_path / "other"
    _refused(lambda: build_cache(vae, [tmp_path / "data"], out), "data must be a path or an ItemSource, got list")
    _refused(lambda: build_cache(vae, source, out, model_name=1), "model_name must be a str or a path, got int")
    assert not out.exists()


def test_images_smaller_than_their_crop_are_counted_and_warned_of(tmp_path: Path, vae: klvae.AutoencoderKL,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """As training and evaluation do: an image scaled up to cover its crop is said, not enlarged silently."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"small": (24, 40), "tall": (64, 24), "big": (48, 64), "exact": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="klvae"):
        summary = build_cache(vae, data, tmp_path / "out", **OPTIONS)
    assert (summary.encoded, summary.enlarged) == (4, 2)  # small and tall have a side under 32; exact does not
    warned = [r.getMessage() for r in caplog.records if "enlarged" in r.getMessage()]
    assert warned == ["2 of the 4 images encoded were smaller than their crop (resolution 32) and were enlarged to "
                      "cover it, which blurs them; a resolution at most the images' shorter side avoids that"]
    assert "; 2 of those were smaller than their crop, so enlarged;" in summary.summary()
    caplog.clear()
    again = build_cache(vae, data, tmp_path / "out", **OPTIONS)  # nothing left to encode: nothing enlarged now
    assert (again.encoded, again.enlarged) == (0, 0) and "enlarged" not in caplog.text
    assert "enlarged" not in again.summary()
