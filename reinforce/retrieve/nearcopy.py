"""Pixel-level near-copy check of de-contamination: normalised correlation of grayscale images at their own
resolution, with small crops and gamma curves of the task image tried, beside the embedding similarity.

Why: a small encoder scores a resized, re-encoded copy of a 28 px task image below the 0.95 leak threshold about a
third of the time (docs/retrieval.md). Pixel correlation of zero-mean, unit-norm images ignores brightness and
contrast and barely moves under JPEG. Three things decide whether the rest is caught (benchmarks/decontam.py):
- **crops are cut from the task image at its own resolution** (kept up to ``CANONICAL`` px), so a copy cropped by a
  few pixels meets the very pixels it was cut from, rather than a resampled thumbnail of them;
- **each task crop is first resampled to the copy's size**, then both go to ``FINE`` px by one resampler: a copy
  reduced to 14 px is not penalised for detail it cannot have, and one enlarged to 80 px (kept at 40) meets a task
  image enlarged the same way;
- gamma is not affine, so the uncropped task image is also tried under a few gamma curves (``GAMMAS``).
A 64-bit DCT pHash was tried first and is too coarse for centred look-alike images (Fashion-MNIST: 1.5 % of distinct
images within 2 bits at 78 % recall). Two stages, both batched: the ``CANDIDATES`` nearest task images by 16 px
correlation with 16 crops of each, then the best correlation over the variants of each candidate at ``FINE`` px.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from reinforce.progress import progress_bar
from reinforce.sources import Source

__all__ = ["CANONICAL", "NEAR_COPY_CONFIRM", "NEAR_COPY_THRESHOLD", "Thumbnails", "nearest_copies", "thumbnails"]

CANONICAL = 40  # longest side (px) an image is kept at for the check; larger images are reduced to it
COARSE, FINE = 16, 32  # compared sides: candidate search, then the crop-aware check
CANDIDATES = 10  # task images checked per query in the fine stage
CROP_FRACTIONS = (0.0, 1 / 28, 2 / 28)  # cut from each side of a task image: 81 crops
COARSE_CROP_FRACTIONS = (0.0, 2 / 28)  # the candidate search's crops (16): a cropped copy still finds its original
GAMMAS = (0.7, 1.4)  # curves v -> v ** g tried on the uncropped task image
# default correlation thresholds, chosen on validation plants (benchmarks/decontam.py): a near copy by pixels alone,
# and the correlation that confirms an embedding's possible leak
NEAR_COPY_THRESHOLD, NEAR_COPY_CONFIRM = 0.99, 0.9825
BLOCK = 32  # queries per fine-stage tile: BLOCK x CANDIDATES x variants x FINE² floats


@dataclasses.dataclass(frozen=True)
class Thumbnails:
    """Grayscale images for the check: ``pixels`` uint8 ``[N, CANONICAL, CANONICAL]``, image i in the top-left
    ``sizes[i]`` (height, width) and its edge pixels repeated beyond; ``ok`` bool ``[N]``: decoded."""

    pixels: torch.Tensor
    sizes: np.ndarray
    ok: np.ndarray

    def __len__(self) -> int:
        return len(self.ok)

    def __getitem__(self, rows: np.ndarray) -> Thumbnails:
        return Thumbnails(self.pixels[torch.from_numpy(rows)], self.sizes[rows], self.ok[rows])

    @staticmethod
    def concat(parts: list[Thumbnails]) -> Thumbnails:
        return Thumbnails(torch.cat([p.pixels for p in parts]), np.concatenate([p.sizes for p in parts]),
                          np.concatenate([p.ok for p in parts]))


def canonical(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> uint8 grayscale ``[h, w]`` (mean of channels): the image itself when its longest side
    is at most ``CANONICAL``, else reduced to that with antialiasing, aspect ratio kept."""
    gray = image.float().mean(dim=0)
    scale = CANONICAL / max(gray.shape)
    if scale < 1:
        size = tuple(max(1, round(side * scale)) for side in gray.shape)
        gray = F.interpolate(gray[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    return gray.round().clamp(0, 255).to(torch.uint8)


def thumbnails(source: Source, indices: np.ndarray | None = None) -> Thumbnails:
    """The check's images of ``source`` (``indices``: those only): an image that fails to decode (its vectors are
    zero too) is not ``ok`` and never matches."""
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    pixels = torch.zeros(len(indices), CANONICAL, CANONICAL, dtype=torch.uint8)
    sizes, ok = np.ones((len(indices), 2), np.int64), np.ones(len(indices), bool)
    bar = progress_bar(total=len(indices), unit="image", desc="near-copy thumbnails")
    for row, i in enumerate(indices.tolist()):
        try:
            gray = canonical(source.load(i))
        except Exception:  # a corrupt image: reported by the embedding pass, never retrieved
            ok[row] = False
        else:
            h, w = gray.shape
            pixels[row] = F.pad(gray[None, None].float(), (0, CANONICAL - w, 0, CANONICAL - h), mode="replicate")[0, 0]
            sizes[row] = h, w
        bar.update(1)
    bar.close()
    return Thumbnails(pixels, sizes, ok)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``[..., P]`` -> zero-mean, unit-norm rows (flat rows stay zero): correlation is then an inner product."""
    centred = pixels - pixels.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _render(images: torch.Tensor, which: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float ``[R, h, w]``: box r (x0, y0, x1, y1 in pixels) of image ``which[r]`` of ``images`` ``[N, S, S]``
    resampled to ``size``: bilinear at bin centres when enlarging, the average of ceil(box / size)² such samples per
    bin when reducing (pixel-exact for a box on the pixel grid at its own size)."""
    rois = torch.cat([which[:, None].float(), boxes.float()], dim=1)
    return roi_align(images[:, None].float(), rois, output_size=size, sampling_ratio=0, aligned=True)[:, 0]


def _full_boxes(sizes: np.ndarray) -> torch.Tensor:
    """``[N, 4]`` boxes covering each image."""
    return torch.tensor([[0, 0, w, h] for h, w in sizes.tolist()], dtype=torch.float32).reshape(-1, 4)


def _plain(thumbs: Thumbnails, side: int) -> torch.Tensor:
    """float32 ``[N, side²]`` normalised rows of whole images at ``side`` px."""
    rendered = _render(thumbs.pixels, torch.arange(len(thumbs)), _full_boxes(thumbs.sizes), (side, side))
    return _normalise(rendered.reshape(len(thumbs), -1))


def _crop_boxes(sizes: np.ndarray, fractions: tuple[float, ...]) -> torch.Tensor:
    """``[N, V, 4]``: per image, every crop cutting one of ``fractions`` from each side; the first is the whole
    image (``fractions`` start at 0)."""
    cuts = torch.tensor(list(itertools.product(fractions, repeat=4)))
    hw = torch.from_numpy(sizes).float()
    w, h = hw[:, 1, None], hw[:, 0, None]
    return torch.stack([cuts[:, 0] * w, cuts[:, 1] * h, w * (1 - cuts[:, 2]), h * (1 - cuts[:, 3])], dim=2)


def _render_crops(pixels: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float ``[N, V, h, w]``: box ``boxes[i, v]`` of image ``pixels[i]`` resampled to ``size``."""
    count, variants = boxes.shape[:2]
    cut = _render(pixels, torch.arange(count).repeat_interleave(variants), boxes.reshape(-1, 4), size)
    return cut.reshape(count, variants, *size)


def _task_variants(task: Thumbnails, rows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float32 ``[len(rows), V, FINE²]`` normalised: each crop of task image ``rows[i]`` resampled to ``size`` (the
    copy's size), then to FINE as the copy is, followed by the whole image under each of ``GAMMAS``."""
    crops = _render_crops(task.pixels[rows], _crop_boxes(task.sizes[rows.numpy()], CROP_FRACTIONS), size)
    if size != (FINE, FINE):
        flat = crops.reshape(-1, *size)  # every crop is now a whole image of the copy's size
        whole = torch.tensor([0.0, 0.0, size[1], size[0]]).expand(len(flat), 4)
        crops = _render(flat, torch.arange(len(flat)), whole, (FINE, FINE)).reshape(len(rows), -1, FINE, FINE)
    whole = crops[:, :1].clamp(0, 255) / 255
    variants = torch.cat([crops, *(255 * whole**gamma for gamma in GAMMAS)], dim=1)
    return _normalise(variants.flatten(2))


def _coarse_crops(task: Thumbnails) -> torch.Tensor:
    """float32 ``[N, V, COARSE²]`` normalised: the candidate search's crops of every task image."""
    crops = _render_crops(task.pixels, _crop_boxes(task.sizes, COARSE_CROP_FRACTIONS), (COARSE, COARSE))
    return _normalise(crops.flatten(2))


def nearest_copies(queries: Thumbnails, task: Thumbnails) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best correlation with a variant of a task image: correlations float32 ``[Q]`` (-1 where either
    failed to decode) and task rows int64 ``[Q]`` (-1: none)."""
    corr, rows = np.full(len(queries), -1.0, np.float32), np.full(len(queries), -1, np.int64)
    valid = np.flatnonzero(task.ok)
    if not len(valid) or not queries.ok.any():
        return corr, rows
    task = task[valid]
    coarse = _coarse_crops(task)  # [T, V, COARSE²]
    k = min(CANDIDATES, len(valid))
    for start in range(0, len(queries), BLOCK):
        block = queries[np.arange(start, min(start + BLOCK, len(queries)))]
        nearest = torch.einsum("bp,tvp->btv", _plain(block, COARSE), coarse).amax(dim=2)  # [B, T]
        candidates = nearest.topk(k, dim=1).indices  # [B, k]
        mine = _plain(block, FINE)  # [B, FINE²]
        scores = torch.empty(len(block), k)
        for size in {tuple(hw) for hw in block.sizes.tolist()}:  # variants resampled to the copy's size first
            members = torch.from_numpy(np.flatnonzero((block.sizes == size).all(axis=1)))
            variants = _task_variants(task, candidates[members].reshape(-1), size).reshape(len(members), k, -1,
                                                                                         FINE * FINE)
            scores[members] = torch.einsum("bp,bkvp->bkv", mine[members], variants).amax(dim=2)
        best = scores.argmax(dim=1)
        corr[start: start + len(block)] = scores.gather(1, best[:, None])[:, 0].numpy()
        rows[start: start + len(block)] = valid[candidates.gather(1, best[:, None])[:, 0].numpy()]
    corr[~queries.ok], rows[~queries.ok] = -1.0, -1
    return corr, rows

