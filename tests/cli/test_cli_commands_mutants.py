"""Pins what a mutation audit of the noise, convert, ComfyUI .latent, info and shared-option modules found untested:
noise refusing its own input as --output, its SNR labels to 3 digits, sigma written never as "1" below 1 (to 4
digits in the summary), SD3's fixed shift and FLUX.1's / FLUX.2's named in words, --shift auto told apart by the
latent normalisation and a too-small FLUX.1 latent as a KlvaeError, --shift's bounds, case and default, the zero-SNR
and beta-range refusals and their wording, and the sheet's label strip and picture placement; convert's --to,
pickle and case rules, --dtype's case and fp32 default, and its summary line; info's JSON (indented, with the
downsample factor) and its text lines; ComfyUI .latent metadata, the batch crop check and the FLUX.2 warning given
only to patched models without statistics; and the shared checks: memory sizes (T, exponents, inf), --max-memory
below a byte, output paths (a folder named like a file in any case, a file where a folder goes, a link to an
input, a parent that is a file, a dangling link), the exists message, the data-folder message, models written into
the package through a link or over a folder's model, and which presets `info` describes without weights."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import klvae
from helpers import one_error_line, rgb_image, saved_tiny_model
from klvae import atomic
from klvae.cli import codec_info, comfy, common, noise
from klvae.cli.main import main
from klvae.diffusion import NoiseSchedule
from klvae.errors import KlvaeError
from klvae.flow import FlowSchedule
from klvae.model.config import PRESETS
from klvae.weights.load import locate


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- noise


def test_noise_refuses_its_own_image_as_output_even_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = rgb_image(tmp_path / "a.png")
    before = img.read_bytes()
    assert main(["noise", str(img), "-o", str(img), "--overwrite", "--steps", "0"]) == 2
    assert "is one of the inputs" in _err(capsys)
    assert img.read_bytes() == before


def _ddpm_args(**changes: object) -> argparse.Namespace:
    base = {
        "schedule": "scaled_linear",
        "num_steps": 1000,
        "beta_start": None,
        "beta_end": None,
        "zero_terminal_snr": False,
        "steps": [0, 500, 999],
        "shift": None,
    }
    return argparse.Namespace(**{**base, **changes})


def test_ddpm_labels_give_the_snr_to_three_digits() -> None:
    z0 = torch.zeros(1, 4, 2, 2)
    _, labels, what = noise._ddpm_noised(z0, torch.ones_like(z0), _ddpm_args())
    s = NoiseSchedule.from_name("scaled_linear", 1000)
    assert labels == [f"t={t}  SNR={float(s.snr(t).item()):.3g}" for t in (0, 500, 999)]
    assert labels[1] == "t=500  SNR=0.382"
    assert what == "scaled_linear schedule"


@pytest.mark.parametrize(
    ("sigma", "text"), [(0.99995, "0.99995"), (0.9999996, "0.9999996"), (1.0, "1"), (0.25, "0.25")]
)
def test_sigma_below_1_is_never_written_as_1(sigma: float, text: str) -> None:
    assert noise._sigma_text(sigma) == text


def test_flow_summary_gives_each_sigma_to_four_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "a.png")
    out = tmp_path / "s.png"
    assert (
        main(["-q", "noise", str(img), "-o", str(out), "--schedule", "flow", "--shift", "3", "--steps", "7", "1000"])
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert line == f"wrote {out}: t = 7, 1000 (flow schedule, shift 3; sigma = 0.02071, 1)"


def test_flow_schedule_of_sd3_uses_its_fixed_shift_of_3() -> None:
    schedule, how = noise._flow_schedule((4, 4), 1000, "auto", "sd3")
    assert how == "SD3's shift 3"
    assert float(schedule.sigma_at(500)) == pytest.approx(float(FlowSchedule(1000, shift=3.0).sigma_at(500)))
    _, how = noise._flow_schedule((4, 4), 1000, 2.5, None)
    assert how == "shift 2.5"


def test_flow_schedule_names_flux1_and_flux2_with_their_token_counts() -> None:
    _, how1 = noise._flow_schedule((4, 6), 1000, "auto", "flux")
    assert how1.startswith("FLUX.1 mu ") and how1.endswith(" for 6 tokens")
    _, how2 = noise._flow_schedule((4, 6), 1000, "auto", "flux2")
    assert how2.startswith("FLUX.2 (50 steps) mu ") and how2.endswith(" for 24 tokens")


def test_flow_schedule_of_a_latent_too_small_for_flux1_is_a_klvae_error() -> None:
    with pytest.raises(KlvaeError, match=r"--shift auto: a FLUX\.1 latent of 1x3 holds no 2x2 patch"):
        noise._flow_schedule((1, 3), 1000, "auto", "flux")


def test_flow_family_is_told_by_the_latent_normalisation() -> None:
    assert noise._flow_family(PRESETS["flux2"]) == "flux2"
    assert noise._flow_family(PRESETS["sd3"]) == "sd3"
    assert noise._flow_family(PRESETS["flux"]) == "flux"
    with pytest.raises(KlvaeError, match="--shift auto knows the VAEs of SD3"):
        noise._flow_family(PRESETS["sdxl"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--schedule", "flow", "--shift", "0"], "--shift must be a number > 0 or auto, got 0"),
        (["--shift", "3"], "--shift shifts the flow schedule, not scaled_linear; add --schedule flow"),
        (["--schedule", "flow", "--zero-terminal-snr"], "--zero-terminal-snr rescales a beta schedule"),
        (["--zero-terminal-snr", "--num-steps", "1", "--steps", "0"], "--zero-terminal-snr needs --num-steps 2"),
        (
            ["--beta-start", "0.001", "--beta-end", "0.02", "--schedule", "cosine"],
            "--beta-start and --beta-end set the range of a linear or scaled_linear schedule, not of cosine",
        ),
        (
            ["--beta-end", "0.02", "--schedule", "squaredcos_cap_v2"],
            "--beta-end sets the range of a linear or scaled_linear schedule, not of squaredcos_cap_v2",
        ),
    ],
)
def test_noise_refuses_options_that_do_not_fit_the_schedule(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.png"
    assert main(["noise", str(rgb_image(tmp_path / "a.png")), "-o", str(out), *extra]) == 2
    assert message in _err(capsys)
    assert not out.exists()


def test_shift_auto_in_any_case_and_the_default_flow_shift_of_1() -> None:
    assert noise._check_shift(_ddpm_args(schedule="flow", shift=" Auto "), True) == "auto"
    assert noise._check_shift(_ddpm_args(schedule="flow", shift=None), True) == 1.0
    assert noise._check_shift(_ddpm_args(shift=None), False) is None
    assert noise._check_shift(_ddpm_args(schedule="flow", shift="1e-3"), True) == 0.001


def test_zero_terminal_snr_on_two_steps_is_allowed() -> None:
    noise._check_betas(_ddpm_args(zero_terminal_snr=True, num_steps=2))


def test_label_is_one_line_where_it_fits_and_split_where_it_does_not() -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label = "t=0  SNR=1.23"
    assert noise._label_text(draw, label, 400) == label
    assert noise._label_text(draw, label, 32) == "t=0\nSNR=1.23"


def test_sheet_puts_each_picture_below_its_label_strip() -> None:
    red = Image.new("RGB", (40, 10), (255, 0, 0))
    sheet = noise._sheet([("", red), ("", red)])
    assert sheet.size == (80, 10 + 18)  # the least label strip: 18 rows
    assert sheet.getpixel((5, 17)) == (255, 255, 255) and sheet.getpixel((45, 18)) == (255, 0, 0)
    narrow = noise._sheet([("t=0  SNR=1.23", Image.new("RGB", (24, 10), (255, 0, 0)))])
    top = narrow.size[1] - 10
    assert top > 18  # two lines of label
    assert narrow.getpixel((5, top)) == (255, 0, 0) and narrow.getpixel((5, narrow.size[1] - 1)) == (255, 0, 0)
    assert narrow.getpixel((23, top - 1)) == (255, 255, 255)


# ---------------------------------------------------------------- convert


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return saved_tiny_model(tmp_path / "m")


@pytest.mark.parametrize(
    ("output", "extra", "message"),
    [
        ("out", ["--to", "ldm"], "an LDM-layout file must end in .safetensors"),
        ("out.ckpt", [], "klvae writes weights as safetensors, not pickles"),
        ("out.safetensors", ["--to", "diffusers"], "the diffusers layout is a folder"),
    ],
)
def test_convert_refuses_a_layout_its_output_cannot_hold(
    tmp_path: Path, tiny_model: Path, output: str, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / output
    assert main(["convert", "--model", str(tiny_model), "-o", str(out), *extra]) == 2
    assert message in _err(capsys)
    assert not out.exists()


def test_convert_to_a_folder_refuses_a_file_there(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plain"
    out.write_text("x")
    assert main(["convert", "--model", str(tiny_model), "-o", str(out), "--overwrite"]) == 2
    assert f"--output {out} is a file, not a folder" in _err(capsys)
    assert out.read_text() == "x"


def test_convert_defaults_to_fp32_and_reads_the_suffix_and_dtype_in_any_case(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "OUT.SAFETENSORS"
    assert main(["-q", "convert", "--model", str(tiny_model), "-o", str(out)]) == 0
    n = klvae.AutoencoderKL.from_pretrained(str(tiny_model)).num_parameters()["total"]
    assert capsys.readouterr().out.strip() == f"wrote {out} (ldm layout, fp32 weights, {n:,} parameters)"
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118
    half = tmp_path / "half"
    assert main(["-q", "convert", "--model", str(tiny_model), "-o", str(half), "--dtype", "FP16"]) == 0
    assert "diffusers layout, FP16 weights" in capsys.readouterr().out
    assert (half / "config.json").is_file()


def test_convert_keeps_an_existing_model_and_the_folder_it_reads(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (tiny_model / "config.json").read_text()
    other = saved_tiny_model(tmp_path / "other", latent_channels=8)
    assert main(["convert", "--model", str(tiny_model), "-o", str(other)]) == 2
    assert f"--output {other}: {other / 'config.json'} already exists" in _err(capsys)
    assert json.loads((other / "config.json").read_text())["latent_channels"] == 8
    assert main(["convert", "--model", str(tiny_model), "-o", str(tmp_path)]) == 2
    assert f"--output {tmp_path} holds the model being converted" in _err(capsys)
    assert (tiny_model / "config.json").read_text() == before and not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------- info


def test_info_json_is_indented_and_holds_the_downsample_factor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "info", "--config", "sdxl", "--json"]) == 0
    out = capsys.readouterr().out
    d = json.loads(out)
    assert d["downsample_factor"] == 8 and d["stored_dtype"] is None
    assert out.startswith('{\n  "model": "sdxl",')


def test_info_text_lines(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "info", "--config", "flux2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "stored dtype: none (no weights)" in lines
    assert "diffusion latent: 2x2 patches, 128 channels at 1/16 of the image's size" in lines
    assert main(["-q", "info", "--model", str(tiny_model)]) == 0
    lines = capsys.readouterr().out.splitlines()
    vae = klvae.AutoencoderKL.from_pretrained(str(tiny_model))
    n = vae.num_parameters()
    assert n["encoder"] != n["decoder"]
    assert f"parameters: {n['total']:,} (encoder {n['encoder']:,}, decoder {n['decoder']:,})" in lines
    assert "stored dtype: fp32" in lines
    assert not [line for line in lines if line.startswith("diffusion latent")]  # no latent patches: no such line


def test_stored_dtype_of_a_file_without_floating_point_values_is_none(tmp_path: Path) -> None:
    f = tmp_path / "ints.safetensors"
    save_file({"x": torch.zeros(3, dtype=torch.int64)}, str(f))
    assert codec_info.stored_dtype(f) == "none"


# ---------------------------------------------------------------- ComfyUI .latent


def test_latent_metadata_names_the_posterior_and_the_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a, b = rgb_image(tmp_path / "d" / "a.png"), rgb_image(tmp_path / "d" / "b.png", seed=1)
    out = tmp_path / "x.latent"
    with caplog.at_level(logging.WARNING, logger="klvae"):
        assert main(["encode", str(a), str(b), "-o", str(out)]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no FLUX.2 warning for the demo
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["klvae.posterior"] == "mean" and meta["klvae.model"] == "demo"
    assert json.loads(meta["klvae.images"]) == ["a.png", "b.png"]


def test_flux2_warning_only_for_patched_models_without_statistics(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    flux2 = PRESETS["flux2"]
    n = flux2.latent_channels * flux2.latent_patch_size**2
    with_stats = flux2.replace(latents_mean=(0.0,) * n, latents_std=(1.0,) * n)
    with caplog.at_level(logging.WARNING, logger="klvae"):
        comfy._warn_without_statistics(SimpleNamespace(config=with_stats))
        comfy._warn_without_statistics(SimpleNamespace(config=PRESETS["sdxl"]))
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="klvae"):
        comfy._warn_without_statistics(SimpleNamespace(config=flux2))
    assert "latent patches but no latent statistics" in caplog.text


def test_cropped_skips_an_image_of_another_size_and_crops_the_centre(tmp_path: Path) -> None:
    x = torch.arange(3 * 20 * 20, dtype=torch.float32).reshape(3, 20, 20)
    bad: list[Path] = []
    kept = comfy._cropped([(Path("a.png"), x), (Path("b.png"), torch.zeros(3, 8, 8))], (16, 16), 8, bad)
    assert bad == [Path("b.png")] and [p for p, _ in kept] == [Path("a.png")]
    assert torch.equal(kept[0][1], x[:, 2:18, 2:18])


# ---------------------------------------------------------------- shared options and checks


@pytest.mark.parametrize(
    ("text", "value"),
    [("1T", 2**40), ("1tib", 2**40), ("1.5e+3", 1500), ("2e-0k", 2048), (" 3 MB ", 3 * 2**20), ("7", 7)],
)
def test_parse_bytes_reads_units_and_exponents(text: str, value: int) -> None:
    assert common.parse_bytes(text) == value


def test_parse_bytes_refuses_infinity_and_unknown_units() -> None:
    with pytest.raises(KlvaeError, match="the memory size '1e999' is too large"):
        common.parse_bytes("1e999")
    with pytest.raises(KlvaeError, match="cannot read the memory size '2 parsecs'"):
        common.parse_bytes("2 parsecs")


def test_tiling_from_args_bounds_and_defaults() -> None:
    assert common.tiling_from_args(argparse.Namespace(tile_size=None, max_memory=None)) is None
    t = common.tiling_from_args(argparse.Namespace(tile_size=None, max_memory="1"))
    assert t is not None and t.max_memory == 1 and t.tile_size is None
    t = common.tiling_from_args(argparse.Namespace(tile_size=5, max_memory=None))
    assert t is not None and t.tile_size == 5 and t.max_memory is None
    with pytest.raises(KlvaeError, match=r"--max-memory must be at least 1 byte, got '0.5'"):
        common.tiling_from_args(argparse.Namespace(tile_size=None, max_memory="0.5"))


def test_check_output_path_folder_and_file_rules(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(KlvaeError, match="is a folder; name a file"):
        common.check_output_path(d, "-o")
    with pytest.raises(KlvaeError, match="is a file, not a folder"):
        common.check_output_path(f, "-o", folder=True)
    with pytest.raises(KlvaeError, match="ends like a file's; name a folder"):
        common.check_output_path(tmp_path / "OUT.PNG", "-o", folder=True)
    with pytest.raises(KlvaeError, match=f"-o {f / 'x.png'}: {f} is a file, not a folder"):
        common.check_output_path(f / "x.png", "-o")
    with pytest.raises(KlvaeError, match=f"{f} is a file, not a folder"):
        common.check_output_path(f / "new" / "deeper", "-o", folder=True)
    assert common.check_output_path(tmp_path / "new" / "deeper" / "x.png", "-o") == tmp_path / "new/deeper/x.png"
    assert common.check_output_path(d, "-o", folder=True) == d


def test_an_existing_output_folder_must_itself_be_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "d"
    d.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != d and real(path, mode))
    with pytest.raises(KlvaeError, match=f"-o {d}: no permission to write in {d}"):
        common.check_output_path(d, "-o", folder=True)


def test_check_output_path_refuses_a_link_to_an_input(tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    src.write_text("x")
    link = tmp_path / "link.png"
    link.symlink_to(src)
    with pytest.raises(KlvaeError, match="is one of the inputs; it would be overwritten"):
        common.check_output_path(link, inputs=[src])
    assert common.check_output_path(link, inputs=[tmp_path / "missing.png"]) == link


def test_check_new_file_refuses_a_dangling_link_and_names_it_once(tmp_path: Path) -> None:
    link = tmp_path / "out.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(KlvaeError) as e:
        common.check_new_file(link, "-o", overwrite=False)
    assert str(e.value) == f"-o {link} already exists; add --overwrite to replace it"
    assert common.check_new_file(link, "-o", overwrite=True) == link


def test_exists_error_names_the_file_inside_a_folder() -> None:
    e = common.exists_error("-o", Path("o"), Path("o/config.json"), " (an earlier model)")
    assert str(e) == "-o o: o/config.json already exists (an earlier model); add --overwrite to replace it"


def test_check_model_output_refuses_a_folder_holding_a_model_and_the_package_through_a_link(
    tmp_path: Path, tiny_model: Path
) -> None:
    with pytest.raises(KlvaeError, match=f"--output {tiny_model}: {tiny_model / 'config.json'} already exists"):
        common.check_model_output(tiny_model, "--output", overwrite=False)
    common.check_model_output(tiny_model, "--output", overwrite=True)
    common.check_model_output(tmp_path / "empty", "--output", overwrite=False)
    link = tmp_path / "pkg"
    link.symlink_to(common.package_dir())
    with pytest.raises(KlvaeError, match="is inside the installed klvae package"):
        common.check_model_output(link / "assets" / "x.safetensors", "--output", overwrite=True)
    # ".." after a link is taken where the link leads, as the write would take it
    (tmp_path / "assets").symlink_to(common.package_dir() / "assets")
    with pytest.raises(KlvaeError, match="is inside the installed klvae package"):
        common.check_model_output(tmp_path / "assets" / ".." / "x.safetensors", "--output", overwrite=True)


def test_check_not_the_model_refuses_a_folder_holding_it(tmp_path: Path, tiny_model: Path) -> None:
    source = locate(str(tiny_model), None)
    with pytest.raises(KlvaeError, match=f"--output {tmp_path} holds the model"):
        common.check_not_the_model(tmp_path, "--output", source, folder=True, what="the model")
    common.check_not_the_model(tmp_path, "--output", source, folder=False, what="the model")
    with pytest.raises(KlvaeError, match="would overwrite the model"):
        common.check_not_the_model(source.weights, "--output", source, folder=False, what="the model")


def test_check_not_in_data_says_is_or_is_inside(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(KlvaeError, match=f"--out {data} is the input folder"):
        atomic.check_not_in_data(data, "--out", str(data))
    with pytest.raises(KlvaeError, match=f"--out {data / 'r'} is inside the input folder"):
        atomic.check_not_in_data(data / "r", "--out", str(data))
    atomic.check_not_in_data(tmp_path / "r", "--out", str(data))
    shards = tmp_path / "data.tar"  # a file of data, not a folder: only what it holds is read
    shards.write_bytes(b"x")
    atomic.check_not_in_data(shards, "--out", str(shards))


def test_check_seed_names_its_flag() -> None:
    assert common.check_seed(0) == 0
    with pytest.raises(KlvaeError, match=r"--data-seed must be between 0 and 9223372036854775807, got -1"):
        common.check_seed(-1, "--data-seed")


@pytest.mark.parametrize(
    ("model", "config", "described"),
    [
        (None, "sdxl", "sdxl"),
        (None, "nonsense", None),
        (None, None, None),
        ("tiny", None, "tiny"),
        ("tiny", "tiny", "tiny"),
        ("tiny", "sdxl", None),
        ("sdxl", None, None),
        ("flux2-small-decoder", None, None),
        ("some/folder", None, None),
    ],
)
def test_preset_to_describe(model: str | None, config: str | None, described: str | None) -> None:
    assert common.preset_to_describe(argparse.Namespace(model=model, config=config)) == described


def test_model_args_without_run_describe_on_the_cpu_in_fp32() -> None:
    p = argparse.ArgumentParser()
    common.add_model_args(p, run=False)
    a = p.parse_args([])
    assert (a.device, a.dtype, a.batch_size, a.compile, a.fused_norm, a.model) == (
        "cpu",
        "fp32",
        None,
        False,
        False,
        None,
    )
    p = argparse.ArgumentParser()
    common.add_model_args(p)
    a = p.parse_args([])
    assert (a.device, a.dtype, a.batch_size, a.compile, a.fused_norm) == ("auto", "auto", 4, False, None)


def test_an_unwritable_parent_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(KlvaeError, match=f"no permission to write in {tmp_path}"):
        common.check_output_path(tmp_path / "x.png", "-o")
