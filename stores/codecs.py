"""Codecs: compress teacher outputs into fixed-width per-view payloads and decode them back.

A codec is a frozen dataclass registered by name, so a store's manifest (plain JSON) is all a
reader needs to rebuild it: ``create_codec(**manifest["codec"])``. Codecs work on torch
tensors so decoding can run on the training device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["TopKLogitsCodec", "create_codec", "list_codecs", "register_codec"]

_CODECS: dict[str, type] = {}


def register_codec(cls: type) -> type:
    """Class decorator: make a codec constructible from its stored ``name``."""
    _CODECS[cls.name] = cls
    return cls


def list_codecs() -> list[str]:
    return sorted(_CODECS)


def create_codec(name: str, **kwargs: Any):
    """Rebuild a codec from its ``to_dict()`` form.

    Example:
        >>> codec = create_codec("topk_logits", k=5, num_classes=10)
    """
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; registered: {', '.join(list_codecs())}")
    return _CODECS[name](**kwargs)


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKLogitsCodec:
    """Top-k raw logits (T=1) + indices + log-sum-exp of the full logits.

    Stored arrays per view: ``logits_topk [k] float16``, ``logits_idx [k] uint16`` (int32 when
    ``num_classes > 65535``) and ``logits_lse [] float32``. The log-sum-exp makes the top-k
    probabilities exact and the residual mass known; decoding spreads that mass uniformly over
    the other classes, which keeps any distillation temperature available at training time.
    """

    name: ClassVar[str] = "topk_logits"
    k: int
    num_classes: int

    def __post_init__(self):
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"top-k must be in [1, num_classes={self.num_classes}], got k={self.k}")

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.num_classes <= 65535 else np.int32)

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-view array shapes and dtypes, as the store lays them out after ``[N, K]``."""
        return {
            "logits_topk": ((self.k,), np.dtype(np.float16)),
            "logits_idx": ((self.k,), self.index_dtype),
            "logits_lse": ((), np.dtype(np.float32)),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """``logits [B, C]`` (any float dtype) -> payload of numpy arrays with leading dim B."""
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"codec expects {self.num_classes} classes, teacher gave {logits.shape[-1]}")
        logits = logits.float()
        values, indices = logits.topk(self.k, dim=-1)
        return {
            "logits_topk": values.half().cpu().numpy(),
            "logits_idx": indices.cpu().numpy().astype(self.index_dtype),
            "logits_lse": torch.logsumexp(logits, dim=-1).cpu().numpy(),
        }

    def decode_logits(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Payload -> dense ``[B, C] float32`` logits at T=1 whose softmax is the decoded target.

        Top-k classes keep their stored logits; every other class gets the logit that spreads the
        residual mass ``1 - sum(top-k probs)`` uniformly. Dividing by T before a softmax gives the
        target at temperature T.
        """
        values = payload["logits_topk"].float()
        lse = payload["logits_lse"].float()
        tail = self.num_classes - self.k
        dense = torch.empty(values.shape[0], self.num_classes, device=values.device)
        if tail:
            top_mass = torch.exp(values - lse[:, None]).sum(-1)
            residual = (1.0 - top_mass).clamp_min(1e-12)
            dense[:] = (lse + torch.log(residual) - math.log(tail))[:, None]
        dense.scatter_(1, payload["logits_idx"].long(), values)
        return dense

    def decode(self, payload: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
        """Payload -> target distribution ``[B, C] float32`` at ``temperature``."""
        return torch.softmax(self.decode_logits(payload) / temperature, dim=-1)


