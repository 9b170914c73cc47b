"""Per-channel latent statistics (latents_mean / latents_std, Playground v2.5's form) through every path that
scales latents: the model, diffusers' config.json, latents files, the cache and `klvae scale`."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import one_error_line, perturbed_vae
from klvae import inference
from klvae.cli.main import main
from klvae.errors import LatentsError
from klvae.images import load_image, pil_to_tensor
from klvae.latents.buckets import resize_crop
from klvae.latents.cache import model_fingerprint
from klvae.latents.dataset import LatentDataset
from klvae.latents.file import load_latents, save_latents
from klvae.model.config import PRESETS
from klvae.model.latent_norm import LatentNorm
from klvae.weights.diffusers_config import config_from_diffusers, config_to_diffusers

MEAN, STD = (0.3, -0.2, 0.1, 0.5), (2.0, 0.5, 1.5, 4.0)


def _pipeline_scale(z: torch.Tensor, mean: tuple, std: tuple, sf: float) -> torch.Tensor:
    # As diffusers' SDXL pipelines write it (img2img's encode), with the channel count of z.
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (z - m) * sf / s


@pytest.fixture(scope="module")
def per_channel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pc-model")
    perturbed_vae(scaling_factor=0.5, latents_mean=MEAN, latents_std=STD).save_pretrained(d)
    return d


def _images(root: Path, n: int, size: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def test_the_playground_preset_carries_its_published_statistics() -> None:
    cfg = PRESETS["playground25"]
    assert cfg.scaling_factor == 0.5 and cfg.shift_factor is None
    assert cfg.latents_mean == (-1.6574, 1.886, -1.383, 2.5155)
    assert cfg.latents_std == (8.4927, 5.9022, 6.5498, 5.2299)
    assert cfg.block_out_channels == PRESETS["sdxl"].block_out_channels


def test_per_channel_scaling_is_the_pipelines_formula_and_inverts() -> None:
    vae = perturbed_vae(scaling_factor=0.5, latents_mean=MEAN, latents_std=STD)
    z = torch.randn(2, 4, 3, 5)
    s = vae.scale_latents(z)
    torch.testing.assert_close(s, _pipeline_scale(z, MEAN, STD, 0.5))
    torch.testing.assert_close(vae.unscale_latents(s), z)
    torch.testing.assert_close(vae.config.latent_norm.scale(z[0]), s[0])  # one unbatched [C, H, W] latent
    with pytest.raises(ValueError, match="do not have the 4 channels"):
        vae.scale_latents(torch.randn(1, 16, 2, 2))


@pytest.mark.parametrize(("change", "message"), [
    ({"latents_mean": MEAN}, "set both or neither"),
    ({"latents_std": STD}, "set both or neither"),
    ({"latents_mean": MEAN[:3], "latents_std": STD[:3]}, "3 entries for 4 latent channels"),
    ({"latents_mean": MEAN, "latents_std": STD[:2]}, "latents_mean has 4 entries but latents_std has 2"),
    ({"latents_mean": MEAN, "latents_std": (1.0, 0.0, 1.0, 1.0)}, "every latents_std entry must be a finite positive"),
    ({"latents_mean": (0.0, float("nan"), 0, 0), "latents_std": STD}, "every latents_mean entry must be a finite"),
    ({"latents_mean": "abcd", "latents_std": STD}, "latents_mean must be a non-empty list of numbers"),
    ({"latents_mean": MEAN, "latents_std": STD, "shift_factor": 0.1}, "two shifts of the same latent"),
])
def test_bad_statistics_are_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PRESETS["tiny"].replace(**change)


def test_diffusers_config_reads_and_writes_the_statistics(caplog: pytest.LogCaptureFixture) -> None:
    cfg = PRESETS["playground25"]
    d = json.loads(json.dumps(config_to_diffusers(cfg)))
    assert d["latents_mean"] == list(cfg.latents_mean) and d["latents_std"] == list(cfg.latents_std)
    assert config_from_diffusers(d) == cfg
    with caplog.at_level(logging.WARNING):  # no pipeline reads both: the per-channel ones win, with a warning
        both = config_from_diffusers({**d, "shift_factor": 0.1})
    assert both == cfg and "both shift_factor and latents_mean" in caplog.text
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.AutoencoderKL.from_config(config_to_diffusers(PRESETS["tiny"].replace(
        latents_mean=MEAN, latents_std=STD)))
    assert list(theirs.config.latents_mean) == list(MEAN) and list(theirs.config.latents_std) == list(STD)


def test_encode_and_decode_carry_the_statistics_in_the_latents_file(tmp_path: Path, per_channel_dir: Path) -> None:
    data = _images(tmp_path / "in", 2)
    out = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(data), "-o", str(out), "--model", str(per_channel_dir)]) == 0
    lf = load_latents(out)
    assert (lf.latents_mean, lf.latents_std, lf.scaling_factor) == (MEAN, STD, 0.5)
    vae = klvae.AutoencoderKL.from_pretrained(per_channel_dir)
    x = pil_to_tensor(load_image(data / "img0.png"))[None]
    z = inference.encode(vae, x).mode()
    torch.testing.assert_close(lf.latents[lf.items[0].key][None], _pipeline_scale(z, MEAN, STD, 0.5),
                               atol=1e-5, rtol=1e-5)
    # Decoding unscales with the file's statistics: the PNG equals a decode of the unscaled latent.
    assert main(["-q", "decode", str(out), "-o", str(tmp_path / "png"), "--model", str(per_channel_dir)]) == 0
    expected = inference.decode(vae, z)
    got = pil_to_tensor(Image.open(tmp_path / "png" / "img0.png"))[None]
    assert (got - expected.clamp(-1, 1)).abs().max() <= 2.5 / 255 * 2  # PNG rounding, over [-1, 1]


def test_a_latents_file_whose_statistics_do_not_fit_is_refused(tmp_path: Path, per_channel_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    data = _images(tmp_path / "in", 1)
    out = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(data), "-o", str(out), "--model", str(per_channel_dir)]) == 0
    lf = load_latents(out)
    lf.latents_mean, lf.latents_std = MEAN[:2], STD[:2]
    save_latents(lf, out)
    with pytest.raises(LatentsError, match="has 4 channels, but latents_mean/latents_std describe 2"):
        load_latents(out)
    assert main(["decode", str(out), "-o", str(tmp_path / "png"), "--model", str(per_channel_dir)]) == 2
    assert "latents_mean/latents_std describe 2" in one_error_line(capsys.readouterr().err)
    with safe_open(str(out), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(out), {**meta, "latents_std": "null"})
    with pytest.raises(LatentsError, match="malformed metadata: latents_mean and latents_std come together"):
        load_latents(out)
    assert not (tmp_path / "png").exists()


def test_cache_rows_are_scaled_per_channel(tmp_path: Path, per_channel_dir: Path) -> None:
    data = _images(tmp_path / "data", 2)
    out = tmp_path / "cache"
    args = ["-q", "cache", "--data", str(data), "-o", str(out), "--model", str(per_channel_dir),
            "--resolution", "32", "--num-workers", "0"]
    assert main(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert (index["latents_mean"], index["latents_std"]) == (list(MEAN), list(STD))
    vae = klvae.AutoencoderKL.from_pretrained(per_channel_dir)
    ds = LatentDataset(out, mode="mean")
    row = next(i for i, it in enumerate(ds.items) if it["source"] == "img1.png")
    img, _ = resize_crop(load_image(data / "img1.png"), (32, 32))
    z = inference.encode(vae, pil_to_tensor(img)[None]).mode()
    torch.testing.assert_close(ds[row]["latents"], _pipeline_scale(z, MEAN, STD, 0.5)[0], atol=1e-5, rtol=1e-5)


def test_fingerprints_of_models_without_statistics_are_unchanged() -> None:
    # Figures from the code before the per-channel fields existed: caches written then still resume.
    vae = klvae.AutoencoderKL(PRESETS["tiny"])
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    assert model_fingerprint(vae) == "baefeee9ffab06e9d7ee2a32b37d4262"
    assert model_fingerprint(vae, with_factors=False) == "88e0e930515bab169fd0448c0381c905"
    vae.config = vae.config.replace(latents_mean=MEAN, latents_std=STD)
    assert model_fingerprint(vae) != "baefeee9ffab06e9d7ee2a32b37d4262"  # other factors, other scaled latents
    assert model_fingerprint(vae, with_factors=False) == "88e0e930515bab169fd0448c0381c905"


def test_scale_per_channel_estimates_and_saves_the_statistics(tmp_path: Path, per_channel_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.latents.scale import estimate_factors

    data = _images(tmp_path / "data", 3)
    vae = klvae.AutoencoderKL.from_pretrained(per_channel_dir)
    f = estimate_factors(vae, str(data), resolution=32, sample=False)
    zs = torch.cat([inference.encode(vae, pil_to_tensor(load_image(p))[None]).mode()
                    for p in sorted(data.glob("*.png"))]).double()
    means, stds = (torch.tensor(f[k], dtype=torch.float64) for k in ("latents_mean", "latents_std"))
    torch.testing.assert_close(means, zs.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stds, zs.std(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-7)
    assert f["shift_factor"] == pytest.approx(zs.mean().item(), rel=1e-6)
    # The statistics make each channel zero-mean and unit-std on the data they came from.
    unit = LatentNorm(1.0, None, f["latents_mean"], f["latents_std"]).scale(zs)
    torch.testing.assert_close(unit.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(unit.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64))
    saved = tmp_path / "per-channel"
    args = ["scale", "--data", str(data), "--model", str(per_channel_dir), "--resolution", "32"]
    assert main([*args, "--per-channel", "--save", str(saved)]) == 0
    assert "latents_mean [" in capsys.readouterr().out
    cfg = klvae.AutoencoderKL.from_pretrained(saved).config
    sampled = estimate_factors(vae, str(data), resolution=32)  # the CLI measures posterior samples, seed 0
    assert cfg.latents_mean == tuple(round(v, 6) for v in sampled["latents_mean"])
    assert cfg.latents_std == tuple(round(v, 6) for v in sampled["latents_std"])
    assert (cfg.scaling_factor, cfg.shift_factor) == (1.0, None)
    # Scalar factors for a per-channel model replace its statistics (before: shift and mean both set, refused).
    scalar = tmp_path / "scalar"
    assert main([*args, "--save", str(scalar)]) == 0
    cfg = klvae.AutoencoderKL.from_pretrained(scalar).config
    assert cfg.latents_mean is None and cfg.shift_factor == round(sampled["shift_factor"], 6)
    with pytest.raises(SystemExit):  # argparse: one form or the other
        main([*args, "--per-channel", "--no-shift"])
