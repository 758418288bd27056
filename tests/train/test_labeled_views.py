"""Training views of labeled images: a view is a function of (image, seed, epoch), wherever the image sits."""

from __future__ import annotations

import numpy as np
import torch

from reinforce.sources import open_source
from train import data
from train.data import LabeledViews, RenderedViews, SegmentationViews, open_labeled


def test_an_image_shows_the_same_view_in_a_fold_as_in_all_labeled_images(monkeypatch):
    """Cross-validation folds and the final fit see an image at the same epoch: the same pixels, so one render
    serves all of them; a fresh cache (nothing shared) renders the very same views."""
    source, _ = open_labeled("fashion-mnist:train", 3, 0)
    fold = np.array([4, 11, 27])
    part = source.subset(fold, f"{source.spec}#fold")
    for epoch in (0, 5):
        whole, subset = LabeledViews(source, 32, train=True, seed=3), LabeledViews(part, 32, train=True, seed=3)
        whole.set_epoch(epoch)
        subset.set_epoch(epoch)
        for position, index in enumerate(fold):
            shown = subset[position][0]
            monkeypatch.setattr(data, "RENDERED", RenderedViews())  # render again, from nothing kept
            assert torch.equal(whole[int(index)][0], shown)
            assert int(whole[int(index)][1]) == int(source.labels[index])
    epochs = []
    for epoch in (0, 1):
        whole.set_epoch(epoch)
        epochs.append(whole[0][0])
    assert not torch.equal(*epochs)  # a new epoch, a new view
    other = LabeledViews(source, 32, train=True, seed=4)
    other.set_epoch(1)
    assert not torch.equal(other[0][0], epochs[1])  # another seed, another view


def test_rendered_views_stay_under_their_byte_limit():
    cache = RenderedViews(limit=3 * 3 * 32 * 32)
    calls = []
    for key in range(5):
        cache.get(key, lambda key=key: calls.append(key) or torch.full((3, 32, 32), key, dtype=torch.uint8))
    assert cache.bytes <= cache.limit and list(cache.views) == [2, 3, 4]
    assert int(cache.get(4, lambda: calls.append("again"))[0, 0, 0]) == 4 and calls == [0, 1, 2, 3, 4]


def test_segmentation_views_keep_image_and_mask_together(monkeypatch):
    source = open_source("fashion-mnist-seg:train?limit=6")
    part = source.subset(np.array([5, 2]), f"{source.spec}#part")
    whole, subset = SegmentationViews(source, 32, train=True, seed=1), SegmentationViews(part, 32, train=True, seed=1)
    for position, index in enumerate((5, 2)):
        view, mask = subset[position]
        monkeypatch.setattr(data, "RENDERED", RenderedViews())  # render again, from nothing kept
        assert torch.equal(view, whole[index][0]) and torch.equal(mask, whole[index][1])
        assert mask.shape == (32, 32) and mask.dtype == torch.int64
