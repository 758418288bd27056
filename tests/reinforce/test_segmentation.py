"""Segmentation on real-derived data (Fashion-MNIST mosaics): the sources and their bad-input errors, one θ
replaying image and mask bit for bit, and the per-pixel top-k codec's size and fidelity on real Lite0 outputs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from support import cli_env

from reinforce.augment import create_policy
from reinforce.sources import open_source
from reinforce.sources.fashion_mnist import fashion_mnist_path, read_idx
from reinforce.sources.segmentation import FOREGROUND_THRESHOLD, IGNORE_INDEX, SEG_CLASSES
from stores.codecs import SegTopKLogitsCodec, create_codec

MOSAICS = "fashion-mnist-seg:test@64,grid=2?limit=24"


@pytest.fixture(scope="module")
def mosaics():
    return open_source(MOSAICS)


def test_mosaic_classes_are_the_items_classes(mosaics):
    """Every foreground pixel carries a real item's class + 1; background is dark; canvases are reproducible."""
    labels = read_idx(str(fashion_mnist_path("test", "labels")))
    assert mosaics.class_names == SEG_CLASSES and len(SEG_CLASSES) == 11 and mosaics.labels is None
    seen = set()
    for i in range(len(mosaics)):
        image, mask = mosaics.load(i), mosaics.load_mask(i)
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.uint8
        assert torch.equal((image[0] > FOREGROUND_THRESHOLD), mask > 0)
        ids = set(mask.unique().tolist()) - {0}
        assert ids <= set(range(1, 11)) and 1 <= len(ids) <= 4
        seen |= ids
    assert seen <= {int(c) + 1 for c in labels} and len(seen) >= 8  # 24 canvases x 4 items cover most classes
    again = open_source(MOSAICS)
    assert again.fingerprint() == mosaics.fingerprint() and torch.equal(again.load_mask(7), mosaics.load_mask(7))
    assert len(open_source("fashion-mnist-seg:test@96,grid=3")) == 10_000 // 9


def test_bad_mosaic_spec_says_the_form():
    with pytest.raises(ValueError, match=r"CANVAS >= G \* 28"):
        open_source("fashion-mnist-seg:test@50,grid=2")
    with pytest.raises(ValueError, match="has no masks"):
        open_source("fashion-mnist:test?limit=2").load_mask(0)


@pytest.mark.parametrize("policy_name", ["rrc_flip", "rrc_flip_randaug"])
def test_one_theta_replays_image_and_mask_bit_exact(mosaics, policy_name):
    """Stored θ (packed, unpacked) renders the teacher's very view and the same mask; the mask only moves class ids
    (nearest), follows the flip, and photometric ops leave it alone."""
    policy = create_policy(policy_name, size=48)
    for i in range(8):
        image, mask = mosaics.load(i), mosaics.load_mask(i)
        drawn = [policy.sample(3, i, v, *mask.shape) for v in range(4)]
        for theta, stored in zip(drawn, policy.unpack(policy.pack(drawn)), strict=True):
            view, labels = policy.apply_with_mask(image, mask, theta)
            replayed_view, replayed_labels = policy.apply_with_mask(image, mask, stored)
            assert torch.equal(view, replayed_view) and torch.equal(labels, replayed_labels)
            assert torch.equal(view, policy.apply(image, stored))  # the pixels the teacher saw
            assert labels.shape == (48, 48) and set(labels.unique().tolist()) <= set(mask.unique().tolist())
            if theta.ops:
                plain = create_policy("rrc_flip", size=48)
                assert torch.equal(plain.apply_with_mask(image, mask, theta.__class__(theta.box, theta.flip))[1],
                                   labels)
    whole = policy.__class__(size=64)
    for flip in (False, True):
        theta = policy.sample(0, 0, 0, 64, 64).__class__((0, 0, 64, 64), flip)
        labels = whole.apply_with_mask(mosaics.load(0), mosaics.load_mask(0), theta)[1]
        assert torch.equal(labels, mosaics.load_mask(0).flip(-1) if flip else mosaics.load_mask(0))


