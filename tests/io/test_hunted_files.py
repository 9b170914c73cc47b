"""Pins bugs a hunt of file-system robustness (folder walks, output paths, atomic writes) found:

- `find_images` lists every image twice when one folder is named twice under two spellings (relative and absolute,
  or through a symlink to it), against its "without duplicates": `klvae encode data /abs/data` encodes each image
  twice, and decode then writes `img0.png` and `img0_1.png` for one image.
- A failed atomic write to a path with `..` in it (`new/../out.safetensors`) leaves the folder `new` it made,
  against atomic_write_all's promise to remove the folders it made: its cleanup stops at `new/..`, which rmdir
  cannot remove.
- An output path starting with `~` that the shell did not expand (`--output=~/x`, `train.out_dir=~/run`: bash
  expands neither) is written into a folder literally named `~` in the working folder, while --model expands `~`.
- A `klvae cache` that fails (no image readable) removes only the innermost output folder it made: `-o new/x/c`
  leaves `new/x` behind, though "a failed start leaves no empty folder".
- A sub-folder of the data that cannot be listed (no permission) is only a warning: `encode`, `cache` and `eval`
  exit 0 (cache even says "skipped 0 unreadable"), while an unreadable image or tar shard is counted and exits 1;
- (a doubtful item, then fixed) a file output ending in a slash (`-o x.safetensors/`) was written as a file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from helpers import noise_folder, noise_png, one_error_line, saved_tiny_model
from klvae.atomic import atomic_write
from klvae.cli.main import main
from klvae.images import find_images
from klvae.latents.file import load_latents


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("tiny") / "vae")


def _encode(data: list[str], output: str, model: Path) -> int:
    return main(["-q", "encode", *data, f"--output={output}", "--model", str(model), "--device", "cpu"])


# -- one folder named twice ---------------------------------------------------------------------------------------

def test_find_images_lists_a_folder_named_twice_by_two_spellings_once(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Was: six paths for three images; `seen` (which stops symlink loops) is kept per named folder only.
    noise_folder(tmp_path / "data", 3, hw=(16, 16))
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert len(find_images(["data", str(tmp_path / "data")])) == 3
    assert len(find_images(["data", "link"])) == 3


def test_encode_of_one_folder_named_twice_encodes_each_image_once(tmp_path: Path, model: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # `klvae encode data/ /abs/path/data` (a shell glob and a pasted path): was 6 items, each image twice.
    noise_folder(tmp_path / "data", 3, hw=(16, 16))
    monkeypatch.chdir(tmp_path)
    assert _encode(["data", str(tmp_path / "data")], "lat.safetensors", model) == 0
    names = [it.name for it in load_latents(tmp_path / "lat.safetensors").items]
    assert sorted(names) == ["img0.png", "img1.png", "img2.png"], names


# -- `..` in an output path ---------------------------------------------------------------------------------------

def _no_space(tmp: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target", ["new/../out.bin", "new/deeper/../../out.bin", "new/../made/out.bin"])
def test_a_failed_write_through_dotdot_removes_the_folders_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   target: str) -> None:
    # Was: `new` left behind: the folders made are [new, new/.., ...], and the cleanup stops at rmdir(new/..).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, _no_space)
    assert os.listdir(tmp_path) == []


def test_a_failed_encode_through_dotdot_leaves_no_folder(tmp_path: Path, model: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import klvae.atomic

    noise_folder(tmp_path / "data", 2, hw=(16, 16))
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    monkeypatch.setattr(klvae.atomic, "save_file", lambda *a, **k: _no_space(Path()))
    assert _encode([str(tmp_path / "data")], "new/../lat.safetensors", model) == 2
    assert "No space left" in capsys.readouterr().err
    assert os.listdir(tmp_path / "w") == []  # was: ['new']


# -- `~` in an output path ----------------------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$HOME in tmp_path/home; the working folder tmp_path/w."""
    (tmp_path / "home").mkdir()
    (tmp_path / "w").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "w")
    return tmp_path / "home"


