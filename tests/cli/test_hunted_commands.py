"""Pins bugs a hunt of `klvae noise | scale | info | eval` (and the library behind them) found:

- `klvae noise IMAGE -o .` (the working folder as the sheet's name) is an internal error (ValueError from
  pathlib's with_name while measuring the temporary name), not the one-line "is a folder" refusal.
- `klvae noise` checks the sheet's size against the output format before the work with an 18-pixel label strip,
  but narrow tiles wrap their labels onto two lines and the sheet comes out taller: a WebP (or JPEG) over its
  format's side limit is refused only after the model was loaded and every tile encoded and decoded.
- `klvae scale --save` on a GPU saves the weights as `optimize_for_inference` left them: cast to the compute dtype
  (bf16 under the default --dtype auto), so an fp32 model is written back bf16-rounded, silently.
- `klvae noise --zero-terminal-snr` with a first beta too small for float64 (refused without the option as "the
  first beta, 1e-17, is too small ...") is refused with the library's message for a malformed betas tensor ("every
  value in (0, 1); ... use NoiseSchedule.from_name('scaled_linear')"): untrue of the betas given, and a Python call
  offered to a CLI user.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import one_error_line, perturbed_vae, rgb_image
from klvae.cli import common
from klvae.cli.main import main
from klvae.errors import KlvaeError


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A perturbed tiny preset (factor 2) saved as a diffusers folder, fp32."""
    d = tmp_path_factory.mktemp("tiny")
    perturbed_vae("tiny").save_pretrained(d)
    return d


def test_noise_to_the_working_folder_is_a_one_line_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Now: "klvae: internal error: ValueError: PosixPath('.') has an empty name", exit status 1.
    rgb_image(tmp_path / "a.png", 24, 16)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "noise", "a.png", "-o", ".", "--steps", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "folder" in line


def test_noise_refuses_a_sheet_too_tall_for_webp_before_loading_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Now: the 16-px-wide tiles wrap their labels onto two lines, the sheet is 16x16396, and WebP's 16383-pixel
    # limit is found only after the model was loaded and the image encoded and decoded (here: the stand-in
    # load_model below is called, and its error is what the user sees).
    src = tmp_path / "tall.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16365, 16, 3), dtype=np.uint8)).save(src)
    loaded = []

    def no_model(*args: object, **kwargs: object) -> None:
        loaded.append(True)
        raise KlvaeError("the model was loaded")

    monkeypatch.setattr("klvae.cli.noise.load_model", no_model)
    assert main(["-q", "noise", str(src), "-o", str(tmp_path / "sheet.webp"), "--steps", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert not loaded, line
    assert "16383" in line


def test_scale_save_on_a_gpu_keeps_the_weights_as_read(tmp_path: Path, tiny_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Now: on a GPU (simulated here: optimize_for_inference casting the weights to the compute dtype, as it does on
    # CUDA), the saved model's weights are the bf16-rounded copies: stored dtype bf16, off by up to ~4e-3.
    real = common.optimize_for_inference

    def as_on_cuda(vae: klvae.AutoencoderKL, dtype: torch.dtype, opts: object = None) -> klvae.AutoencoderKL:
        opts = opts if opts is not None else common.SpeedOptions()
        if opts.cast_weights is None:  # None: the device's choice, which is to cast on CUDA
            opts = dataclasses.replace(opts, cast_weights=True)
        return real(vae, dtype, opts)

    monkeypatch.setattr(common, "optimize_for_inference", as_on_cuda)
    data = tmp_path / "data"
    for i in range(2):
        rgb_image(data / f"img{i}.png", 24, 20, seed=i)
    saved = tmp_path / "rescaled"
    assert main(["-q", "scale", "--data", str(data), "--model", str(tiny_model), "--resolution", "16",
                 "--dtype", "bf16", "--save", str(saved)]) == 0
    before = klvae.AutoencoderKL.from_pretrained(tiny_model).state_dict()
    after = klvae.AutoencoderKL.from_pretrained(saved).state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not changed, changed[:3]


def test_noise_zero_terminal_snr_with_a_first_beta_too_small_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Now: without --zero-terminal-snr "the first beta, 1e-17, is too small to change 1 - beta in float64 ...", with
    # it "betas must be a non-empty 1-D tensor with every value in (0, 1); for a named schedule use
    # NoiseSchedule.from_name('scaled_linear') or NoiseSchedule.sd()": untrue of the betas given, and a Python call.
    src = rgb_image(tmp_path / "a.png", 24, 16)
    argv = ["-q", "noise", str(src), "-o", str(tmp_path / "s.png"), "--steps", "0", "--beta-start", "1e-17"]
    assert main(argv) == 2
    assert "1e-17" in one_error_line(capsys.readouterr().err)
    assert main([*argv, "--zero-terminal-snr"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "from_name" not in line and "1e-17" in line, line
