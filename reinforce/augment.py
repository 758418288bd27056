"""Augmentation policies whose every random choice is an explicit, storable integer record.

A policy samples ``AugParams`` from a counter-based RNG keyed by (seed, sample, view), so a view
never depends on worker count, batch size or resume point, and renders a view with ``apply``.
The build and student training call the same ``apply``: replaying a stored record gives the
pixels the teacher saw, bit for bit. The RandAugment op table is the project's own (public
torchvision functions only), so a torchvision upgrade cannot silently re-map stored op ids.

Example:
    >>> policy = create_policy("rrc_flip_randaug", size=64)
    >>> theta = policy.sample(seed=0, sample_index=12, view_index=3, height=28, width=28)
    >>> view = policy.apply(image_uint8_chw, theta)           # uint8 [3, 64, 64]
    >>> records = policy.pack([theta])                         # uint8 [1, policy.record_bytes]
    >>> assert policy.unpack(records) == [theta]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms.v2 import InterpolationMode

__all__ = [
    "EVAL_PREPROCESSING", "OP_NAMES", "RANDAUG_OPS", "AugParams", "BicubicCropFlip", "CropFlip", "RandAugCropFlip",
    "RandAugOp", "create_policy", "eval_view", "list_policies", "policy_from_record", "register_policy", "view_rng",
]

_POLICIES: dict[str, type[CropFlip]] = {}
_NEAREST = InterpolationMode.NEAREST
_UINT16_MAX = np.iinfo(np.uint16).max


@dataclasses.dataclass(frozen=True)
class RandAugOp:
    """One RandAugment op: ``magnitudes(num_bins, height, width)`` gives the bin values (None: no
    magnitude), ``signed`` lets a negative bin negate it, ``render(image, magnitude)`` draws it."""

    name: str
    magnitudes: Callable[[int, int, int], torch.Tensor | None]
    signed: bool
    render: Callable[[torch.Tensor, float], torch.Tensor]

    def magnitude(self, signed_bin: int, num_bins: int, height: int, width: int) -> float:
        """The value of ``signed_bin`` for a ``height`` x ``width`` image (float32 bins, as torchvision)."""
        values = self.magnitudes(num_bins, height, width)
        if values is None:
            return 0.0
        value = float(values[abs(signed_bin)])
        return -value if self.signed and signed_bin < 0 else value

    def __call__(self, image: torch.Tensor, signed_bin: int, num_bins: int) -> torch.Tensor:
        """Render on uint8 ``[3, H, W]``; translations scale with this image's size."""
        return self.render(image, self.magnitude(signed_bin, num_bins, image.shape[-2], image.shape[-1]))


def _affine(image: torch.Tensor, translate: list[int], shear: list[float], center: list[int] | None = None):
    # fill=None pads with zeros: same pixels as fill=0, without grid_sample's extra mask channel
    return F.affine(image, angle=0.0, translate=translate, scale=1.0, shear=shear, interpolation=_NEAREST,
                    fill=None, center=center)


def _shear_degrees(magnitude: float) -> float:
    """RandAugment's shear is the affine coefficient; ``F.affine`` wants its angle."""
    return math.degrees(math.atan(magnitude))


def _linspace(stop: float) -> Callable[[int, int, int], torch.Tensor]:
    return lambda num_bins, height, width: torch.linspace(0.0, stop, num_bins)


def _no_magnitude(num_bins: int, height: int, width: int) -> None:
    return None


def _posterize_bits(num_bins: int, height: int, width: int) -> torch.Tensor:
    return (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4))).round().int()


def _solarize_thresholds(num_bins: int, height: int, width: int) -> torch.Tensor:
    # 255 x float32 fractions, in float64: linspace(255, 0) in float32 moves integer thresholds (238.0 vs 238.0000017)
    return torch.linspace(1.0, 0.0, num_bins).double() * 255.0


