"""The teacher zoo: an entry ``NAME/`` that its own library loads (``save_teacher``, ``create_teacher``).

A timm teacher is a plain timm classifier on disk: ``config.json`` + ``model.safetensors`` (the head
is timm's classifier; ``reinforce.model_dirs``) + ``teacher.json`` (lineage). An open_clip teacher holds
``model.safetensors`` (the visual tower's own keys), ``head.safetensors`` (a plain ``nn.Linear``)
and ``teacher.json`` with every field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch

from reinforce.model_dirs import TASK_FIELDS, read_card, read_task_fields, timm_config, write_card, write_json
from reinforce.teachers.backbones import create_backbone
from reinforce.teachers.checkpoints import embedded_weights, load_backbone_weights
from reinforce.teachers.dense import DENSE_LIBRARY, SegmentationTeacher
from reinforce.teachers.model import TeacherModel
from reinforce.tensor_files import load_tensors, save_tensors, tensors_sha256
from stores.location import Location
from stores.manifest import TeacherCard

__all__ = ["backbone_sha256", "create_teacher", "embedded_imagenet_teacher", "pretrained_teacher", "read_teacher_card",
           "resolve_teacher", "save_teacher", "teacher_zoo"]


def save_teacher(model: TeacherModel, card: TeacherCard, directory: str | os.PathLike,
                 weights_source: str | os.PathLike | None = None) -> TeacherCard:
    """Write a zoo entry in its library's layout; returns the card with the weights' sha256 filled in.
    ``weights_source``: the pretrained checkpoint it was made from, recorded by name and sha256 (lineage)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in _layout_tensors(model, card.library).items():
        save_tensors(tensors, directory / name)
    card = dataclasses.replace(card, weights_sha256=_weights_digest(directory, card))
    on_disk = card.to_dict()
    if card.library == "timm":
        task = {k: on_disk[k] for k in TASK_FIELDS}
        write_json(directory / "config.json",
                   timm_config(card.backbone, model.backbone, **task, model_args=model.backbone.model_args))
        on_disk = {k: v for k, v in on_disk.items() if k not in ("backbone", *TASK_FIELDS)}
    source = Path(weights_source) if weights_source else None
    source = {"weights_source": {"file": source.name, "sha256": Location(source.parent).sha256(source.name)}
              } if source else {}
    write_card(directory / "teacher.json", on_disk, source)
    return card


