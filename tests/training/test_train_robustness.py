"""Training on bad input stops with one line: data with no readable image, a critic that cannot run at the
resolution, a resumed optimiser state that does not fit, and config values too large to quote."""

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import klvae.training.data as data_mod
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.training.config import MAX_DISC_NDF, load_config
from klvae.training.loop import fit
from klvae.training.trainer import Trainer

BASE = ("model.preset=tiny", "data.resolution=32", "data.batch_size=1", "data.num_workers=0", "train.device=cpu",
        "loss.preset=mse", "train.log_every=1", "train.val_every=1000", "train.ckpt_every=1000")


def _sets(tmp: Path, data: Path | str, *overrides: str) -> list[str]:
    cfg = (*BASE, f"data.train={data}", f"train.out_dir={tmp / 'run'}", *overrides)
    return [a for o in cfg for a in ("--set", o)]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("klvae: error: "), lines
    return lines[0]


def _png(path: Path, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# ---- 1. data with no readable image --------------------------------------------------------------------
def _unreadable_folder(tmp: Path) -> Path:
    root = tmp / "bad"
    root.mkdir()
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image\n")
    (root / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    return root


def _int_table(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "ints.parquet"
    pq.write_table(pa.table({"image": list(range(5))}), path)
    return path


def _garbage_shards(tmp: Path) -> Path:
    import io
    import tarfile

    path = tmp / "bad.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(3):
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = 5
            tf.addfile(info, io.BytesIO(b"junk!"))
    return path


@pytest.fixture
def read_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail instead of looping for ever: the unfixed loop read the same unreadable items without end."""
    calls = [0]
    real = data_mod._item

    def counted(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] > 200:
            raise RuntimeError("read 200 items without stopping")
        return real(*args)

    monkeypatch.setattr(data_mod, "_item", counted)


@pytest.mark.parametrize("make", [_unreadable_folder, _int_table, _garbage_shards], ids=["folder", "ints", "tar"])
@pytest.mark.usefixtures("read_limit")
def test_data_with_no_readable_image_stops_with_one_line(make: Callable[[Path], Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    source = make(tmp_path)
    assert main(["-q", "train", *_sets(tmp_path, source, "data.batch_size=2")]) == 2
    line = _one_error_line(capsys)
    assert f"no readable training images in {source}: " in line and "unreadable in a row" in line, line


def test_a_single_readable_image_among_unreadable_ones_still_trains(tmp_path: Path) -> None:
    # Each epoch holds the readable image, so no whole pass is dropped: a dropped batch alone is no error.
    root = _unreadable_folder(tmp_path)
    _png(root / "good.png")
    tr = Trainer(load_config(None, [o for o in _sets(tmp_path, root, "train.max_steps=3") if o != "--set"]))
    fit(tr)
    assert tr.step == 3 and tr.batches_done > 3


def test_two_processes_with_no_readable_image_stop_together(tmp_path: Path) -> None:
    root = _unreadable_folder(tmp_path)
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "klvae.cli.main", "-q", "train", *_sets(tmp_path, root)],
                             stdout=out, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: torchrun then stops the ranks it started (each in a session of its own).
            p.terminate()
            p.wait(timeout=60)
            pytest.fail("2 processes on unreadable data did not stop within 60 s")
    err = log.read_text()
    assert p.returncode != 0
    assert err.count(f"klvae: error: no readable training images in {root}: ") == 2, err[-2000:]


# ---- 2. a PatchGAN critic that cannot run at the resolution ---------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    # "Expected more than 1 value per channel" at step 2 (BatchNorm over a 1x1 map).
    (("data.resolution=16", "loss.disc_start=1"),
     r"data\.resolution 16 is too small for loss\.disc_num_layers 3: .*at least 24"),
    # "Kernel size can't be greater than actual input size" at disc_start.
    (("data.resolution=64", "loss.disc_num_layers=5"),
     r"data\.resolution 64 is too small for loss\.disc_num_layers 5: .*at least 96"),
    (("loss.disc_num_layers=1000000",), r"loss\.disc_num_layers 1000000: .*a resolution above"),
    # Tried to allocate 192 GB.
    (("loss.disc_ndf=1000000000",), rf"loss\.disc_ndf must be at most {MAX_DISC_NDF} .*got 1000000000"),
    (("loss.disc_in_channels=4",), r"loss\.disc_in_channels must be 3"),
])
def test_a_critic_that_cannot_run_is_refused_by_the_config(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(KlvaeError, match=message) as e:
        load_config(None, ["data.train=x", "model.preset=tiny", "loss.preset=ldm", *overrides])
    assert "\n" not in str(e.value)


def test_the_critic_checks_only_apply_when_the_critic_is_used() -> None:
    base = ["data.train=x", "model.preset=tiny", "loss.preset=ldm"]
    load_config(None, [*base, "data.resolution=24"])  # 24 / 8 - 2 = 1 patch: the smallest that runs
    for off in ("loss.disc_weight=0", "loss.disc_factor=0"):
        load_config(None, [*base, "data.resolution=16", "loss.disc_ndf=1000000000", off])


def test_a_critic_too_deep_for_the_resolution_fails_before_any_work(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sets = _sets(tmp_path, tmp_path, "loss.preset=ldm", "data.resolution=16", "loss.disc_start=1")
    assert main(["train", *sets]) == 2
    assert "loss.disc_num_layers" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---- 3. resuming from an optimiser state that does not fit ----------------------------------------------
@pytest.fixture(scope="module")
def step1(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """A tiny run's overrides and its checkpoint after one step (so AdamW has its moments)."""
    tmp = tmp_path_factory.mktemp("step1")
    _png(tmp / "a.png", 1)
    _png(tmp / "b.png", 2)
    cfg = [o for o in _sets(tmp, tmp, "train.max_steps=1") if o != "--set"]
    tr = Trainer(load_config(None, cfg))
    fit(tr)
    path = tmp / "run" / "checkpoints" / "step_00000001.pt"
    assert path.is_file()
    return cfg, path


def _exp_avg_of_wrong_shape(opt: dict[str, Any]) -> None:
    opt["state"][0]["exp_avg"] = torch.zeros(3)


def _one_beta(opt: dict[str, Any]) -> None:
    opt["param_groups"][0]["betas"] = (5.0,)


def _beta_out_of_range(opt: dict[str, Any]) -> None:
    opt["param_groups"][0]["betas"] = (5.0, 0.9)


def _lr_as_text(opt: dict[str, Any]) -> None:
    opt["param_groups"][0]["lr"] = "fast"


def _no_eps(opt: dict[str, Any]) -> None:
    del opt["param_groups"][0]["eps"]


def _step_of_two_values(opt: dict[str, Any]) -> None:
    opt["state"][0]["step"] = torch.zeros(2)


def _no_second_moment(opt: dict[str, Any]) -> None:
    del opt["state"][0]["exp_avg_sq"]


def _state_for_no_parameter(opt: dict[str, Any]) -> None:
    opt["state"][10**6] = opt["state"][0]


def _nan_first_moment(opt: dict[str, Any]) -> None:
    opt["state"][0]["exp_avg"].view(-1)[0] = float("nan")


def _negative_second_moment(opt: dict[str, Any]) -> None:
    opt["state"][0]["exp_avg_sq"].view(-1)[0] = -1.0


@pytest.mark.parametrize(("tamper", "message"), [
    (_exp_avg_of_wrong_shape, r"state\[0\] 'exp_avg' has shape \[3\] for a parameter of shape \[\d+(, \d+)*\]"),
    (_one_beta, r"param_groups\[0\] betas is \(5\.0,\), not like this optimiser's \(0\.5, 0\.9\)"),
    (_beta_out_of_range, r"param_groups\[0\] betas are \(5\.0, 0\.9\), not in \[0, 1\)"),
    (_lr_as_text, r"param_groups\[0\] lr is 'fast'"),
    (_no_eps, r"param_groups\[0\] lacks eps"),
    (_step_of_two_values, r"state\[0\] step is tensor\(\[0\., 0\.\]\), not a count"),
    (_no_second_moment, r"state\[0\] lacks exp_avg_sq"),
    (_state_for_no_parameter, r"state has an entry 1000000 for no parameter"),
    (_nan_first_moment, r"state\[0\] 'exp_avg' holds NaN or inf"),  # every update of the parameter NaN
    (_negative_second_moment, r"state\[0\] 'exp_avg_sq' holds negative values"),
], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_resume_refuses_an_optimiser_state_that_does_not_fit(
        tamper: Callable[[dict[str, Any]], None], message: str, step1: tuple[list[str], Path], tmp_path: Path) -> None:
    cfg, good = step1
    state = torch.load(good, weights_only=True)
    tamper(state["opt_ae"])
    bad = tmp_path / "step_00000001.pt"
    torch.save(state, bad)
    tr = Trainer(load_config(None, cfg))
    with pytest.raises(KlvaeError, match=r"cannot resume from .*step_00000001\.pt: malformed optimiser state "
                                         r"opt_ae: " + message) as e:
        tr.resume(bad)
    assert "\n" not in str(e.value)


def test_the_train_command_refuses_a_bad_optimiser_state_in_one_line(
        step1: tuple[list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, good = step1
    state = torch.load(good, weights_only=True)
    _exp_avg_of_wrong_shape(state["opt_ae"])
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    sets = [a for o in (*cfg, f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2") for a in ("--set", o)]
    assert main(["-q", "train", *sets, "--resume", str(bad)]) == 2
    assert "malformed optimiser state opt_ae" in _one_error_line(capsys)
    assert main(["-q", "train", *sets, "--resume", str(good)]) == 0  # the untouched one resumes


@pytest.mark.parametrize(("part", "key"), [("vae", "encoder.conv_in.weight"), ("loss", "logvar")])
def test_resume_refuses_a_checkpoint_whose_weights_hold_nan(part: str, key: str, step1: tuple[list[str], Path],
                                                            tmp_path: Path) -> None:
    # A run skips its non-finite steps, so only damage saves these; resumed, a short run exported NaN weights.
    cfg, good = step1
    state = torch.load(good, weights_only=True)
    state[part][key] = torch.full_like(state[part][key], float("nan"))
    bad = tmp_path / "step_00000001.pt"
    torch.save(state, bad)
    with pytest.raises(KlvaeError, match=rf"cannot resume from .*step_00000001\.pt: its {part} tensors hold NaN or "
                                         rf"inf \('{key}'\): a damaged checkpoint; resume from an earlier one$"):
        Trainer(load_config(None, cfg)).resume(bad)


# ---- 4. config values too large to quote -----------------------------------------------------------------
def _alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML that expand to 9**levels strings when read."""
    lines = ["model:", "  overrides:", "    l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, "data:", f"  train: *l{levels - 1}", ""])


def test_an_alias_bomb_is_refused_in_one_short_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bomb.yaml"
    f.write_text(_alias_bomb(6))  # 531441 values: the unfixed message quoted them all (3 MB; 9 levels: MemoryError)
    assert len(f.read_bytes()) < 500
    with pytest.raises(KlvaeError, match=r"the config expands to more than \d+ values") as e:
        load_config(f)
    assert len(str(e.value)) < 300
    assert main(["train", str(f)]) == 2
    assert len(_one_error_line(capsys)) < 300


@pytest.mark.parametrize(("override", "message"), [
    ("data.train=[" + ", ".join(["some/long/folder/name"] * 2000) + "]", r"data\.train must be str, got \['some"),
    ("data.crop=" + "c" * 100_000, r"data\.crop must be one of center, random, got 'ccc"),
    ("model.preset=" + "p" * 100_000, r"model\.preset must be one of .*, got 'ppp"),
    ("optim.betas=[" + ", ".join(["0.5"] * 5000) + "]", r"optim\.betas must be a list of 2 numbers"),
    ("loss.disc_loss=" + "w" * 100_000, r"loss\.disc_loss must be str|loss\.disc_loss must be one of"),
    ("loss.preset=" + "q" * 100_000, r"unknown loss preset 'qqq"),
    ("data.batch_size=-" + "9" * 4400, r"cannot parse the value: Exceeds the limit"),
    ("loss.x" + "k" * 100_000 + "=1", r"unknown loss field\(s\) loss\.xkkk"),
])
def test_long_config_values_are_cut_in_the_message(override: str, message: str) -> None:
    with pytest.raises(KlvaeError, match=message) as e:
        load_config(None, ["data.train=x", "model.preset=tiny", "data.resolution=32", override])
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)


def test_a_config_file_with_a_huge_int_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    f.write_text("data:\n  batch_size: " + "9" * 5000 + "\n")
    with pytest.raises(KlvaeError, match=r"cannot parse .*big\.yaml: Exceeds the limit"):
        load_config(f)
