"""Reading a training config's text: YAML that refuses a key given twice, the numbers YAML 1.1 leaves as strings,
and a parser's error in one line."""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

from klvae.errors import cut, first_line, quote

# A number with an exponent but no dot, which YAML 1.1 (PyYAML) reads as a string and YAML 1.2 and TOML as a number.
YAML11_EXPONENT = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


def yaml11_number(value: Any) -> Any:
    """A string YAML 1.1 left unread (1e-5: no dot) as the number it is; lists entry by entry."""
    if isinstance(value, list):
        return [yaml11_number(v) for v in value]
    return float(value) if isinstance(value, str) and YAML11_EXPONENT.match(value) else value


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently; TOML refuses it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be given again
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"{quote(key)} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """The YAML document in `text`, plain data only (a SafeLoader), with no key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeys)


def parse_problem(e: Exception) -> str:
    """The first line of a parser's error, cut short, with the line and column of a YAML error."""
    # Besides their own errors, the parsers raise ValueError for an int of over 4300 digits (Python's limit on
    # int(str)) and RecursionError for lists nested a few thousand deep.
    if isinstance(e, RecursionError):
        return "nested too deeply"
    # PyYAML gives the place on later lines of its message; tomllib's first line already ends with it.
    # Its problem, not its first line, which may be the context ("while parsing a flow node").
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.MarkedYAMLError) and e.problem and mark is not None:
        return f"{cut(e.problem, 200)} (line {mark.line + 1}, column {mark.column + 1})"
    return cut(first_line(e), 200)
