"""One supervised training loop (AdamW + warmup-cosine) for teacher probes, finetunes and baselines,
and the validation split that tunes them honestly.

Hyper-parameters (learning rate, steps) are chosen on a validation part carved from the labeled
images (``split_labeled``), never on the test split: ``BestOnValidation`` evaluates top-1 on it
every few steps during ``fit`` and keeps the best weights.

Why a cooldown schedule: with a cosine schedule fixed to the maximum steps, stopping early at a
validation plateau keeps weights trained at a high learning rate, never annealed, which makes an
early-stopped baseline look worse than it is. With ``cooldown`` > 0 the learning rate stays
constant after warmup and a plateau (``on_step`` returning True) starts a linear decay to zero
over ``cooldown`` steps instead of stopping: every run ends annealed, as long as it keeps improving.

Example:
    >>> train_part, val_part = split_labeled(source, fraction=0.2, seed=0)
    >>> keeper = BestOnValidation(model, val_part, size=32, every=50, steps=300)
    >>> fit(model, LabeledViews(train_part, 32, train=True), TrainSchedule(steps=300, lr=1e-3), on_step=keeper)
    >>> keeper.restore()                                  # best-val weights; keeper.record() for the card
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from reinforce.progress import progress_bar
from reinforce.sources import Source
from train.data import evaluate_model, headline_metric

__all__ = ["BestOnValidation", "LearningRate", "TrainSchedule", "fit", "fit_together", "make_optimizer",
           "set_train_mode", "split_labeled"]


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
    """Optimisation hyper-parameters, stored as is in cards (``dataclasses.asdict``)."""

    steps: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0
    cooldown: int = 0  # 0: cosine to zero over ``steps``; > 0: constant, then linear decay over the last N steps


class LearningRate:
    """Warmup, then cosine decay over ``steps``, or (``cooldown``) constant until ``end`` - cooldown and
    linear to zero at ``end``; ``plateau(step)`` moves ``end`` forward to ``step + cooldown``."""

    def __init__(self, schedule: TrainSchedule):
        self.steps, self.cooldown = schedule.steps, min(schedule.cooldown, schedule.steps)
        self.warmup = max(1, round(schedule.warmup_fraction * schedule.steps))
        self.end = schedule.steps

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.cooldown:
            return min(1.0, max(0.0, (self.end - step) / self.cooldown))
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.steps - self.warmup)))

    def plateau(self, step: int) -> bool:
        """Start the cooldown now, or keep the one already running (True); without a cooldown, False: stop."""
        if not self.cooldown:
            return False
        self.end = min(self.end, step + self.cooldown)
        return True


def make_optimizer(params, schedule: TrainSchedule) -> tuple[torch.optim.Optimizer, LambdaLR, LearningRate]:
    """AdamW with the schedule's ``LearningRate`` (warmup, then cosine or cooldown decay to zero), ``fused``: one
    kernel over every parameter (CPU and CUDA), not a Python loop or a chain of multi-tensor ops; for a small
    student at 32 px that is 4.4 -> 1.8 ms of a ~40 ms step."""
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay, fused=True)
    rate = LearningRate(schedule)
    return optimizer, LambdaLR(optimizer, rate), rate


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """``train()``, but BatchNorm keeps its pretrained statistics when ``freeze_bn`` (few-shot finetuning)."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class _EpochItems(Dataset):
    """Item ``epoch * n + i`` is item i of ``dataset`` at ``epoch`` (``set_epoch``): the augmentation epoch
    travels with the index, so loader workers render exactly the views one process would."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.size = dataset, len(dataset)

    def __getitem__(self, item: int):
        epoch, index = divmod(item, self.size)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class _EpochBatches:
    """Endless batch sampler: each epoch a fresh seeded permutation cut into whole batches (drop_last)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed

    def __iter__(self) -> Iterator[list[int]]:
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # as a shuffling DataLoader draws first
            order = torch.randperm(self.size, generator=generator)
            for start in range(0, self.size - self.batch_size + 1, self.batch_size):
                yield (epoch * self.size + order[start: start + self.batch_size]).tolist()


def _batches(dataset: Dataset, batch_size: int, seed: int, workers: int = 0) -> DataLoader:
    """Endless shuffled batches; each epoch reseeds the order and (``set_epoch``) the augmentation.

    ``workers`` > 0 renders the views in background processes while the model trains (same batches).
    """
    return DataLoader(_EpochItems(dataset), batch_sampler=_EpochBatches(len(dataset), batch_size, seed),
                      num_workers=workers)


def fit(model: nn.Module, dataset: Dataset, schedule: TrainSchedule, *, freeze_bn: bool = False,
        on_step: Callable[[int], bool] | None = None, workers: int = 0, desc: str = "train") -> list[float]:
    """Cross-entropy training for at most ``schedule.steps`` steps; returns the per-step losses.

    ``on_step(step)`` runs after every optimizer step (1-based) and returns True at a plateau: that
    starts the cooldown (``schedule.cooldown`` > 0) or stops training (early stopping); the model is
    put back in training mode after it. ``workers`` loader processes augment the next batches
    meanwhile; the batches are the same for any number. Progress (``desc``) goes to stderr: a ViT
    finetune on a small CPU runs for minutes.
    """
    return fit_together([(model, schedule)], dataset, freeze_bn=freeze_bn, on_step=on_step, workers=workers,
                        desc=desc)[0]


