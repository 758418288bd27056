"""Replay a reinforced store: each stored view re-rendered from its θ record, with its cached targets.

This is the one reader of stores for training, benchmarks and tests. It reopens the transfer set
and checks its fingerprint against the manifest (changed images would silently break replay),
rebuilds the augmentation policy from the manifest (refusing an op table that changed), and
yields batches of ``(view, targets)``: the view rendered by the same ``apply`` the build used, at
the student's size (at the teacher's size it is bit-identical to what the teacher saw).

``views=K`` replays only the first K stored views: the policy's RNG is keyed by (seed, sample, view),
so they are exactly the views a K-view build would have stored (the views ablation needs one build).
``online=True`` is the uncached ceiling: every epoch renders a view never stored (view index
K + epoch) at both the teacher's and the student's size, for a teacher run in the training loop.

A webdataset store (``stores.wds``) carries its images, θ and targets in tar shards: ``open_replay`` gives
a ``StreamReplay`` instead, whose ``batches(n)`` stream the same batches through webdataset (no transfer
set, no random access); ``train.distill`` reads either through the same loop.

Example:
    >>> replay = open_replay("runs/store", targets=["logits"], size=32)
    >>> replay.set_epoch(0)
    >>> batch = replay.__getitems__([0, 1, 2])       # views uint8 [3, 3, 32, 32], index, view, targets
    >>> log_probs = replay.decode(batch["targets"])["logits"]
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from reinforce.augment import CropFlip, policy_from_record
from reinforce.sources import Source, declared_size, load_image_bytes, open_source
from stores.manifest import WDS_FORMAT
from stores.store import THETA, ReinforcedStore, StoreCorruptError, StoreFormatError, as_tensor, open_store
from stores.untrusted import printable
from stores.wds import ShardSample, read_shard

__all__ = ["Replay", "ReplayDataset", "StreamReplay", "open_replay", "transfer_set"]


class Replay:
    """What both readers share: the policy, the targets read, the view each sample shows in an epoch (a function
    of (seed, epoch, sample) only), one render path and target decoding."""

    def __init__(self, store: ReinforcedStore, policy: CropFlip, indices: np.ndarray, targets: tuple[str, ...],
                 size: int, seed: int, views: int | None = None):
        self.store, self.policy = store, policy
        self.indices, self.targets, self.size, self.seed = indices, targets, size, seed
        stored = store.manifest.views
        if views is not None and not 1 <= views <= stored:
            raise ValueError(f"views={views}: the store {str(store.path)!r} holds {stored} views per sample")
        self.views = views or stored
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Pick each sample's view for ``epoch``: a function of (seed, epoch, sample index) only."""
        rng = np.random.default_rng([self.seed, epoch])
        self.epoch = epoch
        self.view_of = rng.integers(0, self.views, size=int(self.indices.max(initial=0)) + 1)

    def render(self, samples: np.ndarray, views: np.ndarray, images: Iterable[torch.Tensor],
               stored: dict[str, Any]) -> dict[str, Any]:
        """Sample ``samples[i]``'s stored view ``views[i]`` re-rendered from its θ (``stored["theta"]``) at
        ``size``, with its encoded targets: the batch both readers yield."""
        records = self.policy.unpack(stored.pop(THETA))
        rendered = [self.policy.apply(image, theta, size=self.size) for image, theta in zip(images, records)]
        targets = {t: {a: as_tensor(v) for a, v in arrays.items()} for t, arrays in stored.items()}
        return {"views": torch.stack(rendered), "index": torch.from_numpy(samples), "view": torch.from_numpy(views),
                "targets": targets}

    def decode(self, targets: dict[str, dict[str, torch.Tensor]],
               device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Encoded targets of a batch -> ``{target: float32 tensor}`` on ``device`` (decode where it is cheap)."""
        return {name: self.store.decode(name, payload, device) for name, payload in targets.items()}


class ReplayDataset(Replay, Dataset):
    """Position p -> ok sample ``indices[p]`` of a zarr store: one stored view re-rendered at ``size`` + its
    encoded targets, the image loaded from the transfer set.

    Each epoch shows every sample once, through one of its first ``views`` stored views chosen from
    (seed, epoch, sample) only, or (``online``) through a fresh view with no cached targets. Batches
    come through ``__getitems__`` so a batch's targets cost one ``store.read``. Holds only numpy
    state (no polars), so fork-based DataLoader workers are safe.
    """

    def __init__(self, store: ReinforcedStore, source: Source, policy: CropFlip, indices: np.ndarray,
                 targets: tuple[str, ...], size: int, seed: int, views: int | None = None, online: bool = False):
        super().__init__(store, policy, indices, targets, size, seed, views)
        self.source, self.online = source, online

    def __getitem__(self, position: int) -> dict[str, Any]:
        batch = self.__getitems__([position])
        return {key: {t: {a: v[0] for a, v in arrays.items()} for t, arrays in value.items()} if key == "targets"
                else value[0] for key, value in batch.items()}

    def __getitems__(self, positions: list[int]) -> dict[str, Any]:
        """``{"views": uint8 [B, 3, S, S], "index": [B], "view": [B], "targets": {target: {array: [B, ...]}}}``;
        online: ``"teacher_views"`` (uint8, the teacher's size) instead of targets."""
        samples = self.indices[np.asarray(positions, dtype=np.int64)]
        if self.online:
            return self._fresh(samples)
        views = self.view_of[samples]
        stored = self.store.read(samples, views, targets=self.targets)
        return self.render(samples, views, (self.source.load(int(i)) for i in samples), stored)

    def _fresh(self, samples: np.ndarray) -> dict[str, Any]:
        """This epoch's never-stored view of each sample, drawn as the build draws views, at both sizes."""
        view, seed = self.store.manifest.views + self.epoch, self.store.manifest.content.seed
        student, teacher = [], []
        for i in samples.tolist():
            image = self.source.load(i)
            theta = self.policy.sample(seed, i, view, image.shape[-2], image.shape[-1])
            teacher.append(self.policy.apply(image, theta))
            student.append(self.policy.apply(image, theta, size=self.size))
        return {"views": torch.stack(student), "teacher_views": torch.stack(teacher),
                "index": torch.from_numpy(samples), "view": torch.full((len(samples),), view), "targets": {}}



class StreamReplay(Replay):
    """A webdataset store streamed: ``batches(n)`` is an endless stream of the batches ``ReplayDataset``
    yields, image and θ and targets all from the tar shards (the transfer set is not needed).

    Shards are drawn with replacement from an RNG keyed by (seed, epoch, rank, DataLoader worker), so every
    rank and worker reads its own reproducible stream, and samples are shuffled in a buffer of
    ``shuffle_buffer``; the loader cuts the stream to the same number of batches on every rank.
    """

    shuffle_buffer = 1000

    def batches(self, batch_size: int) -> wds.DataPipeline:
        """Endless batches of ``batch_size`` (an IterableDataset for ``wds.WebLoader``); each iteration reads
        the epoch set last, so forked workers follow ``set_epoch``."""
        return wds.DataPipeline(self._samples, wds.batched(batch_size, collation_fn=self._collate, partial=False))

    def _samples(self) -> Iterator[ShardSample]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
        shards, manifest = self.store.shards, self.store.manifest
        stream = (sample for _ in itertools.count() for sample in
                  read_shard(self.store.location, shards[rng.randrange(len(shards))], manifest, self.targets))
        yield from wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(stream)

    def _collate(self, samples: list[ShardSample]) -> dict[str, Any]:
        """Decoded samples -> the batch: each sample's view for this epoch, rendered."""
        indices = np.array([s.index for s in samples], dtype=np.int64)
        unusable = indices[~self.store.usable[indices]]  # read_shard checked the range
        if len(unusable):
            raise StoreCorruptError(f"store {self.store.path}: shards hold sample {unusable[0]}, which "
                                    f"samples.parquet marks skipped; run `python -m stores verify {self.store.path}`")
        views = self.view_of[indices]
        per_view = [s.stored() for s in samples]
        stored = {THETA: np.stack([p[THETA][v] for p, v in zip(per_view, views)]),
                  **{t: {a: np.stack([p[t][a][v] for p, v in zip(per_view, views)]) for a in per_view[0][t]}
                     for t in self.targets}}
        return self.render(indices, views, (_image(self.store, s) for s in samples), stored)


def _image(store: ReinforcedStore, sample: ShardSample) -> torch.Tensor:
    """A shard sample's image decoded; bytes that are no image are a damaged store, named in one line."""
    try:
        return load_image_bytes(sample.image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise StoreCorruptError(f"store {store.path}: sample {sample.index}'s image does not decode "
                                f"({type(error).__name__}); run `python -m stores verify {store.path}`") from None


def open_replay(store: str | os.PathLike | ReinforcedStore, *, targets: list[str] | tuple[str, ...] | None = None,
                size: int | None = None, seed: int = 0, views: int | None = None, online: bool = False,
                cache_bytes: int = 256 << 20) -> ReplayDataset | StreamReplay:
    """The replay of ``store`` over its usable samples: a ``ReplayDataset`` (random access) for a zarr store, a
    ``StreamReplay`` for a webdataset store (``layout.format "wds"``); both yield the same batches.

    Args:
        targets: targets to read (default: all the store holds); others are never opened.
        size: render views at this size (default: the teacher's, i.e. the stored view size).
        seed: keys the per-epoch choice of view.
        views: replay only the first ``views`` stored views of each sample (default: all).
        online: fresh views and no cached targets (the teacher runs in the training loop; zarr stores only).
    """
    store = store if isinstance(store, ReinforcedStore) else open_store(store, cache_bytes=cache_bytes)
    content = store.manifest.content
    chosen = tuple(store.targets if targets is None else targets)
    for name in chosen:
        store.codec(name)  # unknown target: ValueError naming what the store holds
    policy = policy_from_record(content.policy.to_dict())
    ok = np.flatnonzero(store.usable).astype(np.int64)  # the sample table checked, kept as numpy before any fork
    if len(ok) == 0:
        raise ValueError(f"store {str(store.path)!r} has no usable samples")
    size = size or content.teacher.input_size
    if store.manifest.format == WDS_FORMAT:
        if online:
            raise ValueError(f"--online renders fresh views from the transfer set; {str(store.path)!r} is a "
                             "webdataset store: use its zarr store")
        return StreamReplay(store, policy, ok, chosen, size, seed, views)
    return ReplayDataset(store, transfer_set(store), policy, ok, chosen, size, seed, views, online)


def transfer_set(store: ReinforcedStore) -> Source:
    """The store's transfer set, reopened from its spec and checked unchanged (changed images break replay)."""
    spec, recorded = store.manifest.content.transfer_set.spec, store.manifest.num_samples
    declared = declared_size(spec)
    if declared is not None and declared != recorded:  # checked before the spec materialises anything
        raise StoreFormatError(f"{store.location.where('manifest.json')}: transfer set {printable(spec)!r} "
                               f"declares {declared} samples, the store records {recorded}")
    source = open_source(spec)
    if source.fingerprint() != store.manifest.content.transfer_set.fingerprint:
        raise ValueError(f"transfer set {spec!r} no longer matches the store {str(store.path)!r} "
                         "(fingerprint differs): the images changed since the build")
    return source
