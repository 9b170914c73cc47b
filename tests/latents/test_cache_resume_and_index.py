"""The latent cache and `klvae scale`: a resume compares what decides the rows (the encoder, and the factors of
scaled rows), not the whole model; the library's errors name its arguments and the CLI's its flags (both kept by an
OptionError through pickling and copies); a copy without its manifests is refused by a rerun with its shards kept,
and `--verify --repair` of it ends in its summary line; index.json describes the tensors each row holds (FLUX.2's
patched scaled rows too), and verify reads it; `scale` encodes its crops in batches."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import klvae
from helpers import cache_images, noise_folder, perturbed_vae
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.latents import build_cache, cache, verify_cache
from klvae.latents.dataset import LatentDataset
from klvae.latents.fingerprint import encoder_fingerprint
from klvae.latents.options import CacheOptions, OptionError
from klvae.latents.scale import estimate_factors

# Four 32x32 rows in shards of 2, encoded two at a time, on the CPU in this process.
OPTIONS = {"resolution": 32, "shard_size": 2, "batch_size": 2, "num_workers": 0}
FLAGS = ["--resolution", "32", "--shard-size", "2", "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]


class _Killed(BaseException):
    """A kill in the middle of a run (not an Exception: nothing may catch it on the way out)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """"a": a model; "dec": a's decoder fine-tuned; "enc": a's encoder changed; "rescaled": a's other factors."""
    root = tmp_path_factory.mktemp("models")
    vae = perturbed_vae("tiny", scaling_factor=0.5, shift_factor=0.1)
    paths = {name: root / name for name in ("a", "dec", "enc", "rescaled")}
    vae.save_pretrained(paths["a"])
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(0.01)
        vae.save_pretrained(paths["dec"])
        vae.encoder.conv_in.weight.add_(0.01)
        vae.save_pretrained(paths["enc"])
    rescaled = klvae.AutoencoderKL.from_pretrained(paths["a"])
    rescaled.config = rescaled.config.replace(scaling_factor=0.25)
    rescaled.save_pretrained(paths["rescaled"])
    return paths


def _load(path: Path) -> klvae.AutoencoderKL:
    return klvae.AutoencoderKL.from_pretrained(path)


def _images(root: Path, n: int = 4) -> Path:
    return noise_folder(root, n)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _images(tmp_path_factory.mktemp("data") / "images")


def _rows(out: Path) -> dict[tuple[str, bool], dict[str, torch.Tensor]]:
    # Every row's stored tensors, by (source, flip).
    index = json.loads((out / "index.json").read_text())
    rows = {}
    for it in index["items"]:
        with safe_open(str(out / it["shard"]), "pt") as f:
            prefix, keys = f"{it['row']:06d}.", f.keys()  # safe_open is no mapping
            rows[(it["source"], it["flip"])] = {k[len(prefix):]: f.get_tensor(k) for k in keys
                                                if k.startswith(prefix)}
    return rows


def _half_cached(vae: klvae.AutoencoderKL, data: Path, out: Path, monkeypatch: pytest.MonkeyPatch,
                 **options: object) -> None:
    # Killed before its second shard is written: the first two images cached, the other two not.
    real, calls = cache._write_shard, []

    def dying(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "_write_shard", dying)
    with pytest.raises(_Killed):
        build_cache(vae, data, out, **{**OPTIONS, **options})
    monkeypatch.setattr(cache, "_write_shard", real)
    assert len(list(out.glob("*.safetensors"))) == 1 and not (out / "index.json").exists()


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ---- 1. a resume compares the encoder (and the factors of scaled rows) ----

