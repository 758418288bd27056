"""Adapt a pretrained backbone to a labeled few-shot task and write it to the teacher zoo.

``lp`` trains a linear head on frozen features (precomputed once); ``ft`` finetunes everything
with BatchNorm statistics frozen (few-shot batches would wreck them). ``frozen`` saves the pretrained
backbone unadapted and headless (``num_classes`` 0, no labels needed): the task-agnostic teacher whose
features are distilled as they are.

Tuned like every student (``train.protocol``): each candidate (mode — ``auto`` tries lp and ft —, view
size, learning rate) runs a fixed-length schedule and is scored by ``--folds``-fold cross-validation over
the labeled images with predictions pooled (or on ``--val-data SPEC``); the teacher saved trains on all
labeled images with the best one. The test split is never looked at.

Views are taught at the backbone's pretrained input size unless ``--size`` says otherwise (a ViT
with 14-px patches at 64 px sees a 5x5 grid); several sizes (``--size 64,128``) are candidates too.
A weak teacher is flagged by default: ``--baseline-student ARCH`` (default ``mobilenetv3_small_050``,
``none`` turns it off) is cross-validated from the labels alone on the same folds and both scores are
recorded; distillation cannot give a student more than its teacher knows, so ``reinforce.build`` and
``train.pipeline`` warn when the teacher is not ahead of it.

Example:
    python -m train.teacher --backbone tf_efficientnet_lite0 --weights embedded \\
        --data fashion-mnist:train --shots 10 --mode auto --lp-lr 0.001,0.003 --name lite0_fmnist
    python -m train.teacher --backbone tf_efficientnet_lite0 --weights embedded --mode frozen --name lite0_frozen
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from reinforce.memory import keep_freed_memory
from reinforce.progress import progress_bar
from reinforce.sources import Source
from reinforce.teachers import (
    TeacherModel,
    create_backbone,
    embedded_weights,
    load_backbone_weights,
    load_hub_weights,
    native_size,
    save_teacher,
    teacher_zoo,
)
from reinforce.teachers.dense import DENSE_LIBRARY, SegmentationTeacher
from stores.cli_errors import HelpFormatter, cli_errors, config_flags, debug_flag
from stores.manifest import TeacherCard
from train.data import LabeledViews, SegmentationViews, labeled_classes, open_labeled
from train.optim import TrainSchedule, fit
from train.protocol import Protocol, comma_floats, select

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
    lr: tuple[float, ...] = (3e-4,)  # ft candidates
    batch_size: int = 32
    lp_steps: int = 300
    lp_lr: tuple[float, ...] = (3e-3,)  # lp candidates
    lp_views: int = 4  # augmented views per image added to the clean one for the probe
    folds: int = 3  # k-fold CV over the labeled images scores (and chooses among) the candidates; 0: none
    val_data: str | None = None  # a separate labeled validation split instead of CV
    out_dir: str | None = None  # None: reinforce.teachers.teacher_zoo(), where lookups look first
    baseline_student: str | None = "mobilenetv3_small_050"  # labels-only student on the same folds (None: off)
    baseline_size: int = 32
    baseline_steps: int = 500
    baseline_lr: float = 3e-3
    task: str = "classification"  # segmentation: stride-8 backbone + DeepLab head on image/mask pairs (lp | ft)


@dataclasses.dataclass(frozen=True)
class TeacherSetting:
    """One candidate of the teacher's protocol: adaptation mode, view size, learning rate, fixed steps."""

    mode: str
    size: int
    lr: float
    steps: int

    @property
    def name(self) -> str:
        return f"{self.mode}@{self.size},lr={self.lr:g}"


