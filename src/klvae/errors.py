"""The one exception family that the library raises for bad input; the CLI turns it into a one-line error."""

from __future__ import annotations


class KlvaeError(Exception):
    """Bad input or an unusable resource, described in one line for a person."""


class WeightsError(KlvaeError):
    """Weights that cannot be read, or that do not fit the model (names the keys)."""


class ImageError(KlvaeError):
    """An image that cannot be read, is truncated, or is absurdly large."""


class LatentsError(KlvaeError):
    """Latents that do not fit the model (channels) or are not finite."""


def first_line(e: BaseException) -> str:
    """An error's message cut to its first line (its type's name when it has none): torch's run to a dozen."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def cut(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters, ending in '...' where it was cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quote(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a crafted file can put megabytes in a field an error quotes."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str limit
        text = f"<{type(value).__name__} too long to show>"
    return cut(text, limit)
