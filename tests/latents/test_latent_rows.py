"""What each cached row holds (per --store), how the reader scales it, latents files' factors, the crop, buckets
and the bucket sampler: values checked against the posterior and the factors computed here, not just shapes."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import klvae
from klvae import inference
from klvae.cli.main import main
from klvae.images import load_image, pil_to_tensor, tensor_to_pil
from klvae.latents.buckets import make_buckets, nearest_bucket, resize_crop
from klvae.latents.cache import keyed_generator
from klvae.latents.dataset import BucketBatchSampler, LatentDataset
from klvae.latents.file import load_latents

SCALE, SHIFT = 0.5, 0.1  # the test model's factors: the diffusion latent is (z - SHIFT) * SCALE
RES = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    cfg = klvae.get_preset("tiny").replace(scaling_factor=SCALE, shift_factor=SHIFT)
    klvae.AutoencoderKL(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vae(model_dir: Path) -> klvae.AutoencoderKL:
    return klvae.AutoencoderKL.from_pretrained(model_dir)


def _images(root: Path, n: int, sizes: tuple[tuple[int, int], ...] = ((48, 64), (64, 40))) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


def _cache_args(data: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["cache", "--data", str(data), "-o", str(out), "--model", str(model), "--resolution", str(RES),
            "--num-workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _images(tmp_path_factory.mktemp("data"), 2)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, data: Path) -> dict[str, Path]:
    """One finished cache per --store, with flipped rows, sample noise from seed 5."""
    root = tmp_path_factory.mktemp("caches")
    outs = {}
    for store in ("moments", "sample", "scaled"):
        outs[store] = root / store
        assert main(_cache_args(data, outs[store], model_dir, "--store", store, "--flip", "--seed", "5")) == 0
    return outs


def _moments(vae: klvae.AutoencoderKL, data: Path, item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and logvar [1, C, h, w] of a row's cut (flipped as the row says), computed here."""
    cut, _ = resize_crop(load_image(data / item["source"]), (RES, RES))
    x = pil_to_tensor(cut)[None]
    x = x.flip(-1) if item["flip"] else x
    mean, logvar = inference.encode_moments(vae, x).chunk(2, dim=1)
    return mean, logvar


def _posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    eps = torch.randn(mean.shape, generator=gen)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps


def _stored(out: Path, item: dict, field: str = "latent") -> torch.Tensor:
    with safe_open(str(out / item["shard"]), framework="pt") as f:
        return f.get_tensor(f"{item['row']:06d}.{field}")


def _items(out: Path) -> list[dict]:
    items = json.loads((out / "index.json").read_text())["items"]
    assert sorted((it["source"], it["flip"]) for it in items) == [
        (f"img{i:03d}.png", f) for i in range(2) for f in (False, True)]
    return items


def _expected_latent(vae: klvae.AutoencoderKL, data: Path, item: dict, store: str) -> torch.Tensor:
    """The unscaled VAE latent a row of this store stands for: the mean, or the row's own posterior sample."""
    mean, logvar = _moments(vae, data, item)
    if store == "sample":
        return _posterior_sample(mean, logvar, keyed_generator(5, item["source"], int(item["flip"])))[0]
    return mean[0]


# ---- what a row holds ----------------------------------------------------------------------------------------


