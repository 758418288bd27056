"""The backbone registry: ``@register_backbone_library(NAME)`` maps a library name to ``fn(backbone_name) ->
nn.Module`` (pooled features ``[B, num_features]``); ``create_backbone(library, name)`` builds one, randomly
initialised. The libraries: ``timm`` (``reinforce.teachers.timm_backbone``), ``open_clip``
(``reinforce.teachers.open_clip_backbone``), ``timm_seg`` (``reinforce.teachers.dense``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["create_backbone", "list_backbone_libraries", "native_size", "register_backbone_library", "tokens_to_map"]

_LIBRARIES: dict[str, Callable[[str], nn.Module]] = {}


def register_backbone_library(name: str):
    """Decorator: ``fn(backbone_name) -> nn.Module`` returning pooled features, with ``num_features``."""
    def wrap(fn):
        _LIBRARIES[name] = fn
        return fn
    return wrap



def list_backbone_libraries() -> list[str]:
    """The registered backbone library names, sorted."""
    return sorted(_LIBRARIES)


def native_size(backbone: nn.Module) -> int:
    """The input size the backbone's weights were pretrained at (timm ``pretrained_cfg``, open_clip ``image_size``)."""
    size = getattr(backbone, "image_size", None) or backbone.pretrained_cfg["input_size"][-1]
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


def create_backbone(library: str, name: str) -> nn.Module:
    """Randomly initialised feature extractor (pooled features ``[B, num_features]``)."""
    if library not in _LIBRARIES:
        raise ValueError(f"unknown backbone library {library!r}; registered: {', '.join(sorted(_LIBRARIES))}")
    return _LIBRARIES[library](name)



def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` patch tokens of a square view -> ``[B, C, sqrt(N), sqrt(N)]``."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)

