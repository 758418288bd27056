"""Students and model directories: a timm network behind the same uint8-in interface as teachers.

A student directory is in timm's own layout (``reinforce.model_dirs``): ``config.json`` and
``model.safetensors`` with the plain timm network's keys, which ``timm.create_model("local-dir:DIR",
pretrained=True)`` loads, plus ``student.json``: the history of the ``StudentCard``, whose other fields
are read from ``config.json``. Every model here takes uint8 views ``[B, 3, S, S]`` and normalises them
itself, like ``TeacherModel``, so build, distillation, finetuning and evaluation feed them the same tensors.

Example:
    >>> student, card = create_student("mobilenetv3_small_050", class_names=names, input_size=32)
    >>> save_student(student, card, "runs/student")
    >>> model, card = load_classifier("runs/student")        # or a teacher zoo name
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reinforce.model_dirs import TASK_FIELDS, read_card, read_task_fields, timm_config, write_card, write_json
from reinforce.teachers import normalize_views, tokens_to_map
from reinforce.teachers.dense import DenseNet, upsample_logits
from reinforce.tensor_files import load_tensors, save_tensors

__all__ = ["TASKS", "SegmentationStudent", "Student", "StudentCard", "create_student", "load_classifier",
           "load_student", "read_student_card", "save_student"]

TASKS = ("classification", "segmentation")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentCard:
    """``student.json``: the architecture, its task and how it was trained (one entry per stage)."""

    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    history: tuple[dict[str, Any], ...] = ()
    task: str = "classification"  # or "segmentation": a DenseNet (stride-8 backbone + DeepLab head), not a timm net

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentCard:
        data = dict(data)
        for key in ("class_names", "mean", "std", "history"):
            data[key] = tuple(data[key])
        return cls(**data)

    def with_stage(self, **stage: Any) -> StudentCard:
        return dataclasses.replace(self, history=(*self.history, stage))


class Student(nn.Module):
    """A timm classifier that takes uint8 views and normalises them on device."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.net(normalize_views(views, self.mean, self.std))

    def forward_parts(self, views: torch.Tensor, outputs: set[str]) -> dict[str, torch.Tensor]:
        """The requested outputs of one forward: ``logits [B, C]``, ``embedding [B, D]`` (pooled pre-logits
        features) and ``feature_map [B, C', h, w]`` (the last map; ViT tokens laid on their grid)."""
        features = self.net.forward_features(normalize_views(views, self.mean, self.std))
        parts = {}
        if "feature_map" in outputs:
            prefix = getattr(self.net, "num_prefix_tokens", 0)
            parts["feature_map"] = features if features.dim() == 4 else tokens_to_map(features[:, prefix:])
        if "embedding" in outputs:
            parts["embedding"] = self.net.forward_head(features, pre_logits=True)
        if "logits" in outputs:
            parts["logits"] = self.net.forward_head(features)
        return parts


class SegmentationStudent(Student):
    """A ``DenseNet`` student: ``forward`` gives full-resolution logits ``[B, C, S, S]`` (CE, mIoU),
    ``forward_parts`` the 1/8 map ``seg_logits`` (distillation) and the backbone's ``feature_map``/``embedding``."""

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return upsample_logits(self.net(normalize_views(views, self.mean, self.std)), views.shape[-2:])

    def forward_parts(self, views: torch.Tensor, outputs: set[str]) -> dict[str, torch.Tensor]:
        features = self.net.backbone(normalize_views(views, self.mean, self.std))
        parts = {"feature_map": features, "embedding": features.mean((-2, -1))}
        if "seg_logits" in outputs:
            parts["seg_logits"] = self.net.head(features)
        return {name: parts[name] for name in outputs}


def create_student(arch: str, *, class_names: tuple[str, ...], input_size: int | None = None,
                   task: str = "classification") -> tuple[Student, StudentCard]:
    """A randomly initialised timm ``arch`` with a ``len(class_names)``-way head (none when ``class_names`` is
    empty: a student distilled from features only gets its classifier when it is finetuned); ``task=
    "segmentation"``: the same backbone at output stride 8 with a DeepLab head. ``input_size`` defaults to the
    architecture's pretrained size, as a teacher's does (``reinforce.teachers.native_size``)."""
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        raise ValueError(f"timm has no model named {arch!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    dense = task == "segmentation"
    net = DenseNet(arch, len(class_names)) if dense else timm.create_model(arch, pretrained=False,
                                                                            num_classes=len(class_names))
    config = net.pretrained_cfg
    input_size = input_size or int(config["input_size"][-1])
    card = StudentCard(arch=arch, num_classes=len(class_names), class_names=tuple(class_names),
                       input_size=input_size, mean=tuple(config["mean"]), std=tuple(config["std"]), task=task)
    model = (SegmentationStudent if dense else Student)(net, card.mean, card.std)
    return model.to(memory_format=torch.channels_last), card


def save_student(model: Student, card: StudentCard, directory: str | os.PathLike) -> None:
    """Write ``DIR/{config.json, model.safetensors, student.json}``: a plain timm model plus its history (a
    segmentation student: the ``DenseNet``'s keys; ``student.json`` says its task)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(_net_state(model.net), directory / "model.safetensors")
    task = {k: getattr(card, k) for k in TASK_FIELDS}
    write_json(directory / "config.json", timm_config(card.arch, model.net, **task))
    dense = {"task": card.task} if card.task != "classification" else {}
    write_card(directory / "student.json", {"history": list(card.history), **dense})


def read_student_card(directory: str | os.PathLike) -> StudentCard:
    """The card of a student directory: its task fields from ``config.json``, its history from ``student.json``."""
    directory = Path(directory)
    if not (directory / "student.json").exists():
        raise FileNotFoundError(f"{str(directory)!r} is not a student directory (no student.json)")
    stored = read_card(directory / "student.json")
    fields = read_task_fields(directory)
    return StudentCard.from_dict({"arch": fields["architecture"], **{k: fields[k] for k in TASK_FIELDS},
                                  "history": stored["history"], "task": stored.get("task", "classification")})


def load_student(directory: str | os.PathLike) -> tuple[Student, StudentCard]:
    card = read_student_card(directory)
    model, _ = create_student(card.arch, class_names=card.class_names, input_size=card.input_size, task=card.task)
    state = load_tensors(Path(directory) / "model.safetensors")
    if isinstance(model.net, DenseNet):
        model.net.load_library_state_dict(state)
    else:
        model.net.load_state_dict(state)
    return model, card


def _net_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The keys a student directory holds: timm's own (a ``DenseNet``: ``backbone.`` + timm's, ``head.``)."""
    return net.library_state_dict() if isinstance(net, DenseNet) else net.state_dict()


def load_classifier(name_or_dir: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """A student directory or a teacher zoo entry, in eval mode; the card has ``input_size``/``class_names``."""
    if (Path(name_or_dir) / "student.json").exists():
        model, card = load_student(name_or_dir)
        return model.to(device).eval(), card
    from reinforce.teachers import create_teacher

    return create_teacher(name_or_dir, device)
