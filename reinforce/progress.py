"""Progress for every CLI: a tqdm bar on a terminal, plain lines in a redirected log.

A bar redraws itself with carriage returns, which a log file written by nohup, a batch scheduler
or CI keeps as one unreadable line. When the stream is not a terminal, ``progress_bar`` prints one
line every ``interval`` seconds and one when it closes: steps done of the total, rate and ETA.

Example:
    >>> for batch in progress_bar(loader, desc="epoch 1/10", unit="batch"):
    ...     ...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["LineProgress", "progress_bar"]


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, stream: TextIO | None = None, interval: float = 30.0) -> tqdm | LineProgress:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a ``LineProgress``; same use either way."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, dynamic_ncols=True,
                    mininterval=1.0)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, stream=stream,
                        interval=interval)


class LineProgress:
    """The part of tqdm's interface the CLIs use (iterate, ``update``, ``set_postfix``, ``close``), as log lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, stream: TextIO, interval: float = 30.0):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else _length(iterable)
        self.stream, self.interval = stream, interval
        self.done, self.postfix, self.closed = 0, "", False
        self.started = self.last = time.monotonic()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.interval:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print()

    def _print(self) -> None:
        now = time.monotonic()
        self.last = now
        if self.disable:
            return
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of_total = f"/{self.total}" if self.total else ""
        eta = (f", ETA {_clock((self.total - self.done) / rate)}" if self.total and rate > 0 and not self.closed
               else f", {_clock(elapsed)} elapsed")
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}{of_total} {self.unit}, {rate:.1f} {self.unit}/s{eta}{postfix}",
              file=self.stream, flush=True)


def _length(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
