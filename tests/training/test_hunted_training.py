"""Pins bugs that a hunt through training, evaluation and the latent cache's readers found:

- validation over a data.val with no readable image records PSNR 0 dB and SSIM 0 in metrics.jsonl, as if it had
  measured them (it should refuse, or record no validation);
- `klvae train` accepts a train.out_dir inside the data.train folder (eval, cache and scale refuse such an
  output), and a resumed run then trains on its own sample grids as data;
- BucketBatchSampler accepts numpy-integer seeds and epochs, and seeds of 2**64 and more, in its checks, then
  fails inside torch.Generator.manual_seed when iterated.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import noise_folder, one_error_line, tiny_train_config
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.latents.dataset import BucketBatchSampler, LatentDataset


def _images(root: Path, n: int, side: int = 24) -> Path:
    return noise_folder(root, n, hw=(side, side), pattern="{i}.png")


def _empty_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as t:
        data = b"not an image"
        info = tarfile.TarInfo("a.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return path


# ---- 1. validation with nothing to validate ------------------------------------------------------------------------
@pytest.mark.parametrize("val_kind", ["tar without images", "folder of unreadable images"])
def test_a_validation_set_without_a_readable_image_records_no_psnr_of_zero(tmp_path: Path, val_kind: str) -> None:
    from klvae.training.loop import fit
    from klvae.training.trainer import Trainer

    _images(tmp_path / "images", 2)
    if val_kind == "tar without images":
        val = _empty_tar(tmp_path / "val.tar")
    else:
        val = tmp_path / "val"
        val.mkdir()
        (val / "broken.png").write_bytes(b"junk")
    cfg = tiny_train_config(tmp_path, f"data.val={val}", "train.val_lpips=false", "train.max_steps=1")
    try:
        fit(Trainer(cfg))
    except KlvaeError as e:  # refusing the validation set is right too, if it says which setting is at fault
        assert "data.val" in str(e) or str(val) in str(e)
        return
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if r["split"] == "val"]
    # No image was measured: a PSNR of 0 dB (and SSIM 0) is a measurement no image gave.
    assert all("psnr" not in r for r in val_rows), val_rows


# ---- 2. train.out_dir inside the training data ------------------------------------------------------------------
def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = ["model.preset=tiny", f"data.train={data}", "data.resolution=16", "data.batch_size=2",
            "data.num_workers=0", "loss.preset=mse", "train.device=cpu", "train.val_lpips=false",
            f"train.out_dir={out}", "train.max_steps=1", *extra]
    return ["train", *(a for s in sets for a in ("--set", s))]


def test_train_refuses_an_out_dir_inside_the_training_image_folder(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = _images(tmp_path / "data", 2)
    code = main(_train_args(data, data / "run", f"data.val={data}"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "train.out_dir" in one_error_line(err)
    assert not (data / "run" / "samples").exists()  # nothing written where the next run would read it as data


def test_a_resumed_run_does_not_train_on_its_own_sample_grids(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.distributed import DistInfo
    from klvae.training.config import load_config
    from klvae.training.data_setup import build_train_loader

    data = _images(tmp_path / "data", 2)
    args = _train_args(data, data / "run", f"data.val={data}")
    if main(args) == 2:  # refused up front (the test above): nothing to resume, which is a right outcome too
        return
    capsys.readouterr()
    assert sorted((data / "run" / "samples").glob("*.png")), "validation wrote no sample grid"
    # The training data a --resume of this run reads, over two passes: the run's own output must not be in it.
    cfg = load_config(None, [a for a in args[1:] if a != "--set"])
    loader = build_train_loader(cfg, DistInfo(), start_batch=1)
    keys = {k for _, batch in zip(range(4), loader, strict=False) for k in batch["keys"]}
    assert keys == {"0.png", "1.png"}, sorted(keys)


# ---- 3. BucketBatchSampler seeds and epochs ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    data = _images(root / "images", 4, side=16)
    out = root / "cache"
    assert main(["cache", "--data", str(data), "-o", str(out), "--resolution", "16", "--device", "cpu",
                 "--store", "moments", "-q"]) == 0
    return out


def test_bucket_sampler_takes_a_numpy_integer_seed_it_accepts(small_cache: Path) -> None:
    ds = LatentDataset(small_cache, seed=np.int64(3))  # the dataset takes it
    sampler = BucketBatchSampler(ds, 2, seed=np.int64(5))  # and so do the sampler's checks ...
    batches = list(sampler)  # ... so iterating must work, as with the same seed as a Python int
    assert batches == list(BucketBatchSampler(ds, 2, seed=5))


def test_bucket_sampler_takes_a_numpy_integer_epoch_it_accepts(small_cache: Path) -> None:
    ds = LatentDataset(small_cache)
    sampler = BucketBatchSampler(ds, 2, seed=0)
    sampler.set_epoch(np.int64(1))
    reference = BucketBatchSampler(ds, 2, seed=0)
    reference.set_epoch(1)
    assert list(sampler) == list(reference)


@pytest.mark.parametrize(("seed", "epoch"), [(2**64, 0), (2**64 - 1, 1)])
def test_bucket_sampler_seeds_past_64_bits_are_refused_or_work(small_cache: Path, seed: int, epoch: int) -> None:
    ds = LatentDataset(small_cache, seed=seed)  # LatentDataset hashes any seed
    try:
        sampler = BucketBatchSampler(ds, 2, seed=seed)
        sampler.set_epoch(epoch)
    except ValueError as e:  # refused where it is given, naming it: fine
        assert "seed" in str(e) or "epoch" in str(e)
        return
    batches = list(sampler)  # accepted: iterating must then work (not torch's "Overflow when unpacking long")
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