def test_an_unexpanded_tilde_output_does_not_make_a_folder_named_tilde(
        tmp_path: Path, home: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `klvae encode data --output=~/lat.safetensors`: bash leaves the ~ as it is. Was: exit 0, the latents in
    # ./~/lat.safetensors (and a later `rm -rf ~` to tidy up removes the home folder).
    data = noise_folder(tmp_path / "data", 2, hw=(16, 16))
    status = _encode([str(data)], "~/lat.safetensors", model)
    err = capsys.readouterr().err
    assert not (tmp_path / "w" / "~").exists(), "a folder named ~ was made in the working folder"
    # Either written where ~ means (as --model reads ~), or refused in one line before any work.
    assert (status == 0 and (home / "lat.safetensors").is_file()) or (status == 2 and "~" in err), (status, err)


def test_an_unexpanded_tilde_train_out_dir_is_not_a_folder_named_tilde(
        tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # `klvae train train.out_dir=~/runs/a`: bash expands ~ after `=` only in NAME=value words, and
    # `train.out_dir` is no shell name. Was: the run went to ./~/runs/a, the message saying "weights in ~/runs/a".
    import klvae.distributed
    import klvae.training.loop
    import klvae.training.trainer
    from klvae.cli import train as train_cli

    seen: list[str] = []

    class FakeTrainer:
        def __init__(self, cfg: object, resumed: object = None) -> None:
            seen.append(cfg.train.out_dir)  # type: ignore[attr-defined]
            Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[attr-defined]
            self.step = 1

    monkeypatch.setattr(train_cli, "check_inputs", lambda cfg, resume: None)
    monkeypatch.setattr(klvae.training.trainer, "Trainer", FakeTrainer)
    monkeypatch.setattr(klvae.training.loop, "fit", lambda trainer: {"loss": 0.5})
    monkeypatch.setattr(klvae.distributed, "shutdown", lambda dist: None)
    status = main(["train", "--set", "data.train=x", "--set", "train.out_dir=~/runs/a"])
    err = capsys.readouterr().err
    assert not (tmp_path / "w" / "~").exists(), f"a folder named ~ was made in the working folder ({seen})"
    assert status in (0, 2), (status, err)


# -- a sub-folder that cannot be listed ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["encode", "cache", "eval"])
def test_a_sub_folder_that_cannot_be_listed_is_counted_as_skipped(
        tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: str) -> None:
    # As a user's `chmod 000 data/sub` (this runs as root, which permissions do not stop, so os.walk's listing is
    # refused instead). Was: exit 0, its two images left out with a warning only; a tar shard that cannot be read
    # is counted and makes the job exit 1, and so does an image that cannot be read.
    data = noise_folder(tmp_path / "data", 2, hw=(16, 16))
    sub = noise_folder(data / "sub", 2, hw=(16, 16))
    real = os.scandir

    def refuse(path: str | os.PathLike[str] = ".") -> object:
        if os.fspath(path) == os.fspath(sub):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", refuse)
    argv = {"encode": ["encode", str(data), "-o", str(tmp_path / "lat.safetensors")],
            "cache": ["cache", "--data", str(data), "-o", str(tmp_path / "c"), "--resolution", "16",
                      "--num-workers", "0"],
            "eval": ["eval", "--data", str(data), "-o", str(tmp_path / "r"), "--no-lpips", "--no-fid",
                     "--resolution", "16"]}[command]
    status = main(["-q", *argv, "--model", str(model), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "sub" in err, err  # the warning, as now
    assert status == 1, (status, err)  # finished, but some of the data could not be read


# -- a failed cache and the folders it made ----------------------------------------------------------------------

def test_a_failed_cache_removes_every_folder_it_made(tmp_path: Path, model: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Was: exit 2 as it should, but new/x left behind: cache_rank makes `out` with mkdir(parents=True) and
    # removes only `out` itself on failure.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        (data / name).write_bytes(b"not an image")
    status = main(["-q", "cache", "--data", str(data), "-o", str(tmp_path / "new" / "x" / "c"), "--model", str(model),
                   "--device", "cpu", "--resolution", "16", "--num-workers", "0"])
    assert status == 2
    assert "none of the 2 images" in capsys.readouterr().err
    assert not (tmp_path / "new").exists(), sorted(p.name for p in (tmp_path / "new").rglob("*"))


def test_a_file_output_ending_in_a_slash_is_refused(tmp_path: Path, model: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A doubtful item, then fixed: `-o x.safetensors/` wrote a file (Path drops the slash)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(noise_png(0, (16, 16)))
    out = f"{tmp_path / 'x.safetensors'}/"
    assert main(["-q", "encode", str(data), "-o", out, "--model", str(model), "--device", "cpu"]) == 2
    assert "ends in a slash" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.safetensors").exists()
