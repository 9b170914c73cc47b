"""Each command's refusals and defaults, pinned by message, exit status and files: noise's refusals (--num-steps 0,
--zero-terminal-snr on flow or one step, --shift off flow, --seed -1), a sigma below 1 never printed as 1, --shift
auto in any case following an SD3 VAE, the sheet's white label strip and tile places; cache's --repair without
--verify and --verify under torchrun refused, data without images refused (cache, eval), a mismatched cache resume
refused before the model loads, cache's and scale's defaults (--resolution 512, --shard-size 256, --limit 256), a std
below 0.1 kept to six significant digits, scale's unreadable tar shards named; eval's once-for-all --subfolder (and a
count that fits no model count), "#2" for a model given twice, --model named in a load error, --image-column, the demo
default, --crop none with --resolution and a missing --lpips-vgg refused before any model, a failed model's note with
exit status 1; train's refusals (a folder holding final/, an out_dir that is a file, an upper-case config as
--resume), a bad --resume file refused before the trainer, data.val checked on rank 0 only; convert's outputs of the
wrong kind or holding the model, and --dtype in any case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import one_error_line, rgb_image, saved_tiny_model
from klvae.cli.main import main
from klvae.errors import KlvaeError


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(("extra", "message"), [
    (["--num-steps", "0"], "--num-steps must lie in [1, 100000], got 0"),
    (["--schedule", "flow", "--zero-terminal-snr"],
     "--zero-terminal-snr rescales a beta schedule; the flow schedule ends in pure noise already"),
    (["--zero-terminal-snr", "--num-steps", "1", "--steps", "0"], "--zero-terminal-snr needs --num-steps 2 or more"),
    (["--shift", "3"], "--shift shifts the flow schedule, not scaled_linear; add --schedule flow"),
    (["--seed", "-1"], f"--seed must be between 0 and {2**63 - 1}, got -1"),
])
def test_noise_refuses_options_that_do_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                               message: str) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    assert main(["noise", img, "-o", str(tmp_path / "s.png"), *extra]) == 2
    assert message in _err(capsys)
    assert not (tmp_path / "s.png").exists()


def test_noise_never_prints_a_sigma_below_1_as_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    argv = ["-q", "noise", img, "-o", str(tmp_path / "s.png"), "--schedule", "flow", "--num-steps", "100000",
            "--steps", "99999", "100000"]
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith("sigma = 0.99999, 1)\n")


def test_noise_shift_auto_follows_an_sd3_vae_whatever_its_case(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    sd3 = klvae.get_preset("sd3")
    model = saved_tiny_model(tmp_path / "m", latent_channels=16, scaling_factor=sd3.scaling_factor,
                             shift_factor=sd3.shift_factor)
    img = str(rgb_image(tmp_path / "a.png"))
    argv = ["-q", "noise", img, "-o", str(tmp_path / "s.png"), "--model", str(model), "--schedule", "flow",
            "--shift", " Auto ", "--steps", "500"]
    assert main(argv) == 0
    assert "(flow schedule, SD3's shift 3; sigma = 0.75)" in capsys.readouterr().out


def test_noise_sheet_labels_wrap_on_narrow_tiles_and_never_cover_a_neighbours() -> None:
    """A label wider than its tile (images under ~100 pixels) used to run on over the next tile's label."""
    from klvae.cli import noise as noise_cli

    tile = Image.new("RGB", (32, 16), "grey")
    long, short = "t=999  SNR=4.04e-05", "t=0  SNR=1.4e+04"
    spilled = np.asarray(noise_cli._sheet([(long, tile), (short, tile)]))
    alone = np.asarray(noise_cli._sheet([("t=0", tile), (short, tile)]))
    assert spilled.shape == alone.shape
    assert np.array_equal(spilled[:, 32:], alone[:, 32:])  # the second label's cell holds its label alone
    strip = spilled[: spilled.shape[0] - 16, :32].min(axis=(1, 2)) < 128  # rows of the first cell with ink
    bands = np.flatnonzero(np.diff(strip.astype(int)) == 1)
    assert len(bands) == 2  # "t=999" and "SNR=4.04e-05" on lines of their own
    wide = np.asarray(noise_cli._sheet([(long, Image.new("RGB", (200, 16), "grey"))]))
    assert wide.shape[0] == 16 + 18  # wide enough: one line in the 18-pixel strip, as before


def test_noise_sheet_puts_each_tile_under_its_white_label_strip(tmp_path: Path) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    assert main(["-q", "noise", img, "-o", str(tmp_path / "s.png"), "--steps", "0", "999"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    top = sheet.shape[0] - 16
    assert sheet.shape[1:] == (32, 3) and top >= 18
    assert (sheet[0] == 255).all()  # the label strip is white above its text
    first, second = sheet[top:, :16], sheet[top:, 16:]
    assert not (second == 255).all() and not np.array_equal(first, second)


def test_cache_repair_needs_verify_and_verify_refuses_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "cache")
    assert main(["cache", "--repair", "-o", out]) == 2
    assert "--repair goes with --verify: `klvae cache --verify --repair -o CACHE`" in _err(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["cache", "--verify", "-o", out]) == 2
    assert "run `klvae cache --verify` in one process, not under torchrun" in _err(capsys)


def test_cache_refuses_a_data_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no pictures here")
    assert main(["cache", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "cache")]) == 2
    assert f"no images in {tmp_path / 'data'}" in _err(capsys)


