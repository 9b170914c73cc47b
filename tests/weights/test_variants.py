"""diffusers' `variant=` ("fp16": diffusion_pytorch_model.fp16.safetensors beside the full-precision file), in
folders, pipeline folders and the hub cache, through klvae's from_pretrained and the diffusers-compatible wrapper."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_same_weights, fake_hub_cache, one_line, perturbed_vae
from klvae import AutoencoderKL, WeightsError
from klvae.compat import DiffusersVAE


def _with_variant(folder: Path, model: AutoencoderKL, variant: str, tmp: Path) -> Path:
    """`folder` with `model`'s weights added as its `variant` file, the name diffusers gives it."""
    saved = model.save_pretrained(tmp / f"as-{variant}")
    name = f"diffusion_pytorch_model.{variant}.safetensors"
    shutil.copy(saved / "diffusion_pytorch_model.safetensors", folder / name)
    return folder


def test_a_folders_variant_is_the_file_read(tmp_path: Path) -> None:
    """from_pretrained(folder, variant="fp16") reads the fp16 file, as diffusers does; without it, the full one."""
    main, other = perturbed_vae(), perturbed_vae(seed=1).half()
    folder = _with_variant(main.save_pretrained(tmp_path / "vae"), other, "fp16", tmp_path)
    assert_same_weights(AutoencoderKL.from_pretrained(folder), main)
    got = AutoencoderKL.from_pretrained(folder, variant="fp16")
    assert_same_weights(got, other)
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.AutoencoderKL.from_pretrained(folder, variant="fp16").state_dict()
    assert all(torch.equal(theirs[k].float(), v.float()) for k, v in got.state_dict().items())
    wrapped = DiffusersVAE.from_pretrained(tmp_path, subfolder="vae", variant="fp16", torch_dtype=torch.float32)
    assert_same_weights(wrapped.klvae_model, other.float())


def test_a_pipeline_folders_variant(tmp_path: Path) -> None:
    """A pipeline folder given with a variant reads its vae/ variant file."""
    other = perturbed_vae(seed=2)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    _with_variant(perturbed_vae().save_pretrained(tmp_path / "pipe" / "vae"), other, "ema", tmp_path)
    assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "pipe", variant="ema"), other)


def test_a_missing_variant_is_one_line_naming_those_there(tmp_path: Path) -> None:
    """A variant the folder lacks is refused (not the full file read instead), naming the variants it has."""
    folder = _with_variant(perturbed_vae().save_pretrained(tmp_path / "vae"), perturbed_vae(), "fp16", tmp_path)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(folder, variant="bf16")
    msg = one_line(e)
    assert "diffusion_pytorch_model.bf16.safetensors" in msg and "diffusion_pytorch_model.fp16.safetensors" in msg


@pytest.mark.parametrize("bad", ["../x", "", "fp16.safetensors", "a b", "fp16\n"])
def test_a_bad_variant_name_is_refused(bad: str, tmp_path: Path) -> None:
    """A variant that is no plain name (a path, an empty string) is refused before anything is read."""
    folder = perturbed_vae().save_pretrained(tmp_path / "vae")
    with pytest.raises(WeightsError, match="is not a variant name"):
        AutoencoderKL.from_pretrained(folder, variant=bad)


def test_a_variant_of_a_single_file_or_preset_is_refused(tmp_path: Path) -> None:
    """A variant names a file in a diffusers folder: with one weights file, a preset or the demo model it is said."""
    folder = perturbed_vae().save_pretrained(tmp_path / "vae")
    cases = [(folder / "diffusion_pytorch_model.safetensors", "is one weights file"),
             ("sdxl", "is a preset"), ("demo", "built-in model")]
    for name, words in cases:
        with pytest.raises(WeightsError, match=words):
            AutoencoderKL.from_pretrained(name, variant="fp16")


def test_a_hub_repos_variant_from_the_cache(offline_cache: Path) -> None:
    """A hub repo's variant file is fetched (here from the offline cache); one it lacks is named in the error."""
    other = perturbed_vae(seed=3)
    folder = fake_hub_cache(offline_cache, "org/variants", perturbed_vae(), "vae")
    _with_variant(folder, other, "fp16", offline_cache.parent)
    assert_same_weights(AutoencoderKL.from_pretrained("org/variants", subfolder="vae", variant="fp16"), other)
    with pytest.raises(WeightsError, match=r"org/variants/vae/diffusion_pytorch_model\.bf16\.safetensors"):
        AutoencoderKL.from_pretrained("org/variants", subfolder="vae", variant="bf16")
