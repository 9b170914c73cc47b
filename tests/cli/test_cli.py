"""`klvae encode | decode | reconstruct | info | noise` and their error paths (one line, non-zero exit)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import klvae
from helpers import counting_tiled_calls, one_error_line
from klvae import inference
from klvae.cli.main import main
from klvae.images import load_image, pil_to_tensor
from klvae.latents.file import load_latents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    klvae.AutoencoderKL("tiny-f8").save_pretrained(d)
    return d


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    import skimage.data

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(skimage.data.astronaut()).resize((60, 44)).save(root / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).resize((64, 48)).save(root / "sub" / "coffee.jpg")
    Image.fromarray(skimage.data.chelsea()).resize((64, 48)).save(root / "chelsea.webp")
    return root


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


def test_encode_decode_round_trip_restores_sizes(tmp_path: Path, photos: Path, model_dir: Path) -> None:
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(photos), "-o", str(out), "--model", str(model_dir), "--batch-size", "2"]) == 0
    lf = load_latents(out)
    assert sorted(i.name for i in lf.items) == ["astronaut.png", "chelsea.webp", "coffee.jpg"]
    assert lf.scaling_factor == 0.18215 and lf.model == str(model_dir)
    astro = next(i for i in lf.items if i.name == "astronaut.png")
    assert (astro.height, astro.width) == (44, 60)
    assert lf.latents[astro.key].shape == (4, 6, 8)  # padded to 48x64 for the x8 encoder
    vae = klvae.AutoencoderKL.from_pretrained(model_dir)
    x = pil_to_tensor(load_image(photos / "astronaut.png"))[None]
    expected = vae.scale_latents(inference.encode(vae, x).mode())[0]
    torch.testing.assert_close(lf.latents[astro.key], expected, atol=1e-5, rtol=1e-5)
    dec = tmp_path / "dec"
    assert main(["decode", str(out), "-o", str(dec), "--model", str(model_dir)]) == 0
    assert sorted(p.name for p in dec.iterdir()) == ["astronaut.png", "chelsea.png", "coffee.png"]
    assert Image.open(dec / "astronaut.png").size == (60, 44)


def test_quiet_hides_the_progress_bars_and_the_info_lines(
    tmp_path: Path, photos: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(photos), "-o", str(out), "--model", str(model_dir)]) == 0
    err = capsys.readouterr().err
    assert "encoding" in err and "reading" in err  # the bars, on stderr
    assert main(["-q", "decode", str(out), "-o", str(tmp_path / "d"), "--model", str(model_dir)]) == 0
    assert main(["-q", "encode", str(photos), "-o", str(out), "--model", str(model_dir), "--overwrite"]) == 0
    assert capsys.readouterr().err == ""


def test_tiled_cli_output_equals_untiled(tmp_path: Path, photos: Path, model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_tiled_calls(monkeypatch)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["encode", str(photos), "-o", str(a), "--model", str(model_dir)]) == 0
    assert calls == {"encode": 0, "decode": 0}
    assert main(["encode", str(photos), "-o", str(b), "--model", str(model_dir), "--tile-size", "16"]) == 0
    assert calls["encode"] == 2  # one per batch of equal sizes: the tiled path really ran
    la, lb = load_file(a), load_file(b)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], atol=1e-4, rtol=0)
    assert main(["decode", str(a), "-o", str(tmp_path / "d0"), "--model", str(model_dir)]) == 0
    assert calls["decode"] == 0
    # 1 MiB cannot hold an untiled decode of these sizes, so the budget picks tiling by itself.
    assert main(["decode", str(a), "-o", str(tmp_path / "d"), "--model", str(model_dir), "--max-memory", "1MiB"]) == 0
    assert calls["decode"] == 3
    for png in (tmp_path / "d0").iterdir():
        untiled, tiled = (np.asarray(Image.open(d / png.name), dtype=np.int16)
                          for d in (tmp_path / "d0", tmp_path / "d"))
        assert np.abs(untiled - tiled).max() <= 1  # 8-bit pictures: at most a rounding step apart


def test_reconstruct_prints_psnr_and_ssim(tmp_path: Path, photos: Path, model_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.png"
    assert main(["reconstruct", str(photos / "astronaut.png"), "-o", str(out), "--model", str(model_dir)]) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "SSIM" in text
    value = float(text.split("PSNR")[1].split("dB")[0])
    a = np.asarray(Image.open(photos / "astronaut.png").convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(out), dtype=np.float64)
    assert value == pytest.approx(10 * math.log10(255**2 / np.mean((a - b) ** 2)), abs=0.01)


def test_info_reports_config_and_parameters(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["block_out_channels"] == [32, 32, 64, 64]
    assert d["parameters"]["total"] == klvae.AutoencoderKL("tiny-f8").num_parameters()["total"]


def test_a_folder_with_a_truncated_image_is_finished_with_a_warning(
    tmp_path: Path, photos: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = (photos / "astronaut.png").read_bytes()
    (photos / "truncated.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(photos), "-o", str(out), "--model", str(model_dir)]) == 1
    assert "truncated.png" in caplog.text
    assert len(load_latents(out).items) == 3


def test_encode_loads_a_batch_at_a_time_with_the_batches_of_a_whole_load(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from klvae.cli import codec

    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    root.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / f"i{i}.png")
    data = (root / "i1.png").read_bytes()
    (root / "i1.png").write_bytes(data[: len(data) // 2])  # its header reads, its pixels do not: skipped
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 24 wide, 16 high; a quarter turn makes it 16x24 like the rest
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(root / "r.jpg", exif=exif.tobytes())
    loads, batches = [], []
    real_load, real_encode = codec.load_image, inference.encode
    monkeypatch.setattr(codec, "load_image", lambda p, *a: loads.append(Path(p).name) or real_load(p, *a))

    def encode(vae: klvae.AutoencoderKL, x: torch.Tensor, *args: object) -> object:
        batches.append((len(loads), x.clone()))
        return real_encode(vae, x, *args)

    monkeypatch.setattr(codec.inference, "encode", encode)
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(root), "-o", str(out), "--model", str(model_dir), "--batch-size", "2"]) == 1
    # memory holds a batch, not the folder: each encode follows its own two loads (three with the skipped one)
    assert [n for n, _ in batches] == [3, 5, 7]
    lf = load_latents(out)
    names = [it.name for it in lf.items]
    assert names == ["i0.png", "i2.png", "i3.png", "i4.png", "i5.png", "r.jpg"]
    # the same batches as when every image was read first: i0+i2, i3+i4, i5+r.jpg (the CLI's levers, whose
    # channels_last convolutions round by the batch)
    vae = inference.optimize_for_inference(klvae.AutoencoderKL.from_pretrained(model_dir), torch.float32)
    x = torch.stack([pil_to_tensor(load_image(root / n)) for n in names])
    assert all(torch.equal(b, x[2 * k : 2 * k + 2]) for k, (_, b) in enumerate(batches))
    for k in range(3):
        z = vae.scale_latents(inference.encode(vae, x[2 * k : 2 * k + 2]).mode())
        for j in range(2):
            assert torch.equal(lf.latents[lf.items[2 * k + j].key], z[j])
    assert (lf.items[-1].height, lf.items[-1].width) == (16, 24)


def test_encode_an_image_whose_header_misled_is_encoded_alone(tmp_path: Path, model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A PNG may keep its EXIF rotation after the pixels, so its size is known only once it is loaded.
    from klvae.cli import codec

    rng = np.random.default_rng(1)
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(root / f"i{i}.png")
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(root / "late.png")
    real_size = codec.image_size
    monkeypatch.setattr(codec, "image_size", lambda p: (16, 24) if Path(p).name == "late.png" else real_size(p))
    shapes = []
    real_encode = inference.encode
    monkeypatch.setattr(codec.inference, "encode",
                        lambda vae, x, *a: shapes.append(tuple(x.shape)) or real_encode(vae, x, *a))
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(root), "-o", str(out), "--model", str(model_dir), "--batch-size", "4"]) == 0
    assert shapes == [(3, 3, 16, 24), (1, 3, 24, 16)]
    lf = load_latents(out)
    assert [(it.name, it.height, it.width) for it in lf.items] == [
        ("i0.png", 16, 24), ("i1.png", 16, 24), ("i2.png", 16, 24), ("late.png", 24, 16)]
    vae = inference.optimize_for_inference(klvae.AutoencoderKL.from_pretrained(model_dir), torch.float32)
    z = vae.scale_latents(inference.encode(vae, pil_to_tensor(load_image(root / "late.png"))[None]).mode())
    assert torch.equal(lf.latents[lf.items[-1].key], z[0])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: ["encode", str(d / "nope.png"), "-o", str(d / "z.safetensors")], "no such"),
        (lambda d: ["reconstruct", str(d / "bad.png"), "-o", str(d / "r.png")], "bad.png"),
        (lambda d: ["decode", str(d / "wrong.safetensors"), "-o", str(d / "out")], "do not fit"),
        (lambda d: ["decode", str(d / "nan.safetensors"), "-o", str(d / "out")], "NaN"),
        (lambda d: ["decode", str(d / "plain.safetensors"), "-o", str(d / "out")], "latents of shape [1]; expected"),
        (lambda d: ["encode", str(d / "photos"), "-o", str(d / "z.safetensors"), "--dtype", "fp8"], "dtype"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, photos: Path, model_dir: Path, make, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = tmp_path / "good.safetensors"
    assert main(["encode", str(photos / "astronaut.png"), "-o", str(good), "--model", str(model_dir)]) == 0
    lf = load_latents(good)
    key = lf.items[0].key
    from klvae.latents.file import save_latents

    lf.latents[key] = torch.zeros(16, 6, 8)
    save_latents(lf, tmp_path / "wrong.safetensors")
    lf.latents[key] = torch.full((4, 6, 8), float("nan"))
    save_latents(lf, tmp_path / "nan.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    capsys.readouterr()
    assert main([*make(tmp_path), "--model", str(model_dir)]) == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_model_is_one_line(tmp_path: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["reconstruct", str(photos / "astronaut.png"), "-o", str(tmp_path / "r.png"), "--model", "no/such-vae",
               "--device", "cpu"])
    assert rc == 2
    assert "no/such-vae" in _err_line(capsys)


def test_the_command_line_prints_no_traceback(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "klvae.cli.main", "decode", str(tmp_path / "missing.safetensors"),
                        "-o", str(tmp_path / "o"), "--model", "tiny"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().startswith("klvae: error:")


def test_every_option_has_help_that_names_its_default() -> None:
    import argparse

    from klvae.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        helps = {a.dest: p._get_formatter()._expand_help(a) for a in p._actions if a.help != argparse.SUPPRESS}
        for a in p._actions:
            if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"{name} {a.option_strings or a.dest} has no help"
            if a.option_strings and a.default not in (None, [], argparse.SUPPRESS) and not isinstance(a.default, bool):
                assert "default" in helps[a.dest].lower(), f"{name} {a.option_strings}: default {a.default!r} unnamed"
    cache_help = sub.choices["cache"].format_help()
    assert "(default: 512)" in cache_help and "(default: 256)" in cache_help  # --resolution, --shard-size


def test_a_reader_that_leaves_early_ends_the_command_quietly() -> None:
    # `klvae info --json | head -5`: the pipe's read end is closed before klvae writes a byte.
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.run([sys.executable, "-m", "klvae.cli.main", "-q", "info", "--json"], stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(w)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr  # was "klvae: error: [Errno 32] Broken pipe"


def test_noise_sheet(tmp_path: Path, photos: Path, model_dir: Path) -> None:
    out = tmp_path / "sheet.png"
    assert main(["noise", str(photos / "astronaut.png"), "-o", str(out), "--steps", "0", "500", "999",
                 "--model", str(model_dir)]) == 0
    sheet = Image.open(out)
    top = sheet.height - 44  # the label strip: two lines here, where a label is wider than its 60-pixel tile
    assert sheet.width == 3 * 60 and top > 18
    tiles = np.asarray(sheet, dtype=np.float64)[top:]
    t0, t999 = tiles[:, :60], tiles[:, 120:]
    vae = klvae.AutoencoderKL.from_pretrained(model_dir)
    x = pil_to_tensor(load_image(photos / "astronaut.png"))[None]
    recon = inference.decode(vae, inference.encode(vae, x).mode(), size=(44, 60))[0]
    expected = ((recon.permute(1, 2, 0).numpy() + 1) * 127.5).round()
    # t=0 still adds sqrt(beta_0) of noise: near the plain reconstruction; t=999 is mostly noise
    assert 2 * np.mean((t0 - expected) ** 2) < np.mean((t999 - expected) ** 2)


@pytest.mark.parametrize(("num_steps", "shown"),
                         [("1000", "0, 100, 250, 500, 750, 999"), ("50", "0, 5, 12, 25, 37, 49"), ("2", "0, 1")])
def test_noise_default_steps_follow_num_steps(num_steps: str, shown: str, tmp_path: Path, photos: Path,
                                              model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sheet.png"
    assert main(["noise", str(photos / "astronaut.png"), "-o", str(out), "--num-steps", num_steps,
                 "--model", str(model_dir)]) == 0  # with --num-steps 50 the old default (0..999) was an error
    assert f"t = {shown} (scaled_linear schedule)" in capsys.readouterr().out
    assert Image.open(out).width == 60 * len(shown.split(","))


def test_noise_beta_range_reaches_the_schedule(tmp_path: Path, photos: Path, model_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from klvae import diffusion
    made = []
    real = diffusion.make_betas
    monkeypatch.setattr(diffusion, "make_betas", lambda *a, **k: made.append((a, k)) or real(*a, **k))
    out = tmp_path / "sheet.png"
    assert main(["noise", str(photos / "astronaut.png"), "-o", str(out), "--steps", "0", "--schedule", "linear",
                 "--beta-start", "0.001", "--beta-end", "0.03", "--model", str(model_dir)]) == 0
    assert made == [(("linear", 1000), {"beta_start": 0.001, "beta_end": 0.03})] and out.exists()


def test_ctrl_c_while_torch_imports_is_one_line() -> None:
    """`import klvae` leaves torch for later, so a Ctrl-C during its import lands inside main()."""
    # The child sends itself SIGINT the moment torch's import begins (an import hook), so the test does
    # not race a sleep against how fast this machine imports torch.
    child = ("import os, signal, sys\n"
             "class Hook:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch':\n"
             "            sys.meta_path.remove(self)\n"
             "            os.kill(os.getpid(), signal.SIGINT)\n"
             "        return None\n"
             "import klvae\n"
             "assert 'torch' not in sys.modules\n"
             "sys.meta_path.insert(0, Hook())\n"
             "from klvae.cli.main import main\n"
             "sys.exit(main(['info']))\n")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "klvae: interrupted", err


# argparse's errors: one line, blamed on the subcommand, pointing at its --help
@pytest.mark.parametrize("argv", [["encode", "x.png", "-o", "y.safetensors", "--tile-size", "abc"], ["bogus"],
                                  ["encode"]])
def test_argument_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "--help" in err, err


def test_an_unknown_option_points_at_the_subcommands_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["encode", "x.png", "-o", "y.safetensors", "--tile-szie", "64"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("klvae encode: error: unrecognized arguments: --tile-szie 64 "
                                       "(see 'klvae encode --help')\n")
