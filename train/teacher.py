"""Adapt a pretrained backbone to a labeled few-shot task and write it to the teacher zoo.

``lp`` trains a linear head on frozen features (precomputed once); ``ft`` finetunes everything
with BatchNorm statistics frozen (few-shot batches would wreck them); ``auto`` picks the mode
with the better k-fold cross-validated accuracy on the labeled images alone, then retrains it
on all of them. ``frozen`` saves the pretrained backbone unadapted and headless (``num_classes``
0, no labels needed): the task-agnostic teacher whose features are distilled as they are.

``--val-fraction F`` holds out the same seeded validation part of the labeled images as
``train.finetune --val-fraction F`` does: the teacher is trained (and cross-validated) on the
rest only and scored on it, so students tuned on that part stay honestly tuned. The test split is
never looked at.

Views are taught at the backbone's pretrained input size unless ``--size`` says otherwise (a ViT
with 14-px patches at 64 px sees a 5x5 grid); several sizes (``--size 64,128``) make them
candidates that ``--mode auto`` chooses among by cross-validation, as it chooses between lp and ft.
``--baseline-student ARCH`` also trains that student from the labels alone on the same training
part and scores it on the same validation part: distillation cannot give a student more than its
teacher knows, so ``reinforce.build`` warns when the teacher is not ahead of that baseline.

Example:
    python -m train.teacher --backbone tf_efficientnet_lite0 --weights embedded \\
        --data fashion-mnist:train --shots 10 --mode auto --name lite0_fmnist
    python -m train.teacher --backbone tf_efficientnet_lite0 --weights embedded --mode frozen --name lite0_frozen
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from reinforce.dense import DENSE_LIBRARY, SegmentationTeacher
from reinforce.progress import progress_bar
from reinforce.sources import Source
from reinforce.teachers import (
    TeacherCard,
    TeacherModel,
    create_backbone,
    embedded_weights,
    load_backbone_weights,
    load_hub_weights,
    native_size,
    save_teacher,
    teacher_zoo,
)
from stores.cli import cli_errors, debug_flag
from train.data import LabeledViews, SegmentationViews, evaluate_model, labeled_classes, open_labeled
from train.optim import TrainSchedule, fit, split_labeled

__all__ = ["TeacherConfig", "adapt_teacher", "main"]

MODES = ("auto", "lp", "ft", "frozen")
EMBEDDED = {"tf_efficientnet_lite0": "tf_efficientnet_lite0.in1k"}


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Everything ``adapt_teacher`` needs; the CLI maps its flags one to one."""

    backbone: str
    name: str
    data: str | None = None  # labeled source spec; not needed for ``frozen``
    library: str = "timm"
    weights: str = "embedded"  # a local checkpoint (reinforce.teachers.CHECKPOINT_LAYOUTS) or "embedded"
    pretrained: str | None = None  # instead of weights: the hub's ("default" or a pretrained tag; needs the network)
    shots: int | None = 10
    seed: int = 0
    mode: str = "auto"
    size: int | tuple[int, ...] | None = None  # None: the backbone's pretrained size; several: auto chooses
    steps: int = 300  # ft
    lr: float = 3e-4  # ft
    batch_size: int = 32
    lp_steps: int = 300
    lp_lr: float = 3e-3
    lp_views: int = 4  # augmented views per image added to the clean one for the probe
    folds: int = 5
    val_fraction: float = 0.0  # labeled images held out per class, never trained on (train.optim.split_labeled)
    out_dir: str | None = None  # None: reinforce.teachers.teacher_zoo(), where lookups look first
    baseline_student: str | None = None  # labels-only student scored on the same validation part
    baseline_size: int = 32
    baseline_steps: int = 600
    baseline_lr: float = 3e-3
    task: str = "classification"  # segmentation: stride-8 backbone + DeepLab head on image/mask pairs (lp | ft)


