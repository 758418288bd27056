"""The selection protocol every row is tuned by (teacher, labeled-only, finetune after distillation).

Why not a held-out validation part with early stopping: with 10 shots × 10 classes a 20 % part is
20 images, whose top-1 moves in 5-point steps, and a run stopped on it ends wherever that noise says
(a labeled-only baseline stopped at step 400 of 3,000 on one machine and trained on for 1,050 on
another). So every candidate setting (learning rate, and the length from a short list) trains on a
fixed-length AdamW + cosine schedule, and is scored by **k-fold cross-validation over the labeled
images with the predictions pooled over the folds** (10 × 10 shots give 100 validation predictions,
not 20). The final model then trains on **all** labeled images with the chosen setting. A user with a
separate labeled validation split passes it instead (``--val-data SPEC``, the paper's Appendix A way):
each candidate trains on all labeled images and is scored there.

Example:
    >>> protocol = Protocol(folds=3, seed=0)
    >>> chosen, record, model = select([Setting(3e-3, 500), Setting(1e-3, 500)], source, train, size=32,
    ...                                protocol=protocol)
    >>> record["scores"]          # {"lr=0.003,steps=500": 0.61, "lr=0.001,steps=500": 0.58}: pooled top-1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from typing import Protocol as Interface

import numpy as np
from torch import nn

from reinforce.sources import Source, open_source
from train.data import PooledMetrics, headline_metric

__all__ = ["Candidate", "Protocol", "Setting", "comma_floats", "comma_ints", "kfold_indices", "parse_grid",
           "select"]


class Candidate(Interface):
    """What ``select`` chooses among: anything hashable with a ``name`` (and the view ``size`` it is scored at)."""

    @property
    def name(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Setting:
    """A student's candidate: a fixed-length cosine schedule at this peak learning rate."""

    lr: float
    steps: int

    @property
    def name(self) -> str:
        return f"lr={self.lr:g},steps={self.steps}"


C = TypeVar("C", bound=Candidate)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a setting is chosen: ``folds``-fold CV over the labeled images, or the ``val_data`` split."""

    folds: int = 3
    val_data: str | None = None
    seed: int = 0

    def describe(self) -> str:
        if self.val_data:
            return f"candidates trained on all labeled images, scored on {self.val_data}"
        return (f"{self.folds}-fold cross-validation over the labeled images (predictions pooled), "
                "final model trained on all of them")


def parse_grid(lrs: Sequence[float], steps: Sequence[int]) -> list[Setting]:
    """Every (lr, steps) pair, in the order given: on equal scores the earlier one wins; 0 steps (keep the
    starting weights) is one candidate whatever the learning rate."""
    return list(dict.fromkeys(Setting(float(lrs[0] if n == 0 else lr), int(n)) for n in steps for lr in lrs))


def comma_floats(text: str) -> tuple[float, ...]:
    """``--lr 0.0005,0.003`` -> candidates (argparse ``type``)."""
    return tuple(float(v) for v in text.split(","))


def comma_ints(text: str) -> tuple[int, ...]:
    """``--steps 0,200`` -> candidates (argparse ``type``)."""
    return tuple(int(v) for v in text.split(","))


def kfold_indices(source: Source, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint index sets covering every labeled image once, each ~1/folds of every class
    (image/mask pairs have no image classes: ~1/folds of the images)."""
    labels = source.labels if source.labels is not None else np.zeros(len(source), dtype=np.int64)
    counts = np.unique(labels, return_counts=True)[1]
    if folds < 2 or counts.min() < folds:
        raise ValueError(f"{folds}-fold cross-validation needs folds >= 2 and at least {folds} labeled images per "
                         f"class; {source.spec!r} has {counts.min()} for some class (fewer --folds, or --val-data)")
    rng = np.random.default_rng([seed, 104_729])  # independent of the draw that picked the labeled images
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for cls in np.unique(labels):  # consecutive classes start at another fold: folds stay equal in size
        members = rng.permutation(np.flatnonzero(labels == cls))
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return [np.flatnonzero(assignment == k) for k in range(folds)]


def select(settings: Sequence[C], source: Source, train: Callable[[Sequence[C], Source], list[nn.Module]], *,
           size: int, protocol: Protocol) -> tuple[C, dict[str, Any], nn.Module | None]:
    """The best setting by the protocol's pooled score, the record a card stores, and (``val_data`` only) the
    model already trained on all labeled images with it; with one setting and no scoring asked, no training.
    ``train(settings, part)`` returns one model per setting, trained on ``part``: all of a part's candidates at
    once, so a trainer can render their shared views once (``train.optim.fit_together``). A candidate with a
    ``size`` attribute is scored at that view size, others at ``size``."""
    metric = headline_metric(source)
    if not protocol.val_data and not protocol.folds:
        if len(settings) > 1:
            raise ValueError(f"{len(settings)} candidate settings ({', '.join(s.name for s in settings)}) need a "
                             "way to choose: --folds K (cross-validation) or --val-data SPEC")
        return settings[0], {"protocol": "one fixed setting, nothing chosen", "folds": 0,
                             "chosen": settings[0].name}, None
    if protocol.val_data:
        val = open_source(protocol.val_data)
        models = dict(zip(settings, train(settings, source), strict=True))
        scores = {s: PooledMetrics.for_source(val).update(m, val, getattr(s, "size", size)).compute()
                  for s, m in models.items()}
        scored, images = len(val), None
    else:
        folds = kfold_indices(source, protocol.folds, protocol.seed)
        scores = _cross_validate(settings, source, folds, train, size)
        scored, images, models = len(source), [len(f) for f in folds], {}
    chosen = max(settings, key=lambda s: scores[s][metric])  # max keeps the first of equal scores
    record = {"protocol": protocol.describe(), "folds": 0 if protocol.val_data else protocol.folds,
              "val_data": protocol.val_data, "fold_sizes": images, "val_predictions": scored, "metric": metric,
              "scores": {s.name: round(v[metric], 4) for s, v in scores.items()}, "chosen": chosen.name,
              f"val_{metric}": round(scores[chosen][metric], 4)}
    return chosen, record, models.get(chosen)


def _cross_validate(settings: Sequence[C], source: Source, folds: list[np.ndarray],
                    train: Callable[[Sequence[C], Source], list[nn.Module]], size: int) -> dict[C, dict[str, float]]:
    """Train every setting on all folds but one, predict the held-out one, for every fold; each setting's metrics
    of its pooled predictions."""
    pooled = {s: PooledMetrics.for_source(source) for s in settings}
    for k, held_out in enumerate(folds):
        rest = np.setdiff1d(np.arange(len(source)), held_out)
        models = train(settings, source.subset(rest, f"{source.spec}#cv{k}-train"))
        scored = source.subset(held_out, f"{source.spec}#cv{k}")
        for setting, model in zip(settings, models, strict=True):
            pooled[setting].update(model, scored, getattr(setting, "size", size))
    return {s: metrics.compute() for s, metrics in pooled.items()}
