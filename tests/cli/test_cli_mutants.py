"""The command line's smaller promises, each pinned by value: option bounds at their first refused value (--batch-
size 0, --seed 2**63, --tile-size 0, --beta-start 0), K = 1024 bytes, documented defaults (encode's and scale's
--batch-size 4, eval's --resolution 256 and --examples 4), --debug raising what the one line hides (an out-of-
memory error too), help naming a default once; --subfolder, --config, --sample, --seed, --tile-size (in
reconstruct and a ComfyUI .latent's decode), scale's --batch-size and --no-shift, eval's --limit, --examples,
--tile-size, --no-lpips and --no-fid reaching the library; a lone undecodable image named in the error, images
that all fail refused (before the model loads when no header reads), items kept in input order with numbered keys,
a .latent's encode skipping and counting a bad image (exit status 1), SSIM from an 11-pixel side, PSNR of the
8-bit image written, an image over the pixel limit given to decode called an image, scale's unreadable images
counted with exit status 1, eval's summary line, a new training run refused in a folder holding another, noise's
default flow steps on a short schedule and its --seed, `info`'s diffusion latent line for patched models only, the
warning on other latent factors, and decoded PNGs that are PNGs, named whole (up to 200 bytes), never two alike,
with a warning where an item's name was a path."""

import argparse
import dataclasses
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import klvae
from helpers import counting_tiled_calls, noise_png, one_error_line, rgb_image, saved_tiny_model
from klvae.cli import common
from klvae.cli.codec import unique_png_names
from klvae.cli.main import build_parser, main
from klvae.latents.file import LatentItem, load_latents, save_latents

# Every command runs the built-in demo model (x8, loads in a fraction of a second) unless it names another.


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# ---- option values at the edges of what is allowed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--sample", "--seed", str(2**63)], "--seed must be between 0 and 9223372036854775807"),
        (["--tile-size", "0"], "--tile-size must be at least 1, got 0"),
    ],
)
def test_the_first_value_past_each_bound_is_refused(tmp_path: Path, options: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(rgb_image(tmp_path / "a.png")), "-o", str(z), *options]) == 2
    assert message in _err(capsys)
    assert not z.exists()


@pytest.mark.parametrize(("text", "size"), [("2K", 2048), ("3kib", 3 * 1024), ("1KB", 1024)])
def test_a_kilobyte_is_1024_bytes(text: str, size: int) -> None:
    assert common.parse_bytes(text) == size  # as M, G and T: powers of 1024


def test_documented_defaults() -> None:
    parser = build_parser()
    assert parser.parse_args(["encode", "x.png", "-o", "y.safetensors"]).batch_size == 4
    assert parser.parse_args(["scale", "--data", "d"]).batch_size == 4  # README: "--batch-size crops a pass (4)"


# ---- --debug: the traceback instead of the one line


