"""Distillation losses by target kind, in a registry: KL for logits, cross-entropy against sampled (empirical)
logit targets, contrastive for embeddings, cosine for patches, per-pixel KL for segmentation logit maps.

A loss is an ``nn.Module`` because feature losses own learnable projections (trained with the
student, dropped after distillation). Each declares the target ``kind`` it reads and the student
output it compares (``logits``, ``embedding`` = pooled pre-logits features, ``feature_map`` = the
last feature map) and what its target is once decoded (``target``: a codec's ``decoded``, ``log_probs``,
``empirical`` or ``features``): ``loss_for`` pairs them, and a loss given a target it cannot read is refused
(KL against an empirical distribution that omits classes is infinite; ``sampled_ce`` reads probabilities, not
log-probabilities). ``DistillObjective`` holds the student and one weighted loss per target, so a DeepSpeed
engine trains projections and student together.

Example:
    >>> objective = DistillObjective(student, {"logits": create_loss("kl", temperature=2.0)})
    >>> total, parts = objective(views, {"logits": teacher_log_probs})
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_LOSS", "ContrastiveLoss", "CosineLoss", "DistillObjective", "KLLoss", "PixelKLLoss",
           "SampledCELoss", "create_loss", "kl_divergence", "list_losses", "loss_for", "register_loss"]

_LOSSES: dict[str, type[nn.Module]] = {}
DEFAULT_LOSS = {("logits", "log_probs"): "kl", ("logits", "empirical"): "sampled_ce",  # auto: (kind, decoded)
                ("embedding", "features"): "contrastive", ("patch", "features"): "cosine",
                ("seg_logits", "log_probs"): "pixel_kl"}


def register_loss(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make a loss constructible by its ``name``."""
    _LOSSES[cls.name] = cls
    return cls


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """A registered loss; ``kwargs`` are its constructor arguments (feature sizes, temperature)."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(list_losses())}")
    return _LOSSES[name](**kwargs)


def loss_for(name: str, kind: str, decoded: str) -> str:
    """The loss to distill a ``kind`` target that decodes to ``decoded`` (``name`` "auto": the default pairing),
    or a ValueError naming the loss that fits."""
    fits = DEFAULT_LOSS.get((kind, decoded))
    if name == "auto" and fits:
        return fits
    loss = _LOSSES.get(name)
    if loss is None:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(list_losses())}")
    if (loss.kind, loss.target) != (kind, decoded):
        raise ValueError(f"loss {name!r} reads {loss.kind} targets decoded to {loss.target}; this target is {kind} "
                         f"decoded to {decoded}: use --loss {fits or 'auto'}")
    return name


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over the batch (Hinton et al. scaling).

    ``teacher_logits`` may be any logits or log-probabilities (softmax is shift invariant).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


@register_loss
class KLLoss(nn.Module):
    """Task-oriented transfer: match the teacher's class distribution at temperature T."""

    name: ClassVar[str] = "kl"
    kind: ClassVar[str] = "logits"
    target: ClassVar[str] = "log_probs"
    student_output: ClassVar[str] = "logits"

    def __init__(self, temperature: float = 2.0, **_: Any):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_divergence(student, target, self.temperature)


@register_loss
class SampledCELoss(KLLoss):
    """``T² · CE(empirical, softmax(student / T))`` for targets drawn from the teacher (``sampled_logits``): the
    empirical distribution averages to softmax(teacher / T), so the gradient is the KL's in expectation (the value
    exceeds the KL by the target's entropy). T must be the temperature the store drew at (``train.distill`` passes
    it from the codec)."""

    name: ClassVar[str] = "sampled_ce"
    target: ClassVar[str] = "empirical"

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(student.float() / self.temperature, dim=-1)
        return -(target * log_q).sum(-1).mean() * self.temperature**2


@register_loss
class PixelKLLoss(KLLoss):
    """``kl`` at every position of a logit map ``[B, C, h, w]``, averaged over positions (not summed: the loss scale
    does not grow with the map). The student's map is resized to the stored one when it renders at another size.

    Stored teacher maps have no padding and no ignore index (views are whole resized crops, targets are the
    teacher's own predictions), so every position counts.
    """

    name: ClassVar[str] = "pixel_kl"
    kind: ClassVar[str] = "seg_logits"
    student_output: ClassVar[str] = "seg_logits"

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if student.shape[-2:] != target.shape[-2:]:
            student = F.interpolate(student, size=target.shape[-2:], mode="bilinear", align_corners=False)
        flat = [x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in (student, target)]
        return kl_divergence(*flat, self.temperature)


@register_loss
class ContrastiveLoss(nn.Module):
    """Task-agnostic transfer of a global embedding (Tian et al. 2020, as in the paper's §A.4).

    Student and teacher features are linearly projected into a shared ``dim``-d space (768 by default)
    and L2-normalised; each student view must pick its own teacher view among the batch's (InfoNCE,
    symmetric, temperature ``tau``).
    """

    name: ClassVar[str] = "contrastive"
    kind: ClassVar[str] = "embedding"
    target: ClassVar[str] = "features"
    student_output: ClassVar[str] = "embedding"

    def __init__(self, student_dim: int, teacher_dim: int, dim: int = 768, tau: float = 0.07, **_: Any):
        super().__init__()
        self.student_proj = nn.Linear(student_dim, dim)
        self.teacher_proj = nn.Linear(teacher_dim, dim)
        self.tau = tau

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        s = F.normalize(self.student_proj(student.float()), dim=-1)
        t = F.normalize(self.teacher_proj(target.float()), dim=-1)
        logits = s @ t.T / self.tau
        labels = torch.arange(len(s), device=s.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@register_loss
class CosineLoss(nn.Module):
    """Task-agnostic transfer of patch features: ``1 - cos`` per position after a 1x1 projection of the
    student's map to the teacher's channels; the teacher's map is resized to the student's grid."""

    name: ClassVar[str] = "cosine"
    kind: ClassVar[str] = "patch"
    target: ClassVar[str] = "features"
    student_output: ClassVar[str] = "feature_map"

    def __init__(self, student_channels: int, teacher_channels: int, **_: Any):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        projected = self.proj(student.float())
        target = target.float()
        if target.shape[-2:] != projected.shape[-2:]:
            target = F.interpolate(target, size=projected.shape[-2:], mode="bilinear", align_corners=False,
                                   antialias=target.shape[-1] > projected.shape[-1])
        return (1 - F.cosine_similarity(projected, target, dim=1)).mean()


class DistillObjective(nn.Module):
    """The student plus one weighted loss per target; ``forward(views, targets) -> (total, {target: loss})``."""

    def __init__(self, student: nn.Module, losses: dict[str, nn.Module], weights: dict[str, float] | None = None):
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in losses}

    def forward(self, views: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        outputs = self.student.forward_parts(views, {loss.student_output for loss in self.losses.values()})
        parts = {name: loss(outputs[loss.student_output], targets[name]) for name, loss in self.losses.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts
