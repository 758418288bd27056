"""Teachers give logits, embedding and patch targets from one forward, for CNN, DINOv2 and OpenCLIP backbones."""

from __future__ import annotations

import pytest
import torch

from reinforce.sources import open_source
from reinforce.teachers import TeacherModel, create_backbone
from stores.codecs import PatchCodec


def _views(size: int) -> torch.Tensor:
    from reinforce.augment import eval_view

    source = open_source("fashion-mnist:test?limit=3")
    return torch.stack([eval_view(source.load(i), size) for i in range(len(source))])


@pytest.mark.parametrize(("library", "name", "size", "dim", "channels", "grid"), [
    ("timm", "tf_efficientnet_lite0", 64, 1280, 1280, 2),
    ("timm", "vit_small_patch14_dinov2", 56, 384, 384, 4),
    ("open_clip", "ViT-B-32", 224, 512, 768, 7),
])
def test_forward_targets_one_pass(library, name, size, dim, channels, grid):
    """Every kind from one forward; the embedding is what the head reads, so logits == head(embedding)."""
    torch.manual_seed(0)
    model = TeacherModel(create_backbone(library, name), 10, (0.5,) * 3, (0.5,) * 3).eval()
    calls = []
    model.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    if library == "timm":  # timm backbones run forward_features, not forward: count the stem instead
        stem = next(model.backbone.children())
        stem.register_forward_pre_hook(lambda *_: calls.append(1))
    views = _views(size)
    with torch.inference_mode():
        out = model.forward_targets(views, ("logits", "embedding", "patch"))
        reference = model(views)
    assert len(calls) == 2  # one forward for all three targets, one for model(views)
    assert out["embedding"].shape == (3, dim) and out["patch"].shape == (3, channels, grid, grid)
    torch.testing.assert_close(out["logits"], reference, rtol=1e-4, atol=1e-4)
    codec = PatchCodec(channels=channels, grid=min(grid, 4))
    assert codec.fidelity(out["patch"])["cosine"].min() > 0.999


def test_headless_teacher_gives_features_only():
    model = TeacherModel(create_backbone("timm", "tf_efficientnet_lite0"), 0, (0.5,) * 3, (0.5,) * 3).eval()
    assert model.target_kinds == ("embedding", "patch")
    with torch.inference_mode(), pytest.raises(ValueError, match="cannot give target"):
        model.forward_targets(_views(32), ("logits",))
