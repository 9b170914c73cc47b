"""Outputs never replace what the user did not ask to replace: `scale --save` refuses an existing model without
--overwrite, the model it reads (by any name), klvae's built-in model and the input folder; `eval` and `cache`
refuse an output folder that is (or lies inside) the --data folder; encode, reconstruct and noise refuse an
existing output file, and eval a folder holding an earlier report, without --overwrite. Each is one line, exit 2,
before any work, and leaves every file as it was."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import klvae
from helpers import one_error_line
from klvae.cli import common
from klvae.cli.main import main
from klvae.weights.save import SAFE_WEIGHTS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return klvae.AutoencoderKL("tiny").save_pretrained(tmp_path_factory.mktemp("tiny") / "vae")


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def places(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder (tmp_path/w): models m, other, builtin (the demo) and pkg/assets/demo (inside
    klvae's package), links to m and to the data, an image folder and a folder of .tar shards."""
    from klvae.weights import load

    w = tmp_path / "w"
    for name in ("m", "other", "builtin", "pkg/assets/demo"):
        shutil.copytree(tiny, w / name)
    (w / "link").symlink_to(w / "m")
    (w / "data").mkdir()
    for i in range(2):
        (w / "data" / f"img{i}.png").write_bytes(_png(i))
    (w / "datalink").symlink_to(w / "data")
    (w / "shards").mkdir()
    with tarfile.open(w / "shards" / "000.tar", "w") as tf:
        for i in range(2):
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(_png(i))
            tf.addfile(info, io.BytesIO(_png(i)))
    monkeypatch.setattr(load, "embedded_model_dir", lambda name: w / "builtin")
    monkeypatch.setattr(common, "package_dir", lambda: w / "pkg", raising=False)
    monkeypatch.chdir(w)
    return w


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding of any kind fails the test: every refusal must come before it."""
    from klvae.evaluation import evaluate
    from klvae.latents import cache, scale

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work started before the output was checked")

    for module, name in ((scale, "estimate_factors"), (cache, "cache_rank"), (evaluate, "run_evaluation")):
        monkeypatch.setattr(module, name, refuse)


def _tree(root: Path) -> dict[str, object]:
    """Every file and link under `root`: its bytes and mtime, or for a link where it points."""
    return {str(p.relative_to(root)): str(p.readlink()) if p.is_symlink() else (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    return one_error_line(capsys.readouterr().err).removeprefix("klvae: error: ")


SCALE = ["scale", "--data", "data", "--resolution", "32"]
EXISTS = "--save {0}: {0}/config.json already exists; add --overwrite to replace it"
READ = "--save {0} holds the model being read ({1}/" + SAFE_WEIGHTS + "); name another place"
PACKAGE = "--save pkg/assets/demo is inside the installed klvae package ({w}/pkg), which holds its built-in models; " \
          "name another place"
DATA = "--save {0} is {1}the input folder (--data data); name a folder outside it"


@pytest.mark.parametrize(("argv", "plain", "overwrite"), [
    (["-m", "m", "--save", "other"], EXISTS.format("other"), None),  # another model: --overwrite may replace it
    (["-m", "m", "--save", "m"], EXISTS.format("m"), READ.format("m", "m")),
    (["-m", "link", "--save", "m"], EXISTS.format("m"), READ.format("m", "link")),  # by another name
    (["-m", "m", "--save", "link"], EXISTS.format("link"), READ.format("link", "m")),
    (["--save", "builtin"], EXISTS.format("builtin"), READ.format("builtin", "{w}/builtin")),  # no --model: demo
    (["-m", "m", "--save", "pkg/assets/demo"], PACKAGE, PACKAGE),
    (["-m", "m", "--save", "data"], DATA.format("data", ""), DATA.format("data", "")),
    (["-m", "m", "--save", "datalink/new"], *[DATA.format("datalink/new", "inside ")] * 2),
], ids=["other model", "model read", "model read by link", "link to model read", "built-in", "package", "data",
        "inside data"])
def test_scale_save_replaces_nothing_it_was_not_asked_to(
    places: Path, no_work: None, capsys: pytest.CaptureFixture[str], argv: list[str], plain: str,
    overwrite: str | None,
) -> None:
    before = _tree(places)
    assert _refused(capsys, [*SCALE, *argv]) == plain.format(w=places)
    if overwrite is not None:  # --overwrite replaces another model, never the one read, the data or klvae's own
        assert _refused(capsys, [*SCALE, *argv, "--overwrite"]) == overwrite.format(w=places)
    assert _tree(places) == before


def test_scale_save_with_overwrite_replaces_another_model(places: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(places)
    assert main(["-q", *SCALE, "-m", "m", "--save", "other", "--overwrite"]) == 0
    assert "saved to other" in capsys.readouterr().out
    after = _tree(places)
    assert after["other/config.json"] != before["other/config.json"]  # the new factors
    assert {k: v for k, v in after.items() if not k.startswith("other/")} == \
        {k: v for k, v in before.items() if not k.startswith("other/")}
    assert klvae.AutoencoderKL.from_pretrained("other").config.scaling_factor != \
        klvae.AutoencoderKL.from_pretrained("m").config.scaling_factor


def test_the_real_built_in_model_is_never_a_save_target() -> None:
    from klvae.cli.common import check_model_output
    from klvae.errors import KlvaeError

    demo = Path(klvae.__file__).resolve().parent / "assets" / "demo"
    assert common.package_dir() == demo.parents[1]
    with pytest.raises(KlvaeError, match="inside the installed klvae package"):
        check_model_output(demo, "--save", overwrite=True)  # checked here, not by a run that could replace it


EVAL = ["eval", "-m", "m", "--no-lpips", "--no-fid", "--resolution", "32"]
CACHE = ["cache", "-m", "m", "--resolution", "32", "--num-workers", "0"]


@pytest.mark.parametrize("command", [EVAL, CACHE], ids=["eval", "cache"])
@pytest.mark.parametrize(("data", "output", "where"), [
    ("data", "data", "is the input folder (--data data)"),
    ("data", "data/report", "is inside the input folder (--data data)"),
    ("data", "datalink", "is the input folder (--data data)"),  # by another name
    ("datalink", "data/images", "is inside the input folder (--data datalink)"),
    ("shards", "shards", "is the input folder (--data shards)"),  # a folder of .tar shards
])
def test_eval_and_cache_never_write_into_their_data_folder(
    places: Path, no_work: None, capsys: pytest.CaptureFixture[str], command: list[str], data: str, output: str,
    where: str,
) -> None:
    before = _tree(places)
    line = _refused(capsys, [*command, "--data", data, "-o", output])
    assert line == f"--output {output} {where}; name a folder outside it"
    assert _tree(places) == before
    assert not Path(output).exists() or Path(output).samefile(data)  # not even the output folder was made


def test_an_output_beside_named_shards_is_still_allowed(places: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A glob names its files: what is written beside them is not read back, so it is no reason to refuse.
    assert main(["-q", *CACHE, "--data", "shards/*.tar", "-o", "shards"]) == 0
    assert (places / "shards" / "index.json").is_file()
    assert main(["-q", *CACHE, "--data", "shards/*.tar", "-o", "shards"]) == 0  # a rerun: the same two images
    assert "cached 2 rows" in capsys.readouterr().out


# encode, reconstruct, noise and eval replace an earlier result only when asked to, as decode, convert and scale do.

def _forbid_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from klvae.model.autoencoder import AutoencoderKL

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model loaded before the output was checked")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", refuse)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading any model fails the test: a refused output must cost no load (nor a download)."""
    _forbid_model_loads(monkeypatch)


