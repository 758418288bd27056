"""Finetune a student on labeled images, or train the labeled-only baseline from random init.

With ``--val-fraction F`` a seeded, stratified part of the labeled images is held out
(``train.optim.split_labeled``): training sees only the rest, top-1 on the held-out part is
measured before the first step and every ``--eval-every`` steps, the best-val weights are the ones
saved (the starting weights too, when finetuning only hurts), and ``--patience`` evaluations
below the best mark a plateau (a tie counts as progress but keeps the earlier checkpoint): it stops
the run, or with ``--cooldown N`` (constant learning rate until then) starts an N-step linear decay
to zero, so a run that stops early still ends annealed (``train.optim``). ``student.json`` records
the val top-1, the best step, the steps run and the whole validation curve, so a learning rate or step count can be
chosen without ever looking at the test split. A student distilled from features (``num_classes``
0, no classifier) gets a freshly initialised classifier for the labeled classes. On a segmentation source
(image/mask pairs) the student is a segmentation student trained with per-pixel cross-entropy (one θ
renders view and mask; ``--shots N`` draws N images in all, ``--val-fraction`` holds out images and the best
validation mIoU is kept).

Example:
    python -m train.finetune --init runs/student --data fashion-mnist:train --shots 10 --out runs/student_ft
    python -m train.finetune --student mobilenetv3_small_050 --size 32 --data fashion-mnist:train \\
        --shots 10 --steps 3000 --val-fraction 0.2 --eval-every 100 --patience 5 --cooldown 500 --out runs/baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from stores.cli import cli_errors, debug_flag
from train.data import LabeledViews, SegmentationViews, open_labeled
from train.models import Student, StudentCard, create_student, load_student, save_student
from train.optim import BestOnValidation, TrainSchedule, fit, split_labeled

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
    steps: int = 300  # the maximum: early stopping (patience) may end sooner
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    val_fraction: float = 0.0  # labeled images held out per class for validation (0: none)
    eval_every: int = 50  # validation top-1 (segmentation: mIoU) every N steps (and at the last step)
    patience: int = 0  # plateau after this many evaluations below the best (0: run every step)
    cooldown: int = 0  # 0: cosine over --steps, a plateau stops; N: constant lr, a plateau starts an N-step decay
    workers: int = 1  # loader processes rendering augmented views while the model trains (same batches for any)


def finetune(config: FinetuneConfig) -> StudentCard:
    """Train with cross-entropy on the labeled views, save to ``config.out``; returns the card."""
    if (config.init is None) == (config.student is None):
        raise ValueError("give exactly one of --init STUDENT_DIR or --student NAME")
    source, class_names = open_labeled(config.data, config.shots, config.seed)
    segmentation = source.mask_loader is not None  # image/mask pairs: per-pixel CE, validation by mIoU
    train_part, val_part = split_labeled(source, config.val_fraction, config.seed)
    model, card = _initial_student(config, class_names, "segmentation" if segmentation else "classification")
    size = config.size or card.input_size
    cooldown = -(-config.cooldown // config.eval_every) * config.eval_every  # ends on a validation step
    schedule = TrainSchedule(config.steps, config.lr, config.batch_size, config.weight_decay, seed=config.seed,
                             cooldown=cooldown)
    keeper = None if val_part is None else BestOnValidation(model, val_part, size, every=config.eval_every,
                                                            steps=config.steps, patience=config.patience)
    started = time.perf_counter()
    if keeper is not None:
        keeper(0)  # the starting point competes too: finetuning that only hurts on val is not kept
    views = (SegmentationViews if segmentation else LabeledViews)(train_part, size, train=True, seed=config.seed)
    losses = fit(model, views, schedule, on_step=keeper, workers=config.workers)
    validation = {"steps_run": len(losses)}
    if keeper is not None:
        keeper.restore()
        validation = keeper.record()
    stage = {"stage": "finetune" if config.init else "labeled_only", "data": source.spec, "size": size,
             **dataclasses.asdict(schedule), "train_images": len(train_part), "val_fraction": config.val_fraction,
             **validation, "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
             "train_seconds": round(time.perf_counter() - started, 1)}
    card = dataclasses.replace(card, input_size=size).with_stage(**stage)
    save_student(model, card, config.out)
    return card


def _initial_student(config: FinetuneConfig, class_names: tuple[str, ...],
                     task: str) -> tuple[Student, StudentCard]:
    """The student to start from: ``--init`` (given a classifier if it has none) or a seeded random ``--student``."""
    if config.init is None:
        if config.size is None:
            raise ValueError("--student NAME trains from random init and needs --size")
        torch.manual_seed(config.seed)  # same random init on a rerun
        return create_student(config.student, class_names=class_names, input_size=config.size, task=task)
    model, card = load_student(config.init)
    if card.task != task:
        raise ValueError(f"--init {config.init!r} is a {card.task} student; {config.data!r} is {task} data")
    if card.num_classes == 0:  # distilled from features: a new classifier for the labeled classes
        torch.manual_seed(config.seed)
        model.net.reset_classifier(len(class_names))
        card = dataclasses.replace(card, num_classes=len(class_names), class_names=tuple(class_names))
    if card.num_classes != len(class_names):
        raise ValueError(f"the student has {card.num_classes} classes but {config.data!r} has {len(class_names)}")
    return model, card


def main(argv: list[str] | None = None) -> StudentCard:
    parser = argparse.ArgumentParser(prog="train.finetune", description=__doc__.split("\n\n")[0])
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="student directory to start from")
    start.add_argument("--student", help="timm architecture for a labeled-only baseline (random init)")
    parser.add_argument("--data", required=True, help="labeled source spec")
    parser.add_argument("--out", required=True, help="output student directory")
    defaults = FinetuneConfig("", "")
    parser.add_argument("--shots", type=int, default=defaults.shots,
                        help="labeled images per class; segmentation: images in all (0: all)")
    parser.add_argument("--size", type=int, default=None, help="view size (default: the student's)")
    for flag in ("seed", "steps", "batch_size", "lr", "weight_decay", "val_fraction", "eval_every", "patience",
                 "cooldown", "workers"):
        default = getattr(defaults, flag)
        parser.add_argument(f"--{flag.replace('_', '-')}", type=type(default), default=default)
    args = vars(debug_flag(parser).parse_args(argv))
    with cli_errors(parser.prog, args.pop("debug")):
        card = finetune(FinetuneConfig(**args))
    last = card.history[-1]
    metric = "miou" if card.task == "segmentation" else "top1"
    score = last.get(f"val_{metric}")
    scored = "" if score is None else f", val {metric} {score:.2%} at step {last['best_step']}"
    print(f"train.finetune: wrote {args['out']} ({card.arch}, {last['stage']}, {last['steps_run']} steps{scored})")
    return card


if __name__ == "__main__":
    main()
