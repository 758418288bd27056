"""Finetune a student on labeled images, or train the labeled-only baseline from random init.

Example:
    python -m train.finetune --init runs/student --data fashion-mnist:train --shots 10 --out runs/student_ft
    python -m train.finetune --student mobilenetv3_small_050 --size 32 --data fashion-mnist:train \\
        --shots 10 --steps 3000 --out runs/baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from train.data import LabeledViews, cli_errors, open_labeled
from train.models import StudentCard, create_student, load_student, save_student
from train.optim import TrainSchedule, fit

__all__ = ["FinetuneConfig", "finetune", "main"]


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """``init`` (a student directory) or ``student`` (a timm name, random init) plus the data."""

    data: str
    out: str
    init: str | None = None
    student: str | None = None
    shots: int | None = 10
    seed: int = 0
    size: int | None = None  # default: the student's input size; required with ``student``
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05


def finetune(config: FinetuneConfig) -> StudentCard:
    """Train with cross-entropy on the labeled views, save to ``config.out``; returns the card."""
    if (config.init is None) == (config.student is None):
        raise ValueError("give exactly one of --init STUDENT_DIR or --student NAME")
    source, class_names = open_labeled(config.data, config.shots, config.seed)
    spec = source.spec
    if config.init is not None:
        model, card = load_student(config.init)
    elif config.size is None:
        raise ValueError("--student NAME trains from random init and needs --size")
    else:
        torch.manual_seed(config.seed)  # same random init on a rerun
        model, card = create_student(config.student, class_names=class_names, input_size=config.size)
    if card.num_classes != len(class_names):
        raise ValueError(f"the student has {card.num_classes} classes but {spec!r} has {len(class_names)}")
    size = config.size or card.input_size
    schedule = TrainSchedule(config.steps, config.lr, config.batch_size, config.weight_decay, seed=config.seed)
    started = time.perf_counter()
    losses = fit(model, LabeledViews(source, size, train=True, seed=config.seed), schedule)
    stage = {"stage": "finetune" if config.init else "labeled_only", "data": spec, "size": size,
             **dataclasses.asdict(schedule), "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
             "train_seconds": round(time.perf_counter() - started, 1)}
    card = dataclasses.replace(card, input_size=size).with_stage(**stage)
    save_student(model, card, config.out)
    return card


def main(argv: list[str] | None = None) -> StudentCard:
    parser = argparse.ArgumentParser(prog="train.finetune", description=__doc__.split("\n\n")[0])
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="student directory to start from")
    start.add_argument("--student", help="timm architecture for a labeled-only baseline (random init)")
    parser.add_argument("--data", required=True, help="labeled source spec")
    parser.add_argument("--out", required=True, help="output student directory")
    defaults = FinetuneConfig("", "")
    parser.add_argument("--shots", type=int, default=defaults.shots, help="labeled images per class (0: all)")
    parser.add_argument("--size", type=int, default=None, help="view size (default: the student's)")
    for flag in ("seed", "steps", "batch_size", "lr", "weight_decay"):
        default = getattr(defaults, flag)
        parser.add_argument(f"--{flag.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    with cli_errors(parser.prog):
        card = finetune(FinetuneConfig(**args))
    print(f"train.finetune: wrote {args['out']} ({card.arch}, {card.history[-1]['stage']})")
    return card


if __name__ == "__main__":
    main()