@dataclasses.dataclass
class _Run:
    """One model's optimisation inside ``fit_together``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    rate: LearningRate
    losses: list[float] = dataclasses.field(default_factory=list)
    stopped: bool = False

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(self.model(inputs), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.losses.append(float(loss.detach()))

    def done(self) -> bool:
        return self.stopped or len(self.losses) >= self.rate.end


def fit_together(runs: Sequence[tuple[nn.Module, TrainSchedule]], dataset: Dataset, *, freeze_bn: bool = False,
                 on_step: Callable[[int], bool] | None = None, workers: int = 0,
                 desc: str = "train") -> list[list[float]]:
    """``fit`` for several (model, schedule) runs on one stream of batches; returns each run's losses.

    Why: the candidates of a selection differ only in learning rate and length, and with the same seed and
    batch size they train on the same views in the same order anyway; rendering those views once, not once per
    candidate, saves the loader's share of every step after the first candidate's (each model's weights are
    exactly what training it alone gives). A run stops at its own length; ``on_step`` needs a single run.
    """
    first = runs[0][1]
    if any((schedule.seed, schedule.batch_size) != (first.seed, first.batch_size) for _, schedule in runs):
        raise ValueError("runs trained together share one batch stream: give them the same seed and batch size")
    if on_step is not None and len(runs) > 1:
        raise ValueError("on_step (early stopping) watches one model: train the runs one at a time")
    states = [_Run(model, *make_optimizer([p for p in model.parameters() if p.requires_grad], schedule))
              for model, schedule in runs]
    for state in states:
        set_train_mode(state.model, freeze_bn)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - workers))  # the workers' cores: no oversubscription on small CPUs
    longest = max(schedule.steps for _, schedule in runs)
    bar = progress_bar(total=longest, desc=desc, unit="step")
    try:
        batches = _batches(dataset, first.batch_size, first.seed, workers)
        for inputs, labels in itertools.islice(batches, longest):
            if inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            for state in (s for s in states if not s.done()):
                state.step(inputs, labels)
                if on_step is not None:
                    steps = len(state.losses)
                    state.stopped = on_step(steps) and not state.rate.plateau(steps)
                    set_train_mode(state.model, freeze_bn)
            bar.update()
            if all(state.done() for state in states):
                break
    finally:
        bar.close()
        torch.set_num_threads(threads)
    for state in states:
        state.model.eval()
    return [state.losses for state in states]


def split_labeled(source: Source, fraction: float, seed: int = 0) -> tuple[Source, Source | None]:
    """Seeded stratified (train, val) split of the labeled images; ``(source, None)`` when ``fraction`` is 0.

    Each class puts ``round(fraction * n)`` images, at least 1, in val and keeps at least 1 for
    training, so every class is both learned and scored (image/mask pairs, without image classes: the
    same over all images). The same (labels, fraction, seed) always
    gives the same split, so a teacher and the students tuned against it never see each other's val.
    """
    if not fraction:
        return source, None
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 7919])  # independent of the few-shot draw that picked the images
    tag = f"{fraction:g}"
    if source.labels is None:  # image/mask pairs: no image classes to stratify by
        if len(source) < 2:
            raise ValueError(f"a validation split needs at least 2 labeled images; {source.spec!r} has {len(source)}")
        val = np.sort(rng.permutation(len(source))[: min(len(source) - 1, max(1, round(fraction * len(source))))])
        train = np.setdiff1d(np.arange(len(source)), val)
        return source.subset(train, f"{source.spec}#train{tag}"), source.subset(val, f"{source.spec}#val{tag}")
    labels = source.labels
    counts = np.unique(labels, return_counts=True)[1]
    if counts.min() < 2:
        raise ValueError(f"a validation split needs at least 2 labeled images per class; {source.spec!r} has "
                         f"{counts.min()} for some class (use more shots or --val-fraction 0)")
    val = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        val.append(members[: min(len(members) - 1, max(1, round(fraction * len(members))))])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return source.subset(train, f"{source.spec}#train{tag}"), source.subset(val, f"{source.spec}#val{tag}")


class BestOnValidation:
    """``fit`` callback: top-1 (mIoU on image/mask pairs: ``headline_metric``) on the val part every ``every``
    steps (and at the last); keeps the best weights.

    ``patience`` > 0 marks a plateau after that many evaluations below the best (``fit`` then stops or
    cools down). A tie counts as progress (with a few val images ties are common and mean "not worse
    yet") but keeps the earlier checkpoint: of equally good weights, the ones trained less on few labels.
    """

    def __init__(self, model: nn.Module, val: Source, size: int, *, every: int, steps: int, patience: int = 0):
        self.model, self.val, self.size, self.metric = model, val, size, headline_metric(val)
        self.every, self.steps, self.patience = max(1, every), steps, patience
        self.curve: list[tuple[int, float]] = []
        self.best, self.best_step, self.state, self.stale = -1.0, 0, None, 0

    def __call__(self, step: int) -> bool:
        if step % self.every and step != self.steps:
            return False
        score = evaluate_model(self.model, self.val, self.size)[self.metric]
        self.curve.append((step, round(score, 4)))
        if score > self.best:
            self.best, self.best_step, self.stale = score, step, 0
            self.state = copy.deepcopy(self.model.state_dict())
        elif score == self.best:
            self.stale = 0
        else:
            self.stale += 1
        return self.patience > 0 and self.stale >= self.patience

    def restore(self) -> None:
        """Load the best-val weights back into the model (no-op before the first evaluation)."""
        if self.state is not None:
            self.model.load_state_dict(self.state)

    def record(self) -> dict[str, Any]:
        """What a card stores: best val top-1 (``val_miou`` for segmentation), its step, steps run and the curve."""
        return {f"val_{self.metric}": round(self.best, 4) if self.curve else None, "best_step": self.best_step,
                "steps_run": self.curve[-1][0] if self.curve else 0, "val_curve": self.curve,
                "val_images": len(self.val), "eval_every": self.every, "patience": self.patience}
