"""The end-to-end lane's shared artifacts: one teacher, store, distilled and finetuned student, made through the
command-line tools as a user makes them; tests that change them work on a copy. The tests that use them live in one
file (test_export.py), so under ``--dist loadfile`` they are made once per test run, not once per worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import HELD_OUT, cli_env, run_module


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A Lite0 teacher (linear probe), a store, a distilled and a finetuned student: the CLIs on Fashion-MNIST.
    Read-only for tests: one that writes into it takes ``shutil.copytree`` of it first."""
    root = tmp_path_factory.mktemp("exported")
    env = cli_env(VFM_REINFORCE_HOME=str(root / "home"))
    run_module(["-m", "train.teacher", "--backbone", "tf_efficientnet_lite0", "--data", "fashion-mnist:train",
                "--shots", "10", "--mode", "lp", "--size", "32", "--lp-views", "0", "--lp-steps", "100", "--folds", "0",
                "--name", "lite0", "--out-dir", "teachers"], root, env)
    run_module(["-m", "reinforce.build", "--teacher", "teachers/lite0", "--transfer-set",
                "fashion-mnist:train?limit=512", "--views", "1", "--out", "store", "--workers", "0"], root, env,
               root / "build.log")
    run_module(["-m", "train.distill", "--store", "store", "--student", "mobilenetv3_small_050", "--epochs", "2",
                "--batch-size", "64", "--lr", "0.005", "--workers", "0", "--out", "distilled"], root, env,
               root / "distill.log")
    run_module(["-m", "train.finetune", "--init", "distilled", "--data", "fashion-mnist:train", "--shots", "10",
                "--steps", "40", "--batch-size", "32", "--lr", "0.003", "--out", "student"], root, env)
    for name, model in (("student", "student"), ("teacher", "teachers/lite0")):
        run_module(["-m", "train.evaluate", "--model", model, "--data", HELD_OUT, "--predictions", f"{name}.npy",
                    "--out", f"{name}.json"], root, env)
    return root
