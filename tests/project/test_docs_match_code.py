"""The documentation, held to the code: docs/training.md's tables name every field of klvae.training.config (and of
the `ldm` loss preset) with its default; every `klvae COMMAND --flag` in README.md, docs/*.md and the demo recipes
names a subcommand and an option its argparse parser has (and a value among its choices); README's "Common options"
and "`info` takes only" sentences match the parsers, and its preset lists klvae.PRESETS and the hub presets; the
Python examples parse and every `klvae.*` name the docs use exists; the repository paths the docs name exist; the
demo recipes load. Each checker returns its findings, so that the `detects` tests can show it failing on a broken
copy."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import itertools
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from klvae.cli.main import build_parser
from klvae.errors import KlvaeError
from klvae.model.config import PRESET_HUB_FILES, PRESET_HUB_IDS
from klvae.training.config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TRAINING_MD = ROOT / "docs" / "training.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
RECIPES = sorted((ROOT / "recipes" / "demo").glob("*.yaml"))

FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
REQUIRED = "(required)"  # the doc's word for a field with no usable default: load_config refuses it unset


# ---- docs/training.md's tables against the config dataclasses ----------------------------------------------


def _cells(row: str) -> list[str]:
    # `\|` is a pipe inside a cell (KL(q(z\|x) ...)), not a column break.
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def _top_level_split(cell: str) -> list[str]:
    """`a`, `b` -> [a, b]; a comma inside [...] or {...} stays (`[0.5, 0.9]` is one value)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(cell):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cell[start:i])
            start = i + 1
    return [p.strip().strip("`") for p in [*parts, cell[start:]]]


def parse_default(text: str) -> object:
    """A default as the doc writes it, in YAML (as --print-config does), with the numbers PyYAML leaves as strings
    (1e-6) read as numbers."""
    if text == REQUIRED:
        return REQUIRED
    value = yaml.safe_load(text)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def doc_rows(text: str) -> list[tuple[str, list[str], str, str]]:
    """(section, field names, default cell, meaning cell) of each row of the tables under "### `section`"."""
    rows, section = [], None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = re.match(r"#{2,4} `(\w+)`", line)
            section = heading.group(1) if heading else None
        elif section is not None and line.startswith("|") and not set(line) <= set("|-: "):
            cells = _cells(line)
            names = re.findall(r"`(\w+)`", cells[0])
            rows += [(section, names, cells[1], cells[2])] if names else []  # none: the header row
    return rows


def doc_tables(text: str) -> dict[str, dict[str, object]]:
    """{section: {field: default}} from the tables under the "### `section`" headings."""
    tables: dict[str, dict[str, object]] = {}
    for section, names, default, _ in doc_rows(text):
        values = _top_level_split(default)
        values = values * len(names) if len(values) == 1 else values
        assert len(values) == len(names), f"{section}: {len(names)} fields but {len(values)} defaults: {default!r}"
        tables.setdefault(section, {}).update(zip(names, map(parse_default, values), strict=True))
    return tables


def code_defaults() -> dict[str, dict[str, object]]:
    """{section: {field: default}} of TrainConfig, the loss section spelled out from its default preset."""
    return TrainConfig().resolved_dict()


def _same(doc: object, code: object) -> bool:
    if doc is REQUIRED:
        return code == ""
    if isinstance(doc, bool) or isinstance(code, bool):  # True == 1 to Python, not to a reader
        return type(doc) is type(code) and doc == code
    return doc == (list(code) if isinstance(code, tuple) else code)


def table_mismatches(text: str) -> list[str]:
    """Every difference between the doc's tables and the config's fields and defaults."""
    doc, code = doc_tables(text), code_defaults()
    found = [f"section {s} documented but not in TrainConfig" for s in sorted(doc.keys() - code.keys())]
    found += [f"section {s} of TrainConfig not documented" for s in sorted(code.keys() - doc.keys())]
    for section in sorted(doc.keys() & code.keys()):
        d, c = doc[section], code[section]
        found += [f"{section}.{f} documented but no such field" for f in sorted(d.keys() - c.keys())]
        found += [f"{section}.{f} not documented" for f in sorted(c.keys() - d.keys())]
        found += [f"{section}.{f}: doc says {d[f]!r}, code has {c[f]!r}" for f in sorted(d.keys() & c.keys())
                  if not _same(d[f], c[f])]
    return found


