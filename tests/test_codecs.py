"""Top-k logits codec fidelity on real teacher outputs (Lite0, ImageNet-1k head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reinforce.augment import RandAugCropFlip
from reinforce.sources import open_source
from stores.codecs import TopKLogitsCodec, create_codec


@pytest.fixture(scope="module")
def teacher_logits(lite0_teacher, photo_dir) -> torch.Tensor:
    """1000-class logits of augmented views of Fashion-MNIST images and real photos."""
    model = lite0_teacher[0]
    policy = RandAugCropFlip(size=64)
    views = []
    for spec, views_per_sample in (("fashion-mnist:test?limit=48", 2), (f"folder:{photo_dir}", 8)):
        source = open_source(spec)
        for i in range(len(source)):
            image = source.load(i)
            for v in range(views_per_sample):
                views.append(policy.apply(image, policy.sample(0, i, v, *image.shape[-2:])))
    with torch.inference_mode():
        return model(torch.stack(views)).float()


def fidelity(codec: TopKLogitsCodec, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(full softmax || decoded) and top-1 agreement after an encode/decode round trip."""
    payload = {name: torch.from_numpy(array) for name, array in codec.encode(logits).items()}
    decoded = codec.decode(payload)
    log_p = torch.log_softmax(logits, -1)
    kl = (log_p.exp() * (log_p - decoded.clamp_min(1e-30).log())).sum(-1).mean().item()
    agreement = (decoded.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return kl, agreement


def test_fidelity_improves_with_k(teacher_logits):
    assert teacher_logits.shape[1] == 1000
    results = {k: fidelity(TopKLogitsCodec(k=k, num_classes=1000), teacher_logits) for k in (1, 5, 10)}
    print(f"\ncodec fidelity on {len(teacher_logits)} real Lite0 views (1000 classes):")
    for k, (kl, agreement) in results.items():
        print(f"  top-{k:<2d}  KL {kl:.4f}  top-1 agreement {agreement:.4f}")
    kls = [results[k][0] for k in (1, 5, 10)]
    assert kls[0] > kls[1] > kls[2] >= 0
    assert kls[2] < 0.5
    assert all(agreement == 1.0 for _, agreement in results.values())


def test_decode_at_temperature_sums_to_one(teacher_logits):
    codec = create_codec(**TopKLogitsCodec(k=5, num_classes=1000).to_dict())
    payload = {name: torch.from_numpy(array) for name, array in codec.encode(teacher_logits).items()}
    for temperature in (1.0, 2.0):
        sums = codec.decode(payload, temperature=temperature).sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-4, rtol=0)


def test_wide_heads_get_int32_indices():
    logits = torch.randn(4, 70_000)
    codec = TopKLogitsCodec(k=3, num_classes=70_000)
    payload = codec.encode(logits)
    assert codec.fields()["logits_idx"][1] == np.dtype(np.int32)
    assert payload["logits_idx"].dtype == np.int32
    np.testing.assert_array_equal(payload["logits_idx"], logits.topk(3).indices.numpy())
    assert TopKLogitsCodec(k=3, num_classes=65535).index_dtype == np.dtype(np.uint16)
