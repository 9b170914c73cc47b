"""Bad input to any command, running out of memory and being killed: one clear line with the right exit status,
before any work: a config.json holding a 5000-digit number, a noise sheet over the pixel limit, out of memory (with
what to do), a latents file without items, an empty model name, a device file; SIGTERM during decode unwinds like
Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import klvae
from klvae.cli.main import main
from klvae.latents.file import LatentsFile, save_latents


def _error(capsys: pytest.CaptureFixture[str], argv: list[str], status: int = 2) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


def test_a_config_json_with_a_5000_digit_number_is_a_bad_file(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m"
    klvae.AutoencoderKL("tiny").save_pretrained(model)
    cfg = model / "config.json"
    cfg.write_text(cfg.read_text().replace('"latent_channels": 4', '"latent_channels": 1' + "0" * 5000))
    err = _error(capsys, ["info", "--model", str(model)])
    assert f"cannot read {cfg}:" in err


def test_a_noise_sheet_over_the_pixel_limit_is_refused_before_the_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "big.png"
    Image.new("RGB", (4000, 4000), (90, 120, 60)).save(img)
    monkeypatch.setattr("klvae.cli.noise.load_model", lambda *a: pytest.fail("the model was loaded"))
    steps = [str(t) for t in range(0, 1000, 80)]  # 13 tiles of 4000 px: 52000 x ~4000, over 179 MP
    err = _error(capsys, ["noise", str(img), "-o", str(tmp_path / "sheet.png"), "--steps", *steps])
    assert "the sheet would be 52000x" in err and "over the limit of 178,956,970" in err
    assert not (tmp_path / "sheet.png").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 412316860416 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 38.00 GiB"),
    MemoryError(),
])
def test_running_out_of_memory_is_said_with_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (90, 120, 60)).save(img)

    def fail(*args: object) -> torch.Tensor:
        raise error

    # Past the model's passes: a GPU pass that runs out of memory is retried tiled, and that retry succeeds here.
    monkeypatch.setattr("klvae.cli.codec.pil_to_tensor", fail)
    err = _error(capsys, ["-q", "reconstruct", str(img), "-o", str(tmp_path / "r.png"), "--device", "cpu"], status=1)
    assert err.startswith("klvae: error: out of memory (") and "--tile-size" in err and "--batch-size" in err
    assert not (tmp_path / "r.png").exists()


def test_a_latents_file_without_items_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.safetensors"
    save_latents(LatentsFile(latents={"x": torch.zeros(4, 2, 2)}, items=[]), empty)
    assert json.loads(__import__("safetensors").safe_open(str(empty), "pt").metadata()["items"]) == []
    err = _error(capsys, ["decode", str(empty), "-o", str(tmp_path / "out")])
    assert "holds no latents (its items list is empty)" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_model_name_is_not_the_current_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    klvae.AutoencoderKL("tiny").save_pretrained(tmp_path)
    monkeypatch.chdir(tmp_path)  # a model in the current folder, which Path("") would have found
    for name in ("", " "):
        err = _error(capsys, ["info", "--model", name])
        assert "the model's name is empty" in err


def test_sigterm_during_decode_unwinds_like_ctrl_c(tmp_path: Path) -> None:
    """kill (SIGTERM) mid-decode: one line, status 143, and neither PNGs nor the output folder left behind."""
    import subprocess
    import sys

    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (90, 120, 60)).save(img)
    z = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(img), "-o", str(z)]) == 0
    out = tmp_path / "out"
    # The child sends itself SIGTERM as its first PNG is being written: no sleep raced against this machine.
    child = ("import os, signal, sys\n"
             "import klvae.cli.codec as codec\n"
             "real = codec.write_image\n"
             "def write(*a, **k):\n"
             "    real(*a, **k)\n"
             "    os.kill(os.getpid(), signal.SIGTERM)\n"
             "codec.write_image = write\n"
             "from klvae.cli.main import main\n"
             f"sys.exit(main(['-q', 'decode', {str(z)!r}, '-o', {str(out)!r}, '--device', 'cpu']))\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143 and proc.stderr.strip() == "klvae: terminated", proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "z.safetensors"]


def test_a_device_file_is_named_as_such_not_as_missing(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["decode", "/dev/null", "-o", "/tmp/klvae-never-written"])
    assert "/dev/null is not a regular file" in err
    err = _error(capsys, ["info", "--model", "/dev/zero"])
    assert "/dev/zero is not a regular file" in err
    assert not Path("/tmp/klvae-never-written").exists()
