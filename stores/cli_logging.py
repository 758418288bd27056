"""Logging of the command lines that log progress: INFO lines to stderr, without the libraries' chatter.

Set by each CLI's ``main`` (never when a module is imported): a library user keeps their own logging setup.

Example:
    >>> def main(argv=None):
    ...     log_to_stderr()
"""

from __future__ import annotations

import logging

__all__ = ["QUIET_LOGGERS", "log_to_stderr"]

# botocore logs credential and endpoint discovery at INFO in every process; the CLIs log at INFO
QUIET_LOGGERS = ("botocore", "aiobotocore")


def log_to_stderr(level: int = logging.INFO) -> None:
    """``PREFIX name: message`` lines at ``level`` to stderr; ``QUIET_LOGGERS`` only from WARNING."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
