"""Parsing what someone else wrote: JSON with size and depth bounds, and text made safe to print.

A store arrives from a stranger, so every JSON document of it (manifest, zarr metadata, shard headers) is
parsed by ``load_json``: its size is checked before it is read whole and its nesting before the recursive
parser sees it (a few hundred levels of ``[`` are a RecursionError deep inside ``json`` or zarr otherwise).
Whatever a store says and a command prints goes through ``printable`` first: a NUL, a newline or U+202E
in a teacher name must not rewrite the user's terminal or split a one-line error.

Example:
    >>> load_json(b'{"a": [1, 2]}', max_bytes=1024, max_depth=4, where="x.json")
    {'a': [1, 2]}
    >>> printable("lite0\\n\\u202eevil")
    'lite0\\\\n\\\\u202eevil'
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "UntrustedInputError", "load_json", "printable"]

MAX_JSON_DEPTH = 32  # our deepest document (consolidated zarr metadata) nests ~8 levels
# a JSON string (skipped whole, so brackets inside strings do not count) or one bracket
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class UntrustedInputError(ValueError):
    """A document from a store that is too large, too deep or not JSON; the message names it."""


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, counted without recursion."""
    depth = deepest = 0
    for token in _TOKENS.finditer(data):
        bracket = token.group()
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif bracket in (b"]", b"}"):
            depth -= 1
    return deepest


def load_json(source: bytes | str | os.PathLike, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
              where: str = "") -> Any:
    """Parse JSON from bytes or a local file, refusing more than ``max_bytes`` or ``max_depth`` levels of
    nesting with an ``UntrustedInputError`` naming ``where`` (default: the path)."""
    if isinstance(source, bytes):
        data = source
    else:
        where = where or os.fspath(source)
        with open(source, "rb") as f:
            data = f.read(max_bytes + 1)
    where = where or "JSON document"
    if len(data) > max_bytes:
        raise UntrustedInputError(f"{printable(where)}: more than {max_bytes} bytes, more than it may hold")
    depth = json_depth(data)
    if depth > max_depth:
        raise UntrustedInputError(f"{printable(where)}: JSON nested {depth} levels deep, more than {max_depth}")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UntrustedInputError(f"{printable(where)}: not valid JSON ({type(error).__name__})") from None


def printable(text: object) -> str:
    """``str(text)`` with every control, format or unassigned character (NUL, newline, ESC, U+202E, ...)
    written as its Python escape, so what a store says prints as one inert line."""
    return "".join(ch if unicodedata.category(ch)[0] != "C" else ascii(ch)[1:-1] for ch in str(text))