def _write_segfolder(root, source, count: int):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(source.class_names) + "\n")
    for i in range(count):
        Image.fromarray(source.load(i)[0].numpy()).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(source.load_mask(i).numpy()).save(root / "masks" / f"{i:03d}.png")
    return root


def test_segfolder_reads_pairs_and_names_bad_masks(tmp_path, mosaics):
    root = _write_segfolder(tmp_path / "ok", mosaics, 4)
    source = open_source(f"segfolder:{root}")
    assert len(source) == 4 and source.class_names == SEG_CLASSES
    assert torch.equal(source.load_mask(2), mosaics.load_mask(2)) and torch.equal(source.load(2), mosaics.load(2))
    ignore = mosaics.load_mask(0).numpy().copy()
    ignore[:4] = IGNORE_INDEX  # unlabeled rows are allowed
    Image.fromarray(ignore).save(root / "masks" / "000.png")
    assert int(open_source(f"segfolder:{root}").load_mask(0)[0, 0]) == IGNORE_INDEX

    Image.fromarray(np.zeros((60, 64), np.uint8)).save(root / "masks" / "001.png")
    with pytest.raises(ValueError, match=r"mask '.*masks/001.png' is 64x60 but its image '.*images/001.png' is 64x64"):
        open_source(f"segfolder:{root}")
    Image.fromarray(np.full((64, 64), 11, np.uint8)).save(root / "masks" / "001.png")
    with pytest.raises(ValueError, match=r"mask '.*masks/001.png' has class id\(s\) \[11\] beyond the 11 classes"):
        open_source(f"segfolder:{root}")
    (root / "masks" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/001.png' has no mask"):
        open_source(f"segfolder:{root}")


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_mask_manifest_lists_pairs_and_names_bad_masks(tmp_path, mosaics, suffix):
    """FILE.parquet|csv with ``uri`` and ``mask`` columns (+ classes.txt beside it) is a segmentation source: the
    pairs a segfolder holds, listed; the labeled draw (``shots``) and training read it like any other."""
    import polars as pl

    from train.data import open_labeled

    root = _write_segfolder(tmp_path / "pairs", mosaics, 4)
    manifest = root / f"pairs.{suffix}"
    frame = pl.DataFrame({"uri": [f"images/{i:03d}.png" for i in range(4)],
                          "mask": [f"masks/{i:03d}.png" for i in range(4)]})
    frame.write_parquet(manifest) if suffix == "parquet" else frame.write_csv(manifest)
    source = open_source(str(manifest))
    assert len(source) == 4 and source.class_names == SEG_CLASSES
    for i in range(4):
        assert torch.equal(source.load_mask(i), mosaics.load_mask(i)) and torch.equal(source.load(i), mosaics.load(i))
    labeled, classes = open_labeled(str(manifest), 2, 0)
    assert len(labeled) == 2 and classes == SEG_CLASSES
    assert all(torch.equal(labeled.load_mask(i), source.load_mask(int(labeled.keys[i][7:10]))) for i in range(2))

    Image.fromarray(np.zeros((60, 64), np.uint8)).save(root / "masks" / "003.png")
    with pytest.raises(ValueError, match=r"mask '.*masks/003.png' is 64x60 but its image '.*images/003.png'"):
        open_source(str(manifest))
    (root / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask manifest .* needs '.*classes.txt'"):
        open_source(str(manifest))


@pytest.fixture(scope="module")
def pixel_logits(lite0_teacher, mosaics) -> torch.Tensor:
    """Real per-pixel logits ``[48, 1000, 8, 8]``: the embedded ImageNet Lite0 run at output stride 8 (dilated,
    same weights) with its classifier applied at every position, over 2 augmented 64 px views of each mosaic."""
    import timm

    from reinforce.teachers import embedded_weights, read_checkpoint

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, output_stride=8)
    net.load_state_dict(read_checkpoint(embedded_weights("tf_efficientnet_lite0.in1k")))
    net.eval()
    policy, model = create_policy("rrc_flip_randaug", size=64), lite0_teacher[0]
    views = [policy.apply(mosaics.load(i), policy.sample(0, i, v, 64, 64)) for i in range(len(mosaics)) for v in (0, 1)]
    with torch.inference_mode():
        features = net.forward_features(model.normalize(torch.stack(views)))
        return net.classifier(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("precision", ["uint8", "fp16"])
def test_seg_codec_round_trip_and_fidelity(pixel_logits, precision):
    """Round trip per pixel: decoded maps are distributions, top-1 survives, KL falls with k; bytes vs dense fp16."""
    assert pixel_logits.shape == (48, 1000, 8, 8)
    results = {}
    for k in (1, 3, 5):
        codec = SegTopKLogitsCodec(k=k, num_classes=1000, height=8, width=8, precision=precision)
        assert create_codec(**codec.to_dict()) == codec
        payload = codec.encode(pixel_logits)
        assert {a: (v.shape[1:], v.dtype) for a, v in payload.items()} == codec.arrays()
        dense = codec.decode({a: torch.from_numpy(v) for a, v in payload.items()})
        assert dense.shape == pixel_logits.shape
        torch.testing.assert_close(dense.exp().sum(1), torch.ones(48, 8, 8), atol=1e-4, rtol=0)
        fidelity = {m: v.mean().item() for m, v in codec.fidelity(pixel_logits).items()}
        results[k] = (fidelity, codec.bytes_per_view, codec.dense_bytes_per_view)
    print(f"\nseg_topk_logits {precision}, real Lite0 per-pixel ImageNet logits (1000 classes, 8x8):")
    for k, (fidelity, size, dense) in results.items():
        print(f"  k={k}  {size} B/view vs dense fp16 {dense} ({dense / size:.0f}x)  KL {fidelity['kl']:.4f}  "
              f"pixel top-1 agreement {fidelity['top1_agreement']:.4f}")
    assert all(f["top1_agreement"] >= 0.99 for f, _, _ in results.values())
    assert results[1][0]["kl"] > results[3][0]["kl"] > results[5][0]["kl"]
    assert results[5][2] / results[5][1] >= (100 if precision == "uint8" else 80)


def test_seg_codec_sizes_and_errors():
    """One-byte indices up to 256 classes: >= 20x under dense fp16 at ADE20K's 150 classes with k=5."""
    ade = SegTopKLogitsCodec(k=5, num_classes=150, height=64, width=64)
    assert ade.arrays()["index"][1] == np.dtype(np.uint8)
    assert ade.dense_bytes_per_view == 150 * 64 * 64 * 2 and ade.dense_bytes_per_view / ade.bytes_per_view >= 20
    assert SegTopKLogitsCodec(k=3, num_classes=300, height=2, width=2).arrays()["index"][1] == np.dtype(np.uint16)
    with pytest.raises(ValueError, match=r"codec expects logit maps \[B, 11, 8, 8\], teacher gave \(2, 11, 4, 4\)"):
        SegTopKLogitsCodec(k=3, num_classes=11, height=8, width=8).encode(torch.randn(2, 11, 4, 4))
    with pytest.raises(ValueError, match="top-k must be in"):
        SegTopKLogitsCodec(k=12, num_classes=11, height=8, width=8)


SEG_TRAIN = "fashion-mnist-seg:train@32,grid=1"  # one real item per 32 px canvas: small enough for CI on 2 cores


@pytest.mark.e2e
def test_segmentation_end_to_end_through_the_clis(tmp_path, vfm_home, capsys):
    """train.teacher --task segmentation (lp) -> reinforce.build --targets seg_logits -> stores inspect ->
    train.distill (per-pixel KL, DeepSpeed on CPU) -> train.finetune (per-pixel CE) -> train.evaluate (mIoU)."""
    import subprocess
    import sys
    from pathlib import Path

    from reinforce import build
    from reinforce.replay import open_replay
    from reinforce.teachers import create_teacher
    from stores import __main__ as stores_cli
    from train import evaluate, finetune, teacher
    from train.models import read_student_card

    zoo, store, student, tuned = (tmp_path / name for name in ("zoo", "store", "student", "tuned"))
    teacher.main(["--task", "segmentation", "--backbone", "tf_efficientnet_lite0", "--data", f"{SEG_TRAIN}?limit=64",
                  "--shots", "0", "--mode", "lp", "--lp-steps", "40", "--lp-lr", "0.01", "--batch-size", "16",
                  "--size", "32", "--folds", "0", "--name", "seg_lite0", "--out-dir", str(zoo)])
    assert build.main(["--teacher", str(zoo / "seg_lite0"), "--transfer-set", f"{SEG_TRAIN}?limit=64",
                       "--targets", "seg_logits", "--views", "2", "--topk", "3", "--workers", "0",
                       "--batch-size", "64", "--out", str(store)]) == 0
    replay = open_replay(store, targets=["seg_logits"])
    codec = replay.store.codec("seg_logits")
    assert (codec.name, codec.num_classes, codec.height, codec.width, codec.k) == ("seg_topk_logits", 11, 4, 4, 3)
    batch = replay.__getitems__(list(range(8)))  # replayed views re-encode to exactly the stored targets
    model, _ = create_teacher(str(zoo / "seg_lite0"))
    with torch.inference_mode():
        again = codec.encode(model.forward_targets(batch["views"], ("seg_logits",))["seg_logits"])
    for array, stored in batch["targets"]["seg_logits"].items():
        np.testing.assert_array_equal(np.asarray(stored), again[array], err_msg=array)
    capsys.readouterr()
    stores_cli.main(["inspect", str(store)])
    shown = capsys.readouterr().out
    print(shown)
    assert "target       seg_logits [seg_logits] name=seg_topk_logits, k=3, num_classes=11" in shown
    assert re.search(r"vs dense   fp16 logits 352 B/view: [\d.]+x the stored bytes", shown)

    env = cli_env(PYTHONPATH=str(Path.cwd()))
    run = subprocess.run([sys.executable, "-m", "train.distill", "--store", str(store), "--student",
                          "mobilenetv3_small_050", "--epochs", "2", "--batch-size", "16", "--workers", "0",
                          "--out", str(student)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert finetune.main(["--init", str(student), "--data", f"{SEG_TRAIN}?limit=64", "--shots", "48",
                          "--val-fraction", "0.25", "--eval-every", "5", "--steps", "10", "--batch-size", "16",
                          "--out", str(tuned)]) == 0
    stage = read_student_card(tuned).history[-1]  # 12 of the 48 drawn images validate; the best-val step is kept
    assert (stage["train_images"], stage["val_images"]) == (36, 12)
    assert [step for step, _ in stage["val_curve"]] == [0, 5, 10]
    assert stage["val_miou"] == max(score for _, score in stage["val_curve"])
    test = "fashion-mnist-seg:test@32,grid=1?limit=64"
    scores = {name: evaluate.evaluate(str(path), test)
              for name, path in (("teacher", zoo / "seg_lite0"), ("student", tuned))}
    background = float(np.mean([(open_source(test).load_mask(i) == 0).float().mean() for i in range(64)]))
    print(f"\nmIoU / pixel accuracy on {test} (background share {background:.3f}): "
          + ", ".join(f"{n} {s['miou']:.3f} / {s['pixel_accuracy']:.3f}" for n, s in scores.items()))
    assert scores["teacher"]["pixel_accuracy"] > background  # better than calling every pixel background
    assert all(0 <= s["miou"] <= 1 for s in scores.values())


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "mobilenetv3_small_050", "vit_tiny_patch16_224"])
def test_dense_backbones_give_one_eighth_maps(arch):
    """CNNs dilated to output stride 8 keep the classifier's weight names; a ViT's 16-px patch grid is resized to
    1/8. Random weights: only shapes and key names are checked here (the real Lite0 runs in the tests above)."""
    import timm

    from reinforce.teachers.dense import DenseBackbone

    backbone = DenseBackbone(arch).eval()
    with torch.inference_mode():
        maps = backbone(torch.zeros(2, 3, 64, 64))
    assert maps.shape == (2, backbone.num_features, 8, 8)
    classifier = timm.create_model(arch, pretrained=False).state_dict()
    assert set(backbone.library_state_dict()) <= set(classifier)