def adapt_teacher(config: TeacherConfig) -> TeacherCard:
    """Train the teacher the config describes and save it as ``OUT_DIR/NAME``; returns its card."""
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.mode == "auto" and config.folds < 2:
        raise ValueError("--mode auto selects by cross-validation and needs --folds >= 2")
    if config.mode == "frozen":
        return _save_frozen(config)
    if config.task == "segmentation":
        return _adapt_segmentation(config)
    if not config.data:
        raise ValueError(f"--mode {config.mode} teaches a task and needs --data (only --mode frozen does not)")
    if config.baseline_student and not config.val_fraction:
        raise ValueError("--baseline-student is scored on the validation part: set --val-fraction > 0")
    source, class_names = open_labeled(config.data, config.shots, config.seed)
    train_part, val_part = split_labeled(source, config.val_fraction, config.seed)
    backbone, stats, weights = _pretrained_backbone(config)
    sizes = _sizes(config.size, backbone)
    if len(sizes) > 1 and config.mode != "auto":
        raise ValueError(f"--size {','.join(map(str, sizes))} gives candidates for --mode auto to choose among; "
                         f"--mode {config.mode} takes one size")
    modes = ("lp", "ft") if config.mode == "auto" else (config.mode,)
    cv = {f"{m}@{s}": _cross_validate(m, dataclasses.replace(config, size=s), backbone, stats, train_part)
          for m in modes for s in sizes} if config.folds > 1 else {}
    chosen = max(cv, key=cv.get) if config.mode == "auto" else f"{config.mode}@{sizes[0]}"
    mode, size = chosen.split("@")
    config = dataclasses.replace(config, size=int(size))
    started = time.perf_counter()
    model = _train(mode, config, backbone, stats, train_part, f"{mode}@{config.size} on all {len(train_part)} images")
    seconds = round(time.perf_counter() - started, 1)
    val_top1 = None if val_part is None else evaluate_model(model, val_part, config.size)["top1"]
    adaptation = {
        "mode": mode, "data": source.spec, "shots": config.shots, "seed": config.seed,
        "weights": weights,
        "steps": config.steps if mode == "ft" else config.lp_steps, "lr": config.lr if mode == "ft" else config.lp_lr,
        "batch_size": config.batch_size, "lp_views": config.lp_views, "cv_accuracy": cv, "folds": config.folds,
        "val_fraction": config.val_fraction, "train_images": len(train_part), "val_top1": val_top1,
        "train_seconds": seconds, "size": config.size,
    }
    if config.baseline_student:
        adaptation["labels_only"] = _labels_only_baseline(config)
    card = TeacherCard(name=config.name, library=config.library, backbone=config.backbone,
                       num_classes=len(class_names), class_names=class_names, input_size=config.size,
                       mean=stats[0], std=stats[1], adaptation=adaptation,
                       val_accuracy=val_top1 if val_top1 is not None else cv.get(chosen))
    return save_teacher(model, card, _out_dir(config) / config.name, _weights_file(config))


def _out_dir(config: TeacherConfig) -> Path:
    return Path(config.out_dir) if config.out_dir else teacher_zoo()


def _sizes(size: int | tuple[int, ...] | None, backbone: nn.Module) -> tuple[int, ...]:
    """Candidate view sizes: the given ones, or the backbone's pretrained size."""
    sizes = (size,) if isinstance(size, int) else tuple(size or (native_size(backbone),))
    if min(sizes) < 8:
        raise ValueError(f"--size {sizes}: views must be at least 8 px")
    return sizes


