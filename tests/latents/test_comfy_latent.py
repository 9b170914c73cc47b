"""ComfyUI's `.latent` files: `klvae decode` reads what ComfyUI's SaveLatent writes (and the first format, whose
latents LoadLatent multiplies by 1/0.18215), `klvae encode -o x.latent` writes what its LoadLatent reads, in
ComfyUI's convention (unscaled latents; FLUX.2's patched and BatchNorm-normalised); bad files and batches are a
one-line error with exit status 2 and nothing written."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor

import klvae
import klvae.cli.comfy
from helpers import one_error_line
from klvae import inference
from klvae.cli.common import load_model
from klvae.cli.main import main
from klvae.images import load_image, pil_to_tensor, tensor_to_pil
from klvae.latents.comfy import (
    comfy_crop,
    comfy_item_names,
    from_comfy,
    is_comfy_latent,
    load_comfy_latent,
    save_comfy_latent,
    to_comfy,
)
from klvae.latents.file import load_latents
from klvae.model.config import PRESETS

CPU = ["--device", "cpu", "--dtype", "fp32"]  # the references below are computed so too
BN_EPS = 1e-4  # FLUX.2's latent BatchNorm eps (ComfyUI's AutoencodingEngineLegacy: bn_eps = 1e-4)


# ---- ComfyUI's own lines, reproduced ----

def comfy_save_latent(samples: Tensor, file: Path, prompt: dict | None = None) -> None:
    """ComfyUI nodes.py, SaveLatent.save: the LATENT's samples and the version marker, the prompt as metadata
    (comfy.utils.save_torch_file is safetensors.torch.save_file)."""
    metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    output = {}
    output["latent_tensor"] = samples.contiguous()
    output["latent_format_version_0"] = torch.tensor([])
    safetensors.torch.save_file(output, str(file), metadata=metadata)


def comfy_load_latent(latent_path: Path) -> dict[str, Tensor]:
    """ComfyUI nodes.py, LoadLatent.load."""
    latent = safetensors.torch.load_file(str(latent_path), device="cpu")
    multiplier = 1.0
    if "latent_format_version_0" not in latent:
        multiplier = 1.0 / 0.18215
    samples = {"samples": latent["latent_tensor"].float() * multiplier}
    return samples


def comfy_crop_pixels(pixels: Tensor, downscale_ratio: int) -> Tensor:
    """ComfyUI comfy/sd.py, VAE.vae_encode_crop_pixels, on its [B, H, W, C] images."""
    dims = pixels.shape[1:-1]
    for d in range(len(dims)):
        x = (dims[d] // downscale_ratio) * downscale_ratio
        x_offset = (dims[d] % downscale_ratio) // 2
        if x != dims[d]:
            pixels = pixels.narrow(d + 1, x_offset, x)
    return pixels


def comfy_flux2_bn(mean: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """ComfyUI's FLUX.2 VAE after the posterior's mode: rearrange "... c (i pi) (j pj) -> ... (c pi pj) i j"
    (ps = [2, 2]), then its BatchNorm2d(affine=False, eps=1e-4) in eval mode."""
    b, c, h, w = mean.shape
    z = mean.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    return torch.nn.functional.batch_norm(z, running_mean, running_var, training=False, eps=BN_EPS)


# ---- models, images and references ----

FLUX2_SMALL = PRESETS["flux2"].replace(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                                       sample_size=64, force_upcast=False)


def _flux2_stats() -> tuple[Tensor, Tensor]:
    """FLUX.2's BatchNorm statistics as ComfyUI holds them: running_mean, running_var (128 each)."""
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(128, generator=g, dtype=torch.float64) * 0.5
    return mean, torch.rand(128, generator=g, dtype=torch.float64) + 0.2


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("sd-model")
    klvae.AutoencoderKL("tiny-f8").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    mean, var = _flux2_stats()
    # klvae keeps FLUX.2's statistics as the pipelines read them: running_mean and sqrt(running_var + eps).
    cfg = FLUX2_SMALL.replace(latents_mean=tuple(mean.tolist()), latents_std=tuple((var + BN_EPS).sqrt().tolist()))
    d = tmp_path_factory.mktemp("flux2-model")
    klvae.AutoencoderKL(cfg).save_pretrained(d)
    return d


