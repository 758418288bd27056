"""Augmentation policies whose every random choice is an explicit, storable integer record.

A policy samples ``AugParams`` from a counter-based RNG keyed by (seed, sample, view), so a view
never depends on worker count, batch size or resume point, and renders a view with ``apply``.
The build and student training call the same ``apply``: replaying a stored record gives the
pixels the teacher saw, bit for bit.

Example:
    >>> policy = create_policy("rrc_flip_randaug", size=64)
    >>> theta = policy.sample(seed=0, sample_index=12, view_index=3, height=28, width=28)
    >>> view = policy.apply(image_uint8_chw, theta)           # uint8 [3, 64, 64]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

__all__ = ["AugParams", "RandAugCropFlip", "create_policy", "list_policies", "register_policy", "view_rng"]

_POLICIES: dict[str, type] = {}

# torchvision's RandAugment op table, used as is: names, magnitude bins and the op math.
_RANDAUG = T.RandAugment(interpolation=T.InterpolationMode.NEAREST)
OP_NAMES: tuple[str, ...] = tuple(T.RandAugment._AUGMENTATION_SPACE)


def register_policy(cls: type) -> type:
    """Class decorator: make a policy constructible from its stored ``name``."""
    _POLICIES[cls.name] = cls
    return cls


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def create_policy(name: str, **kwargs: Any):
    """Build a policy from its ``to_dict()`` form (as stored in a manifest)."""
    if name not in _POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; registered: {', '.join(list_policies())}")
    return _POLICIES[name](**kwargs)


def view_rng(seed: int, sample_index: int, view_index: int) -> np.random.Generator:
    """Philox generator keyed by (seed, sample) with the view in the counter: order-independent."""
    key = np.array([seed, sample_index], dtype=np.uint64)
    counter = np.array([0, 0, view_index, 0], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


@dataclasses.dataclass(frozen=True)
class AugParams:
    """One view's augmentation record θ; ``to_array`` gives the fixed-width int32 form stored.

    Layout: ``[version, left, top, width, height, flip, op_0, mag_0, ..., op_{n-1}, mag_{n-1}]``.
    The crop box is in source pixels; a magnitude is a signed RandAugment bin index.
    """

    version: int
    box: tuple[int, int, int, int]  # left, top, width, height in source pixels
    flip: bool
    ops: tuple[tuple[int, int], ...]  # (op id into OP_NAMES, signed magnitude bin)

    def to_array(self) -> np.ndarray:
        flat = [self.version, *self.box, int(self.flip)] + [v for op in self.ops for v in op]
        return np.asarray(flat, dtype=np.int32)

    @classmethod
    def from_array(cls, record: np.ndarray) -> AugParams:
        values = [int(v) for v in record]
        pairs = values[6:]
        return cls(values[0], tuple(values[1:5]), bool(values[5]), tuple(zip(pairs[::2], pairs[1::2])))


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class RandAugCropFlip:
    """RandomResizedCrop + horizontal flip + RandAugment(num_ops, magnitude), rendered at ``size``."""

    name: ClassVar[str] = "rrc_flip_randaug"
    version: ClassVar[int] = 1
    size: int
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "ratio", tuple(self.ratio))

    @property
    def record_width(self) -> int:
        return 6 + 2 * self.num_ops

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> RandAugCropFlip:
        config = {k: v for k, v in config.items() if k not in ("name", "version")}
        return cls(**config)

    def sample(self, seed: int, sample_index: int, view_index: int, height: int, width: int) -> AugParams:
        """Draw θ for one view of an image of ``height`` x ``width`` source pixels."""
        rng = view_rng(seed, sample_index, view_index)
        box = self._sample_box(rng, height, width)
        flip = bool(rng.random() < self.flip_prob)
        op_ids = rng.integers(0, len(OP_NAMES), size=self.num_ops)
        signs = np.where(rng.random(self.num_ops) < 0.5, -1, 1)
        ops = tuple((int(op), int(sign * self.magnitude)) for op, sign in zip(op_ids, signs))
        return AugParams(self.version, box, flip, ops)

    def _sample_box(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop's box search (10 tries, then a clamped centre crop), drawn from ``rng``."""
        area = height * width
        log_ratio = np.log(self.ratio)
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def apply(self, image: torch.Tensor, params: AugParams, size: int | None = None) -> torch.Tensor:
        """Render the view ``params`` of ``image`` (uint8 ``[3, H, W]``) as uint8 ``[3, size, size]``.

        ``size`` defaults to the policy's; another size renders the same crop for a student that
        trains at a different resolution (translations scale with it).
        """
        if params.version != self.version:
            raise ValueError(f"record has policy version {params.version}, this code renders {self.version}")
        size = size or self.size
        left, top, w, h = params.box
        if left < 0 or top < 0 or left + w > image.shape[-1] or top + h > image.shape[-2]:
            raise ValueError(f"crop box {params.box} lies outside the image of shape {tuple(image.shape)}")
        view = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if params.flip:
            view = F.horizontal_flip(view)
        for op_id, signed_bin in params.ops:
            view = self._apply_op(view, OP_NAMES[op_id], signed_bin)
        return view

    def _apply_op(self, view: torch.Tensor, op_name: str, signed_bin: int) -> torch.Tensor:
        magnitudes_fn, signed = T.RandAugment._AUGMENTATION_SPACE[op_name]
        magnitudes = magnitudes_fn(self.num_magnitude_bins, view.shape[-2], view.shape[-1])
        magnitude = 0.0 if magnitudes is None else float(magnitudes[abs(signed_bin)])
        if signed and signed_bin < 0:
            magnitude = -magnitude
        return _RANDAUG._apply_image_or_video_transform(
            view, op_name, magnitude, interpolation=_RANDAUG.interpolation, fill=_RANDAUG._fill
        )


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: the whole image resized to ``size`` (uint8 ``[3, S, S]``)."""
    return F.resize(image, [size, size], antialias=True)
