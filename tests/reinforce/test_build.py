"""reinforce.build end to end on the real Lite0 teacher (store format 2): one teacher pass gives every target,
replay through ``open_replay`` is bit-exact and its targets belong to each view, a read opens only the asked
targets, crash resume, bad inputs, damaged stores."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
import zarr
from support import cli_env
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from reinforce.build import BuildConfig, build
from reinforce.build import main as build_main
from reinforce.replay import open_replay
from reinforce.teachers import TeacherModel, create_backbone, save_teacher
from stores import StoreCorruptError, open_store
from stores.__main__ import main as stores_main
from stores.manifest import TeacherCard
from stores.store import ARRAYS_DIR, StoreWriter, array_paths

FMNIST = "fashion-mnist:test?limit=24"
ALL_TARGETS = ("logits", "embedding", "patch")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread, as in the build subprocesses: OpenMP threads spin badly on a busy
    2-core machine (4x slower), and the resume test compares in- and out-of-process results."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_config(card: TeacherCard, transfer_set: str, out: Path, **overrides: Any) -> BuildConfig:
    settings = {"targets": ALL_TARGETS, "views": 2, "topk": 5, "batch_size": 16, "workers": 0, "unit_samples": 16,
                "chunk_samples": 8, **overrides}
    return BuildConfig(teacher=card.name, transfer_set=transfer_set, out=str(out), **settings)


def build_capturing(teacher, transfer_set: str, out: Path, workers: int) -> torch.Tensor:
    """Build a 2-view store of every target through the library; returns the normalised views the teacher's
    first layer saw (row i*K+v = sample i, view v), after checking that one forward per view gave all targets."""
    model, card, _ = teacher
    inputs: list[torch.Tensor] = []
    head_rows: list[int] = []
    stem = model.backbone.model.conv_stem  # the adapter runs timm's forward_features: hook its first layer
    hooks = [
        stem.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone())),
        model.head.register_forward_pre_hook(lambda _, args: head_rows.append(len(args[0]))),
    ]
    try:
        manifest = build(small_config(card, transfer_set, out, workers=workers), teacher=(model, card))
    finally:
        for hook in hooks:
            hook.remove()
    assert inputs[0].is_meta and len(inputs[0]) == 1, "make_codecs sizes the codecs by a meta pass: no compute"
    assert not any(x.is_meta for x in inputs[1:])
    seen = torch.cat(inputs[1:])
    assert len(seen) == manifest.num_samples * manifest.views, "the teacher ran more or less than once per view"
    assert head_rows == [len(x) for x in inputs], "logits came from another forward than the features"
    return seen


@pytest.fixture(scope="module")
def fmnist_store(lite0_teacher, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    out = tmp_path_factory.mktemp("stores") / "fmnist"
    return out, build_capturing(lite0_teacher, FMNIST, out, workers=0)


def _whole_batch(batch: Any) -> Any:
    """collate_fn, as in train.distill: ``__getitems__`` already returns a collated batch."""
    return batch


def replay_every_view(store_path: Path, size: int, workers: int) -> tuple[Any, dict[tuple[int, int], Any]]:
    """Every stored (sample, view) as training replays it: ``open_replay`` through a DataLoader with a batch
    sampler, one epoch after another until each view was drawn. Returns the dataset and
    ``{(sample, view): (uint8 [3, S, S], {target: {array: tensor}})}``."""
    replay = open_replay(store_path, size=size, seed=0)
    wanted = len(replay) * replay.views
    seen: dict[tuple[int, int], Any] = {}
    batches = BatchSampler(SequentialSampler(replay), batch_size=8, drop_last=False)
    for epoch in range(30):
        replay.set_epoch(epoch)
        for batch in DataLoader(replay, batch_sampler=batches, collate_fn=_whole_batch, num_workers=workers):
            for row, (i, v) in enumerate(zip(batch["index"].tolist(), batch["view"].tolist())):
                targets = {t: {a: x[row] for a, x in arrays.items()} for t, arrays in batch["targets"].items()}
                seen[i, v] = (batch["views"][row], targets)
        if len(seen) == wanted:
            return replay, seen
    raise AssertionError(f"30 epochs drew only {len(seen)} of {wanted} stored views")


def assert_replay_exact(model: TeacherModel, store_path: Path, teacher_inputs: torch.Tensor, workers: int) -> None:
    """Replayed views equal the teacher's inputs bit for bit, and each view's stored targets are that view's."""
    store = open_store(store_path)
    views, size = store.manifest.views, store.manifest.content.teacher.input_size
    replay, seen = replay_every_view(store_path, size, workers)
    keys = sorted(seen)
    for i, v in keys:
        replayed = model.normalize(seen[i, v][0][None])[0]
        assert torch.equal(replayed, teacher_inputs[i * views + v]), f"sample {i} view {v} is not what the teacher saw"

    stored = {t: {a: torch.stack([seen[key][1][t][a] for key in keys]) for a in arrays}
              for t, arrays in seen[keys[0]][1].items()}
    decoded = replay.decode(stored)
    with torch.inference_mode():
        fresh = model.forward_targets(torch.stack([seen[key][0] for key in keys]), tuple(decoded))
    assert torch.equal(decoded["logits"].argmax(-1), fresh["logits"].argmax(-1))
    embedding_cosine = F.cosine_similarity(decoded["embedding"][:, None], fresh["embedding"][None], dim=-1)
    assert embedding_cosine.diagonal().min() > 0.999
    assert torch.equal(embedding_cosine.argmax(-1), torch.arange(len(keys))), "a stored embedding matches another view"
    patch_cosine = F.cosine_similarity(decoded["patch"], fresh["patch"], dim=1)  # grid = the 2x2 map at 64 px
    assert patch_cosine.min() > 0.999


