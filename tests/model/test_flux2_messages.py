"""What FLUX.2's warnings and errors say, through the CLI and the Python API as the README describes them: the small
decoder preset given as --model, decode's factor-mismatch warning (one readable line, none for float32 rounding),
scale_latents' shape error, a latents file of the other family, a missing or wrong patch size (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import one_error_line, perturbed_vae
from klvae import AutoencoderKL
from klvae.cli.main import main
from klvae.weights import export_ldm
from oracles import flux2_diffusers, klvae_flux2


def _png(path: Path, h: int = 64, w: int = 64) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("WARNING: ")]


# ---- 1. `--model flux2-small-decoder`: "has no released weights", though BFL released them ----

def test_flux2_small_decoder_preset_as_model_is_not_said_to_have_no_released_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: "BFL's distilled small decoder (`full_encoder_small_decoder.safetensors` of
    `black-forest-labs/FLUX.2-small-decoder`, preset `flux2-small-decoder` ...)". `--model flux2-small-decoder`
    answers "preset 'flux2-small-decoder' has no released weights", which is false: it should load that file
    (here from a faked hub cache), or at least name it as the `--model` to use."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.2-small-decoder"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    vae = klvae_flux2(decoder_block_out_channels=(32, 32, 32, 64))
    export_ldm(vae, repo / "snapshots" / commit / "full_encoder_small_decoder.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from klvae.model.config import PRESETS

    monkeypatch.setitem(PRESETS, "flux2-small-decoder", vae.config.replace(latents_mean=None, latents_std=None))
    assert main(["-q", "info", "--model", "flux2-small-decoder"]) == 0
    back = AutoencoderKL.from_pretrained("flux2-small-decoder")
    assert back.config.decoder_block_out_channels == (32, 32, 32, 64)
    # From the file's float32 BatchNorm buffers.
    torch.testing.assert_close(torch.tensor(back.config.latents_mean), torch.tensor(vae.config.latents_mean))
    (repo / "snapshots" / commit / "full_encoder_small_decoder.safetensors").unlink()
    assert main(["info", "--model", "flux2-small-decoder"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "black-forest-labs/FLUX.2-small-decoder/full_encoder_small_decoder.safetensors" in err, err


# ---- 2. decode's factor-mismatch warning: four 128-float lists on one line ----

def test_decode_factor_mismatch_warning_is_one_readable_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Latents encoded by one FLUX.2 model and decoded with another (other statistics) give a WARNING that prints
    latents_mean and latents_std of both in full: 4 x 128 floats, ~10 kB on one line (cli/codec.py:298). It should
    summarise (say which fields differ, and by how much)."""
    a, b = tmp_path / "a", tmp_path / "b"
    klvae_flux2(seed=0).save_pretrained(a)
    klvae_flux2(stats=False, seed=1).save_pretrained(b)
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(_png(tmp_path / "p.png")), "-o", str(out), "--model", str(a)]) == 0
    capsys.readouterr()
    assert main(["decode", str(out), "-o", str(tmp_path / "d"), "--model", str(b)]) == 0
    (warning,) = [w for w in _warnings(capsys.readouterr().err) if "latents were scaled" in w]
    assert len(warning) < 500, f"{len(warning)} characters"


# ---- 3. the same warning when the factors agree up to float32 rounding ----