def adapt_teacher(config: TeacherConfig) -> TeacherCard:
    """Train the teacher the config describes and save it as ``OUT_DIR/NAME``; returns its card."""
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.mode == "frozen":
        return _save_frozen(config)
    if config.task == "segmentation":
        return _adapt_segmentation(config)
    if not config.data:
        raise ValueError(f"--mode {config.mode} teaches a task and needs --data (only --mode frozen does not)")
    source, class_names = open_labeled(config.data, config.shots, config.seed)
    backbone, stats, weights = _pretrained_backbone(config)
    sizes = _sizes(config.size, backbone)
    modes = ("lp", "ft") if config.mode == "auto" else (config.mode,)
    settings = [TeacherSetting(m, s, lr, config.steps if m == "ft" else config.lp_steps)
                for m in modes for s in sizes for lr in (config.lr if m == "ft" else config.lp_lr)]
    chosen, record, model = select(
        settings, source, lambda candidates, part: [_train(c, config, backbone, stats, part) for c in candidates],
        size=sizes[0], protocol=Protocol(config.folds, config.val_data, config.seed))
    started = time.perf_counter()
    if model is None:
        model = _train(chosen, config, backbone, stats, source, f"on all {len(source)} images")
    adaptation = {
        "mode": chosen.mode, "data": source.spec, "shots": config.shots, "seed": config.seed, "weights": weights,
        "steps": chosen.steps, "lr": chosen.lr, "batch_size": config.batch_size, "lp_views": config.lp_views,
        **record, "train_images": len(source), "train_seconds": round(time.perf_counter() - started, 1),
        "size": chosen.size,
    }
    if config.baseline_student and record.get("val_top1") is not None:
        adaptation["labels_only"] = _labels_only_baseline(config)
    card = TeacherCard(name=config.name, library=config.library, backbone=config.backbone,
                       num_classes=len(class_names), class_names=class_names, input_size=chosen.size,
                       mean=stats[0], std=stats[1], adaptation=adaptation, val_accuracy=record.get("val_top1"))
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
    """The student trained on the labels alone, scored by the same protocol on the same folds (or val split)."""
    from train.finetune import FinetuneConfig, finetune  # the labeled-only recipe, not a copy of it

    out = _out_dir(config) / config.name / "labels_only"
    card = finetune(FinetuneConfig(data=config.data, out=str(out), student=config.baseline_student,
                                   shots=config.shots, seed=config.seed, size=config.baseline_size,
                                   steps=(config.baseline_steps,), lr=(config.baseline_lr,), folds=config.folds,
                                   val_data=config.val_data))
    stage = card.history[-1]
    return {"student": config.baseline_student, "size": config.baseline_size, "val_top1": stage["val_top1"],
            "steps": config.baseline_steps, "lr": config.baseline_lr}


def _adapt_segmentation(config: TeacherConfig) -> TeacherCard:
    """Lite0-style CNN at output stride 8 (ViTs: patch tokens resized to 1/8) + DeepLab head, trained with per-pixel
    CE on ``config.data``'s image/mask pairs: ``lp`` trains the head only, ``ft`` everything (backbone BatchNorm
    statistics frozen either way). ``--shots N`` draws N labeled images in all (no image labels to stratify by);
    the learning rate is chosen (and the mIoU recorded) by the protocol's pooled k-fold CV over those images."""
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
    weights_file = _weights_file(config)
    backbone = create_backbone(DENSE_LIBRARY, config.backbone)
    load_backbone_weights(backbone, weights_file)  # the classifier's extra keys are not used
    size = config.size[0] if isinstance(config.size, tuple) else (config.size or int(labeled.load(0).shape[-1]))
    stats = backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"]
    steps, lrs = (config.lp_steps, config.lp_lr) if config.mode == "lp" else (config.steps, config.lr)
    settings = [TeacherSetting(config.mode, size, lr, steps) for lr in lrs]

    def train(setting: TeacherSetting, part: Source) -> SegmentationTeacher:
        torch.manual_seed(config.seed)
        model = SegmentationTeacher(copy.deepcopy(backbone), len(part.class_names), *stats)
        model = model.to(memory_format=torch.channels_last)
        model.backbone.requires_grad_(setting.mode == "ft")
        fit(model, SegmentationViews(part, size, train=True, seed=config.seed),
            TrainSchedule(setting.steps, setting.lr, config.batch_size, seed=config.seed),
            desc=f"segmentation {setting.name} {part.spec}")
        return model.eval()

    chosen, record, model = select(settings, labeled, lambda candidates, part: [train(c, part) for c in candidates],
                                   size=size, protocol=Protocol(config.folds, config.val_data, config.seed))
    started = time.perf_counter()
    model = model if model is not None else train(chosen, labeled)
    adaptation = {"task": "segmentation", "mode": config.mode, "weights": weights_file.name, "data": labeled.spec,
                  "shots": config.shots, "seed": config.seed, **record, "train_images": len(labeled),
                  "steps": steps, "lr": chosen.lr, "batch_size": config.batch_size,
                  "train_seconds": round(time.perf_counter() - started, 1)}
    card = TeacherCard(name=config.name, library=DENSE_LIBRARY, backbone=config.backbone,
                       num_classes=len(labeled.class_names), class_names=labeled.class_names, input_size=size,
                       mean=tuple(stats[0]), std=tuple(stats[1]), adaptation=adaptation)
    return save_teacher(model, card, _out_dir(config) / config.name, weights_file)


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


