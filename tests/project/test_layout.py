"""The package's layering, read from the source: which parts of klvae may import which."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "klvae"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            names.add(base)
    return names


def _modules(*parts: str) -> list[Path]:
    paths: list[Path] = []
    for part in parts:
        p = SRC / part
        paths += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    return paths


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", _modules("model", "posterior"), ids=lambda p: p.name)
def test_the_model_imports_only_torch_and_itself_at_module_level(path: Path) -> None:
    allowed = ("torch", "klvae.model", "klvae.posterior", "klvae.errors", "klvae.checks", "__future__")
    stdlib = sys.stdlib_module_names
    bad = {n for n in _imports(path, top_level_only=True)
           if not _within(n, allowed) and n.partition(".")[0] not in stdlib}
    assert not bad, f"{path.name} imports {sorted(bad)} at module level"


LIBRARY = ("model", "posterior", "inference", "weights", "nets", "evaluation", "latents", "images",
           "datasources", "diffusion", "flow", "atomic", "checks", "checksum", "errors", "progress", "compat",
           "distributed")


@pytest.mark.parametrize("path", _modules(*LIBRARY), ids=lambda p: _module_name(p))
def test_the_library_below_training_and_cli_never_imports_them(path: Path) -> None:
    bad = {n for n in _imports(path, top_level_only=False) if _within(n, ("klvae.training", "klvae.cli"))}
    assert not bad, f"{_module_name(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("training"), ids=lambda p: _module_name(p))
def test_training_never_imports_the_cli(path: Path) -> None:
    assert not {n for n in _imports(path, top_level_only=False) if _within(n, ("klvae.cli",))}


def test_the_pretrained_networks_stand_alone() -> None:
    # errors and checksum (file hashes) are the only other parts of klvae the networks, and checksum, may use.
    for path in _modules("nets", "checksum"):
        bad = {n for n in _imports(path, top_level_only=False)
               if n.startswith("klvae.") and not _within(n, ("klvae.nets", "klvae.errors", "klvae.checksum"))}
        assert not bad, f"{_module_name(path)} imports {sorted(bad)}"


def test_the_rules_see_every_library_file() -> None:
    """A new top-level module or folder must be placed in the rules above, not slip past them."""
    covered = {p.resolve() for p in _modules(*LIBRARY, "training", "cli", "__init__")}
    assert {p.resolve() for p in SRC.rglob("*.py")} == covered


@pytest.mark.parametrize("path", _modules(*LIBRARY, "training", "cli", "__init__"), ids=lambda p: _module_name(p))
def test_diffusers_stays_a_test_only_dependency(path: Path) -> None:
    """diffusers is the tests' oracle: no part of klvae may need it (nor transformers) to run."""
    bad = {n for n in _imports(path, top_level_only=False) if _within(n, ("diffusers", "transformers"))}
    assert not bad, f"{_module_name(path)} imports {sorted(bad)}"


def test_compat_imports_neither_diffusers_nor_training_nor_the_cli() -> None:
    # diffusers is a test-only dependency; the library below training and the CLI never imports them.
    names = _imports(SRC / "compat.py", top_level_only=False)
    assert "klvae.inference.tiling" in names  # the parse sees the imports
    bad = {n for n in names if _within(n, ("diffusers", "transformers", "klvae.training", "klvae.cli"))}
    assert not bad


def test_every_python_file_stays_under_500_lines() -> None:
    """The guide's file size: a file past it is split by concern (helpers shared through tests/helpers.py)."""
    root = SRC.parents[1]
    files = [p for part in ("src", "tests", "benchmarks") for p in (root / part).rglob("*.py")]
    assert len(files) > 100  # the walk sees the project
    lines = {p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    assert not {name: n for name, n in lines.items() if n > 500}
