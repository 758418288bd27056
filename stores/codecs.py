"""Codecs: compress one kind of teacher output into fixed-width per-view arrays and decode it back.

A codec is a frozen dataclass registered by name, so a store's manifest (plain JSON) is all a
reader needs to rebuild it: ``create_codec(**target.codec)``. Each codec knows its target *kind*
(``logits``, ``embedding``, ``patch``, ``seg_logits``), what its decode gives (``decoded``: ``log_probs``,
``empirical`` or ``features``, which picks the distillation loss), the arrays it stores per view, how to encode
a batch (torch in, numpy out), decode a batch (torch in, float32 torch out, on any device) and how faithful a
round trip is (``fidelity``), which the build records and ``stores inspect`` prints. ``encode`` and
``fidelity`` take optional per-view ``keys`` ``[B, 3]`` (seed, sample, view): a codec that draws
(``sampled_logits``) keys its generator with them exactly as θ is keyed, so a rebuild is bit-identical.

Example:
    >>> codec = create_codec("topk_logits", k=10, num_classes=1000, precision="uint8")
    >>> payload = codec.encode(logits)                       # {"values": uint8 [B, 10], ...}
    >>> dense = codec.decode({k: torch.from_numpy(v) for k, v in payload.items()})   # [B, 1000] log-probs
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from stores._philox import philox_uniform

__all__ = ["Codec", "EmbeddingCodec", "PatchCodec", "SampledLogitsCodec", "SegTopKLogitsCodec", "TopKLogitsCodec",
           "bias_z2_per_dof", "create_codec", "list_codecs", "register_codec"]

_CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make a codec constructible from its stored ``name``."""
    _CODECS[cls.name] = cls
    return cls


def list_codecs() -> list[str]:
    return sorted(_CODECS)


def create_codec(name: str, **kwargs: Any) -> Codec:
    """Rebuild a codec from its ``to_dict()`` form; errors name what is valid."""
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; registered: {', '.join(list_codecs())}")
    fields = {f.name for f in dataclasses.fields(_CODECS[name])}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"codec {name!r} takes {sorted(fields)}, got unknown {unknown}")
    return _CODECS[name](**kwargs)


class Codec:
    """Base of every codec: the registry name, the target kind and the shared helpers."""

    name: ClassVar[str]
    kind: ClassVar[str]
    decoded: ClassVar[str] = "features"  # what decode returns: log_probs | empirical | features

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-view array shapes and dtypes, stored as ``[N, K, *shape]``."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def fidelity(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Per-item round-trip quality of ``x`` (``[B]`` tensors by metric name)."""
        raise NotImplementedError

    def check(self, name: str, values: np.ndarray) -> None:
        """Raise ``ValueError`` if stored array ``name`` (``[..., *shape]``, as read) holds values a reader would
        crash on or silently train on: here, NaN or infinity; codecs with class indices add their range."""
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"{name} holds NaN or infinite values")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    @property
    def bytes_per_view(self) -> int:
        """Uncompressed payload bytes per view (the store compresses further)."""
        return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in self.arrays().values())

    def round_trip(self, x: torch.Tensor, keys: np.ndarray | None = None) -> torch.Tensor:
        return self.decode({name: torch.from_numpy(a) for name, a in self.encode(x, keys).items()})


