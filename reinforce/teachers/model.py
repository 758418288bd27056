"""``TeacherModel``: a backbone's features -> a linear task head, taking uint8 views and normalising them itself,
so loaders move 4x fewer bytes and the card's mean/std are the only ones."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TARGET_KINDS", "TeacherModel", "normalize_views"]


TARGET_KINDS = ("logits", "embedding", "patch")


class TeacherModel(nn.Module):
    """Backbone features -> linear task head; takes uint8 views and normalises them on device.

    ``num_classes == 0`` makes a headless teacher (the frozen VFM itself): features, no logits.
    ``forward_targets`` returns every requested output of one forward pass: the logits, the pooled
    embedding the head reads, and the backbone's last feature map (patch tokens on a grid for ViTs).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, mean, std):
        """``backbone``: a backbone library's adapter (``reinforce.teachers.create_backbone``)."""
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes) if num_classes else None
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def target_kinds(self) -> tuple[str, ...]:
        return TARGET_KINDS if self.head is not None else TARGET_KINDS[1:]

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, 3, S, S]`` -> float32 normalised input, the exact tensor the backbone sees."""
        return normalize_views(views, self.mean, self.std)

    def embed(self, views: torch.Tensor, with_map: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled features ``[B, D]`` and, if asked, the last feature map ``[B, C, h, w]``, from one forward (the
        backbone adapter's ``forward_targets``)."""
        outputs = self.backbone.forward_targets(self.normalize(views), patch=with_map)
        return outputs["embedding"], outputs.get("patch")

    def features(self, views: torch.Tensor) -> torch.Tensor:
        return self.embed(views)[0]

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this teacher is headless (a frozen VFM): it gives features, not logits")
        return self.head(self.features(views))

    def forward_targets(self, views: torch.Tensor, kinds: tuple[str, ...] = ("logits",)) -> dict[str, torch.Tensor]:
        """``{kind: tensor}`` for ``kinds``: logits ``[B, C]``, embedding ``[B, D]``, patch ``[B, C, h, w]``."""
        unknown = sorted(set(kinds) - set(self.target_kinds))
        if unknown:
            raise ValueError(f"teacher cannot give target(s) {unknown}; it gives {', '.join(self.target_kinds)}")
        pooled, feature_map = self.embed(views, with_map="patch" in kinds)
        outputs = {"embedding": pooled, "patch": feature_map}
        if "logits" in kinds:
            outputs["logits"] = self.head(pooled)
        return {kind: outputs[kind] for kind in kinds}

    def target_shapes(self, size: int, kinds: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
        """Per-view shape of each of ``kinds`` for ``size`` px views, from a pass on the meta device: no
        compute and no weights touched, so a build that finds its store already published runs no forward."""
        state = {f"teacher.{name}": t.to("meta") for name, t in [*self.named_parameters(), *self.named_buffers()]}
        view = torch.zeros(1, 3, size, size, dtype=torch.uint8, device="meta")
        with torch.inference_mode():
            outputs = torch.func.functional_call(_ForwardTargets(self), state, (view, kinds))
        return {kind: tuple(output.shape[1:]) for kind, output in outputs.items()}


class _ForwardTargets(nn.Module):
    """``forward`` = ``teacher.forward_targets``, for ``torch.func.functional_call``."""

    def __init__(self, teacher: TeacherModel):
        super().__init__()
        self.teacher = teacher

    def forward(self, views: torch.Tensor, kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return self.teacher.forward_targets(views, kinds)


def normalize_views(views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> float32 ``(x / 255 - mean) / std``: bit for bit timm's ToTensor + Normalize."""
    return (views.float() / 255 - mean) / std

