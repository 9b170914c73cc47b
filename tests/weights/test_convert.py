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


def test_the_vae_of_a_full_sd_checkpoint_comes_out_alone(source: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from klvae.weights import diffusers_to_ldm

    vae = klvae.AutoencoderKL.from_pretrained(source)
    full = {f"first_stage_model.{k}": v.contiguous() for k, v in diffusers_to_ldm(vae.state_dict()).items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.ones(4, 4)  # the UNet and text encoder: left out
    full["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    save_file(full, str(tmp_path / "sd15-full.safetensors"))
    out = tmp_path / "vae.safetensors"
    assert main(["convert", "-m", str(tmp_path / "sd15-full.safetensors"), "--config", "tiny-f8", "-o", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith(("first_stage_model.", "model.", "cond_stage_model."))]
    back = klvae.AutoencoderKL.from_pretrained(out)
    assert back.config == klvae.PRESETS["tiny-f8"]  # the preset named, its factors included
    for k, v in vae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


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


@pytest.mark.parametrize("name", ["again", "again.safetensors"])
def test_an_existing_output_is_replaced_only_with_overwrite(source: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    assert main(["-q", "convert", "-m", str(source), "-o", str(out)]) == 0
    written = _tree(tmp_path) if out.is_dir() else {name: out.read_bytes()}
    assert main(["-q", "convert", "-m", str(source), "-o", str(out), "--dtype", "fp16"]) == 2
    assert (_tree(tmp_path) if out.is_dir() else {name: out.read_bytes()}) == written
    assert main(["-q", "convert", "-m", str(source), "-o", str(out), "--dtype", "fp16", "--overwrite"]) == 0
    with safe_open(str(out / SAFE_WEIGHTS if out.is_dir() else out), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in list(f.keys())} == {torch.float16}  # the new model replaced it


@pytest.mark.parametrize(("argv", "words"), [
    (["-o", "SRC"], "config.json already exists; add --overwrite to replace it"),
    (["-o", "SRC", "--overwrite"], "holds the model being converted"),
    (["-o", "OUT/x.ckpt"], "not pickles; name a .safetensors file (LDM layout) or a folder"),
    (["-o", "OUT/x.bin", "--to", "ldm"], "must end in .safetensors"),
    (["-o", "OUT/d", "--dtype", "int8"], "--dtype must be one of"),
    (["-o", "OUT/d", "--dtype", "fp16", "--model", "HUGE"], "beyond the range of float16, whose largest value is"),
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


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every file under `root`: its bytes, or for a link where it points (a replaced link is a change too)."""
    return {str(p.relative_to(root)): str(p.readlink()) if p.is_symlink() else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


@pytest.fixture
def places(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Under tmp_path/w: a model folder, a link to it, a pipeline folder, the demo model's folder and a preset's
    hub cache whose snapshot files link to blobs, as huggingface_hub lays them out."""
    import shutil

    from helpers import fake_hub_cache
    from klvae.model.config import PRESET_HUB_IDS
    from klvae.weights import load

    w = tmp_path / "w"
    shutil.copytree(source, w / "m")
    (w / "link").symlink_to(w / "m")
    shutil.copytree(source, w / "pipe" / "vae")
    shutil.copytree(source, w / "demo")
    monkeypatch.setattr(load, "embedded_model_dir", lambda name: w / "demo")
    snap = fake_hub_cache(w / "hub", "org/tiny-vae", klvae.AutoencoderKL.from_pretrained(source), "vae")
    blobs = snap.parents[2] / "blobs"  # models--org--tiny-vae/blobs
    blobs.mkdir()
    for f in list(snap.iterdir()):
        f.rename(blobs / f.name)
        f.symlink_to(Path("../../../blobs") / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(w / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(PRESET_HUB_IDS, "tiny-f8", ("org/tiny-vae", "vae"))
    return w


@pytest.mark.parametrize(("model", "output"), [
    ("m/" + SAFE_WEIGHTS, "m"),  # the output folder holds the weights file read
    ("m", "m/" + SAFE_WEIGHTS),  # the output file is the folder's weights
    ("pipe", "pipe/vae"),  # a pipeline folder is read from its vae/
    ("pipe", "pipe"),
    ("link", "m"),  # by another name
    ("m", "link"),
    ("demo", "demo"),
    ("demo", "demo/" + SAFE_WEIGHTS),
    ("tiny-f8", "hub/models--org--tiny-vae/snapshots/0123456789abcdef0123456789abcdef01234567/vae"),
])
def test_convert_never_writes_over_the_model_it_reads(
    places: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, model: str, output: str
) -> None:
    from helpers import one_error_line

    monkeypatch.chdir(places)
    before = _tree(places)
    capsys.readouterr()
    # Refused without --overwrite, and with it too: --overwrite replaces another model, never the one read.
    assert main(["-q", "convert", "-m", model, "-o", output, "--dtype", "fp16"]) == 2
    first = one_error_line(capsys.readouterr().err)  # a pipeline folder has no model of its own at the top
    assert "already exists; add --overwrite" in first or "the model being converted (" in first
    assert main(["-q", "convert", "-m", model, "-o", output, "--dtype", "fp16", "--overwrite"]) == 2
    assert "the model being converted (" in one_error_line(capsys.readouterr().err)
    assert _tree(places) == before


@pytest.mark.parametrize("output", ["kept/new/deeper", "kept/new/vae.safetensors"])
def test_a_full_disk_is_one_line_and_leaves_no_new_folder(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], output: str
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    from helpers import one_error_line

    def full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    (tmp_path / "kept").mkdir()  # there before: stays
    out = tmp_path / output
    capsys.readouterr()
    assert main(["-q", "convert", "-m", str(source), "-o", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write {out}" in line and "No space left on device" in line  # the folder or its file
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
