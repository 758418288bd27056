"""Labeled views, evaluation and command-line plumbing shared by ``train.teacher``/``finetune``/``evaluate``.

Every model here takes uint8 views, so a dataset yields uint8 ``[3, S, S]`` tensors and the
models normalise on their own. Training views come from the same ``RandAugCropFlip`` policy the
build uses, keyed by (seed, epoch, the image's key), so a run is reproducible whatever the batch order,
and an image shows the same view at an epoch in whichever part it is: the folds of a cross-validation
and the final fit on all images render it once (``RenderedViews``).

Example:
    >>> source = open_source("fashion-mnist:test?limit=2000")
    >>> evaluate_model(model, source, size=64)           # {"top1": ..., "balanced_accuracy": ...}
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from reinforce.augment import RandAugCropFlip, eval_mask, eval_view
from reinforce.sources import IMAGE_SUFFIXES, SPEC_FORMS, Source, open_source, with_query
from reinforce.sources.segmentation import IGNORE_INDEX

__all__ = ["IN_MEMORY_LIMIT", "LabeledViews", "PooledMetrics", "SegmentationViews", "accuracy", "evaluate_model",
           "headline_metric", "labeled_classes", "labeled_spec", "open_labeled", "predict", "predict_logits"]

IN_MEMORY_LIMIT = 60_000  # images decoded once and kept (Fashion-MNIST train: ~140 MB as uint8)
EPOCH_STRIDE = 1_000_003  # seed offset per epoch: epochs draw disjoint Philox keys
RENDERED_VIEWS_BYTES = 256 << 20  # training views kept per process (250 images x 120 epochs at 32 px: 92 MB)


class RenderedViews:
    """Training views this process has rendered, by (image URI, seed, epoch, size, policy), least recently used
    dropped past ``RENDERED_VIEWS_BYTES``: a view is a function of those alone, and the fits of a selection (every
    fold, every candidate, the final fit on all images) show each image at the same epochs, so most of their
    views are already rendered. Forked loader workers each keep their own."""

    def __init__(self, limit: int = RENDERED_VIEWS_BYTES):
        self.limit, self.bytes, self.views = limit, 0, OrderedDict()

    def get(self, key: Hashable, render: Callable[[], Any]) -> Any:
        if key in self.views:
            self.views.move_to_end(key)
            return self.views[key]
        view = render()
        self.views[key] = view
        self.bytes += _nbytes(view)
        while self.bytes > self.limit and len(self.views) > 1:
            self.bytes -= _nbytes(self.views.popitem(last=False)[1])
        return view


def _nbytes(view: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    return sum(t.nbytes for t in view) if isinstance(view, tuple) else view.nbytes


RENDERED = RenderedViews()


def view_id(key: str) -> int:
    """The image's place in the augmentation's Philox key: a 63-bit hash of its source key, so its views do not
    depend on where in a subset (a fold, a labeled draw) it sits."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