def _labels_only_baseline(config: TeacherConfig) -> dict[str, object]:
    """The student trained on the labels alone (same train part), its best top-1 on the same val part."""
    from train.finetune import FinetuneConfig, finetune  # the labeled-only recipe, not a copy of it

    out = _out_dir(config) / config.name / "labels_only"
    card = finetune(FinetuneConfig(data=config.data, out=str(out), student=config.baseline_student,
                                   shots=config.shots, seed=config.seed, size=config.baseline_size,
                                   steps=config.baseline_steps, batch_size=32, lr=config.baseline_lr,
                                   val_fraction=config.val_fraction, eval_every=50, patience=3))
    stage = card.history[-1]
    return {"student": config.baseline_student, "size": config.baseline_size, "val_top1": stage["val_top1"],
            "steps_run": stage["steps_run"], "lr": config.baseline_lr}


def _adapt_segmentation(config: TeacherConfig) -> TeacherCard:
    """Lite0-style CNN at output stride 8 (ViTs: patch tokens resized to 1/8) + DeepLab head, trained with per-pixel
    CE on ``config.data``'s image/mask pairs: ``lp`` trains the head only, ``ft`` everything (backbone BatchNorm
    statistics frozen either way). ``--shots N`` draws N labeled images in all (no image labels to stratify by);
    ``--val-fraction`` holds some out, never trained on, and records the teacher's validation mIoU."""
    if config.mode not in ("lp", "ft"):
        raise ValueError(f"--task segmentation takes --mode lp (head only) or ft (all), got {config.mode!r}")
    if config.library != "timm" or config.pretrained:
        raise ValueError("--task segmentation supports timm backbones with local/embedded --weights")
    if not config.data:
        raise ValueError("--task segmentation needs --data (image/mask pairs: fashion-mnist-seg:..., segfolder:DIR)")
    labeled, _ = open_labeled(config.data, config.shots, config.seed)
    if labeled.mask_loader is None:
        raise ValueError(f"--task segmentation needs image/mask pairs; {config.data!r} has none "
                         "(fashion-mnist-seg:..., segfolder:DIR)")
    source, val_part = split_labeled(labeled, config.val_fraction, config.seed)
    weights_file = _weights_file(config)
    backbone = create_backbone(DENSE_LIBRARY, config.backbone)
    load_backbone_weights(backbone, weights_file)  # the classifier's extra keys are not used
    size = config.size[0] if isinstance(config.size, tuple) else (config.size or int(source.load(0).shape[-1]))
    torch.manual_seed(config.seed)
    stats = backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"]
    model = SegmentationTeacher(backbone, len(source.class_names), *stats).to(memory_format=torch.channels_last)
    steps, lr = (config.lp_steps, config.lp_lr) if config.mode == "lp" else (config.steps, config.lr)
    model.backbone.requires_grad_(config.mode == "ft")
    started = time.perf_counter()
    losses = fit(model, SegmentationViews(source, size, train=True, seed=config.seed),
                 TrainSchedule(steps, lr, config.batch_size, seed=config.seed), desc=f"segmentation {config.mode}")
    model.eval()
    adaptation = {"task": "segmentation", "mode": config.mode, "weights": weights_file.name, "data": labeled.spec,
                  "shots": config.shots, "seed": config.seed, "val_fraction": config.val_fraction,
                  "train_images": len(source), "steps": steps, "lr": lr, "batch_size": config.batch_size,
                  "final_loss": round(losses[-1], 4),
                  "train_seconds": round(time.perf_counter() - started, 1),
                  "val_miou": None if val_part is None else round(evaluate_model(model, val_part, size)["miou"], 4)}
    card = TeacherCard(name=config.name, library=DENSE_LIBRARY, backbone=config.backbone,
                       num_classes=len(source.class_names), class_names=source.class_names, input_size=size,
                       mean=tuple(stats[0]), std=tuple(stats[1]), adaptation=adaptation)
    return save_teacher(model.eval(), card, _out_dir(config) / config.name, weights_file)


