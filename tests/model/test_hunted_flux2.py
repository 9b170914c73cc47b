"""Hunted: FLUX.2's latent BatchNorm statistics and 2x2 patches where they meet the rest of klvae: a cache rerun
with the same weights in BFL's single file, and plain tensor files whose shape tells which latent they hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_same_weights, noise_folder, one_error_line
from klvae import AutoencoderKL
from klvae.cli.main import main
from klvae.latents import build_cache
from klvae.weights import export_ldm
from oracles import PATCHED, SMALL, klvae_flux2


def _headerless_bfl_file(vae: AutoencoderKL, path: Path) -> Path:
    """The model in BFL's layout without klvae's config in the header, as BFL ships ae.safetensors (or as a tool
    that rewrites the file leaves it): its statistics live in the float32 bn.* buffers alone."""
    export_ldm(vae, path)
    save_file(load_file(str(path)), str(path))
    return path


def test_a_scaled_cache_reruns_with_the_same_flux2_weights_in_bfls_single_file(tmp_path: Path) -> None:
    """A scaled FLUX.2 cache begun with a klvae folder is refused ('latents scaled with another model's factors')
    when rerun with the very same weights as a BFL ae.safetensors: statistics equal to float32 rounding differ."""
    folder = klvae_flux2().save_pretrained(tmp_path / "flux2")
    a = AutoencoderKL.from_pretrained(folder)
    b = AutoencoderKL.from_pretrained(_headerless_bfl_file(a, tmp_path / "ae.safetensors"))
    assert_same_weights(a, b)
    assert a.config.latents_std is not None and b.config.latents_std is not None
    worst = max(abs(x - y) / y for x, y in zip(a.config.latents_std, b.config.latents_std, strict=True))
    assert worst < 1e-6  # float32 rounding of the same figures, which `klvae decode` takes for one model's
    opts = {"resolution": 16, "store": "scaled", "num_workers": 0, "batch_size": 1}
    data = noise_folder(tmp_path / "data", 1, hw=(16, 16))
    build_cache(a, data, tmp_path / "out", **opts)
    noise_folder(data, 2, hw=(16, 16))  # one image more, for the rerun to encode
    assert build_cache(b, data, tmp_path / "out", **opts).encoded == 1


@pytest.mark.parametrize(("channels", "unscaled"), [(SMALL.latent_channels, False), (PATCHED, True)])
def test_a_plain_flux2_file_read_the_wrong_way_names_unscaled(
    channels: int, unscaled: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`klvae decode z.safetensors` of diffusers' vae.encode latents [1, 32, h, w] with a FLUX.2 model says
    "latents of another VAE?" (and --unscaled on its [1, 128, h, w] ones "128-channel latents do not fit this
    model, whose files hold 128-channel latents"), though the shape alone shows that --unscaled is what is wrong."""
    model = klvae_flux2().save_pretrained(tmp_path / "flux2")
    side = 4 if channels == PATCHED else 8
    save_file({"latents": torch.randn(1, channels, side, side)}, str(tmp_path / "z.safetensors"))
    argv = ["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "out"), "--model", str(model)]
    assert main(argv + (["--unscaled"] if unscaled else [])) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "--unscaled" in err, err