FILE_COMMANDS = {
    "encode": ["encode", "data", "-m", "m", "-o", "out.safetensors"],
    "encode .latent": ["encode", "data", "-m", "m", "-o", "out.latent"],
    "reconstruct": ["reconstruct", "data/img0.png", "-m", "m", "-o", "out.png"],
    "noise": ["noise", "data/img0.png", "-m", "m", "--steps", "0", "500", "-o", "out.png"],
}


@pytest.mark.parametrize("argv", FILE_COMMANDS.values(), ids=FILE_COMMANDS.keys())
@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_a_file_output_is_replaced_only_with_overwrite(
    places: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], kind: str,
) -> None:
    out = places / argv[-1]
    if kind == "file":
        out.write_bytes(b"an earlier result")
    else:
        out.symlink_to(places / "gone")  # the rename would replace the link, so it is there too
    before = _tree(places)
    with monkeypatch.context() as mp:
        _forbid_model_loads(mp)
        assert _refused(capsys, argv) == f"--output {argv[-1]} already exists; add --overwrite to replace it"
    assert _tree(places) == before  # nothing written, not even a temporary file
    assert main(["-q", *argv, "--overwrite"]) == 0
    assert not out.is_symlink() and out.read_bytes() != b"an earlier result"
    assert not [p for p in places.iterdir() if p.name.endswith(".tmp")]