def _save_frozen(config: TeacherConfig) -> TeacherCard:
    """The pretrained backbone as it is, without a task head: features only, no labels involved."""
    backbone, stats, weights = _pretrained_backbone(config)
    config = dataclasses.replace(config, size=_sizes(config.size, backbone)[0])
    model = TeacherModel(backbone, 0, *stats).eval()
    adaptation = {"mode": "frozen", "weights": weights, "train_images": 0}
    card = TeacherCard(name=config.name, library=config.library, backbone=config.backbone, num_classes=0,
                       class_names=(), input_size=config.size, mean=stats[0], std=stats[1], adaptation=adaptation)
    return save_teacher(model, card, _out_dir(config) / config.name, _weights_file(config))


def _weights_file(config: TeacherConfig) -> Path:
    if config.weights != "embedded":
        path = Path(config.weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {config.weights!r} does not exist")
        return path
    if config.library != "timm" or config.backbone not in EMBEDDED:
        raise ValueError(f"no embedded weights for {config.library} {config.backbone!r}; pass --weights FILE "
                         "(or --pretrained when online)")
    return embedded_weights(EMBEDDED[config.backbone])


def _pretrained_backbone(config: TeacherConfig) -> tuple[nn.Module, tuple[tuple[float, ...], tuple[float, ...]], str]:
    """The loaded backbone, the mean/std its weights were trained with, and where the weights came from."""
    backbone = create_backbone(config.library, config.backbone)
    if config.pretrained:
        tag = None if config.pretrained == "default" else config.pretrained
        weights = load_hub_weights(backbone, config.library, config.backbone, tag)
    else:
        weights_file = _weights_file(config)
        load_backbone_weights(backbone, weights_file)
        weights = weights_file.name
    if config.library == "open_clip":
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        return backbone, (tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)), weights
    cfg = backbone.pretrained_cfg
    return backbone, (tuple(cfg["mean"]), tuple(cfg["std"])), weights


def _train(mode: str, config: TeacherConfig, backbone: nn.Module, stats, source: Source, desc: str) -> TeacherModel:
    """A fresh copy of the pretrained backbone, adapted by ``mode`` on ``source``; progress lines say ``desc``."""
    torch.manual_seed(config.seed)  # the head's init and dropout: a rerun gives the same teacher
    model = TeacherModel(copy.deepcopy(backbone), len(labeled_classes(source)), *stats)
    model = model.to(memory_format=torch.channels_last)
    if mode == "lp":
        _fit_probe(model, source, config, desc)
    else:
        schedule = TrainSchedule(config.steps, config.lr, config.batch_size, seed=config.seed)
        fit(model, LabeledViews(source, config.size, train=True, seed=config.seed), schedule, freeze_bn=True,
            desc=f"{desc}: ft")
    return model.eval()


@torch.inference_mode()
def _probe_features(model: TeacherModel, source: Source, config: TeacherConfig, desc: str) -> TensorDataset:
    """Frozen features of the clean view plus ``lp_views`` augmented views of every image."""
    features, labels = [], []
    with progress_bar(total=len(source) * (config.lp_views + 1), desc=f"{desc}: lp features", unit="view") as bar:
        for view_set in range(config.lp_views + 1):
            dataset = LabeledViews(source, config.size, train=view_set > 0, seed=config.seed)
            dataset.set_epoch(view_set)
            for views, targets in torch.utils.data.DataLoader(dataset, batch_size=128):
                features.append(model.features(views.contiguous(memory_format=torch.channels_last)))
                labels.append(targets)
                bar.update(len(targets))
    return TensorDataset(torch.cat(features), torch.cat(labels))


def _fit_probe(model: TeacherModel, source: Source, config: TeacherConfig, desc: str) -> None:
    model.backbone.requires_grad_(False).eval()
    dataset = _probe_features(model, source, config, desc)
    schedule = TrainSchedule(config.lp_steps, config.lp_lr, batch_size=256, weight_decay=1e-4, seed=config.seed)
    fit(model.head, dataset, schedule, desc=f"{desc}: lp head")