def test_training_md_tables_match_the_config() -> None:
    """Every field, and no other, with the default the dataclasses give it."""
    assert table_mismatches(TRAINING_MD.read_text(encoding="utf-8")) == []


def test_required_fields_are_refused_when_unset() -> None:
    """A field the doc calls required has no default a run can use."""
    required = [f"{s}.{f}" for s, fields in doc_tables(TRAINING_MD.read_text(encoding="utf-8")).items()
                for f, v in fields.items() if v is REQUIRED]
    assert required == ["data.train"]
    with pytest.raises(KlvaeError, match=re.escape(required[0])):
        load_config(None)


def test_table_check_detects_drift() -> None:
    """A changed default, a missing row and an invented row are each reported."""
    text = TRAINING_MD.read_text(encoding="utf-8")
    broken = (text.replace("| `max_steps` | `1000` |", "| `max_steps` | `999` |")
              .replace("| `cache_images` | `false` |", "| `cache_images` | `true` |")
              .replace("| `betas` | `[0.5, 0.9]` |", "| `betas` | `[0.9, 0.999]` |")
              .replace("| `seed` | `0` |", "| `seeds` | `0` |"))
    assert broken.count("|") == text.count("|") and broken != text
    assert table_mismatches(broken) == [
        "data.cache_images: doc says True, code has False",
        "optim.betas: doc says [0.9, 0.999], code has (0.5, 0.9)",
        "train.seeds documented but no such field",
        "train.seed not documented",
        "train.max_steps: doc says 999, code has 1000",
    ]


# Fields that take one of a few names; their table row's meaning lists them (the loss presets: the paragraph above).
ENUM_FIELDS = ("model.preset", "data.crop", "loss.preset", "loss.pixel_loss", "loss.disc_loss", "optim.schedule",
               "train.precision")


def doc_choices(text: str) -> dict[str, set[str]]:
    """{section.field: the names its meaning lists} for ENUM_FIELDS, asides in parentheses and after `;` left out."""
    found = {}
    for section, names, _, meaning in doc_rows(text):
        listed = re.sub(r"\([^)]*\)", "", meaning).split(";")[0]
        found |= {f"{section}.{n}": set(re.findall(r"`([\w-]+)`", listed)) for n in names}
    presets = re.search(r"^Presets: (.*?)\n\n", text, re.M | re.S)
    found["loss.preset"] = set(re.findall(r"`([\w-]+)`\s+\(", presets.group(1))) if presets else set()
    return {f: found.get(f, set()) for f in ENUM_FIELDS}


def code_choices(field: str) -> set[str]:
    """The names load_config's error for a bad value of `field` offers."""
    with pytest.raises(KlvaeError) as e:
        load_config(None, ["data.train=x", f"{field}=no-such-choice"])
    offered = re.search(r"(?:one of|must be) (.*?)(?:, got .*)?$", str(e.value))
    assert offered, str(e.value)
    return set(re.findall(r"[\w-]+", offered.group(1))) - {"one", "of", "or"}


def test_training_md_lists_every_choice() -> None:
    """Each enumerated field's documented names are exactly those the config accepts."""
    doc = doc_choices(TRAINING_MD.read_text(encoding="utf-8"))
    assert {f: doc[f] for f in ENUM_FIELDS if doc[f] != code_choices(f)} == {}


