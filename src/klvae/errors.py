"""The one exception family that the library raises for bad input; the CLI turns it into a one-line error."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar


class KlvaeError(Exception):
    """Bad input or an unusable resource, described in one line for a person."""


class WeightsError(KlvaeError):
    """Weights that cannot be read, or that do not fit the model (names the keys)."""


class ImageError(KlvaeError):
    """An image that cannot be read, is truncated, or is absurdly large."""


class ImageTooLarge(ImageError):
    """An image refused for its pixel count alone (a decompression-bomb guard): an image all the same."""


class LatentsError(KlvaeError):
    """Latents that do not fit the model (channels) or are not finite."""


def first_line(e: BaseException) -> str:
    """An error's message cut to its first line (its type's name when it has none): torch's run to a dozen."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_failure(e: BaseException) -> str:
    """`Type: first line` of a torch.load failure, one short line: its weights_only refusal runs to a dozen lines,
    in bold."""
    return f"{type(e).__name__}: {cut(_ANSI.sub('', first_line(e)), 100)}"


# C0 controls (newlines and tabs too), DEL and C1: printed raw, a file name's ESC or BEL would drive the terminal
# (clear it, retitle it) and its newline would fake a line of output.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters written as \\xNN escapes, safe to print on one terminal line."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cut(text: str, limit: int = 60, tail: int = 0) -> str:
    """`text` cut to `limit` characters, '...' where it was cut, keeping its last `tail` (a file name's suffix)."""
    if len(text) <= limit:
        return text
    return text[: limit - 3 - tail] + "..." + (text[-tail:] if tail else "")


def quote(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a crafted file can put megabytes in a field an error quotes."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str limit
        text = f"<{type(value).__name__} too long to show>"
    return cut(text, limit)


# How an error names an option (and, given one, its value): as a Python keyword argument, or as a command-line
# flag. The library words its errors with `keyword`; a command words them with `flag` (or its own variant).
Namer = Callable[..., str]
_NO_VALUE = object()
_PLAIN = re.compile(r"[\w./~<>+:-]{1,60}")  # shown bare after a flag; anything else is quoted


def keyword(name: str, value: object = _NO_VALUE) -> str:
    """`name`, or `name=value` as a Python call would pass it (a path as a string, in full)."""
    if value is _NO_VALUE:
        return name
    return f"{name}={os.fspath(value)!r}" if isinstance(value, os.PathLike) else f"{name}={quote(value)}"


def flag(name: str, value: object = _NO_VALUE) -> str:
    """`--name`, or the flags that give it `value`: `--name value`, `--name` for True, `no --name` for False."""
    text = "--" + name.replace("_", "-")
    if value is _NO_VALUE or value is True:
        return text
    if value is False:
        return f"no {text}"
    if isinstance(value, os.PathLike):  # the user's own path, in full
        return f"{text} {os.fspath(value)}"
    shown = str(value)
    return f"{text} {shown if _PLAIN.fullmatch(shown) else quote(shown)}"


class OptionError(KlvaeError):
    """A bad value of an option. Its message names the option as the Python API does (`shard_size`); `flags()`
    is the same message naming the command line's flags (`--shard-size`), which the CLI prints instead."""

    def __init__(self, message: Callable[[Namer], str] | str, flags: str | None = None) -> None:
        # `message` writes the text given a Namer, both ways now: an exception must pickle and copy (a process
        # pool sends it back so), and a lambda does neither.
        text = message if isinstance(message, str) else message(keyword)
        super().__init__(text)
        self._flags = flags if flags is not None else text if isinstance(message, str) else message(flag)

    def __reduce__(self) -> tuple[type[OptionError], tuple[str, str]]:
        return type(self), (str(self), self._flags)

    def flags(self) -> str:
        """The message with each option named by its flag."""
        return self._flags


def flag_errors(cmd: Callable[[Any], int]) -> Callable[[Any], int]:
    """A CLI command whose OptionErrors (worded for Python callers) are raised as KlvaeErrors naming flags."""
    @functools.wraps(cmd)
    def run(args: Any) -> int:
        try:
            return cmd(args)
        except OptionError as e:
            raise KlvaeError(e.flags()) from None

    return run


def none_read(count: int) -> str:
    """"none of the N images could be read", or for one image "the only image could not be read"."""
    return "the only image could not be read" if count == 1 else f"none of the {count} images could be read"


E = TypeVar("E", bound=BaseException)


def raised_within(e: BaseException, kind: type[E]) -> E | None:
    """`e`, or the exception it was raised while handling (its __context__, and so on), that is a `kind`; None if
    none is: a writer's `with` block that fails on the way out (torch.save's zip writer) hides what went wrong
    first, a Ctrl-C or a full disk."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None
