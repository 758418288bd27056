"""Scale-out on real processes: rank-split builds under torchrun and the DeepSpeed launcher equal a one-process
build array for array, a killed rank's work resumes, an identical rebuild runs no teacher forward, ``--add-views``
keeps the parent's views byte for byte, and ``python -m stores ls`` lists what is published."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from support import REPO, cli_env

from reinforce.build import BuildConfig, build
from reinforce.build import main as build_main
from stores import open_store
from stores.__main__ import main as stores_main
from stores.store import ARRAYS_DIR, array_paths
from stores.verify import verify_store

SPEC = "fashion-mnist:test?limit=96"
ENV = cli_env()


def build_args(zoo_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(zoo_dir), "--transfer-set", SPEC, "--targets", "logits,embedding", "--views", "2",
            "--unit-samples", "16", "--chunk-samples", "8", "--batch-size", "32", "--workers", "0", "--device", "cpu",
            "--out", str(out), *extra]


def torchrun(nproc: int, module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_free_port()), "-m", module, *args]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same_arrays(store: Path, reference: Path) -> None:
    """Every array and the sample table of ``store`` equal ``reference``'s, and they share the store id."""
    built, expected = open_store(store), open_store(reference)
    assert built.manifest.store_id == expected.manifest.store_id
    groups = [zarr.open_group(p / ARRAYS_DIR, mode="r") for p in (store, reference)]
    for name in array_paths(expected.manifest.content):
        assert np.array_equal(groups[0][name][:], groups[1][name][:]), f"{name} differs from the 1-process build"
    assert built.samples.equals(expected.samples)


@pytest.fixture(scope="module")
def reference(lite0_teacher, tmp_path_factory) -> Path:
    """The same store built by one plain process through the CLI."""
    out = tmp_path_factory.mktemp("one_rank") / "store"
    subprocess.run([sys.executable, "-m", "reinforce.build", *build_args(lite0_teacher[2], out)], cwd=REPO, env=ENV,
                   check=True, capture_output=True)
    return out


def test_two_torchrun_ranks_build_what_one_process_builds(lite0_teacher, reference, tmp_path):
    out = tmp_path / "store"
    run = subprocess.run(torchrun(2, "reinforce.build", build_args(lite0_teacher[2], out)), cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2: 3 of 6 units to write" in run.stderr and "rank 1 of 2: 3 of 6 units to write" in run.stderr
    assert_same_arrays(out, reference)
    assert run.stdout.count("views stored") == 1, "one summary line (rank 0), not one per rank"
    assert stores_main(["verify", str(out), "--against", str(reference)]) == 0


def _nudge(store: Path, name: str, steps: int) -> None:
    """Move one stored float value ``steps`` units in the last place, as a build with other threads may."""
    array = zarr.open_group(store / ARRAYS_DIR, mode="r+")[name]
    value = array[0, 0]
    for _ in range(steps):
        value = np.nextafter(value, np.inf, dtype=array.dtype)
    array[0, 0] = value


def test_verify_against_holds_two_builds_to_what_one_store_id_promises(reference, tmp_path, capsys):
    """Two builds of one id may differ by one rounding step of a float value (summation order), never more."""
    other = tmp_path / "other"
    shutil.copytree(reference, other)
    _nudge(other, "logits/lse", 1)
    assert stores_main(["verify", str(reference), "--against", str(other)]) == 0
    assert "1 one rounding step apart (logits/lse 1)" in capsys.readouterr().out
    _nudge(other, "logits/lse", 1)
    assert stores_main(["verify", str(reference), "--against", str(other)]) == 2
    assert "logits/lse: 1 entries differ by more than one rounding step (first at sample 0)" in capsys.readouterr().err
    assert open_store(reference).manifest.summary["store_id_promise"].startswith("same store id")


def test_deepspeed_launcher_runs_the_build(lite0_teacher, reference, tmp_path):
    out = tmp_path / "store"
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_accelerators", "2", "--master_port",
               str(_free_port()), "--module", "reinforce.build", *build_args(lite0_teacher[2], out)]
    run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "rank 1 of 2: 3 of 6 units to write" in run.stdout + run.stderr
    assert_same_arrays(out, reference)


