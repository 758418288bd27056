"""Augmentation records: order-independent sampling, every op renders and matches torchvision's RandAugment
pixel for pixel, packed records round-trip, and stored policy records rebuild (or are refused)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from skimage import data as skdata

from reinforce import augment
from reinforce.augment import (
    OP_NAMES,
    RANDAUG_OPS,
    AugParams,
    RandAugCropFlip,
    create_policy,
    list_policies,
    policy_from_record,
)
from reinforce.sources import open_source

POLICY = RandAugCropFlip(size=64)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return open_source("fashion-mnist:test?limit=1").load(0)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A real non-square RGB photo (300 x 451), so width/height mix-ups in an op show."""
    return torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).contiguous()


def test_same_key_same_params_in_any_order():
    keys = [(seed, sample, view) for seed in (0, 7) for sample in (0, 3, 1000) for view in range(4)]
    forward = {key: POLICY.sample(*key, 28, 28) for key in keys}
    backward = {key: POLICY.sample(*key, 28, 28) for key in reversed(keys)}
    assert forward == backward


def test_views_differ():
    records = POLICY.pack([POLICY.sample(0, 5, view, 300, 400) for view in range(8)])
    assert len({r.tobytes() for r in records}) == 8


@pytest.mark.parametrize("op_id", range(len(OP_NAMES)), ids=OP_NAMES)
@pytest.mark.parametrize("magnitude", [9, 30])
def test_every_op_renders(image, op_id, magnitude):
    views = {}
    for signed_bin in (-magnitude, magnitude):
        params = AugParams((2, 3, 20, 22), True, ((op_id, signed_bin), (op_id, 0)))
        views[signed_bin] = view = POLICY.apply(image, params)
        assert view.dtype == torch.uint8 and view.shape == (3, 64, 64)
        assert POLICY.apply(image, params, size=32).shape == (3, 32, 32)
    if RANDAUG_OPS[op_id].signed:
        assert not torch.equal(views[-magnitude], views[magnitude]), "the sign of a signed op's bin is ignored"


@pytest.mark.parametrize("source", ["image", "photo"])
@pytest.mark.parametrize("num_bins", [31, 11])
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_ops_match_torchvision_randaugment(request, source, num_bins, op_name):
    """Reference check: our public-API op table against torchvision's private RandAugment implementation."""
    picture = request.getfixturevalue(source)
    reference = T.RandAugment(interpolation=T.InterpolationMode.NEAREST, num_magnitude_bins=num_bins)
    magnitudes_fn, signed = reference._AUGMENTATION_SPACE[op_name]
    op = RANDAUG_OPS[OP_NAMES.index(op_name)]
    assert op.signed == signed
    every_bin = range(1 - num_bins, num_bins)  # Solarize differs from a naive linspace(255, 0) on even bins only
    some_bins = (0, 1, 9, num_bins - 1, -1, -9, 1 - num_bins)
    for view, signed_bins in ((F.resize(picture, [64, 80], antialias=True), every_bin), (picture, some_bins)):
        height, width = view.shape[-2:]
        magnitudes = magnitudes_fn(num_bins, height, width)
        for signed_bin in signed_bins:
            magnitude = 0.0 if magnitudes is None else float(magnitudes[abs(signed_bin)])
            magnitude = -magnitude if signed and signed_bin < 0 else magnitude
            expected = reference._apply_image_or_video_transform(
                view, op_name, magnitude, interpolation=reference.interpolation, fill=reference._fill)
            assert torch.equal(op(view, signed_bin, num_bins), expected), (op_name, tuple(view.shape), signed_bin)


def test_op_table_is_torchvisions_and_product_code_avoids_its_private_api():
    assert tuple(T.RandAugment._AUGMENTATION_SPACE) == OP_NAMES
    source = inspect.getsource(augment)
    assert "_AUGMENTATION_SPACE" not in source and "_apply_image_or_video_transform" not in source


