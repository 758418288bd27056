"""Pixel-level near-copy check of de-contamination: normalised correlation of canonical grayscale thumbnails, with
small crops of the task image tried, beside the embedding similarity.

Why: a small encoder scores a resized, re-encoded copy of a 28 px task image below the 0.95 leak threshold about a
third of the time (docs/retrieval.md). Pixel correlation of zero-mean, unit-norm thumbnails ignores brightness and
contrast, barely moves under resizing, JPEG or gamma, and, with the task image cropped by up to 2/28 of a side on
each side, survives small crops. A 64-bit DCT pHash was tried first and is too coarse for centred look-alike
images (Fashion-MNIST: 1.5 % of distinct images within 2 bits at 78 % recall, benchmarks/decontam.py).
Two stages, both batched matmuls: the ``CANDIDATES`` nearest task images by plain 16 px correlation, then the best
correlation over ``CROPS`` crops of each candidate at 32 px.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from reinforce.progress import progress_bar
from reinforce.sources import Source

__all__ = ["NEAR_COPY_THRESHOLD", "THUMBNAIL", "nearest_copies", "thumbnails"]

THUMBNAIL = 40  # canonical grayscale thumbnail side (px), stored uint8: crops of it are cut at sub-pixel boxes
COARSE, FINE = 16, 32  # compared sides: candidate search, then the crop-aware check
CANDIDATES = 10  # task images checked per query in the fine stage
CROP_FRACTIONS = (0.0, 1 / 28, 2 / 28)  # cut from each side of a task image: 81 crops
NEAR_COPY_THRESHOLD = 0.9925  # default correlation threshold; chosen on validation plants (benchmarks/decontam.py)
BLOCK = 32  # queries per fine-stage tile: BLOCK x CANDIDATES x 81 x FINE² floats


def thumbnail(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> uint8 ``[THUMBNAIL, THUMBNAIL]``: grayscale (mean of channels), resized with
    antialiasing, so copies at any resolution land on nearly the same thumbnail."""
    gray = image.float().mean(dim=0, keepdim=True)[None]
    small = F.interpolate(gray, size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True, align_corners=False)
    return small[0, 0].round().clamp(0, 255).to(torch.uint8)


def thumbnails(source: Source, indices: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Thumbnails uint8 ``[N, THUMBNAIL, THUMBNAIL]`` of ``source``'s images (``indices``: those only) and which
    decoded, bool ``[N]``: an image that fails to decode (its vectors are zero too) never matches."""
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    thumbs = torch.zeros(len(indices), THUMBNAIL, THUMBNAIL, dtype=torch.uint8)
    ok = np.ones(len(indices), bool)
    bar = progress_bar(total=len(indices), unit="image", desc="near-copy thumbnails")
    for row, i in enumerate(indices.tolist()):
        try:
            thumbs[row] = thumbnail(source.load(i))
        except Exception:  # a corrupt image: reported by the embedding pass, never retrieved
            ok[row] = False
        bar.update(1)
    bar.close()
    return thumbs, ok


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``[..., P]`` -> zero-mean, unit-norm rows (flat rows stay zero): correlation is then an inner product."""
    centred = pixels - pixels.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _plain(thumbs: torch.Tensor, side: int) -> torch.Tensor:
    """float32 ``[N, side²]`` normalised rows of whole thumbnails at ``side`` px."""
    small = F.interpolate(thumbs.float()[:, None], size=(side, side), mode="area")
    return _normalise(small.reshape(len(thumbs), -1))


def _crops(thumbs: torch.Tensor, fractions: tuple[float, ...] = CROP_FRACTIONS) -> torch.Tensor:
    """float32 ``[N, V, FINE²]`` normalised rows of every crop cutting one of ``fractions`` from each side (V =
    len(fractions)⁴), resized to FINE by one resampler, so the uncropped view of a copy matches its original's."""
    cuts = torch.tensor(list(itertools.product(fractions, repeat=4))) * THUMBNAIL  # left, top, right, bottom
    boxes = torch.stack([cuts[:, 0], cuts[:, 1], THUMBNAIL - cuts[:, 2], THUMBNAIL - cuts[:, 3]], dim=1)
    rois = torch.cat([torch.arange(len(thumbs)).repeat_interleave(len(boxes))[:, None].float(),
                      boxes.repeat(len(thumbs), 1)], dim=1)
    cut = roi_align(thumbs.float()[:, None], rois, output_size=FINE, sampling_ratio=2, aligned=True)
    return _normalise(cut.reshape(len(thumbs), len(boxes), -1))


def nearest_copies(queries: torch.Tensor, query_ok: np.ndarray, task: torch.Tensor, task_ok: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each query thumbnail's best crop-aware correlation with a task thumbnail: correlations float32 ``[Q]`` (-1
    where either failed to decode) and task rows int64 ``[Q]`` (-1: none)."""
    corr, rows = np.full(len(queries), -1.0, np.float32), np.full(len(queries), -1, np.int64)
    valid = np.flatnonzero(task_ok)
    if not len(valid) or not query_ok.any():
        return corr, rows
    task = task[torch.from_numpy(valid)]
    coarse = _plain(task, COARSE)
    k = min(CANDIDATES, len(valid))
    for start in range(0, len(queries), BLOCK):
        block = queries[start: start + BLOCK]
        candidates = (_plain(block, COARSE) @ coarse.T).topk(k, dim=1).indices  # [B, k]
        crops = _crops(task[candidates.reshape(-1)]).reshape(len(block), k, -1, FINE * FINE)
        scores = torch.einsum("bp,bkvp->bkv", _crops(block, (0.0,))[:, 0], crops).amax(dim=2)  # [B, k]
        best = scores.argmax(dim=1)
        corr[start: start + len(block)] = scores.gather(1, best[:, None])[:, 0].numpy()
        rows[start: start + len(block)] = valid[candidates.gather(1, best[:, None])[:, 0].numpy()]
    corr[~query_ok], rows[~query_ok] = -1.0, -1
    return corr, rows
