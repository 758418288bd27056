"""Philox4x64-10 over whole arrays of counters: numpy's ``np.random.Philox`` block function, vectorised, so a
batch of views draws from per-view keyed streams without a Python loop (``philox_uniform`` equals
``np.random.Generator(np.random.Philox(key, counter)).random()`` draw for draw; tested)."""

from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)
_LOW, _SHIFT = np.uint64(0xFFFFFFFF), np.uint64(32)


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """High and low 64 bits of ``a * b`` (64 x 64 -> 128 bits from 32-bit halves; uint64 products wrap)."""
    a0, a1, b0, b1 = a & _LOW, a >> _SHIFT, b & _LOW, b >> _SHIFT
    cross = (a1 * b0 & _LOW) + (a0 * b1 & _LOW) + (a0 * b0 >> _SHIFT)
    return a1 * b1 + (a1 * b0 >> _SHIFT) + (a0 * b1 >> _SHIFT) + (cross >> _SHIFT), a * b


def philox_block(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """``counter [..., 4]``, ``key [..., 2]`` uint64 -> the 10-round Philox block ``[..., 4]`` uint64."""
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[..., 0], key[..., 1]
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + _W0, k1 + _W1
    return np.stack([c0, c1, c2, c3], axis=-1)


def philox_uniform(key: np.ndarray, counter: np.ndarray, n: int) -> np.ndarray:
    """``n`` float64 uniforms in [0, 1) per row: row r is numpy's ``Philox(key=key[r], counter=counter[r])``
    stream (the generator increments the counter before each block), 53 bits per double as numpy's ``random()``.

    ``key [B, 2]``, ``counter [B, 4]`` uint64 -> ``[B, n]`` float64.
    """
    blocks = -(-n // 4)
    counters = np.repeat(counter.astype(np.uint64)[:, None, :], blocks, axis=1)
    counters[..., 0] += np.arange(1, blocks + 1, dtype=np.uint64)  # word 0 never wraps for the counters we use
    raw = philox_block(counters, np.repeat(key.astype(np.uint64)[:, None, :], blocks, axis=1))
    return (raw.reshape(len(key), -1)[:, :n] >> np.uint64(11)) * (1.0 / 2**53)
