"""Hostile or malformed input to `klvae encode | decode | reconstruct`: one-line errors, exit 2, nothing written
outside --output, nothing half-written, nothing overwritten that the command did not make."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import fifo_watchdog, files_under, handmade_latents, noise_png, one_error_line, rgb_image, saved_tiny_model
from klvae.atomic import temp_path
from klvae.cli import common
from klvae.cli.codec import unique_png_names
from klvae.cli.main import main
from klvae.errors import KlvaeError
from klvae.latents.file import LatentItem, load_latents

# Every command here runs the built-in demo model (the default, x8), which loads in a fraction of a second.


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    return one_error_line(capsys.readouterr().err)


# 1. item names and keys never reach outside --output


HOSTILE = [  # (name, key) -> the file decode writes
    (("", "../escaped"), "escaped.png"),
    (("", "../../../x/pwned"), "pwned.png"),
    (("../../evil.png", "k2"), "evil.png"),
    ((".hidden", "k3"), "hidden.png"),
    (("sub/dir/", "k4"), "dir.png"),
    (("..\\..\\win.png", "k5"), "win.png"),
    (("..", ".."), "000006.png"),
    (("a\x00b\n.png", "k7"), "a_b_.png"),
]


def test_decode_writes_plain_names_inside_the_output_folder(tmp_path: Path) -> None:
    items = [{"name": n, "key": k, "height": 16, "width": 16} for (n, k), _ in HOSTILE]
    long_name = {"name": "é" * 300 + ".png", "key": "long", "height": 16, "width": 16}
    src = handmade_latents(tmp_path / "z.safetensors", [*items, long_name])
    out = tmp_path / "out" / "sub"
    assert main(["decode", str(src), "-o", str(out)]) == 0
    files = files_under(tmp_path)
    long_written = [f for f in files if "é" in f]
    assert sorted(set(files) - set(long_written)) == sorted(["z.safetensors", *("out/sub/" + w for _, w in HOSTILE)])
    # a very long name is cut to what file systems take (255 bytes)
    assert len(long_written) == 1 and len(Path(long_written[0]).name.encode()) <= 255


# 2. generated names never collide


def test_unique_png_names_skip_names_that_other_items_ask_for() -> None:
    items = [LatentItem(n, f"{i:06d}", 8, 8) for i, n in enumerate(["a.png", "a_1.png", "a.png", "A.png", "", "b"])]
    assert unique_png_names(items) == ["a.png", "a_1.png", "a_2.png", "A_3.png", "000004.png", "b.png"]


def test_decode_of_a_folder_with_colliding_names_writes_every_image(tmp_path: Path) -> None:
    for i, rel in enumerate(["d1/a.png", "d1/a_1.png", "d2/a.png"]):
        rgb_image(tmp_path / "in" / rel, seed=i)
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(tmp_path / "in"), "-o", str(z)]) == 0
    assert main(["decode", str(z), "-o", str(tmp_path / "out")]) == 0
    assert files_under(tmp_path / "out") == ["a.png", "a_1.png", "a_2.png"]
    # each file is its own image: d1/a.png, d1/a_1.png, d2/a.png in the encoded order
    pixels = [np.asarray(Image.open(tmp_path / "out" / n)) for n in ("a.png", "a_1.png", "a_2.png")]
    assert not np.array_equal(pixels[0], pixels[2])


# 3. encode's output is checked before the work, and never replaces an input


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("victim.png", "must end in .safetensors"),
        ("out/enc.png", "must end in .safetensors"),
        ("dir.safetensors", "is a folder"),
        ("victim.png/x.safetensors", "is a file, not a folder"),
        ("named.safetensors", "one of the inputs"),
    ],
)
def test_encode_refuses_a_bad_output_before_any_work(tmp_path: Path, output: str, message: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    victim = rgb_image(tmp_path / "victim.png")
    before = victim.read_bytes()
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "named.safetensors").write_bytes(b"not an image")

    def no_model(_args: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("klvae.cli.codec.load_model", no_model)
    inputs = [str(victim), str(tmp_path / "named.safetensors")] if output == "named.safetensors" else [str(victim)]
    capsys.readouterr()
    assert main(["encode", *inputs, "-o", str(tmp_path / output)]) == 2
    assert message in _err_line(capsys)
    assert victim.read_bytes() == before
    assert files_under(tmp_path) == ["named.safetensors", "victim.png"]


def test_encode_refuses_an_unwritable_folder_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "a.png")
    (tmp_path / "ro").mkdir()
    # as root every folder is writable, so the permission is faked
    monkeypatch.setattr(common.os, "access", lambda p, mode: Path(p) != tmp_path / "ro")
    assert main(["encode", str(img), "-o", str(tmp_path / "ro" / "x" / "z.safetensors")]) == 2
    assert "no permission to write in" in _err_line(capsys)


@pytest.mark.parametrize(
    ("command", "output", "message"),
    [
        # each was a raw OSError ("[Errno 36] File name too long", "[Errno 17] File exists") from the write
        ("encode", "n" * 300 + ".safetensors", "the file name nnnnnnnnnnnnnnnnnnnn....safetensors is too long"),
        ("encode", "n" * 240 + ".safetensors", "first writes it under a temporary name"),
        ("encode", "d" * 300 + "/z.safetensors", "the folder name dddddddddddddddddddd...dddddddddddd is too long"),
        ("reconstruct", "d" * 300 + "/sub", "the folder name dddddddddddddddddddd...dddddddddddd is too long"),
        ("encode", "dangling/z.safetensors", "dangling is a link to"),
        ("reconstruct", "dangling/out.png", "dangling is a link to"),
        ("reconstruct", "dangling/deeper/out", "dangling is a link to"),
    ],
)
def test_an_output_the_file_system_cannot_take_is_refused_before_any_work(
        tmp_path: Path, command: str, output: str, message: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "a.png")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")

    def no_model(_args: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("klvae.cli.codec.load_model", no_model)
    capsys.readouterr()
    assert main([command, str(img), "-o", str(tmp_path / output)]) == 2
    line = _err_line(capsys)
    assert message in line and "Errno" not in line, line
    assert "takes names of up to 255 bytes" in line or "which does not exist" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "dangling"]


def test_a_name_at_the_limit_still_passes_and_the_limit_is_the_file_systems(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_name_extra = len(temp_path(tmp_path / "x").name) - 1
    assert common.check_output_path(tmp_path / ("n" * (255 - tmp_name_extra))).name == "n" * (255 - tmp_name_extra)
    with pytest.raises(KlvaeError, match="temporary name"):
        common.check_output_path(tmp_path / ("n" * (256 - tmp_name_extra)))
    assert common.check_output_path(tmp_path / ("d" * 255), folder=True).name == "d" * 255
    monkeypatch.setattr(common.os, "pathconf", lambda path, name: 143)  # eCryptfs-like: a shorter limit
    with pytest.raises(KlvaeError, match="up to 143 bytes"):
        common.check_output_path(tmp_path / ("d" * 144), folder=True)


def test_reconstruct_refuses_to_overwrite_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "a.png")
    before = img.read_bytes()
    assert main(["reconstruct", str(img), "-o", str(img)]) == 2
    assert "one of the inputs" in _err_line(capsys)
    assert img.read_bytes() == before


@pytest.mark.parametrize("command", ["reconstruct", "noise"])
@pytest.mark.parametrize("name", ["x.xbm", "x.grib", "x.bufr", "x.eps", "x"])
def test_an_image_output_that_cannot_hold_rgb_is_refused_before_any_work(
    tmp_path: Path, command: str, name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    img = rgb_image(tmp_path / "a.png")

    def no_model(_args: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(f"klvae.cli.{'codec' if command == 'reconstruct' else 'noise'}.load_model", no_model)
    out = tmp_path / name
    assert main([command, str(img), "-o", str(out)]) == 2
    line = _err_line(capsys)
    assert f"{out}: cannot write an RGB image with " in line and ".png, .jpg" in line
    assert files_under(tmp_path) == ["a.png"]


@pytest.mark.parametrize(("command", "size", "name", "limit"), [
    ("reconstruct", (16400, 8), "x.webp", 16383), ("reconstruct", (8, 65504), "x.jpg", 65500),
    ("noise", (64, 16), "x.webp", 16383),  # 257 pictures of 64 side by side: a sheet 16448 wide
])
def test_an_image_too_large_for_its_format_is_refused_before_any_work(
    tmp_path: Path, command: str, size: tuple[int, int], name: str, limit: int, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", size).save(img)

    def no_model(_args: object) -> None:
        raise AssertionError("the model was loaded before the output's size was checked")

    monkeypatch.setattr(f"klvae.cli.{'codec' if command == 'reconstruct' else 'noise'}.load_model", no_model)
    out = tmp_path / name
    steps = ["--steps", *map(str, range(257))] if command == "noise" else []
    assert main([command, str(img), "-o", str(out), *steps]) == 2  # was an internal error after the work
    assert f"stores at most {limit} pixels a side" in _err_line(capsys)
    assert files_under(tmp_path) == ["a.png"]


# 4./5. malformed metadata and absurd sizes are refused at load, before any image is written

GOOD = {"name": "good.png", "key": "g", "height": 16, "width": 16}


@pytest.mark.parametrize(
    ("items", "tensors", "meta", "message"),
    [
        ([{**GOOD, "height": 8.5}], None, {}, "height must be a positive integer, got 8.5"),
        ([{**GOOD, "height": "8"}], None, {}, "height must be a positive integer, got '8'"),
        ([{**GOOD, "width": 0}], None, {}, "width must be a positive integer, got 0"),
        ([{**GOOD, "height": -5}], None, {}, "height must be a positive integer"),
        ([{**GOOD, "height": True}], None, {}, "height must be a positive integer"),
        ([{**GOOD, "height": 17}], None, {}, "height 17 does not fit latents 2 cells high (x8: 9 to 16)"),
        ([{**GOOD, "width": 8}], None, {}, "width 8 does not fit latents 2 cells wide"),
        ([{**GOOD, "height": 100_000, "width": 100_000}], None, {}, "over the limit"),
        ([{**GOOD, "height": 10**400}], None, {}, "('good.png'): 10000000000000000...x16 is over the limit"),
        ([{**GOOD, "key": 0}], {"0": torch.zeros(4, 2, 2)}, {}, "key must be a string, got 0"),
        ([{**GOOD, "name": 5}], None, {}, "name must be a string, got 5"),
        ([{**GOOD, "x": 2}], None, {}, "unknown 'x'"),
        ([{"name": "a", "key": "g"}], None, {}, "no height, width"),
        ([1, 2], None, {}, "item 0 is int"),
        ({"a": 1}, None, {}, "items is dict, not a list"),
        ([GOOD], None, {"items": "notjson"}, "items is not JSON"),
        ([GOOD], None, {"shift_factor": '"abc"'}, "shift_factor must be a finite number, got 'abc'"),
        ([GOOD], None, {"shift_factor": "[1]"}, "shift_factor must be a finite number, got [1]"),
        ([GOOD], None, {"scaling_factor": "0"}, "scaling_factor must be a non-zero number"),
        ([GOOD], None, {"scaling_factor": "NaN"}, "scaling_factor must be a finite number"),
        ([GOOD], None, {"scaling_factor": "-1"}, "scaling_factor must be a finite positive number, got -1.0"),
        ([GOOD], None, {"latents_mean": "[0, 0, 0, 0]"}, "latents_mean and latents_std come together"),
        ([GOOD], None, {"latents_mean": "[0, 0, 0, 0]", "latents_std": "[1, 1, 1, 0]"},
         "every latents_std entry must be a finite positive number, got 0"),
        ([GOOD], None, {"scaling_factor": '"abc"'}, "scaling_factor must be a finite number"),
        ([GOOD], {"g": torch.zeros(4, 0, 5)}, {}, "empty latents of shape [4, 0, 5]"),
        ([GOOD], {"g": torch.zeros(1, 4, 2, 2)}, {}, "latents of shape [1, 4, 2, 2]; each item holds one image's"),
        ([GOOD], {"g": torch.zeros(4, 2, 2, dtype=torch.int32)}, {}, "latents of dtype int32"),
        ([GOOD], {"g": torch.zeros(4, 2, 2, dtype=torch.float8_e4m3fn)}, {}, "latents of dtype float8_e4m3fn"),
        ([GOOD], {"g": torch.zeros(3, 2, 2)}, {}, "do not fit this model"),
        # a good item first: nothing may be written before the bad second one is found
        ([GOOD, {**GOOD, "key": "b", "name": "bad.png", "height": 40}],
         {"g": torch.zeros(4, 2, 2), "b": torch.zeros(4, 2, 2)}, {}, "item 1 ('bad.png'): height 40 does not fit"),
        ([GOOD, {**GOOD, "key": "b", "name": "bad.png"}],
         {"g": torch.zeros(4, 2, 2), "b": torch.full((4, 2, 2), float("nan"))}, {}, "item 1 ('bad.png'): latents "
                                                                                   "contain NaN"),
        # finite as stored, inf once divided by the scaling factor: found before the first write too
        ([GOOD, {**GOOD, "key": "b", "name": "bad.png"}],
         {"g": torch.zeros(4, 2, 2), "b": torch.full((4, 2, 2), 3e38)}, {}, "item 1 ('bad.png'): latents overflow to "
                                                                            "inf once unscaled"),
    ],
)
def test_malformed_latents_are_one_line_and_exit_2(tmp_path: Path, items: list, tensors: dict | None, meta: dict,
                                                   message: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = handmade_latents(tmp_path / "z.safetensors", items, tensors, meta)
    capsys.readouterr()
    assert main(["decode", str(src), "-o", str(tmp_path / "out")]) == 2
    line = _err_line(capsys)
    assert message in line and str(src) in line
    assert files_under(tmp_path) == ["z.safetensors"]


def test_load_latents_checks_sizes_with_a_factor(tmp_path: Path) -> None:
    src = handmade_latents(tmp_path / "z.safetensors", [{**GOOD, "height": 12}])
    assert load_latents(src, downsample_factor=8).items[0].height == 12
    with pytest.raises(KlvaeError, match="height 12 does not fit latents 2 cells high"):
        load_latents(src, downsample_factor=4)


def test_decode_refuses_an_output_past_max_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # [4, 1700, 1700] latents would decode to 13600² px; a small limit shows the same check on a small file.
    src = handmade_latents(tmp_path / "z.safetensors", [{**GOOD, "height": 44, "width": 60}],
                           {"g": torch.zeros(4, 6, 8)})
    monkeypatch.setattr("klvae.latents.file.MAX_PIXELS", 3000)  # the 44x60 size passes, its 48x64 decode not
    assert main(["decode", str(src), "-o", str(tmp_path / "out")]) == 2
    assert "decode to 48x64 = 3,072 pixels, over the limit of 3,000" in _err_line(capsys)
    assert files_under(tmp_path) == ["z.safetensors"]


# 6. option values


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "meta"], "--device meta"),
        (["--device", "mps"], "--device mps"),
        (["--sample", "--seed", "99999999999999999999999"], "--seed must be between 0 and"),
        (["--sample", "--seed", "-1"], "--seed must be between 0 and"),
        (["--max-memory", "0"], "--max-memory must be at least 1 byte"),
        (["--max-memory", "1e999"], "too large"),
    ],
)
def test_bad_option_values_are_one_line(tmp_path: Path, options: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    img = rgb_image(tmp_path / "a.png")
    assert main(["encode", str(img), "-o", str(tmp_path / "z.safetensors"), *options]) == 2
    assert message in _err_line(capsys)
    assert not (tmp_path / "z.safetensors").exists()


@pytest.mark.parametrize(("text", "size"), [("1e3", 1000), ("2.5e6", 2_500_000), ("1e-3G", 1_073_741), ("512M", 2**29)])
def test_memory_sizes_take_plain_and_scientific_numbers(text: str, size: int) -> None:
    assert common.parse_bytes(text) == size


@pytest.mark.parametrize(("text", "size"), [("1T", 2**40), ("2TiB", 2**41), ("0.5tb", 2**39)])
def test_memory_sizes_take_terabytes(text: str, size: int) -> None:
    assert common.parse_bytes(text) == size  # a budget written as on a large host's spec sheet


def test_an_error_with_several_lines_is_printed_as_one(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def fail(_args: object) -> int:
        raise KlvaeError("first\nsecond")

    monkeypatch.setattr("klvae.cli.codec.cmd_info", fail)  # register() binds it when main builds the parser
    assert main(["info"]) == 2
    assert _err_line(capsys) == "klvae: error: first second"


# 7. decode never replaces a file it did not make, unless told to


def test_decode_into_the_encoded_folder_refuses_to_replace_the_originals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "s"
    originals = {n: rgb_image(folder / n, seed=i).read_bytes() for i, n in enumerate(["a.png", "b.png"])}
    z = tmp_path / "z.safetensors"
    assert main(["encode", str(folder), "-o", str(z)]) == 0

    def no_model(_args: object) -> None:
        raise AssertionError("the model was loaded before the clash was found")

    with monkeypatch.context() as m:
        m.setattr("klvae.cli.codec.load_model", no_model)
        capsys.readouterr()
        assert main(["decode", str(z), "-o", str(folder)]) == 2
    line = _err_line(capsys)
    assert "a.png already exists (2 of the 2 PNGs" in line and "--overwrite" in line
    assert {n: (folder / n).read_bytes() for n in originals} == originals
    assert main(["decode", str(z), "-o", str(folder), "--overwrite"]) == 0
    assert all((folder / n).read_bytes() != b for n, b in originals.items())


def test_decode_never_replaces_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = handmade_latents(tmp_path / "z.safetensors", [GOOD])
    (tmp_path / "out" / "good.png").mkdir(parents=True)
    assert main(["decode", str(src), "-o", str(tmp_path / "out"), "--overwrite"]) == 2
    assert "good.png is a folder" in _err_line(capsys)


# 8. FIFOs (and sockets, devices) are never opened


def test_encode_skips_a_fifo_in_a_folder_and_refuses_one_named(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    rgb_image(tmp_path / "in" / "a.png")
    z = tmp_path / "z.safetensors"
    with fifo_watchdog(tmp_path / "in" / "fifo.png") as watchdog:
        assert main(["encode", str(tmp_path / "in"), "-o", str(z)]) == 1  # one bad item, skipped and counted
        assert "skipping " in capsys.readouterr().err
        assert [it.name for it in load_latents(z).items] == ["a.png"]
        assert main(["encode", str(tmp_path / "in" / "fifo.png"), "-o", str(tmp_path / "y.safetensors")]) == 2
        assert "fifo.png: not a regular file" in _err_line(capsys)
    assert not watchdog["fired"], "encode blocked on the FIFO"


# 9. odd but readable images, unreadable ones among them, and an image given to decode


def _bomb_png(path: Path) -> Path:
    """A PNG whose header claims 100000 x 100000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    return path


