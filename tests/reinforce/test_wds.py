"""Webdataset stores (``stores.wds``) on the real Lite0 teacher and real Fashion-MNIST images: ``python -m
reinforce.export_wds`` shards read by plain webdataset under ``WDS_SECURE=1`` hold the zarr store's θ and targets; the
streamed replay renders the zarr replay's views; ``reinforce.build --format wds`` writes the same samples; a
truncated shard is named in one line; two torchrun ranks distilling from shards run the same number of steps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from support import REPO, cli_env
from test_build import small_config

from reinforce.build import build
from reinforce.build import main as build_main
from reinforce.export_wds import main as export_main
from reinforce.replay import ReplayDataset, StreamReplay, open_replay
from reinforce.sources import open_source
from stores import StoreCorruptError, open_store
from stores.__main__ import main as stores_main
from stores.catalog import find_store
from stores.store import SHARDS_DIR, array_paths
from stores.wds import read_shard

SAMPLES = 32
FMNIST = f"fashion-mnist:test?limit={SAMPLES}"
MAXSIZE = 150_000  # a few samples per shard, so the export has several shards


@pytest.fixture(scope="module")
def zarr_store(lite0_teacher, tmp_path_factory) -> Path:
    model, card, _ = lite0_teacher
    out = tmp_path_factory.mktemp("wds") / "zarr"
    build(small_config(card, FMNIST, out), teacher=(model, card))
    return out


@pytest.fixture(scope="module")
def wds_store(zarr_store) -> Path:
    out = zarr_store.with_name("exported")
    assert export_main([str(zarr_store), "--out", str(out), "--maxsize", str(MAXSIZE)]) == 0
    return out


def plain_webdataset_read(store: Path) -> dict[int, dict[str, np.ndarray]]:
    """Every sample of the shards as plain webdataset decodes them in a ``WDS_SECURE=1`` process (which refuses
    pickle, and local paths in gopen, so it is handed open streams): ``{index: {member: array}}``."""
    script = textwrap.dedent("""
        import glob, sys, numpy as np, webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander
        assert wds.utils.enforce_security
        shards = sorted(glob.glob(sys.argv[1] + "/*.tar"))
        streams = [{"url": path, "stream": open(path, "rb")} for path in shards]
        arrays = {}
        for sample in wds.DataPipeline(lambda: iter(streams), tar_file_expander, group_by_keys, wds.decode()):
            index = sample["header.json"]["index"]
            assert sample["__key__"] == f"{index:09d}" and "image.png" in sample
            for key, value in sample.items():
                if key.endswith(".npy"):
                    arrays[f"{index}/{key}"] = value
        np.savez(sys.argv[2], **arrays)
    """)
    dump = store.with_name(store.name + "-plain.npz")
    run = subprocess.run([sys.executable, "-c", script, str(store / SHARDS_DIR), str(dump)],
                         env=cli_env(WDS_SECURE="1"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    samples: dict[int, dict[str, np.ndarray]] = {}
    with np.load(dump, allow_pickle=False) as data:
        for name in data.files:
            index, member = name.split("/")
            samples.setdefault(int(index), {})[member] = data[name]
    return samples


def assert_same_samples(wds_path: Path, zarr_path: Path) -> None:
    """θ and every target array of every sample, all views, as plain webdataset reads them == the zarr store's."""
    zarr = open_store(zarr_path)
    samples = plain_webdataset_read(wds_path)
    assert sorted(samples) == list(range(SAMPLES))
    stored = zarr.read_range(0, SAMPLES)
    names = set(array_paths(zarr.manifest.content))
    assert {"theta", "logits/values", "logits/index", "embedding/values", "patch/values"} <= names
    for index, members in samples.items():  # theta.npy, and one structured TARGET.npy per target
        assert set(members) == {"theta.npy", *(f"{t}.npy" for t in zarr.targets)}
        for name in names:
            target, _, array = name.partition("/")
            found = members[f"{target}.npy"][array] if array else members["theta.npy"]
            assert found.dtype == stored[name].dtype and np.array_equal(found, stored[name][index]), (index, name)