def test_readme_lists_every_preset() -> None:
    """README's lists of what `klvae.PRESETS` holds, and of the presets `--model` fetches, are the code's."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    listed = re.search(r"`klvae\.PRESETS` holds (.*?) test configs", text)
    fetched = re.search(r"or a preset name \((.*?)\) that fetches the released weights", text)
    assert listed and fetched, "README's preset sentences were reworded: update this test"
    assert set(re.findall(r"`([\w-]+)`", listed.group(1).replace("/", "` `"))) == code_choices("model.preset")
    assert set(re.findall(r"`([\w-]+)`", fetched.group(1))) == {*PRESET_HUB_IDS, *PRESET_HUB_FILES}


def test_choice_check_detects_drift() -> None:
    """A choice left out of a row, and one the code does not have, are each seen."""
    text = TRAINING_MD.read_text(encoding="utf-8")
    broken = text.replace("`hinge` or `vanilla`", "`hinge`").replace("`l1` or `l2`", "`l1`, `l2` or `huber`")
    doc = doc_choices(broken)
    assert (doc["loss.disc_loss"], doc["loss.pixel_loss"]) == ({"hinge"}, {"l1", "l2", "huber"})
    assert doc["loss.disc_loss"] != code_choices("loss.disc_loss")
    assert doc["loss.pixel_loss"] != code_choices("loss.pixel_loss")


# ---- `klvae COMMAND --flag` against the argparse parsers -------------------------------------------------------


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's."""
    top = build_parser()
    (sub,) = (a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return top, dict(sub.choices)


def _code_lines(block: str) -> list[str]:
    """A shell block's commands: continuations joined, comments and pipes cut off."""
    lines = block.replace("\\\n", " ").splitlines()
    return [re.split(r"(?:^|\s)#|\s\|\s|&&|;", ln)[0] for ln in lines]


def command_mentions(text: str, commands: set[str]) -> list[tuple[str, str]]:
    """(command line after `klvae`, where) for each klvae command in shell blocks and inline code; an inline span
    that starts with a subcommand's name and an option (`scale --per-channel`) counts too."""
    found = []
    for block in FENCE.finditer(text):
        if block.group(2) not in ("python", "yaml", "json", "toml"):
            for line in _code_lines(block.group(3)):
                m = re.search(r"(?:^|\s)(?:klvae|-m klvae\.cli\.main)\s+(.*)", line)
                found += [(m.group(1), line.strip())] if m else []
    for span in map(str.strip, INLINE.findall(FENCE.sub("", text))):
        words = _code_lines(span)[0].split()
        if words[0] == "klvae" and len(words) > 1:
            found.append((" ".join(words[1:]), span))
        elif words[0] in commands and len(words) > 1 and words[1].startswith("-"):
            found.append((" ".join(words), span))
    return found


def _placeholder(value: str) -> bool:
    return value.isupper() or value.startswith(("<", "["))


def _value_problems(parser: argparse.ArgumentParser, words: list[str], where: str) -> list[str]:
    """An option's documented value that is not among its choices (`--crop centre`)."""
    found = []
    for flag, value in itertools.pairwise(words):
        action = parser._option_string_actions.get(flag)
        if action is None or action.choices is None or value.startswith("-") or _placeholder(value):
            continue
        found += [f"{where}: {flag} takes {sorted(action.choices)}, not {v!r}" for v in value.split("|")
                  if v not in action.choices]
    return found


def mention_problems(text: str) -> list[str]:
    """Unknown subcommands, options a subcommand does not have, and values outside an option's choices."""
    top, subs = parsers()
    found = []
    for line, where in command_mentions(text, set(subs)):
        words = line.split()
        command = next((w for w in words if not w.startswith("-")), None)
        before = words[: words.index(command)] if command else words
        found += [f"{where}: klvae has no option {f}" for f in before if f not in top._option_string_actions]
        if command is None:
            continue
        if command not in subs:
            found.append(f"{where}: klvae has no subcommand {command!r}")
            continue
        after = words[words.index(command) + 1:]
        found += [f"{where}: klvae {command} has no option {f}" for f in FLAG.findall(" ".join(after))
                  if f.split("=")[0] not in subs[command]._option_string_actions]
        found += _value_problems(subs[command], after, where)
    return found


def _doc_texts() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in [*DOCS, *RECIPES]}


