"""Pins fixes to findings earlier hunts left alone: nearly constant latents warned of by `scale`, and a glob of
images (`data/*.png`) refused where data is named, not read as tar shards that fail once the job runs, and an empty
or folder `--resume` (was "cannot read checkpoint .: Is a directory"), and a premultiplied greyscale-alpha ("La")
image read as its LA form (was Pillow's "conversion from La to L not supported"), and the model's encode/decode
refusing a batch of the wrong rank or channel count by name (was a GroupNorm's or conv's internal shapes); from the
loading hunt's doubtful list: a diffusers weights file named alone takes the config.json beside it (was SD 1.5's
factors guessed from shapes), `convert -o vae.json` (.onnx, .gguf, .zip) is refused as a folder named like a file,
weights past float32's range are called damaged, not sent to bfloat16 (whose range is float32's); and NaN images
through the diffusers wrapper come back NaN without an fp32 rerun and an overflow warning; a config.json that is a
folder is named, not ignored; `info` of a preset alone refuses the --subfolder it would ignore."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import klvae
from helpers import noise_folder, one_error_line, perturbed_vae, saved_tiny_model
from klvae import inference
from klvae.cli.main import main
from klvae.datasources import resolve_spec
from klvae.errors import KlvaeError
from klvae.images import pil_to_tensor
from klvae.latents.scale import estimate_factors
from klvae.training.checkpoint import load_checkpoint
from klvae.training.data import build_dataset


@pytest.fixture(scope="module")
def vae() -> klvae.AutoencoderKL:
    return perturbed_vae("tiny")


def test_nearly_constant_latents_are_warned_of_and_real_ones_are_not(
    tmp_path: Path, vae: klvae.AutoencoderKL, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = str(noise_folder(tmp_path / "data", 2, hw=(32, 32)))
    with caplog.at_level(logging.WARNING, logger="klvae"):
        estimate_factors(vae, data, resolution=32, sample=False)
    assert "nearly constant" not in caplog.text
    encode = inference.encode_moments

    def flat(*args: object, **kwargs: object) -> torch.Tensor:
        m = encode(*args, **kwargs)  # type: ignore[arg-type]
        return torch.cat([torch.full_like(m[:, : m.shape[1] // 2], 0.5), m[:, m.shape[1] // 2 :]], dim=1)

    monkeypatch.setattr(inference, "encode_moments", flat)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        f = estimate_factors(vae, data, resolution=32, sample=False)
    assert f["std"] == pytest.approx(1e-6)  # the floor: a factor of a million
    (warned,) = [r.getMessage() for r in caplog.records if "nearly constant" in r.getMessage()]
    assert f"4 of {len(f['latents_std'])} channels" in warned and "too few or blank images" in warned


def test_a_glob_of_images_is_refused_where_data_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = noise_folder(tmp_path / "data", 2, hw=(32, 32))
    with pytest.raises(KlvaeError, match="names no tar shard") as e:
        build_dataset(f"{data}/*.png")  # was a WebDatasetShards of two PNGs, failing at the first read
    assert "image folder by its path" in str(e.value)
    model = saved_tiny_model(tmp_path / "model")
    assert main(["scale", "--model", str(model), "--data", f"{data}/*.png", "--resolution", "32"]) == 2
    assert "names no tar shard" in one_error_line(capsys.readouterr().err)


def test_a_glob_of_tars_or_of_parquet_files_still_names_shards_and_tables(tmp_path: Path) -> None:
    for name in ("a.tar", "b.TAR", "c.parquet", "d.parquet", "e.txt"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_spec(f"{tmp_path}/*.[tT][aA][rR]").kind == "tar"
    assert resolve_spec(f"{tmp_path}/*.parquet").kind == "table"
    assert resolve_spec(f"{tmp_path}/*").kind == "tar"  # beside tars, the others are skipped as unreadable shards
    with pytest.raises(KlvaeError, match="names no tar shard"):
        resolve_spec(f"{tmp_path}/[ce].*")  # parquet and text: neither reader's


def test_an_empty_or_folder_resume_says_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KlvaeError) as e:
        load_checkpoint("")  # was Path(""): the working folder, "Is a directory"
    assert str(e.value) == "no checkpoint named: the path is empty"
    with pytest.raises(KlvaeError) as e:
        load_checkpoint(tmp_path)
    assert str(e.value) == f"checkpoint {tmp_path} is a folder: name one of its checkpoint files"
    recipe = Path(__file__).parents[2] / "recipes" / "demo" / "train.yaml"
    sets = [f"train.out_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'data'}"]
    argv = ["train", str(recipe), *(a for s in sets for a in ("--set", s)), "--resume"]
    assert main([*argv, ""]) == 2
    assert "--resume '' names no checkpoint" in one_error_line(capsys.readouterr().err)
    assert main([*argv, str(tmp_path)]) == 2
    assert "is a folder: name one of its checkpoint files" in one_error_line(capsys.readouterr().err)


def test_a_premultiplied_grey_alpha_image_reads_as_its_straight_form() -> None:
    premultiplied = Image.new("La", (2, 2), (100, 128))  # grey 199 at alpha 128/255, premultiplied to 100
    straight = Image.new("LA", (2, 2), (199, 128))
    assert torch.equal(pil_to_tensor(premultiplied), pil_to_tensor(straight))


@pytest.mark.parametrize(("method", "shape", "expected"), [
    ("encode", (3, 16, 16), "expected a batch of images [B, 3, H, W], got shape [3, 16, 16]"),
    ("encode", (1, 4, 16, 16), "expected a batch of images [B, 3, H, W], got shape [1, 4, 16, 16]"),
    ("encode_moments", (1, 1, 16, 16), "expected a batch of images [B, 3, H, W], got shape [1, 1, 16, 16]"),
    ("decode", (4, 2, 2), "expected a batch of latents [B, 4, H, W], got shape [4, 2, 2]"),
    ("decode", (1, 3, 2, 2), "expected a batch of latents [B, 4, H, W], got shape [1, 3, 2, 2]"),
])
def test_the_model_names_a_batch_of_the_wrong_shape(vae: klvae.AutoencoderKL, method: str, shape: tuple[int, ...],
                                                    expected: str) -> None:
    with pytest.raises(ValueError) as e:
        getattr(vae, method)(torch.zeros(shape))
    assert str(e.value) == expected


def test_a_diffusers_weights_file_named_alone_takes_the_config_beside_it(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    # SDXL's network with SD 1.5's factors guessed from shapes gave washed-out pictures; the config.json says.
    cfg = klvae.get_preset("tiny").replace(scaling_factor=0.3, shift_factor=0.2)
    folder = klvae.AutoencoderKL(cfg).save_pretrained(tmp_path / "vae")
    weights = str(folder / "diffusion_pytorch_model.safetensors")
    save_file(load_file(weights), weights)  # as diffusers writes it: no klvae config in its header
    with caplog.at_level(logging.WARNING, logger="klvae"):
        back = klvae.AutoencoderKL.from_pretrained(folder / "diffusion_pytorch_model.safetensors")
    assert back.config == cfg and not caplog.messages


@pytest.mark.parametrize("name", ["vae.json", "vae.onnx", "vae.gguf", "vae.zip"])
def test_convert_to_a_new_folder_named_like_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              name: str) -> None:
    model = saved_tiny_model(tmp_path / "model")
    assert main(["convert", "-m", str(model), "-o", str(tmp_path / name)]) == 2
    assert "name ends like a file's" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / name).exists()


def test_weights_past_float32_are_called_damaged_not_sent_to_bfloat16(tmp_path: Path) -> None:
    sd = {k: v.double() for k, v in klvae.AutoencoderKL("tiny").state_dict().items()}
    sd["encoder.conv_in.bias"][0] = 1e39  # finite in float64, inf in float32 and bfloat16
    save_file(sd, str(tmp_path / "vae.safetensors"))
    with pytest.raises(KlvaeError) as e:
        klvae.AutoencoderKL.from_pretrained(tmp_path / "vae.safetensors", config="tiny")
    assert "beyond the range of float32" in str(e.value) and str(e.value).endswith(": the file is damaged")


def test_nan_images_through_the_diffusers_wrapper_are_not_rerun_as_an_overflow(
        caplog: pytest.LogCaptureFixture) -> None:
    from klvae.compat import as_diffusers

    wrapped = as_diffusers(perturbed_vae("tiny").to(torch.bfloat16))
    x = torch.zeros(1, 3, 16, 16, dtype=torch.bfloat16)
    x[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="klvae"), torch.no_grad():  # as pipelines run it
        out = wrapped.encode(x).latent_dist.mean
    assert out.dtype == torch.bfloat16 and bool(out.isnan().any())  # as diffusers: NaN in, NaN out
    assert "rerunning" not in caplog.text  # was: "produced non-finite values in bfloat16; rerunning ... in fp32"


def test_a_config_json_that_is_a_folder_is_named_not_ignored(tmp_path: Path) -> None:
    folder = klvae.AutoencoderKL("tiny").save_pretrained(tmp_path / "vae")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()  # was ignored: the factors then guessed from the shapes
    with pytest.raises(KlvaeError, match=r"config\.json is not a file"):
        klvae.AutoencoderKL.from_pretrained(folder)


def test_info_of_a_preset_alone_refuses_a_subfolder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "tiny", "--subfolder", "vae"]) == 2  # was: described, the subfolder ignored
    assert "--subfolder 'vae' given, but preset 'tiny'" in one_error_line(capsys.readouterr().err)
    assert main(["info", "--config", "sdxl", "--subfolder", "vae"]) == 2
    capsys.readouterr()
