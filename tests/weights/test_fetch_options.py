"""diffusers' from_pretrained keywords `use_safetensors` (safetensors only, .bin only, or either) and
`local_files_only` (the hub cache, never the network), through klvae's from_pretrained and the wrapper."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_same_weights, fake_hub_cache, one_line, perturbed_vae
from klvae import AutoencoderKL, WeightsError
from klvae.compat import DiffusersVAE


def _both_formats(tmp: Path) -> tuple[Path, AutoencoderKL, AutoencoderKL]:
    """A folder with a .safetensors file and a .bin file holding different weights (safe, pickled)."""
    safe, pickled = perturbed_vae(), perturbed_vae(seed=1)
    folder = safe.save_pretrained(tmp / "vae")
    shutil.copy(pickled.save_pretrained(tmp / "bin", safe_serialization=False) / "diffusion_pytorch_model.bin",
                folder / "diffusion_pytorch_model.bin")
    return folder, safe, pickled


def test_use_safetensors_picks_the_file_diffusers_picks(tmp_path: Path) -> None:
    """use_safetensors=False reads the .bin beside the safetensors file, True or None the safetensors file."""
    folder, safe, pickled = _both_formats(tmp_path)
    assert_same_weights(AutoencoderKL.from_pretrained(folder), safe)
    assert_same_weights(AutoencoderKL.from_pretrained(folder, use_safetensors=True), safe)
    got = AutoencoderKL.from_pretrained(folder, use_safetensors=False)
    assert_same_weights(got, pickled)
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.AutoencoderKL.from_pretrained(folder, use_safetensors=False).state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in got.state_dict().items())


def test_use_safetensors_true_refuses_a_pickle(tmp_path: Path) -> None:
    """use_safetensors=True never unpickles: a .bin-only folder or a .ckpt file is refused in one line."""
    folder = perturbed_vae().save_pretrained(tmp_path / "vae", safe_serialization=False)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    assert "diffusion_pytorch_model.safetensors" in one_line(e) and "use_safetensors=True" in one_line(e)
    ckpt = tmp_path / "vae.ckpt"
    shutil.copy(folder / "diffusion_pytorch_model.bin", ckpt)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(ckpt, config="tiny", use_safetensors=True)
    assert "not a safetensors file" in one_line(e)


def test_use_safetensors_reads_a_files_content(tmp_path: Path) -> None:
    """A .ckpt that holds safetensors passes use_safetensors=True; a .safetensors file is refused by False."""
    model = perturbed_vae()
    folder = model.save_pretrained(tmp_path / "vae")
    ckpt = tmp_path / "vae.ckpt"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", ckpt)
    assert_same_weights(AutoencoderKL.from_pretrained(ckpt, config="tiny", use_safetensors=True), model)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(folder / "diffusion_pytorch_model.safetensors", use_safetensors=False)
    assert "is a safetensors file" in one_line(e)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(folder, use_safetensors=False)
    assert "diffusion_pytorch_model.bin" in one_line(e)


def test_local_files_only_reads_the_cache_and_never_asks(online: None, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """local_files_only=True loads a cached repo with every download asked cache-only, as diffusers does."""
    model = perturbed_vae()
    fake_hub_cache(tmp_path / "cache", "org/vae", model, None)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub

    real, asked = huggingface_hub.hf_hub_download, []

    def spy(*args: object, **kwargs: object) -> str:
        asked.append(kwargs["local_files_only"])
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    wrapped = DiffusersVAE.from_pretrained("org/vae", torch_dtype=torch.float32, use_safetensors=True,
                                           local_files_only=True)
    assert_same_weights(wrapped.klvae_model, model)
    assert asked and all(asked)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained("org/other", local_files_only=True)
    assert "local_files_only is set" in one_line(e) and "org/other" in one_line(e)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_single_file("org/other/ae.safetensors", local_files_only=True)
    assert "local_files_only is set" in one_line(e)


def test_use_safetensors_false_on_a_safetensors_hub_file_asks_nothing(online: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub file that use_safetensors rules out is refused by its name before any download."""
    import huggingface_hub

    def never(*args: object, **kwargs: object) -> str:
        raise AssertionError("downloaded")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained("org/repo/ae.safetensors", use_safetensors=False)
    assert "use_safetensors=False" in one_line(e)
