"""Strict JSON decoding, shared by the ``-config`` file and QMP: the two places a person's JSON
reaches the program.

Python's ``json`` is lenient in three ways that would let a typo or a hostile client through:
a key given twice silently keeps the last value, ``NaN``/``Infinity`` are accepted although they
are not JSON, and a number too large for a double becomes ``inf``. :func:`loads` refuses all
three with a :class:`StrictJsonError` naming what it found; each caller words the sentence for
its own user. Syntax errors stay ``json.JSONDecodeError`` (with a position); nesting too deep for
the parser is ``RecursionError``; an integer with more digits than Python converts is
``ValueError``.
"""

from __future__ import annotations

import json
import math
from typing import Any


class StrictJsonError(ValueError):
    """Valid to Python's parser but refused here; ``str()`` is a phrase such as
    ``duplicate key 'id'`` or ``NaN is not a valid JSON number``."""


class DuplicateKeyError(StrictJsonError):
    def __init__(self, key: str):
        super().__init__(f"duplicate key '{key}'")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise StrictJsonError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError(f"number {text[:40]} is out of range")
    return value


def loads(text: str) -> Any:
    """Decode one JSON text strictly (see the module docstring for what is refused)."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant,
                      parse_float=_finite_float)
