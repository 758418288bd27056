"""Teachers give logits, embedding and patch targets from one forward, for CNN, DINOv2 and OpenCLIP backbones."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support import REPO

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
    stem = next(model.backbone.model.children())  # the library network's first layer runs once per forward
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


def _official_dinov2(backbone) -> dict[str, torch.Tensor]:
    """timm's ``vit_small_patch14_dinov2`` tensors under the official torch.hub ``dinov2_vits14`` names: the same
    keys plus the masked-image-modelling ``mask_token`` (timm's ``checkpoint_filter_fn`` drops it)."""
    state = backbone.library_state_dict()
    return {**state, "mask_token": torch.randn(1, state["cls_token"].shape[-1])}


def _open_clip_full(tower) -> dict[str, torch.Tensor]:
    """A whole open_clip model's ``state_dict()``: the tower under ``visual.`` plus a random text tower."""
    import open_clip

    full = open_clip.create_model("ViT-S-32", pretrained=None).state_dict()
    return {**full, **{f"visual.{k}": v for k, v in tower.library_state_dict().items()}}


LAYOUTS = {  # file name -> (library, backbone, writer(tensors, path), tensors in that layout from the backbone)
    "timm.safetensors": ("timm", "vit_small_patch14_dinov2", "safetensors", lambda b: b.library_state_dict()),
    "dinov2_vits14_pretrain.pth": ("timm", "vit_small_patch14_dinov2", "torch", _official_dinov2),
    "dinov2_official.safetensors": ("timm", "vit_small_patch14_dinov2", "safetensors", _official_dinov2),
    "visual.safetensors": ("open_clip", "ViT-S-32", "safetensors", lambda b: b.library_state_dict()),
    "open_clip_model.safetensors": ("open_clip", "ViT-S-32", "safetensors", _open_clip_full),
    "open_clip_pytorch_model.bin": ("open_clip", "ViT-S-32", "torch", _open_clip_full),
    # open_clip's training loop: {"epoch", "name", "state_dict": DDP's module.-prefixed full model, "optimizer"}
    "epoch_1.pt": ("open_clip", "ViT-S-32", "torch",
                   lambda b: {"epoch": 1, "name": "run", "optimizer": {"state": {}, "param_groups": []},
                              "state_dict": {f"module.{k}": v for k, v in _open_clip_full(b).items()}}),
}


@pytest.mark.parametrize("file_name", list(LAYOUTS))
def test_checkpoint_layouts_load_tensor_for_tensor(file_name, tmp_path, monkeypatch):
    """``train.teacher --weights FILE`` reads each layout a VFM is distributed in into the backbone's own tensors."""
    from reinforce.teachers import create_teacher
    from reinforce.tensor_files import save_tensors
    from train import teacher

    library, name, writer, layout = LAYOUTS[file_name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VFM_REINFORCE_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    source = create_backbone(library, name)
    path = tmp_path / file_name
    save_tensors(layout(source), path) if writer == "safetensors" else torch.save(layout(source), path)
    teacher.main(["--library", library, "--backbone", name, "--weights", str(path), "--mode", "frozen",
                  "--name", "vfm"])
    loaded, card = create_teacher("vfm")
    assert card.adaptation["weights"] == file_name
    expected, got = source.library_state_dict(), loaded.backbone.library_state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_unknown_checkpoint_layouts_fail_in_one_line(tmp_path, monkeypatch, capsys):
    import datetime

    from train import teacher

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VFM_REINFORCE_HOME", str(tmp_path / "home"))
    torch.save({"encoder.layer0.weight": torch.zeros(3), "encoder.layer1.weight": torch.zeros(3)}, "other.pt")
    torch.save({"created": datetime.date(2024, 1, 1)}, "pickled.pt")  # not tensors: weights_only refuses it
    resnet = create_backbone("timm", "resnet18").library_state_dict()
    torch.save({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.dim() else v for k, v in resnet.items()},
               "wrong_shapes.pt")
    for file_name, expected in [
        ("other.pt", ["matches none of the checkpoint layouts accepted", "official DINOv2", "open_clip full model",
                      "'encoder.layer0.weight'", "conv1.weight"]),
        ("pickled.pt", ["pickled.pt is not a safetensors file or a tensor-only torch checkpoint"]),
        ("wrong_shapes.pt", ["tensors have other shapes than the backbone's, e.g. conv1.weight (64, 3, 7, 8) vs "
                             "(64, 3, 7, 7)"]),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            teacher.main(["--backbone", "resnet18", "--weights", file_name, "--mode", "frozen", "--name", "x"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in err and err.startswith("train.teacher: error: "), err
        assert all(part in err for part in expected), err


@pytest.mark.e2e
@pytest.mark.parametrize(("library", "backbone"), [("timm", "vit_small_patch14_dinov2"), ("open_clip", "ViT-B-32")])
def test_pretrained_offline_names_the_local_alternative(library, backbone, tmp_path):
    """``--pretrained`` fetches from the hub; offline (this machine) it fails in one line that says what to do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VFM_REINFORCE_HOME": str(tmp_path),
           "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "train.teacher", "--library", library, "--backbone", backbone,
                          "--pretrained", "--mode", "frozen", "--name", "x"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"train.teacher: error: cannot download {library} {backbone} weights (offline?): download them elsewhere "
        "and pass --weights FILE"), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
