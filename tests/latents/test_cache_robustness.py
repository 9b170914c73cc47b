"""`klvae cache | scale` on damaged caches and broken models: one-line errors, raised before anything is deleted;
a cache index without its fields is named as such."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import klvae
from helpers import noise_folder
from klvae.cli.main import main

RES = ["--resolution", "32", "--num-workers", "0", "--device", "cpu"]


def _model(root: Path, weight_scale: float) -> Path:
    # The tiny preset with its encoder's last conv scaled by 1e12: huge but finite latents; or filled with 3e38,
    # finite weights (a file's must be) whose sums overflow float32: non-finite latents.
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL(klvae.get_preset("tiny"))
    with torch.no_grad():
        if math.isinf(weight_scale):
            vae.encoder.conv_out.weight.fill_(3e38)
        else:
            vae.encoder.conv_out.weight.mul_(weight_scale)
    vae.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: _model(root / name, scale) for name, scale in (("good", 1.0), ("nan", float("inf")),
                                                                  ("huge", 1e12))}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_folder(tmp_path_factory.mktemp("data"), 3, pattern="img{i:03d}.png")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path], data: Path) -> Path:
    # A finished cache of three one-row shards, copied by each test that damages it.
    out = tmp_path_factory.mktemp("finished") / "cache"
    assert main(["cache", "--data", str(data), "-o", str(out), "--model", str(models["good"]), *RES,
                 "--shard-size", "1"]) == 0
    return out


def _args(data: Path, out: Path, model: Path) -> list[str]:
    return ["cache", "--data", str(data), "-o", str(out), "--model", str(model), *RES, "--shard-size", "1"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    # The last line of stderr (log lines may come before it), and no traceback anywhere.
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("klvae: error: "), err
    assert all(w in err[-1] for w in words), err
    assert not any("Traceback" in line or "internal error" in line for line in err), err
    return err[-1]


def _damage_first_line(manifest: Path, change: dict) -> None:
    lines = manifest.read_text().splitlines()
    rec = json.loads(lines[0])
    for key, value in change.items():
        if key == "row_shard":
            rec["rows"][0]["shard"] = value
        elif key == "options":
            rec["options"].update(value)
        else:
            rec[key] = value
    manifest.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")


@pytest.mark.parametrize("change", [
    {"shard": "foo.safetensors", "row_shard": "foo.safetensors"},  # no shard number: crashed the resume
    {"shard": "rank000-00007.safetensors", "row_shard": "rank000-00007.safetensors"},  # no such file
    {"shard": "rank001-00000.safetensors", "row_shard": "rank001-00000.safetensors"},  # another rank's name
    {"shard": "rank000-00001.safetensors", "row_shard": "rank000-00001.safetensors"},  # named by two lines
    {"row_shard": "rank000-00002.safetensors"},  # a row said to be in another shard than its line's
    {"shard": None},  # rows with no shard at all
], ids=["foo", "missing", "other-rank", "twice", "row-elsewhere", "no-shard"])
def test_a_manifest_naming_a_wrong_shard_is_refused_before_anything_is_deleted(
    tmp_path: Path, models: dict[str, Path], data: Path, finished: Path, capsys: pytest.CaptureFixture[str],
    change: dict,
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(finished, out)
    (out / "index.json").unlink()  # as a kill before the index leaves it: the resume reads the manifest alone
    _damage_first_line(out / "manifest-rank000.jsonl", change)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_args(data, out, models["good"])) == 2
    _one_line_error(capsys, "manifest-rank000.jsonl line ", "the cache is damaged")
    assert _snapshot(out) == before  # the real rank000-00000 shard above all: not deleted


@pytest.mark.parametrize(("where", "change"), [
    ("index.json", {"model_fingerprint": 5}),
    ("index.json", {"world_size": "1"}),
    ("index.json", {"options": {"resolution": True}}),
    ("manifest-rank000.jsonl", {"options": {"model_fingerprint": 5}}),
    ("manifest-rank000.jsonl", {"options": {"flip": 0}}),
    ("manifest-rank000.jsonl", {"options": {"store": ["moments"]}}),
])
def test_recorded_options_of_the_wrong_type_are_a_damaged_cache(
    tmp_path: Path, models: dict[str, Path], data: Path, finished: Path, capsys: pytest.CaptureFixture[str],
    where: str, change: dict,
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(finished, out)
    if where == "index.json":
        index = json.loads((out / where).read_text())
        for key, value in change.items():
            index[key] = {**index[key], **value} if isinstance(value, dict) else value
        (out / where).write_text(json.dumps(index))
    else:
        _damage_first_line(out / where, change)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_args(data, out, models["good"])) == 2
    _one_line_error(capsys, where, "the cache is damaged")
    assert _snapshot(out) == before


@pytest.mark.parametrize("index", [
    {},
    {"items": [], "options": ["store"]},
    {"items": {}, "options": {"store": "moments"}},
])
def test_a_cache_index_without_its_fields_is_named_not_a_key_error(tmp_path: Path, index: dict[str, object]) -> None:
    from klvae.errors import LatentsError
    from klvae.latents.cache import INDEX_FORMAT
    from klvae.latents.dataset import LatentDataset

    (tmp_path / "index.json").write_text(json.dumps({**index, "format": INDEX_FORMAT}))
    with pytest.raises(LatentsError, match=r"is not a klvae latent cache index$"):
        LatentDataset(tmp_path)


def test_a_model_with_non_finite_latents_is_a_one_line_cache_error(
    tmp_path: Path, models: dict[str, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cache"
    assert main(_args(data, out, models["nan"])) == 2
    _one_line_error(capsys, "non-finite latents for img000.png", "huge, inf or NaN weights?")
    assert not out.exists()  # nothing written: not even the folder it made


def test_non_finite_latents_mid_cache_leave_the_finished_shards_and_no_partial_one(
    tmp_path: Path, models: dict[str, Path], data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from klvae import inference
    from klvae.errors import KlvaeError
    from klvae.latents import cache
    from klvae.latents.dataset import LatentDataset

    real, calls = inference.encode_moments, []

    def nan_on_the_second_batch(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        moments = real(*args, **kwargs)
        return moments * float("nan") if len(calls) == 2 else moments

    vae = klvae.AutoencoderKL.from_pretrained(models["good"])
    opts = cache.CacheOptions(resolution=32, flip=True, shard_size=2, batch_size=2, num_workers=0)
    out = tmp_path / "cache"
    monkeypatch.setattr(inference, "encode_moments", nan_on_the_second_batch)
    with pytest.raises(KlvaeError, match=r"non-finite latents for img001\.png:"):
        cache.cache_rank(vae, str(data), out, opts, torch.float32)
    # As a kill would leave it: the first shard and its line, nothing of the batch that failed.
    assert sorted(p.name for p in out.iterdir()) == ["manifest-rank000.jsonl", "rank000-00000.safetensors"]
    assert len(cache.read_manifest(out / "manifest-rank000.jsonl")) == 1
    monkeypatch.setattr(inference, "encode_moments", real)
    assert cache.cache_rank(vae, str(data), out, opts, torch.float32)["done_before"] == 1
    cache.write_index(vae, "tiny", out, opts, 1)
    assert sorted((it["source"], it["flip"]) for it in LatentDataset(out).items) == sorted(
        (f"img{i:03d}.png", f) for i in range(3) for f in (False, True))


def test_scale_of_a_model_with_non_finite_latents_is_a_one_line_error_before_saving(
    tmp_path: Path, models: dict[str, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "saved"
    args = ["scale", "--data", str(data), "--model", str(models["nan"]), "--resolution", "32", "--device", "cpu"]
    assert main([*args, "--save", str(saved)]) == 2
    _one_line_error(capsys, "non-finite latents for img00", "huge, inf or NaN weights?")
    assert not saved.exists()
    assert main(args) == 2  # printing NaN factors is no answer either
    _one_line_error(capsys, "non-finite latents")


def test_scale_of_a_model_with_huge_latents_saves_a_scaling_factor_that_does_not_round_to_zero(
    tmp_path: Path, models: dict[str, Path], data: Path
) -> None:
    from klvae.latents.scale import estimate_factors

    saved = tmp_path / "saved"
    assert main(["scale", "--data", str(data), "--model", str(models["huge"]), "--resolution", "32",
                 "--device", "cpu", "--save", str(saved)]) == 0
    f = estimate_factors(klvae.AutoencoderKL.from_pretrained(models["huge"]), str(data), resolution=32)
    assert f["std"] > 1e6  # a scaling_factor below 5e-7: six decimals would make it 0, which no config holds
    assert klvae.AutoencoderKL.from_pretrained(saved).config.scaling_factor == pytest.approx(
        f["scaling_factor"], rel=1e-5)
