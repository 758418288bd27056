"""The rows of the comparison, one table shared by ``train.pipeline`` (what a cell runs) and ``train.report``
(how a row is ordered, labelled and coloured).

A grid method is what the student learns from (``target``: the store's target it distills; ``None``: labels
only) and whether its teacher runs in the distillation loop (``online``). ``teacher`` is a reference row, not
a grid method: the adapted teacher itself on the test split.

Example:
    >>> METHODS["task-oriented"].target
    'logits'
    >>> [row.name for row in ROWS][-1]
    'teacher'
"""

from __future__ import annotations

import dataclasses

__all__ = ["METHODS", "METRICS", "ROWS", "TASKS", "TEACHER", "TEACHER_MODES", "Method", "family"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One row family of the comparison."""

    name: str
    target: str | None  # the store target the student distills; None: no distillation
    label: str  # table column / legend entry
    color: str
    online: bool = False  # the teacher runs in the distillation loop: the uncached ceiling
    by_teacher_mode: bool = False  # one column per teacher adaptation mode, labelled with it
    mode_colors: tuple[tuple[str, str], ...] = ()  # (teacher mode, colour) where it differs from ``color``

    def column(self, mode: str | None) -> str:
        """Table column / legend entry: rows by teacher mode carry the mode, e.g. ``task-oriented (ft)``."""
        return f"{self.label} ({mode})" if self.by_teacher_mode and mode else self.label

    def color_of(self, mode: str | None) -> str:
        return dict(self.mode_colors).get(mode, self.color)


METHODS = {method.name: method for method in (  # in the paper's order
    Method("labeled-only", None, "labeled-only", "tab:blue"),
    Method("task-agnostic-embedding", "embedding", "task-agnostic (embedding)", "tab:green"),
    Method("task-agnostic-patch", "patch", "task-agnostic (patch)", "tab:olive"),
    Method("task-oriented", "logits", "task-oriented", "tab:red", by_teacher_mode=True,
           mode_colors=(("ft", "darkred"), ("auto", "tab:orange"))),
    Method("task-oriented-online", "logits", "task-oriented online", "tab:purple", online=True, by_teacher_mode=True),
)}
TEACHER = Method("teacher", None, "teacher", "black", by_teacher_mode=True,
                 mode_colors=(("ft", "dimgray"), ("auto", "gray")))
ROWS = (*METHODS.values(), TEACHER)
TEACHER_MODES = ("lp", "ft", "auto")  # a task-oriented teacher's adaptation; task-agnostic rows use it frozen
# task -> (the task teacher's cached target, the headline metric); the task is the labeled data's
TASKS = {"classification": ("logits", "top1"), "segmentation": ("seg_logits", "miou")}
# headline metric -> (its label, the second metric, that one's label, what "shots" counts)
METRICS = {"top1": ("top-1", "balanced_accuracy", "bal. acc", "labeled images per class"),
           "miou": ("mIoU", "pixel_accuracy", "pixel acc", "labeled images")}


def family(name: str) -> Method:
    """The row family ``name`` (a grid method or ``teacher``); an unknown name (results of another version) gets a
    grey row labelled with its name, ordered last."""
    return METHODS.get(name) or (TEACHER if name == TEACHER.name else Method(name, None, name, "gray"))