@pytest.mark.parametrize("name", list(_doc_texts()))
def test_documented_commands_and_options_exist(name: str) -> None:
    """Each `klvae COMMAND ...` of the file names a subcommand, options and choices its parser has."""
    assert mention_problems(_doc_texts()[name]) == []


def test_every_subcommand_is_documented_in_the_readme() -> None:
    """The README shows each subcommand in use, and the mentions the checks read cover them all."""
    _, subs = parsers()
    mentioned = {line.split()[0] for line, _ in command_mentions(README.read_text(encoding="utf-8"), set(subs))}
    assert set(subs) - mentioned == set()


def test_lone_options_exist_on_some_command() -> None:
    """An inline `--option` in prose, outside a command line, is one some subcommand has."""
    top, subs = parsers()
    known = set(top._option_string_actions).union(*(p._option_string_actions for p in subs.values()))
    foreign = {"--extra-index-url"}  # pip's, in the set-up notes
    prose = [FENCE.sub("", p.read_text(encoding="utf-8")) for p in DOCS if p.name != "benchmarks.md"]  # bench.py's
    lone = {FLAG.match(s).group(1) for t in prose for s in INLINE.findall(t) if s.startswith("-") and FLAG.match(s)}
    assert len(lone) > 30
    assert sorted(lone - known - foreign) == []


def test_readme_option_summaries_match_the_parsers() -> None:
    """"Common options" are on every command that runs a model, the tiling ones on those the README names, and
    `info` takes exactly the options it lists."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    _, subs = parsers()
    common = re.search(r"\*\*Common options\*\* .*?: (.*?); and on (.*?), for large images, (.*?)\. ", text)
    info = re.search(r"`info` takes only (.*?)(?:, and names| and names)", text)
    assert common and info, "README's Common options or `info` sentence was reworded: update this test"
    runners = set(subs) - {"convert", "train", "info"}  # the README's "all but convert ... and train"; info below
    flags = {c: set(subs[c]._option_string_actions) for c in subs}
    for f in FLAG.findall(common.group(1)):
        assert {c for c in runners if f not in flags[c]} == set(), f
    for f in FLAG.findall(common.group(3)):
        assert {c for c in re.findall(r"`(\w+)`", common.group(2)) if f not in flags[c]} == set(), f
    logging_flags = {"--verbose", "--quiet", "--debug"}  # every command's, in the README's "Logging options"
    assert set(FLAG.findall(info.group(1))) == {f for f in flags["info"] if f.startswith("--")} - {"--help",
                                                                                                   *logging_flags}
    logging_text = re.search(r"\*\*Logging options\*\* of every command(.*?) prints the version", text)
    assert logging_text and set(FLAG.findall(logging_text.group(1))) >= logging_flags
    assert all(logging_flags <= flags[c] for c in subs)


def test_command_check_detects_drift() -> None:
    """A renamed option, an unknown subcommand and a value outside the choices are each reported."""
    text = ("```bash\nklvae encode photos/ -o z.safetensors --tile 512   # abbreviated\n```\n"
            "Then `klvae reconstrut x.png`, `eval --crop centre` and `klvae train c.yaml --resume`.\n")
    assert mention_problems(text) == [
        "klvae encode photos/ -o z.safetensors --tile 512: klvae encode has no option --tile",
        "klvae reconstrut x.png: klvae has no subcommand 'reconstrut'",
        "eval --crop centre: --crop takes ['center', 'none'], not 'centre'",
    ]


# ---- Python examples and `klvae.*` names -----------------------------------------------------------------------


def resolve(dotted: str) -> object:
    """The object `klvae.a.b` names, importing submodules on the way."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(".".join(parts[:i]))
    return obj


def _dotted(node: ast.AST) -> list[str] | None:
    """[a, b, c] for the expression a.b.c; None when it is not a plain name with attributes."""
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else [*base, node.attr]
    return [node.id] if isinstance(node, ast.Name) else None