def test_decode_with_statistics_equal_up_to_float32_rounding_warns_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model with measured (float64) statistics, exported as BFL's ae.safetensors and read back without klvae's
    header (as any other tool writes the file), holds the same statistics in bn.running_mean/var, float32: equal to
    1e-8. decode compares the factors as exact strings (cli/codec.py:297, `_factors(...) != _factors(...)`) and
    warns that the latents "were scaled with" other factors. Compare within float32 rounding instead."""
    folder = tmp_path / "vae"
    vae = klvae_flux2()  # statistics deliberately not float32-representable, like `scale --per-channel`'s
    vae.save_pretrained(folder)
    with_header = tmp_path / "klvae_ae.safetensors"
    export_ldm(vae, with_header)
    bfl = tmp_path / "ae.safetensors"
    save_file(load_file(with_header), bfl)  # the same tensors, no klvae header
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(_png(tmp_path / "p.png")), "-o", str(out), "--model", str(folder)]) == 0
    capsys.readouterr()
    assert main(["decode", str(out), "-o", str(tmp_path / "d"), "--model", str(bfl)]) == 0
    assert not [w for w in _warnings(capsys.readouterr().err) if "latents were scaled" in w]


# ---- 4. scale_latents' error names the patched shape, not the one passed ----

def test_scale_latents_error_names_the_shape_it_was_given() -> None:
    """Passing already-scaled [1, 128, 8, 8] latents to a FLUX.2 model's scale_latents (scaling twice) says
    "latents of shape (1, 512, 4, 4) do not have the 128 channels ...": a shape the user never made. The check in
    LatentNorm._affine (model/latent_norm.py:96) runs after patchify; check the channels before patching and name
    the input shape and the [B, 32, h, w] it takes."""
    vae = klvae_flux2()
    with pytest.raises(ValueError) as e:
        vae.scale_latents(torch.randn(1, 128, 8, 8))
    assert "(1, 128, 8, 8)" in str(e.value), str(e.value)


# ---- 5. a latents file of the other family: the error names shapes the user never saw ----

@pytest.mark.parametrize("which", ["flux2-file-sd-model", "sd-file-flux2-model"])
def test_wrong_family_latents_file_error_names_the_files_layout(
    which: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FLUX.2 latents file holds [128, h/2, w/2] items; decoded with an SD-style model the error reads
    "latents of shape (1, 32, 18, 26) do not fit this model, which takes [B, 4, h, w]" (the unpatched shape), and
    an SDXL file decoded with a FLUX.2 model reads "... which takes [B, 32, h, w]" after a ~5 kB warning, though the
    model's own latents files hold 128 channels in 2x2 patches. The error should speak of what the files hold:
    128-channel (patched, FLUX.2) latents vs 4-channel ones."""
    flux2, sd = tmp_path / "flux2", tmp_path / "sd"
    klvae_flux2().save_pretrained(flux2)
    perturbed_vae("tiny-f8").save_pretrained(sd)
    enc, dec = (flux2, sd) if which == "flux2-file-sd-model" else (sd, flux2)
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(_png(tmp_path / "p.png")), "-o", str(out), "--model", str(enc)]) == 0
    capsys.readouterr()
    assert main(["decode", str(out), "-o", str(tmp_path / "d"), "--model", str(dec)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "128" in err, err


# ---- 6. a CLI error whose advice is Python syntax ----

def _patch_size_1(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["patch_size"] = [1, 1]
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_patches_error_gives_the_cli_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A diffusers AutoencoderKLFlux2 folder whose config.json was edited to patch_size [1, 1]: the CLI's one-line
    error ends "load them with config='flux2'" (weights/latent_bn.py:60), a from_pretrained argument; on the
    command line it is `--config flux2`."""
    folder = tmp_path / "vae"
    flux2_diffusers().save_pretrained(folder)
    _patch_size_1(folder)
    assert main(["info", "--model", str(folder)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "--config flux2" in err, err


# ---- 7. the same edit of a folder klvae saved: the error is about keys the user cannot see ----

def test_wrong_patch_size_in_a_klvae_folder_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same edit of a folder klvae's save_pretrained wrote (or `klvae convert` / `scale --save`) says
    "config.json: latents_mean/latents_std have 128 entries for 32 latent channels": config.json has no such keys
    (they are klvae's private `_klvae_latents_mean`/`_klvae_latents_std`), and patch_size, the field that is wrong,
    goes unnamed. The error should name patch_size (as the diffusers folder's does: "no latent patches")."""
    folder = tmp_path / "vae"
    klvae_flux2().save_pretrained(folder)
    _patch_size_1(folder)
    assert main(["info", "--model", str(folder)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "patch" in err, err
