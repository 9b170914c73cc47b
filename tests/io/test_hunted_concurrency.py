"""Hunt: klvae used by several processes at once, and the leftovers of a process killed (SIGKILL) mid-write.

- two `klvae train` runs in one train.out_dir are never refused (`klvae cache` holds a lock on its folder; train
  holds none): a `--resume` started while the run is still training resumes from its newest checkpoint and then
  both write step_*.pt into one folder (each pruning the other's), append their rows to one metrics.jsonl (steps
  20, 19, 21, 20, ...) and export over each other's final/; two fresh runs started together both pass the "already
  holds a run" check, which looks before either has written anything;
- `klvae cache --verify --repair` rewrites the manifests of a cache that a `klvae cache` run is writing (it takes
  no lock): a line the run appends meanwhile is lost, its shard is left out of the index;
- a kill between a write and its rename leaves a hidden temporary that the next run never removes: the cache's
  `.index.json.*.tmp` (its shards' and manifests' are removed), and a training run's `.step_*.pt.*.tmp` in
  checkpoints/ (a whole checkpoint's size) and `.diffusion_pytorch_model.safetensors.*.tmp` inside final/, the
  folder that is handed on as the model;
- `klvae encode` without --overwrite checks for the output file before the work and renames onto it after: a file
  that appeared meanwhile (another run's) is replaced without a word.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cache_args, noise_folder, one_error_line, saved_tiny_model
from klvae.atomic import folder_lock
from klvae.cli.main import main


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("tiny") / "vae")


def _train_sets(data: Path, out: Path, steps: int) -> list[str]:
    sets = ["model.preset=tiny", f"data.train={data}", "data.resolution=16", "data.batch_size=2",
            "data.num_workers=0", "train.device=cpu", f"train.out_dir={out}", "loss.preset=mse",
            "train.val_lpips=false", "train.ckpt_every=2", "train.log_every=1", f"train.max_steps={steps}"]
    return [a for s in sets for a in ("--set", s)]


# A child that runs the CLI and SIGKILLs itself just before the rename that would put the file named argv[1] in
# place: the temporary is whole, as when a scheduler's SIGKILL lands at the end of a long write.
_KILLED_AT_RENAME = (
    "import os, signal, sys\n"
    "target, real = sys.argv.pop(1), os.replace\n"
    "def replace(src, dst, *a, **k):\n"
    "    if os.path.basename(dst) == target:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return real(src, dst, *a, **k)\n"
    "os.replace = replace\n"
    "from klvae.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _killed_at_rename(target: str, *argv: str) -> None:
    r = subprocess.run([sys.executable, "-c", _KILLED_AT_RENAME, target, *argv], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


# ---- two runs of one train.out_dir -----------------------------------------------------------------------------
def test_a_resume_while_the_run_is_still_training_is_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A --resume of a run that is still training goes ahead: two runs write one out_dir over each other."""
    data, out = noise_folder(tmp_path / "images", 4, hw=(16, 16)), tmp_path / "run"
    running = subprocess.Popen([sys.executable, "-m", "klvae.cli.main", "-q", "train",
                                *_train_sets(data, out, 100_000)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((out / "checkpoints").glob("step_*.pt")) and running.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.poll() is None, running.communicate()[1][-2000:]
        # max_steps 1: the resumed step is past it, so this run trains nothing, but it still exports final/.
        status = main(["-q", "train", *_train_sets(data, out, 1), "--resume"])
        still_running = running.poll() is None
    finally:
        running.kill()
        running.communicate()
    err = capsys.readouterr().err
    assert still_running
    # Now: exit 0 ("trained to step N: no step left to train") with final/ exported beside the running run, whose
    # checkpoint written in between (if any) is renamed to *.superseded under it; with a longer max_steps both runs
    # write step_*.pt, prune each other's and append interleaved rows (20, 19, 21, 20, ...) to one metrics.jsonl.
    assert status == 2, err
    assert str(out) in one_error_line(err)
    assert not (out / "final").exists() and not list((out / "checkpoints").glob("*.superseded*"))


# ---- klvae cache --verify --repair beside a running klvae cache --------------------------------------------------
def test_repair_of_a_cache_that_a_run_is_writing_is_refused(tmp_path: Path, model: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`klvae cache --verify --repair` rewrites the manifests of a cache that a running `klvae cache` appends to."""
    data, out = noise_folder(tmp_path / "data", 4, hw=(32, 32)), tmp_path / "cache"
    assert main(cache_args(data, out, model)) == 0
    shard = out / "rank000-00000.safetensors"
    damaged = bytearray(shard.read_bytes())
    damaged[-1] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    manifest = (out / "manifest-rank000.jsonl").read_text()
    capsys.readouterr()
    with folder_lock(out, "klvae cache"):  # as a `klvae cache` run (a rerun, encoding more images) holds it
        status = main(["cache", "--verify", "--repair", "-o", str(out)])
    err = capsys.readouterr().err
    # Now: exit 1, "... 1 damaged: rank000-00000.safetensors; dropped them": the manifest is rewritten under the
    # running job, whose next line (appended in between) is lost with the rewrite.
    assert status == 2, err
    assert "another `klvae cache` is writing into" in one_error_line(err)
    assert (out / "manifest-rank000.jsonl").read_text() == manifest and shard.exists()


# ---- leftovers of a SIGKILL between a write and its rename --------------------------------------------------------
def test_a_cache_rerun_after_a_kill_while_the_index_was_written_leaves_no_temporary(tmp_path: Path,
                                                                                    model: Path) -> None:
    """A cache killed as its index.json was written keeps a hidden .index.json.*.tmp after the rerun finishes it."""
    data, out = noise_folder(tmp_path / "data", 4, hw=(32, 32)), tmp_path / "cache"
    _killed_at_rename("index.json", *cache_args(data, out, model))
    assert _temporaries(out) and not (out / "index.json").exists()
    assert main(cache_args(data, out, model)) == 0  # the killed run's lock went with it
    assert json.loads((out / "index.json").read_text())["items"]
    # Now: ['.index.json.PID.XXXXXXXX.tmp'] (the shards' and manifests' temporaries are removed by a rerun).
    assert _temporaries(out) == []


@pytest.mark.parametrize(("target", "folder"), [("step_00000004.pt", "checkpoints"),
                                                ("diffusion_pytorch_model.safetensors", "final")])
def test_a_resume_after_a_kill_mid_save_leaves_no_temporary(tmp_path: Path, target: str, folder: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed while saving a checkpoint or its export keeps the hidden temporary after its resume ends."""
    data, out = noise_folder(tmp_path / "images", 4, hw=(16, 16)), tmp_path / "run"
    _killed_at_rename(target, "-q", "train", *_train_sets(data, out, 4))
    assert _temporaries(out / folder)
    assert main(["-q", "train", *_train_sets(data, out, 4), "--resume"]) == 0, capsys.readouterr().err
    assert (out / folder / target).is_file()
    # Now: the killed run's .step_00000004.pt.PID.XXXXXXXX.tmp (a whole checkpoint) stays in checkpoints/, and
    # .diffusion_pytorch_model.safetensors.PID.XXXXXXXX.tmp (the whole weights) inside the exported model folder.
    assert _temporaries(out / folder) == []


# ---- an output that appears while the command runs ---------------------------------------------------------------
def test_encode_without_overwrite_keeps_a_file_that_appeared_during_the_run(
        tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --overwrite, encode replaces an output that another run wrote while this one was encoding."""
    from klvae.cli import codec

    data, out = noise_folder(tmp_path / "data", 2, hw=(16, 16)), tmp_path / "lat.safetensors"
    real = codec.load_model

    def other_run_finishes(*args: object, **kwargs: object) -> object:
        out.write_bytes(b"another run's latents")  # written after this run's check, before its save
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "load_model", other_run_finishes)
    status = main(["-q", "encode", str(data), "-o", str(out), "--model", str(model), "--device", "cpu"])
    err = capsys.readouterr().err
    # Now: exit 0, and the other run's file is gone, replaced by this one's latents.
    assert status == 2, err
    assert "--overwrite" in one_error_line(err)
    assert out.read_bytes() == b"another run's latents"
    assert _temporaries(tmp_path) == []


# ---- pinned: two `klvae cache` processes started together into one folder ----------------------------------------
def test_two_caches_started_together_into_one_folder_give_each_row_once(tmp_path: Path, model: Path) -> None:
    """Two `klvae cache` runs into one folder at once: one is refused in one line (or finds all done), none mixes."""
    data, out = noise_folder(tmp_path / "data", 24, hw=(32, 32)), tmp_path / "cache"
    out.mkdir()
    cmd = [sys.executable, "-m", "klvae.cli.main", *cache_args(data, out, model, "--batch-size", "1")]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in runs]
    for status, err in results:
        assert status in (0, 2), err
        if status == 2:
            assert "another `klvae cache` is writing into" in one_error_line(err)
    assert 0 in [status for status, _ in results]
    items = json.loads((out / "index.json").read_text())["items"]
    assert sorted(it["source"] for it in items) == sorted(p.name for p in data.iterdir())
    assert {it["shard"] for it in items} == {p.name for p in out.glob("*.safetensors")}
    assert _temporaries(out) == []


def test_decode_without_overwrite_keeps_a_picture_that_appeared_during_the_run(
        tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --overwrite, decode replaced a PNG that another run wrote while this one was decoding; none of this
    run's pictures land (they belong together), and no temporary is left."""
    from klvae.cli import codec

    data, lat, out = noise_folder(tmp_path / "data", 2, hw=(16, 16)), tmp_path / "lat.safetensors", tmp_path / "out"
    assert main(["-q", "encode", str(data), "-o", str(lat), "--model", str(model), "--device", "cpu"]) == 0
    real = codec.load_model

    def other_run_finishes(*args: object, **kwargs: object) -> object:
        out.mkdir()
        (out / "img1.png").write_bytes(b"another run's picture")  # after this run's check, before its save
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "load_model", other_run_finishes)
    status = main(["-q", "decode", str(lat), "-o", str(out), "--model", str(model), "--device", "cpu"])
    assert status == 2
    assert "--overwrite replaces it" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["img1.png"]
    assert (out / "img1.png").read_bytes() == b"another run's picture"


def test_reconstruct_without_overwrite_keeps_a_picture_that_appeared_during_the_run(
        tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --overwrite, reconstruct replaced an output that another run wrote while this one worked."""
    from klvae.cli import codec

    image, out = noise_folder(tmp_path / "data", 1, hw=(16, 16)) / "img0.png", tmp_path / "recon.png"
    real = codec.load_model

    def other_run_finishes(*args: object, **kwargs: object) -> object:
        out.write_bytes(b"another run's picture")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "load_model", other_run_finishes)
    assert main(["-q", "reconstruct", str(image), "-o", str(out), "--model", str(model), "--device", "cpu"]) == 2
    assert "--overwrite replaces it" in one_error_line(capsys.readouterr().err)
    assert out.read_bytes() == b"another run's picture" and _temporaries(tmp_path) == []
