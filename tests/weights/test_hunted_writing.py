"""Pins bugs a hunt of writing weights (save_pretrained, export_ldm, `klvae convert`, `scale --save`) found:

- `klvae convert -o DIR` names a half-precision variant already in DIR (diffusion_pytorch_model.fp16.safetensors)
  as a file that --overwrite replaces, but with --overwrite it is left as it was: diffusers' from_pretrained(DIR,
  variant="fp16"), as SDXL pipelines are usually loaded, then reads the old model's weights beside the new config.
- `klvae scale --save DIR` of a model that diffusers' config cannot express (linear attention, another norm_eps)
  encodes every image first and only then fails to save; the FLUX.2 refusal of the same command comes before it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import noise_folder, one_error_line, perturbed_vae
from klvae.cli.main import main
from klvae.weights import export_ldm

VARIANT = "diffusion_pytorch_model.fp16.safetensors"


def test_convert_overwrite_replaces_the_fp16_variant_it_names(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Now: the variant it refused to replace without --overwrite survives --overwrite, and holds the OLD weights.
    old, new = perturbed_vae("tiny", seed=1), perturbed_vae("tiny", seed=2)
    out = old.save_pretrained(tmp_path / "out")
    # A variant folder (as diffusers' save_pretrained(variant="fp16") and hub downloads with variant= leave it).
    os.replace(out / "diffusion_pytorch_model.safetensors", out / VARIANT)
    (out / "config.json").unlink()
    src = new.save_pretrained(tmp_path / "src")
    capsys.readouterr()
    assert main(["-q", "convert", "-m", str(src), "-o", str(out), "--dtype", "fp16"]) == 2
    assert VARIANT in one_error_line(capsys.readouterr().err)  # named as what --overwrite would replace
    assert main(["-q", "convert", "-m", str(src), "-o", str(out), "--dtype", "fp16", "--overwrite"]) == 0
    if (out / VARIANT).exists():  # replaced, or removed: never the superseded model beside the new config
        stored = load_file(str(out / VARIANT))
        want = new.state_dict()
        stale = [k for k in want if not torch.equal(stored[k].float(), want[k].half().float())]
        assert not stale, f"{VARIANT} still holds the replaced model's weights ({stale[:2]} ...)"


@pytest.mark.parametrize("changes", [{"attention": "linear"}, {"norm_eps": 1e-5}])
def test_scale_save_refuses_what_a_diffusers_folder_cannot_hold_before_encoding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, changes: dict[str, object]
) -> None:
    # Now: every --data image is encoded (minutes for 256 SDXL crops), then "cannot be expressed in a diffusers config".
    import klvae.latents.scale as scale

    model = export_ldm(perturbed_vae("tiny", **changes), tmp_path / "vae.safetensors")  # reloads whole (header)
    data = noise_folder(tmp_path / "data", 2, (32, 32))
    calls = []
    real = scale.estimate_factors
    monkeypatch.setattr(scale, "estimate_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    code = main(["-q", "scale", "--data", str(data), "--model", str(model), "--save", str(tmp_path / "out"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot be expressed" in one_error_line(err)
    assert not calls, "the images were encoded before the refusal"
    assert not (tmp_path / "out").exists()
