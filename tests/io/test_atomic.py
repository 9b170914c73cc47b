"""klvae.atomic: every file klvae writes appears whole or not at all, with the umask's permissions."""

import os
import stat
from pathlib import Path

import pytest
import torch

from klvae import AutoencoderKL
from klvae.atomic import atomic_write, atomic_write_all, atomic_write_text
from klvae.latents.file import LatentItem, LatentsFile, save_latents
from klvae.weights.save import PICKLE_WEIGHTS, SAFE_WEIGHTS


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failed_latents_write_leaves_no_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # atomic_write removes the folders it made when the write fails; save_latents made them itself, first.
    import klvae.atomic

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(klvae.atomic, "save_file", full_disk)
    lf = LatentsFile(latents={"k": torch.zeros(4, 2, 2)}, items=[LatentItem("a.png", "k", 16, 16)])
    with pytest.raises(OSError, match="No space left"):
        save_latents(lf, tmp_path / "new" / "deeper" / "l.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_files_get_the_umask_mode_not_0600(tmp_path):
    # mkstemp creates 0600 files, and a rename keeps the mode: shards and checkpoints would be unreadable to the
    # rest of a team sharing a dataset folder.
    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a" / "index.json", "{}")
        lat = save_latents(LatentsFile(latents={}, items=[], model="m", scaling_factor=1.0, shift_factor=None),
                           tmp_path / "z.safetensors")
    finally:
        os.umask(old)
    for p in (text, lat):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_files_that_belong_together_are_all_renamed_or_none(tmp_path):
    a, b = tmp_path / "weights.bin", tmp_path / "config.json"
    atomic_write_text(a, "old weights")
    atomic_write_text(b, "old config")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_all([(a, lambda tmp: tmp.write_text("new weights")), (b, broken)])
    assert (a.read_text(), b.read_text()) == ("old weights", "old config")  # not new weights with an old config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.bin"]
    atomic_write_all([(a, lambda tmp: tmp.write_text("new weights")), (b, lambda tmp: tmp.write_text("new"))])
    assert (a.read_text(), b.read_text()) == ("new weights", "new")


def test_save_pretrained_leaves_no_stale_weights_of_the_other_format(tmp_path):
    torch.manual_seed(0)
    old, new = AutoencoderKL("tiny-f8"), AutoencoderKL("tiny-f8")
    old.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", PICKLE_WEIGHTS]
    loaded = AutoencoderKL.from_pretrained(tmp_path)  # would read the old .safetensors had it stayed
    torch.testing.assert_close(loaded.state_dict(), new.state_dict())
    new.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SAFE_WEIGHTS]


@pytest.mark.parametrize("writer", ["save_pretrained", "export_ldm"])
def test_a_weights_write_that_fails_midway_leaves_the_old_files(tmp_path, monkeypatch, writer):
    import safetensors.torch

    from klvae.weights.save import export_ldm

    torch.manual_seed(0)
    old, new = AutoencoderKL("tiny-f8"), AutoencoderKL("tiny-f8")
    target = tmp_path / ("model" if writer == "save_pretrained" else "vae.safetensors")

    def write(vae):
        return vae.save_pretrained(target) if writer == "save_pretrained" else export_ldm(vae, target)

    write(old)
    files = [target] if target.is_file() else sorted(target.iterdir())
    before = {p: p.read_bytes() for p in files}

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write(new)
    assert {p: p.read_bytes() for p in files} == before  # the old weights and config.json, untouched
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
