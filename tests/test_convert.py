"""`klvae convert`: diffusers folder <-> one LDM-layout file, storage dtypes, and refusals before any write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import klvae
from klvae.cli.main import main
from klvae.weights.save import SAFE_WEIGHTS


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL(klvae.PRESETS["tiny-f8"].replace(scaling_factor=0.3, shift_factor=0.05))
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.save_pretrained(tmp_path_factory.mktemp("src") / "vae")


def _same(a: klvae.AutoencoderKL, b: klvae.AutoencoderKL, stored: torch.dtype = torch.float32) -> None:
    """Equal configs, and a's weights exactly b's as rounded once to the `stored` dtype."""
    assert a.config == b.config
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y.to(stored).float()), k


def test_diffusers_to_ldm_and_back_is_exact(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    single = tmp_path / "vae.safetensors"
    assert main(["convert", "-m", str(source), "-o", str(single)]) == 0
    assert "ldm layout" in capsys.readouterr().out
    with safe_open(str(single), framework="pt") as f:
        keys = list(f.keys())
    assert "encoder.down.0.block.0.conv1.weight" in keys and "decoder.mid.attn_1.q.weight" in keys  # LDM names
    back = tmp_path / "back"
    assert main(["convert", "-m", str(single), "-o", str(back)]) == 0
    original = klvae.AutoencoderKL.from_pretrained(source)
    _same(klvae.AutoencoderKL.from_pretrained(single), original)
    _same(klvae.AutoencoderKL.from_pretrained(back), original)


def test_half_storage_halves_the_file_and_loads_in_diffusers(source: Path, tmp_path: Path) -> None:
    import diffusers
    out = tmp_path / "fp16"
    assert main(["convert", "-m", str(source), "-o", str(out), "--dtype", "fp16"]) == 0
    with safe_open(str(out / SAFE_WEIGHTS), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in list(f.keys())} == {torch.float16}
    assert (out / SAFE_WEIGHTS).stat().st_size < 0.55 * (source / SAFE_WEIGHTS).stat().st_size
    _same(klvae.AutoencoderKL.from_pretrained(out), klvae.AutoencoderKL.from_pretrained(source), torch.float16)
    theirs = diffusers.AutoencoderKL.from_pretrained(str(out))
    assert theirs.config.scaling_factor == 0.3 and theirs.config.shift_factor == 0.05


@pytest.mark.parametrize(("argv", "words"), [
    (["-o", "SRC"], "is the model being converted"),
    (["-o", "OUT/x.ckpt"], "is a folder"),
    (["-o", "OUT/x.bin", "--to", "ldm"], "must end in .safetensors"),
    (["-o", "OUT/d", "--dtype", "int8"], "--dtype must be one of"),
    (["-o", "OUT/d", "--dtype", "fp16", "--model", "HUGE"], "not finite in fp16"),
])
def test_bad_conversions_are_one_line_and_write_nothing(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    huge = tmp_path / "huge"
    vae = klvae.AutoencoderKL.from_pretrained(source)
    with torch.no_grad():
        vae.decoder.conv_out.weight[0, 0, 0, 0] = 1e6  # beyond fp16's 65504
    vae.save_pretrained(huge)
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.replace("SRC", str(source)).replace("OUT", str(out)).replace("HUGE", str(huge)) for a in argv]
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    capsys.readouterr()
    assert main(["-q", "convert", "-m", str(source), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("klvae: error: ") and words in err[0], err
    assert list(out.iterdir()) == []
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
