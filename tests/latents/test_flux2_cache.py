"""FLUX.2's patched latents through the data commands: `klvae cache` (every store, buckets) and LatentDataset,
`klvae scale --per-channel` (printed, saved, read back by diffusers' AutoencoderKLFlux2), estimate_factors against
statistics computed here, `klvae noise` and NoiseSchedule on patched latents, latents files of a patched model
(sizes in whole patches) and decoding files with a model of the other kind.

A tiny FLUX.2-like model throughout: tiny-f8 (factor 8) with 8 latent channels in 2x2 patches, so its diffusion
latent has 32 channels at 1/16 of the image's size."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

import klvae
from helpers import one_error_line, perturbed_vae
from klvae import inference
from klvae.cli.main import main
from klvae.diffusion import NoiseSchedule
from klvae.errors import LatentsError
from klvae.images import load_image, pil_to_tensor
from klvae.latents.buckets import make_buckets, nearest_bucket, resize_crop
from klvae.latents.cache import keyed_generator
from klvae.latents.dataset import LatentDataset
from klvae.latents.file import LatentItem, LatentsFile, load_latents, save_latents
from klvae.latents.scale import estimate_factors
from klvae.latents.sources import open_source
from klvae.model.latent_norm import LatentNorm
from klvae.posterior import DiagonalGaussian

C, P = 8, 2  # VAE latent channels, latent patch
CP = C * P * P  # the diffusion latent's channels
F16 = 8 * P  # pixels per diffusion-latent cell
BN_EPS = 1e-4
SIZES = ((40, 72), (72, 40), (32, 32), (50, 70))  # (height, width): non-square, square, and no multiple of 16


def flux2_patchify(z: Tensor) -> Tensor:
    """diffusers' Flux2Pipeline._patchify_latents, written out: [B, c, h, w] -> [B, 4c, h/2, w/2], (c, pi, pj)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _stats() -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(7)
    mean = (torch.randn(CP, generator=g) * 0.2).tolist()
    std = (torch.rand(CP, generator=g) + 0.5).tolist()  # positive, all different
    return mean, std


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vae = perturbed_vae("tiny-f8", latent_channels=C, latent_patch_size=P, scaling_factor=1.0)
    mean, std = _stats()
    vae.config = vae.config.replace(latents_mean=mean, latents_std=std)
    d = tmp_path_factory.mktemp("flux2-model")
    vae.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def flux2(flux2_dir: Path) -> klvae.AutoencoderKL:
    """The model as the CLI loads it from its folder."""
    return klvae.AutoencoderKL.from_pretrained(flux2_dir).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        # A smooth gradient under the noise, so that the latents are not all alike.
        ramp = np.linspace(0, 160, w)[None, :, None] + np.linspace(0, 80, h)[:, None, None]
        px = np.clip(ramp + rng.integers(0, 96, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / f"img{i}.png")
    return root


def _encode_mode(vae: klvae.AutoencoderKL, img: Image.Image) -> Tensor:
    return inference.encode(vae, pil_to_tensor(img)[None]).mode()


def _flat(index_dir: Path) -> list[str]:
    return sorted(p.name for p in index_dir.iterdir())


# ---- 1. klvae cache and LatentDataset ----

@pytest.mark.parametrize(("resolution", "buckets"), [(32, False), (64, True)])
def test_cache_rows_are_patched_scaled_latents_in_every_store(tmp_path: Path, flux2_dir: Path,
                                                               flux2: klvae.AutoencoderKL, data: Path,
                                                               resolution: int, buckets: bool) -> None:
    caches = {}
    for store in ("moments", "sample", "scaled"):
        caches[store] = out = tmp_path / store
        args = ["-q", "cache", "--data", str(data), "-o", str(out), "--model", str(flux2_dir), "--resolution",
                str(resolution), "--num-workers", "0", "--store", store, *(["--buckets"] if buckets else [])]
        assert main(args) == 0
        index = json.loads((out / "index.json").read_text())
        assert index["latent_patch_size"] == P and index["latent_channels"] == C
        assert index["latents_mean"] == list(flux2.config.latents_mean)
        assert index["latents_std"] == list(flux2.config.latents_std)

    sets = {store: LatentDataset(out, mode="mean") for store, out in caches.items()}
    rows = {store: {it["source"]: i for i, it in enumerate(ds.items)} for store, ds in sets.items()}
    assert all(set(r) == {f"img{i}.png" for i in range(len(SIZES))} for r in rows.values())
    grid = make_buckets(resolution) if buckets else [(resolution, resolution)]
    seen_shapes = set()
    for source, i in rows["moments"].items():
        img = load_image(data / source)
        bucket = nearest_bucket(img.height, img.width, grid)
        cut, crop = resize_crop(img, bucket)
        item = sets["moments"][i]
        assert item["bucket"] == list(bucket) and item["crop"] == list(crop)
        h, w = bucket
        latents = item["latents"]
        assert latents.shape == (CP, h // F16, w // F16)
        seen_shapes.add(tuple(latents.shape))
        # moments + mean: the scaled, patchified posterior mean of the crop
        moments = inference.encode_moments(flux2, pil_to_tensor(cut)[None])
        z = DiagonalGaussian(moments).mode()
        expected = flux2.scale_latents(z)[0]
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
        # ... which the patch-free, per-channel formula gives too: (patchify(z) - mean_c) / std_c
        mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (flux2.config.latents_mean, flux2.config.latents_std))
        torch.testing.assert_close(latents, (flux2_patchify(z)[0] - mean) / std, atol=1e-5, rtol=1e-5)
        # the store of scaled latents agrees with moments read in mean mode
        torch.testing.assert_close(sets["scaled"][rows["scaled"][source]]["latents"], latents, atol=1e-5, rtol=1e-5)
        # the store of samples holds the row's posterior sample (noise from seed, image, flip), scaled at read time
        sample = DiagonalGaussian(moments).sample(keyed_generator(0, source, 0))
        got = sets["sample"][rows["sample"][source]]["latents"]
        assert got.shape == latents.shape
        torch.testing.assert_close(got, flux2.scale_latents(sample)[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, latents, atol=1e-3)
        # undone: the VAE's own latent, [8, h/8, w/8]
        for store in ("moments", "sample", "scaled"):
            unscaled = sets[store].norm.unscale(sets[store][rows[store][source]]["latents"])
            assert unscaled.shape == (C, h // 8, w // 8)
        torch.testing.assert_close(sets["moments"].norm.unscale(latents), z[0], atol=1e-5, rtol=1e-5)
    if buckets:  # the non-square images landed in non-square buckets
        assert len(seen_shapes) == 3
    # moments in sample mode: a fresh posterior draw each epoch, of the same patched shape
    drawn = LatentDataset(caches["moments"], mode="sample", seed=3)
    i = rows["moments"]["img0.png"]
    a = drawn[i]["latents"]
    drawn.set_epoch(1)
    b = drawn[i]["latents"]
    assert a.shape == b.shape == sets["moments"][i]["latents"].shape
    assert not torch.allclose(a, b) and not torch.allclose(a, sets["moments"][i]["latents"])


# ---- 2. resolutions that do not make whole patches ----

@pytest.mark.parametrize("command", ["cache", "scale"])
def test_a_resolution_of_no_whole_patches_is_refused(tmp_path: Path, flux2_dir: Path, data: Path, command: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    target = ["-o", str(out)] if command == "cache" else ["--per-channel", "--save", str(out)]
    args = [command, "--data", str(data), *target, "--model", str(flux2_dir), "--resolution", "40"]
    if command == "cache":
        args += ["--num-workers", "0"]
    assert main(args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "16" in err and "40" in err and "--resolution" in err, err
    assert not out.exists()
    assert _flat(tmp_path) == []


# ---- 3. klvae scale ----

def _printed_list(out: str, name: str) -> list[float]:
    m = re.search(rf"{name} \[([^\]]*)\]", out)
    assert m, out
    return [float(v) for v in m[1].split(",")]


def test_scale_per_channel_prints_saves_and_diffusers_reads_the_patched_statistics(
        tmp_path: Path, flux2_dir: Path, flux2: klvae.AutoencoderKL, data: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "saved"
    base = ["scale", "--data", str(data), "--model", str(flux2_dir), "--resolution", "32"]
    assert main([*base, "--per-channel", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    means, stds = _printed_list(out, "latents_mean"), _printed_list(out, "latents_std")
    assert len(means) == len(stds) == CP
    # the CLI measures posterior samples (seed 0) of centre crops, as estimate_factors does by default
    f = estimate_factors(inference.optimize_for_inference(copy.deepcopy(flux2), torch.float32), str(data),
                         resolution=32)  # with the CLI's levers, which round otherwise
    assert len(f["latents_mean"]) == len(f["latents_std"]) == CP
    assert means == pytest.approx(f["latents_mean"], abs=5.1e-7, rel=0)
    assert stds == pytest.approx(f["latents_std"], abs=5.1e-7, rel=0)
    assert len(set(stds)) > 1 and min(stds) > 0

    cfg = klvae.AutoencoderKL.from_pretrained(saved).config
    assert cfg.latent_patch_size == P and cfg.latent_channels == C
    assert cfg.scaling_factor == 1.0 and cfg.shift_factor is None
    assert list(cfg.latents_mean) == pytest.approx(means, abs=1e-6, rel=0)
    assert list(cfg.latents_std) == pytest.approx(stds, abs=1e-6, rel=0)

    config = json.loads((saved / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2"
    theirs = diffusers.AutoencoderKLFlux2.from_pretrained(saved).eval()
    eps = theirs.config.batch_norm_eps
    assert eps == BN_EPS
    bn_mean = theirs.bn.running_mean.double()
    bn_std = (theirs.bn.running_var.double() + eps).sqrt()
    torch.testing.assert_close(bn_mean, torch.tensor(means, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(bn_std, torch.tensor(stds, dtype=torch.float64), atol=1e-6, rtol=0)
    # ... and the weights are the model's: diffusers' encoder gives klvae's posterior mean
    x = pil_to_tensor(load_image(data / "img2.png"))[None]
    with torch.no_grad():
        their_mean = theirs.encode(x).latent_dist.mean
    torch.testing.assert_close(their_mean, _encode_mode(flux2, load_image(data / "img2.png")), atol=1e-4, rtol=1e-4)


def test_scale_global_factors_print_but_do_not_save_for_a_patched_model(
        tmp_path: Path, flux2_dir: Path, flux2: klvae.AutoencoderKL, data: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["scale", "--data", str(data), "--model", str(flux2_dir), "--resolution", "32"]
    refused = tmp_path / "refused"
    assert main([*base, "--save", str(refused)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "--per-channel" in err, err
    assert not refused.exists() and _flat(tmp_path) == []

    assert main(base) == 0
    out = capsys.readouterr().out
    f = estimate_factors(flux2, str(data), resolution=32)
    m = re.search(r"scaling_factor (\S+)  shift_factor (\S+)", out)
    assert m, out
    assert float(m[1]) == pytest.approx(f["scaling_factor"], rel=1e-5)
    assert float(m[2]) == pytest.approx(f["shift_factor"], abs=5.1e-7)
    assert "latents_mean [" not in out.split("(")[0]  # the global form, not the per-channel one
    assert _flat(tmp_path) == []


# ---- 4. estimate_factors against statistics computed here ----

@pytest.mark.parametrize("sample", [False, True])
def test_estimate_factors_measure_the_patchified_latent(flux2: klvae.AutoencoderKL, data: Path, sample: bool) -> None:
    f = estimate_factors(flux2, str(data), resolution=32, sample=sample, seed=0)
    source = open_source(str(data))
    zs = []
    for i, item_id in enumerate(source.ids):
        cut, _ = resize_crop(source.load(item_id), (32, 32))
        post = inference.encode(flux2, pil_to_tensor(cut)[None])
        # estimate_factors draws image i's sample from a generator seeded seed + i
        z = post.sample(torch.Generator().manual_seed(i)) if sample else post.mode()
        patched = LatentNorm(latent_patch_size=P).patchify(z)
        torch.testing.assert_close(patched, flux2_patchify(z), rtol=0, atol=0)
        zs.append(patched.double())
    z = torch.cat(zs)
    assert z.shape == (len(SIZES), CP, 2, 2)
    means, stds = (torch.tensor(f[k], dtype=torch.float64) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(means, z.mean(dim=(0, 2, 3)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stds, z.std(dim=(0, 2, 3), unbiased=False), atol=1e-6, rtol=1e-6)
    assert f["shift_factor"] == pytest.approx(z.mean().item(), abs=1e-6)
    assert f["std"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-6)
    assert f["images"] == len(SIZES) and f["skipped"] == 0
    # The patch positions are told apart: channel c's four patch entries are four different statistics.
    assert not torch.allclose(means.view(C, P * P), means.view(C, P * P)[:, :1].expand(C, P * P), atol=1e-4)
    # The statistics make each patched channel zero-mean and unit-std on the data they came from.
    unit = LatentNorm(1.0, None, f["latents_mean"], f["latents_std"], P).scale(
        torch.cat([LatentNorm(latent_patch_size=P).unpatchify(zi) for zi in zs]))
    torch.testing.assert_close(unit.mean(dim=(0, 2, 3)), torch.zeros(CP, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(unit.std(dim=(0, 2, 3), unbiased=False), torch.ones(CP, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)


# ---- 5. noise ----

def test_noise_sheet_of_a_patched_model_has_the_image_size(tmp_path: Path, flux2_dir: Path, flux2: klvae.AutoencoderKL,
                                                            data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = data / "img3.png"  # 50x70: no multiple of 16
    out = tmp_path / "sheet.png"
    assert main(["noise", str(image), "-o", str(out), "--steps", "0", "999", "--model", str(flux2_dir)]) == 0
    assert "t = 0, 999" in capsys.readouterr().out
    sheet = Image.open(out)
    top = sheet.height - 50
    assert sheet.width == 2 * 70 and top >= 18  # two tiles of the image's size under their label strip
    tiles = np.asarray(sheet.convert("RGB"), dtype=np.float64)[top:]
    # The t=0 tile is the decode of the scaled latents noised at t=0 with the seed-0 noise, cropped to 50x70.
    x = pil_to_tensor(load_image(image))[None]
    z0 = flux2.scale_latents(inference.encode(flux2, x).mode())
    assert z0.shape == (1, CP, 4, 5)
    schedule = NoiseSchedule.from_name("scaled_linear", 1000)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    expected = []
    for t in (0, 999):
        img = inference.decode(flux2, flux2.unscale_latents(schedule.q_sample(z0, t, noise=noise)), size=(50, 70))
        expected.append((img[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    assert np.abs(tiles[:, :70] - expected[0]).max() <= 1.01
    assert np.abs(tiles[:, 70:] - expected[1]).max() <= 1.01
    assert np.abs(tiles[:, :70] - tiles[:, 70:]).mean() > 1.0


def test_add_noise_works_on_patched_latents(flux2: klvae.AutoencoderKL, data: Path) -> None:
    crops = [resize_crop(load_image(data / n), (32, 48))[0] for n in ("img0.png", "img3.png")]
    x = torch.cat([pil_to_tensor(c)[None] for c in crops])
    z0 = flux2.scale_latents(inference.encode(flux2, x).mode())
    assert z0.shape == (2, CP, 2, 3)
    schedule = NoiseSchedule.sd()
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 900])
    zt = schedule.add_noise(z0, noise, t)
    assert zt.shape == z0.shape
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(zt.double(), ab.sqrt() * z0.double() + (1 - ab).sqrt() * noise.double(),
                               atol=1e-6, rtol=1e-6)
    assert flux2.unscale_latents(zt).shape == (2, C, 4, 6)


# ---- 6. latents files of a patched model ----

def test_latents_file_sizes_are_checked_in_whole_patches(tmp_path: Path, flux2_dir: Path, flux2: klvae.AutoencoderKL,
                                                         data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(data / "img3.png"), "-o", str(path), "--model", str(flux2_dir)]) == 0
    lf = load_latents(path, downsample_factor=8)  # 50x70 in cells of 16: 4x5
    assert lf.latent_patch_size == P
    assert lf.latents_mean == flux2.config.latents_mean and lf.latents_std == flux2.config.latents_std
    (item,) = lf.items
    assert (item.height, item.width) == (50, 70)
    z = lf.latents[item.key]
    assert z.shape == (CP, 4, 5)
    expected = flux2.scale_latents(_encode_mode(flux2, load_image(data / "img3.png")))[0]
    torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-5)
    assert lf.norm.unscale(z).shape == (C, 8, 10)

    for height, width in ((65, 70), (48, 70), (50, 81), (50, 64)):  # one past, or one short of, the 16-pixel cells
        bad = tmp_path / f"bad-{height}x{width}.safetensors"
        save_latents(LatentsFile(latents={"k": z}, items=[LatentItem("edited.png", "k", height, width)],
                                 **lf.norm.to_dict()), bad)
        load_latents(bad)  # the sizes are checked only against a downsample factor
        with pytest.raises(LatentsError, match=r"item 0 \('edited.png'\): " +
                           (f"height {height}" if height != 50 else f"width {width}")):
            load_latents(bad, downsample_factor=8)
        png = tmp_path / f"png-{height}x{width}"
        assert main(["decode", str(bad), "-o", str(png), "--model", str(flux2_dir)]) == 2
        err = one_error_line(capsys.readouterr().err)
        assert "edited.png" in err and ("height" if height != 50 else "width") in err, err
        assert not png.exists()


# ---- 7. files of one kind decoded with a model of the other ----

@pytest.fixture(scope="module")
def plain_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Unpatched tiny-f8 models: with the patched model's 8 latent channels, with 4, and with 32 (its patched
    channel count)."""
    dirs = {}
    for channels in (C, 4, CP):
        d = tmp_path_factory.mktemp(f"plain-{channels}")
        perturbed_vae("tiny-f8", seed=1, latent_channels=channels).save_pretrained(d)
        dirs[channels] = d
    return dirs


def _encoded(tmp_path: Path, model: Path, image: Path, name: str) -> Path:
    path = tmp_path / f"{name}.safetensors"
    assert main(["-q", "encode", str(image), "-o", str(path), "--model", str(model)]) == 0
    return path


def test_a_patched_file_decodes_with_a_plain_model_of_its_vae_channels(
        tmp_path: Path, flux2_dir: Path, plain_dirs: dict[int, Path], data: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The file's factors (patches included) are undone first, as for any file whose factors differ from the model's:
    what reaches the model is an [8, h, w] VAE latent, which an 8-channel model decodes, with the usual warning."""
    patched = _encoded(tmp_path, flux2_dir, data / "img3.png", "patched")
    png = tmp_path / "png"
    assert main(["decode", str(patched), "-o", str(png), "--model", str(plain_dirs[C])]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("WARNING: ")]
    # The plain model has other weights (seed 1), so decode says that too.
    assert len(warnings) == 2 and "encoded by another model" in warnings[0]
    assert "latent_patch_size 2" in warnings[1] and "using the file's" in warnings[1]
    plain = klvae.AutoencoderKL.from_pretrained(plain_dirs[C])
    lf = load_latents(patched)
    z = lf.norm.unscale(lf.latents[lf.items[0].key][None])
    assert z.shape == (1, C, 8, 10)
    expected = (inference.decode(plain, z, size=(50, 70))[0].permute(1, 2, 0).numpy() + 1) * 127.5
    got = np.asarray(Image.open(png / "img3.png").convert("RGB"), dtype=np.float64)
    assert got.shape == (50, 70, 3) and np.abs(got - expected).max() <= 1.01

    # and the reverse: a plain file of 8 channels, its own factors undone, decodes with the patched model
    unpatched = _encoded(tmp_path, plain_dirs[C], data / "img3.png", "unpatched")
    assert load_latents(unpatched).latents["000000"].shape == (C, 7, 9)
    png2 = tmp_path / "png2"
    assert main(["decode", str(unpatched), "-o", str(png2), "--model", str(flux2_dir)]) == 0
    assert Image.open(png2 / "img3.png").size == (70, 50)


def test_a_file_whose_vae_latent_does_not_fit_the_model_is_one_error_line(
        tmp_path: Path, flux2_dir: Path, plain_dirs: dict[int, Path], data: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    image = data / "img0.png"
    cases = [
        # patched file (an 8-channel VAE latent) -> a plain 4-channel model
        (_encoded(tmp_path, flux2_dir, image, "patched"), plain_dirs[4], "[B, 4, h, w]"),
        # plain 4-channel file -> the patched model (8 channels)
        (_encoded(tmp_path, plain_dirs[4], image, "plain4"), flux2_dir, "[B, 8, h, w]"),
        # a plain file of 32 channels, the patched model's diffusion-latent count, is no patched file
        (_encoded(tmp_path, plain_dirs[CP], image, "plain32"), flux2_dir, "[B, 8, h, w]"),
    ]
    for n, (path, model, message) in enumerate(cases):
        png = tmp_path / f"png{n}"
        assert main(["decode", str(path), "-o", str(png), "--model", str(model)]) == 2, path
        err = one_error_line(capsys.readouterr().err)
        assert message in err and "item 0" in err, err
        assert not png.exists()

    # a file that says latent_patch_size 2 but holds channels that are no whole 2x2 patches
    odd = tmp_path / "odd.safetensors"
    save_latents(LatentsFile(latents={"k": torch.randn(6, 3, 5)}, items=[LatentItem("odd.png", "k", 40, 72)],
                             latent_patch_size=P), odd)
    png = tmp_path / "png-odd"
    assert main(["decode", str(odd), "-o", str(png), "--model", str(flux2_dir)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "odd.png" in err and "6 channels" in err, err
    assert not png.exists()