def _odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Odd but readable images in `folder`, by name, with their (height, width)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one pixel.png")
    Image.fromarray(rgb).save(folder / "seven by nine.png")
    Image.fromarray(rng.integers(0, 256, (21, 29, 3), dtype=np.uint8)).convert("L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert("LA").save(folder / "la.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (12, 20), dtype=np.uint16)).save(folder / "sixteen bit.png")
    return {"one pixel": (1, 1), "seven by nine": (9, 7), "grey": (21, 29), "la": (12, 20), "palette": (12, 20),
            "cmyk": (12, 20), "sixteen bit": (12, 20)}


def test_odd_images_encode_and_decode_and_bad_ones_are_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(saved_tiny_model(tmp_path / "m"))
    sizes = _odd_images(tmp_path / "my photos")
    (tmp_path / "my photos" / "notes.png").write_text("not an image")
    _bomb_png(tmp_path / "my photos" / "bomb.png")
    lat = tmp_path / "lat ents.safetensors"
    args = ["--model", model, "--tile-size", "7", "--max-memory", "1MiB"]
    assert main(["encode", str(tmp_path / "my photos"), "-o", str(lat), *args]) == 1  # 1: some were skipped
    err = capsys.readouterr().err
    assert "skipping" in err and "notes.png" in err and "decompression bombs" in err and "skipped 2" in err
    assert "Traceback" not in err
    assert main(["decode", str(lat), "-o", str(tmp_path / "out dir"), *args]) == 0
    got = {p.stem: Image.open(p).size[::-1] for p in (tmp_path / "out dir").iterdir()}
    assert got == sizes  # each at its own size, not the padded one
    # One image alone: a bad one is one error line and status 2.
    for bad, words in [("notes.png", "not an image"), ("bomb.png", "over Pillow's limit")]:
        assert main(["reconstruct", str(tmp_path / "my photos" / bad), "-o", str(tmp_path / "r.png"), *args]) == 2
        assert words in one_error_line(capsys.readouterr().err)


def test_decode_given_an_image_says_it_is_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "photo.png").write_bytes(noise_png(0))
    assert main(["decode", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)  # was: "... is not a readable safetensors file: header too large"
    assert "photo.png is an image, not a latents file" in line and "klvae reconstruct" in line
    assert not (tmp_path / "out").exists()