def test_cache_and_scale_defaults_reach_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.latents import build, scale

    seen: dict[str, object] = {}

    class Done:
        ok = True

        def summary(self) -> str:
            return "done"

    def record_build(*args: object, **kwargs: object) -> Done:
        seen.update(kwargs)
        return Done()

    def record_estimate(*args: object, **kwargs: object) -> dict:
        seen["scale"] = kwargs
        return {"scaling_factor": 81.0, "shift_factor": 0.0, "std": 0.0123, "images": 1, "skipped": 0,
                "latents_mean": [0.0] * 4, "latents_std": [0.0123456789, 0.1234567, 1.23456789, 12.3456789]}

    monkeypatch.setattr(build, "build_cache", record_build)
    monkeypatch.setattr(scale, "estimate_factors", record_estimate)
    data = rgb_image(tmp_path / "data" / "a.png").parent
    assert main(["-q", "cache", "--data", str(data), "-o", str(tmp_path / "cache")]) == 0
    assert (seen["resolution"], seen["shard_size"]) == (512, 256)  # README: 512, 256 rows a shard
    assert main(["-q", "scale", "--data", str(data), "--per-channel"]) == 0
    assert (seen["scale"]["limit"], seen["scale"]["resolution"]) == (256, 256)
    # a std below 0.1 keeps six significant digits, not six decimals
    assert "latents_std [0.0123457, 0.123457, 1.234568, 12.345679]" in capsys.readouterr().out


def test_cache_refuses_a_mismatched_resume_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.cli import latents

    model = str(saved_tiny_model(tmp_path / "m"))
    data = rgb_image(tmp_path / "data" / "a.png").parent
    base = ["-q", "cache", "--data", str(data), "-o", str(tmp_path / "c"), "--model", model, "--num-workers", "0"]
    assert main([*base, "--resolution", "16"]) == 0

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(latents, "load_model", no_model)
    capsys.readouterr()
    assert main([*base, "--resolution", "32"]) == 2
    assert "resolution" in _err(capsys)


def test_scale_names_the_unreadable_tar_shards_it_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import tarfile

    from klvae.latents import scale

    monkeypatch.setattr(scale, "estimate_factors", lambda *a, **k: {
        "scaling_factor": 0.5, "shift_factor": 0.0, "std": 2.0, "images": 1, "skipped": 0})
    shards = tmp_path / "shards"
    shards.mkdir()
    png = rgb_image(tmp_path / "x.png")
    with tarfile.open(shards / "a.tar", "w") as tar:
        tar.add(png, arcname="x.png")
    (shards / "b.tar").write_bytes(b"not a tar file at all" * 40)
    assert main(["-q", "scale", "--data", str(shards / "*.tar"), "--no-shift"]) == 1
    assert "over 1 images, skipped 0 unreadable, 1 unreadable tar shards skipped;" in capsys.readouterr().out


def test_eval_models_get_their_options_and_distinct_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.evaluation import evaluate
    from klvae.model.autoencoder import AutoencoderKL

    loaded: list[tuple[str, object, object]] = []
    runs: list[tuple[list[str], object]] = []

    def load(spec: str, subfolder: object = None, config: object = None, **kwargs: object) -> AutoencoderKL:
        loaded.append((spec, subfolder, config))
        if spec == "broken":
            raise KlvaeError("weights do not fit config 'tiny'")
        return AutoencoderKL(klvae.get_preset("tiny"))

    def record_run(models: dict, data: str, out: str, opts: object, *rest: object) -> dict:
        runs.append((list(models), opts.image_column))
        return {"models": {}, "images": {"evaluated": 1, "skipped": 0}}

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", load)
    monkeypatch.setattr(evaluate, "build_metric_nets", lambda *a, **k: {})
    monkeypatch.setattr(evaluate, "run_evaluation", record_run)
    data = str(rgb_image(tmp_path / "data" / "a.png").parent)
    base = ["-q", "eval", "--data", data, "--no-lpips", "--no-fid", "-o"]
    assert main([*base, str(tmp_path / "r1"), "-m", "x", "-m", "x", "--subfolder", "vae"]) == 0
    assert main([*base, str(tmp_path / "r2"), "--image-column", "img"]) == 0
    assert loaded == [("x", "vae", None), ("x", "vae", None), ("demo", None, None)]
    assert runs == [(["x", "x #2"], "image"), (["demo"], "img")]
    capsys.readouterr()
    assert main([*base, str(tmp_path / "r3"), "-m", "x", "-m", "broken"]) == 2
    assert "--model broken: weights do not fit config 'tiny'" in _err(capsys)
    assert main([*base, str(tmp_path / "r4"), "-m", "a", "-m", "b", "-m", "c", "--subfolder", "s", "--subfolder",
                 "t"]) == 2
    assert "--subfolder given 2 times for 3 models; give it once, or once per --model" in _err(capsys)


