"""Pins what a mutation audit of the train, cache/scale and eval commands found untested: train's refusal of a
folder holding only an earlier run's samples, --print-config's field order and the summary line's 4 significant
digits; cache --verify's message when a copy without manifests is asked to --repair; scale's refusal of data without
images, its rounding of the factors it prints and saves (six decimals, six significant digits below 0.1), --no-shift,
the model's own factors in its line and the documented defaults of cache, scale and eval; and eval's per-model
option broadcast, report column names for a repeated model, the report-folder check that counts only example
PNGs, which model a load error names, the speed levers reaching the models, `~` in a named weights file, the
--no-* flag names and the printed summary (digits, LPIPS, rFID, skipped images, failures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import one_error_line, rgb_image
from klvae.cli import evaluate as eval_cli
from klvae.cli.main import build_parser, main
from klvae.errors import KlvaeError, flag

RECIPE = Path(__file__).parents[2] / "recipes" / "demo" / "train.yaml"


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- train


def test_a_folder_holding_only_an_earlier_runs_samples_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    sets = [f"train.out_dir={out}", f"data.train={tmp_path / 'none'}", f"data.val={tmp_path / 'none'}"]
    assert main(["train", str(RECIPE), *(a for s in sets for a in ("--set", s))]) == 2
    assert f"train.out_dir {out} already holds a run (samples)" in _err(capsys)


def test_print_config_keeps_the_configs_field_order(capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.training.config import load_config

    assert main(["train", "--print-config", "--set", "data.train=x"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    resolved = load_config(None, ["data.train=x"]).resolved_dict()
    assert list(printed) == list(resolved) != sorted(resolved)
    section = next(k for k, v in resolved.items() if isinstance(v, dict) and list(v) != sorted(v))
    assert list(printed[section]) == list(resolved[section])


def test_train_summary_line_shows_4_significant_digits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import klvae.distributed
    import klvae.training.loop
    import klvae.training.trainer
    from klvae.cli import train as train_cli

    class FakeTrainer:
        def __init__(self, cfg: object, resumed: object = None) -> None:
            self.step = 7
            self.dist = klvae.distributed.DistInfo()
            self.out, self.device = Path(cfg.train.out_dir), torch.device("cpu")  # type: ignore[attr-defined]

    monkeypatch.setattr(train_cli, "check_inputs", lambda cfg, resume: None)
    monkeypatch.setattr(klvae.training.trainer, "Trainer", FakeTrainer)
    monkeypatch.setattr(klvae.training.loop, "fit", lambda trainer: {"psnr": 31.98765, "loss": 0.123456})
    monkeypatch.setattr(klvae.distributed, "shutdown", lambda dist: None)
    out = tmp_path / "run"
    assert main(["train", "--set", "data.train=x", "--set", f"train.out_dir={out}"]) == 0
    assert capsys.readouterr().out == f"trained to step 7: loss 0.1235, psnr 31.99; weights in {out}/final\n"


# ---------------------------------------------------------------- cache --verify


@pytest.fixture(scope="module")
def cache_without_manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished cache (demo model, 4 images, shards of 2) with a damaged shard and no manifest files."""
    root = tmp_path_factory.mktemp("nomanifest")
    for i in range(4):
        rgb_image(root / "data" / f"img{i}.png", 24, 24, seed=i)
    out = root / "latents"
    assert (
        main(
            [
                "-q",
                "cache",
                "--data",
                str(root / "data"),
                "-o",
                str(out),
                "--resolution",
                "16",
                "--shard-size",
                "2",
                "--num-workers",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 2
    shards[0].write_bytes(shards[0].read_bytes()[:100])
    for m in out.glob("manifest-rank*.jsonl"):
        m.unlink()
    return out


def test_verify_repair_of_a_copy_without_manifests_says_repair_cannot_drop(
    cache_without_manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = cache_without_manifests
    capsys.readouterr()
    assert main(["-q", "cache", "--verify", "--repair", "-o", str(out)]) == 1
    line = capsys.readouterr().out
    assert "; this copy has no manifests, so --repair cannot drop them: encode their rows again" in line, line
    assert main(["-q", "cache", "--verify", "-o", str(out)]) == 1
    line = capsys.readouterr().out
    assert "; this copy has no manifests: encode their rows again" in line and "cannot drop" not in line, line


# ---------------------------------------------------------------- scale


def _fake_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    from klvae.latents import scale

    factors = {
        "scaling_factor": 0.01234567,
        "shift_factor": 1.2345678,
        "std": 81.0,
        "images": 2,
        "skipped": 0,
        "latents_mean": [0.1234567, -1.2345678, 0.0, 2.0],
        "latents_std": [0.01234567, 1.2345678, 1.0, 0.5],
    }
    monkeypatch.setattr(scale, "estimate_factors", lambda *a, **k: factors)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_scale_rounds_the_factors_it_prints_and_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_factors(monkeypatch)
    rgb_image(tmp_path / "data" / "a.png")
    capsys.readouterr()
    assert main(["-q", "scale", "--data", str(tmp_path / "data"), "--save", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "scaling_factor 0.0123457  shift_factor 1.234568  (latent std 81 over 2 images, skipped 0 "
        "unreadable; the model's: scaling_factor 0.18215)"
    )
    assert out[1] == f"saved to {tmp_path / 'm'}"
    cfg = _config(tmp_path / "m")
    assert (cfg["scaling_factor"], cfg["shift_factor"]) == (0.0123457, 1.234568)


def test_scale_no_shift_leaves_shift_factor_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_factors(monkeypatch)
    rgb_image(tmp_path / "data" / "a.png")
    assert main(["-q", "scale", "--data", str(tmp_path / "data"), "--no-shift", "--save", str(tmp_path / "m")]) == 0
    assert "scaling_factor 0.0123457  shift_factor None  (" in capsys.readouterr().out
    cfg = _config(tmp_path / "m")
    assert (cfg["scaling_factor"], cfg["shift_factor"]) == (0.0123457, None)


def test_scale_per_channel_rounds_each_mean_and_std(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_factors(monkeypatch)
    rgb_image(tmp_path / "data" / "a.png")
    capsys.readouterr()
    assert main(["-q", "scale", "--data", str(tmp_path / "data"), "--per-channel", "--save", str(tmp_path / "m")]) == 0
    means, stds = [0.123457, -1.234568, 0.0, 2.0], [0.0123457, 1.234568, 1.0, 0.5]
    assert capsys.readouterr().out.startswith(f"latents_mean {means}  latents_std {stds}  (latent std 81 ")
    cfg = _config(tmp_path / "m")
    assert (cfg["latents_mean"], cfg["latents_std"], cfg["scaling_factor"]) == (means, stds, 1.0)


def test_scale_refuses_a_data_folder_without_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no pictures here")
    assert main(["scale", "--data", str(tmp_path / "data")]) == 2
    assert _err(capsys) == f"klvae: error: no images in {tmp_path / 'data'}"


def test_documented_defaults_of_cache_scale_and_eval() -> None:
    parser = build_parser()
    c = parser.parse_args(["cache", "--data", "d", "-o", "o"])
    assert (c.resolution, c.shard_size, c.num_workers, c.seed, c.store) == (512, 256, 2, 0, "moments")
    s = parser.parse_args(["scale", "--data", "d"])
    assert (s.limit, s.resolution) == (256, 256)
    e = parser.parse_args(["eval", "--data", "d", "-o", "o"])
    assert (e.examples, e.crop, e.resolution) == (4, "center", None)


# ---------------------------------------------------------------- eval


def test_per_model_options_broadcast_one_value() -> None:
    assert eval_cli._per_model(["a"], 3, "--config") == ["a", "a", "a"]
    assert eval_cli._per_model(None, 2, "--config") == [None, None]
    assert eval_cli._per_model(["a", "b"], 2, "--config") == ["a", "b"]
    with pytest.raises(KlvaeError, match="--config given 2 times for 3 models"):
        eval_cli._per_model(["a", "b"], 3, "--config")


def test_a_repeated_model_gets_numbered_report_columns() -> None:
    assert eval_cli._model_names(["a", "b", "a", "a"]) == ["a", "b", "a #2", "a #3"]
    assert eval_cli._model_names(["a #2", "a", "a"]) == ["a #2", "a", "a #3"]


def test_report_check_counts_only_example_pngs_in_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("mine")
    eval_cli.check_report_output(tmp_path, overwrite=False)  # no earlier report here


def test_the_no_flags_name_lpips_and_fid_only_when_off() -> None:
    assert eval_cli._flag("fid", False) == "--no-fid"
    assert eval_cli._flag("lpips", False) == "--no-lpips"
    assert eval_cli._flag("lpips", True) == flag("lpips", True)
    assert eval_cli._flag("examples", False) == flag("examples", False)


def _fake_eval(monkeypatch: pytest.MonkeyPatch) -> list:
    from klvae.evaluation import evaluate

    seen: list = []
    monkeypatch.setattr(evaluate, "build_metric_nets", lambda device, **kw: seen.append(kw) or {})
    monkeypatch.setattr(
        evaluate,
        "run_evaluation",
        lambda models, *rest: seen.append(models) or {"models": {}, "images": {"evaluated": 2, "skipped": 0}},
    )
    return seen


def test_a_load_error_of_one_of_several_models_names_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from klvae.model.autoencoder import AutoencoderKL

    _fake_eval(monkeypatch)
    real = AutoencoderKL.from_pretrained

    def load(spec: str, **kw: object) -> object:
        if spec == "bad":
            raise KlvaeError("weights do not fit the config")
        if spec == "gone":
            raise KlvaeError("gone: no such model")
        return real(spec, **kw)

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", load)
    rgb_image(tmp_path / "data" / "a.png")
    base = ["-q", "eval", "--data", str(tmp_path / "data"), "--device", "cpu", "--no-lpips", "--no-fid"]
    capsys.readouterr()
    assert main([*base, "-o", str(tmp_path / "r1"), "-m", "demo", "-m", "bad"]) == 2
    assert _err(capsys) == "klvae: error: --model bad: weights do not fit the config"
    assert main([*base, "-o", str(tmp_path / "r2"), "-m", "demo", "-m", "gone"]) == 2
    assert _err(capsys) == "klvae: error: gone: no such model"


def _eval_cpu(tmp_path: Path, out: str, *extra: str) -> list[str]:
    """`klvae -q eval` of tmp_path/data on the CPU into tmp_path/out, with `extra` options."""
    return ["-q", "eval", "--data", str(tmp_path / "data"), "-o", str(tmp_path / out), "--device", "cpu", *extra]


def test_the_speed_levers_reach_each_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import klvae.inference

    _fake_eval(monkeypatch)
    levers: list = []
    monkeypatch.setattr(
        klvae.inference,
        "optimize_for_inference",
        lambda vae, dtype, speed: levers.append((speed.compile, speed.fused_norm)) or vae,
    )
    rgb_image(tmp_path / "data" / "a.png")
    assert main(_eval_cpu(tmp_path, "r", "--compile", "--no-lpips", "--no-fid")) == 0
    assert main(_eval_cpu(tmp_path, "r2", "--no-fused-norm", "--no-lpips", "--no-fid")) == 0
    assert levers == [(True, None), (False, False)]


def test_a_named_weights_file_under_home_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_eval(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "vgg.pth").write_bytes(b"x")
    rgb_image(tmp_path / "data" / "a.png")
    assert main(_eval_cpu(tmp_path, "r", "--lpips-vgg", "~/vgg.pth", "--no-fid")) == 0
    assert seen[0]["lpips_vgg"] == "~/vgg.pth"


def _model(psnr: float | None, **extra: object) -> dict:
    return {"psnr": {"mean": psnr}, "ssim": {"mean": 0.87654321}, **extra}


def test_eval_summary_line_of_identical_reconstructions_reads_inf(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # summary.json holds PSNR +inf as null: over scored images that is inf, over none (every image failed) n/a.
    summary = {"models": {"same": {"psnr": {"mean": None, "n": 3}, "ssim": {"mean": 1.0, "n": 3}},
                          "broken": {"psnr": {"mean": None, "n": 0}, "ssim": {"mean": None, "n": 0}}},
               "images": {"evaluated": 3, "skipped": 0}}
    eval_cli._print_summary(summary, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["same: PSNR inf dB, SSIM 1.0000", "broken: PSNR n/a dB, SSIM n/a"]


def test_eval_summary_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = {
        "models": {
            "a": _model(31.98765, lpips={"mean": 0.123456}, rfid={"value": 1.23456, "n": 3, "reliable": False}),
            "b": _model(None, rfid={"value": None, "n": 0}),
            "c": _model(20.0, failed=1, n=2, failed_items=[{"id": "x.png", "error": "NaN output"}]),
        },
        "images": {"evaluated": 3, "skipped": 2},
    }
    eval_cli._print_summary(summary, tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "a: PSNR 31.99 dB, SSIM 0.8765, LPIPS 0.1235, rFID 1.235 (n=3 < 2048: unreliable)",
        "b: PSNR n/a dB, SSIM 0.8765",
        "c: PSNR 20.00 dB, SSIM 0.8765",
        "  c failed on 1 of 3 images (x.png: NaN output); its scores are over the other 2",
        f"3 images, 2 skipped; report: {tmp_path / 'index.html'}",
    ]
