"""``FILE.parquet | FILE.csv``: a manifest with column ``uri`` (+ optional ``label``, ``key``). With a ``mask`` column
it lists image/mask pairs (``reinforce.sources.segmentation``); with ``theta``, retrieved crops
(``reinforce.sources.retrieved``). Relative URIs are relative to the manifest's folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from reinforce.sources.files import load_file, own_file_bytes
from reinforce.sources.registry import Source
from reinforce.sources.retrieved import open_retrieved
from reinforce.sources.segmentation import mask_manifest

__all__ = ["open_manifest"]


def open_manifest(path: str) -> Source:
    """The images a manifest lists, in its row order."""
    import polars as pl

    if not Path(path).exists():
        raise FileNotFoundError(f"manifest {path!r} does not exist")
    frame = pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path)
    if "uri" not in frame.columns:
        raise ValueError(f"manifest {path!r} needs a 'uri' column; it has {frame.columns}")
    if "theta" in frame.columns:  # a retrieval manifest lists crops, not whole images
        return open_retrieved(path)
    base = Path(path).parent
    uris = np.array([u if (":" in u and not Path(u).is_absolute()) or Path(u).is_absolute() else str(base / u)
                     for u in frame["uri"].to_list()])
    keys = np.array(frame["key"].to_list() if "key" in frame.columns else [str(u) for u in frame["uri"].to_list()])
    if "mask" in frame.columns:  # image/mask pairs: a segmentation source
        return mask_manifest(path, keys.tolist(), [Path(u) for u in uris], [base / m for m in frame["mask"].to_list()])
    labels = frame["label"].to_numpy().astype(np.int64) if "label" in frame.columns else None
    class_names = tuple(str(c) for c in range(int(labels.max()) + 1)) if labels is not None else ()
    content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Source(path, keys, uris, labels, class_names, load_file, content, file_bytes=own_file_bytes)
