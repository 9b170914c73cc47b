"""Pins what a mutation audit of cli/codec.py and cli/codec_info.py found untested: encode's no-images message
(nothing added for an empty folder; the three most held suffixes, counted in any case, hidden files left out),
--output's .SAFETENSORS and .LATENT in any case, an output hard-linked to an image found in a named folder refused
even with --overwrite, a folder whose images all fail past their headers refused with nothing written, non-finite
latents refused when only some values are (named by the batch's first image, or the lone image), items kept in the
order the images were named (not grouped by size) with keys 000000, 000001, ..., and the posterior recorded;
decode's clash message (a dangling link counts, n of the m PNGs) given before the model loads, a folder named like a
PNG never replaced, --overwrite replacing the rest, and the other-model warning for unnamed latents; reconstruct's
JSON size as [width, height], its PSNR and SSIM measured on the 8-bit image written, SSIM from 11 px a side."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import one_error_line, perturbed_vae, rgb_image, saved_tiny_model
from klvae.cli import codec
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.latents.file import load_latents


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("model"))


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- encode: what it reads, what it refuses


def test_an_empty_folder_is_named_without_a_list_of_what_it_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "z.safetensors"
    assert main(["encode", str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert _err(capsys) == f"klvae: error: no images found in {tmp_path / 'empty'}"
    assert not out.exists()


def test_no_images_message_counts_suffixes_in_any_case_top_three_without_hidden_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "other"
    d.mkdir()
    names = ["a.GIF", "b.gif", "c.Gif", "d.gif", "e.txt", "f.txt", "g.txt", "h.ppm", "i.ppm", "j.csv",
             ".k.gif", ".l.gif", ".m.csv", ".n.csv"]
    for name in names:
        (d / name).write_bytes(b"x")
    assert main(["encode", str(d), "-o", str(tmp_path / "z.safetensors")]) == 2
    err = _err(capsys)
    assert f"no images found in {d} (it holds 4 .gif, 3 .txt, 2 .ppm files; a folder contributes" in err


@pytest.mark.parametrize("suffix", [".SAFETENSORS", ".Safetensors"])
def test_encode_writes_latents_named_in_upper_case(tmp_path: Path, model: Path, suffix: str) -> None:
    img = rgb_image(tmp_path / "a.png")
    out = tmp_path / f"z{suffix}"
    assert main(["-q", "encode", str(img), "-o", str(out), "--model", str(model), "--device", "cpu"]) == 0
    assert len(load_latents(out).items) == 1


def test_encode_to_an_upper_case_latent_writes_comfyui_latents(tmp_path: Path, model: Path) -> None:
    from safetensors import safe_open

    img = rgb_image(tmp_path / "a.png")
    out = tmp_path / "z.LATENT"
    assert main(["-q", "encode", str(img), "-o", str(out), "--model", str(model), "--device", "cpu"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert "latent_tensor" in list(f.keys())


def test_an_output_hard_linked_to_an_image_of_a_named_folder_is_refused_even_with_overwrite(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = rgb_image(tmp_path / "photos" / "a.png")
    before = img.read_bytes()
    out = tmp_path / "z.safetensors"
    os.link(img, out)
    argv = ["encode", str(tmp_path / "photos"), "-o", str(out), "--overwrite", "--model", str(model)]
    assert main(argv) == 2
    assert "is one of the inputs" in _err(capsys)
    assert img.read_bytes() == before and out.read_bytes() == before


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_latents_with_one_non_finite_value_are_refused(bad: float) -> None:
    z = torch.zeros(2, 4, 3, 3)
    z[1, 2, 0, 1] = bad
    with pytest.raises(KlvaeError, match=r"^the model produced non-finite latents for x\.png: inf or NaN"):
        codec.check_finite(z, "latents", "x.png")
    codec.check_finite(torch.zeros(2, 4, 3, 3), "latents", "x.png")


def test_encode_keeps_the_named_order_across_sizes_with_six_digit_keys(tmp_path: Path, model: Path) -> None:
    # Encoded a size at a time (a and c together), stored in the order they were named.
    a = rgb_image(tmp_path / "a.png", 16, 16, seed=1)
    b = rgb_image(tmp_path / "b.png", 24, 16, seed=2)
    c = rgb_image(tmp_path / "c.png", 16, 16, seed=3)
    out = tmp_path / "z.safetensors"
    argv = ["-q", "encode", str(a), str(b), str(c), "-o", str(out), "--model", str(model), "--device", "cpu"]
    assert main(argv) == 0
    lf = load_latents(out)
    assert [(i.name, i.key, i.width) for i in lf.items] == [("a.png", "000000", 16), ("b.png", "000001", 24),
                                                          ("c.png", "000002", 16)]
    assert lf.extra["posterior"] == "mean"


def test_encode_records_a_sampled_posterior(tmp_path: Path, model: Path) -> None:
    img = rgb_image(tmp_path / "a.png")
    out = tmp_path / "z.safetensors"
    argv = ["-q", "encode", str(img), "-o", str(out), "--sample", "--model", str(model), "--device", "cpu"]
    assert main(argv) == 0
    assert load_latents(out).extra["posterior"] == "sample"


def test_a_folder_whose_images_all_fail_past_their_headers_writes_nothing(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "photos"
    for c in "ab":
        data = rgb_image(d / f"{c}.png", 32, 32).read_bytes()
        (d / f"{c}.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    out = tmp_path / "z.safetensors"
    assert main(["-q", "encode", str(d), "-o", str(out), "--model", str(model), "--device", "cpu"]) == 2
    assert _err(capsys) == "klvae: error: none of the 2 images could be read"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_a_non_finite_batch_is_named_by_its_first_image_and_a_lone_image_by_itself() -> None:
    vae = perturbed_vae()
    with torch.no_grad():
        vae.quant_conv.bias.fill_(math.nan)
    args = argparse.Namespace(sample=False)
    x = torch.zeros(3, 16, 16)
    with pytest.raises(KlvaeError, match=r"non-finite latents for a\.png \(or its batch\): "):
        codec._encode_batch(vae, [(Path("a.png"), x), (Path("b.png"), x)], args, torch.float32, None)
    with pytest.raises(KlvaeError, match=r"non-finite latents for b\.png: "):
        codec._encode_batch(vae, [(Path("b.png"), x)], args, torch.float32, None)


# ---------------------------------------------------------------- decode: nothing replaced unasked


@pytest.fixture(scope="module")
def latents(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("latents")
    imgs = [str(rgb_image(d / f"{c}.png", seed=i)) for i, c in enumerate("abc")]
    out = d / "z.safetensors"
    assert main(["-q", "encode", *imgs, "-o", str(out), "--model", str(model), "--device", "cpu"]) == 0
    return out


def _decode(latents: Path, out: Path, model: Path | str, *extra: str) -> int:
    return main(["-q", "decode", str(latents), "-o", str(out), "--model", str(model), "--device", "cpu", *extra])


def test_a_folder_named_like_a_png_is_never_replaced(
    tmp_path: Path, latents: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out" / "b.png").mkdir(parents=True)
    assert _decode(latents, tmp_path / "out", model, "--overwrite") == 2
    assert _err(capsys) == (f"klvae: error: --output {tmp_path / 'out'}: b.png is a folder; a PNG of that name "
                            "cannot replace it")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.png"]


def test_clashes_are_counted_and_refused_before_the_model_loads(
    tmp_path: Path, latents: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.png").write_bytes(b"mine")
    (out / "a.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link is a name taken too
    assert _decode(latents, out, tmp_path / "no-such-model") == 2
    assert _err(capsys) == (f"klvae: error: --output {out}: a.png already exists (2 of the 3 PNGs would replace "
                            "files there); add --overwrite to replace them")
    assert (out / "c.png").read_bytes() == b"mine" and sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert _decode(latents, out, model, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    assert not (out / "a.png").is_symlink() and (out / "c.png").read_bytes() != b"mine"


# ---------------------------------------------------------------- reconstruct: its scores


@pytest.mark.parametrize(("w", "h", "has_ssim"), [(24, 11, True), (10, 24, False)])
def test_reconstruct_scores_the_written_8_bit_image_and_gives_width_then_height(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], w: int, h: int, has_ssim: bool
) -> None:
    from klvae.evaluation.metrics import psnr, ssim
    from klvae.images import load_image, pil_to_tensor

    img = rgb_image(tmp_path / "a.png", w, h)
    out = tmp_path / "r.png"
    assert main(["-q", "reconstruct", str(img), "-o", str(out), "--json", "--model", str(model),
                 "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["size"] == [w, h] and got["output"] == str(out) and got["input"] == str(img)
    x, y = (pil_to_tensor(load_image(p))[None] for p in (img, out))
    assert got["psnr"] == pytest.approx(psnr(x, y, data_range=2.0).item(), rel=1e-6)
    if has_ssim:
        assert got["ssim"] == pytest.approx(ssim(x, y, data_range=2.0).item(), rel=1e-6)
    else:
        assert got["ssim"] is None


def test_latents_of_an_unnamed_other_model_are_decoded_with_a_warning_saying_so(
    tmp_path: Path, latents: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dataclasses

    from klvae.latents.file import save_latents

    unnamed = save_latents(dataclasses.replace(load_latents(latents), model=""), tmp_path / "z.safetensors")
    other = perturbed_vae(seed=1).save_pretrained(tmp_path / "other")
    assert _decode(unnamed, tmp_path / "out", other) == 0
    assert len(list((tmp_path / "out").iterdir())) == 3
    assert f"encoded by another model (not named) than {other}, whose encoder differs" in caplog.text
