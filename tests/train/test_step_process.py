"""train.step_process: a step forked from the stage server runs as ``python -m`` would where the caller is now.

The server starts on the first step and outlives it, so what must follow the caller at every step — its working
directory, environment and output — is checked on a step started after the caller changed them.
"""

from __future__ import annotations

import pytest

from train.step_process import run_step

pytestmark = pytest.mark.e2e

FROZEN_TEACHER = ["--mode", "frozen", "--backbone", "tf_efficientnet_lite0", "--library", "timm", "--weights",
                  "embedded", "--size", "32", "--name", "frozen", "--out-dir", "teachers"]


def test_a_forked_step_takes_the_callers_directory_environment_and_output(tmp_path, monkeypatch, vfm_home, capfd):
    monkeypatch.chdir(tmp_path)
    assert run_step("train.teacher", FROZEN_TEACHER, threads=1) == 0  # starts the server here, if not yet started
    assert (tmp_path / "teachers" / "frozen").is_dir()  # the relative --out-dir, from the caller's directory

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    log = tmp_path / "logs" / "finetune.log"
    argv = ["--student", "mobilenetv3_small_050", "--data", "fashion-mnist:train", "--out", "student"]
    assert run_step("train.finetune", argv, threads=1, log=log) == 2  # the stage's own exit status
    assert f"Fashion-MNIST not found under {tmp_path / 'no-fashion-mnist'}" in log.read_text()
    assert not (elsewhere / "student").exists()

    assert run_step("train.teacher", FROZEN_TEACHER, threads=1) == 0
    assert (elsewhere / "teachers" / "frozen").is_dir()
    assert "frozen" in capfd.readouterr().out  # without a log, the step writes to the caller's stdout
