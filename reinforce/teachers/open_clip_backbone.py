"""The ``open_clip`` backbone library: an open_clip model's visual tower as a feature extractor."""

from __future__ import annotations

from torch import nn

from reinforce.teachers.backbones import register_backbone_library

__all__ = ["open_clip_backbone"]


@register_backbone_library("open_clip")
def open_clip_backbone(name: str) -> nn.Module:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model named {name!r}")
    visual = open_clip.create_model(name, pretrained=None).visual
    visual.num_features = visual.output_dim
    visual.output_tokens = True  # forward returns (pooled, patch tokens): features and patch targets in one pass
    visual.register_forward_pre_hook(_resize_to_native)  # fixed position grid: upsample small views
    return visual


def _resize_to_native(module: nn.Module, args: tuple) -> tuple:
    """Pre-hook: resize inputs to the tower's ``image_size`` (keeps state_dict keys unchanged)."""
    (images,) = args
    size = tuple(module.image_size) if isinstance(module.image_size, (tuple, list)) else (module.image_size,) * 2
    if tuple(images.shape[-2:]) == size:
        return args
    return (nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True),)