class LabeledViews(Dataset):
    """(uint8 view, label) pairs; ``train=True`` renders a fresh augmented view each epoch."""

    def __init__(self, source: Source, size: int, *, train: bool, seed: int = 0,
                 policy: RandAugCropFlip | None = None):
        self.check(source)
        self.source, self.size, self.train, self.seed = source, size, train, seed
        self.policy = policy or RandAugCropFlip(size=size)
        self.labels = None if source.labels is None else torch.as_tensor(source.labels, dtype=torch.long)
        self.view_ids = [view_id(str(key)) for key in source.keys]
        self.in_memory = len(source) <= IN_MEMORY_LIMIT
        self.images = [source.load(i) for i in range(len(source))] if self.in_memory else None
        self.epoch = 0

    @staticmethod
    def check(source: Source) -> None:
        if source.labels is None:
            raise ValueError(f"{source.spec!r} has no labels; training and evaluation need a labeled source "
                             f"(spec forms: {SPEC_FORMS})")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def image(self, index: int) -> torch.Tensor:
        return self.images[index] if self.images is not None else self.source.load(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.train:
            return eval_view(self.image(index), self.size), self.labels[index]
        return RENDERED.get(self.rendered_key(index), lambda: self.render(index)), self.labels[index]

    def rendered_key(self, index: int) -> tuple:
        return type(self), str(self.source.uris[index]), self.seed, self.epoch, self.size, self.policy

    def theta(self, index: int, height: int, width: int):
        """This epoch's augmentation record of image ``index``."""
        return self.policy.sample(self.seed + self.epoch * EPOCH_STRIDE, self.view_ids[index], 0, height, width)

    def render(self, index: int) -> torch.Tensor:
        image = self.image(index)
        return self.policy.apply(image, self.theta(index, image.shape[-2], image.shape[-1]), self.size)


def open_labeled(data: str, shots: int | None, seed: int) -> tuple[Source, tuple[str, ...]]:
    """The labeled few-shot part of ``data`` (all of it when ``shots`` is falsy) and its class names; on a
    segmentation source ``shots`` counts images in all and the masks are the labels."""
    data = labeled_spec(data)
    source = open_source(with_query(data, shots=shots, seed=seed, part="labeled") if shots else data)
    return source, labeled_classes(source)


def labeled_spec(data: str) -> str:
    """``data``, with a plain directory read as ``imagefolder:DIR`` (said in one line on stderr): a person with
    labeled photos has them in class folders, and a plain directory is otherwise an unlabeled ``folder:``."""
    base, _, query = data.partition("?")
    root = Path(base)
    if not root.is_dir():
        return data
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose or not classes:
        raise ValueError(f"{base!r} is a plain directory of unlabeled images (e.g. {', '.join(loose[:2]) or 'none'}"
                         f"); labeled commands need labels: class subfolders read as imagefolder:{base} "
                         f"(DIR/CLASS/image), or another labeled spec (spec forms: {SPEC_FORMS})")
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    print(f"reading {base} as imagefolder:{base}: {len(classes)} classes from its subfolders ({shown})",
          file=sys.stderr)
    return f"imagefolder:{base}" + (f"?{query}" if query else "")


def labeled_classes(source: Source) -> tuple[str, ...]:
    """The source's class names, checked against its labels (a model head needs them all)."""
    if source.mask_loader is not None:  # masks were checked against the class names when the source was opened
        return source.class_names
    if source.labels is None:
        raise ValueError(f"{source.spec!r} has no labels")
    names = source.class_names or tuple(str(i) for i in range(int(source.labels.max()) + 1))
    if len(source.labels) and int(source.labels.max()) >= len(names):
        raise ValueError(f"{source.spec!r} has label {int(source.labels.max())} but only {len(names)} classes")
    return tuple(names)


@torch.inference_mode()
def predict_logits(model: nn.Module, source: Source, size: int,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of every deterministic eval view of ``source`` (``[N, C] float32``) and its label (``[N] int64``)."""
    dataset = LabeledViews(source, size, train=False)
    was_training = model.training
    model.eval()
    logits = [model(views.contiguous(memory_format=torch.channels_last)).float()
              for views, _ in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return torch.cat(logits) if logits else torch.zeros(0, 0), dataset.labels


def predict(model: nn.Module, source: Source, size: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-1 class of every deterministic eval view of ``source``, and its label (both ``[N] int64``)."""
    logits, labels = predict_logits(model, source, size, batch_size)
    return logits.argmax(1) if len(logits) else torch.zeros(0, dtype=torch.long), labels


def evaluate_model(model: nn.Module, source: Source, size: int, batch_size: int = 256) -> dict[str, float]:
    """Top-1 and balanced accuracy (mean per-class recall) on the deterministic eval views; on image/mask pairs
    mIoU and pixel accuracy."""
    return PooledMetrics.for_source(source).update(model, source, size, batch_size).compute()


class PooledMetrics:
    """Metrics over the predictions of one or several (model, images) pairs, pooled before computing: k-fold
    cross-validation scores every held-out image once, so its 100 predictions count as 100, not 5 means of 20.

    Classification: top-1 and balanced accuracy (torchmetrics ``MulticlassAccuracy`` micro / macro); image/mask
    pairs: mIoU (``MulticlassJaccardIndex``, macro over classes present) and pixel accuracy, ignored pixels out.
    """

    def __init__(self, num_classes: int, segmentation: bool):
        self.segmentation = segmentation
        names = ("miou", "pixel_accuracy") if segmentation else ("top1", "balanced_accuracy")
        first = (MulticlassJaccardIndex(num_classes, average="macro", ignore_index=-100) if segmentation
                 else MulticlassAccuracy(num_classes, average="micro"))
        second = MulticlassAccuracy(num_classes, average="micro" if segmentation else "macro", ignore_index=-100)
        self.metrics = dict(zip(names, (first, second)))

    @classmethod
    def for_source(cls, source: Source) -> PooledMetrics:
        segmentation = source.mask_loader is not None
        return cls(len(source.class_names) if segmentation else len(labeled_classes(source)), segmentation)

    @torch.inference_mode()
    def update(self, model: nn.Module, source: Source, size: int, batch_size: int = 256) -> PooledMetrics:
        """Add ``model``'s predictions on the deterministic eval views of ``source``."""
        views = (SegmentationViews if self.segmentation else LabeledViews)(source, size, train=False)
        was_training = model.training
        model.eval()
        for inputs, targets in DataLoader(views, batch_size=min(batch_size, 64) if self.segmentation else batch_size):
            predicted = model(inputs.contiguous(memory_format=torch.channels_last)).argmax(1)
            for metric in self.metrics.values():
                metric.update(predicted, targets)
        model.train(was_training)
        return self

    def compute(self) -> dict[str, float]:
        return {name: float(metric.compute()) for name, metric in self.metrics.items()}


def headline_metric(source: Source) -> str:
    """The metric a model on ``source`` is chosen and reported by: ``miou`` on image/mask pairs, else ``top1``."""
    return "miou" if source.mask_loader is not None else "top1"


def accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 and balanced accuracy of ``[N]`` predicted classes against ``[N]`` labels."""
    top1 = MulticlassAccuracy(num_classes, average="micro")(predictions, labels)
    balanced = MulticlassAccuracy(num_classes, average="macro")(predictions, labels)
    return {"top1": float(top1), "balanced_accuracy": float(balanced)}


class SegmentationViews(LabeledViews):
    """(uint8 view, int64 class map) pairs: one θ renders both (``apply_with_mask``); ignored pixels are -100,
    cross-entropy's default ``ignore_index``, so ``train.optim.fit`` trains segmenters unchanged."""

    def __init__(self, source: Source, size: int, *, train: bool, seed: int = 0,
                 policy: RandAugCropFlip | None = None):
        super().__init__(source, size, train=train, seed=seed, policy=policy)
        self.masks = [source.load_mask(i) for i in range(len(source))] if self.in_memory else None

    @staticmethod
    def check(source: Source) -> None:
        if source.mask_loader is None:
            raise ValueError(f"{source.spec!r} has no masks; segmentation needs fashion-mnist-seg:... or segfolder:DIR")

    def mask(self, index: int) -> torch.Tensor:
        return self.masks[index] if self.masks is not None else self.source.load_mask(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.train:
            view, mask = RENDERED.get(self.rendered_key(index), lambda: self.render(index))
        else:
            view, mask = eval_view(self.image(index), self.size), eval_mask(self.mask(index), self.size)
        labels = mask.long()
        return view, labels.masked_fill_(labels == IGNORE_INDEX, -100)

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.mask(index)
        return self.policy.apply_with_mask(self.image(index), mask, self.theta(index, *mask.shape), self.size)
