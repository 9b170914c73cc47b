"""Kills mutants of the concurrency fixes since 90ea989 that no test caught: each test passes on the code and fails
on one small change to it (a clause dropped, a branch narrowed, an argument left out).

- atomic_write(replace=False) on a file system without hard links: the new file still lands, one that is there is
  kept, and no temporary is left; with hard links, the linked temporary is removed after the file lands;
- atomic.inside: "data/../report" is not inside data/, and a symlink loop is no folder's inside;
- evaluation.check_report_place: the report's images/ folder holding the data (or a folder of it) is refused;
- `klvae train`: the "already holds a run" check is made again under the lock; a resume at exactly max_steps
  gives no "past train.max_steps" warning;
- latents.repair_cache of a missing folder names it (the lock is taken on a folder that is there only);
- `klvae decode` of a plain tensor or a ComfyUI .latent, and `klvae noise`, without --overwrite keep an output
  that another run wrote meanwhile; so should `klvae encode -o x.latent` (it does not: see the failing test).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import noise_folder, one_error_line, perturbed_vae, saved_tiny_model, tiny_train_cli
from klvae.atomic import atomic_write, check_not_in_data, inside, text_writer
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.evaluation import EvalOptions, MetricNets, run_evaluation
from klvae.latents import repair_cache
from klvae.latents.comfy import save_comfy_latent


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("tiny") / "vae")


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


# ---- atomic_write(replace=False) ----------------------------------------------------------------------------------
def test_without_hard_links_a_new_file_lands_and_one_already_there_is_kept(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system without hard links (FAT, some network ones) a write without --overwrite fails or is lost."""

    def no_links(src: object, dst: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    new, there = tmp_path / "new.txt", tmp_path / "there.txt"
    atomic_write(new, text_writer("mine"), replace=False)
    assert new.read_text() == "mine"
    there.write_text("another run's")
    with pytest.raises(KlvaeError, match="it is kept; --overwrite replaces it"):
        atomic_write(there, text_writer("mine"), replace=False)
    assert there.read_text() == "another run's"
    assert _temporaries(tmp_path) == []


def test_a_file_written_without_replacing_leaves_no_temporary(tmp_path: Path) -> None:
    """Every output written without --overwrite leaves a hidden .NAME.PID.HEX.tmp beside it (a second link)."""
    atomic_write(tmp_path / "out.txt", text_writer("mine"), replace=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


# ---- atomic.inside, check_not_in_data -----------------------------------------------------------------------------
def test_an_output_beside_the_data_named_through_dotdot_is_not_inside_it(tmp_path: Path) -> None:
    """-o data/../report (a folder beside data/) is refused as lying inside the data folder."""
    data = noise_folder(tmp_path / "data", 1, hw=(16, 16))
    out = data / ".." / "report"
    assert not inside(out, data)
    check_not_in_data(out, "--output", str(data))


def test_an_output_that_is_a_symlink_loop_is_no_folders_inside(tmp_path: Path) -> None:
    """An output path that is a symlink loop crashes the check with RuntimeError ("Symlink loop")."""
    data = noise_folder(tmp_path / "data", 1, hw=(16, 16))
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert not inside(loop, data)
    check_not_in_data(loop, "--output", str(data))


# ---- evaluation.check_report_place --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["images", "images/photos"])
def test_run_evaluation_refuses_a_report_whose_images_folder_holds_the_data(tmp_path: Path, where: str) -> None:
    """run_evaluation(models, "rep/images", "rep") writes the report's pictures among the photos it scores."""
    data = noise_folder(tmp_path / "rep" / where, 2, hw=(16, 16))
    nets = MetricNets(left_out={"lpips": "disabled", "rfid": "disabled"})
    with pytest.raises(KlvaeError, match=r"its images/ folder, where the report's pictures go, holds the data"):
        run_evaluation({"mine": perturbed_vae("tiny")}, data, tmp_path / "rep", EvalOptions(resolution=16), nets)
    assert sorted(p.name for p in (tmp_path / "rep").rglob("*") if p.is_file()) == ["img0.png", "img1.png"]


# ---- klvae train ---------------------------------------------------------------------------------------------------
def test_a_run_begun_in_the_folder_while_this_one_starts_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A second fresh run that began after this one's first look (before its lock) is trained over, not refused."""
    from klvae.training import checkpoint

    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    run = tmp_path / "run"
    real = checkpoint.saved_model_config

    def another_run_begins(*args: object) -> object:
        run.mkdir()
        (run / "metrics.jsonl").write_text("another run's\n")  # after the first check, before the lock
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "saved_model_config", another_run_begins)
    assert main(tiny_train_cli(tmp_path, "train.max_steps=1")) == 2
    assert "already holds a run (metrics.jsonl)" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == "another run's\n"


def test_a_finished_run_resumed_at_exactly_max_steps_gives_no_past_warning(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Resuming a finished run unchanged warns "resumed at step 1, past train.max_steps 1", which it is not."""
    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    argv = tiny_train_cli(tmp_path, "train.max_steps=1", "train.ckpt_every=1")
    assert main(argv) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main([*argv, "--resume"]) == 0
    assert "past train.max_steps" not in caplog.text


# ---- latents.repair_cache -----------------------------------------------------------------------------------------
def test_repair_of_a_missing_cache_folder_names_it(tmp_path: Path) -> None:
    """repair_cache("missing/") raises a bare FileNotFoundError from the folder's lock instead of saying so."""
    with pytest.raises(KlvaeError, match="is not a klvae cache: no such folder"):
        repair_cache(tmp_path / "missing")


# ---- outputs that appear while a command runs ---------------------------------------------------------------------
def _appears(monkeypatch: pytest.MonkeyPatch, module: str, output: Path, data: bytes = b"another run's") -> None:
    """`module`'s load_model writes `output` first, as another run finishing after this one's check would."""
    import importlib

    mod = importlib.import_module(module)
    real: Callable[..., object] = mod.load_model

    def other_run_finishes(*args: object, **kwargs: object) -> object:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(data)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "load_model", other_run_finishes)


def _kept(capsys: pytest.CaptureFixture[str], output: Path) -> None:
    assert "--overwrite replaces it" in one_error_line(capsys.readouterr().err)
    assert output.read_bytes() == b"another run's"
    assert _temporaries(output.parent) == []


@pytest.mark.parametrize(("kind", "name"), [("plain", "z.pt"), ("comfy", "x.latent")])
def test_decode_of_another_kind_without_overwrite_keeps_a_picture_that_appeared_during_the_run(
        kind: str, name: str, tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without --overwrite, decoding a plain tensor (or a ComfyUI .latent) replaces a PNG that another run wrote
    meanwhile."""
    if kind == "plain":
        torch.save(torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0)), tmp_path / name)
    else:
        save_comfy_latent(tmp_path / name, torch.zeros(2, 4, 4, 4))
    out, picture = tmp_path / "out", f"{name.split('.')[0]}_01.png"
    _appears(monkeypatch, f"klvae.cli.{kind}", out / picture)
    assert main(["-q", "decode", str(tmp_path / name), "-o", str(out), "--model", str(model),
                 "--device", "cpu"]) == 2
    _kept(capsys, out / picture)
    assert sorted(p.name for p in out.iterdir()) == [picture]


def test_noise_without_overwrite_keeps_a_sheet_that_appeared_during_the_run(
        tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --overwrite, `klvae noise` replaces a sheet that another run wrote meanwhile."""
    image, out = noise_folder(tmp_path / "data", 1, hw=(16, 16)) / "img0.png", tmp_path / "sheet.png"
    _appears(monkeypatch, "klvae.cli.noise", out)
    assert main(["-q", "noise", str(image), "-o", str(out), "--steps", "500", "--model", str(model),
                 "--device", "cpu"]) == 2
    _kept(capsys, out)


def test_comfy_encode_without_overwrite_keeps_a_latent_that_appeared_during_the_run(
        tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`klvae encode -o x.latent` without --overwrite replaces a file another run wrote meanwhile (.safetensors
    output keeps it)."""
    data, out = noise_folder(tmp_path / "data", 2, hw=(16, 16)), tmp_path / "x.latent"
    _appears(monkeypatch, "klvae.cli.comfy", out)
    status = main(["-q", "encode", str(data), "-o", str(out), "--model", str(model), "--device", "cpu"])
    # Now: exit 0, and the other run's file is replaced by this one's latents.
    assert status == 2
    _kept(capsys, out)
