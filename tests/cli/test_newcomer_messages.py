"""Error messages that say what to do instead: an empty --set value (YAML null, and how to write an empty string),
convert to a pickle's name or a diffusers folder named like a file, encode of a folder or shard holding no image it
reads, decode to an output folder named like an image, and the logging options after a command's name as before
it."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import saved_tiny_model
from klvae.cli.main import main


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_an_empty_set_value_names_yaml_null_and_how_to_write_an_empty_string(
        capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["train", "--set", "data.train=photos", "--set", "data.val=", "--print-config"])
    assert "config field data.val must be str, got null" in err
    assert "--set 'data.val=\"\"'" in err
    assert main(["train", "--set", "data.train=photos", "--set", 'data.val=""', "--print-config"]) == 0


def test_convert_to_a_pickle_name_says_safetensors_or_a_folder(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("x.ckpt", "x.pt"):
        err = _error(capsys, ["convert", "-m", "demo", "-o", str(tmp_path / name)])
        assert "klvae writes weights as safetensors, not pickles" in err and "--to ldm" not in err
    err = _error(capsys, ["convert", "-m", "demo", "-o", str(tmp_path / "x.safetensors"), "--to", "diffusers"])
    assert "the diffusers layout is a folder; name a folder, or use --to ldm" in err
    assert not list(tmp_path.iterdir())


def test_encode_names_what_a_folder_or_a_shard_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gifs = tmp_path / "gifs"
    gifs.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16)).save(gifs / f"{i}.gif")
    (gifs / "notes.txt").write_text("x")
    out = tmp_path / "z.safetensors"
    err = _error(capsys, ["encode", str(gifs), "-o", str(out)])
    assert "no images found in" in err and "(it holds 2 .gif, 1 .txt files;" in err
    assert "name .gif and .ppm files on their own" in err
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as t:
        t.add(gifs / "0.gif", arcname="0.gif")
    err = _error(capsys, ["encode", str(shard), "-o", str(out)])
    assert "encode reads image files and folders, not .tar shards" in err and "klvae cache --data" in err
    assert not out.exists()


def test_decode_refuses_an_output_folder_named_like_an_image(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    z = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(img), "-o", str(z), "--device", "cpu"]) == 0
    err = _error(capsys, ["decode", str(z), "-o", str(tmp_path / "out.png"), "--device", "cpu"])
    assert "is a folder to create, but its name ends like a file's; name a folder" in err
    assert not (tmp_path / "out.png").exists()
    assert main(["-q", "decode", str(z), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "a.png").is_file()


@pytest.mark.parametrize("where", ["before", "after"])
def test_logging_options_work_before_or_after_the_command(where: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = saved_tiny_model(tmp_path / "model")
    Image.new("RGB", (16, 16), "teal").save(tmp_path / "a.png")
    run = ["reconstruct", str(tmp_path / "a.png"), "-o", str(tmp_path / "r.png"), "--model", str(model), "--overwrite"]

    def argv(flag: str) -> list[str]:
        return [flag, *run] if where == "before" else [*run, flag]

    assert main(argv("-v")) == 0
    assert "DEBUG: " in capsys.readouterr().err  # the --verbose level
    assert main(run) == 0
    assert "INFO: " in capsys.readouterr().err
    assert main(argv("-q")) == 0
    assert "INFO: " not in capsys.readouterr().err
    monkeypatch.setattr("klvae.cli.codec.cmd_reconstruct", lambda _args: 1 / 0)  # bound when main builds the parser
    assert main(run) == 1
    assert "internal error: ZeroDivisionError" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        main(argv("--debug"))


def test_mistakes_a_newcomer_makes_are_answered_with_what_to_do(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Each message found unclear by a newcomer's walk through the README, now saying what was meant."""
    import safetensors.torch
    import torch

    (tmp_path / "photos").mkdir()
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert _error(capsys, ["decode", str(tmp_path / "photos"), "-o", str(tmp_path / "d")]) == (
        f"klvae: error: {tmp_path / 'photos'} is a folder; a latents file is one .safetensors file, as `klvae "
        "encode` writes\n")
    assert _error(capsys, ["decode", str(tmp_path / "other.safetensors"), "-o", str(tmp_path / "d")]) == (
        f"klvae: error: {tmp_path / 'other.safetensors'}: latents of shape [1]; expected [batch, channels, height, "
        "width] or [channels, height, width]\n")
    assert "(did you mean 'sd15'? the built-in names: demo, sd15, sd2, sdxl," in _error(capsys, ["info", "-m", "sd-15"])
    assert "did you mean" not in _error(capsys, ["info", "-m", str(tmp_path / "sd-15")])
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    assert main(["-q", "encode", str(tmp_path / "a.png"), "-o", str(tmp_path / "z.safetensors")]) == 0
    assert "`klvae info --model tiny` to describe it" in _error(
        capsys, ["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "d"), "--model", "tiny"])
    (tmp_path / "notimg").mkdir()
    (tmp_path / "notimg" / "x.png").write_bytes(b"not a png")
    assert main(["encode", str(tmp_path / "notimg"), "-o", str(tmp_path / "y.safetensors")]) == 2
    assert capsys.readouterr().err.endswith("x.png: not an image, or not one of PNG, JPEG, WEBP, BMP, TIFF, GIF, PPM"
                                            "\nklvae: error: the only image could not be read\n")
    assert _error(capsys, ["train"]).startswith("klvae: error: no config given: `klvae train CONFIG.yaml`")
    with pytest.raises(SystemExit) as stop:
        main(["train", "c.yaml", "--set", "train.max_steps", "10"])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        "klvae train: error: unrecognized arguments: 10; --set takes SECTION.FIELD=VALUE as one word, e.g. --set "
        "train.max_steps=10 (see 'klvae train --help')\n")
