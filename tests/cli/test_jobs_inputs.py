"""Bad input to the dataset jobs (cache, scale, noise, eval): one-line errors before any work, skipped and
counted bad parts of the data, truthful summaries, and no resume with another model."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from klvae.cli.main import main
from klvae.errors import ImageError, KlvaeError
from klvae.latents import cache
from klvae.latents.sources import ItemSource, open_source

DEMO = Path(klvae.__file__).parent / "assets" / "demo"


def _png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _images(root: Path, n: int, bad: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i:02d}.png").write_bytes(_png(i))
    for i in range(bad):
        (root / f"bad{i}.png").write_bytes(b"not an image")
    return root


def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tf:
        for k, name in enumerate(names):
            data = _png(k)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """Exit status, stdout and stderr's lines (quiet: INFO logs and progress bars off) of one klvae command."""
    capsys.readouterr()
    rc = main(["-q", *argv])
    out = capsys.readouterr()
    return rc, out.out, [ln for ln in out.err.splitlines() if ln.strip()]


def _one_line_error(rc: int, err: list[str], *words: str) -> None:
    assert rc == 2 and len(err) == 1 and err[0].startswith("klvae: error: "), err
    assert all(w in err[0] for w in words), err


# ---- 1. a resume with another model ------------------------------------------------------------------------


def test_model_fingerprint_follows_the_weights_not_the_path_or_precision(tmp_path: Path) -> None:
    a = klvae.AutoencoderKL.from_pretrained(DEMO)
    copy = klvae.AutoencoderKL.from_pretrained(shutil.copytree(DEMO, tmp_path / "copy"))
    fp = cache.model_fingerprint(a)
    assert cache.model_fingerprint(copy) == fp  # another path, the same model
    assert cache.model_fingerprint(copy.to(torch.bfloat16)) == fp  # a GPU run's bf16 weights: still the same
    with torch.no_grad():
        next(a.parameters()).view(-1)[0] += 0.5
    assert cache.model_fingerprint(a) != fp
    # The factors count only where they decide the rows (store=scaled).
    plain, rescaled = klvae.AutoencoderKL.from_pretrained(DEMO), klvae.AutoencoderKL.from_pretrained(DEMO)
    rescaled.config = rescaled.config.replace(scaling_factor=0.5)
    assert cache.model_fingerprint(rescaled) != cache.model_fingerprint(plain)
    assert cache.model_fingerprint(rescaled, with_factors=False) == cache.model_fingerprint(plain, with_factors=False)


def test_cache_resume_with_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", 2)
    out = tmp_path / "cache"
    base = ["cache", "--data", str(data), "-o", str(out), "--resolution", "32", "--num-workers", "0"]
    assert _run(capsys, *base, "--model", str(DEMO))[0] == 0
    index = json.loads((out / "index.json").read_text())
    assert len(index["model_fingerprint"]) == 32
    torch.manual_seed(0)
    other = klvae.AutoencoderKL(klvae.get_preset("tiny-f8")).save_pretrained(tmp_path / "other")
    for interrupted in (False, True):  # a finished cache (index.json), then one killed before its index
        if interrupted:
            (out / "index.json").unlink()
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        rc, _, err = _run(capsys, *base, "--model", str(other))
        _one_line_error(rc, err, "another model")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing removed
    # The same weights under another path resume fine.
    assert _run(capsys, *base, "--model", str(shutil.copytree(DEMO, tmp_path / "demo-copy")))[0] == 0


# ---- 2, 5, 6. options no run can use -----------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "words"), [
    (["--resolution", "0"], ["--resolution", "at least 1"]),
    (["--resolution", "-64"], ["--resolution"]),
    (["--resolution", "20000"], ["--resolution", "at most"]),
    (["--resolution", "36"], ["--resolution", "downsample factor 8"]),
    (["--shard-size", "0"], ["--shard-size"]),
    (["--num-workers", "-1"], ["--num-workers"]),
])
def test_cache_bad_options_are_one_line_errors_that_leave_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: list[str]
) -> None:
    data = _images(tmp_path / "data", 2)
    out = tmp_path / "out" / "c0"
    rc, _, err = _run(capsys, "cache", "--data", str(data), "-o", str(out), "--resolution", "32", *extra)
    _one_line_error(rc, err, *words)
    assert not out.exists()