def _cross_validate(mode: str, config: TeacherConfig, backbone: nn.Module, stats, source: Source) -> float:
    """Mean held-out top-1 over stratified folds of the labeled images."""
    scores = []
    for fold, held_out in enumerate(_stratified_folds(source.labels, config.folds, config.seed)):
        train_part = source.subset(np.setdiff1d(np.arange(len(source)), held_out), f"{source.spec}#cv{fold}-train")
        desc = f"cv {mode}@{config.size} fold {fold + 1}/{config.folds}"
        model = _train(mode, config, backbone, stats, train_part, desc)
        scores.append(evaluate_model(model, source.subset(held_out, f"{source.spec}#cv{fold}"), config.size)["top1"])
    return float(np.mean(scores))


def _stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """``folds`` disjoint index sets, each holding about 1/folds of every class."""
    if np.unique(labels, return_counts=True)[1].min() < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} labeled images per class")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        assignment[members] = np.arange(len(members)) % folds
    return [np.flatnonzero(assignment == k) for k in range(folds)]


def main(argv: list[str] | None = None) -> TeacherCard:
    parser = argparse.ArgumentParser(prog="train.teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, help="timm or open_clip model name")
    parser.add_argument("--library", default="timm", choices=("timm", "open_clip"))
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", default="embedded",
                         help="local checkpoint (.safetensors or torch file: timm's keys, official DINOv2, an "
                              "open_clip full model or visual tower), or 'embedded' (Lite0)")
    weights.add_argument("--pretrained", nargs="?", const="default", default=None, metavar="TAG",
                         help="the timm / open_clip hub's weights (optionally TAG); needs the network")
    parser.add_argument("--data", help="labeled source spec, e.g. fashion-mnist:train (not for --mode frozen)")
    parser.add_argument("--shots", type=int, default=10,
                        help="labeled images per class; segmentation: images in all (0: the whole source)")
    parser.add_argument("--mode", default="auto", choices=MODES)
    parser.add_argument("--task", default="classification", choices=("classification", "segmentation"),
                        help="segmentation: stride-8 backbone + DeepLab head on image/mask pairs, --mode lp or ft")
    parser.add_argument("--name", required=True, help="zoo entry name (OUT_DIR/NAME)")
    parser.add_argument("--size", type=lambda text: tuple(int(v) for v in text.split(",")), default=None,
                        help="view size(s) in px (default: the backbone's pretrained size); several: auto chooses")
    parser.add_argument("--out-dir", default=None,
                        help="zoo directory (default: $VFM_REINFORCE_HOME/teachers, else ./teachers: where "
                             "lookups look first)")
    parser.add_argument("--baseline-student", default=None,
                        help="also train this timm student on the labels alone and record its val top-1 "
                             "(reinforce.build warns when the teacher is not ahead of it)")
    defaults = TeacherConfig("", "")
    for flag in ("seed", "steps", "lr", "batch_size", "lp_steps", "lp_lr", "lp_views", "folds", "val_fraction",
                 "baseline_size", "baseline_steps", "baseline_lr"):
        default = getattr(defaults, flag)
        parser.add_argument(f"--{flag.replace('_', '-')}", type=type(default), default=default)
    args = vars(debug_flag(parser).parse_args(argv))
    with cli_errors(parser.prog, args.pop("debug")):
        card = adapt_teacher(TeacherConfig(**args))
    scores = {k: card.adaptation.get(k) for k in ("cv_accuracy", "val_top1") if card.adaptation.get(k) is not None}
    if "labels_only" in card.adaptation:
        scores["labels_only_val_top1"] = card.adaptation["labels_only"]["val_top1"]
    print(f"train.teacher: wrote {_out_dir(TeacherConfig(**args)) / card.name} (mode {card.adaptation['mode']}, "
          f"size {card.input_size}"
          + "".join(f", {k} {v}" for k, v in scores.items()) + ")")
    return card


if __name__ == "__main__":
    main()
