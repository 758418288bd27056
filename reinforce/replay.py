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

Example:
    >>> replay = open_replay("runs/store", targets=["logits"], size=32)
    >>> replay.set_epoch(0)
    >>> batch = replay.__getitems__([0, 1, 2])       # views uint8 [3, 3, 32, 32], index, view, targets
    >>> log_probs = replay.decode(batch["targets"])["logits"]
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from reinforce.augment import CropFlip, policy_from_record
from reinforce.sources import Source, open_source
from stores.store import THETA, ReinforcedStore, as_tensor, open_store

__all__ = ["ReplayDataset", "open_replay"]


class ReplayDataset(Dataset):
    """Position p -> ok sample ``indices[p]``: one stored view re-rendered at ``size`` + its encoded targets.

    Each epoch shows every sample once, through one of its first ``views`` stored views chosen from
    (seed, epoch, sample) only, or (``online``) through a fresh view with no cached targets. Batches
    come through ``__getitems__`` so a batch's targets cost one ``store.read``. Holds only numpy
    state (no polars), so fork-based DataLoader workers are safe.
    """

    def __init__(self, store: ReinforcedStore, source: Source, policy: CropFlip, indices: np.ndarray,
                 targets: tuple[str, ...], size: int, seed: int, views: int | None = None, online: bool = False):
        self.store, self.source, self.policy = store, source, policy
        self.indices, self.targets, self.size, self.seed = indices, targets, size, seed
        stored = store.manifest.views
        if views is not None and not 1 <= views <= stored:
            raise ValueError(f"views={views}: the store {str(store.path)!r} holds {stored} views per sample")
        self.views, self.online = views or stored, online
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Pick each sample's view for ``epoch``: a function of (seed, epoch, sample index) only."""
        rng = np.random.default_rng([self.seed, epoch])
        self.epoch = epoch
        self.view_of = rng.integers(0, self.views, size=int(self.indices.max(initial=0)) + 1)

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
        records = self.policy.unpack(stored.pop(THETA))
        rendered = [self.policy.apply(self.source.load(int(i)), theta, size=self.size)
                    for i, theta in zip(samples, records)]
        targets = {t: {a: as_tensor(v) for a, v in arrays.items()} for t, arrays in stored.items()}
        return {"views": torch.stack(rendered), "index": torch.from_numpy(samples), "view": torch.from_numpy(views),
                "targets": targets}

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

    def decode(self, targets: dict[str, dict[str, torch.Tensor]],
               device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Encoded targets of a batch -> ``{target: float32 tensor}`` on ``device`` (decode where it is cheap)."""
        return {name: self.store.decode(name, payload, device) for name, payload in targets.items()}


def open_replay(store: str | os.PathLike | ReinforcedStore, *, targets: list[str] | tuple[str, ...] | None = None,
                size: int | None = None, seed: int = 0, views: int | None = None, online: bool = False,
                cache_bytes: int = 256 << 20) -> ReplayDataset:
    """The replay dataset of ``store`` over its usable samples.

    Args:
        targets: targets to read (default: all the store holds); others are never opened.
        size: render views at this size (default: the teacher's, i.e. the stored view size).
        seed: keys the per-epoch choice of view.
        views: replay only the first ``views`` stored views of each sample (default: all).
        online: fresh views and no cached targets (the teacher runs in the training loop).
    """
    store = store if isinstance(store, ReinforcedStore) else open_store(store, cache_bytes=cache_bytes)
    content = store.manifest.content
    chosen = tuple(store.targets if targets is None else targets)
    for name in chosen:
        store.codec(name)  # unknown target: ValueError naming what the store holds
    source = open_source(content.transfer_set.spec)
    if source.fingerprint() != content.transfer_set.fingerprint:
        raise ValueError(f"transfer set {content.transfer_set.spec!r} no longer matches the store {str(store.path)!r} "
                         "(fingerprint differs): the images changed since the build")
    policy = policy_from_record(content.policy.to_dict())
    samples = store.samples
    ok = samples.filter(samples["status"] == "ok")["index"].to_numpy().astype(np.int64)
    if len(ok) == 0:
        raise ValueError(f"store {str(store.path)!r} has no usable samples")
    return ReplayDataset(store, source, policy, ok, chosen, size or content.teacher.input_size, seed, views, online)