def test_sample_store_rows_hold_the_posterior_sample_of_their_own_noise(
    caches: dict[str, Path], vae: klvae.AutoencoderKL, data: Path
) -> None:
    out = caches["sample"]
    rows = {}
    for it in _items(out):
        stored = _stored(out, it)
        mean, logvar = _moments(vae, data, it)
        # Noise from (seed, image, flip): mean + exp(logvar / 2) * eps, unscaled (the reader scales it).
        z = _posterior_sample(mean, logvar, keyed_generator(5, it["source"], int(it["flip"])))[0]
        torch.testing.assert_close(stored, z, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(stored, mean[0], atol=1e-3)  # a sample, not the mean
        rows[(it["source"], it["flip"])] = stored
    # Another seed would have drawn other noise: the stored sample is the seed-5 one.
    it = _items(out)[0]
    mean, logvar = _moments(vae, data, it)
    other = _posterior_sample(mean, logvar, keyed_generator(6, it["source"], int(it["flip"])))[0]
    assert not torch.allclose(rows[(it["source"], it["flip"])], other, atol=1e-3)


def test_scaled_store_rows_hold_the_scaled_mean(
    caches: dict[str, Path], vae: klvae.AutoencoderKL, data: Path
) -> None:
    out = caches["scaled"]
    for it in _items(out):
        stored = _stored(out, it)
        mean, _ = _moments(vae, data, it)
        torch.testing.assert_close(stored, (mean[0] - SHIFT) * SCALE, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored, vae.scale_latents(mean)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(stored, mean[0], atol=1e-3)


def test_moments_store_rows_hold_mean_and_logvar(
    caches: dict[str, Path], vae: klvae.AutoencoderKL, data: Path
) -> None:
    out = caches["moments"]
    for it in _items(out):
        mean, logvar = _moments(vae, data, it)
        torch.testing.assert_close(_stored(out, it, "mean"), mean[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_stored(out, it, "logvar"), logvar[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("store", ["moments", "sample", "scaled"])
def test_the_reader_scales_every_store_exactly_once(
    caches: dict[str, Path], vae: klvae.AutoencoderKL, data: Path, store: str
) -> None:
    ds = LatentDataset(caches[store], mode="mean")
    index = json.loads((caches[store] / "index.json").read_text())
    assert (index["scaling_factor"], index["shift_factor"]) == (SCALE, SHIFT)
    for i, it in enumerate(ds.items):
        z = _expected_latent(vae, data, it, store)
        got = ds[i]["latents"]
        torch.testing.assert_close(got, (z - SHIFT) * SCALE, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, z, atol=1e-3)  # not unscaled
        assert not torch.allclose(got, ((z - SHIFT) * SCALE - SHIFT) * SCALE, atol=1e-3)  # nor scaled twice
        assert ds[i]["source"] == it["source"] and ds[i]["flip"] == it["flip"]


# ---- latents files: encode / decode with a shifted model -------------------------------------------------------


def test_encode_keeps_the_shift_and_decode_undoes_it(
    tmp_path: Path, model_dir: Path, vae: klvae.AutoencoderKL
) -> None:
    img_dir = _images(tmp_path / "in", 1, sizes=((40, 48),))
    path = tmp_path / "z.safetensors"
    assert main(["encode", str(img_dir / "img000.png"), "-o", str(path), "--model", str(model_dir),
                 "--device", "cpu"]) == 0
    lf = load_latents(path)
    assert lf.scaling_factor == SCALE and lf.shift_factor == SHIFT
    (it,) = lf.items
    assert (it.height, it.width) == (40, 48)
    mode = inference.encode(vae, pil_to_tensor(load_image(img_dir / "img000.png"))[None]).mode()
    torch.testing.assert_close(lf.latents[it.key], (mode[0] - SHIFT) * SCALE, atol=1e-5, rtol=1e-5)
    # decode unscales with the file's factors: the image that decoding the unshifted latent gives.
    out = tmp_path / "dec"
    assert main(["decode", str(path), "-o", str(out), "--model", str(model_dir), "--device", "cpu"]) == 0
    got = np.asarray(Image.open(out / "img000.png").convert("RGB")).astype(int)
    want = np.asarray(tensor_to_pil(inference.decode(vae, mode, size=(40, 48))[0])).astype(int)
    no_shift = np.asarray(tensor_to_pil(inference.decode(vae, mode - SHIFT, size=(40, 48))[0])).astype(int)
    assert got.shape == want.shape == (40, 48, 3)
    assert np.abs(got - want).max() <= 1  # float rounding may move a pixel by one level
    assert np.abs(no_shift - want).max() > 2  # a lost shift would show


# ---- the crop ----------------------------------------------------------------------------------------------------


def _coordinate_image(h: int, w: int) -> Image.Image:
    """Each pixel's red channel is 3*x, green 3*y: where a crop came from can be read from its pixels."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([3 * x, 3 * y, np.full_like(x, 100)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize(("h", "w", "top", "left"), [
    (32, 71, 0, 19),  # wide: cut the centre columns, (71 - 32) // 2 = 19 from the left
    (71, 32, 19, 0),  # tall: the centre rows
    (32, 64, 0, 16),
])
def test_resize_crop_cuts_the_centre_and_returns_top_left(h: int, w: int, top: int, left: int) -> None:
    # The image already covers 32x32 at scale 1: no resampling, so the pixels are the original's exactly.
    cut, crop = resize_crop(_coordinate_image(h, w), (32, 32))
    assert crop == (top, left, 32, 32)  # SDXL's crop coordinates (top, left), then the cut's size
    assert cut.size == (32, 32)
    arr = np.asarray(cut).astype(int)
    y, x = np.mgrid[0:32, 0:32]
    np.testing.assert_array_equal(arr[..., 0], 3 * (x + left))
    np.testing.assert_array_equal(arr[..., 1], 3 * (y + top))


def test_resize_crop_of_a_banded_wide_image_keeps_the_middle_bands() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    for k, c in enumerate(colours):
        arr[:, 16 * k : 16 * (k + 1)] = c
    cut, crop = resize_crop(Image.fromarray(arr), (32, 32))
    assert crop == (0, 16, 32, 32)
    out = np.asarray(cut)
    assert (out[:, :16] == colours[1]).all() and (out[:, 16:] == colours[2]).all()  # green, blue: the centre
    # Scaled down first (128x64 -> 64x32): the same crop in scaled pixels, the centre bands (away from edges).
    big = np.repeat(np.repeat(arr, 2, axis=0), 2, axis=1)
    cut, crop = resize_crop(Image.fromarray(big), (32, 32))
    assert crop == (0, 16, 32, 32)
    out = np.asarray(cut).astype(int)
    assert np.abs(out[:, 2:13] - colours[1]).max() <= 2 and np.abs(out[:, 19:30] - colours[2]).max() <= 2


# ---- resume refusals -------------------------------------------------------------------------------------------


def test_resuming_a_scaled_cache_with_other_factors_is_refused(
    tmp_path: Path, model_dir: Path, vae: klvae.AutoencoderKL, capsys: pytest.CaptureFixture[str]
) -> None:
    from klvae.errors import KlvaeError
    from klvae.latents import cache

    data = _images(tmp_path / "data", 2, sizes=((32, 32),))
    other_dir = tmp_path / "rescaled"
    other = klvae.AutoencoderKL.from_pretrained(model_dir)
    other.config = other.config.replace(scaling_factor=0.25)  # the same weights, another factor
    other.save_pretrained(other_dir)
    for store in ("scaled", "moments"):
        out = tmp_path / store
        assert main(_cache_args(data, out, model_dir, "--store", store)) == 0
        assert main(_cache_args(data, out, model_dir, "--store", store)) == 0  # the same model resumes
        capsys.readouterr()
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        rc = main(_cache_args(data, out, other_dir, "--store", store))
        if store == "moments":  # moments do not depend on the factors: another scale may finish them
            assert rc == 0
            continue
        assert rc == 2
        # The refusal comes after the model loads (its INFO lines precede it): one error line, the last.
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("INFO")]
        assert len(err) == 1 and err[0].startswith("klvae: error: ") and "another model" in err[0], err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        # The library call alone (no fingerprint given) refuses too, and so does a killed run (no index yet).
        (out / "index.json").unlink()
        opts = cache.CacheOptions(resolution=RES, store="scaled", num_workers=0)
        with pytest.raises(KlvaeError, match="another model"):
            cache.cache_rank(other, str(data), out, opts, torch.float32)
        cache.cache_rank(vae, str(data), out, opts, torch.float32)  # the original model still may


def test_resuming_a_sampled_cache_with_another_seed_is_refused(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _images(tmp_path / "data", 2, sizes=((32, 32),))
    out = tmp_path / "cache"
    assert main(_cache_args(data, out, model_dir, "--store", "sample", "--seed", "3")) == 0
    capsys.readouterr()
    assert main(_cache_args(data, out, model_dir, "--store", "sample", "--seed", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed" in err[0], err
    assert main(_cache_args(data, out, model_dir, "--store", "sample", "--seed", "3")) == 0


# ---- the bucket sampler ------------------------------------------------------------------------------------------


def _fake_dataset(sizes: dict[tuple[int, int], int]) -> LatentDataset:
    items = [{"bucket": list(b)} for b, n in sizes.items() for _ in range(n)]
    return SimpleNamespace(items=items)  # type: ignore[return-value]  # the sampler reads .items only


def test_bucket_sampler_reshuffles_per_epoch_from_seed_plus_epoch() -> None:
    ds = _fake_dataset({(32, 32): 13, (32, 64): 11, (64, 32): 7})

    def order(seed: int, epoch: int) -> list[list[int]]:
        s = BucketBatchSampler(ds, batch_size=3, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    e0, e1 = order(10, 0), order(10, 1)
    assert e0 != e1  # a new epoch, a new order
    assert order(10, 1) == e1 and order(10, 0) == e0  # the same epoch, the same order
    assert order(11, 0) == e1 and order(9, 1) == e0  # seeded by seed + epoch
    for batches in (e0, e1):
        assert sorted(i for b in batches for i in b) == list(range(31))
        assert all(len({tuple(ds.items[i]["bucket"]) for i in b}) == 1 for b in batches)
    s = BucketBatchSampler(ds, batch_size=3, seed=10)
    s.set_epoch(1)
    assert list(s) == list(s) == e1  # iterating twice in one epoch: the same order


@pytest.mark.parametrize(("sizes", "batch", "n"), [
    ({(32, 32): 5, (32, 64): 3}, 2, 5),
    ({(32, 32): 7, (32, 64): 1, (64, 32): 4}, 4, 4),
    ({(32, 32): 6}, 3, 2),
])
def test_bucket_sampler_len_counts_partial_last_batches(sizes: dict[tuple[int, int], int], batch: int,
                                                        n: int) -> None:
    ds = _fake_dataset(sizes)
    for shuffle in (True, False):
        s = BucketBatchSampler(ds, batch_size=batch, shuffle=shuffle)
        batches = list(s)
        assert len(s) == len(batches) == n
        assert sorted(i for b in batches for i in b) == list(range(sum(sizes.values())))
        assert all(1 <= len(b) <= batch for b in batches)


# ---- buckets -----------------------------------------------------------------------------------------------------


def test_make_buckets_keeps_ratios_up_to_four_inclusive() -> None:
    b64 = make_buckets(64)
    assert b64 == [(256, 64), (192, 64), (128, 64), (64, 64), (64, 128), (64, 192), (64, 256)]
    b256 = make_buckets(256)
    assert (128, 512) in b256 and (512, 128) in b256  # exactly 4:1
    ratios = [max(h / w, w / h) for h, w in b256]
    assert max(ratios) == 4.0
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in b256)
    assert all(abs(h * w - 256**2) / 256**2 <= 0.25 for h, w in b256 if max(h / w, w / h) <= 2)
    assert [w / h for h, w in b256] == sorted(w / h for h, w in b256)


def test_nearest_bucket_compares_log_aspect_ratios() -> None:
    # Wide 2.2:1 between 1:1 and 4:1: log distance picks 4:1 (|ln 2.2 - ln 4| < ln 2.2); linear w/h would pick 1:1.
    wide = [(64, 64), (64, 256)]
    assert abs(math.log(4) - math.log(2.2)) < math.log(2.2) and abs(4 - 2.2) > abs(2.2 - 1)
    assert nearest_bucket(100, 220, wide) == (64, 256)
    # Tall 1:2.2: the same in log space; linear h/w would pick 1:1.
    tall = [(64, 64), (256, 64)]
    assert nearest_bucket(220, 100, tall) == (256, 64)
    # Orientation is kept: a wide image never lands in a tall bucket, nor the other way.
    both = [(64, 64), (64, 256), (256, 64)]
    assert nearest_bucket(100, 220, both) == (64, 256) and nearest_bucket(220, 100, both) == (256, 64)
    assert nearest_bucket(100, 150, both) == (64, 64)  # 1.5:1 is nearer 1:1 than 4:1 in log space
