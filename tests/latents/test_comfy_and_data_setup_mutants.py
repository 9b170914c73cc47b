"""Pins what a mutation audit of ComfyUI's latent files (latents/comfy.py, cli/comfy.py) and training's data setup
(training/data_setup.py) found untested: float32 from to_comfy/from_comfy and in a saved
file, a missing, folder or garbage path not being a ComfyUI latent, the missing file's line, the tensors a file
without latent_tensor names (five, or nothing), each refused latent_tensor's full line (5-D, empty batch, int dtype,
-inf), comfy_latents_file's model and absent shift; encode's refusal of an image narrower than a cell and of two crops
(first image of each, sizes, the cell), its cropping warning, --seed, the non-finite batch's line, the warning for a
patched model without statistics only, the skip count and the model in the metadata; decode's first-format and
"decoded" lines, fewer channels than the model's, and latents that overflow once unnormalised; the data setup's
field names and its data.val switch, the hint for data of unreadable files only, the first batch of each pass (after
a resume too), an empty tar shard stopping training (within a deadline, not a hang), validation's unreadable images
and its warning when none is left, train.seed deciding crops and flips (folders and tar streams) and cache_images."""

from __future__ import annotations

import logging
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import klvae
import klvae.cli.comfy
from helpers import noise_folder, one_error_line, one_line, rgb_image, saved_tiny_model
from klvae.cli.main import main
from klvae.distributed import DistInfo
from klvae.errors import KlvaeError, LatentsError
from klvae.latents.comfy import (
    comfy_latents_file,
    from_comfy,
    is_comfy_latent,
    load_comfy_latent,
    save_comfy_latent,
    to_comfy,
)
from klvae.model.config import AutoencoderKLConfig
from klvae.model.latent_norm import LatentNorm
from klvae.training.config import TrainConfig, load_config
from klvae.training.data_setup import build_train_loader, build_val_batches, check_train_data

# ---- latents/comfy.py -------------------------------------------------------------------------------------------


def test_to_and_from_comfy_give_float32_whatever_the_dtype_given() -> None:
    z = torch.randn(1, 4, 3, 5).half()
    assert to_comfy(z, LatentNorm(0.18215)).dtype == torch.float32
    assert from_comfy(z.bfloat16(), LatentNorm(0.18215)).dtype == torch.float32


def test_a_missing_folder_or_unreadable_file_is_not_a_comfy_latent(tmp_path: Path) -> None:
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors at all")
    for name in ("missing.safetensors", "folder.safetensors", "garbage.safetensors"):
        assert is_comfy_latent(tmp_path / name) is False, name


def test_loading_a_missing_latent_file_says_there_is_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(LatentsError) as e:
        load_comfy_latent(tmp_path / "x.latent")
    assert one_line(e) == f"no such latents file: {tmp_path / 'x.latent'}"


def test_a_file_without_latent_tensor_names_the_first_five_tensors_it_holds_or_nothing(tmp_path: Path) -> None:
    save_file({k: torch.zeros(1) for k in "fedcba"}, str(tmp_path / "six.latent"))
    save_file({}, str(tmp_path / "none.latent"))
    with pytest.raises(LatentsError) as e:
        load_comfy_latent(tmp_path / "six.latent")
    assert one_line(e).endswith("is not a ComfyUI latent file: no latent_tensor tensor (it holds 'a, b, c, d, e')")
    with pytest.raises(LatentsError) as e:
        load_comfy_latent(tmp_path / "none.latent")
    assert one_line(e).endswith("no latent_tensor tensor (it holds 'nothing')")


@pytest.mark.parametrize(
    ("t", "message"),
    [
        (
            torch.zeros(1, 1, 4, 3, 5),
            "latent_tensor of shape [1, 1, 4, 3, 5]; ComfyUI's image latents are [batch, channels, height, width]",
        ),
        (torch.zeros(0, 4, 3, 5), "empty latent_tensor of shape [0, 4, 3, 5]"),
        (
            torch.zeros(1, 4, 3, 5, dtype=torch.int64),
            "latent_tensor of dtype int64; expected float32, float16, bfloat16 or float64",
        ),
        (torch.full((1, 4, 3, 5), float("-inf")), "latents contain NaN or infinite values"),
    ],
)
def test_each_unusable_latent_tensor_is_refused_with_its_own_line(
    tmp_path: Path, t: torch.Tensor, message: str
) -> None:
    path = tmp_path / "x.latent"
    save_file({"latent_tensor": t, "latent_format_version_0": torch.tensor([])}, str(path))
    with pytest.raises(LatentsError) as e:
        load_comfy_latent(path)
    assert one_line(e) == f"{path}: {message}"


