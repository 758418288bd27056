"""The ``timm`` backbone library: any timm model as a pooled feature extractor (``num_classes=0``)."""

from __future__ import annotations

from torch import nn

from reinforce.teachers.backbones import register_backbone_library

__all__ = ["timm_backbone"]


@register_backbone_library("timm")
def timm_backbone(name: str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"timm has no model named {name!r}")
    args = {"dynamic_img_size": True, "dynamic_img_pad": True}
    try:  # ViTs (DINOv2: 518 px, patch 14) must take any view size: interpolate pos. embeddings, pad
        backbone = timm.create_model(name, pretrained=False, num_classes=0, **args)
    except TypeError:  # CNNs take any size and reject the keyword
        backbone, args = timm.create_model(name, pretrained=False, num_classes=0), {}
    backbone.model_args = args  # config.json's model_args: plain timm builds the same network
    return backbone
