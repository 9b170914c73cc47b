"""Pins what a bug hunt of klvae's machine-readable outputs (JSON, JSONL, --json) found:

- validation during training that reconstructs its images exactly (flat white or black images, which the
  decoder's clamp reproduces) writes `"psnr": Infinity` into metrics.jsonl, which strict JSON readers refuse;
- a step skipped for a non-finite loss under optim.grad_accum > 1 logs `total`, `nll`, `rec`, `kl` from the
  micro-batches before the non-finite one, divided by the whole count: a finite loss of about half the real
  one, where a skipped step with one micro-batch logs none;
- `encode --sample` and `cache --store sample` stop with an internal UnicodeEncodeError on an image whose file
  name is not UTF-8 (legal on Linux: Python hands it over with lone surrogates), as the keyed noise hashes the
  name as strict UTF-8;
- eval's summary.json and `reconstruct --json` write such a name as a lone surrogate escape (`"\\udcff"`), which
  is no Unicode text: I-JSON (RFC 7493) forbids it and strict readers (Rust's serde_json) refuse the whole file,
  where metrics.csv and the logs write the byte as `\\xff`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import klvae
from helpers import block_metric_downloads, noise_folder, rgb_image, tiny_batch, tiny_train_config
from klvae.cli.main import main


def _strict(text: str) -> Any:
    """JSON parsed as strict readers do: NaN, Infinity and -Infinity are errors."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def _strings(value: Any) -> list[str]:
    """Every string (keys included) in a parsed JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _assert_unicode(doc: Any) -> None:
    for s in _strings(doc):
        s.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError


def _non_utf8(folder: Path, name: bytes) -> Path:
    """folder/name for a name of raw bytes; skips where the file system takes UTF-8 names only."""
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    try:
        path.touch()
        path.unlink()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return Path(klvae.AutoencoderKL("tiny").save_pretrained(tmp_path_factory.mktemp("model") / "tiny"))


# ---- metrics.jsonl ------------------------------------------------------------------------------------------------
def test_metrics_jsonl_stays_strict_json_when_validation_reconstructs_exactly(tmp_path: Path) -> None:
    from klvae.training.loop import fit
    from klvae.training.trainer import Trainer

    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    (tmp_path / "val").mkdir()
    for i in range(2):  # flat white: a decoder whose output saturates gives it back exactly, after the clamp
        Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "val" / f"white{i}.png")
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL("tiny")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(100.0)
    vae.save_pretrained(tmp_path / "bright")
    cfg = tiny_train_config(tmp_path, f"data.val={tmp_path / 'val'}", "train.val_lpips=false", "train.max_steps=1",
                            f"model.pretrained={tmp_path / 'bright'}", "optim.lr=1e-9")
    fit(Trainer(cfg))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    # Now: {"step": 1, "split": "val", "psnr": Infinity, "ssim": 1.0}, which jq and JSON.parse refuse.
    rows = [_strict(line) for line in lines]
    assert any(r["split"] == "val" for r in rows)


def test_a_skipped_step_logs_no_loss_made_of_part_of_its_micro_batches(tmp_path: Path) -> None:
    from klvae.training.trainer import Trainer

    (tmp_path / "images").mkdir()
    tr = Trainer(tiny_train_config(tmp_path, "optim.grad_accum=2", "train.max_nonfinite=5"))
    real, calls = tr.loss.generator_loss, []

    def second_micro_batch_nan(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        loss, logs = real(*args, **kwargs)
        calls.append(1)
        return (loss * math.nan if len(calls) == 2 else loss), logs

    tr.loss.generator_loss = second_micro_batch_nan  # type: ignore[method-assign]
    logs = tr.train_step([tiny_batch(0), tiny_batch(1)])
    assert logs["skipped"] == 1.0
    # Now: total/nll/rec/kl of the first micro-batch alone, halved (e.g. total 169.5 where a step's is ~340), logged
    # as the skipped step's loss; with one micro-batch a skipped step logs no loss at all.
    assert not {"total", "nll", "rec", "kl"} & set(logs), logs


# ---- file names that are not UTF-8 ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["encode", "cache"])
def test_sampled_latents_of_an_image_whose_name_is_not_utf8(tmp_path: Path, tiny_model: Path, command: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    rgb_image(data / "plain.png", 16, 16, 0)
    shutil.copy(data / "plain.png", _non_utf8(data, b"caf\xe9.png"))  # a Latin-1 name on a UTF-8 system
    if command == "encode":
        argv = ["encode", str(data), "-o", str(tmp_path / "z.safetensors"), "--sample"]
    else:
        argv = ["cache", "--data", str(data), "-o", str(tmp_path / "cache"), "--store", "sample", "--resolution",
                "16", "--num-workers", "0"]
    # Now: exit 1, "klvae: internal error: UnicodeEncodeError: 'utf-8' codec can't encode character '\udce9'".
    assert main(["-q", *argv, "--model", str(tiny_model), "--device", "cpu"]) == 0, capsys.readouterr().err


def test_eval_summary_json_writes_a_name_that_is_not_utf8_as_unicode(tmp_path: Path, tiny_model: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    block_metric_downloads(monkeypatch, tmp_path)
    data = tmp_path / "data"
    rgb_image(data / "plain.png", 32, 32, 0)
    _non_utf8(data, b"bad\xff.png").write_bytes(b"not an image")
    report = tmp_path / "report"
    assert main(["-q", "eval", "--data", str(data), "--model", str(tiny_model), "-o", str(report), "--resolution",
                 "16", "--no-lpips", "--no-fid", "--device", "cpu"]) == 1  # one skipped
    summary = _strict((report / "summary.json").read_text())
    assert len(summary["images"]["skipped_items"]) == 1
    # Now: "id": "bad\udcff.png", a lone surrogate, which serde_json and other strict readers refuse.
    _assert_unicode(summary)


def test_reconstruct_json_writes_a_name_that_is_not_utf8_as_unicode(tmp_path: Path, tiny_model: Path) -> None:
    image = _non_utf8(tmp_path, b"photo\xff.png")
    rgb_image(image, 16, 16, 0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["-q", "reconstruct", str(image), "-o", str(tmp_path / "r.png"), "--json", "--model",
                     str(tiny_model), "--device", "cpu"]) == 0
    d = _strict(out.getvalue())
    assert d["output"] == str(tmp_path / "r.png")
    # Now: "input": ".../photo\udcff.png", a lone surrogate escape (no Unicode text).
    _assert_unicode(d)
