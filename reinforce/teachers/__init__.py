"""Teachers: a VFM backbone + task head, stored as a zoo entry ``NAME/`` that its own library loads.

Backbones come from timm or open_clip, created with ``pretrained=False`` and loaded from a local
checkpoint in any of ``CHECKPOINT_LAYOUTS``, so nothing downloads at run time unless asked to
(``load_hub_weights``: ``train.teacher --pretrained``). A teacher takes uint8 views ``[B, 3, S, S]`` and
normalises them itself, so loaders move 4x fewer bytes and the card's mean/std are the only ones.

A timm teacher is a plain timm classifier on disk: ``config.json`` + ``model.safetensors`` (the head
is timm's classifier; ``reinforce.model_dirs``) + ``teacher.json`` (lineage). An open_clip teacher holds
``model.safetensors`` (the visual tower's own keys), ``head.safetensors`` (a plain ``nn.Linear``)
and ``teacher.json`` with every field.

Example:
    >>> teacher, card = create_teacher("ft_lite0")    # a path, teacher_zoo()/NAME, ./teachers/NAME
    >>> logits = teacher(views_uint8)                        # [B, num_classes] float32

Modules: ``backbones`` (the library registry), ``timm_backbone``, ``open_clip_backbone``, ``dense`` (stride 8 +
DeepLab head, library ``timm_seg``), ``model`` (``TeacherModel``), ``checkpoints`` (pretrained weights), ``zoo``
(entries on disk). The card is ``stores.manifest.TeacherCard``.
"""

from __future__ import annotations

from reinforce.teachers import dense, open_clip_backbone, timm_backbone
from reinforce.teachers.backbones import (
    create_backbone,
    list_backbone_libraries,
    native_size,
    register_backbone_library,
    tokens_to_map,
)
from reinforce.teachers.checkpoints import (
    CHECKPOINT_LAYOUTS,
    embedded_weights,
    load_backbone_weights,
    load_hub_weights,
    read_checkpoint,
)
from reinforce.teachers.model import TARGET_KINDS, TeacherModel, normalize_views
from reinforce.teachers.zoo import (
    backbone_sha256,
    create_teacher,
    embedded_imagenet_teacher,
    pretrained_teacher,
    read_teacher_card,
    resolve_teacher,
    save_teacher,
    teacher_zoo,
)

__all__ = [
    "CHECKPOINT_LAYOUTS", "TARGET_KINDS", "TeacherModel", "backbone_sha256", "create_backbone", "create_teacher",
    "dense", "embedded_imagenet_teacher", "embedded_weights", "list_backbone_libraries", "load_backbone_weights",
    "load_hub_weights", "native_size", "normalize_views", "open_clip_backbone", "pretrained_teacher",
    "read_checkpoint", "read_teacher_card", "register_backbone_library", "resolve_teacher", "save_teacher",
    "teacher_zoo", "timm_backbone", "tokens_to_map",
]