def test_one_build_stores_every_target(fmnist_store):
    """Logits, embedding and patch map from one teacher pass (checked in build_capturing), with codec fidelity."""
    store = open_store(fmnist_store[0])
    content = store.manifest.content
    assert {name: t.kind for name, t in content.targets.items()} == {t: t for t in ALL_TARGETS}
    assert content.targets["logits"].codec == {"name": "topk_logits", "k": 5, "num_classes": 1000,
                                               "precision": "uint8", "value_bits": 6, "index_coding": "delta"}
    assert content.targets["patch"].arrays["values"].shape == (2, 2, 1280)  # Lite0's 2x2 map at 64 px
    fidelity = store.manifest.summary["fidelity"]
    assert fidelity["logits"]["top1_agreement"]["min"] == 1.0
    assert fidelity["embedding"]["cosine"]["min"] > 0.999 and fidelity["patch"]["cosine"]["min"] > 0.999


def test_replay_is_bit_exact_fashion_mnist(lite0_teacher, fmnist_store):
    assert_replay_exact(lite0_teacher[0], *fmnist_store, workers=0)


def test_replay_is_bit_exact_photos(lite0_teacher, photo_dir, tmp_path):
    captured = build_capturing(lite0_teacher, f"folder:{photo_dir}", tmp_path / "photos", workers=2)
    assert_replay_exact(lite0_teacher[0], tmp_path / "photos", captured, workers=2)


def test_read_opens_only_the_asked_targets(fmnist_store, tmp_path):
    """With every logits and patch shard overwritten (same sizes, so the store opens), embedding reads
    through the store and the replay reader still work; a logits read names the broken array."""
    store_path = tmp_path / "store"
    shutil.copytree(fmnist_store[0], store_path)
    rng = np.random.default_rng(0)
    for target in ("logits", "patch"):
        root = store_path / ARRAYS_DIR / target
        for shard in (p for p in root.rglob("*") if p.is_file() and "c" in p.relative_to(root).parts):
            shard.write_bytes(rng.bytes(shard.stat().st_size))
    samples, views = np.arange(24), np.arange(24) % 2
    store = open_store(store_path)
    batch = store.read(samples, views, targets=["embedding"])
    assert sorted(batch) == ["embedding", "theta"] and sorted(store._arrays) == [
        "embedding/scale", "embedding/values", "theta"]
    expected = open_store(fmnist_store[0]).read(samples, views, targets=["embedding"])
    for name, values in expected["embedding"].items():
        np.testing.assert_array_equal(batch["embedding"][name], values)
    stored = store.read_range(0, 24, targets=["embedding"])  # reinforce.build --head-on reads so
    assert sorted(stored) == ["embedding/scale", "embedding/values", "theta"]
    for name, values in open_store(fmnist_store[0]).read_range(0, 24).items():
        if name in stored:
            np.testing.assert_array_equal(stored[name], values)
    replay = open_replay(store_path, targets=["embedding"])
    assert sorted(replay.__getitems__(list(range(8)))["targets"]) == ["embedding"]
    with pytest.raises(StoreCorruptError, match=re.escape(str(store_path / ARRAYS_DIR / "logits") + "/")):
        store.read(samples, views, targets=["logits"])


