"""``InputError``: what a user gave is malformed (a recipe, a tensors file, a flag's value); raised where the
input is checked, with a message naming the file and, where known, the line.

The CLIs' error net (``stores.cli_errors``) prints it as one line. A ``ValueError`` subclass, so callers that
already catch ``ValueError`` around input parsing keep working.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Malformed input; the message names it (``recipe.yaml, line 3: ...``)."""