def cli_model(model: Path) -> klvae.AutoencoderKL:
    """The model as `klvae ... --device cpu --dtype fp32` loads it (and readies it for inference)."""
    args = argparse.Namespace(model=str(model), subfolder=None, config=None, device="cpu", dtype="fp32",
                              batch_size=None, compile=False, fused_norm=None)
    return load_model(args)[0]


def png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    Image.fromarray((smooth + rng.normal(0, 20, smooth.shape)).clip(0, 255).astype(np.uint8)).save(path)
    return path


def decoded_pngs(vae: klvae.AutoencoderKL, z: Tensor) -> list[np.ndarray]:
    """Each VAE latent of z decoded on its own, as 8-bit pixels."""
    return [np.asarray(tensor_to_pil(inference.decode(vae, zi[None])[0])) for zi in z]


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# ---- decode: what SaveLatent writes ----

def test_decode_reads_savelatents_file_as_the_latents_themselves(tmp_path: Path, sd_dir: Path) -> None:
    vae = cli_model(sd_dir)
    z = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(0)) * 3  # raw latents: ComfyUI's LATENT
    comfy_save_latent(z, tmp_path / "ComfyUI_00001_.latent", prompt={"3": {"class_type": "KSampler"}})
    assert main(["decode", str(tmp_path / "ComfyUI_00001_.latent"), "-o", str(tmp_path / "out"),
                 "--model", str(sd_dir), *CPU]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["ComfyUI_00001__00.png", "ComfyUI_00001__01.png", "ComfyUI_00001__02.png"]
    for name, want in zip(names, decoded_pngs(vae, z), strict=True):
        got = read_png(tmp_path / "out" / name)
        assert got.shape == (5 * 8, 7 * 8, 3)
        np.testing.assert_array_equal(got, want)


def test_decode_judges_by_content_a_safetensors_holding_latent_tensor(tmp_path: Path, sd_dir: Path) -> None:
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    comfy_save_latent(z, tmp_path / "renamed.safetensors")
    assert is_comfy_latent(tmp_path / "renamed.safetensors")
    assert main(["decode", str(tmp_path / "renamed.safetensors"), "-o", str(tmp_path / "out"),
                 "--model", str(sd_dir), *CPU]) == 0
    np.testing.assert_array_equal(read_png(tmp_path / "out" / "renamed_00.png"), decoded_pngs(cli_model(sd_dir), z)[0])


def test_old_format_is_multiplied_by_one_over_0_18215_as_loadlatent_does(tmp_path: Path, sd_dir: Path) -> None:
    z = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(2)) * 4
    # The first format: scaled latents, no version marker.
    safetensors.torch.save_file({"latent_tensor": z * 0.18215}, str(tmp_path / "old.latent"))
    loaded = load_comfy_latent(tmp_path / "old.latent")
    assert loaded.old_format
    torch.testing.assert_close(loaded.samples, comfy_load_latent(tmp_path / "old.latent")["samples"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.samples, z)
    out = tmp_path / "out"
    assert main(["decode", str(tmp_path / "old.latent"), "-o", str(out), "--model", str(sd_dir), *CPU]) == 0
    want = decoded_pngs(cli_model(sd_dir), comfy_load_latent(tmp_path / "old.latent")["samples"])
    for n in range(2):
        np.testing.assert_array_equal(read_png(out / f"old_{n:02d}.png"), want[n])
    assert not load_comfy_latent(_saved(tmp_path / "new.latent", z)).old_format


def _saved(path: Path, z: Tensor) -> Path:
    comfy_save_latent(z, path)
    return path


def test_decode_of_flux2_latents_undoes_comfyuis_patches_and_batchnorm(tmp_path: Path, flux2_dir: Path) -> None:
    vae = cli_model(flux2_dir)
    z = torch.randn(2, 128, 3, 2, generator=torch.Generator().manual_seed(3))  # ComfyUI's FLUX.2 LATENT
    comfy_save_latent(z, tmp_path / "f2.latent")
    assert main(["decode", str(tmp_path / "f2.latent"), "-o", str(tmp_path / "out"),
                 "--model", str(flux2_dir), *CPU]) == 0
    # ComfyUI's FLUX.2 VAE.decode: z * sqrt(running_var + eps) + running_mean, unpatched, then the decoder.
    mean, var = _flux2_stats()
    raw = z.double() * (var + BN_EPS).sqrt().view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    raw = raw.reshape(2, 32, 2, 2, 3, 2).permute(0, 1, 4, 2, 5, 3).reshape(2, 32, 6, 4).float()
    torch.testing.assert_close(from_comfy(z, vae.config.latent_norm), raw, rtol=1e-5, atol=1e-5)
    for n, want in enumerate(decoded_pngs(vae, from_comfy(z, vae.config.latent_norm))):
        got = read_png(tmp_path / "out" / f"f2_{n:02d}.png")
        assert got.shape == (3 * 16, 2 * 16, 3)
        np.testing.assert_array_equal(got, want)


# ---- encode: what LoadLatent reads ----

def test_encode_writes_the_unscaled_mode_that_loadlatent_reads(tmp_path: Path, sd_dir: Path) -> None:
    imgs = [png(tmp_path / "a.png", 32, 48, 0), png(tmp_path / "b.png", 32, 48, 1)]
    assert main(["encode", *map(str, imgs), "-o", str(tmp_path / "x.latent"), "--model", str(sd_dir), *CPU]) == 0
    assert main(["encode", *map(str, imgs), "-o", str(tmp_path / "x.safetensors"), "--model", str(sd_dir), *CPU]) == 0
    with safe_open(str(tmp_path / "x.latent"), framework="pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert json.loads(f.metadata()["klvae.images"]) == ["a.png", "b.png"]
    samples = comfy_load_latent(tmp_path / "x.latent")["samples"]
    assert samples.shape == (2, 4, 4, 6) and samples.dtype == torch.float32
    # klvae's own file holds the same latents, scaled by the model's factor (0.18215): ComfyUI's are not.
    lf = load_latents(tmp_path / "x.safetensors")
    ours = torch.stack([lf.latents[it.key] for it in lf.items])
    torch.testing.assert_close(samples * 0.18215, ours, rtol=1e-5, atol=1e-6)
    vae = cli_model(sd_dir)
    mode = inference.encode(vae, torch.stack([pil_to_tensor(load_image(p)) for p in imgs])).mode()
    torch.testing.assert_close(samples, mode, rtol=1e-5, atol=1e-6)


def test_encode_crops_as_vaeencode_and_sample_is_not_the_mode(tmp_path: Path, sd_dir: Path) -> None:
    imgs = [png(tmp_path / "a.png", 37, 53, 2), png(tmp_path / "b.png", 32, 48, 3)]  # both crop to 32x48
    assert main(["encode", *map(str, imgs), "-o", str(tmp_path / "x.latent"), "--model", str(sd_dir), *CPU]) == 0
    samples = comfy_load_latent(tmp_path / "x.latent")["samples"]
    # ComfyUI's IMAGE is [B, H, W, C] in [0, 1]; its VAE takes image * 2 - 1.
    pixels = [(pil_to_tensor(load_image(p)).movedim(0, -1)[None] + 1) / 2 for p in imgs]
    x = torch.cat([comfy_crop_pixels(p, 8) for p in pixels]).movedim(-1, 1) * 2 - 1
    assert x.shape == (2, 3, 32, 48)
    torch.testing.assert_close(samples, inference.encode(cli_model(sd_dir), x).mode(), rtol=1e-5, atol=1e-5)
    assert main(["encode", *map(str, imgs), "-o", str(tmp_path / "s.latent"), "--model", str(sd_dir), "--sample",
                 *CPU]) == 0
    sampled = comfy_load_latent(tmp_path / "s.latent")["samples"]
    assert sampled.shape == samples.shape and not torch.allclose(sampled, samples)


def test_encode_skips_and_counts_an_image_that_changed_size_since_its_header_was_read(
        tmp_path: Path, sd_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    imgs = [png(tmp_path / "a.png", 32, 48, 0), png(tmp_path / "b.png", 32, 48, 1), png(tmp_path / "c.png", 32, 48, 2)]
    real = klvae.cli.comfy.loaded_images

    def replaced_after_the_scan(paths: list[Path], bad: list[Path]):  # another program rewrites b.png meanwhile
        png(imgs[1], 64, 64, 5)
        yield from real(paths, bad)

    monkeypatch.setattr(klvae.cli.comfy, "loaded_images", replaced_after_the_scan)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        code = main(["encode", *map(str, imgs), "-o", str(tmp_path / "x.latent"), "--model", str(sd_dir),
                     "--batch-size", "2", *CPU])
    assert code == 1  # the others are encoded; the skipped one is counted in the exit status
    assert any("b.png: it loaded as 64x64, not the size its header gave" in r.getMessage() for r in caplog.records)
    with safe_open(str(tmp_path / "x.latent"), framework="pt") as f:
        assert json.loads(f.metadata()["klvae.images"]) == ["a.png", "c.png"]
    samples = comfy_load_latent(tmp_path / "x.latent")["samples"]
    mode = inference.encode(cli_model(sd_dir), torch.stack([pil_to_tensor(load_image(p)) for p in imgs[::2]])).mode()
    torch.testing.assert_close(samples, mode, rtol=1e-5, atol=1e-6)


def test_flux2_encode_writes_comfyuis_patched_batchnormed_latents(tmp_path: Path, flux2_dir: Path) -> None:
    img = png(tmp_path / "a.png", 32, 48, 4)
    assert main(["encode", str(img), "-o", str(tmp_path / "x.latent"), "--model", str(flux2_dir), *CPU]) == 0
    samples = comfy_load_latent(tmp_path / "x.latent")["samples"]
    assert samples.shape == (1, 128, 2, 3)
    vae = cli_model(flux2_dir)
    mean = inference.encode(vae, pil_to_tensor(load_image(img))[None]).mode()
    running_mean, running_var = _flux2_stats()
    want = comfy_flux2_bn(mean.double(), running_mean, running_var).float()
    torch.testing.assert_close(samples, want, rtol=1e-5, atol=1e-5)
    # ComfyUI's FLUX.2 LATENT is klvae's diffusion latent (Flux2.process_in is the identity).
    torch.testing.assert_close(samples, vae.scale_latents(mean), rtol=1e-5, atol=1e-5)


# ---- the library ----

def test_library_round_trip_crop_and_names(tmp_path: Path) -> None:
    norm = FLUX2_SMALL.replace(latents_mean=(0.5,) * 128, latents_std=(2.0,) * 128).latent_norm
    z = torch.randn(2, 32, 4, 6)
    c = to_comfy(z, norm)
    assert c.shape == (2, 128, 2, 3)
    torch.testing.assert_close(from_comfy(c, norm), z)
    sd = PRESETS["sdxl"].latent_norm  # no factors in ComfyUI's LATENT: process_in applies 0.13025 later
    torch.testing.assert_close(to_comfy(z[:, :4], sd), z[:, :4], rtol=0, atol=0)
    px = torch.rand(1, 37, 53, 3)
    top, left, h, w = comfy_crop(37, 53, 8)
    torch.testing.assert_close(px[:, top:top + h, left:left + w], comfy_crop_pixels(px, 8), rtol=0, atol=0)
    assert comfy_item_names("runs/my.batch.latent", 3) == ["my.batch_00.png", "my.batch_01.png", "my.batch_02.png"]
    assert comfy_item_names("x.latent", 101)[-1] == "x_100.png"
    save_comfy_latent(tmp_path / "sub" / "y.latent", z.double())
    torch.testing.assert_close(comfy_load_latent(tmp_path / "sub" / "y.latent")["samples"], z.float(), rtol=0, atol=0)
    assert not list((tmp_path / "sub").glob(".*.tmp"))


# ---- bad input: one line, exit status 2, nothing written ----

def _bad_files(d: Path) -> None:
    safetensors.torch.save_file({"samples": torch.zeros(1, 4, 4, 4)}, str(d / "nokey.latent"))
    comfy_save_latent(torch.zeros(4, 4, 4), d / "ndim.latent")
    comfy_save_latent(torch.zeros(1, 16, 4, 4), d / "channels.latent")
    nan = torch.zeros(2, 4, 4, 4)
    nan[1, 2, 3, 1] = float("nan")
    comfy_save_latent(nan, d / "nan.safetensors")  # judged by its content: a ComfyUI latent all the same
    comfy_save_latent(torch.full((1, 4, 4, 4), float("inf")), d / "inf.latent")
    (d / "garbage.latent").write_bytes(b"not safetensors at all")
    comfy_save_latent(torch.zeros(1, 4, 0, 4), d / "empty.latent")
    comfy_save_latent(torch.zeros(1, 4, 4, 4, dtype=torch.int32), d / "int.latent")


@pytest.mark.parametrize(("name", "message"), [
    ("nokey.latent", "no latent_tensor"),
    ("ndim.latent", "[batch, channels, height, width]"),
    ("channels.latent", "16 channels, but this model's ComfyUI latents have 4"),
    ("nan.safetensors", "NaN or infinite"),
    ("inf.latent", "NaN or infinite"),
    ("garbage.latent", "not a readable safetensors file"),
    ("empty.latent", "empty latent_tensor"),
    ("int.latent", "dtype int32"),
])
def test_bad_latent_file_is_one_line_and_exit_2(tmp_path: Path, sd_dir: Path, name: str, message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _bad_files(tmp_path)
    capsys.readouterr()
    assert main(["decode", str(tmp_path / name), "-o", str(tmp_path / "out"), "--model", str(sd_dir), *CPU]) == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_decode_refuses_to_replace_a_png_without_overwrite(tmp_path: Path, sd_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    comfy_save_latent(torch.zeros(2, 4, 4, 4), tmp_path / "x.latent")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x_01.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "x.latent"), "-o", str(tmp_path / "out"), "--model", str(sd_dir), *CPU]) == 2
    assert "x_01.png already exists" in _err_line(capsys)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_01.png"]
    assert (tmp_path / "out" / "x_01.png").read_bytes() == b"mine"
    assert main(["decode", str(tmp_path / "x.latent"), "-o", str(tmp_path / "out"), "--model", str(sd_dir), *CPU,
                 "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_00.png", "x_01.png"]


@pytest.mark.parametrize(("sizes", "message"), [
    ([(32, 48), (48, 32)], "one batch of one size"),
    ([(32, 48), (40, 48)], "32x48 and"),  # 40 is a whole number of cells: no crop makes it 32
    ([(5, 48)], "smaller than one latent cell"),
])
def test_encode_of_images_that_cannot_share_a_batch_is_refused(tmp_path: Path, sd_dir: Path, sizes: list,
                                                               message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    imgs = [png(tmp_path / f"{n}.png", h, w, n) for n, (h, w) in enumerate(sizes)]
    capsys.readouterr()
    assert main(["encode", *map(str, imgs), "-o", str(tmp_path / "x.latent"), "--model", str(sd_dir), *CPU]) == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "x.latent").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_encode_output_must_be_safetensors_or_latent(tmp_path: Path, sd_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    img = png(tmp_path / "a.png", 32, 32)
    capsys.readouterr()
    assert main(["encode", str(img), "-o", str(tmp_path / "x.pt"), "--model", str(sd_dir)]) == 2
    assert ".latent (ComfyUI's)" in _err_line(capsys)
