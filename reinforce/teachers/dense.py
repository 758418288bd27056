"""Dense prediction: timm backbones at output stride 8 + torchvision's ``DeepLabHead`` (ASPP), as in the paper's
segmentation transfer (DeepLabV3 on the VFM and on the student, 1/8-resolution features, a loss at every pixel).

CNNs run dilated (timm ``features_only=True, output_stride=8``, last stage): the same weights as the
classifier, so ImageNet checkpoints load as they are. ViTs have no stride to change: their patch tokens are
laid on the patch grid and resized bilinearly to 1/8 of the view, as the paper does for its ViT teachers.

The backbone library ``timm_seg`` (``reinforce.teachers.create_backbone("timm_seg", name)``) builds these
backbones; a teacher whose card says ``library: timm_seg`` is a ``SegmentationTeacher``, saved in the zoo's
non-timm layout (``model.safetensors`` = the backbone's keys, ``head.safetensors`` = the DeepLab head).

Example:
    >>> backbone = DenseBackbone("tf_efficientnet_lite0")      # [B, 3, 64, 64] -> [B, 320, 8, 8]
    >>> teacher = SegmentationTeacher(backbone, 11, (0.5,) * 3, (0.5,) * 3)
    >>> teacher.forward_targets(views_uint8, ("seg_logits",))["seg_logits"].shape   # [B, 11, 8, 8]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from reinforce.teachers.backbones import register_backbone_library, tokens_to_map
from reinforce.teachers.model import TeacherModel
from reinforce.teachers.timm_backbone import is_vit

__all__ = ["DENSE_LIBRARY", "OUTPUT_STRIDE", "DenseBackbone", "DenseNet", "SegmentationTeacher", "upsample_logits"]

DENSE_LIBRARY = "timm_seg"
OUTPUT_STRIDE = 8


class DenseBackbone(nn.Module):
    """A timm network as a feature-map extractor at 1/8 resolution: ``[B, 3, S, S] -> [B, num_features, S/8, S/8]``."""

    def __init__(self, name: str):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ValueError(f"timm has no model named {name!r}")
        self.tokens = is_vit(name)  # ViTs have no strided stages to dilate: their patch tokens, resized
        if self.tokens:
            self.net = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
            self.num_features = self.net.num_features
        else:
            self.net = timm.create_model(name, pretrained=False, features_only=True, output_stride=OUTPUT_STRIDE,
                                         out_indices=(-1,))
            self.num_features = self.net.feature_info.channels()[-1]
        self.pretrained_cfg = self.net.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tokens:
            return self.net(x)[-1]
        tokens = self.net.forward_features(x)[:, getattr(self.net, "num_prefix_tokens", 0):]
        size = [math.ceil(s / OUTPUT_STRIDE) for s in x.shape[-2:]]
        return F.interpolate(tokens_to_map(tokens), size=size, mode="bilinear", align_corners=False)

    def library_state_dict(self) -> dict[str, torch.Tensor]:
        """The timm network's own key names (no ``net.``), so timm checkpoints load as they are and zoo entries and
        student directories hold timm's keys."""
        return self.net.state_dict()

    def load_library_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint is read under timm's key names as it is (a classifier's extra keys are left to the caller)."""
        return state


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """1/8-resolution logits ``[B, C, h, w]`` -> ``[B, C, *size]`` (bilinear): per-pixel CE and mIoU at full size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class DenseNet(nn.Module):
    """``DenseBackbone`` + ``DeepLabHead``: normalised views -> logits at 1/8 (the student's network)."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        self.backbone = DenseBackbone(arch)
        self.head = DeepLabHead(self.backbone.num_features, num_classes)
        self.pretrained_cfg = self.backbone.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def library_state_dict(self) -> dict[str, torch.Tensor]:
        """``backbone.`` + the timm network's own keys, ``head.`` + the DeepLab head's: a student directory's keys."""
        return {**{f"backbone.{k}": v for k, v in self.backbone.library_state_dict().items()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}

    def load_library_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``library_state_dict``: every key must be there, none left over."""
        parts = {"backbone.": {}, "head.": {}}
        for key, tensor in state.items():
            prefix = next((p for p in parts if key.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"unexpected key {key!r} in a DenseNet state (keys start with backbone. or head.)")
            parts[prefix][key.removeprefix(prefix)] = tensor
        self.backbone.load_library_state_dict(parts["backbone."])
        self.head.load_state_dict(parts["head."])


class SegmentationTeacher(TeacherModel):
    """A ``TeacherModel`` whose head is a DeepLab head at every position of a stride-8 feature map.

    ``forward`` gives full-resolution logits (training, evaluation); ``forward_targets`` the 1/8 map it stores.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, mean, std):
        super().__init__(backbone, 0, mean, std)  # no linear head: the DeepLab head replaces it
        self.head = DeepLabHead(backbone.num_features, num_classes)

    @property
    def target_kinds(self) -> tuple[str, ...]:
        return ("seg_logits",)

    def train(self, mode: bool = True) -> SegmentationTeacher:
        """The backbone's BatchNorm keeps its pretrained statistics (few-shot batches would wreck them, as in
        ``train.teacher``'s ft); the new head's BatchNorm learns its own."""
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` -> ``[B, C, S, S]`` float32 logits."""
        return upsample_logits(self.head(self.backbone(self.normalize(views))), views.shape[-2:])

    def forward_targets(self, views: torch.Tensor, kinds: tuple[str, ...] = ("seg_logits",)) -> dict[str, torch.Tensor]:
        """``{"seg_logits": [B, C, S/8, S/8]}``."""
        unknown = sorted(set(kinds) - set(self.target_kinds))
        if unknown:
            raise ValueError(f"a segmentation teacher gives only seg_logits, not {unknown}")
        return {"seg_logits": self.head(self.backbone(self.normalize(views)))}


@register_backbone_library(DENSE_LIBRARY)
def _dense_backbone(name: str) -> nn.Module:
    return DenseBackbone(name)