@pytest.mark.parametrize("error", [RuntimeError("a bug"), MemoryError("no room")])
def test_debug_raises_what_the_one_line_would_hide(error: Exception, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def fail(_args: object) -> int:
        raise error

    monkeypatch.setattr("klvae.cli.codec.cmd_info", fail)  # register() binds it when main builds the parser
    assert main(["info"]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("klvae: internal error: RuntimeError: a bug" if isinstance(error, RuntimeError)
                           else "klvae: error: out of memory (no room)"), line
    with pytest.raises(type(error)):
        main(["--debug", "info"])


def test_help_names_a_default_once() -> None:
    """An option whose help already says its default gets no "(default: ...)" after it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    said = 0
    for p in sub.choices.values():
        for a in p._actions:
            if a.help and "default" in a.help.lower() and a.default not in (None, False, True, []):
                said += 1
                assert "(default: " not in p._get_formatter()._get_help_string(a), (a.option_strings, a.help)
    assert said >= 2  # convert --dtype, cache --store


# ---- what the options reach


def test_info_of_a_preset_with_its_own_name_as_config_needs_no_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "tiny", "--config", "tiny"]) == 0
    assert "weights: preset, no weights" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny preset saved in a subfolder of a pipeline-like folder, and its bare weights (no config) as one file."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    vae = klvae.AutoencoderKL("tiny")
    vae.save_pretrained(root / "pipe" / "mine")  # not "vae", which a pipeline folder's loader finds unasked
    # The bare weights, no config: alone, their GroupNorm groups would be guessed (32, where tiny has 8).
    bare = root / "w.safetensors"
    save_file({k: t.contiguous() for k, t in vae.state_dict().items()}, str(bare))
    return root / "pipe", bare


def test_subfolder_and_config_reach_the_loader(tiny_weights: tuple[Path, Path], tmp_path: Path) -> None:
    pipe, bare = tiny_weights
    img = str(rgb_image(tmp_path / "a.png"))
    runs = {"folder": ["--model", str(pipe), "--subfolder", "mine"],
            "file": ["--model", str(bare), "--config", "tiny"], "guessed": ["--model", str(bare)]}
    z = {}
    for name, model in runs.items():
        assert main(["-q", "encode", img, "-o", str(tmp_path / f"{name}.safetensors"), *model]) == 0
        z[name] = load_latents(tmp_path / f"{name}.safetensors").latents["000000"]
    torch.testing.assert_close(z["file"], z["folder"])
    assert not torch.allclose(z["guessed"], z["folder"], atol=1e-3)


def test_info_takes_config_for_a_weights_file(tiny_weights: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, bare = tiny_weights
    groups = []
    for config in (["--config", "tiny"], []):
        assert main(["-q", "info", "--model", str(bare), "--json", *config]) == 0
        groups.append(json.loads(capsys.readouterr().out)["config"]["norm_num_groups"])
    assert groups == [8, 32]


def test_info_shows_the_diffusion_latent_of_a_patched_model_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--config", "flux2"]) == 0
    assert "diffusion latent: 2x2 patches, 128 channels at 1/16 of the image's size" in capsys.readouterr().out
    assert main(["info", "--model", "tiny"]) == 0
    assert "diffusion latent" not in capsys.readouterr().out


def test_tile_size_reaches_reconstruct_and_comfy_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_tiled_calls(monkeypatch)
    img = str(rgb_image(tmp_path / "a.png", w=16, h=32))
    assert main(["-q", "reconstruct", img, "-o", str(tmp_path / "r.png"), "--tile-size", "16"]) == 0
    assert calls == {"encode": 1, "decode": 1}
    assert main(["-q", "encode", img, "-o", str(tmp_path / "z.latent")]) == 0  # ComfyUI's: decoded tiled as well
    assert main(["-q", "decode", str(tmp_path / "z.latent"), "-o", str(tmp_path / "d"), "--tile-size", "16"]) == 0
    assert calls == {"encode": 1, "decode": 2}


def test_sample_and_seed_reach_the_posterior(tmp_path: Path) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    runs = {"mean": [], "s1": ["--sample", "--seed", "1"], "s2": ["--sample", "--seed", "2"]}
    files = {}
    for name, extra in runs.items():
        assert main(["-q", "encode", img, "-o", str(tmp_path / f"{name}.safetensors"), *extra]) == 0
        files[name] = load_latents(tmp_path / f"{name}.safetensors")
    z = {name: lf.latents["000000"] for name, lf in files.items()}
    assert files["mean"].extra["posterior"] == "mean" and files["s1"].extra["posterior"] == "sample"
    assert not torch.allclose(z["s1"], z["mean"]) and not torch.allclose(z["s1"], z["s2"])


def test_reconstruct_measures_ssim_from_an_11_pixel_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SSIM's 11x11 window fits an image 11 pixels high: the score is a number there, n/a only below."""
    img = rgb_image(tmp_path / "a.png", w=16, h=11)
    assert main(["-q", "reconstruct", str(img), "-o", str(tmp_path / "r.png"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["size"] == [16, 11] and isinstance(d["ssim"], float) and 0 < d["ssim"] < 1


def test_reconstruct_scores_the_8_bit_image_it_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PSNR is that of the PNG written, against the original, as uint8 images with data_range 255."""
    img = tmp_path / "flat.png"
    Image.new("RGB", (16, 16), (120, 131, 142)).save(img)  # a flat image: small errors, so rounding shows
    out = tmp_path / "r.png"
    assert main(["-q", "reconstruct", str(img), "-o", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    a, b = (np.asarray(Image.open(p), dtype=np.float64) for p in (img, out))
    assert d["psnr"] == pytest.approx(10 * np.log10(255**2 / np.mean((a - b) ** 2)), abs=1e-4)


# ---- encode: what is written, and what is refused


def test_a_lone_image_that_cannot_be_decoded_is_named_in_the_error(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.png"
    cut.write_bytes(noise_png(0)[:200])  # its header is whole, its pixels are not
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(cut), "-o", str(z)]) == 2
    line = _err(capsys)
    assert str(cut) in line and "none of the" not in line, line
    assert not z.exists()


def test_a_folder_of_unreadable_images_is_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"not{i}.png").write_bytes(b"no image at all")

    def no_model(_args: object) -> None:
        raise AssertionError("the model was loaded for images none of which can be read")

    monkeypatch.setattr("klvae.cli.codec.load_model", no_model)
    assert main(["encode", str(folder), "-o", str(tmp_path / "z.safetensors")]) == 2
    assert _err(capsys) == "klvae: error: none of the 2 images could be read"


def test_a_folder_of_images_that_all_fail_to_decode_is_an_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"cut{i}.png").write_bytes(noise_png(i)[:200])  # their headers are whole, their pixels are not
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(folder), "-o", str(z)]) == 2
    assert _err(capsys) == "klvae: error: none of the 2 images could be read"
    assert not z.exists()


def test_encode_keeps_the_input_order_and_numbers_the_keys(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for i, (name, w) in enumerate([("a.png", 16), ("b.png", 24), ("c.png", 16)]):
        rgb_image(folder / name, w=w, seed=i)
    z = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(folder), "-o", str(z), "--batch-size", "2"]) == 0
    lf = load_latents(z)
    # Images of one size are encoded together, but the file lists them as they were found.
    assert [(it.name, it.key, it.width) for it in lf.items] == [("a.png", "000000", 16), ("b.png", "000001", 24),
                                                                  ("c.png", "000002", 16)]
    assert sorted(lf.latents) == ["000000", "000001", "000002"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG of that size whose pixel data is empty: its header reads, its pixels never would."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_decode_given_a_huge_image_says_it_is_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(20_000, 20_000))  # over the pixel limit: still an image, not latents
    assert main(["decode", str(huge), "-o", str(tmp_path / "out")]) == 2
    assert "huge.png is an image, not a latents file" in _err(capsys)


# ---- scale, eval, train, noise


def test_scale_counts_an_unreadable_image_and_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.latents import scale

    batch_sizes = []
    real = scale.estimate_factors

    def estimate(*args: object, **kwargs: object) -> dict:
        batch_sizes.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(scale, "estimate_factors", estimate)
    data = tmp_path / "data"
    for i in range(2):
        rgb_image(data / f"a{i}.png", seed=i)
    (data / "broken.png").write_bytes(b"not an image")
    argv = ["-q", "scale", "--data", str(data), "--resolution", "16", "--no-shift", "--batch-size", "3"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "shift_factor None" in out and "over 2 images, skipped 1 unreadable" in out, out
    assert batch_sizes == [3]


def test_eval_options_reach_the_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from klvae.evaluation import evaluate

    seen: list[tuple[object, dict]] = []

    def record_nets(device: object, **kwargs: object) -> dict:
        seen.append(("nets", kwargs))
        return {}

    def record_run(models: dict, data: str, out: str, opts: object, *rest: object) -> dict:
        seen.append((opts, {}))
        return {"models": {}, "images": {"evaluated": 1, "skipped": 0}}

    monkeypatch.setattr(evaluate, "build_metric_nets", record_nets)
    monkeypatch.setattr(evaluate, "run_evaluation", record_run)
    rgb_image(tmp_path / "data" / "a.png")
    base = ["-q", "eval", "--data", str(tmp_path / "data"), "-o"]
    assert main([*base, str(tmp_path / "r1")]) == 0
    assert capsys.readouterr().out == f"1 image; report: {tmp_path / 'r1' / 'index.html'}\n"
    assert main([*base, str(tmp_path / "r2"), "--limit", "3", "--examples", "2", "--tile-size", "64", "--no-lpips",
                 "--no-fid"]) == 0
    (_, nets1), (opts1, _), (_, nets2), (opts2, _) = seen
    assert (opts1.resolution, opts1.limit, opts1.examples, opts1.tiling) == (256, None, 4, None)  # README: 256
    assert (opts2.limit, opts2.examples, opts2.tiling.tile_size) == (3, 2, 64)
    assert (nets1["lpips"], nets1["fid"], nets2["lpips"], nets2["fid"]) == (True, True, False, False)


def test_a_new_training_run_is_refused_in_a_folder_holding_another(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    recipe = Path(__file__).parents[2] / "recipes" / "demo" / "train.yaml"
    sets = [f"train.out_dir={out}", f"data.train={tmp_path / 'none'}", f"data.val={tmp_path / 'none'}"]
    assert main(["train", str(recipe), *(a for s in sets for a in ("--set", s))]) == 2
    assert f"train.out_dir {out} already holds a run (checkpoints)" in _err(capsys)


def test_noise_flow_default_steps_start_at_1_on_a_short_schedule(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    assert main(["-q", "noise", img, "-o", str(tmp_path / "s.png"), "--schedule", "flow", "--num-steps", "50"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 's.png'}: t = 1, 5, 12, 25, 38, 50 (")


def test_noise_seed_draws_the_noise(tmp_path: Path) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    for seed in ("1", "2"):
        assert main(["-q", "noise", img, "-o", str(tmp_path / f"{seed}.png"), "--steps", "500", "--seed", seed]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{seed}.png")) for seed in ("1", "2"))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_noise_refuses_a_beta_of_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(rgb_image(tmp_path / "a.png"))
    assert main(["noise", img, "-o", str(tmp_path / "s.png"), "--beta-start", "0"]) == 2
    assert "--beta-start must lie strictly between 0 and 1, got 0.0" in _err(capsys)


def test_a_comfy_latent_skips_and_counts_an_image_and_says_how_it_encoded(tmp_path: Path) -> None:
    from safetensors import safe_open

    folder = tmp_path / "in"
    for i in range(2):
        rgb_image(folder / f"a{i}.png", seed=i)
    (folder / "cut.png").write_bytes(noise_png(0, size=(16, 16))[:200])  # a whole header, of the same size
    for extra, posterior in (([], "mean"), (["--sample"], "sample")):
        out = tmp_path / f"{posterior}.latent"
        assert main(["-q", "encode", str(folder), "-o", str(out), *extra]) == 1  # finished, one image skipped
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert (meta["klvae.posterior"], json.loads(meta["klvae.images"])) == (posterior, ["a0.png", "a1.png"])


# ---- decode: the PNGs' names


def test_decode_keeps_a_long_name_whole_up_to_200_bytes(tmp_path: Path) -> None:
    long_name = "x" * 150
    rgb_image(tmp_path / "in" / f"{long_name}.png")
    rgb_image(tmp_path / "in" / f"{'y' * 240}.png", seed=1)
    z = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(tmp_path / "in"), "-o", str(z)]) == 0
    assert main(["-q", "decode", str(z), "-o", str(tmp_path / "out")]) == 0
    out = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in out] == [f"{long_name}.png", f"{'y' * 200}.png"]
    for p in out:
        with Image.open(p) as im:
            assert (im.format, im.size) == ("PNG", (16, 16))


@pytest.fixture(scope="module")
def normed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model with a scaling factor and per-channel statistics, and latents it encoded."""
    root = tmp_path_factory.mktemp("normed")
    model = saved_tiny_model(root / "m", scaling_factor=0.5, latents_mean=(0.1, 0.2, 0.3, 0.4),
                             latents_std=(1.0, 1.0, 1.0, 1.0))
    z = root / "z.safetensors"
    assert main(["-q", "encode", str(rgb_image(root / "a.png")), "-o", str(z), "--model", str(model)]) == 0
    return model, z


@pytest.mark.parametrize(("change", "said"), [
    ({}, None),
    ({"scaling_factor": 0.5 * (1 + 1e-8)}, None),  # float32 read-back of the same factor: no warning
    ({"scaling_factor": 0.25}, "scaling_factor 0.25 (the model's 0.5)"),
    ({"latents_mean": (0.1, 0.2, 0.3, 0.44)}, "latents_mean (largest relative difference 0.1)"),
])
def test_decode_warns_of_factors_other_than_the_models(normed: tuple[Path, Path], tmp_path: Path, change: dict,
                                                          said: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    model, z = normed
    changed = save_latents(dataclasses.replace(load_latents(z), **change), tmp_path / "z.safetensors")
    assert main(["decode", str(changed), "-o", str(tmp_path / "out"), "--model", str(model)]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("WARNING")]
    if said is None:
        assert warnings == []
    else:
        assert warnings == [f"WARNING: latents were scaled with other factors than the model's: {said}; using the "
                            "file's"]


def test_decode_says_which_name_it_wrote_for_a_path(normed: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model, z = normed
    lf = load_latents(z)
    items = [dataclasses.replace(lf.items[0], name="../up/a.png")]
    changed = save_latents(dataclasses.replace(lf, items=items), tmp_path / "z.safetensors")
    assert main(["decode", str(changed), "-o", str(tmp_path / "out"), "--model", str(model)]) == 0
    assert "WARNING: '../up/a.png' is not a plain file name; writing that item as a.png" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]


def test_unique_names_skip_every_name_another_item_asks_for() -> None:
    items = [LatentItem(name=n, key=str(i), height=1, width=1) for i, n in enumerate(["a", "a", "a_1", "a_2"])]
    # The second "a" may take neither a_1 nor a_2 (the next items' own names): it gets a_3.
    assert unique_png_names(items) == ["a.png", "a_3.png", "a_1.png", "a_2.png"]