def _layout_tensors(model: TeacherModel, library: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{file: tensors}``: timm, one plain timm classifier; open_clip, the tower and the head apart."""
    head = {} if model.head is None else model.head.state_dict()
    if library == "timm":
        classifier = model.backbone.pretrained_cfg["classifier"]
        head = {f"{classifier}.{name}": tensor for name, tensor in head.items()}
        return {"model.safetensors": {**model.backbone.library_state_dict(), **head}}
    return {"model.safetensors": model.backbone.library_state_dict(), **({"head.safetensors": head} if head else {})}


def _weight_files(card: TeacherCard) -> tuple[str, ...]:
    return ("model.safetensors",) + (("head.safetensors",) if card.library != "timm" and card.num_classes else ())


def backbone_sha256(model: TeacherModel) -> str:
    """The ``weights_sha256`` of a headless teacher (``train.teacher --mode frozen``) with ``model``'s backbone: equal
    to it exactly when the two backbones' weights are, as a linear probe's are to the VFM it probes."""
    return tensors_sha256(model.backbone.library_state_dict())


def _weights_digest(directory: Path, card: TeacherCard) -> str:
    """sha256 of the weight files' bytes, in ``_weight_files`` order (model, then an open_clip head)."""
    digest = hashlib.sha256()
    for name in _weight_files(card):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()


def read_teacher_card(directory: str | os.PathLike) -> TeacherCard:
    """The full card of a zoo entry: ``teacher.json``, plus the task fields of ``config.json`` (timm)."""
    directory = Path(directory)
    data = read_card(directory / "teacher.json")
    if data.get("library") == "timm":
        fields = read_task_fields(directory)
        data.update(backbone=fields["architecture"], **{k: fields[k] for k in TASK_FIELDS})
    return TeacherCard.from_dict(data, str(directory / "teacher.json"))


def teacher_zoo(home: str | os.PathLike | None = None) -> Path:
    """Where ``train.teacher`` writes and lookups look first: ``HOME/teachers`` (HOME: $VFM_REINFORCE_HOME, read
    now), else ``./teachers``."""
    home = home if home is not None else os.environ.get("VFM_REINFORCE_HOME")
    return Path(home) / "teachers" if home else Path("teachers")


def resolve_teacher(name_or_path: str, home: str | os.PathLike | None = None) -> Path:
    """A zoo entry by path, then ``teacher_zoo(home)/NAME``, then ``./teachers/NAME``."""
    candidates = list(dict.fromkeys([Path(name_or_path), teacher_zoo(home) / name_or_path,
                                     Path("teachers") / name_or_path]))
    for candidate in candidates:
        if (candidate / "teacher.json").exists():
            return candidate
    raise FileNotFoundError(
        f"teacher {name_or_path!r} not found (looked in {', '.join(map(str, candidates))}); "
        "create one with `python -m train.teacher` or `reinforce.teachers.save_teacher`"
    )


def create_teacher(name_or_path: str, device: str | torch.device = "cpu") -> tuple[TeacherModel, TeacherCard]:
    """Load a zoo entry in eval mode, checking its weights against the card's sha256."""
    directory = resolve_teacher(name_or_path)
    card = read_teacher_card(directory)
    digest = _weights_digest(directory, card)
    if card.weights_sha256 and digest != card.weights_sha256:
        raise ValueError(f"{directory} weights have sha256 {digest[:12]}…, teacher.json records "
                         f"{card.weights_sha256[:12]}…")
    model = _teacher_class(card.library)(create_backbone(card.library, card.backbone), card.num_classes,
                                         card.mean, card.std)
    state = load_tensors(directory / "model.safetensors")
    if card.library == "timm":
        prefix = f"{model.backbone.pretrained_cfg['classifier']}."
        head = {k.removeprefix(prefix): state.pop(k) for k in list(state) if k.startswith(prefix)}
    else:
        head = load_tensors(directory / "head.safetensors") if card.num_classes else {}
    model.backbone.load_library_state_dict(state)
    if model.head is not None:
        model.head.load_state_dict(head)
    return model.to(device, memory_format=torch.channels_last).eval(), card


def _teacher_class(library: str) -> type[TeacherModel]:
    """``SegmentationTeacher`` for the stride-8 library (``reinforce.teachers.dense``), else ``TeacherModel``."""
    return SegmentationTeacher if library == DENSE_LIBRARY else TeacherModel


def pretrained_teacher(name: str, library: str, backbone_name: str, weights_file: str | os.PathLike, *,
                       class_names: tuple[str, ...], input_size: int, mean, std) -> tuple[TeacherModel, TeacherCard]:
    """A teacher made of a pretrained backbone and the classifier its checkpoint ships with.

    Example: ``embedded_imagenet_teacher`` below.
    """
    backbone = create_backbone(library, backbone_name)
    extra = load_backbone_weights(backbone, weights_file)
    model = TeacherModel(backbone, len(class_names), mean, std)
    head = {k.rsplit(".", 1)[-1]: v for k, v in extra.items()}
    if set(head) != {"weight", "bias"} or head["weight"].shape != model.head.weight.shape:
        raise ValueError(f"{weights_file} has no {len(class_names)}-class classifier to use as the head")
    model.head.load_state_dict(head)
    card = TeacherCard(name=name, library=library, backbone=backbone_name, num_classes=len(class_names),
                       class_names=tuple(class_names), input_size=input_size, mean=tuple(mean), std=tuple(std),
                       adaptation={"mode": "pretrained", "weights": Path(weights_file).name})
    return model.eval(), card


def embedded_imagenet_teacher(input_size: int) -> tuple[TeacherModel, TeacherCard]:
    """The embedded real teacher: Lite0 with its ImageNet-1k head (``lite0_in1k``), at ``input_size``."""
    import timm

    names = tuple(timm.data.ImageNetInfo().label_descriptions())  # = index_to_description(i), 1000x faster
    return pretrained_teacher("lite0_in1k", "timm", "tf_efficientnet_lite0",
                              embedded_weights("tf_efficientnet_lite0.in1k"), class_names=names,
                              input_size=input_size, mean=(0.5,) * 3, std=(0.5,) * 3)
