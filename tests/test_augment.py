"""Augmentation records: order-independent sampling, every op renders, records round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reinforce.augment import OP_NAMES, AugParams, RandAugCropFlip
from reinforce.sources import open_source

POLICY = RandAugCropFlip(size=64)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return open_source("fashion-mnist:test?limit=1").load(0)


def test_same_key_same_params_in_any_order():
    keys = [(seed, sample, view) for seed in (0, 7) for sample in (0, 3, 1000) for view in range(4)]
    forward = {key: POLICY.sample(*key, 28, 28) for key in keys}
    backward = {key: POLICY.sample(*key, 28, 28) for key in reversed(keys)}
    assert forward == backward


def test_views_differ():
    records = [POLICY.sample(0, 5, view, 300, 400).to_array() for view in range(8)]
    assert len({r.tobytes() for r in records}) == 8


@pytest.mark.parametrize("op_id", range(len(OP_NAMES)), ids=OP_NAMES)
@pytest.mark.parametrize("signed_bin", [-9, 9])
def test_every_op_renders(image, op_id, signed_bin):
    params = AugParams(POLICY.version, (2, 3, 20, 22), True, ((op_id, signed_bin), (op_id, 0)))
    view = POLICY.apply(image, params)
    assert view.dtype == torch.uint8
    assert view.shape == (3, 64, 64)
    assert POLICY.apply(image, params, size=32).shape == (3, 32, 32)


def test_record_round_trip():
    for view in range(16):
        params = POLICY.sample(1, 2, view, 427, 640)
        array = params.to_array()
        assert array.dtype == np.int32 and array.shape == (POLICY.record_width,)
        assert AugParams.from_array(array) == params


@pytest.mark.parametrize("box", [(-1, 0, 10, 10), (0, -1, 10, 10), (20, 0, 10, 10), (0, 20, 10, 10)])
def test_box_outside_image_rejected(image, box):
    with pytest.raises(ValueError, match="outside the image"):
        POLICY.apply(image, AugParams(POLICY.version, box, False, ()))