def test_overwrite_never_lets_an_output_replace_its_input(places: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(places)
    for command in ("reconstruct", "noise"):
        line = _refused(capsys, [command, "data/img0.png", "-m", "m", "-o", "data/img0.png", "--overwrite"])
        assert line == "--output data/img0.png is one of the inputs; it would be overwritten"
    assert _tree(places) == before


def test_overwrite_help_is_one_phrase_across_commands() -> None:
    from klvae.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("encode", "decode", "reconstruct", "noise", "eval"):
        (action,) = [a for a in sub.choices[name]._actions if "--overwrite" in a.option_strings]
        assert action.help.startswith("replace ") and action.help.endswith(" (refused without it)"), name


REPORT = [*EVAL, "--data", "data", "-o", "rep"]


@pytest.mark.parametrize("held", ["index.html", "summary.json", "metrics.csv", "images/00001_m0_recon.png"])
def test_eval_refuses_a_folder_holding_an_earlier_report(
    places: Path, no_work: None, no_model: None, capsys: pytest.CaptureFixture[str], held: str,
) -> None:
    # Any one file of a report is enough: the new report would be mixed with, or replace, the earlier one.
    (places / "rep" / held).parent.mkdir(parents=True)
    (places / "rep" / held).write_text("earlier")
    before = _tree(places)
    line = _refused(capsys, REPORT)
    assert line == f"--output rep: rep/{held} already exists (an earlier report); add --overwrite to replace it"
    assert _tree(places) == before


def test_eval_refuses_a_folder_where_a_report_file_goes_even_with_overwrite(
    places: Path, no_work: None, no_model: None, capsys: pytest.CaptureFixture[str],
) -> None:
    (places / "rep" / "index.html").mkdir(parents=True)
    line = _refused(capsys, [*REPORT, "--overwrite"])
    assert line == "--output rep: rep/index.html is a folder; the report's file of that name cannot replace it"
    (places / "rep" / "index.html").rmdir()
    (places / "rep" / "images").write_text("not a folder")
    line = _refused(capsys, [*REPORT, "--overwrite"])
    assert line == "--output rep: rep/images is not a folder; the report's example PNGs go there"


def test_eval_writes_into_a_folder_without_a_report_and_overwrite_replaces_only_the_report(
    places: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (places / "rep").mkdir()
    assert main(["-q", *REPORT]) == 0  # an empty folder is a fine place for a report
    (places / "rep" / "notes.txt").write_text("mine")
    (places / "rep" / "images" / "mine.png").write_bytes(b"mine")
    mine = {k: v for k, v in _tree(places / "rep").items() if k in ("notes.txt", "images/mine.png")}
    first = json.loads((places / "rep" / "summary.json").read_text())
    assert main(["-q", *REPORT, "--limit", "1", "--overwrite"]) == 0
    after = _tree(places / "rep")
    assert {k: v for k, v in after.items() if k in mine} == mine  # the user's own files stay as they were
    assert json.loads((places / "rep" / "summary.json").read_text())["images"]["evaluated"] == 1
    assert first["images"]["evaluated"] == 2
    assert not [k for k in after if k.endswith(".tmp")]
    # A folder of other files (no report in it) takes a report without --overwrite: nothing of it is replaced.
    (places / "mine").mkdir()
    (places / "mine" / "notes.txt").write_text("mine")
    assert main(["-q", *EVAL, "--data", "data", "-o", "mine"]) == 0
    assert (places / "mine" / "notes.txt").read_text() == "mine" and (places / "mine" / "index.html").is_file()
