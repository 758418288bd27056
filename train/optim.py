"""One supervised training loop (AdamW + warmup-cosine) for teacher probes, finetunes and baselines.

Example:
    >>> fit(model, LabeledViews(source, 64, train=True), TrainSchedule(steps=300, lr=1e-3), freeze_bn=True)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

__all__ = ["TrainSchedule", "cosine_optimizer", "fit", "set_train_mode"]


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
    """Optimisation hyper-parameters, stored as is in cards (``dataclasses.asdict``)."""

    steps: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0


def cosine_optimizer(params, schedule: TrainSchedule) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW with linear warmup then cosine decay to zero over ``schedule.steps``."""
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    warmup = max(1, round(schedule.warmup_fraction * schedule.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, schedule.steps - warmup)))

    return optimizer, LambdaLR(optimizer, factor)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """``train()``, but BatchNorm keeps its pretrained statistics when ``freeze_bn`` (few-shot finetuning)."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches; each epoch reseeds the order and (``set_epoch``) the augmentation."""
    batch_size = min(batch_size, len(dataset))
    for epoch in itertools.count():
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = torch.Generator().manual_seed(seed * 100_003 + epoch)
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=order, drop_last=True)


def fit(model: nn.Module, dataset: Dataset, schedule: TrainSchedule, *, freeze_bn: bool = False,
        params=None) -> list[float]:
    """Cross-entropy training for ``schedule.steps`` steps; returns the per-step losses."""
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer, scheduler = cosine_optimizer(trainable, schedule)
    set_train_mode(model, freeze_bn)
    losses = []
    for inputs, labels in itertools.islice(_batches(dataset, schedule.batch_size, schedule.seed), schedule.steps):
        if inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