def example_names(source: str) -> set[str]:
    """The klvae names a Python example imports or reaches through an imported klvae name."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {(a.asname or a.name).split(".")[0]: a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            bound |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    bound = {k: v for k, v in bound.items() if v.split(".")[0] == "klvae"}
    used = set(bound.values())
    for node in ast.walk(tree):
        chain = _dotted(node) if isinstance(node, ast.Attribute) else None
        if chain and chain[0] in bound:
            used.add(".".join([bound[chain[0]], *chain[1:]]))
    return used


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a Markdown text, dedented (some sit in list items)."""
    return [textwrap.dedent(m.group(3)) for m in FENCE.finditer(text) if m.group(2) == "python"]


def missing_names(names: set[str]) -> list[str]:
    """Those of `names` that klvae does not have."""
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    return missing


def test_readme_python_examples_parse_and_use_real_names() -> None:
    """Each Python block of the README and docs parses, and every klvae name it uses exists."""
    blocks = [b for p in DOCS for b in python_blocks(p.read_text(encoding="utf-8"))]
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 4
    names = set().union(*map(example_names, blocks))  # ast.parse raises on a block that does not parse
    assert {"klvae.inference.TileOptions", "klvae.AutoencoderKL.from_pretrained"} <= names
    assert missing_names(names) == []


def test_klvae_names_in_the_prose_exist() -> None:
    """Every `klvae.a.b` the docs and recipes mention (modules, functions, classes) exists."""
    names = {m for t in _doc_texts().values() for m in re.findall(r"\bklvae(?:\.[A-Za-z_]\w*)+", t)}
    assert len(names) > 20
    assert missing_names(names) == []


REPO_PATH = re.compile(r"(?<![\w/.-])((?:tests|src|docs|recipes|benchmarks)/[\w./-]*\w/?)")


def missing_paths(doc: Path) -> list[str]:
    """The repository paths `doc` names in code (inline or blocks) and the local link targets that do not exist."""
    text = doc.read_text(encoding="utf-8")
    named = set(REPO_PATH.findall(" ".join(INLINE.findall(FENCE.sub("", text)))))
    named |= {p for m in FENCE.finditer(text) for p in REPO_PATH.findall(m.group(3))}
    linked = {link for link in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in link}
    return sorted([p for p in named if not (ROOT / p).exists()] + [p for p in linked if not (doc.parent / p).exists()])


def test_documented_paths_exist() -> None:
    """Files and folders of the repository that the docs point to (tests, recipes, images, assets) are there."""
    assert {p.name: missing_paths(p) for p in DOCS if missing_paths(p)} == {}
    assert sum(len(REPO_PATH.findall(p.read_text(encoding="utf-8"))) for p in DOCS) > 30


def test_path_check_detects_drift(tmp_path: Path) -> None:
    """A renamed test file and a broken image link are each reported."""
    doc = tmp_path / "doc.md"
    doc.write_text("See `tests/training/test_ldm_loss_reference.py` and `tests/training/test_ldm_reference.py`.\n"
                   "```bash\npython recipes/demo/prepare.py\n```\n![](images/missing.png) [ok](https://x.org/a.md)\n")
    assert missing_paths(doc) == ["images/missing.png", "recipes/demo/prepare.py",
                                  "tests/training/test_ldm_reference.py"]


def test_recipes_load() -> None:
    """The demo recipes the docs point to are valid configs: every field they set exists."""
    for recipe in RECIPES:
        assert dataclasses.is_dataclass(load_config(recipe))


def test_name_check_detects_drift() -> None:
    """A name that is not there, reached either way, is reported; a block that does not parse raises."""
    source = ("import klvae\nfrom klvae import inference\nfrom klvae.latents import build_cahce\n"
              "inference.encod(klvae.AutoencoderKL.from_pretrianed('x'))\n")
    names = example_names(source)
    assert missing_names(names) == ["klvae.AutoencoderKL.from_pretrianed", "klvae.inference.encod",
                                    "klvae.latents.build_cahce"]
    with pytest.raises(SyntaxError):
        example_names("vae = klvae.AutoencoderKL(\n")
