"""``retrieved:FILE.parquet``: crops chosen by ``python -m reinforce.retrieve`` (so is FILE.parquet with ``theta``).

Row i is the crop of gallery image ``uri`` cut by its θ record at source resolution (box, flip, RandAugment ops:
the row's own policy, ``CropFlip.cut``), so the build's view augmentation runs on the retrieved crop and replay
cuts the same pixels; the manifest's bytes are the content id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from reinforce.augment import AugParams, CropFlip, policy_from_record
from reinforce.sources.files import load_file
from reinforce.sources.registry import Source, register_source

__all__ = ["RETRIEVED_COLUMNS", "RetrievedCrops", "open_retrieved"]

RETRIEVED_COLUMNS = ("key", "uri", "theta", "policy")


@dataclasses.dataclass(frozen=True)
class RetrievedCrops:
    """The loader of a retrieved source: ``retrieved:MANIFEST#ROW`` -> uint8 ``[3, h, w]``, the row's crop of its
    gallery image (no resampling). It holds what the manifest said when it was opened, so it pickles to workers."""

    uris: tuple[str, ...]  # [N] gallery image URIs
    crops: tuple[tuple[CropFlip, AugParams], ...]  # [N] each row's crop policy and θ

    def __call__(self, uri: str) -> torch.Tensor:
        row = int(uri.rpartition("#")[2])
        policy, theta = self.crops[row]
        image = load_file(self.uris[row])
        try:
            return policy.cut(image, theta)
        except ValueError as error:
            raise ValueError(f"{self.uris[row]}: {error}") from error


@register_source("retrieved")
def open_retrieved(path: str) -> Source:
    """A retrieval manifest's crops, one per row (see the module docstring)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"retrieval manifest {path!r} does not exist (python -m reinforce.retrieve writes one)")
    import polars as pl

    frame = pl.read_parquet(path)  # decoded here, in the parent: polars hangs in forked DataLoader workers
    missing = [c for c in RETRIEVED_COLUMNS if c not in frame.columns]
    if missing or frame.is_empty():
        raise ValueError(f"retrieval manifest {path!r} has no rows or lacks column(s) {missing}; "
                         "write it with python -m reinforce.retrieve")
    crops: dict[int, tuple[CropFlip, AugParams]] = {}
    for text, rows in frame.with_row_index().group_by("policy").agg("index").iter_rows():  # crops and queries
        policy = policy_from_record(json.loads(text))
        records = np.frombuffer(b"".join(frame["theta"][rows].to_list()), np.uint8).reshape(len(rows), -1)
        for row, theta in zip(rows, policy.unpack(records)):
            crops[row] = policy, theta
    loader = RetrievedCrops(tuple(frame["uri"].to_list()), tuple(crops[row] for row in range(len(frame))))
    keys = frame["key"].to_numpy().astype(str)
    return Source(f"retrieved:{path}", keys, np.array([f"retrieved:{path}#{i}" for i in range(len(loader.uris))]),
                  None, (), loader, hashlib.sha256(Path(path).read_bytes()).hexdigest())