def test_batched_read_matches_zarr_under_any_cache_size(fmnist_store):
    """Random (sample, view) pairs, with duplicates, across chunks: the cached reader returns what
    zarr stores, for θ and every target array, whether every chunk fits in the cache or only one does."""
    path = fmnist_store[0]
    group = zarr.open_group(path / ARRAYS_DIR, mode="r")
    rng = np.random.default_rng(0)
    for cache_bytes in (256 << 20, 1):
        store = open_store(path, cache_bytes=cache_bytes)
        for _ in range(3):
            samples, views = rng.integers(0, 24, size=40), rng.integers(0, 2, size=40)
            batch = store.read(samples, views)
            np.testing.assert_array_equal(batch.pop("theta"), group["theta"][:][samples, views])
            assert sorted(batch) == sorted(ALL_TARGETS)
            for target, arrays in batch.items():
                for name, values in arrays.items():
                    np.testing.assert_array_equal(values, group[f"{target}/{name}"][:][samples, views],
                                                  err_msg=f"{target}/{name}")
    with pytest.raises(IndexError, match=r"\[0, 24\)"):
        store.read(np.array([24]), np.array([0]))


def test_inspect_prints_bytes_and_fidelity_per_target(fmnist_store, capsys):
    path = fmnist_store[0]
    assert stores_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    manifest = open_store(path).manifest
    views = manifest.num_samples * manifest.views
    for target in ALL_TARGETS:
        stored = sum(f.bytes for f in manifest.files if f.path.startswith(f"{ARRAYS_DIR}/{target}/"))
        line = re.search(rf"^target +{target} \[{target}\] name=.*: ([\d.]+) B/view$", out, re.MULTILINE)
        assert line and float(line.group(1)) == pytest.approx(stored / views, abs=0.05), out
    fidelity = re.findall(r"^  fidelity +(.*)$", out, re.MULTILINE)
    assert len(fidelity) == 3
    assert re.fullmatch(r"kl mean [\d.]+ min [\d.]+  top1_agreement mean 1\.0000 min 1\.0000", fidelity[0])
    for line in fidelity[1:]:
        cosine = re.fullmatch(r"cosine mean ([\d.]+) min ([\d.]+)", line)
        assert cosine and min(map(float, cosine.groups())) >= 0.999, line
    assert re.search(r"^policy +name=rrc_flip_randaug.*\(θ: [\d.]+ B/view\)$", out, re.MULTILINE)


@pytest.mark.e2e
def test_sigkill_resume_matches_uninterrupted(lite0_teacher, tmp_path):
    model, card, zoo_dir = lite0_teacher
    spec = "fashion-mnist:test?limit=96"
    args = ["--teacher", str(zoo_dir), "--transfer-set", spec, "--targets", ",".join(ALL_TARGETS), "--views", "2",
            "--unit-samples", "16", "--chunk-samples", "8", "--batch-size", "32", "--workers", "0"]
    out = tmp_path / "resumed"
    commits = out.with_name("resumed.partial") / "commits"
    command = [sys.executable, "-m", "reinforce.build", *args, "--out", str(out)]
    env = cli_env()
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
    committed = {int(p.stem) for p in commits.glob("*.json")}
    assert 0 < len(committed) < 6 and not out.exists()
    torn = min(set(range(6)) - committed)  # what a kill inside a unit's write leaves: shards cut short, no marker
    partial = zarr.open_group(out.with_name("resumed.partial") / ARRAYS_DIR, mode="r")
    for name, array in partial.members(max_depth=None):
        if isinstance(array, zarr.Array):
            shard = out.with_name("resumed.partial") / ARRAYS_DIR / name / "c" / str(torn) / "/".join(
                ["0"] * (array.ndim - 1))
            shard.parent.mkdir(parents=True, exist_ok=True)
            shard.write_bytes(b"\x00" * 100)
    forwards: list[int] = []  # rows of every real teacher forward of the rerun (the meta shape pass excluded)
    hook = model.backbone.model.conv_stem.register_forward_pre_hook(
        lambda _, args: None if args[0].is_meta else forwards.append(len(args[0])))
    try:
        build(small_config(card, spec, out, batch_size=32), teacher=(model, card))
    finally:
        hook.remove()
    assert sum(forwards) == (96 - 16 * len(committed)) * 2, "the rerun recomputed committed units or skipped some"

    reference = tmp_path / "reference"
    build(small_config(card, spec, reference, batch_size=32), teacher=(model, card))
    resumed_store, reference_store = open_store(out), open_store(reference)
    assert resumed_store.manifest.store_id == reference_store.manifest.store_id
    names = set(array_paths(reference_store.manifest.content))
    assert {"theta", "logits/values", "embedding/values", "patch/values"} <= names
    groups = [zarr.open_group(p / ARRAYS_DIR, mode="r") for p in (out, reference)]
    for group in groups:
        assert {k for k, v in group.members(max_depth=None) if isinstance(v, zarr.Array)} == names
    for name in sorted(names):
        resumed, expected = (group[name][:] for group in groups)
        assert np.array_equal(resumed, expected), f"{name} differs after resume"
    assert resumed_store.samples.equals(reference_store.samples)


