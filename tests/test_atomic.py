"""klvae.atomic: every file klvae writes appears whole or not at all, with the umask's permissions."""

import os
import stat

import pytest

from klvae.atomic import atomic_write, atomic_write_text
from klvae.latents.file import LatentsFile, save_latents


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