def test_cache_of_no_images_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(capsys, "cache", "--data", str(tmp_path / "empty"), "-o", str(tmp_path / "c"))
    _one_line_error(rc, err, "no images")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("argv", "words"), [
    (["scale", "--resolution", "0"], ["--resolution"]),
    (["scale", "--resolution", "-64"], ["--resolution"]),
    # The encoder would pad the crop, and the padding's latent cells would bias the statistics.
    (["scale", "--resolution", "60"], ["--resolution must be a multiple", "factor 8", "got 60"]),
    (["scale", "--limit", "0"], ["--limit"]),
    (["scale", "--limit", "-3"], ["--limit"]),
    (["noise", "IMAGE", "-o", "OUT", "--num-steps", "0"], ["--num-steps", "got 0"]),
    (["noise", "IMAGE", "-o", "OUT", "--num-steps", "10", "--steps", "10"], ["--steps", "got 10"]),
    (["noise", "IMAGE", "-o", "OUT", "--beta-end", "1"], ["--beta-end", "between 0 and 1", "got 1.0"]),
    (["noise", "IMAGE", "-o", "OUT", "--beta-start", "nan"], ["--beta-start", "between 0 and 1"]),
    (["noise", "IMAGE", "-o", "OUT", "--schedule", "cosine", "--beta-start", "0.001"],
     ["--beta-start sets the range", "cosine"]),
])
def test_scale_and_noise_bad_options_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    data = _images(tmp_path / "data", 1)
    argv = [a.replace("IMAGE", str(data / "img00.png")).replace("OUT", str(tmp_path / "n.png")) for a in argv]
    if argv[0] == "scale":
        argv += ["--data", str(data)]
    rc, _, err = _run(capsys, *argv)
    _one_line_error(rc, err, *words)


@pytest.mark.parametrize("job", ["cache", "scale", "eval"])
@pytest.mark.parametrize(("device", "words"), [("meta", ["meta device holds no data"]),
                                               ("mps", ["MPS"]), ("nonsense", ["is not a device"])])
def test_the_jobs_refuse_a_device_that_cannot_run_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], job: str, device: str, words: list[str]
) -> None:
    data = _images(tmp_path / "data", 2)
    argv = [job, "--data", str(data), "--device", device]
    argv += {"cache": ["-o", str(tmp_path / "c")], "eval": ["-o", str(tmp_path / "r"), "--no-lpips", "--no-fid"],
             "scale": []}[job]
    rc, _, err = _run(capsys, *argv)
    _one_line_error(rc, err, "--device", *words)
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


class _Flaky(ItemSource):
    """A folder whose second image makes the loader raise something that is not an ImageError."""

    def load(self, item_id: str) -> Image.Image:
        if item_id == self.ids[1]:
            raise ZeroDivisionError("division by zero")
        return super().load(item_id)


def test_an_unexpected_error_in_a_loader_worker_skips_that_image(tmp_path: Path) -> None:
    folder = open_source(str(_images(tmp_path / "data", 3)))
    source = _Flaky("folder", folder.ids, folder._paths)
    vae = klvae.AutoencoderKL.from_pretrained(DEMO)
    opts = cache.CacheOptions(resolution=32, num_workers=1, batch_size=2)
    counts = cache.cache_rank(vae, source, tmp_path / "c", opts, torch.float32)
    assert (counts["encoded"], counts["failed"]) == (2, 1)


def test_an_error_inside_a_worker_reaches_the_cli_as_one_line() -> None:
    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> int:
            return 1 // 0

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(RuntimeError) as e:
        list(cache._batches(loader))
    assert len(str(e.value).splitlines()) == 1 and "ZeroDivisionError" in str(e.value)


def test_rerun_summary_counts_the_images_found_unreadable_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _images(tmp_path / "data", 3, bad=2)
    argv = ["cache", "--data", str(data), "-o", str(tmp_path / "c"), "--resolution", "32", "--num-workers", "0",
            "--flip"]
    rc, out, _ = _run(capsys, *argv)
    assert rc == 1 and "cached 6 rows" in out and "encoded 3 images and skipped 2 unreadable" in out
    rc, out, _ = _run(capsys, *argv)
    assert rc == 1, "the cache still lacks two images"
    assert "encoded 0 images and skipped 0 unreadable; 3 were done before; 2 found unreadable before" in out


def test_cache_of_only_unreadable_images_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", 0, bad=2)
    rc, _, err = _run(capsys, "cache", "--data", str(data), "-o", str(tmp_path / "c"), "--num-workers", "0")
    assert rc == 2 and err[-1] == f"klvae: error: nothing cached in {tmp_path / 'c'}: none of the 2 images could be " \
        "read"
    assert not (tmp_path / "c").exists()  # no trace: its manifest would mark both images as failed for good
    for i in range(2):  # mended under the same names, the images are encoded by the same command
        (data / f"bad{i}.png").write_bytes(_png(i))
    rc, out, _ = _run(capsys, "cache", "--data", str(data), "-o", str(tmp_path / "c"), "--num-workers", "0")
    assert rc == 0 and "encoded 2 images and skipped 0 unreadable" in out
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("the user's")
    (data / "bad0.png").write_bytes(b"broken again")
    (data / "bad1.png").unlink()
    rc, _, err = _run(capsys, "cache", "--data", str(data), "-o", str(tmp_path / "d"), "--num-workers", "0")
    assert rc == 2 and err[-1].endswith("the only image could not be read")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["notes.txt"]  # a folder with other files stays


