"""reinforce.build end to end on a real teacher: exact replay, crash resume, bad inputs, damaged stores."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import zarr

from reinforce.augment import AugParams, RandAugCropFlip
from reinforce.build import BuildConfig, build
from reinforce.build import main as build_main
from reinforce.sources import open_source
from stores import StoreCorruptError, open_store
from stores.__main__ import main as stores_main
from stores.store import ARRAYS_DIR

FMNIST = "fashion-mnist:test?limit=24"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread, as in the build subprocesses: OpenMP threads spin badly on a busy
    2-core machine (4x slower), and the resume test compares in- and out-of-process results."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_capturing(teacher, transfer_set: str, out: Path, workers: int) -> list[torch.Tensor]:
    """Build a 2-view store through the library; returns every float tensor the backbone saw."""
    model, card, _ = teacher
    captured: list[torch.Tensor] = []
    handle = model.backbone.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().clone()))
    try:
        build(BuildConfig(teacher=card.name, transfer_set=transfer_set, out=str(out), views=2, topk=5,
                          batch_size=16, workers=workers, unit_samples=16, chunk_samples=8), teacher=(model, card))
    finally:
        handle.remove()
    return captured


@pytest.fixture(scope="module")
def fmnist_store(lite0_teacher, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    out = tmp_path_factory.mktemp("stores") / "fmnist"
    return out, build_capturing(lite0_teacher, FMNIST, out, workers=0)


def assert_replay_exact(model, store_path: Path, captured: list[torch.Tensor]) -> None:
    store = open_store(store_path)
    content = store.manifest.content
    source = open_source(content["transfer_set"]["spec"])
    policy = RandAugCropFlip.from_dict(content["policy"])
    rows = torch.cat(captured)  # sample 0 view 0..K-1, sample 1 view 0..K-1, ...
    views = content["views"]
    assert rows.shape[0] == len(source) * views
    for i in range(len(source)):
        image = source.load(i)
        for j in range(views):
            params = AugParams.from_array(store.read(np.array([i]), np.array([j]))["params"][0])
            replayed = model.normalize(policy.apply(image, params)[None])[0]
            assert torch.equal(rows[i * views + j], replayed), f"sample {i} view {j} differs from the teacher input"


def test_replay_is_bit_exact_fashion_mnist(lite0_teacher, fmnist_store):
    assert_replay_exact(lite0_teacher[0], *fmnist_store)


def test_batched_read_matches_zarr_under_any_cache_size(fmnist_store):
    """Random (sample, view) pairs, with duplicates, across chunks: the cached reader returns what
    zarr stores, whether every chunk fits in the cache or only one does."""
    path = fmnist_store[0]
    group = zarr.open_group(path / ARRAYS_DIR, mode="r")
    rng = np.random.default_rng(0)
    for cache_bytes in (256 << 20, 1):
        store = open_store(path, cache_bytes=cache_bytes)
        for _ in range(3):
            samples, views = rng.integers(0, 24, size=40), rng.integers(0, 2, size=40)
            batch = store.read(samples, views)
            for name, values in batch.items():
                np.testing.assert_array_equal(values, group[name][:][samples, views], err_msg=name)
    with pytest.raises(IndexError, match=r"\[0, 24\)"):
        store.read(np.array([24]), np.array([0]))


def test_replay_is_bit_exact_photos(lite0_teacher, photo_dir, tmp_path):
    captured = build_capturing(lite0_teacher, f"folder:{photo_dir}", tmp_path / "photos", workers=2)
    assert_replay_exact(lite0_teacher[0], tmp_path / "photos", captured)


def test_sigkill_resume_matches_uninterrupted(lite0_teacher, tmp_path):
    _, card, zoo_dir = lite0_teacher
    args = ["--teacher", str(zoo_dir), "--transfer-set", "fashion-mnist:test?limit=160", "--views", "2",
            "--unit-samples", "16", "--chunk-samples", "8", "--batch-size", "32", "--workers", "0"]
    out = tmp_path / "resumed"
    commits = out.with_name("resumed.partial") / "commits"
    command = [sys.executable, "-m", "reinforce.build", *args, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    committed: set[str] = set()
    while process.poll() is None:
        committed = {p.name for p in commits.glob("*.json")} if commits.exists() else set()
        if committed:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert 0 < len(committed) < 10 and not out.exists()
    subprocess.run(command, check=True, capture_output=True, env=env)

    reference = tmp_path / "reference"
    build(BuildConfig(teacher=card.name, transfer_set="fashion-mnist:test?limit=160", out=str(reference), views=2,
                      topk=5, batch_size=32, workers=0, unit_samples=16, chunk_samples=8),
          teacher=(lite0_teacher[0], card))
    resumed_store, reference_store = open_store(out), open_store(reference)
    assert resumed_store.manifest.store_id == reference_store.manifest.store_id
    for name in reference_store.fields:
        resumed = zarr.open_array(out / ARRAYS_DIR / name, mode="r")[:]
        expected = zarr.open_array(reference / ARRAYS_DIR / name, mode="r")[:]
        assert np.array_equal(resumed, expected), f"{name} differs after resume"
    assert resumed_store.samples.equals(reference_store.samples)


def test_corrupt_images_are_skipped(lite0_teacher, photo_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        shutil.copy(photo_dir / f"{name}.png", folder / f"{name}.png")
    (folder / "garbage.png").write_bytes(np.random.default_rng(0).bytes(5000))
    whole = (photo_dir / "astronaut.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    model, card, _ = lite0_teacher
    manifest = build(BuildConfig(teacher=card.name, transfer_set=f"folder:{folder}", out=str(tmp_path / "s"),
                                 views=2, workers=0), teacher=(model, card))
    assert manifest.summary["skipped"] == 2 and manifest.summary["ok"] == 3
    samples = open_store(tmp_path / "s").samples
    bad = samples.filter(pl.col("status") == "skipped")
    assert sorted(bad["key"].to_list()) == ["garbage.png", "truncated.png"]
    assert all(bad["error"].str.len_chars() > 0)
    assert samples.filter(pl.col("status") == "ok")["error"].null_count() == 3


def test_teacher_class_mismatch_fails_before_work(lite0_teacher, tmp_path, capsys):
    out = tmp_path / "never"
    code = build_main(["--teacher", str(lite0_teacher[2]), "--transfer-set", FMNIST, "--num-classes", "10",
                       "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "--num-classes 10" in error and "1000" in error
    assert not out.exists() and not out.with_name("never.partial").exists()


def test_truncated_shard_is_named(fmnist_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(fmnist_store[0], store)
    shard = store / ARRAYS_DIR / "logits_topk" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreCorruptError, match=str(shard)):
        open_store(store)
    result = subprocess.run([sys.executable, "-m", "stores", "verify", str(store)], capture_output=True, text=True)
    assert result.returncode != 0
    assert str(shard) in result.stderr


def test_flipped_bytes_are_detected(fmnist_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(fmnist_store[0], store)
    assert stores_main(["verify", str(store)]) == 0
    shard = store / ARRAYS_DIR / "logits_topk" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 8] = bytes(b ^ 0xFF for b in data[middle: middle + 8])
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert stores_main(["verify", str(store)]) != 0
    assert str(shard) in capsys.readouterr().err
    with pytest.raises(StoreCorruptError, match="logits_topk"):
        open_store(store).read(np.arange(16), np.zeros(16, dtype=np.int64))
