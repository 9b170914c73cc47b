"""The encoder's own fingerprint: `klvae decode` of latents through a decoder-only fine-tune of the encoding model
(sd-vae-ft-mse style), or through a copy of it in another folder or dtype, says nothing, while another encoder, or a
file written before the field, still warns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import klvae
from klvae.cli.main import main
from klvae.latents.fingerprint import encoder_fingerprint, model_fingerprint


def _models(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL("tiny")
    paths = {"orig": tmp_path / "orig", "ft": tmp_path / "ft", "enc": tmp_path / "enc"}
    vae.save_pretrained(paths["orig"])
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(0.01)  # a decoder-only fine-tune: the same latents
        vae.save_pretrained(paths["ft"])
        vae.encoder.conv_in.weight.add_(0.01)  # another encoder: other latents
        vae.save_pretrained(paths["enc"])
    return paths


def _encoded(tmp_path: Path, model: Path, colour: tuple[int, int, int]) -> Path:
    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16), colour).save(img)
    z = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(img), "-o", str(z), "--model", str(model), "--device", "cpu"]) == 0
    return z


def _decode_err(z: Path, out: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["decode", str(z), "-o", str(out), "--model", str(model), "--device", "cpu"]) == 0
    return capsys.readouterr().err


def test_fingerprints_follow_the_encoder_and_the_whole_model(tmp_path: Path) -> None:
    m = {k: klvae.AutoencoderKL.from_pretrained(p) for k, p in _models(tmp_path).items()}
    assert encoder_fingerprint(m["orig"]) == encoder_fingerprint(m["ft"]) != encoder_fingerprint(m["enc"])
    assert model_fingerprint(m["orig"]) != model_fingerprint(m["ft"])
    # The scaling factor changes the scaled latents, not the encoder.
    other_scale = klvae.AutoencoderKL(m["orig"].config.replace(scaling_factor=0.5))
    other_scale.load_state_dict(m["orig"].state_dict())
    assert encoder_fingerprint(other_scale) == encoder_fingerprint(m["orig"])


def test_decode_through_a_decoder_fine_tune_is_quiet_and_another_encoder_warns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _models(tmp_path)
    z = _encoded(tmp_path, paths["orig"], (200, 30, 30))
    with safe_open(str(z), "pt") as f:
        assert f.metadata()["encoder_fingerprint"] == encoder_fingerprint(
            klvae.AutoencoderKL.from_pretrained(paths["orig"]))
    assert "another model" not in _decode_err(z, tmp_path / "ft-out", paths["ft"], capsys)
    err = _decode_err(z, tmp_path / "enc-out", paths["enc"], capsys)
    assert f"encoded by another model ({paths['orig']}) than {paths['enc']}, whose encoder differs" in err


def test_decode_warns_when_the_latents_came_from_another_model(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Same channels and factors, other weights: decoded without a word before; now a warning names both."""
    import klvae

    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    mine, other = tmp_path / "mine", tmp_path / "other"
    for seed, folder in ((0, mine), (1, other)):
        torch.manual_seed(seed)
        klvae.AutoencoderKL("tiny").save_pretrained(folder)
    z = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(img), "-o", str(z), "--model", str(mine), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["decode", str(z), "-o", str(tmp_path / "same"), "--model", str(mine), "--device", "cpu"]) == 0
    assert "another model" not in capsys.readouterr().err
    assert main(["decode", str(z), "-o", str(tmp_path / "else"), "--model", str(other), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: these latents were encoded by another model ({mine}) than {other}, whose encoder differs" in err
    # A copy of the model in another folder (or another dtype on disk) is the same model.
    assert main(["convert", "-m", str(mine), "-o", str(tmp_path / "copy"), "--dtype", "bf16"]) == 0
    capsys.readouterr()
    assert main(["decode", str(z), "-o", str(tmp_path / "copy-out"), "--model", str(tmp_path / "copy"),
                 "--device", "cpu"]) == 0
    assert "another model" not in capsys.readouterr().err


def test_a_file_without_the_encoder_s_hash_falls_back_to_the_whole_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _models(tmp_path)
    z = _encoded(tmp_path, paths["orig"], (20, 130, 30))
    with safe_open(str(z), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "encoder_fingerprint"}
    save_file(load_file(z), z, meta)  # as klvae wrote it before the field
    assert "another model" not in _decode_err(z, tmp_path / "same", paths["orig"], capsys)
    assert "whose encoder differs" in _decode_err(z, tmp_path / "ft-out", paths["ft"], capsys)