# torchvision's RandAugment space (names, order, bins, math); the index is the op id stored in records.
RANDAUG_OPS: tuple[RandAugOp, ...] = (
    RandAugOp("Identity", _no_magnitude, False, lambda x, m: x),
    RandAugOp("ShearX", _linspace(0.3), True, lambda x, m: _affine(x, [0, 0], [_shear_degrees(m), 0.0], [0, 0])),
    RandAugOp("ShearY", _linspace(0.3), True, lambda x, m: _affine(x, [0, 0], [0.0, _shear_degrees(m)], [0, 0])),
    RandAugOp("TranslateX", lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, n), True,
              lambda x, m: _affine(x, [int(m), 0], [0.0, 0.0])),
    RandAugOp("TranslateY", lambda n, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, n), True,
              lambda x, m: _affine(x, [0, int(m)], [0.0, 0.0])),
    RandAugOp("Rotate", _linspace(30.0), True, lambda x, m: F.rotate(x, angle=m, interpolation=_NEAREST, fill=None)),
    RandAugOp("Brightness", _linspace(0.9), True, lambda x, m: F.adjust_brightness(x, 1.0 + m)),
    RandAugOp("Color", _linspace(0.9), True, lambda x, m: F.adjust_saturation(x, 1.0 + m)),
    RandAugOp("Contrast", _linspace(0.9), True, lambda x, m: F.adjust_contrast(x, 1.0 + m)),
    RandAugOp("Sharpness", _linspace(0.9), True, lambda x, m: F.adjust_sharpness(x, 1.0 + m)),
    RandAugOp("Posterize", _posterize_bits, False, lambda x, m: F.posterize(x, int(m))),
    RandAugOp("Solarize", _solarize_thresholds, False, lambda x, m: F.solarize(x, m)),
    RandAugOp("AutoContrast", _no_magnitude, False, lambda x, m: F.autocontrast(x)),
    RandAugOp("Equalize", _no_magnitude, False, lambda x, m: F.equalize(x)),
)
OP_NAMES: tuple[str, ...] = tuple(op.name for op in RANDAUG_OPS)


