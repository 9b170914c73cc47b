"""Outputs never replace what the user did not ask to replace: `scale --save` refuses an existing model without
--overwrite, the model it reads (by any name), klvae's built-in model and the input folder; `eval` and `cache`
refuse an output folder that is (or lies inside) the --data folder. Each is one line, exit 2, before any work,
and leaves every file as it was."""

from __future__ import annotations

import io
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
