"""A diffusion trainer's view of the cache: the metadata a dataset item carries for SDXL's micro-conditioning."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

import klvae
from klvae.cli.main import main
from klvae.latents.buckets import resize_crop
from klvae.latents.dataset import BucketBatchSampler, LatentDataset


def _cache(tmp_path: Path, sizes: list[tuple[int, int]], resolution: int, *extra: str) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = tmp_path / "model"
    klvae.AutoencoderKL(klvae.get_preset("tiny")).save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"img{i}.png")
    out = tmp_path / "cache"
    assert main(["cache", "--data", str(data), "-o", str(out), "--model", str(model), "--resolution", str(resolution),
                 "--num-workers", "0", "--flip", *extra]) == 0
    return data, out


def test_items_carry_sdxl_micro_conditioning_with_the_flipped_crop_in_the_flipped_image(tmp_path: Path) -> None:
    # 40x61 scaled to cover 32x32 is 32x49: a centre crop at left 8, whose mirror lies at left 49 - 32 - 8 = 9.
    data, out = _cache(tmp_path, [(40, 61)], 32)
    ds = LatentDataset(out, mode="mean")
    img = Image.open(data / "img0.png").convert("RGB")
    cut, (top, left, th, tw) = resize_crop(img, (32, 32))
    scaled = img.resize((49, 32), Image.Resampling.LANCZOS)
    for i, it in enumerate(ds.items):
        item = ds[i]
        assert item["original_size"].tolist() == [40, 61] and item["target_size"].tolist() == [32, 32]
        ctop, cleft = item["crops_coords_top_left"].tolist()
        want_crop = (top, 49 - tw - left) if it["flip"] else (top, left)
        assert (ctop, cleft) == want_crop == ((0, 9) if it["flip"] else (0, 8))
        assert item["add_time_ids"].tolist() == [40, 61, ctop, cleft, 32, 32]
        seen = ImageOps.mirror(scaled) if it["flip"] else scaled  # diffusers' order: flip, then crop
        want = ImageOps.mirror(cut) if it["flip"] else cut
        assert np.array_equal(np.asarray(seen.crop((cleft, ctop, cleft + tw, ctop + th))), np.asarray(want))


def test_micro_conditioning_collates_to_batch_rows(tmp_path: Path) -> None:
    _, out = _cache(tmp_path, [(40, 61), (64, 48), (40, 61)], 64, "--buckets")
    ds = LatentDataset(out, seed=0)
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds, batch_size=4, seed=0))
    for batch in loader:
        b = batch["latents"].shape[0]
        assert batch["original_size"].shape == batch["crops_coords_top_left"].shape == (b, 2)
        assert batch["add_time_ids"].shape == (b, 6) and batch["add_time_ids"].dtype == torch.int64
        assert (batch["target_size"] == batch["latents"].shape[-1] * 2).any()  # tiny downsamples by 2


def test_noise_decodes_batch_size_timesteps_per_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from klvae import inference
    torch.manual_seed(0)
    model = tmp_path / "model"
    klvae.AutoencoderKL(klvae.get_preset("tiny")).save_pretrained(model)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 16, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    passes: list[int] = []
    real = inference.decode

    def counted(vae: klvae.AutoencoderKL, z: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        passes.append(z.shape[0])
        return real(vae, z, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inference, "decode", counted)
    sheets = {}
    for batch in ("2", "1"):
        sheets[batch] = tmp_path / f"sheet{batch}.png"
        assert main(["noise", str(tmp_path / "x.png"), "-o", str(sheets[batch]), "--model", str(model),
                     "--steps", "0", "500", "999", "--batch-size", batch]) == 0
    assert passes == [2, 1, 1, 1, 1]  # the option is honoured, not ignored
    a, b = (np.asarray(Image.open(sheets[k]), dtype=np.int16) for k in ("2", "1"))
    assert a.shape == b.shape and a.shape[1:] == (16 * 3, 3) and np.abs(a - b).max() <= 1


def test_flipped_crop_left_in_a_non_square_bucket() -> None:
    # A wide 40x101 image in a 32x48 bucket: scaled to 32x81, centre crop at left 16; the mirrored image's crop of the
    # same pixels starts at 81 - 48 - 16 = 17 (the crop's width, not its height; the scaled width, not the height).
    from klvae.latents.dataset import micro_conditioning
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 101, 3), dtype=np.uint8))
    cut, (top, left, th, tw) = resize_crop(img, (32, 48))
    assert (top, left, th, tw) == (0, 16, 32, 48)
    row = {"size": [40, 101], "crop": [top, left, th, tw], "bucket": [32, 48]}
    assert micro_conditioning({**row, "flip": False})["add_time_ids"].tolist() == [40, 101, 0, 16, 32, 48]
    mc = micro_conditioning({**row, "flip": True})
    assert mc["add_time_ids"].tolist() == [40, 101, 0, 17, 32, 48]
    ctop, cleft = mc["crops_coords_top_left"].tolist()
    mirrored = ImageOps.mirror(img.resize((81, 32), Image.Resampling.LANCZOS))
    seen = mirrored.crop((cleft, ctop, cleft + tw, ctop + th))
    assert np.array_equal(np.asarray(seen), np.asarray(ImageOps.mirror(cut)))
