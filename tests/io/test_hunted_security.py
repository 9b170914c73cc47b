"""Pins hostile inputs a hunt found that klvae does not refuse before the heavy work, or whose error lines are not
safe to print:

- a plain latents file of a few KB that declares gigabytes: an fp16 tensor expanded with stride 0 (`.float()`
  copies it whole before the pixel limit is checked; an fp32 one is refused) and a sparse tensor (made dense
  before any check): `klvae decode` allocates gigabytes and ends in "out of memory ... tile large images";
- an .npz latents file whose deflated array of zeros declares a shape over the pixel limit (a zip bomb): numpy
  inflates all of it before the shape is looked at;
- a model folder whose config.json is huge: read whole into memory before anything else, "out of memory";
- a file name holding terminal escape sequences (ESC, BEL): printed raw in the error line and in the warning
  lines, so the name clears the screen or retitles the terminal.

The memory-bound tests run the command in a subprocess under an address-space limit (RLIMIT_AS): a correct
klvae refuses these files in one line well within it; now the allocation fails first.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_error_line, rgb_image, saved_tiny_model
from klvae.cli.main import main

# Far above what `klvae decode`/`info` of the tiny model needs (under 1 GB of address space), far below the
# gigabytes that the crafted files below would make klvae allocate.
_LIMIT = 2 * 2**30
_LIMITED = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({_LIMIT}, {_LIMIT})); "
            "from klvae.cli.main import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_model(tmp_path_factory.mktemp("tiny") / "vae")


def _limited(argv: list[str], cwd: Path) -> tuple[int, str]:
    """`klvae argv` in a fresh process under _LIMIT bytes of address space: its exit status and stderr."""
    done = subprocess.run([sys.executable, "-c", _LIMITED, "-q", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=180)
    return done.returncode, done.stderr


def _refused(status: int, err: str) -> str:
    """A refusal of bad input: exit 2, one `klvae: error:` line, and no allocation failure on the way."""
    line = one_error_line(err)
    assert status == 2, (status, line)
    assert "out of memory" not in line and "MemoryError" not in line and "allocate" not in line, line
    return line


# -- plain latents that declare more than their file holds -------------------------------------------------------

def test_decode_refuses_an_expanded_fp16_plain_tensor_before_copying_it(tmp_path: Path, model: Path) -> None:
    # Now: a 1.5 KB file makes decode allocate 6.4 GB (`t.float()` before the pixel limit is checked): "out of
    # memory ... tile large images with --tile-size 512", exit 1. The same tensor in fp32 is refused in one line.
    torch.save(torch.zeros(1, dtype=torch.float16).expand(1, 4, 20000, 20000), tmp_path / "z.pt")
    _refused(*_limited(["decode", "z.pt", "-o", "out", "--model", str(model), "--device", "cpu"], tmp_path))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_decode_refuses_a_sparse_plain_tensor_of_a_huge_shape_before_making_it_dense(tmp_path: Path,
                                                                                      model: Path) -> None:
    # Now: a 2 KB file holding one value of a sparse [1, 4, 20000, 20000] tensor is made dense (6.4 GB) before
    # any check: "out of memory ... tile large images", exit 1.
    sparse = torch.sparse_coo_tensor(torch.zeros(4, 1, dtype=torch.long), torch.ones(1), (1, 4, 20000, 20000))
    torch.save(sparse, tmp_path / "z.pt")
    _refused(*_limited(["decode", "z.pt", "-o", "out", "--model", str(model), "--device", "cpu"], tmp_path))


def _npz_of_zeros(path: Path, shape: tuple[int, ...], descr: str = "<f8") -> None:
    """A valid .npz (as numpy.savez_compressed writes: one deflated .npy) of zeros of `shape`: its deflate stream
    is one compressed MiB of zeros repeated, so a file of a few MB declares gigabytes, and is made in a second."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    header = buf.getvalue()
    size, chunk = int(np.prod(shape)) * np.dtype(descr).itemsize, 1 << 20
    assert size % chunk == 0
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)  # after a full flush, each repeat is alike
    data = first + block * (size // chunk) + c.flush()
    crc, zeros = zlib.crc32(header), bytes(chunk)
    for _ in range(size // chunk):
        crc = zlib.crc32(zeros, crc)
    name, usize = b"arr_0.npy", len(header) + size
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), usize, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), usize,
                          len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)


