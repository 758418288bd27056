"""The ``timm`` backbone library: any timm model as a pooled feature extractor (``num_classes=0``), behind the
adapter interface every backbone library gives a ``TeacherModel``: ``num_features``, ``forward`` (pooled
features), ``forward_targets`` (pooled features and the last feature map from one pass), ``library_state_dict`` /
``load_library_state_dict`` (the library's own key names: what zoo entries and checkpoints hold) and
``checkpoint_state`` (a checkpoint in another layout under those names)."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from reinforce.teachers.backbones import register_backbone_library, tokens_to_map

__all__ = ["VIT_MODULES", "TimmBackbone", "is_vit"]

# timm model families of patch-token ViTs: they take ``dynamic_img_size`` (DINOv2: 518 px, patch 14; any view size:
# position embeddings interpolated) and ``dynamic_img_pad``, and have no strided stages to dilate (``output_stride``)
VIT_MODULES = ("vision_transformer", "deit", "eva")


def is_vit(name: str) -> bool:
    """Whether timm model ``name`` (with or without a pretrained tag) is one of ``VIT_MODULES``' ViTs."""
    import timm

    return timm.models.is_model_in_modules(name, VIT_MODULES)


class TimmBackbone(nn.Module):
    """A timm network without its classifier: ``[B, 3, S, S]`` normalised views -> ``[B, num_features]``."""

    def __init__(self, name: str):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ValueError(f"timm has no model named {name!r}")
        # config.json's model_args: plain timm builds the same network
        self.model_args = {"dynamic_img_size": True, "dynamic_img_pad": True} if is_vit(name) else {}
        self.model = timm.create_model(name, pretrained=False, num_classes=0, **self.model_args)
        self.num_features = self.model.num_features
        self.pretrained_cfg = self.model.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_targets(self, x: torch.Tensor, patch: bool = False) -> dict[str, torch.Tensor]:
        """``{"embedding": [B, D]}``, plus ``"patch"``: the last feature map ``[B, C, h, w]`` (ViT patch tokens laid
        on their grid, class/register tokens dropped), from one forward."""
        features = self.model.forward_features(x)
        outputs = {"embedding": self.model.forward_head(features)}  # num_classes=0: the pre-logits features
        if patch:
            if features.dim() == 3:
                features = tokens_to_map(features[:, getattr(self.model, "num_prefix_tokens", 0):])
            outputs["patch"] = features
        return outputs

    def library_state_dict(self) -> dict[str, torch.Tensor]:
        """The timm network's own state dict (no ``model.`` prefix): a timm checkpoint."""
        return self.model.state_dict()

    def load_library_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` under timm's key names: as it is when it has them all, else through the model family's own
        ``checkpoint_filter_fn`` (official DINOv2, OpenAI CLIP into a timm ViT, ...); extra keys are kept."""
        if self.model.state_dict().keys() <= state.keys():
            return state
        convert = getattr(importlib.import_module(type(self.model).__module__), "checkpoint_filter_fn", None)
        return state if convert is None else convert(dict(state), self.model)  # timm's filters may pop from it


@register_backbone_library("timm")
def timm_backbone(name: str) -> TimmBackbone:
    return TimmBackbone(name)