def test_save_comfy_latent_stores_float32_as_savelatent_does(tmp_path: Path) -> None:
    for dtype in (torch.float64, torch.bfloat16):
        path = save_comfy_latent(tmp_path / f"{dtype}.latent", torch.ones(1, 4, 2, 3, dtype=dtype))
        with safe_open(str(path), framework="pt") as f:
            assert f.get_tensor("latent_tensor").dtype == torch.float32


def test_comfy_latents_file_keeps_the_model_and_takes_no_shift() -> None:
    lf = comfy_latents_file(torch.zeros(1, 4, 3, 5), ["a"], LatentNorm(0.13, 0.06), 8, model="my/vae")
    assert (lf.model, lf.scaling_factor, lf.shift_factor, lf.latents_mean) == ("my/vae", 1.0, None, None)


# ---- cli/comfy.py ------------------------------------------------------------------------------------------------

FLUX2_TINY = AutoencoderKLConfig(
    block_out_channels=(32,),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=1,
    scaling_factor=1.0,
    latent_patch_size=2,
    sample_size=64,
    force_upcast=False,
    latents_mean=(0.1, -0.2, 0.3, -0.4),
    latents_std=(1.5, 2.0, 0.5, 1.0),
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset: one latent cell is 2x2 pixels."""
    return saved_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def patched_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A FLUX.2-like model in 2x2 patches with its latent statistics ("stats") and without ("bare")."""
    dirs = {}
    for name, cfg in (("stats", FLUX2_TINY), ("bare", FLUX2_TINY.replace(latents_mean=None, latents_std=None))):
        torch.manual_seed(0)
        dirs[name] = klvae.AutoencoderKL(cfg).save_pretrained(tmp_path_factory.mktemp(name))
    return dirs


def _cpu(model: Path) -> list[str]:
    return ["--model", str(model), "--device", "cpu", "--dtype", "fp32"]


def test_an_image_narrower_than_one_latent_cell_is_refused_naming_its_size_and_the_cell(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = rgb_image(tmp_path / "thin.png", w=1, h=6)
    assert main(["encode", str(img), "-o", str(tmp_path / "x.latent"), *_cpu(tiny_dir)]) == 2
    assert (
        f"{img} is 6x1 pixels, smaller than one latent cell of this model (2x2); ComfyUI's VAEEncode would crop "
        "it to nothing"
    ) in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.latent").exists()


def test_images_of_two_crops_are_refused_naming_the_first_image_of_each_and_the_cell(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a and b both crop to 6x8; c to 10x8: the message names the first of a crop, with its size before cropping.
    sizes = [(7, 9), (6, 8), (10, 8)]
    imgs = [rgb_image(tmp_path / f"{n}.png", w=w, h=h) for n, (h, w) in zip("abc", sizes, strict=True)]
    out = tmp_path / "x.latent"
    assert main(["encode", *map(str, imgs), "-o", str(out), *_cpu(tiny_dir)]) == 2
    assert (
        f"--output {out}: a ComfyUI latent is one batch of one size, but {imgs[0]} is 7x9 and {imgs[2]} 10x8 "
        "(height x width, each side cropped to a multiple of 2 as ComfyUI's VAEEncode does); encode each size to "
        "a .latent of its own"
    ) in one_error_line(capsys.readouterr().err)


def test_encode_warns_how_many_images_it_crops(
    tmp_path: Path, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    imgs = [
        rgb_image(tmp_path / f"{n}.png", w=w, h=h, seed=i)
        for i, (n, (h, w)) in enumerate(zip("abc", [(7, 9), (6, 8), (7, 8)], strict=True))
    ]
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main(["encode", *map(str, imgs), "-o", str(tmp_path / "x.latent"), *_cpu(tiny_dir)]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "cropping 2 image(s) to 6x8 (height x width), centred, as ComfyUI's VAEEncode does"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main(["encode", str(imgs[1]), "-o", str(tmp_path / "y.latent"), *_cpu(tiny_dir)]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_sample_draws_from_the_given_seed(tmp_path: Path) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    got = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(["-q", "encode", img, "-o", str(tmp_path / f"{name}.latent"), "--sample", "--seed", seed]) == 0
        got[name] = load_comfy_latent(tmp_path / f"{name}.latent").samples
    assert torch.equal(got["a"], got["b"]) and not torch.equal(got["a"], got["c"])


def test_non_finite_latents_of_a_batch_name_its_first_image_and_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(klvae.cli.comfy, "to_comfy", lambda z, norm: torch.full_like(z, float("nan")))
    imgs = [str(rgb_image(tmp_path / f"{n}.png", seed=i)) for i, n in enumerate("ab")]
    assert main(["encode", *imgs, "-o", str(tmp_path / "x.latent")]) == 2
    assert f"the model produced non-finite latents for {imgs[0]} (or its batch)" in one_error_line(
        capsys.readouterr().err
    )


@pytest.mark.parametrize(("model", "warned"), [("tiny", False), ("bare", True), ("stats", False)])
def test_only_a_patched_model_without_statistics_is_warned_of(
    tmp_path: Path,
    tiny_dir: Path,
    patched_dirs: dict[str, Path],
    model: str,
    warned: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tiny_dir if model == "tiny" else patched_dirs[model]
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main(["encode", str(rgb_image(tmp_path / "a.png")), "-o", str(tmp_path / "x.latent"), *_cpu(path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if "no latent statistics" in r.getMessage()]
    assert warnings == (
        [
            "this model has latent patches but no latent statistics (FLUX.2's BatchNorm): its latents "
            "are patched but not normalised, unlike those of ComfyUI's FLUX.2 VAE"
        ]
        if warned
        else []
    )


def test_encode_counts_an_unreadable_image_once_and_records_the_model(
    tmp_path: Path, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(2):
        rgb_image(tmp_path / "in" / f"a{i}.png", seed=i)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "x.latent"
    with caplog.at_level(logging.INFO, logger="klvae"):
        assert main(["encode", str(tmp_path / "in"), "-o", str(out), *_cpu(tiny_dir)]) == 1
    assert f"encoded 2 image(s) to {out}, latents [2, 4, 8, 8], skipped 1" in [r.getMessage() for r in caplog.records]
    assert load_comfy_latent(out).metadata["klvae.model"] == str(tiny_dir)


def test_decode_says_when_a_file_is_of_the_first_format_and_how_many_it_decoded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_file({"latent_tensor": torch.zeros(2, 4, 2, 2)}, str(tmp_path / "old.latent"))
    save_comfy_latent(tmp_path / "new.latent", torch.zeros(1, 4, 2, 2))
    for name in ("old", "new"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="klvae"):
            assert main(["decode", str(tmp_path / f"{name}.latent"), "-o", str(tmp_path / name)]) == 0
        lines = [r.getMessage() for r in caplog.records]
        first = (
            f"{tmp_path / 'old.latent'} has no latent_format_version_0 marker: ComfyUI's first format, its "
            "latents multiplied by 1/0.18215 as LoadLatent does"
        )
        assert (first in lines) == (name == "old")
        assert f"decoded {2 if name == 'old' else 1} image(s) to {tmp_path / name}" in lines


def test_decode_refuses_latents_with_fewer_channels_than_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_comfy_latent(tmp_path / "x.latent", torch.zeros(1, 2, 2, 2))
    assert main(["decode", str(tmp_path / "x.latent"), "-o", str(tmp_path / "out")]) == 2
    assert (
        f"{tmp_path / 'x.latent'}: its latents have 2 channels, but this model's ComfyUI latents have 4"
        in one_error_line(capsys.readouterr().err)
    )


def test_decode_refuses_flux2_latents_that_overflow_once_unnormalised(
    tmp_path: Path, patched_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    save_comfy_latent(tmp_path / "x.latent", torch.full((1, 4, 2, 2), 3e38))
    assert main(["decode", str(tmp_path / "x.latent"), "-o", str(tmp_path / "out"), *_cpu(patched_dirs["stats"])]) == 2
    assert "latents overflow to inf once unscaled" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---- training/data_setup.py --------------------------------------------------------------------------------------


def _train_cfg(tmp: Path, *sets: str) -> TrainConfig:
    return load_config(
        None,
        [
            "model.preset=tiny",
            f"data.train={tmp / 'images'}",
            "data.resolution=16",
            "data.batch_size=2",
            "data.num_workers=0",
            "train.device=cpu",
            f"train.out_dir={tmp / 'run'}",
            "loss.preset=mse",
            *sets,
        ],
    )


def test_check_train_data_names_the_field_and_leaves_data_val_alone_when_told(tmp_path: Path) -> None:
    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    cfg = _train_cfg(tmp_path, f"data.val={tmp_path / 'nowhere'}")
    check_train_data(cfg, 1, val=False)  # exactly one global batch, and data.val not looked at
    with pytest.raises(KlvaeError) as e:
        check_train_data(cfg, 1)
    assert one_line(e) == f"data.val: no such data: {tmp_path / 'nowhere'}"
    with pytest.raises(KlvaeError) as e:
        check_train_data(_train_cfg(tmp_path, f"data.train={tmp_path / 'absent'}"), 1, val=False)
    assert one_line(e) == f"data.train: no such data: {tmp_path / 'absent'}"


def test_a_dataset_of_unreadable_files_only_is_told_to_add_readable_images(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"bad{i}.png").write_bytes(b"not an image")
    with pytest.raises(KlvaeError) as e:
        check_train_data(_train_cfg(tmp_path, "data.batch_size=2"), 2, val=False)
    assert one_line(e).endswith(
        "has 3 item(s) (files or rows found; 3 of them unreadable), fewer than one global "
        "batch of 4 (data.batch_size 2 x 2 process(es)): add readable images"
    )


def test_new_pass_marks_the_first_batch_of_each_epoch_also_after_a_resume(tmp_path: Path) -> None:
    noise_folder(tmp_path / "images", 4, hw=(16, 16))
    cfg = _train_cfg(tmp_path)
    assert [next(it)["new_pass"] for it in [build_train_loader(cfg, DistInfo())] for _ in range(5)] == [
        True,
        False,
        True,
        False,
        True,
    ]
    resumed = build_train_loader(cfg, DistInfo(), start_batch=3)
    assert [next(resumed)["new_pass"] for _ in range(3)] == [False, True, False]


def test_a_pass_over_tar_shards_without_any_image_stops_training(tmp_path: Path) -> None:
    shard = tmp_path / "empty-0.tar"
    with tarfile.open(shard, "w"):
        pass  # a shard of no files at all
    loader = build_train_loader(_train_cfg(tmp_path, f"data.train={shard}"), DistInfo())
    raised: list[BaseException] = []

    def first_batch() -> None:
        try:
            next(loader)
        except BaseException as e:  # handed to the test's thread
            raised.append(e)

    # A loader that never notices the empty pass loops forever: a deadline turns that into a failure, not a hang.
    worker = threading.Thread(target=first_batch, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the loader kept looking for samples in a shard without any"
    assert len(raised) == 1 and isinstance(raised[0], KlvaeError), raised
    assert str(raised[0]) == (
        f"no training samples in {shard} (rank 0 of 1): a whole pass over the data yielded nothing")


def test_validation_skips_unreadable_images_and_warns_when_none_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    noise_folder(tmp_path / "val", 2, hw=(16, 16))
    (tmp_path / "val" / "a_bad.png").write_bytes(b"not an image")
    batches = build_val_batches(_train_cfg(tmp_path, f"data.val={tmp_path / 'val'}", "data.val_images=4"))
    assert [b.shape for b in batches] == [torch.Size([2, 3, 16, 16])]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="klvae.training.data_setup"):
        assert build_val_batches(_train_cfg(tmp_path, f"data.val={tmp_path / 'bad'}")) == []
    messages = [r.getMessage() for r in caplog.records]
    assert f"no readable validation images in {tmp_path / 'bad'}: the run is not validated" in messages


def _epoch_by_key(cfg: TrainConfig, batches: int) -> dict[str, torch.Tensor]:
    loader = build_train_loader(cfg, DistInfo())
    return {k: x for b in (next(loader) for _ in range(batches)) for k, x in zip(b["keys"], b["pixels"], strict=True)}


@pytest.mark.parametrize("stream", [False, True])
def test_train_seed_sets_each_images_crops_and_flips(tmp_path: Path, stream: bool) -> None:
    noise_folder(tmp_path / "images", 4, hw=(24, 24))
    data = tmp_path / "images"
    if stream:
        data = tmp_path / "images-0.tar"
        with tarfile.open(data, "w") as tf:
            for p in sorted((tmp_path / "images").iterdir()):
                tf.add(p, arcname=p.name)
    sets = [f"data.train={data}", "data.crop=random", "data.flip=0.5", "data.scale_min=0.5"]
    one, again, other = (_epoch_by_key(_train_cfg(tmp_path, *sets, f"train.seed={s}"), 2) for s in (1, 1, 2))
    assert one.keys() == other.keys() and len(one) == 4
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert all(not torch.equal(one[k], other[k]) for k in one)


def test_cache_images_keeps_the_training_images_in_memory(tmp_path: Path) -> None:
    noise_folder(tmp_path / "images", 2, hw=(16, 16))
    loader = build_train_loader(_train_cfg(tmp_path, "data.cache_images=true"), DistInfo())
    first = next(loader)
    for p in (tmp_path / "images").iterdir():
        p.unlink()  # the second pass must come from memory
    second = next(loader)
    assert second["skipped"] == 0 and sorted(second["keys"]) == sorted(first["keys"])
