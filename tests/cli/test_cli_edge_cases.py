"""Command-line edge cases: an empty brace range of shards is a one-line error, and an output path that is not UTF-8
is printed rather than ending in an internal error."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import one_error_line, rgb_image
from klvae.cli.main import main
from klvae.datasources import expand_shards
from klvae.errors import KlvaeError


def test_an_empty_brace_range_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # {10..1} names no shard: the spec resolved to a table of no files, and the job died of an IndexError.
    spec = str(tmp_path / "shard-{10..1}.tar")
    with pytest.raises(KlvaeError, match="no shards"):
        expand_shards(spec)
    assert main(["scale", "--data", spec]) == 2
    assert "no shards" in one_error_line(capsys.readouterr().err)


def test_a_path_that_is_not_utf8_is_printed_not_an_internal_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Linux file names are bytes; Python hands undecodable ones over as lone surrogates, which a strict UTF-8
    # stdout (any UTF-8 locale but C.UTF-8) cannot print: the reconstruction was written, then exit 1.
    img = rgb_image(tmp_path / "a.png")
    out = tmp_path / "r\udcff.png"
    try:
        out.touch()
        out.unlink()
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only UTF-8 names")
    assert main(["reconstruct", str(img), "-o", str(out)]) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert printed.startswith("PSNR ") and "r\\udcff.png" in printed
