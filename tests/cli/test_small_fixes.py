"""Small fixes found while reviewing the helpers' reports: one-line argparse errors, 32-bit images, and the
metric-range warning kept out of klvae's own [-1, 1] callers."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klvae.cli.main import main
from klvae.errors import ImageError
from klvae.evaluation import metrics
from klvae.evaluation.evaluate import _per_image
from klvae.images import load_image
from klvae.training.validate import validate


@pytest.mark.parametrize("argv", [["encode", "x.png", "-o", "y.safetensors", "--tile-size", "abc"], ["bogus"],
                                  ["encode"]])
def test_argument_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "--help" in err, err


def test_32_bit_integer_image_is_refused_by_name(tmp_path: Path) -> None:
    p = tmp_path / "deep.tif"
    Image.fromarray(np.full((8, 8), 1_000_000, np.int32), "I").save(p)
    with pytest.raises(ImageError, match=r"deep\.tif: 32-bit integer image"):
        load_image(p)


def test_16_bit_values_in_mode_i_still_scale(tmp_path: Path) -> None:
    p = tmp_path / "sixteen.tif"
    Image.fromarray(np.full((8, 8), 32768, np.int32), "I").save(p)
    assert np.asarray(load_image(p))[0, 0, 0] == 128


@pytest.fixture
def fresh_range_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_range_warned", set())


def _bright_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 0.5 + 0.5  # a light picture: no pixel below mid-grey
    return x, (x + 0.01).clamp(-1, 1)


def test_eval_scores_bright_images_without_a_range_warning(
    fresh_range_warning: None, caplog: pytest.LogCaptureFixture
) -> None:
    class NoNets:
        lpips = None

    x, r = _bright_pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = _per_image(NoNets(), x, r)  # type: ignore[arg-type]
    assert out["ssim"].shape == (2,)
    assert not [m for m in caplog.messages if "data_range" in m]


def test_validation_scores_bright_images_without_a_range_warning(
    fresh_range_warning: None, caplog: pytest.LogCaptureFixture
) -> None:
    class Brightening(torch.nn.Module):
        """A stand-in model whose reconstructions stay as bright as the inputs (a random one's would not)."""

        def forward(self, x: torch.Tensor, sample_posterior: bool = False) -> tuple[torch.Tensor]:
            return ((x + 0.01).clamp(-1, 1),)

    x, _ = _bright_pair()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        out = validate(Brightening(), [x], torch.device("cpu"), None, lpips_files=None)  # type: ignore[arg-type]
    assert "ssim" in out and np.isfinite(out["psnr"])
    assert not [m for m in caplog.messages if "data_range" in m]


def test_from_single_file_loads_an_ldm_file_as_diffusers_users_call_it(tmp_path: Path) -> None:
    from klvae import AutoencoderKL
    from klvae.compat import DiffusersVAE
    from klvae.weights.save import export_ldm

    vae = AutoencoderKL("tiny")
    path = export_ldm(vae, tmp_path / "vae.safetensors")
    for loaded in (AutoencoderKL.from_single_file(path), DiffusersVAE.from_single_file(str(path))._klvae):
        assert loaded.config == vae.config
        for (k, a), b in zip(vae.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="is a folder"):
        AutoencoderKL.from_single_file(tmp_path)


def test_stored_dtype_of_a_torch_file_named_safetensors(tmp_path: Path) -> None:
    from klvae import AutoencoderKL
    from klvae.weights.stored_dtype import stored_values

    vae = AutoencoderKL("tiny")
    path = tmp_path / "vae.safetensors"  # a torch.save file under the wrong name, which loading reads by content
    torch.save({k: v.half() for k, v in vae.state_dict().items()}, path)
    loaded = AutoencoderKL.from_pretrained(path, config="tiny")
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight.half().float())
    assert set(stored_values(path)) == {"fp16"}


def test_decode_leaves_infinite_pixels_for_the_caller_to_see(tmp_path: Path) -> None:
    from klvae import AutoencoderKL, inference

    vae = AutoencoderKL("tiny").eval()
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] = float("inf")  # a broken model: its red channel overflows
        out = inference.decode(vae, torch.zeros(1, vae.config.latent_channels, 2, 2), torch.float32)
        assert torch.isinf(out[:, 0]).all()
        vae.decoder.conv_out.bias[0] = 100.0  # finite but out of range: clamped as before
        out = inference.decode(vae, torch.zeros(1, vae.config.latent_channels, 2, 2), torch.float32)
    assert out.max() == 1 and torch.isfinite(out).all()