@pytest.mark.e2e
def test_export_holds_the_zarr_stores_theta_and_targets(wds_store, zarr_store, capsys):
    manifest, source = open_store(wds_store).manifest, open_store(zarr_store).manifest
    assert manifest.format == "wds" and source.format == "zarr"
    assert manifest.store_id == source.store_id and manifest.content == source.content
    assert manifest.summary == source.summary
    assert len(open_store(wds_store).shards) > 2  # --maxsize split the samples
    assert_same_samples(wds_store, zarr_store)
    assert stores_main(["verify", str(wds_store)]) == 0
    root, store_id = zarr_store.parent, manifest.store_id
    assert find_store(root, store_id, "wds").url == str(wds_store)  # one id, two formats: the catalog tells them apart
    assert find_store(root, store_id, "zarr").url == str(zarr_store)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # published: never rewritten
        export_main([str(zarr_store), "--out", str(wds_store)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("already holds a published store; choose another --out")


def stream(replay: StreamReplay, epoch: int, batches: int, workers: int, batch_size: int = 8) -> list[dict]:
    """``batches`` batches of epoch ``epoch`` through the loader train.distill uses."""
    import webdataset as wds

    replay.set_epoch(epoch)
    loader = wds.WebLoader(replay.batches(batch_size), batch_size=None, num_workers=workers).with_epoch(batches)
    return list(loader)


def test_streamed_views_and_targets_equal_the_zarr_replay(wds_store, zarr_store):
    """Each streamed (sample, view) at the student's size is the zarr replay's rendering of the same view, with
    the same encoded targets; the epoch's view choice is the zarr replay's; forked workers follow set_epoch."""
    streamed, random_access = open_replay(wds_store, size=32), open_replay(zarr_store, size=32)
    assert isinstance(streamed, StreamReplay) and isinstance(random_access, ReplayDataset)
    views_seen = set()
    for epoch, workers in ((0, 0), (1, 2)):
        random_access.set_epoch(epoch)
        for batch in stream(streamed, epoch, 4, workers):
            expected = random_access.__getitems__(batch["index"].tolist())
            assert torch.equal(batch["view"], expected["view"]) and torch.equal(batch["views"], expected["views"])
            assert batch["views"].shape == (8, 3, 32, 32) and batch["views"].dtype == torch.uint8
            for target, arrays in expected["targets"].items():
                for name, values in arrays.items():
                    assert torch.equal(batch["targets"][target][name], values), (target, name)
            views_seen |= set(batch["view"].tolist())
    assert views_seen == {0, 1}
    first = [b["index"].tolist() for b in stream(streamed, 1, 2, 0)]
    assert first == [b["index"].tolist() for b in stream(streamed, 1, 2, 0)]  # reproducible per (seed, epoch)
    assert first != [b["index"].tolist() for b in stream(streamed, 2, 2, 0)]


@pytest.mark.e2e
def test_build_format_wds_writes_the_zarr_builds_samples(lite0_teacher, zarr_store, tmp_path):
    model, card, _ = lite0_teacher
    out = tmp_path / "built"
    manifest = build(small_config(card, FMNIST, out, format="wds"), teacher=(model, card))
    assert manifest.format == "wds" and manifest.layout["unit_samples"] == 16
    assert manifest.store_id == open_store(zarr_store).manifest.store_id
    assert sorted(open_store(out).shards) == [f"{SHARDS_DIR}/shard-00000{u}.tar" for u in range(2)]
    assert_same_samples(out, zarr_store)
    assert open_store(out).samples.equals(open_store(zarr_store).samples)
    again = build(small_config(card, FMNIST, out, format="wds"), teacher=(model, card))  # published: returned
    assert again.created_at == manifest.created_at


def test_photo_shards_carry_the_original_files(lite0_teacher, photo_dir, tmp_path):
    """A source with files keeps their bytes in the shards, and the streamed views are the policy's rendering
    of the decoded file, bit for bit."""
    model, card, _ = lite0_teacher
    out = tmp_path / "photos"
    build(small_config(card, f"folder:{photo_dir}", out, format="wds", targets=("logits",)), teacher=(model, card))
    store = open_store(out)
    for sample in read_shard(store.location, store.shards[0], store.manifest):
        assert sample.image == (photo_dir / sample.key).read_bytes()
    replay, source = open_replay(out, size=32), open_source(f"folder:{photo_dir}")
    for batch in stream(replay, 0, 2, 0, batch_size=3):
        for i, v, view in zip(batch["index"].tolist(), batch["view"].tolist(), batch["views"]):
            image = source.load(i)
            theta = replay.policy.sample(0, i, v, *image.shape[-2:])
            assert torch.equal(view, replay.policy.apply(image, theta, size=32)), (i, v)


@pytest.mark.e2e
def test_truncated_shard_is_named_in_one_line(wds_store, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(wds_store, store)
    replay = open_replay(store, size=32)  # opened while sound; the shard is cut under the reader
    shard = store / open_store(store).shards[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(StoreCorruptError, match=f"{shard}: truncated or corrupt tar shard"):
        for _ in stream(replay, 0, 16, 0):
            pass
    assert stores_main(["verify", str(store)]) == 2
    assert str(shard) in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "train.distill", "--store", str(store), "--student",
                          "mobilenetv3_small_050", "--out", str(tmp_path / "never")], cwd=REPO, capture_output=True,
                         text=True, env=cli_env(), timeout=300)
    lines = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert run.returncode == 2 and len(lines) == 1 and str(shard) in lines[0], run.stderr[-2000:]
    assert not (tmp_path / "never").exists()


def test_truncated_transfer_set_tar_fails_before_work(lite0_teacher, photo_dir, tmp_path, capsys):
    shard = tmp_path / "photos.tar"
    with tarfile.open(shard, "w") as tar:
        for photo in sorted(photo_dir.glob("*.png")):
            tar.add(photo, arcname=photo.name)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--teacher", str(lite0_teacher[2]), "--transfer-set", str(shard), "--format", "wds",
                    "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in error and str(shard) in error and "truncated" in error, error
    assert not out.exists() and not out.with_name("never.partial").exists()


@pytest.mark.e2e
def test_two_ranks_stream_the_same_number_of_batches(wds_store, tmp_path):
    """torchrun, 2 CPU ranks, one loader worker each, WDS_SECURE=1: the run ends (no rank waits in a collective)
    and both ranks consumed ok // (2 * batch) batches per epoch."""
    out, batch, epochs = tmp_path / "student", 4, 2
    env = cli_env(WDS_SECURE="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "train.distill",
                          "--store", str(wds_store), "--student", "mobilenetv3_small_050", "--size", "32",
                          "--epochs", str(epochs), "--batch-size", str(batch), "--workers", "1", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = SAMPLES // (2 * batch)
    seen = [np.load(out / f"rank{r}_samples.npy") for r in range(2)]
    assert seen[0].shape == seen[1].shape == (epochs, steps * batch)
    assert all(set(s.ravel().tolist()) <= set(range(SAMPLES)) for s in seen)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [steps * e for e in range(1, epochs + 1)]
    stage = json.loads((out / "student.json").read_text())["history"][-1]
    assert stage["steps"] == steps * epochs and stage["world_size"] == 2
