"""The ``open_clip`` backbone library: an open_clip model's visual tower as a feature extractor, behind the adapter
interface of ``reinforce.teachers.timm_backbone``. The tower has a fixed position grid, so the adapter resizes
every input to the tower's ``image_size`` (bilinear, antialiased) before it runs: stated here, not hooked in."""

from __future__ import annotations

import torch
from torch import nn

from reinforce.teachers.backbones import register_backbone_library

__all__ = ["OpenClipBackbone"]


class OpenClipBackbone(nn.Module):
    """An open_clip visual tower: ``[B, 3, S, S]`` normalised views -> ``[B, output_dim]`` (the CLIP embedding)."""

    def __init__(self, name: str):
        super().__init__()
        import open_clip

        if name not in open_clip.list_models():
            raise ValueError(f"open_clip has no model named {name!r}")
        self.model = open_clip.create_model(name, pretrained=None).visual
        self.num_features = self.model.output_dim
        size = self.model.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` at the tower's native ``image_size`` (unchanged when it already is)."""
        if tuple(x.shape[-2:]) == self.image_size:
            return x
        return nn.functional.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False,
                                         antialias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.resize(x))

    def forward_targets(self, x: torch.Tensor, patch: bool = False) -> dict[str, torch.Tensor]:
        """``{"embedding": [B, D]}``, plus ``"patch"``: the last block's patch tokens after the final norm, on their
        grid ``[B, width, h, w]``, from one forward (open_clip's ``forward_intermediates``)."""
        x = self.resize(x)
        if not patch:
            return {"embedding": self.model(x)}
        outputs = self.model.forward_intermediates(x, indices=1, normalize_intermediates=True)
        return {"embedding": outputs["image_features"], "patch": outputs["image_intermediates"][-1]}

    def library_state_dict(self) -> dict[str, torch.Tensor]:
        """The tower's own state dict (no ``model.`` prefix): open_clip's ``visual`` module."""
        return self.model.state_dict()

    def load_library_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` under the tower's key names: as it is, or a full open_clip model's ``visual.`` tensors, prefix
        stripped (the text tower is not the teacher's)."""
        if self.model.state_dict().keys() <= state.keys() or not any(k.startswith("visual.") for k in state):
            return state
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}


@register_backbone_library("open_clip")
def open_clip_backbone(name: str) -> OpenClipBackbone:
    return OpenClipBackbone(name)
