"""The one error path of every command line (``stores``, ``reinforce.*``, ``train.*``).

An error caused by input (a bad spec or file, a damaged or locked store, a missing path, no network) is one
``PROG: error: ...`` line on stderr and exit status 2, as argparse does for a bad flag. A bug in this
library or in a dependency keeps its traceback (exit status 1), and so does any error under ``--debug`` (or
``VFM_REINFORCE_DEBUG=1``, read when the error happens). Ctrl-C is one line and the shell's status 130. It
lives in ``stores``, the bottom package, so every CLI can use it.

Which errors are the user's (``is_user_error``), and why:

* the library's own input errors, by type: ``InputError``, ``StoreFormatError``, ``ManifestError``,
  ``StoreCorruptError``, ``StoreLockedError`` (raised where input is checked, the message naming it);
* a ``ValueError``, ``OSError`` or ``ImportError`` raised *by this library's own code* (the innermost frame of
  its traceback is in ``stores``, ``reinforce`` or ``train``): every such ``raise`` is a check of input with a
  message written for the user. The same types raised inside numpy, torch, zarr... are not: there they are a
  wrong call, i.e. a bug, and a one-line "error: cannot reshape array" would hide it;
* an ``OSError`` carrying an ``errno`` (a path that is missing or not readable, a full disk, a refused
  connection): the operating system or the server refused, whoever asked; its message names the path;
* a missing optional dependency (``ModuleNotFoundError`` of a package not ours): ``pip install`` fixes it;
* ``json.JSONDecodeError``: a JSON file given to us (``--deepspeed``, a policy argument) does not parse.

An error re-raised from a DataLoader worker is judged by the worker's traceback (the message carries it),
and printed by its original message.

Example:
    >>> parser = debug_flag(argparse.ArgumentParser(prog="train.evaluate"))
    >>> args = parser.parse_args(argv)
    >>> with cli_errors(parser.prog, args.debug):
    ...     result = evaluate(...)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from stores.errors import InputError
from stores.lock import StoreLockedError
from stores.manifest import ManifestError
from stores.store import StoreCorruptError, StoreFormatError
from stores.untrusted import printable

__all__ = ["INPUT_ERRORS", "HelpFormatter", "cli_errors", "config_flags", "debug_flag", "is_user_error"]

INPUT_ERRORS = (InputError, StoreFormatError, ManifestError, StoreCorruptError, StoreLockedError,
                json.JSONDecodeError)
OUR_PACKAGES = ("stores", "reinforce", "train")
_ROOT = Path(__file__).resolve().parents[1]
_OURS = tuple(str(_ROOT / package) + os.sep for package in OUR_PACKAGES)
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every CLI's ``formatter_class``: ``--help`` keeps the description's line breaks and shows each flag's
    default, flags without help text included (an unset default, ``None`` or an off switch, is not shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default is argparse.SUPPRESS or "default" in text:
            return text  # unset, an off switch, or a help text that already says what the default is
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, tuple | list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:
            action = copy.copy(action)
            action.help = self._get_help_string(action) or None
        return super()._format_action(action)


def config_flags(parser: argparse.ArgumentParser, defaults: object, *fields: str) -> None:
    """Add ``--field-name`` for each of ``fields``, typed and defaulted by that attribute of ``defaults`` (a config
    dataclass instance): the flags whose help is their name and default."""
    for field in fields:
        default = getattr(defaults, field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)


def debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--debug`` (show the traceback of an error) to ``parser``; returns it."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` was caused by input (one line, exit 2) rather than by a bug (a traceback); see above."""
    if isinstance(error, INPUT_ERRORS):
        return True
    if isinstance(error, OSError) and error.errno is not None:
        return True
    if isinstance(error, ModuleNotFoundError) and error.name and error.name.split(".")[0] not in OUR_PACKAGES:
        return True
    return isinstance(error, (ValueError, OSError, ImportError)) and _raised_by_us(error)


def _raised_by_us(error: BaseException) -> bool:
    """The innermost frame of ``error``'s traceback (of the worker's, for a DataLoader worker's error) is in
    this library's packages."""
    if _WORKER.match(str(error)):
        files = re.findall(r'^\s*File "([^"]+)"', str(error), re.MULTILINE)
        innermost = files[-1] if files else ""
    else:
        traceback = error.__traceback__
        while traceback is not None and traceback.tb_next is not None:
            traceback = traceback.tb_next
        innermost = traceback.tb_frame.f_code.co_filename if traceback is not None else ""
    return os.path.abspath(innermost).startswith(_OURS)


def _message(error: BaseException) -> str:
    """The first line of the error's message; a DataLoader worker's error by its original message."""
    text = str(error)
    if _WORKER.match(text):
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return printable(text.splitlines()[0]) if text.strip() else type(error).__name__


@contextlib.contextmanager
def cli_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a user error into one ``PROG: error: ...`` line and ``SystemExit(2)``; re-raise it when debugging,
    and re-raise every other error (a bug) with its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if not is_user_error(error) or debug or os.environ.get("VFM_REINFORCE_DEBUG", "") not in ("", "0"):
            raise
        print(f"{prog}: error: {_message(error)}", file=sys.stderr)
        raise SystemExit(2) from None
