"""Pins inputs a bug hunt of the `klvae` command found to end in an internal error or a hang instead of one
`klvae: error:` line and exit status 2: a weights file whose conv weight has too few dimensions (read for its
shapes), a plain latents file holding a nested tensor, training values beyond float32's range (`loss.logvar_init`,
`optim.lr`, `optim.disc_lr`), a `--batch-size` past sys.maxsize, and a cache manifest that is a FIFO (`cache
--verify` blocked on it), a nested tensor among a weights file's tensors or as a Playground `edm_mean`, a
quantized `edm_mean`, and training checkpoints with a non-numeric `bad_images`, a step past int64 (`--resume`) or a
non-string `config` (`--model`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import klvae
from helpers import CRITIC, cache_args, copy_cache, fifo_watchdog, files_under, noise_folder, saved_tiny_model
from klvae.cli.main import main

HUGE = str(10 ** 20)  # an int past sys.maxsize (2**63 - 1)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `klvae argv`; it must exit 2 with one `klvae: error:` line and no traceback or internal error."""
    status = main(argv)
    err = "\n".join(line for line in capsys.readouterr().err.splitlines()
                    if not line.startswith(("INFO:", "WARNING:")) and "it/s" not in line and "img/s" not in line)
    assert status == 2, (status, err)
    assert "internal error" not in err and "Traceback" not in err, err
    assert err.count("klvae: error:") == 1, err
    return err


# -- weights read for their shapes ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("tiny")
    klvae.AutoencoderKL("tiny-f8").save_pretrained(folder)
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize(("key", "shape"), [
    ("encoder.conv_in.weight", (3,)),  # infer_architecture reads its shape[1]
    ("decoder.conv_in.weight", (3,)),
    ("encoder.down_blocks.0.resnets.0.conv1.weight", ()),  # shape[0] of a 0-d tensor
])
def test_a_single_weights_file_with_a_conv_weight_of_too_few_dimensions_is_a_bad_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_weights: dict[str, torch.Tensor], key: str,
        shape: tuple[int, ...]) -> None:
    # Was: `klvae: internal error: IndexError: tuple index out of range` while inferring the config.
    weights = tmp_path / "vae.safetensors"
    save_file({**tiny_weights, key: torch.zeros(shape)}, str(weights))
    err = _error(capsys, ["info", "--model", str(weights)])
    assert "vae.safetensors" in err or key in err, err


def test_every_weight_a_scalar_is_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             tiny_weights: dict[str, torch.Tensor]) -> None:
    weights = tmp_path / "scalars.safetensors"
    save_file({k: torch.zeros(()) for k in tiny_weights}, str(weights))
    _error(capsys, ["info", "--model", str(weights)])


def test_a_diffusers_folder_with_a_conv_weight_of_too_few_dimensions_is_a_bad_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_weights: dict[str, torch.Tensor]) -> None:
    # With a config.json the shapes are checked against it (weights.infer.check_fits): the same IndexError.
    model = saved_tiny_model(tmp_path / "m")
    weights = model / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    sd["encoder.down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(())
    save_file(sd, str(weights))
    _error(capsys, ["info", "--model", str(model)])


def test_training_from_a_weights_file_with_a_conv_weight_of_too_few_dimensions_is_one_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_weights: dict[str, torch.Tensor]) -> None:
    weights = tmp_path / "vae.safetensors"
    save_file({**tiny_weights, "encoder.conv_in.weight": torch.zeros(3)}, str(weights))
    config = _train_config(tmp_path)
    _error(capsys, ["train", str(config), "--set", f"model.pretrained={weights}"])
    assert not (tmp_path / "run").exists()


def test_a_nested_tensor_among_the_weights_is_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        tiny_weights: dict[str, torch.Tensor]) -> None:
    # Sparse and meta tensors are refused by name (weights.read); a nested one was an internal error (its sizes).
    for name, key in (("weight.pt", "encoder.conv_in.weight"), ("extra.pt", "extra")):
        torch.save({**tiny_weights, key: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])},
                   tmp_path / name)
        err = _error(capsys, ["info", "--model", str(tmp_path / name)])
        assert name in err, err


@pytest.mark.parametrize("kind", ["quantized", "nested"])
def test_odd_edm_statistics_in_a_full_checkpoint_are_no_internal_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_weights: dict[str, torch.Tensor], kind: str) -> None:
    # Playground v2.5's edm_mean/edm_std beside the VAE (weights.infer.with_edm_stats): statistics of the wrong
    # length are ignored with a warning; these were internal errors (a quantized tensor's .double(), a nested one's
    # sizes). Ignored with a warning or refused in one line, either is fine.
    mean = (torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8) if kind == "quantized"
            else torch.nested.nested_tensor([torch.zeros(2), torch.zeros(2)]))
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**{f"first_stage_model.{k}": v for k, v in tiny_weights.items()},
                               "edm_mean": mean, "edm_std": torch.ones(4)}}, ckpt)
    status = main(["info", "--model", str(ckpt)])
    err = capsys.readouterr().err
    assert status in (0, 2) and "internal error" not in err, (status, err)


# -- klvae training checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A klvae training checkpoint of one step of the tiny run (_train_config's)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    assert main(["-q", "train", str(_train_config(tmp)), "--set", "train.max_steps=1"]) == 0
    state: dict[str, object] = torch.load(tmp / "run" / "checkpoints" / "step_00000001.pt", weights_only=True)
    return state