# ---- 3. corrupt tar shards and parquet files ----------------------------------------------------------------


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "tars"
    d.mkdir()
    _tar(d / "a.tar", ["x.png", "y.png"])
    _tar(d / "c.tar", ["z.png"])
    (d / "b.tar").write_bytes(np.random.default_rng(0).integers(0, 255, 1000, dtype=np.uint8).tobytes())
    return d


def test_a_corrupt_tar_shard_is_skipped_and_counted(shards: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(shards / "*.tar")
    rc, out, err = _run(capsys, "cache", "--data", spec, "-o", str(tmp_path / "c"), "--resolution", "32",
                        "--num-workers", "0")
    assert rc == 1 and "cached 3 rows" in out and "1 unreadable tar shard skipped" in out
    assert err == [f"WARNING: skipping tar shard {shards / 'b.tar'}: not a tar file (nor a gzip, bz2 or xz "
                   "compressed one)"]
    rc, out, err = _run(capsys, "eval", "--data", spec, "-o", str(tmp_path / "r"), "--resolution", "32",
                        "--no-lpips", "--no-fid")
    assert rc == 1 and "3 images, 1 skipped" in out and any("b.tar" in ln for ln in err)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["images"]["skipped_items"][0]["id"] == str(shards / "b.tar")


def test_a_tar_shard_cut_short_keeps_the_images_before_the_cut(shards: Path) -> None:
    whole = (shards / "a.tar").read_bytes()
    x_end = 512 + -(-len(_png(0)) // 512) * 512  # header and data in 512-byte blocks
    (shards / "a.tar").write_bytes(whole[: x_end + 512 + 100])  # x.png whole, y.png's header and a bit of it
    source = open_source(str(shards / "a.tar"))
    assert source.ids == ["a.tar:x.png", "a.tar:y.png"] and "cut short" in source.unreadable[0][1]
    assert source.load("a.tar:x.png").size == (48, 40)
    with pytest.raises(ImageError, match=r"y\.png"):
        source.load("a.tar:y.png")


@pytest.mark.parametrize("job", ["cache", "eval"])
def test_only_unreadable_data_is_a_one_line_error(shards: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], job: str) -> None:
    corrupt_pq = tmp_path / "corrupt.parquet"
    corrupt_pq.write_bytes(b"PAR1 not really")
    extra = ["--no-lpips", "--no-fid"] if job == "eval" else []
    for spec, words in ((shards / "b.tar", ["cannot read tar shard", "b.tar"]),
                        (corrupt_pq, ["cannot read parquet file", "corrupt.parquet"])):
        rc, _, err = _run(capsys, job, "--data", str(spec), "-o", str(tmp_path / "out"), *extra)
        _one_line_error(rc, err, *words)
        assert not (tmp_path / "out").exists()


def test_open_source_raises_klvae_errors_only(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(KlvaeError, match="cannot read parquet file"):
        open_source(str(tmp_path / "x.parquet"))


# ---- 7. outputs checked before the work ----------------------------------------------------------------------


def test_scale_save_to_a_file_fails_before_the_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import klvae.latents.scale as scale

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started")

    monkeypatch.setattr(scale, "estimate_factors", no_work)
    data = _images(tmp_path / "data", 1)
    (tmp_path / "f").write_text("x")
    rc, _, err = _run(capsys, "scale", "--data", str(data), "--save", str(tmp_path / "f"))
    _one_line_error(rc, err, "--save", "is a file")


@pytest.mark.parametrize("job", ["cache", "eval", "scale"])
def test_an_unwritable_output_fails_before_the_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, job: str) -> None:
    import os

    import klvae.cli.common as common

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    # Root may write anywhere, so the test stands in for the permission check rather than chmod.
    monkeypatch.setattr(common.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    data = _images(tmp_path / "data", 1)
    flag = "--save" if job == "scale" else "-o"
    extra = ["--no-lpips", "--no-fid"] if job == "eval" else []
    rc, _, err = _run(capsys, job, "--data", str(data), flag, str(ro / "x"), *extra)
    _one_line_error(rc, err, "no permission to write in", str(ro))