@pytest.mark.parametrize("store", ["moments", "sample", "scaled"])
def test_a_decoder_fine_tune_finishes_a_cache_with_the_rows_the_first_model_gives(
    tmp_path: Path, models: dict[str, Path], data: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    a, dec = _load(models["a"]), _load(models["dec"])
    assert encoder_fingerprint(a) == encoder_fingerprint(dec)
    whole = tmp_path / "whole"
    build_cache(a, data, whole, store=store, **OPTIONS)
    resumed = tmp_path / "resumed"
    _half_cached(a, data, resumed, monkeypatch, store=store)
    summary = build_cache(dec, data, resumed, store=store, **OPTIONS)
    assert (summary.encoded, summary.done_before, summary.rows) == (2, 2, 4)
    expected, got = _rows(whole), _rows(resumed)
    assert expected.keys() == got.keys() and len(got) == 4
    for key, tensors in expected.items():  # the same bytes, row by row
        assert tensors.keys() == got[key].keys()
        assert all(torch.equal(t, got[key][name]) for name, t in tensors.items()), key
    index = json.loads((resumed / "index.json").read_text())
    assert index["encoder_fingerprint"] == encoder_fingerprint(a)
    assert ("factors_fingerprint" in index) == (store == "scaled")


@pytest.mark.parametrize("interrupted", [True, False])
def test_another_encoder_is_refused_before_anything_is_touched(
    tmp_path: Path, models: dict[str, Path], data: Path, monkeypatch: pytest.MonkeyPatch, interrupted: bool
) -> None:
    out = tmp_path / "cache"
    if interrupted:  # the manifest's lines alone
        _half_cached(_load(models["a"]), data, out, monkeypatch)
    else:  # a finished cache: index.json too
        build_cache(_load(models["a"]), data, out, **OPTIONS)
    before = _snapshot(out)
    with pytest.raises(KlvaeError, match="another model, whose encoder differs") as e:
        build_cache(_load(models["enc"]), data, out, **OPTIONS)
    assert "a fine-tune of its decoder alone" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert _snapshot(out) == before


def test_scaled_rows_refuse_other_factors_and_other_rows_take_them(
    tmp_path: Path, models: dict[str, Path], data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rescaled = _load(models["rescaled"])
    for store in ("scaled", "moments"):
        out = tmp_path / store
        _half_cached(_load(models["a"]), data, out, monkeypatch, store=store)
        if store == "moments":  # unscaled rows: the index records the factors of the run that finishes it
            build_cache(rescaled, data, out, store=store, **OPTIONS)
            assert json.loads((out / "index.json").read_text())["scaling_factor"] == 0.25
            continue
        before = _snapshot(out)
        with pytest.raises(KlvaeError, match="latents scaled with another model's factors"):
            build_cache(rescaled, data, out, store=store, **OPTIONS)
        assert _snapshot(out) == before


def _as_before_the_encoder_fingerprint(out: Path) -> None:
    # A cache as a klvae that recorded the whole model's fingerprint alone left it.
    new = ("encoder_fingerprint", "factors_fingerprint")
    for manifest in out.glob("manifest-rank*.jsonl"):
        recs = [json.loads(ln) for ln in manifest.read_text().splitlines()]
        for rec in recs:
            rec["options"] = {k: v for k, v in rec["options"].items() if k not in new}
        manifest.write_text("".join(json.dumps(rec) + "\n" for rec in recs))
    if (index := out / "index.json").exists():
        index.write_text(json.dumps({k: v for k, v in json.loads(index.read_text()).items()
                                     if k not in (*new, "stored")}))


def test_an_older_cache_still_takes_the_whole_model(
    tmp_path: Path, models: dict[str, Path], data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cache"
    _half_cached(_load(models["a"]), data, out, monkeypatch)
    _as_before_the_encoder_fingerprint(out)
    before = _snapshot(out)
    with pytest.raises(KlvaeError, match=r"another model .*begun before klvae recorded the encoder's fingerprint"):
        build_cache(_load(models["dec"]), data, out, **OPTIONS)
    assert _snapshot(out) == before
    summary = build_cache(_load(models["a"]), data, out, **OPTIONS)  # the same model still finishes it
    assert (summary.encoded, summary.done_before, summary.rows) == (2, 2, 4)
    # Its old line still decides: the next resume (of the finished cache) by the decoder's fine-tune is refused.
    with pytest.raises(KlvaeError, match="before klvae recorded the encoder's fingerprint"):
        build_cache(_load(models["dec"]), data, out, **OPTIONS)


def test_the_cli_resumes_with_a_decoder_fine_tune_and_refuses_another_encoder(
    tmp_path: Path, models: dict[str, Path], data: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cache"
    _half_cached(_load(models["a"]), data, out, monkeypatch)
    capsys.readouterr()
    args = ["-q", "cache", "--data", str(data), "-o", str(out), *FLAGS, "--model"]
    assert main([*args, str(models["enc"])]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("klvae: error: ")]
    assert len(err) == 1 and "whose encoder differs" in err[0], err
    assert main([*args, str(models["dec"])]) == 0
    assert "this run encoded 2 images" in capsys.readouterr().out


def test_the_compute_dtype_decides_no_stored_tensor(
    tmp_path: Path, models: dict[str, Path], data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows are float32 moments whatever the compute dtype (bf16 on a GPU, fp32 on the CPU): a cache begun in one
    # may be finished in the other, as the fingerprints, of weights rounded to bf16, allow.
    out = tmp_path / "cache"
    _half_cached(_load(models["a"]), data, out, monkeypatch, dtype="bf16")
    build_cache(_load(models["a"]), data, out, dtype="fp32", **OPTIONS)
    assert {t.dtype for row in _rows(out).values() for t in row.values()} == {torch.float32}


# ---- 2. the library names its arguments, the CLI its flags ----

@pytest.mark.parametrize(("options", "message"), [
    ({"resolution": 33}, "resolution must be a multiple of the model's downsample factor 2, got 33"),
    ({"resolution": 0}, "resolution must be at least 1, got 0"),
    ({"resolution": 96, "buckets": True}, "with buckets, resolution must be a multiple of 64, got 96"),
    ({"shard_size": 0}, "shard_size must be at least 1, got 0"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"num_workers": -1}, "num_workers must be at least 0, got -1"),
])
def test_build_cache_names_its_arguments(
    tmp_path: Path, models: dict[str, Path], data: Path, options: dict, message: str
) -> None:
    with pytest.raises(OptionError) as e:
        build_cache(_load(models["a"]), data, tmp_path / "cache", **{**OPTIONS, **options})
    assert str(e.value) == message and "--" not in str(e.value)
    assert isinstance(e.value, KlvaeError) and not (tmp_path / "cache").exists()


def test_estimate_factors_and_cache_options_name_their_arguments(models: dict[str, Path], data: Path) -> None:
    vae = _load(models["a"])
    for kwargs, message in (({"limit": 0}, "limit must be at least 1, got 0"),
                            ({"resolution": 31}, "resolution must be a multiple of the model's downsample factor 2"),
                            ({"batch_size": 0}, "batch_size must be at least 1, got 0")):
        with pytest.raises(OptionError, match=message):
            estimate_factors(vae, str(data), **kwargs)
    with pytest.raises(OptionError, match=r"^store must be moments, sample or scaled, got 'latents'$"):
        CacheOptions(store="latents")


@pytest.mark.parametrize(("argv", "message"), [
    (["cache", "--resolution", "33"], "--resolution must be a multiple of the model's downsample factor 2, got 33"),
    (["cache", "--resolution", "96", "--buckets"], "with --buckets, --resolution must be a multiple of 64, got 96"),
    (["cache", "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["cache", "--num-workers", "-1"], "--num-workers must be at least 0, got -1"),
    (["scale", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["scale", "--resolution", "31"], "--resolution must be a multiple of the model's downsample factor 2, got 31"),
])
def test_the_cli_names_its_flags(
    tmp_path: Path, models: dict[str, Path], data: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
    message: str
) -> None:
    out = ["-o", str(tmp_path / "cache")] if argv[0] == "cache" else []
    capsys.readouterr()
    rc = main(["-q", argv[0], "--data", str(data), "--model", str(models["a"]), "--device", "cpu", *out, *argv[1:]])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"klvae: error: {message}"


def test_option_error_pickles_and_copies_with_both_namings() -> None:
    with pytest.raises(OptionError) as caught:
        CacheOptions(shard_size=0)
    for again in (pickle.loads(pickle.dumps(caught.value)), copy.copy(caught.value), copy.deepcopy(caught.value)):
        assert type(again) is OptionError
        assert (str(again), again.flags()) == ("shard_size must be at least 1, got 0",
                                               "--shard-size must be at least 1, got 0")


# ---- 3. a copy without manifests: --verify --repair, and a rerun that refuses it ----

def test_repair_of_a_copy_without_manifests_ends_in_its_summary_line(
    tmp_path: Path, models: dict[str, Path], data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = tmp_path / "made"
    build_cache(_load(models["a"]), data, made, **OPTIONS)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in [made / "index.json", *made.glob("*.safetensors")]:
        shutil.copy(p, copy / p.name)
    shard = copy / "rank000-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01  # inside the tensor data: the header stays whole
    shard.write_bytes(bytes(raw))
    before = _snapshot(copy)
    capsys.readouterr()
    assert main(["-q", "cache", "--verify", "--repair", "-o", str(copy)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{copy}: 1 shard ok, 1 damaged: rank000-00001.safetensors; this copy has no manifests, so --repair cannot "
        "drop them: encode their rows again where the cache was made (or copy its manifest-rank*.jsonl files here, "
        "then --repair)"]
    assert "klvae: error" not in captured.err
    assert _snapshot(copy) == before
    # And a folder that is no cache at all is still the one error line of exit status 2.
    (tmp_path / "empty").mkdir()
    assert main(["-q", "cache", "--verify", "--repair", "-o", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == (f"klvae: error: {tmp_path / 'empty'} is not a klvae cache: it has no "
                                               "manifest-rank*.jsonl or index.json")


def test_a_cache_copied_without_its_manifests_is_refused_with_its_shards_kept(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    data = cache_images(tmp_path / "data")
    vae, out = perturbed_vae("tiny"), tmp_path / "cache"
    options = {"resolution": 32, "shard_size": 3, "batch_size": 4, "num_workers": 0}
    build_cache(vae, data, out, **options)
    for manifest in out.glob("manifest-rank*.jsonl"):  # copied elsewhere as index.json and shards alone
        manifest.unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KlvaeError, match=r"index\.json lists 3 shard\(s\).*no manifest-rank000\.jsonl line records"):
        build_cache(vae, data, out, **options)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # before: every shard deleted, all encoded
    assert len(LatentDataset(out)) == 8


# ---- 4. index.json describes the rows' tensors ----

C, P = 4, 2  # a FLUX.2-like tiny model: latent patches of 2x2, 16 channels in the diffusion latent


@pytest.fixture(scope="module")
def patched() -> klvae.AutoencoderKL:
    vae = perturbed_vae("tiny-f8", latent_channels=C, latent_patch_size=P, scaling_factor=1.0)
    vae.config = vae.config.replace(latents_mean=[0.1] * (C * P * P), latents_std=[2.0] * (C * P * P))
    return vae


@pytest.mark.parametrize("store", ["moments", "sample", "scaled"])
def test_the_index_says_what_each_row_holds_and_the_readers_agree(
    tmp_path: Path, patched: klvae.AutoencoderKL, data: Path, store: str
) -> None:
    out = tmp_path / "cache"
    build_cache(patched, data, out, store=store, resolution=32, num_workers=0)
    index = json.loads((out / "index.json").read_text())
    stored = index["stored"]
    f = patched.config.downsample_factor
    assert index["latent_channels"] == C and index["latent_patch_size"] == P  # the VAE's, as before
    assert stored == ({"tensors": ["mean", "logvar"], "channels": C, "downsample_factor": f} if store == "moments"
                      else {"tensors": ["latent"], "channels": C * P * P, "downsample_factor": f * P}
                      if store == "scaled" else {"tensors": ["latent"], "channels": C, "downsample_factor": f})
    for row in _rows(out).values():  # what the index says is what the shards hold
        assert sorted(row) == sorted(stored["tensors"])
        assert all(t.shape == (stored["channels"], 32 // stored["downsample_factor"],
                               32 // stored["downsample_factor"]) and t.dtype == torch.float32 for t in row.values())
    assert verify_cache(out).ok
    # LatentDataset gives the diffusion latent from every store: patched, C*P*P channels at f*P.
    assert LatentDataset(out, mode="mean")[0]["latents"].shape == (C * P * P, 32 // (f * P), 32 // (f * P))
    # An index written before "stored" existed still reads, and verifies by the shards' own shapes.
    index.pop("stored")
    (out / "index.json").write_text(json.dumps(index))
    assert verify_cache(out).ok and len(LatentDataset(out)) == 4


def test_verify_holds_every_shard_to_the_index_not_to_the_majority(
    tmp_path: Path, models: dict[str, Path], data: Path
) -> None:
    # One shard, swapped for one of another layout with its hash dropped (as an older klvae wrote it): voting
    # alone would take its layout for the cache's; the index's "stored" says otherwise.
    out = tmp_path / "cache"
    build_cache(_load(models["a"]), data, out, resolution=32, shard_size=4, num_workers=0)
    (shard,) = out.glob("*.safetensors")
    save_file({f"{r:06d}.{t}": torch.zeros(4, 8, 8) for r in range(4) for t in ("mean", "logvar")}, str(shard))
    manifest = out / "manifest-rank000.jsonl"
    recs = [{k: v for k, v in json.loads(ln).items() if k != "sha256"} for ln in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (damaged,) = verify_cache(out).damaged
    assert damaged.problem == "its 000000.logvar is [4, 8, 8], not [4, 16, 16]"


# ---- 5. scale encodes its crops in batches ----

def _counting_passes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    from klvae.latents import scale

    shapes, real = [], scale.inference.encode_moments

    def counted(vae: klvae.AutoencoderKL, x: torch.Tensor, *args: object) -> torch.Tensor:
        assert x.is_contiguous()  # NCHW, as encode's and cache's batches
        shapes.append(tuple(x.shape))
        return real(vae, x, *args)

    monkeypatch.setattr(scale.inference, "encode_moments", counted)
    return shapes


def test_scale_encodes_batch_size_crops_a_pass_with_the_same_figures(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _images(tmp_path / "seven", 7)
    vae = _load(models["a"])
    shapes = _counting_passes(monkeypatch)
    figures = {b: estimate_factors(vae, str(data), resolution=32, batch_size=b) for b in (1, 3, 4, 8)}
    assert [s[0] for s in shapes] == [1] * 7 + [3, 3, 1] + [4, 3] + [7]
    for b, f in figures.items():  # each image's sample is its own draw: the batch changes rounding alone
        for key in ("scaling_factor", "shift_factor", "std"):
            assert f[key] == pytest.approx(figures[1][key], rel=1e-6), (b, key)
        torch.testing.assert_close(torch.tensor(f["latents_std"]), torch.tensor(figures[1]["latents_std"]))
    shapes.clear()
    capsys.readouterr()
    argv = ["-q", "scale", "--data", str(data), "--model", str(models["a"]), "--device", "cpu", "--resolution", "32"]
    assert main([*argv, "--batch-size", "3"]) == 0
    assert [s[0] for s in shapes] == [3, 3, 1]
    assert f"scaling_factor {figures[1]['scaling_factor']:.4g}" in capsys.readouterr().out
    shapes.clear()
    assert main(argv) == 0 and [s[0] for s in shapes] == [4, 3]  # --batch-size's default, 4