@pytest.mark.parametrize("change", [{"bad_images": "x"}, {"step": 10 ** 30}])
def test_resuming_from_a_checkpoint_with_a_malformed_count_is_one_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: dict[str, object],
        change: dict[str, object]) -> None:
    # bad_images: int('x') in Trainer.load_state_dict; step: TensorBoard's purge_step, after making train.out_dir.
    ckpt = tmp_path / "step.pt"
    torch.save({**checkpoint, **change}, ckpt)
    _error(capsys, ["train", str(_train_config(tmp_path)), "--set", "train.max_steps=2", "--resume", str(ckpt)])
    assert not (tmp_path / "run").exists(), files_under(tmp_path / "run")


def test_a_training_checkpoint_whose_config_is_no_string_loads_as_a_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: dict[str, object]) -> None:
    # weights.read reads its config for train.export_ema and caught bad JSON, but not json.loads(5)'s TypeError.
    ckpt = tmp_path / "step.pt"
    torch.save({**checkpoint, "config": 5}, ckpt)
    status = main(["info", "--model", str(ckpt)])
    err = capsys.readouterr().err
    assert status in (0, 2) and "internal error" not in err, (status, err)


# -- plain latents ----------------------------------------------------------------------------------------------

def test_a_nested_tensor_in_a_plain_latents_file_is_refused_in_one_line(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Was: `klvae: internal error: RuntimeError: Internal error: NestedTensorImpl doesn't support sizes.`
    latents = tmp_path / "nested.pt"
    torch.save(torch.nested.nested_tensor([torch.randn(4, 2, 2), torch.randn(4, 2, 3)]), latents)
    out = tmp_path / "decoded"
    err = _error(capsys, ["decode", str(latents), "-o", str(out)])
    assert "nested.pt" in err
    assert not out.exists()


# -- training values beyond float32 -----------------------------------------------------------------------------

def _train_config(tmp: Path) -> Path:
    """A tiny MSE run on four 24x24 noise images at 16 px, two steps on the CPU, out_dir tmp/run."""
    images = noise_folder(tmp / "images", 4, hw=(24, 24))
    config = tmp / "train.json"  # JSON is YAML
    config.write_text(json.dumps({
        "model": {"preset": "tiny"},
        "data": {"train": str(images), "resolution": 16, "batch_size": 2, "num_workers": 0},
        "loss": {"preset": "mse"},
        "optim": {"grad_clip": 0},
        "train": {"device": "cpu", "max_steps": 2, "out_dir": str(tmp / "run"), "val_lpips": False},
    }))
    return config


@pytest.mark.parametrize("sets", [
    ("loss.logvar_init=1e300",),  # torch.full((), 1e300) in float32: "value cannot be converted ... overflow"
    ("loss.logvar_init=-1e39",),
    ("optim.lr=1e300",),  # failed inside AdamW's first step, the run folder already made
    ("optim.lr=3.5e38",),
    ("optim.disc_lr=1e300", *CRITIC, "loss.disc_start=0"),
])
def test_a_training_value_beyond_float32_is_a_config_error_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: tuple[str, ...]) -> None:
    config = _train_config(tmp_path)
    argv = ["train", str(config)]
    for s in sets:
        argv += ["--set", s]
    err = _error(capsys, argv)
    assert sets[0].split("=")[0] in err, err  # names the field, as every config error does
    assert not (tmp_path / "run").exists(), files_under(tmp_path / "run")


# -- --batch-size past sys.maxsize ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["encode", "scale", "cache"])
def test_a_batch_size_past_sys_maxsize_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              command: str) -> None:
    # Was: `klvae: internal error: ValueError: Stop argument for islice() must be None or an integer: ...`
    data = noise_folder(tmp_path / "images", 2, hw=(16, 16))
    argv = {
        "encode": ["encode", str(data), "-o", str(tmp_path / "lat.safetensors")],
        "scale": ["scale", "--data", str(data), "--resolution", "16"],
        "cache": ["cache", "--data", str(data), "-o", str(tmp_path / "cache"), "--resolution", "16",
                  "--num-workers", "0"],
    }[command]
    err = _error(capsys, [*argv, "--device", "cpu", "--batch-size", HUGE])
    assert "--batch-size" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# -- a cache whose manifest is a FIFO ---------------------------------------------------------------------------

def test_cache_verify_does_not_block_on_a_manifest_that_is_a_fifo(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Images, devices and FIFOs among the inputs are never opened; a manifest that is one blocked `cache --verify`
    # for good (the watchdog below unblocks it after 3 s, when it reports the cache whole: exit status 0). A
    # manifest that is no regular file is damage: exit status 1 (damaged) or 2 (no cache), said in one line.
    model = saved_tiny_model(tmp_path / "m")
    data = noise_folder(tmp_path / "images", 2, hw=(32, 32))
    finished = tmp_path / "finished"
    assert main(cache_args(data, finished, model)) == 0
    cache = copy_cache(finished, tmp_path)
    manifest = cache / "manifest-rank000.jsonl"
    manifest.unlink()
    capsys.readouterr()
    with fifo_watchdog(manifest, after=3.0) as watchdog:
        status = main(["-q", "cache", "--verify", "-o", str(cache)])
    assert not watchdog["fired"], "cache --verify blocked on the FIFO"
    err = capsys.readouterr().err
    assert status in (1, 2) and "internal error" not in err, (status, err)
    assert "manifest-rank000.jsonl" in err, err
