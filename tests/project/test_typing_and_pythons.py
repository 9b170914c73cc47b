"""What the package promises beyond its code: type information for users' checkers (py.typed, the predicates
whose TypeGuards keep mypy from skipping the code after a check), and Python 3.10, which has no tomllib."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import klvae
from klvae.checks import is_integer, is_real

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_ships_its_type_information() -> None:
    marker = Path(klvae.__file__).parent / "py.typed"
    assert marker.is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["klvae"]  # in wheels, not only clones


@pytest.mark.parametrize("value", [0, 7, -3, np.int64(5), np.uint8(2)])
def test_integers_of_python_and_numpy_count_as_integers_and_reals(value: object) -> None:
    assert is_integer(value) and is_real(value)


@pytest.mark.parametrize("value", [0.5, np.float32(1.5), np.float64(-2.0), float("nan")])
def test_floats_are_reals_not_integers(value: object) -> None:
    assert is_real(value) and not is_integer(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), "3", None, [1], 1j, np.array([1, 2])])
def test_bools_strings_and_containers_are_neither(value: object) -> None:
    assert not is_real(value) and not is_integer(value)


def test_python_3_10_reads_toml_configs_with_tomli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # As on 3.10: no tomllib, the tomli package (the same parser) installed. The config module is loaded afresh
    # under another name, so the one the other tests use stays as it is.
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now raises ImportError
    tomli = types.ModuleType("tomli")
    tomli.loads, tomli.TOMLDecodeError = tomllib.loads, tomllib.TOMLDecodeError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tomli", tomli)
    path = Path(klvae.__file__).parent / "training" / "config.py"
    spec = importlib.util.spec_from_file_location("klvae_config_py310", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.tomllib is tomli
    cfg = tmp_path / "run.toml"
    cfg.write_text('[data]\ntrain = "images/"\n[train]\nmax_steps = 7\n')
    assert module.load_config(cfg).train.max_steps == 7
    cfg.write_text("[train\n")
    with pytest.raises(klvae.errors.KlvaeError, match="cannot parse"):
        module.load_config(cfg)


def test_python_3_10_installs_tomli() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("tomli>=") and "python_version<'3.11'" in d.replace(" ", "")
               for d in deps)