def test_partial_build_with_other_settings_is_refused(lite0_teacher, tmp_path, capsys):
    """An interrupted 2-view build is not resumed by a 4-view command: one line names the difference."""
    zoo = lite0_teacher[2]
    args = ["--teacher", str(zoo), "--transfer-set", FMNIST, "--workers", "0"]
    assert build_main([*args, "--views", "2", "--out", str(tmp_path / "two")]) == 0
    two = open_store(tmp_path / "two").manifest
    out = tmp_path / "store"
    StoreWriter(out, two.content, **two.layout).create()  # the 2-view build, interrupted before any unit
    args += ["--out", str(out)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        build_main([*args, "--views", "4"])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in error
    assert "holds an interrupted build with different settings" in error and "content.views: 2 != 4" in error, error
    assert not out.exists()


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
    assert len(open_replay(tmp_path / "s")) == 3


def test_teacher_class_mismatch_fails_before_work(lite0_teacher, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--teacher", str(lite0_teacher[2]), "--transfer-set", FMNIST, "--num-classes", "10",
                    "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--num-classes 10" in error and "1000" in error
    assert not out.exists() and not out.with_name("never.partial").exists()


def test_logits_from_a_headless_teacher_fail_in_one_line(lite0_teacher, tmp_path, capsys):
    card = lite0_teacher[1]
    headless = TeacherCard(name="lite0_frozen", library="timm", backbone=card.backbone, num_classes=0, class_names=(),
                           input_size=card.input_size, mean=card.mean, std=card.std, adaptation={"mode": "frozen"})
    model = TeacherModel(create_backbone("timm", card.backbone), 0, card.mean, card.std)
    save_teacher(model, headless, tmp_path / "lite0_frozen")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--teacher", str(tmp_path / "lite0_frozen"), "--transfer-set", FMNIST, "--targets", "logits",
                    "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "--targets logits" in error and "embedding,patch" in error, error
    assert not out.exists() and not out.with_name("never.partial").exists()


def test_truncated_shard_is_named(fmnist_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(fmnist_store[0], store)
    shard = store / ARRAYS_DIR / "logits" / "values" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreCorruptError, match=str(shard)):
        open_store(store)
    assert stores_main(["verify", str(store)]) != 0
    assert str(shard) in capsys.readouterr().err


def test_flipped_bytes_are_detected(fmnist_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(fmnist_store[0], store)
    assert stores_main(["verify", str(store)]) == 0
    shard = store / ARRAYS_DIR / "logits" / "values" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[8:16] = bytes(b ^ 0xFF for b in data[8:16])  # inside the first chunk (the shard index is at the end)
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert stores_main(["verify", str(store)]) != 0
    assert str(shard) in capsys.readouterr().err
    with pytest.raises(StoreCorruptError, match=re.escape(str(store / ARRAYS_DIR / "logits" / "values"))):
        open_store(store).read(np.arange(16), np.zeros(16, dtype=np.int64), targets=["logits"])


def test_build_refusals_name_the_problem(lite0_teacher, tmp_path, capsys):
    """A --topk the head cannot give, tampered teacher weights and a rebuild over another teacher's store: one line
    each, exit 2, naming what is wrong; nothing is written."""
    model, card, zoo_dir = lite0_teacher
    tampered = tmp_path / "tampered"
    shutil.copytree(zoo_dir, tampered)
    weights = bytearray((tampered / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # the last byte of the last tensor
    (tampered / "model.safetensors").write_bytes(bytes(weights))
    build_main(["--teacher", str(zoo_dir), "--transfer-set", "fashion-mnist:test?limit=4", "--views", "1",
                "--workers", "0", "--out", str(tmp_path / "store")])
    save_teacher(model, dataclasses.replace(card, name="lite0_other"), tmp_path / "lite0_other")
    capsys.readouterr()
    for argv, expected in [
        (["--teacher", str(zoo_dir), "--topk", "1001"], "--topk 1001 exceeds the teacher's 1000 classes"),
        (["--teacher", str(tampered)], f"teacher.json records {card.weights_sha256[:12]}"),
        (["--teacher", str(tmp_path / "lite0_other")], f"{tmp_path / 'store'} already holds a different store"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            build_main([*argv, "--transfer-set", "fashion-mnist:test?limit=4", "--views", "1", "--workers", "0",
                        "--out", str(tmp_path / "store")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in err and err.startswith("reinforce.build: error: "), err
        assert expected in err, err
    assert not (tmp_path / "store.partial").exists()
    assert open_store(tmp_path / "store").manifest.content.teacher.name == card.name  # the first store, untouched