def test_pack_round_trip():
    params = [POLICY.sample(seed, sample, view, height, width)
              for seed in (0, 1) for sample in range(50) for view in range(4)
              for height, width in ((28, 28), (427, 640), (4000, 6000))]
    records = POLICY.pack(params)
    print(f"rrc_flip_randaug num_ops=2: record_bytes={POLICY.record_bytes} dtype={POLICY.record_dtype}")
    assert POLICY.record_bytes == POLICY.record_dtype.itemsize == 4 * 2 + 1 + 2 * 2
    assert records.dtype == np.uint8 and records.shape == (len(params), POLICY.record_bytes)
    assert POLICY.unpack(records) == params
    assert int.from_bytes(records[0, :2].tobytes(), "little") == params[0].box[0]
    assert POLICY.unpack(POLICY.pack([])) == []


@pytest.mark.parametrize("num_ops", [0, 1, 3])
def test_record_bytes_follow_num_ops(num_ops):
    policy = RandAugCropFlip(size=32, num_ops=num_ops)
    params = [policy.sample(3, i, 0, 50, 70) for i in range(20)]
    assert policy.record_bytes == 9 + 2 * num_ops
    assert policy.unpack(policy.pack(params)) == params


def test_pack_rejects_box_beyond_uint16():
    with pytest.raises(ValueError, match="70000"):
        POLICY.pack([AugParams((0, 0, 70000, 10), False, ((0, 0), (0, 0)))])


@pytest.mark.parametrize("ops", [((0, 0),), ((14, 0), (0, 0)), ((1, 31), (0, 0)), ((1, -31), (0, 0))])
def test_pack_and_apply_reject_ops_the_policy_cannot_store(image, ops):
    params = AugParams((0, 0, 10, 10), False, ops)
    with pytest.raises(ValueError, match="op"):
        POLICY.pack([params])
    if len(ops) == POLICY.num_ops:
        with pytest.raises(ValueError, match="outside"):
            POLICY.apply(image, params)


def test_unpack_rejects_records_of_another_width():
    with pytest.raises(ValueError, match=r"\[n, 13\]"):
        POLICY.unpack(np.zeros((4, 14), np.uint8))


@pytest.mark.parametrize("name", list_policies())
def test_policy_record_round_trip(image, name):
    policy = create_policy(name, size=48)
    stored = json.loads(json.dumps(policy.to_record()))
    rebuilt = policy_from_record(stored)
    assert rebuilt == policy and rebuilt.to_record() == stored
    assert stored["record_bytes"] == policy.record_bytes
    params = [policy.sample(0, i, v, 28, 28) for i in range(10) for v in range(3)]
    replayed = rebuilt.unpack(policy.pack(params))
    assert replayed == params
    assert all(torch.equal(policy.apply(image, p), rebuilt.apply(image, r)) for p, r in zip(params, replayed))


@pytest.mark.parametrize("name", list_policies())
def test_record_from_other_code_is_refused(name):
    record = create_policy(name, size=48).to_record()
    with pytest.raises(ValueError, match=r"version \d+; this code renders version"):
        policy_from_record({**record, "version": record["version"] + 1})
    other_ops = [*record["op_names"][::-1], "Invert"]
    with pytest.raises(ValueError, match=r"store was built with ops \[.*'Invert'\]; this code renders \["):
        policy_from_record({**record, "op_names": other_ops})
    with pytest.raises(ValueError, match="predates packed"):
        policy_from_record({"name": name, "version": 1, "size": 48})


def test_create_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown augmentation policy 'rrc'; registered: rrc_flip, rrc_flip_bicubic, "
                                         "rrc_flip_randaug"):
        create_policy("rrc", size=64)
    with pytest.raises(ValueError, match=r"unknown argument.* magnitud .*valid: size"):
        create_policy("rrc_flip_randaug", size=64, magnitud=5)
    with pytest.raises(ValueError, match="num_ops"):
        create_policy("rrc_flip", size=64, num_ops=2)
    with pytest.raises(ValueError, match=r"needs argument.* size"):
        create_policy("rrc_flip")
    with pytest.raises(ValueError, match="magnitude=31"):
        create_policy("rrc_flip_randaug", size=64, magnitude=31)
    assert create_policy("rrc_flip_randaug", size=64, scale=None).scale == POLICY.scale


@pytest.mark.parametrize("box", [(-1, 0, 10, 10), (0, -1, 10, 10), (20, 0, 10, 10), (0, 20, 10, 10), (0, 0, 0, 5)])
def test_box_outside_image_rejected(image, box):
    with pytest.raises(ValueError, match="outside the image"):
        POLICY.apply(image, AugParams(box, False, ((0, 0), (0, 0))))
