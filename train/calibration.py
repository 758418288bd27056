"""Calibration of a classifier's probabilities: ECE, NLL, Brier and the reliability bins behind the ECE.

Few-label students are deployed on their confidences, and truncated (top-k) distillation targets are
where over-confidence comes from, so every evaluation reports calibration beside top-1. ECE is torchmetrics'
``MulticlassCalibrationError`` with 15 **equal-width** confidence bins (L1: the bins' |accuracy - confidence|
weighted by their share of images); the reliability bins use the same edges (``torch.linspace(0, 1, 16)``,
a confidence on an edge belongs to the bin below, as torchmetrics bins it), so the diagram shows what the
ECE sums.

Example:
    >>> scores = calibration(logits, labels)     # logits [N, C] float, labels [N] int64
    >>> scores["ece"], scores["nll"], scores["brier"], scores["reliability"]["accuracy"]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassCalibrationError

__all__ = ["ECE_BINS", "calibration", "pool_bins", "reliability_bins"]

ECE_BINS = 15  # equal-width


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width confidence bin: its edges, image count, mean confidence and accuracy (None when empty)."""
    edges = torch.linspace(0, 1, bins + 1)
    which = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, bins - 1)
    count = torch.bincount(which, minlength=bins)
    total_conf = torch.zeros(bins).index_add_(0, which, confidence.float())
    total_correct = torch.zeros(bins).index_add_(0, which, correct.float())

    def mean(total: torch.Tensor) -> list[float | None]:
        return [float(t / c) if c else None for t, c in zip(total, count)]
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": mean(total_conf),
            "accuracy": mean(total_correct)}


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """``logits [N, C]``, ``labels [N]`` -> ECE (15 equal-width bins, torchmetrics), NLL (mean nats), Brier (mean
    over images of the squared error summed over classes, in [0, 2]) and the reliability bins."""
    logits, labels = logits.float(), labels.long()
    probs = logits.softmax(-1)
    ece = MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=ECE_BINS, norm="l1")(probs, labels)
    brier = (probs - F.one_hot(labels, logits.shape[1]).float()).square().sum(-1).mean()
    confidence, predicted = probs.max(-1)
    return {"ece": float(ece), "nll": float(F.cross_entropy(logits, labels)), "brier": float(brier),
            "ece_bins": f"{ECE_BINS} equal-width",
            "reliability": reliability_bins(confidence, predicted == labels)}


def pool_bins(bins: list[dict[str, list]]) -> dict[str, list]:
    """Reliability bins of several evaluations (e.g. seeds) pooled: counts summed, means weighted by count."""
    count = [sum(b["count"][i] for b in bins) for i in range(len(bins[0]["count"]))]

    def pooled(key: str) -> list[float | None]:
        return [sum((b[key][i] or 0) * b["count"][i] for b in bins) / n if n else None for i, n in enumerate(count)]
    return {"edges": bins[0]["edges"], "count": count, "confidence": pooled("confidence"),
            "accuracy": pooled("accuracy")}