def _check_precision(precision: str, allowed: tuple[str, ...]) -> None:
    if precision not in allowed:
        raise ValueError(f"precision must be one of {allowed}, got {precision!r}")


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class TopKLogitsCodec(Codec):
    """Top-k logits + the log-sum-exp of all of them: exact top-k probabilities, known residual mass.

    ``precision="fp16"`` stores raw logits (T=1) ``values [k] float16`` and ``lse [] float32``.
    ``precision="uint8"`` stores each value's gap to the view's max on ``value_bits`` bits with square-root
    companding, ``q = round(sqrt((max - x) / scale) * (2**bits - 1))`` (fine steps near the top classes,
    where KL is sensitive; coarse ones in the tail), with ``scale [] float16`` = the view's largest gap and
    ``lse [] float16`` = log-sum-exp minus the max (softmax is shift invariant, so the max itself is not
    needed). ``index_coding="delta"`` sorts the k classes by index and stores the first index then the
    gaps, which compress better than raw indices. Decoding spreads the residual mass uniformly over the
    other classes, which keeps any distillation temperature available at training time.
    """

    name: ClassVar[str] = "topk_logits"
    kind: ClassVar[str] = "logits"
    decoded: ClassVar[str] = "log_probs"
    k: int
    num_classes: int
    precision: str = "uint8"
    value_bits: int = 6  # uint8 only: levels 2**bits - 1 (unused high bits cost nothing after compression)
    index_coding: str = "delta"

    def __post_init__(self):
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"top-k must be in [1, num_classes={self.num_classes}], got k={self.k}")
        _check_precision(self.precision, ("fp16", "uint8"))
        if not 2 <= self.value_bits <= 8:
            raise ValueError(f"value_bits must be in [2, 8], got {self.value_bits}")
        if self.index_coding not in ("plain", "delta"):
            raise ValueError(f"index_coding must be 'plain' or 'delta', got {self.index_coding!r}")

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.num_classes <= 65535 else np.int32)

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        k = (self.k,)
        if self.precision == "fp16":
            values = {"values": (k, np.dtype(np.float16)), "lse": ((), np.dtype(np.float32))}
        else:
            values = {"values": (k, np.dtype(np.uint8)), "scale": ((), np.dtype(np.float16)),
                      "lse": ((), np.dtype(np.float16))}
        return {**values, "index": (k, self.index_dtype)}

    def check(self, name: str, values: np.ndarray) -> None:
        """Besides finite values: every class index decodes into ``[0, num_classes)``, the k of a view distinct
        (out of range, ``decode``'s scatter fails; repeated, it silently drops a class's probability)."""
        super().check(name, values)
        if name != "index" or values.size == 0:
            return
        index = values.astype(np.int64)
        if self.index_coding == "delta":
            if (index[..., 1:] < 1).any():
                raise ValueError("index holds a delta-coded gap < 1 (classes not sorted and distinct)")
            index = index.cumsum(-1)
        elif (np.diff(np.sort(index, -1), axis=-1) < 1).any():
            raise ValueError("index repeats a class within a view")
        if index.min() < 0 or index.max() >= self.num_classes:
            raise ValueError(f"index decodes to class {int(index.min() if index.min() < 0 else index.max())}, "
                             f"outside [0, {self.num_classes})")

    def encode(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``x [B, C]`` logits (any float dtype) -> payload of numpy arrays with leading dim B."""
        if x.shape[-1] != self.num_classes:
            raise ValueError(f"codec expects {self.num_classes} classes, teacher gave {x.shape[-1]}")
        x = x.float()
        values, indices = x.topk(self.k, dim=-1)
        lse = torch.logsumexp(x, dim=-1)
        if self.index_coding == "delta":
            indices, order = indices.sort(dim=-1)
            values = values.gather(-1, order)
        index = indices.cpu().numpy().astype(np.int64)
        if self.index_coding == "delta":
            index[:, 1:] = np.diff(index, axis=-1)
        payload = {"index": index.astype(self.index_dtype)}
        if self.precision == "fp16":
            return {**payload, "values": values.half().cpu().numpy(), "lse": lse.cpu().numpy()}
        top = values.max(-1).values
        gap = top[:, None] - values
        scale = gap.max(-1).values.clamp_min(1e-6).half()  # quantise with the stored (rounded) scale
        levels = 2**self.value_bits - 1
        quantised = (torch.sqrt(gap / scale.float()[:, None]) * levels).round().clamp(0, levels).to(torch.uint8)
        return {**payload, "values": quantised.cpu().numpy(), "scale": scale.cpu().numpy(),
                "lse": (lse - top).half().cpu().numpy()}

    def log_probs(self, payload: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Payload -> (class indices ``[B, k]`` int64, their log-probabilities ``[B, k]`` float32)."""
        index = payload["index"].long()
        if self.index_coding == "delta":
            index = index.cumsum(-1)
        if self.precision == "fp16":
            return index, payload["values"].float() - payload["lse"].float()[:, None]
        levels = 2**self.value_bits - 1
        relative = -(payload["values"].float() / levels) ** 2 * payload["scale"].float()[:, None]
        return index, relative - payload["lse"].float()[:, None]

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Payload -> dense ``[B, C] float32`` log-probabilities at T=1; softmax(dense / T) is the target at T.

        Top-k classes keep their stored log-probability; every other class gets the one that spreads the
        residual mass ``1 - sum(top-k probs)`` uniformly.
        """
        index, log_p = self.log_probs(payload)
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True).clamp_min(0)  # rounding can push top-k mass past 1
        tail = self.num_classes - self.k
        dense = torch.empty(log_p.shape[0], self.num_classes, device=log_p.device)
        if tail:
            residual = (1.0 - log_p.exp().sum(-1)).clamp_min(1e-12)
            dense[:] = (torch.log(residual) - math.log(tail))[:, None]
        return dense.scatter_(1, index, log_p)

    def fidelity(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """KL(full softmax ‖ decoded) and top-1 agreement per view."""
        x = x.float()
        decoded = torch.log_softmax(self.round_trip(x), -1)
        log_p = torch.log_softmax(x, -1)
        kl = (log_p.exp() * (log_p - decoded)).sum(-1)
        return {"kl": kl, "top1_agreement": (decoded.argmax(-1) == x.argmax(-1)).float()}


TARGET_STREAM = 1  # Philox counter word 1 of a view's target draws; θ's draws use word 1 = 0: never the same numbers


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledLogitsCodec(Codec):
    """``samples`` class ids drawn per view from the teacher's softmax at ``temperature``: an unbiased sparse target.

    Top-k caches drop the tail, so their decoded target is biased (Anshumann et al., ACL 2025, "Sparse Logit
    Sampling"); ``samples`` draws of the teacher's distribution are unbiased: the empirical distribution
    ``counts / samples`` averages to the teacher's, and cross-entropy against it has the KL gradient in expectation.
    Stored per view: the distinct ids sorted and delta-coded ``index [samples]`` (uint16; padding repeats the last
    id: gap 0) and ``count [samples] uint8`` (padding 0). With ``proposal_temperature`` set, draws come from the
    softmax at that temperature (flatter: more distinct classes per byte) and ``log_weight [samples] float16``
    stores log p/q per id (p at ``temperature``), so decoding stays unbiased (not normalised per view).
    Draws are keyed per view by ``keys`` (seed, sample, view) with numpy's Philox: key (seed, sample), view in
    the counter, like θ, in another counter stream: a rebuild draws the same ids.
    """

    name: ClassVar[str] = "sampled_logits"
    kind: ClassVar[str] = "logits"
    decoded: ClassVar[str] = "empirical"
    samples: int
    num_classes: int
    temperature: float = 1.0
    proposal_temperature: float | None = None

    def __post_init__(self):
        if not 1 <= self.samples <= 255:
            raise ValueError(f"samples must be in [1, 255] (uint8 counts), got {self.samples}")
        if self.num_classes > 65535:
            raise ValueError(f"sampled_logits stores uint16 ids: at most 65535 classes, got {self.num_classes}")
        if self.temperature <= 0 or (self.proposal_temperature is not None and self.proposal_temperature <= 0):
            raise ValueError(f"temperatures must be > 0, got {self.temperature}, {self.proposal_temperature}")

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        n = (self.samples,)
        arrays = {"index": (n, np.dtype(np.uint16)), "count": (n, np.dtype(np.uint8))}
        return arrays | ({"log_weight": (n, np.dtype(np.float16))} if self.proposal_temperature else {})

    def check(self, name: str, values: np.ndarray) -> None:
        """Besides finite values: the ids decode into ``[0, num_classes)`` and a view's counts sum to ``samples``
        (else ``decode`` fails, or its target is not a distribution)."""
        super().check(name, values)
        if values.size == 0:
            return
        if name == "index":
            index = values.astype(np.int64).cumsum(-1)
            if index.min() < 0 or index.max() >= self.num_classes:
                raise ValueError(f"index decodes to class {int(index.min() if index.min() < 0 else index.max())}, "
                                 f"outside [0, {self.num_classes})")
        elif name == "count" and (values.astype(np.int64).sum(-1) != self.samples).any():
            raise ValueError(f"count of a view does not sum to samples={self.samples}")

    def draw(self, x: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        """``samples`` class ids ``[B, samples]`` int64 per view, by inverse CDF on float64 Philox uniforms."""
        proposal = torch.softmax(x.double() / (self.proposal_temperature or self.temperature), -1)
        cdf = proposal.cumsum(-1)
        keys = np.asarray(keys, dtype=np.uint64)
        counter = np.zeros((len(keys), 4), dtype=np.uint64)
        counter[:, 1], counter[:, 2] = TARGET_STREAM, keys[:, 2]
        uniform = torch.from_numpy(philox_uniform(keys[:, :2], counter, self.samples)).to(cdf.device)
        return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_max(self.num_classes - 1)

    def encode(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``x [B, C]`` logits, ``keys [B, 3]`` (seed, sample, view) -> payload with leading dim B."""
        if x.shape[-1] != self.num_classes:
            raise ValueError(f"codec expects {self.num_classes} classes, teacher gave {x.shape[-1]}")
        if keys is None or len(keys) != len(x):
            raise ValueError("sampled_logits draws per view: encode needs keys [B, 3] (seed, sample, view)")
        x = x.float()
        drawn = self.draw(x, keys).sort(-1).values
        first = torch.ones_like(drawn, dtype=torch.bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        slot = first.long().cumsum(-1) - 1  # the distinct id's position among the view's distinct ids
        index = drawn[:, -1:].expand_as(drawn).scatter(1, slot, drawn)  # padding repeats the last id
        count = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
        delta = torch.cat([index[:, :1], index.diff(dim=-1)], -1)
        payload = {"index": delta.cpu().numpy().astype(np.uint16), "count": count.cpu().numpy().astype(np.uint8)}
        if self.proposal_temperature:
            log_w = (torch.log_softmax(x / self.temperature, -1) - torch.log_softmax(x / self.proposal_temperature, -1))
            payload["log_weight"] = (log_w.gather(1, index) * (count > 0)).half().cpu().numpy()
        return payload

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Payload -> the empirical target ``[B, C] float32`` (probabilities at ``temperature``, sum 1 without a
        proposal; importance-weighted, sum 1 in expectation, with one)."""
        index = payload["index"].long().cumsum(-1)
        mass = payload["count"].float() / self.samples
        if "log_weight" in payload:
            mass = mass * payload["log_weight"].float().exp()
        return torch.zeros(index.shape[0], self.num_classes, device=index.device).scatter_add_(1, index, mass)

    def fidelity(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Per view: total variation to the teacher's softmax at ``temperature`` (an empirical target has no finite
        KL(teacher ‖ ·): it omits classes), KL(empirical ‖ teacher) (≈ (distinct ids − 1) / 2N: the sampling noise,
        no bias) and whether the most drawn class is the teacher's top-1."""
        x = x.float()
        empirical = self.round_trip(x, keys)
        log_p = torch.log_softmax(x / self.temperature, -1)
        kl = torch.where(empirical > 0, empirical * (empirical.clamp_min(1e-30).log() - log_p), 0.0).sum(-1)
        return {"tv": 0.5 * (empirical - log_p.exp()).abs().sum(-1), "kl_empirical": kl,
                "top1_agreement": (empirical.argmax(-1) == x.argmax(-1)).float()}


def bias_z2_per_dof(decoded_sum: torch.Tensor, teacher: torch.Tensor, draws: int, repeats: int = 1,
                    floor: float = 5.0) -> float:
    """Is a target unbiased? ``decoded_sum [C]``: decoded targets (probabilities) summed over views, each view
    decoded ``repeats`` times (draws keyed apart); ``teacher [V, C]``: those views' teacher probabilities. Each
    class's pooled mass x ``draws`` (a top-k target: pseudo-counts at the same N) against its expectation under
    ``draws`` multinomial draws per view, scaled by that exact variance N·Σ p(1 - p) (Pearson's Poisson E would
    overstate it for a confident teacher); classes expected below ``floor`` merged into one bin. Mean z² per bin:
    ≈ 1 for unbiased draws however many views; a biased target's grows in proportion to the views."""
    teacher = teacher.double()
    observed, expected = draws * decoded_sum.double(), draws * repeats * teacher.sum(0)
    variance = draws * repeats * (teacher * (1 - teacher)).sum(0)
    keep = expected >= floor
    o, e, v = (torch.cat([x[keep], x[~keep].sum()[None]]) for x in (observed, expected, variance))
    return float(((o - e)[v > 0] ** 2 / v[v > 0]).mean())


def _quantise_rows(x: torch.Tensor, precision: str) -> dict[str, np.ndarray]:
    """Rows of ``x [..., D]`` as float16, or int8 with a float16 absmax scale per row."""
    if precision == "fp16":
        return {"values": x.half().cpu().numpy()}
    scale = (x.abs().amax(-1) / 127).clamp_min(1e-12).half()
    values = (x / scale.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return {"values": values.cpu().numpy(), "scale": scale.cpu().numpy()}


def _dequantise_rows(payload: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
    values = payload["values"].float()
    return values if precision == "fp16" else values * payload["scale"].float()[..., None]


def _row_arrays(shape: tuple[int, ...], precision: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    if precision == "fp16":
        return {"values": (shape, np.dtype(np.float16))}
    return {"values": (shape, np.dtype(np.int8)), "scale": (shape[:-1], np.dtype(np.float16))}


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingCodec(Codec):
    """A global feature vector ``[D]``: float16, or int8 with a per-vector float16 scale (4x smaller than fp32)."""

    name: ClassVar[str] = "embedding"
    kind: ClassVar[str] = "embedding"
    dim: int
    precision: str = "int8"

    def __post_init__(self):
        _check_precision(self.precision, ("fp16", "int8"))

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return _row_arrays((self.dim,), self.precision)

    def encode(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``x [B, D]`` -> payload."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"codec expects {self.dim}-d embeddings, teacher gave {x.shape[-1]}")
        return _quantise_rows(x.float(), self.precision)

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Payload -> ``[B, D] float32``."""
        return _dequantise_rows(payload, self.precision)

    def fidelity(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        return {"cosine": F.cosine_similarity(self.round_trip(x), x.float(), dim=-1)}


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchCodec(Codec):
    """A feature map ``[C, h, w]`` average-pooled to ``grid x grid``, stored channels-last per position.

    int8 values with one float16 scale per position vector (or float16). Pooling is part of the
    target's definition (e.g. DINOv2 tokens or a CNN's last map at 4x4), not an approximation.
    """

    name: ClassVar[str] = "patch"
    kind: ClassVar[str] = "patch"
    channels: int
    grid: int
    precision: str = "int8"

    def __post_init__(self):
        _check_precision(self.precision, ("fp16", "int8"))

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return _row_arrays((self.grid, self.grid, self.channels), self.precision)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, C, grid, grid]`` float32 (the target before quantisation)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"codec expects feature maps [B, {self.channels}, h, w], teacher gave {tuple(x.shape)}")
        x = x.float()
        return x if x.shape[-2:] == (self.grid, self.grid) else F.adaptive_avg_pool2d(x, self.grid)

    def encode(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return _quantise_rows(self.pool(x).permute(0, 2, 3, 1), self.precision)

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Payload -> ``[B, C, grid, grid] float32``."""
        return _dequantise_rows(payload, self.precision).permute(0, 3, 1, 2)

    def fidelity(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Cosine of every position vector after the round trip (``[B * grid²]``)."""
        pooled = self.pool(x)
        cosine = F.cosine_similarity(self.round_trip(x), pooled, dim=1)
        return {"cosine": cosine.flatten()}


@register_codec
@dataclasses.dataclass(frozen=True, kw_only=True)
class SegTopKLogitsCodec(Codec):
    """Per-pixel logits ``[C, height, width]`` (1/8 of the view for DeepLab heads) as ``topk_logits`` at every
    position: the same top-k + log-sum-exp math and decoding, arrays ``[height, width, ...]`` per view.

    Class indices take one byte when ``num_classes <= 256`` (delta gaps and plain ids both fit), the largest
    saving per pixel after the values themselves. ``dense_bytes_per_view`` is what float16 logits would cost.
    """

    name: ClassVar[str] = "seg_topk_logits"
    kind: ClassVar[str] = "seg_logits"
    decoded: ClassVar[str] = "log_probs"
    k: int
    num_classes: int
    height: int
    width: int
    precision: str = "uint8"
    value_bits: int = 6
    index_coding: str = "delta"

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"logit map must be at least 1x1, got {self.height}x{self.width}")
        self.pixel  # noqa: B018  validates k, precision, value_bits and index_coding

    @property
    def pixel(self) -> TopKLogitsCodec:
        """The codec of one position's ``[C]`` logits."""
        return TopKLogitsCodec(k=self.k, num_classes=self.num_classes, precision=self.precision,
                               value_bits=self.value_bits, index_coding=self.index_coding)

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.num_classes <= 256 else self.pixel.index_dtype

    @property
    def dense_bytes_per_view(self) -> int:
        return self.num_classes * self.height * self.width * 2

    def arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        grid = (self.height, self.width)
        arrays = {name: (grid + shape, dtype) for name, (shape, dtype) in self.pixel.arrays().items()}
        return {**arrays, "index": ((*grid, self.k), self.index_dtype)}

    def check(self, name: str, values: np.ndarray) -> None:
        """``topk_logits.check`` at every position (the k indices are the last axis here too)."""
        self.pixel.check(name, values)

    def encode(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``x [B, C, height, width]`` logits -> payload with leading dims ``[B, height, width]``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.num_classes, self.height, self.width):
            raise ValueError(f"codec expects logit maps [B, {self.num_classes}, {self.height}, {self.width}], "
                             f"teacher gave {tuple(x.shape)}")
        payload = self.pixel.encode(x.permute(0, 2, 3, 1).reshape(-1, self.num_classes))
        payload["index"] = payload["index"].astype(self.index_dtype)
        return {name: a.reshape(len(x), self.height, self.width, *a.shape[1:]) for name, a in payload.items()}

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Payload -> dense ``[B, C, height, width] float32`` log-probabilities at T=1 (``topk_logits.decode``)."""
        batch = payload["index"].shape[0]
        flat = {name: a.reshape(-1, *a.shape[3:]) for name, a in payload.items()}
        dense = self.pixel.decode(flat)
        return dense.reshape(batch, self.height, self.width, self.num_classes).permute(0, 3, 1, 2)

    def fidelity(self, x: torch.Tensor, keys: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Per-view mean over pixels of KL(full softmax ‖ decoded) and of top-1 agreement (``[B]`` each)."""
        per_pixel = self.pixel.fidelity(x.float().permute(0, 2, 3, 1).reshape(-1, self.num_classes))
        return {metric: values.reshape(len(x), -1).mean(-1) for metric, values in per_pixel.items()}
