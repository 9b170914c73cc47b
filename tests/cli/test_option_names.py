"""Errors name options in the caller's language: build_cache's and the evaluation API's keywords from Python,
`klvae cache` / `klvae eval` flags on the command line (resume refusals, weights left out or unreadable)."""

import json
from pathlib import Path

import pytest
import torch

import klvae
from helpers import block_metric_downloads, noise_folder, one_error_line, saved_tiny_model
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.evaluation import EvalOptions, build_metric_nets, run_evaluation
from klvae.latents import OptionError, build_cache

OPTIONS = {"resolution": 64, "flip": True, "shard_size": 4, "batch_size": 2, "num_workers": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("data"), 2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, data: Path) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(klvae.AutoencoderKL.from_pretrained(model_dir), data, out, **OPTIONS)
    return out


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(("change", "keywords"), [
    ({"resolution": 128}, "made with resolution=64 (this run: resolution=128)"),
    ({"flip": False}, "made with flip=True (this run: flip=False)"),
    ({"buckets": True}, "made with buckets=False (this run: buckets=True)"),
    ({"store": "scaled"}, "made with store='moments' (this run: store='scaled')"),
])
def test_a_refused_resume_names_build_cache_keywords(model_dir: Path, data: Path, cache: Path,
                                                     change: dict[str, object], keywords: str) -> None:
    before = sorted(p.name for p in cache.iterdir())
    with pytest.raises(OptionError) as e:
        build_cache(klvae.AutoencoderKL.from_pretrained(model_dir), data, cache, **{**OPTIONS, **change})
    assert keywords in str(e.value) and "--" not in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(p.name for p in cache.iterdir()) == before


@pytest.mark.parametrize(("change", "flags"), [
    (["--resolution", "128", "--flip"], "made with --resolution 64 (this run: --resolution 128)"),
    (["--resolution", "64"], "made with --flip (this run: no --flip)"),
    (["--resolution", "64", "--flip", "--buckets"], "made with no --buckets (this run: --buckets)"),
    (["--resolution", "64", "--flip", "--store", "scaled"], "made with --store moments (this run: --store scaled)"),
])
def test_a_refused_resume_names_klvae_cache_flags(model_dir: Path, data: Path, cache: Path, change: list[str],
                                                  flags: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _cli_error(capsys, "-q", "cache", "--data", str(data), "-o", str(cache), "--model", str(model_dir),
                      "--num-workers", "0", "--device", "cpu", *change)
    assert flags in line and "=" not in line, line


def test_option_error_is_exported_and_still_importable_from_options() -> None:
    from klvae import errors
    from klvae.latents import options

    assert OptionError is options.OptionError is errors.OptionError
    assert issubclass(OptionError, KlvaeError)


def test_eval_options_name_fields_in_python_and_flags_on_the_command_line(
    model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(OptionError, match=r"^batch_size must be at least 1, got 0$"):
        run_evaluation({"m": klvae.AutoencoderKL.from_pretrained(model_dir)}, data, tmp_path / "r",
                       EvalOptions(batch_size=0))
    with pytest.raises(OptionError, match=r"^crop must be one of center, none, got 'middle'$"):
        EvalOptions(crop="middle").check()
    line = _cli_error(capsys, "eval", "--model", str(model_dir), "--data", str(data), "-o", str(tmp_path / "r"),
                      "--batch-size", "0")
    assert line.endswith("--batch-size must be at least 1, got 0"), line


def test_metric_weights_left_out_name_build_metric_nets_keywords(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    block_metric_downloads(monkeypatch, tmp_path)
    nets = build_metric_nets(torch.device("cpu"))
    assert nets.lpips is None and nets.inception is None
    assert "pass lpips_vgg='<file>'" in nets.left_out["lpips"], nets.left_out
    assert "pass inception_weights='<file>'" in nets.left_out["rfid"], nets.left_out
    assert not any("--" in why for why in nets.left_out.values()), nets.left_out
    off = build_metric_nets(torch.device("cpu"), lpips=False, fid=False).left_out
    assert off == {"lpips": "disabled (lpips=False)", "rfid": "disabled (fid=False)"}
    missing = tmp_path / "vgg.pth"
    with pytest.raises(KlvaeError, match=r"^inception_weights='.*vgg\.pth': no such file$"):
        build_metric_nets(torch.device("cpu"), lpips=False, inception_weights=missing)
    torch.save([1, 2], missing)
    with pytest.raises(KlvaeError, match=r"^lpips_vgg='.*vgg\.pth' holds a list, not a state dict$"):
        build_metric_nets(torch.device("cpu"), lpips_vgg=str(missing), fid=False)


def test_metric_weights_left_out_name_klvae_eval_flags(model_dir: Path, data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    block_metric_downloads(monkeypatch, tmp_path)
    report = tmp_path / "report"
    assert main(["-q", "eval", "--model", str(model_dir), "--data", str(data), "-o", str(report), "--resolution",
                 "32", "--examples", "0", "--no-lpips", "--device", "cpu"]) == 0
    left_out = json.loads((report / "summary.json").read_text())["left_out"]
    assert left_out["lpips"] == "disabled (--no-lpips)"
    assert "pass --inception-weights <file>" in left_out["rfid"] and "=" not in left_out["rfid"], left_out
