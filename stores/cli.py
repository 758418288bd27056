"""The one error path of every command line (``stores``, ``reinforce.*``, ``train.*``).

A user error (a bad spec, a missing file, a damaged store, no network) is one ``PROG: error: ...``
line on stderr and exit status 2, as argparse does for a bad flag; a traceback is for bugs and
for ``--debug`` (or ``VFM_REINFORCE_DEBUG=1``, read when the error happens). Ctrl-C is one line
and the shell's status 130. It lives in ``stores``, the bottom package, so every CLI can use it.

Example:
    >>> parser = debug_flag(argparse.ArgumentParser(prog="train.evaluate"))
    >>> args = parser.parse_args(argv)
    >>> with cli_errors(parser.prog, args.debug):
    ...     result = evaluate(...)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from stores.store import StoreCorruptError
from stores.untrusted import printable

__all__ = ["USER_ERRORS", "cli_errors", "debug_flag"]

# StoreFormatError and ManifestError are ValueErrors; ConnectionError and PermissionError are OSErrors
USER_ERRORS = (ValueError, OSError, ImportError, StoreCorruptError)


def debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--debug`` (show the traceback of an error) to ``parser``; returns it."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def one_line(error: BaseException) -> str:
    """The error's message as one inert line (control characters escaped: a store's text may be in it). An error
    re-raised from a DataLoader worker carries the worker's traceback; its last line holds the message."""
    text = str(error).strip()
    if "\nOriginal Traceback" in text:
        text = text.rsplit("\n", 1)[-1].partition(": ")[2]
    return printable(text) if text else type(error).__name__


@contextlib.contextmanager
def cli_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a user error into one ``PROG: error: ...`` line and ``SystemExit(2)``; re-raise it when debugging."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as error:
        if debug or os.environ.get("VFM_REINFORCE_DEBUG", "") not in ("", "0"):
            raise
        message = one_line(error)
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
