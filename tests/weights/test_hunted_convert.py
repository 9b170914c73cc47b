"""Pins bugs a hunt of `klvae convert`, ComfyUI .latent files and `klvae noise` found:

- `klvae decode x.safetensors` where x.safetensors is a FIFO hangs for good in is_comfy_latent's safe_open, which
  holds the GIL and retries the interrupted open: neither Ctrl-C nor SIGTERM stops it (only SIGKILL).
- `klvae decode x.latent` where x.latent is a folder (or a FIFO) says "no such latents file", though it is there.
- `klvae noise --zero-terminal-snr` on a schedule whose alpha-bar underflows to 0 (linear at --num-steps 100000, or
  betas 0.1..0.9) ends in "internal error: ValueError: betas must be ... in (0, 1)", after the model has run.
- `klvae convert` of a model that diffusers' config cannot express (linear attention, another norm_eps) to a folder
  tells the user to "use export_ldm instead", a library function, not the command's `-o x.safetensors`/`--to ldm`.
- `klvae convert -o link.safetensors` replaces a dangling symlink without --overwrite (encode and noise refuse it).
- `klvae info`'s stored dtype of a DDP-wrapped full checkpoint (module.first_stage_model.*) counts the UNet too, so
  an fp32 VAE beside an fp16 UNet is reported as fp16.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import one_error_line, perturbed_vae, rgb_image, saved_tiny_model
from klvae.cli.main import main
from klvae.weights import diffusers_to_ldm, export_ldm


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset saved as a diffusers folder."""
    return saved_tiny_model(tmp_path_factory.mktemp("model") / "m")


# ---- ComfyUI .latent detection and reading ----


def test_decode_of_a_fifo_never_blocks_on_it(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """is_comfy_latent opens any path with safe_open; on a FIFO that open waits for a writer for good, holding the
    GIL (a watchdog thread in this process cannot run) and deaf to SIGTERM. A writer in another process unblocks
    it here, and leaves a mark each time it had to."""
    import os

    fifo = tmp_path / "latents.safetensors"
    os.mkfifo(fifo)
    hits = tmp_path / "hits"
    writer = subprocess.Popen(["sh", "-c", f"sleep 1; while :; do : > '{fifo}'; echo hit >> '{hits}'; done"])
    try:
        code = main(["-q", "decode", str(fifo), "-o", str(tmp_path / "out"), "--model", str(model),
                     "--device", "cpu"])
    finally:
        writer.kill()
        writer.wait()
    assert not hits.exists(), "decode opened the FIFO and blocked until a writer came"
    assert code == 2
    assert "not a regular file" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_decode_of_a_latent_name_that_is_no_file_says_what_it_is(model: Path, tmp_path: Path, kind: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import os

    path = tmp_path / "x.latent"
    if kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)
    assert main(["-q", "decode", str(path), "-o", str(tmp_path / "out"), "--model", str(model)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no such" not in line, line  # it is there: a folder, or a FIFO
    assert ("folder" if kind == "folder" else "not a regular file") in line, line


# ---- klvae noise ----


@pytest.mark.parametrize("extra", [
    ["--schedule", "linear", "--num-steps", "100000", "--steps", "0", "99999"],
    ["--schedule", "linear", "--beta-start", "0.1", "--beta-end", "0.9", "--steps", "0", "999"],
])
def test_noise_zero_terminal_snr_whose_alpha_bar_underflows_is_no_internal_error(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    """Every option is in range (--num-steps up to 100000, betas strictly between 0 and 1), but alpha-bar reaches 0
    in float64 and the rescale divides 0 by 0: the NaN betas then fail NoiseSchedule's own check."""
    img = rgb_image(tmp_path / "a.png")
    out = tmp_path / "sheet.png"
    code = main(["-q", "noise", str(img), "-o", str(out), "--model", str(model), "--device", "cpu",
                 "--zero-terminal-snr", *extra])
    err = capsys.readouterr().err
    assert "internal error" not in err, err
    if code == 2:  # refused: one line, nothing written
        one_error_line(err)
        assert not out.exists()
    else:  # or shown: alpha-bar 0 is pure noise, which is what zero terminal SNR asks for
        assert code == 0 and out.is_file()


# ---- klvae convert ----


@pytest.mark.parametrize("changes", [{"attention": "linear"}, {"norm_eps": 1e-5}])
def test_convert_to_a_folder_says_how_to_write_what_diffusers_cannot_express(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, object]
) -> None:
    src = export_ldm(perturbed_vae("tiny", **changes), tmp_path / "vae.safetensors")  # klvae reads it back whole
    capsys.readouterr()
    assert main(["-q", "convert", "-m", str(src), "-o", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot be expressed" in line
    assert "export_ldm" not in line, line  # a library function: the command has no such option
    assert "--to ldm" in line or ".safetensors" in line, line
    assert not (tmp_path / "out").exists()


def test_convert_does_not_replace_a_dangling_link_without_overwrite(model: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """check_new_file (encode, noise, reconstruct) counts a link that leads nowhere as an output already there;
    check_model_output asks is_file(), which is False for it, and the rename then replaces the link."""
    link = tmp_path / "vae.safetensors"
    link.symlink_to(tmp_path / "elsewhere" / "vae.safetensors")
    capsys.readouterr()
    assert main(["-q", "convert", "-m", str(model), "-o", str(link)]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err)
    assert link.is_symlink()


# ---- stored dtype ----


def test_stored_dtype_of_a_wrapped_full_checkpoint_counts_the_vae_alone(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Loading strips module. and then first_stage_model. (convert.strip_prefix), so it reads the fp32 VAE alone;
    stored_values looks for first_stage_model. only at the start of each key, finds none, and counts every tensor."""
    from klvae.weights.stored_dtype import main_dtype, stored_values

    vae = perturbed_vae("tiny")
    full = {f"module.first_stage_model.{k}": v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    full["module.model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2000, 1000, dtype=torch.float16)
    path = tmp_path / "sd-full.safetensors"
    save_file(full, str(path))
    assert set(stored_values(path)) == {"fp32"}
    assert main_dtype(path) == "fp32"
    capsys.readouterr()
    assert main(["info", "-m", str(path), "--config", "tiny"]) == 0
    assert "stored dtype: fp32" in capsys.readouterr().out
