"""Predicates for numbers that users give (config fields, options, arguments), shared by the validators.

numpy scalars count (a size or factor computed with numpy); bool does not, though Python makes it an int. The
TypeGuards tell a type checker what a passed check means: with a plain isinstance(v, numbers.Real) on a `float`
parameter it would take the check as always failing and skip the code after it.
"""

from __future__ import annotations

import numbers
from typing import TypeGuard

# torch.finfo(torch.float32).max: numbers that end up in float32 tensors (weights, optimiser steps) must not pass it.
FLOAT32_MAX = 3.4028234663852886e38


def is_real(v: object) -> TypeGuard[float]:
    """Whether `v` is a real number (int, float, numpy scalar; not bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_integer(v: object) -> TypeGuard[int]:
    """Whether `v` is an integer (int, numpy integer; not bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