@pytest.mark.parametrize(("extra", "message"), [
    (["--crop", "none", "--resolution", "64"], "--resolution applies to --crop center only"),
    (["--lpips-vgg", "missing.pth"], "--lpips-vgg missing.pth: no such file"),
])
def test_eval_refuses_options_before_any_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], extra: list[str],
                                               message: str) -> None:
    from klvae.model.autoencoder import AutoencoderKL

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", None)  # a model load would fail as a TypeError
    data = str(rgb_image(tmp_path / "data" / "a.png").parent)
    assert main(["eval", "--data", data, "-o", str(tmp_path / "r"), *extra]) == 2
    assert message in _err(capsys)


def test_eval_refuses_data_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    assert main(["eval", "--data", str(tmp_path / "data"), "-o", str(tmp_path / "r")]) == 2
    assert f"--data {tmp_path / 'data'} holds no images" in _err(capsys)


def test_eval_summary_names_what_a_model_failed_on_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.evaluation import evaluate

    scores = {"psnr": {"mean": 20.0}, "ssim": {"mean": 0.5}, "n": 1, "failed": 1,
              "failed_items": [{"id": "b.png", "error": "non-finite pixels"}]}
    monkeypatch.setattr(evaluate, "build_metric_nets", lambda *a, **k: {})
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a, **k: {
        "models": {"demo": scores}, "images": {"evaluated": 2, "skipped": 0}})
    data = str(rgb_image(tmp_path / "data" / "a.png").parent)
    assert main(["-q", "eval", "--data", data, "-o", str(tmp_path / "r"), "--no-lpips", "--no-fid"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "demo: PSNR 20.00 dB, SSIM 0.5000",
        "  demo failed on 1 of 2 images (b.png: non-finite pixels); its scores are over the other 1",
        f"2 images; report: {tmp_path / 'r' / 'index.html'}"]


def _train_argv(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    recipe = Path(__file__).parents[2] / "recipes" / "demo" / "train.yaml"
    sets = [f"train.out_dir={out}", f"data.train={tmp_path / 'none'}", f"data.val={tmp_path / 'none'}"]
    return ["train", str(recipe), *(a for s in sets for a in ("--set", s)), *extra]


def test_train_refuses_a_final_model_a_file_out_dir_and_a_config_as_resume(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    assert main(_train_argv(tmp_path, out)) == 2
    assert f"train.out_dir {out} already holds a run (final)" in _err(capsys)
    (tmp_path / "file").write_text("x")
    assert main(_train_argv(tmp_path, tmp_path / "file")) == 2
    assert f"train.out_dir {tmp_path / 'file'} is a file, not a folder" in _err(capsys)
    assert main(_train_argv(tmp_path, out, "--resume", "FT.YAML")) == 2
    assert "--resume 'FT.YAML' is a config file, not a checkpoint" in _err(capsys)


def test_train_checks_a_resume_file_and_the_data_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.training import data_setup, trainer

    def no_trainer(*args: object, **kwargs: object) -> None:
        raise AssertionError("the trainer was built")

    monkeypatch.setattr(trainer, "Trainer", no_trainer)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(_train_argv(tmp_path, tmp_path / "run", "--resume", str(tmp_path / "bad.pt"))) == 2
    assert str(tmp_path / "bad.pt") in _err(capsys)
    vals: list[bool] = []

    def record(cfg: object, world: int, val: bool) -> None:
        vals.append(val)
        raise KlvaeError("checked")

    monkeypatch.setattr(data_setup, "check_train_data", record)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(_train_argv(tmp_path, tmp_path / f"run{rank}")) == 2
    assert vals == [True, False]  # only rank 0 validates, so only it needs data.val


def test_convert_refuses_outputs_of_the_wrong_kind_and_takes_any_dtype_case(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = saved_tiny_model(tmp_path / "outer" / "m")
    base = ["convert", "--model", str(model), "-o"]
    (tmp_path / "dir.safetensors").mkdir()
    assert main([*base, str(tmp_path / "dir.safetensors"), "--to", "ldm"]) == 2
    assert f"--output {tmp_path / 'dir.safetensors'} is a folder; name a file" in _err(capsys)
    (tmp_path / "plain").write_text("x")
    assert main([*base, str(tmp_path / "plain"), "--to", "diffusers", "--overwrite"]) == 2
    assert f"--output {tmp_path / 'plain'} is a file, not a folder" in _err(capsys)
    assert main([*base, str(tmp_path / "outer"), "--overwrite"]) == 2
    assert f"--output {tmp_path / 'outer'} holds the model being converted (" in _err(capsys)
    assert main(["-q", *base, str(tmp_path / "half"), "--dtype", "FP16"]) == 0
    from safetensors.torch import load_file

    (weights,) = (tmp_path / "half").glob("*.safetensors")
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}
