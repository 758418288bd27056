"""Two train.pipeline processes on one run directory: each step is made once (a per-step lock, the store's
one-writer lock), the other process waits for it and reads it back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from train.pipeline import DONE, Runner, Step, step_lock
from train.recipe import load_recipe

RECIPE = {
    "data": "fashion-mnist:train",
    "test": "fashion-mnist:test?limit=200",
    "seeds": [0],
    "folds": 3,
    "threads": 1,
    "grid": {"shots": [3], "transfer": ["task-related"], "method": ["task-agnostic-embedding"],
             "teacher_mode": ["lp"]},
    "transfer_sets": {"task-related": "fashion-mnist:train?shots=3&seed=0&part=unlabeled&limit=256"},
    "teacher": {"backbone": "tf_efficientnet_lite0", "library": "timm", "weights": "embedded", "size": 32},
    "build": {"views": 1, "batch_size": 256, "workers": 0},
    "student": {"arch": "mobilenetv3_small_050", "size": 32},
    "distill": {"epochs": 1, "batch_size": 64, "workers": 0},
    "finetune": {"lr": [0.003], "steps": [0, 6], "batch_size": 16},
}


def test_a_dead_owners_step_lock_is_taken_over(tmp_path):
    out = tmp_path / "steps" / "abc"
    if (dead := os.fork()) == 0:  # a pid that ran on this host and is gone
        os._exit(0)
    os.waitpid(dead, 0)
    (lock_dir := out.with_name("abc.lock")).mkdir(parents=True)
    (lock_dir / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    with step_lock(out, poll=0.01):
        assert json.loads((lock_dir / "lock.json").read_text())["pid"] == os.getpid()
    assert not lock_dir.exists()


@pytest.mark.e2e
def test_two_pipelines_on_one_run_dir_make_each_step_once(tmp_path, vfm_home):
    recipe = tmp_path / "one_cell.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    command = [sys.executable, "-m", "train.pipeline", str(recipe), "--run-dir", str(tmp_path / "run")]
    pipelines = [subprocess.Popen(command) for _ in range(2)]
    assert [p.wait(timeout=900) for p in pipelines] == [0, 0]
    log = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    ran = Counter(e["out"] for e in log if e["status"] == "ran")
    assert set(ran.values()) == {1}
    assert {e["out"] for e in log} == set(ran)  # the other process skipped the steps it waited for
    assert all((tmp_path / "run" / out / DONE).exists() for out in ran)
    assert not list((tmp_path / "run").glob("*/*.lock"))


@pytest.mark.e2e
def test_the_failed_step_is_named_by_the_steps_it_stops(tmp_path):
    """With jobs, the error a user sees can come from a step that never started because another one failed (the
    first error of the cells in grid order): it names the step that failed, its command line and its log."""
    (recipe := tmp_path / "jobs.yaml").write_text(yaml.safe_dump({**RECIPE, "jobs": 2}))
    runner, run_dir = Runner(tmp_path / "run", load_recipe(recipe)), tmp_path / "run"
    run_dir.mkdir()

    def evaluate(name: str) -> Step:
        argv = ("--model", str(tmp_path / "no-such-model"), "--data", "fashion-mnist:test?limit=8")
        return Step("evaluate", argv, run_dir / "evaluates" / name)

    log = run_dir / "logs" / "evaluates" / "bad.log"
    with pytest.raises(ChildProcessError, match=rf"^stage evaluate failed \(exit status 2\): python -m train.evaluate "
                                                rf".*; its output: {log}$"):
        runner.ensure(evaluate("bad"))
    assert "no-such-model" in log.read_text()
    with pytest.raises(ChildProcessError, match=rf"^stage evaluate not started because stage evaluate failed .*{log}$"):
        runner.ensure(evaluate("later"))
    assert not (run_dir / "evaluates" / "later").exists()