def test_decode_refuses_an_npz_bomb_by_its_declared_shape_before_inflating_it(tmp_path: Path, model: Path) -> None:
    # Now: numpy inflates the 1.6 MB file's 1.6 GB of zeros before the shape (decoding to 14336x14336 pixels, over
    # MAX_PIXELS) is looked at: "cannot be read as a numpy file: MemoryError: Unable to allocate 1.53 GiB" here,
    # and without a limit a GB of memory and seconds of inflating for a file refused anyway.
    _npz_of_zeros(tmp_path / "z.npz", (1, 4, 7168, 7168))
    _refused(*_limited(["decode", "z.npz", "-o", "out", "--model", str(model), "--device", "cpu"], tmp_path))


# -- a huge config.json ----------------------------------------------------------------------------------------

def test_a_huge_config_json_is_refused_before_it_is_read(tmp_path: Path, model: Path) -> None:
    # Now: config.json is read whole (read_text): "klvae: error: out of memory (); tile large images with
    # --tile-size 512 ...", exit 1; without a limit, gigabytes of memory before a JSON error.
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (model / "diffusion_pytorch_model.safetensors").read_bytes())
    with open(folder / "config.json", "wb") as f:
        f.truncate(3 * 2**30)  # a sparse file: 3 GB of NUL bytes that take no disk
    line = _refused(*_limited(["info", "--model", str(folder)], tmp_path))
    assert "config.json" in line, line


# -- terminal escape sequences in file names ---------------------------------------------------------------------

_ESCAPES = "\x1b[2J\x1b]0;pwned\x07"  # clear the screen; set the terminal's title


def _raw_controls(text: str) -> list[str]:
    # Progress bars redraw with \r; every other control character came from a file name.
    return sorted({c for c in text if ord(c) < 32 and c not in "\n\r"} | ({"\x7f"} & set(text)))


def test_the_error_line_does_not_print_a_file_names_escape_sequences_raw(
        tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Now: `klvae: error: no such latents file: q<ESC>[2J<ESC>]0;pwned<BEL>.safetensors`: the terminal clears
    # and is retitled by a file name.
    name = str(tmp_path / f"q{_ESCAPES}.safetensors")
    assert main(["decode", name, "-o", str(tmp_path / "out"), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "klvae: error:" in err, err
    assert _raw_controls(err) == [], repr(err)


def test_warning_lines_do_not_print_a_file_names_escape_sequences_raw(
        tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Now: `WARNING: skipping data/bad<ESC>[2J<ESC>]0;pwned<BEL>.png: not an image ...` reaches the terminal raw.
    rgb_image(tmp_path / "data" / "good.png")
    (tmp_path / "data" / f"bad{_ESCAPES}.png").write_bytes(b"not an image")
    assert main(["encode", str(tmp_path / "data"), "-o", str(tmp_path / "z.safetensors"), "--model", str(model),
                 "--device", "cpu"]) == 1  # one image skipped
    err = capsys.readouterr().err
    assert "skipping" in err, err
    assert _raw_controls(err) == [], repr(err)


# -- followed up: the same checks on the neighbouring formats ------------------------------------------------------
def test_decode_refuses_an_npy_whose_header_declares_more_than_the_file_holds(tmp_path: Path, model: Path,
                                                                              capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    path = tmp_path / "z.npy"
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (1, 4, 9000, 9000)})
        f.write(b"\0" * 64)
    assert main(["-q", "decode", str(path), "-o", str(tmp_path / "out"), "--model", str(model)]) == 2
    line = one_error_line(capsys.readouterr().err)  # was numpy's "Unable to allocate 2.41 GiB ..."
    assert "the file is damaged or crafted" in line and "allocate" not in line, line


def test_decode_refuses_a_torch_file_whose_zip_member_would_inflate_absurdly(tmp_path: Path, model: Path,
                                                                            capsys: pytest.CaptureFixture[str]
                                                                            ) -> None:
    import zipfile

    path = tmp_path / "z.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", b"\0" * (300 * 2**20))  # 300 MB of zeros in a few hundred KB
    assert main(["-q", "decode", str(path), "-o", str(tmp_path / "out"), "--model", str(model)]) == 2
    assert "a compression bomb" in one_error_line(capsys.readouterr().err)