def _train(setting: TeacherSetting, config: TeacherConfig, backbone: nn.Module, stats, source: Source,
           desc: str = "") -> TeacherModel:
    """A fresh copy of the pretrained backbone, adapted by ``setting`` on ``source``; progress lines say ``desc``."""
    torch.manual_seed(config.seed)  # the head's init and dropout: a rerun gives the same teacher
    model = TeacherModel(copy.deepcopy(backbone), len(labeled_classes(source)), *stats)
    model = model.to(memory_format=torch.channels_last)
    desc = f"{setting.name} {desc or source.spec}"
    if setting.mode == "lp":
        _fit_probe(model, source, setting, config, desc)
    else:
        schedule = TrainSchedule(setting.steps, setting.lr, config.batch_size, seed=config.seed)
        fit(model, LabeledViews(source, setting.size, train=True, seed=config.seed), schedule, freeze_bn=True,
            desc=f"{desc}: ft")
    return model.eval()


@torch.inference_mode()
def _probe_features(model: TeacherModel, source: Source, size: int, config: TeacherConfig,
                    desc: str) -> TensorDataset:
    """Frozen features of the clean view plus ``lp_views`` augmented views of every image."""
    features, labels = [], []
    with progress_bar(total=len(source) * (config.lp_views + 1), desc=f"{desc}: lp features", unit="view") as bar:
        for view_set in range(config.lp_views + 1):
            dataset = LabeledViews(source, size, train=view_set > 0, seed=config.seed)
            dataset.set_epoch(view_set)
            for views, targets in torch.utils.data.DataLoader(dataset, batch_size=128):
                features.append(model.features(views.contiguous(memory_format=torch.channels_last)))
                labels.append(targets)
                bar.update(len(targets))
    return TensorDataset(torch.cat(features), torch.cat(labels))


def _fit_probe(model: TeacherModel, source: Source, setting: TeacherSetting, config: TeacherConfig,
               desc: str) -> None:
    model.backbone.requires_grad_(False).eval()
    dataset = _probe_features(model, source, setting.size, config, desc)
    schedule = TrainSchedule(setting.steps, setting.lr, batch_size=256, weight_decay=1e-4, seed=config.seed)
    fit(model.head, dataset, schedule, desc=f"{desc}: lp head")


def build_parser() -> argparse.ArgumentParser:
    """``train.teacher``'s command line (``train.pipeline`` checks a recipe's section with it)."""
    parser = argparse.ArgumentParser(prog="train.teacher", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
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
    defaults = TeacherConfig("", "")
    parser.add_argument("--baseline-student", default=defaults.baseline_student,
                        type=lambda name: None if name.lower() == "none" else name,
                        help="timm student cross-validated on the labels alone on the same folds ('none': off); "
                             "reinforce.build and train.pipeline warn when the teacher is not ahead of it")
    parser.add_argument("--lr", type=comma_floats, default=defaults.lr, help="ft learning rate(s) to choose among")
    parser.add_argument("--lp-lr", type=comma_floats, default=defaults.lp_lr,
                        help="lp learning rate(s) to choose among")
    parser.add_argument("--val-data", default=None,
                        help="a separate labeled validation split scores the candidates instead of --folds CV")
    config_flags(parser, defaults, "seed", "steps", "batch_size", "lp_steps", "lp_views", "folds", "baseline_size",
                 "baseline_steps", "baseline_lr")
    return debug_flag(parser)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    with cli_errors(parser.prog, args.pop("debug")):
        card = adapt_teacher(TeacherConfig(**args))
    scores = {k: card.adaptation.get(k) for k in ("chosen", "val_top1", "val_miou") if card.adaptation.get(k)}
    if "labels_only" in card.adaptation:
        scores["labels_only_val_top1"] = card.adaptation["labels_only"]["val_top1"]
    print(f"train.teacher: wrote {_out_dir(TeacherConfig(**args)) / card.name} (mode {card.adaptation['mode']}, "
          f"size {card.input_size}"
          + "".join(f", {k} {v}" for k, v in scores.items()) + ")")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