def view_rng(seed: int, sample_index: int, view_index: int) -> np.random.Generator:
    """Philox generator keyed by (seed, sample) with the view in the counter: order-independent."""
    key = np.array([seed, sample_index], dtype=np.uint64)
    counter = np.array([0, 0, view_index, 0], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


@dataclasses.dataclass(frozen=True)
class AugParams:
    """One view's augmentation record θ; the policy version lives in the store manifest, not here."""

    box: tuple[int, int, int, int]  # left, top, width, height in source pixels
    flip: bool
    ops: tuple[tuple[int, int], ...] = ()  # (op id into RANDAUG_OPS, signed magnitude bin)


def register_policy(cls: type[CropFlip]) -> type[CropFlip]:
    """Class decorator: make a policy constructible from its stored ``name``."""
    if cls.name in _POLICIES:
        raise ValueError(f"augmentation policy {cls.name!r} is already registered by {_POLICIES[cls.name].__name__}")
    _POLICIES[cls.name] = cls
    return cls


def list_policies() -> list[str]:
    """Registered policy names, sorted."""
    return sorted(_POLICIES)


def create_policy(name: str, **args: Any) -> CropFlip:
    """Build policy ``name``; ``None`` args keep their defaults (unset CLI flags).

    Example:
        >>> create_policy("rrc_flip_randaug", size=224, num_ops=2, scale=None)
    """
    if name not in _POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; registered: {', '.join(list_policies())}")
    cls = _POLICIES[name]
    args = {k: v for k, v in args.items() if v is not None}
    fields = [f for f in dataclasses.fields(cls) if f.init]
    valid = [f.name for f in fields]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for policy {name!r}; valid: {', '.join(valid)}")
    missing = [f.name for f in fields if f.name not in args and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"policy {name!r} needs argument(s) {', '.join(missing)}")
    try:
        return cls(**args)
    except TypeError as error:  # a value of the wrong type, e.g. size="64"
        raise ValueError(f"bad argument(s) for policy {name!r} {args}: {error}") from error


def policy_from_record(record: dict[str, Any]) -> CropFlip:
    """Rebuild the policy of ``policy.to_record()`` (a store manifest), refusing one this code renders otherwise."""
    missing = [k for k in ("name", "version", "args", "op_names", "record_bytes") if k not in record]
    if missing:
        raise ValueError(f"policy record {record} lacks {', '.join(missing)}; "
                         "it predates packed θ records: rebuild the store")
    policy = create_policy(record["name"], **record["args"])
    code = policy.to_record()
    if record["version"] != code["version"]:
        raise ValueError(f"store was built with policy {record['name']!r} version {record['version']}; "
                         f"this code renders version {code['version']}")
    if list(record["op_names"]) != code["op_names"]:
        raise ValueError(f"store was built with ops {list(record['op_names'])}; this code renders {code['op_names']}")
    if record["record_bytes"] != code["record_bytes"]:
        raise ValueError(f"store records are {record['record_bytes']} bytes; this code packs {code['record_bytes']}")
    return policy


def _checked_box(image: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``box`` (left, top, width, height) if it lies inside ``image`` ``[..., H, W]``."""
    left, top, w, h = box
    if left < 0 or top < 0 or w <= 0 or h <= 0 or left + w > image.shape[-1] or top + h > image.shape[-2]:
        raise ValueError(f"crop box {box} lies outside the image of shape {tuple(image.shape)}")
    return box


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class CropFlip:
    """RandomResizedCrop + horizontal flip, rendered at ``size``; subclasses add ops after the flip."""

    name: ClassVar[str] = "rrc_flip"
    version: ClassVar[int] = 1
    interpolation: ClassVar[InterpolationMode] = InterpolationMode.BILINEAR  # of the crop's resize (antialiased)
    size: int
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        bad = [message for message, ok in self._arg_checks().items() if not ok]
        if bad:
            raise ValueError(f"bad argument(s) for policy {self.name!r}: {'; '.join(bad)}")

    def _arg_checks(self) -> dict[str, bool]:
        """``{"arg=value (need ...)": ok}`` for every constraint on the constructor args."""
        return {
            f"size={self.size} (need > 0)": self.size > 0,
            f"scale={self.scale} (need 0 < low <= high)": len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
            f"ratio={self.ratio} (need 0 < low <= high)": len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1],
            f"flip_prob={self.flip_prob} (need 0..1)": 0 <= self.flip_prob <= 1,
        }

    @property
    def op_names(self) -> list[str]:
        """The op table a record's op ids index into; empty when the policy renders no ops."""
        return []

    @property
    def record_dtype(self) -> np.dtype:
        """Packed θ, little-endian, unaligned: box ``<u2`` x4 (left, top, width, height) and flip ``u1``."""
        return np.dtype([("box", "<u2", (4,)), ("flip", "u1")])

    @property
    def record_bytes(self) -> int:
        return self.record_dtype.itemsize

    def to_record(self) -> dict[str, Any]:
        """JSON-able form for the store manifest; ``policy_from_record`` rebuilds the policy from it."""
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
        return {"name": self.name, "version": self.version, "args": args, "op_names": self.op_names,
                "record_bytes": self.record_bytes}

    def sample(self, seed: int, sample_index: int, view_index: int, height: int, width: int) -> AugParams:
        """Draw θ for one view of an image of ``height`` x ``width`` source pixels."""
        rng = view_rng(seed, sample_index, view_index)
        box = self._sample_box(rng, height, width)
        flip = bool(rng.random() < self.flip_prob)
        return AugParams(box, flip, self._sample_ops(rng))

    def _sample_ops(self, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
        return ()

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
        return self._apply_ops(self._geometry(image, params, size or self.size, mask=False), params.ops)

    def apply_with_mask(self, image: torch.Tensor, mask: torch.Tensor, params: AugParams,
                        size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One θ for an image and its class map (uint8 ``[H, W]``): the view ``apply`` renders and the mask
        under the same crop box and flip, resized nearest-neighbour (class ids stay ids), no photometric ops.

        Example:
            >>> view, labels = policy.apply_with_mask(image, mask, policy.sample(0, i, v, *mask.shape))
        """
        if mask.shape != image.shape[-2:]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match its image {tuple(image.shape)}")
        return self.apply(image, params, size), self._geometry(mask[None], params, size or self.size, mask=True)[0]

    def _geometry(self, image: torch.Tensor, params: AugParams, size: int, mask: bool) -> torch.Tensor:
        """The crop box resized to ``size`` (antialiased ``interpolation``, or nearest for a mask) and the flip."""
        left, top, w, h = _checked_box(image, params.box)
        if mask:
            view = F.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.NEAREST_EXACT)
        else:
            view = F.resized_crop(image, top, left, h, w, [size, size], interpolation=self.interpolation,
                                  antialias=True)
        return F.horizontal_flip(view) if params.flip else view

    def cut(self, image: torch.Tensor, params: AugParams) -> torch.Tensor:
        """The crop of ``params`` at source resolution, uint8 ``[3, h, w]``: box, flip and ops, no resize. A
        retrieved crop is this, so the build's view augmentation resamples it once; the ops render at the box's
        size (translations scale with it), where ``apply`` renders them at ``size``."""
        left, top, w, h = _checked_box(image, params.box)
        view = image[:, top: top + h, left: left + w].contiguous()
        return self._apply_ops(F.horizontal_flip(view) if params.flip else view, params.ops)

    def _apply_ops(self, view: torch.Tensor, ops: tuple[tuple[int, int], ...]) -> torch.Tensor:
        if ops:
            raise ValueError(f"policy {self.name!r} renders no ops; the record has {ops}")
        return view

    def pack(self, params: list[AugParams]) -> np.ndarray:
        """θ records as uint8 ``[n, record_bytes]`` rows of ``record_dtype``, for a store field.

        Example:
            >>> policy.pack([policy.sample(0, i, 0, 28, 28) for i in range(4)]).shape   # (4, record_bytes)
        """
        rows = np.zeros(len(params), self.record_dtype)
        boxes = np.array([p.box for p in params], dtype=np.int64).reshape(-1, 4)
        outside = boxes[(boxes < 0) | (boxes > _UINT16_MAX)]
        if outside.size:
            raise ValueError(f"crop box coordinate {outside[0]} does not fit the record's uint16 (0..{_UINT16_MAX})")
        rows["box"] = boxes
        rows["flip"] = [p.flip for p in params]
        self._pack_ops(rows, [p.ops for p in params])
        return rows.view(np.uint8).reshape(len(params), self.record_bytes)

    def _pack_ops(self, rows: np.ndarray, ops: list[tuple[tuple[int, int], ...]]) -> None:
        if any(ops):
            raise ValueError(f"policy {self.name!r} packs no ops; a record has {next(o for o in ops if o)}")

    def unpack(self, records: np.ndarray) -> list[AugParams]:
        """Inverse of ``pack``: uint8 ``[n, record_bytes]`` rows back to ``AugParams``."""
        records = np.asarray(records)
        if records.dtype != np.uint8 or records.ndim != 2 or records.shape[1] != self.record_bytes:
            raise ValueError(f"expected uint8 records [n, {self.record_bytes}] for policy {self.name!r}, "
                             f"got {records.dtype} {records.shape}")
        rows = np.ascontiguousarray(records).view(self.record_dtype).reshape(len(records))
        boxes, flips = rows["box"].tolist(), rows["flip"].astype(bool).tolist()
        ops = self._unpack_ops(rows)
        return [AugParams(tuple(b), f, o) for b, f, o in zip(boxes, flips, ops, strict=True)]

    def _unpack_ops(self, rows: np.ndarray) -> list[tuple[tuple[int, int], ...]]:
        return [()] * len(rows)


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class BicubicCropFlip(CropFlip):
    """``CropFlip`` resized bicubically, as OpenCLIP's and timm's evaluation resize: ``reinforce.retrieve``'s
    image-level view, on which a bicubically resized copy of a small task image lands near its original (bilinear
    upsampling blurs the 28 px original, not the copy, and drops such copies below the 0.95 leak threshold)."""

    name: ClassVar[str] = "rrc_flip_bicubic"
    interpolation: ClassVar[InterpolationMode] = InterpolationMode.BICUBIC


@register_policy
@dataclasses.dataclass(frozen=True, kw_only=True)
class RandAugCropFlip(CropFlip):
    """RandomResizedCrop + horizontal flip + RandAugment(num_ops, magnitude) from ``RANDAUG_OPS``."""

    name: ClassVar[str] = "rrc_flip_randaug"
    version: ClassVar[int] = 2  # 2: own op table, packed records; 1 used torchvision's private table, int32 records
    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31

    def _arg_checks(self) -> dict[str, bool]:
        return {
            **super()._arg_checks(),
            f"num_ops={self.num_ops} (need 0..255)": 0 <= self.num_ops <= 255,
            f"num_magnitude_bins={self.num_magnitude_bins} (need 2..128: bins are stored as int8)":
                2 <= self.num_magnitude_bins <= 128,
            f"magnitude={self.magnitude} (need 0..num_magnitude_bins-1)": 0 <= self.magnitude < self.num_magnitude_bins,
        }

    @property
    def op_names(self) -> list[str]:
        return list(OP_NAMES)

    @property
    def record_dtype(self) -> np.dtype:
        """Packed θ: box ``<u2`` x4, flip ``u1``, op ids ``u1`` x num_ops, signed bins ``i1`` x num_ops."""
        n = self.num_ops
        return np.dtype([*super().record_dtype.descr, ("op", "u1", (n,)), ("bin", "i1", (n,))])

    def _sample_ops(self, rng: np.random.Generator) -> tuple[tuple[int, int], ...]:
        op_ids = rng.integers(0, len(RANDAUG_OPS), size=self.num_ops)
        signs = np.where(rng.random(self.num_ops) < 0.5, -1, 1)
        return tuple((int(op), int(sign * self.magnitude)) for op, sign in zip(op_ids, signs))

    def _check_ops(self, op_ids: np.ndarray, bins: np.ndarray) -> None:
        bad = (op_ids < 0) | (op_ids >= len(RANDAUG_OPS)) | (np.abs(bins) >= self.num_magnitude_bins)
        if bad.any():
            first = np.argwhere(bad)[0]
            raise ValueError(f"op ({op_ids[tuple(first)]}, {bins[tuple(first)]}) is outside this policy's "
                             f"{len(RANDAUG_OPS)} op ids x signed bins ±{self.num_magnitude_bins - 1}")

    def _apply_ops(self, view: torch.Tensor, ops: tuple[tuple[int, int], ...]) -> torch.Tensor:
        for op_id, signed_bin in ops:
            self._check_ops(np.asarray(op_id), np.asarray(signed_bin))
            view = RANDAUG_OPS[op_id](view, signed_bin, self.num_magnitude_bins)
        return view

    def _pack_ops(self, rows: np.ndarray, ops: list[tuple[tuple[int, int], ...]]) -> None:
        wrong = [o for o in ops if len(o) != self.num_ops]
        if wrong:
            raise ValueError(f"policy {self.name!r} packs {self.num_ops} ops per view; a record has {wrong[0]}")
        pairs = np.array(ops, dtype=np.int64).reshape(len(ops), self.num_ops, 2)
        self._check_ops(pairs[..., 0], pairs[..., 1])
        rows["op"], rows["bin"] = pairs[..., 0], pairs[..., 1]

    def _unpack_ops(self, rows: np.ndarray) -> list[tuple[tuple[int, int], ...]]:
        pairs = np.stack([rows["op"], rows["bin"]], axis=-1).astype(np.int64).tolist()
        return [tuple(map(tuple, p)) for p in pairs]


# timm data-config fields of the evaluation view: written into every model directory's config.json
EVAL_PREPROCESSING = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation view: the whole image squashed to ``size`` (uint8 ``[3, S, S]``).

    Rendered by timm's own eval transform (PIL bilinear) with ``EVAL_PREPROCESSING``, so
    ``timm.data.create_transform`` on a model directory's data config gives these very pixels.
    """
    return _eval_transform(size)(F.to_pil_image(image))


def eval_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """The class map under ``eval_view``'s squash: uint8 ``[H, W]`` -> ``[size, size]``, nearest (ids stay ids)."""
    return F.resize(mask[None], [size, size], interpolation=InterpolationMode.NEAREST_EXACT)[0]


@functools.lru_cache(maxsize=8)
def _eval_transform(size: int) -> Callable[[Any], torch.Tensor]:
    import timm.data

    return timm.data.create_transform(input_size=(3, size, size), is_training=False, normalize=False,
                                      **EVAL_PREPROCESSING)
