"""Finetune a student on labeled images, or train the labeled-only baseline from random init.

Every run follows ``train.protocol``: fixed-length AdamW + cosine schedules; with several ``--lr`` (and
``--steps``) candidates the setting is chosen by ``--folds``-fold cross-validation over the labeled images
(predictions pooled over folds) or on ``--val-data SPEC``, then the saved model trains on **all** labeled
images with it. ``--steps 0`` is a candidate too: a distilled student that finetuning only hurts is kept as it
is. ``student.json`` records the protocol, every candidate's pooled validation score and the choice; the test
split is never looked at. Early stopping is opt-in (``--val-fraction F --patience P [--cooldown N]``: a held-out
part scored every ``--eval-every`` steps, best checkpoint kept, ``train.optim.BestOnValidation``).

A student distilled from features (``num_classes`` 0, no classifier) gets a freshly initialised classifier for
the labeled classes. On a segmentation source (image/mask pairs) the student is a segmentation student trained
with per-pixel cross-entropy and chosen by mIoU (``--shots N`` draws N images in all).

Example:
    python -m train.finetune --init runs/student --data fashion-mnist:train --shots 10 \\
        --lr 0.0005,0.003 --steps 0,200 --out runs/student_ft
    python -m train.finetune --student mobilenetv3_small_050 --data fashion-mnist:train --shots 10 \\
        --lr 0.001,0.003 --steps 500 --folds 3 --out runs/baseline
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from reinforce.memory import keep_freed_memory
from stores.cli_errors import HelpFormatter, cli_errors, config_flags, debug_flag
from train.data import LabeledViews, SegmentationViews, open_labeled
from train.models import Student, StudentCard, create_student, load_student, save_student
from train.optim import BestOnValidation, TrainSchedule, fit, fit_together, split_labeled
from train.protocol import Protocol, Setting, comma_floats, comma_ints, parse_grid, select

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
    size: int | None = None  # default: the student's input size (its pretrained config's for a timm name)
    steps: tuple[int, ...] = (300,)  # fixed schedule lengths to choose among (0: keep the starting weights)
    batch_size: int = 32
    lr: tuple[float, ...] = (1e-3,)  # peak learning rates to choose among
    weight_decay: float = 0.05
    folds: int = 3  # k-fold CV over the labeled images picks the setting (0: one setting, no scoring)
    val_data: str | None = None  # a separate labeled validation split instead of CV
    val_fraction: float = 0.0  # > 0: early stopping on a held-out part instead (one setting)
    eval_every: int = 50  # early stopping: validation every N steps (and at the last step)
    patience: int = 0  # early stopping: a plateau after this many evaluations below the best
    cooldown: int = 0  # early stopping: a plateau starts an N-step linear decay instead of stopping
    workers: int = 0  # loader processes rendering augmented views while the model trains (same batches for any)


def finetune(config: FinetuneConfig) -> StudentCard:
    """Choose a setting by the protocol, train on all labeled views, save to ``config.out``; returns the card."""
    if (config.init is None) == (config.student is None):
        raise ValueError("give exactly one of --init STUDENT_DIR or --student NAME")
    source, class_names = open_labeled(config.data, config.shots, config.seed)
    segmentation = source.mask_loader is not None  # image/mask pairs: per-pixel CE, chosen by mIoU
    start, card = _initial_student(config, class_names, "segmentation" if segmentation else "classification")
    size = config.size or card.input_size
    settings = parse_grid(config.lr, config.steps)
    started = time.perf_counter()
    if config.val_fraction:
        model, stage = _early_stopped(config, start, source, size, settings)
    else:
        protocol = Protocol(config.folds, config.val_data, config.seed)
        chosen, record, model = select(settings, source,
                                       lambda candidates, part: _train(start, candidates, part, config, size),
                                       size=size, protocol=protocol)
        losses = []
        if model is None:  # cross-validated: the final model trains on all labeled images
            model = copy.deepcopy(start)
            losses = fit(model, _views(source, size, config.seed), _schedule(chosen, config),
                         workers=config.workers) if chosen.steps else []
        stage = {**dataclasses.asdict(_schedule(chosen, config)), **record, "train_images": len(source),
                 "steps_run": chosen.steps, "final_loss": _final_loss(losses)}
    stage = {"stage": "finetune" if config.init else "labeled_only", "data": source.spec, "size": size, **stage,
             "train_seconds": round(time.perf_counter() - started, 1)}
    card = dataclasses.replace(card, input_size=size).with_stage(**stage)
    save_student(model, card, config.out)
    return card


def _schedule(setting: Setting, config: FinetuneConfig, cooldown: int = 0) -> TrainSchedule:
    return TrainSchedule(setting.steps, setting.lr, config.batch_size, config.weight_decay, seed=config.seed,
                         cooldown=cooldown)


def _views(source, size: int, seed: int):
    return (SegmentationViews if source.mask_loader is not None else LabeledViews)(source, size, train=True,
                                                                                    seed=seed)


def _train(start: Student, settings: list[Setting], part, config: FinetuneConfig, size: int) -> list[Student]:
    """A copy of the starting student per setting, trained on ``part`` with its fixed cosine schedule; all of
    them on one stream of views (``fit_together``: the same weights as one at a time, the views rendered once)."""
    models = [copy.deepcopy(start) for _ in settings]
    runs = [(model, _schedule(setting, config)) for model, setting in zip(models, settings) if setting.steps]
    if runs:
        fit_together(runs, _views(part, size, config.seed), workers=config.workers)
    return [model.eval() for model in models]


def _final_loss(losses: list[float]) -> float | None:
    """Mean training loss of the last 10 steps (None: no training)."""
    return round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None


def _early_stopped(config: FinetuneConfig, model: Student, source, size: int,
                   settings: list[Setting]) -> tuple[Student, dict]:
    """Opt-in early stopping: train on the rest of a held-out part, keep the best-validation checkpoint."""
    if len(settings) > 1:
        raise ValueError("--val-fraction (early stopping) trains one setting: give one --lr and one --steps, "
                         "or choose among several with --folds / --val-data")
    setting = settings[0]
    train_part, val_part = split_labeled(source, config.val_fraction, config.seed)
    cooldown = -(-config.cooldown // config.eval_every) * config.eval_every  # ends on a validation step
    keeper = BestOnValidation(model, val_part, size, every=config.eval_every, steps=setting.steps,
                              patience=config.patience)
    keeper(0)  # the starting point competes too: finetuning that only hurts on val is not kept
    losses = fit(model, _views(train_part, size, config.seed), _schedule(setting, config, cooldown), on_step=keeper,
                 workers=config.workers)
    keeper.restore()
    return model, {**dataclasses.asdict(_schedule(setting, config, cooldown)), **keeper.record(),
                   "protocol": f"early stopping on a {config.val_fraction:g} held-out part", "train_images":
                   len(train_part), "val_fraction": config.val_fraction,
                   "final_loss": _final_loss(losses)}


def _initial_student(config: FinetuneConfig, class_names: tuple[str, ...],
                     task: str) -> tuple[Student, StudentCard]:
    """The student to start from: ``--init`` (given a classifier if it has none) or a seeded random ``--student``."""
    if config.init is None:
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


def build_parser() -> argparse.ArgumentParser:
    """``train.finetune``'s command line (``train.pipeline`` checks a recipe's section with it)."""
    parser = argparse.ArgumentParser(prog="train.finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="student directory to start from")
    start.add_argument("--student", help="timm architecture for a labeled-only baseline (random init)")
    parser.add_argument("--data", required=True, help="labeled source spec")
    parser.add_argument("--out", required=True, help="output student directory")
    defaults = FinetuneConfig("", "")
    parser.add_argument("--shots", type=int, default=defaults.shots,
                        help="labeled images per class; segmentation: images in all (0: all)")
    parser.add_argument("--size", type=int, default=None,
                        help="view size (default: the --init student's; a --student architecture's pretrained one)")
    parser.add_argument("--lr", type=comma_floats, default=defaults.lr, help="peak learning rate(s) to choose among")
    parser.add_argument("--steps", type=comma_ints, default=defaults.steps,
                        help="fixed schedule length(s) to choose among (0: keep the starting weights)")
    parser.add_argument("--folds", type=int, default=defaults.folds,
                        help="k-fold cross-validation over the labeled images chooses lr/steps (0: one setting)")
    parser.add_argument("--val-data", default=None, help="a separate labeled validation split chooses instead")
    config_flags(parser, defaults, "seed", "batch_size", "weight_decay", "val_fraction", "eval_every", "patience",
                 "cooldown", "workers")
    return debug_flag(parser)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    with cli_errors(parser.prog, args.pop("debug")):
        card = finetune(FinetuneConfig(**args))
    last = card.history[-1]
    metric = "miou" if card.task == "segmentation" else "top1"
    score = last.get(f"val_{metric}")
    scored = "" if score is None else f", val {metric} {score:.2%} ({last.get('chosen') or last.get('best_step')})"
    print(f"train.finetune: wrote {args['out']} ({card.arch}, {last['stage']}, {last['steps_run']} steps{scored})")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