def test_a_killed_rank_resumes(lite0_teacher, reference, tmp_path):
    """SIGKILL one rank after the first unit commits: torchrun stops the other; a rerun writes only what is
    missing and the store equals the one-process build."""
    out = tmp_path / "store"
    commits = out.with_name("store.partial") / "commits"
    launcher = subprocess.Popen(torchrun(2, "reinforce.build", build_args(lite0_teacher[2], out)), cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    while launcher.poll() is None and not killed:
        if commits.exists() and any(commits.glob("*.json")):
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "reinforce.build" in
                       " ".join(p.cmdline())]
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed = True
        time.sleep(0.005)
    launcher.wait(timeout=120)
    assert killed and launcher.returncode != 0, "the build finished before a rank could be killed"
    committed = len(list(commits.glob("*.json")))
    assert 0 < committed < 6 and not out.exists()
    rerun = subprocess.run(torchrun(2, "reinforce.build", build_args(lite0_teacher[2], out)), cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    left = 6 - committed
    assert f"rank 0 of 2: {(left + 1) // 2} of 6 units" in rerun.stderr, rerun.stderr[-2000:]
    assert_same_arrays(out, reference)


def count_forwards(model) -> tuple[list[int], object]:
    """Rows of every real (not meta-device) teacher forward, through a hook on the backbone's first layer."""
    rows: list[int] = []

    def hook(_, args):
        if not args[0].is_meta:
            rows.append(len(args[0]))
    return rows, model.backbone.model.conv_stem.register_forward_pre_hook(hook)


def test_identical_rebuild_returns_the_published_store(lite0_teacher, tmp_path, capsys):
    model, card, zoo = lite0_teacher
    config = BuildConfig(teacher=card.name, transfer_set="fashion-mnist:test?limit=24", out=str(tmp_path / "a"),
                         views=2, workers=0, unit_samples=16, chunk_samples=8, catalog=str(tmp_path))
    rows, hook = count_forwards(model)
    try:
        first = build(config, teacher=(model, card))
        assert sum(rows) == 24 * 2
        rows.clear()
        again = build(config, teacher=(model, card))  # the same --out
        elsewhere = build(BuildConfig(**{**config.__dict__, "out": str(tmp_path / "b")}), teacher=(model, card))
        assert rows == [], "an identical rebuild ran the teacher"
        other = build(BuildConfig(**{**config.__dict__, "out": str(tmp_path / "c"), "seed": 1}), teacher=(model, card))
        assert sum(rows) == 24 * 2, "other content (another seed) is built"
    finally:
        hook.remove()
    assert first.store_id == again.store_id == elsewhere.store_id != other.store_id
    assert not (tmp_path / "b").exists(), "nothing is copied: the catalog's store is the one to use"
    code = build_main(["--teacher", str(zoo), "--transfer-set", "fashion-mnist:test?limit=24", "--views", "2",
                       "--workers", "0", "--unit-samples", "16", "--chunk-samples", "8", "--out", str(tmp_path / "d"),
                       "--catalog", str(tmp_path)])
    assert code == 0 and f"store {tmp_path / 'a'} (id {first.store_id})" in capsys.readouterr().out

    assert stores_main(["ls", str(tmp_path), "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert sorted(listed) == ["a", "c"]
    assert listed["a"]["store_id"] == first.store_id and listed["a"]["views"] == 2 and listed["a"]["samples"] == 24
    assert listed["a"]["targets"] == {"logits": "logits"} and listed["a"]["teacher"] == card.name
    assert listed["a"]["bytes"] == sum(f.bytes for f in first.files)
    assert stores_main(["ls", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "store_id", "teacher", "transfer_set", "targets", "views", "samples", "bytes",
                                "created_at"]
    assert [line.split()[:2] for line in table[1:]] == [["a", first.store_id], ["c", other.store_id]]


def test_add_views_keeps_the_parents_views_byte_for_byte(lite0_teacher, tmp_path):
    model, card, zoo = lite0_teacher
    spec = "fashion-mnist:test?limit=24"
    common = ["--transfer-set", spec, "--targets", "logits,embedding", "--workers", "0", "--unit-samples", "16",
              "--chunk-samples", "8"]
    parent, child, fresh = tmp_path / "k2", tmp_path / "k4", tmp_path / "fresh4"
    assert build_main(["--teacher", str(zoo), *common, "--views", "2", "--out", str(parent)]) == 0
    files_before = {f.path: f.sha256 for f in open_store(parent).manifest.files}
    rows, hook = count_forwards(model)
    try:
        build(BuildConfig(teacher="", transfer_set="", out=str(child), extend=str(parent), add_views=2, workers=0),
              teacher=(model, card))
    finally:
        hook.remove()
    assert sum(rows) == 24 * 2, "the teacher ran on the new views only"
    assert build_main(["--teacher", str(zoo), *common, "--views", "4", "--out", str(fresh)]) == 0
    extended, parent_store, fresh_store = open_store(child), open_store(parent), open_store(fresh)
    assert {f.path: f.sha256 for f in parent_store.manifest.files} == files_before and verify_store(parent) == []
    content = extended.manifest.content
    assert content.views == 4 and content.lineage == {"parent": parent_store.manifest.store_id, "parent_views": 2}
    assert extended.manifest.store_id not in (parent_store.manifest.store_id, fresh_store.manifest.store_id)
    old, new, full = (s.read_range(0, 24) for s in (parent_store, extended, fresh_store))
    for name in array_paths(parent_store.manifest.content):
        assert new[name][:, :2].tobytes() == old[name].tobytes(), f"{name}: a parent view changed"
    np.testing.assert_array_equal(new["theta"], full["theta"])  # views 2..3 come from the same θ stream
    samples, views = np.repeat(np.arange(24), 2), np.tile([2, 3], 24)
    top1 = [s.decode("logits", s.read(samples, views, targets=["logits"])["logits"]).argmax(-1)
            for s in (extended, fresh_store)]
    assert (top1[0] == top1[1]).all(), "the new views' logits are the teacher's on those views"
    assert verify_store(child) == []
