"""Pixel-level near-copy check of de-contamination: a DCT perceptual hash (pHash) of each image's canonical grayscale
thumbnail, compared by Hamming distance.

Why beside the embedding similarity: a small encoder maps a resized, re-encoded copy of a 28 px task image below the
0.95 leak threshold about a third of the time (docs/retrieval.md), while the hash of the image's low frequencies
barely moves under resizing, JPEG, small crops or grey-level changes, as in dedup tools (imagededup, pHash).
Hashes are 64 bits packed as uint8 ``[N, 8]``; distances are computed blockwise with XOR + popcount.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from reinforce.progress import progress_bar
from reinforce.sources import Source

__all__ = ["HASH_BITS", "NEAR_COPY_DISTANCE", "THUMBNAIL", "hamming", "nearest_copies", "phash", "source_hashes"]

THUMBNAIL = 32  # canonical grayscale thumbnail side (px)
LOW = 8  # the LOW x LOW lowest DCT frequencies give the 64 bits
HASH_BITS = LOW * LOW
NEAR_COPY_DISTANCE = 12  # default Hamming threshold (<=): chosen on a validation set of plants (benchmarks/decontam.py)
BLOCK = 4096  # query rows per distance tile


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix float32 ``[n, n]``: ``D @ x`` transforms the columns of x."""
    k, i = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


def thumbnail(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> float32 ``[THUMBNAIL, THUMBNAIL]`` grayscale (mean of channels), resized with
    antialiasing, so a copy at any resolution lands on nearly the same thumbnail."""
    gray = image.float().mean(dim=0, keepdim=True)[None]
    return F.interpolate(gray, size=(THUMBNAIL, THUMBNAIL), mode="bilinear", antialias=True, align_corners=False)[0, 0]


def phash(thumbnails: torch.Tensor) -> np.ndarray:
    """float32 ``[N, T, T]`` thumbnails -> packed hashes uint8 ``[N, 8]``: bit i says whether low DCT coefficient i
    lies above the median of the 63 non-DC ones (DC bit always 0), so brightness and contrast cancel."""
    d = _dct_matrix(thumbnails.shape[-1])
    low = (d @ thumbnails @ d.T)[:, :LOW, :LOW].reshape(len(thumbnails), HASH_BITS)
    bits = low > low[:, 1:].median(dim=1, keepdim=True).values
    bits[:, 0] = False  # the DC term is mean brightness
    return np.packbits(bits.numpy(), axis=1)


def source_hashes(source: Source, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hashes uint8 ``[N, 8]`` of ``source``'s images (``indices``: those only) and which decoded (bool ``[N]``);
    an image that fails to decode gets a zero hash that never matches."""
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    thumbs = torch.zeros(len(indices), THUMBNAIL, THUMBNAIL)
    ok = np.ones(len(indices), bool)
    bar = progress_bar(total=len(indices), unit="image", desc="near-copy hashes")
    for row, i in enumerate(indices.tolist()):
        try:
            thumbs[row] = thumbnail(source.load(i))
        except Exception:  # a corrupt image: its vectors are zero too, and it is never retrieved
            ok[row] = False
        bar.update(1)
    bar.close()
    return phash(thumbs), ok


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances int32 ``[A, B]`` between packed hashes uint8 ``[A, 8]`` and ``[B, 8]``."""
    x = np.ascontiguousarray(a).view(np.uint64)[:, 0]
    y = np.ascontiguousarray(b).view(np.uint64)[:, 0]
    return np.bitwise_count(x[:, None] ^ y[None, :]).astype(np.int32)


def nearest_copies(queries: np.ndarray, query_ok: np.ndarray, base: np.ndarray, base_ok: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest base hash: distances int32 ``[Q]`` (HASH_BITS + 1 where either failed to decode) and base
    rows int64 ``[Q]`` (-1: none)."""
    dist = np.full(len(queries), HASH_BITS + 1, np.int32)
    rows = np.full(len(queries), -1, np.int64)
    if not len(base) or not base_ok.any():
        return dist, rows
    valid = np.flatnonzero(base_ok)
    for start in range(0, len(queries), BLOCK):
        tile = hamming(queries[start: start + BLOCK], base[valid])
        best = tile.argmin(axis=1)
        dist[start: start + BLOCK] = tile[np.arange(len(tile)), best]
        rows[start: start + BLOCK] = valid[best]
    dist[~query_ok], rows[~query_ok] = HASH_BITS + 1, -1
    return dist, rows
