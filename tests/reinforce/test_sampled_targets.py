"""Sampled teacher targets through the command lines: ``reinforce.build --codec sampled_logits``, a bit-identical
rebuild, ``train.distill --loss auto`` (sampled_ce), ``train.evaluate``'s calibration, and a wrong codec/loss
pairing refused in one line; a 1000-class store within 12 B/view with θ whose targets average to the teacher's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import REPO, cli_env

from reinforce.build import main as build_main
from stores.codecs import bias_z2_per_dof
from stores.store import THETA, open_store
from stores.verify import describe_store
from train.card import render_card
from train.evaluate import main as evaluate_main
from train.teacher import main as teacher_main

TRANSFER = "fashion-mnist:train?shots=10&seed=0&part=unlabeled&limit=256"
SAMPLED = ["--codec", "sampled_logits", "--samples", "16", "--sample-temperature", "2", "--workers", "0",
           "--policy", "rrc_flip"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def teacher(vfm_home) -> str:
    """A real few-shot teacher: Lite0 ImageNet backbone + linear probe on 100 Fashion-MNIST labels, 32 px."""
    teacher_main(["--backbone", "tf_efficientnet_lite0", "--weights", "embedded", "--data", "fashion-mnist:train",
                  "--shots", "10", "--mode", "lp", "--folds", "0", "--size", "32", "--lp-steps", "100",
                  "--baseline-student", "none", "--name", "lp_sampled", "--out-dir", str(vfm_home / "teachers")])
    return str(vfm_home / "teachers" / "lp_sampled")


@pytest.fixture(scope="module")
def store(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sampled") / "store"
    assert build_main(["--teacher", teacher, "--transfer-set", TRANSFER, *SAMPLED, "--views", "2", "--out",
                       str(out)]) == 0
    return out


def distill(store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = cli_env()
    return subprocess.run([sys.executable, "-m", "train.distill", "--store", str(store), "--student",
                           "mobilenetv3_small_050", "--size", "32", "--epochs", "1", "--batch-size", "64",
                           "--workers", "0", "--out", str(out), *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_sampled_store_holds_draws_and_rebuilds_bit_identically(store, teacher, tmp_path):
    manifest = open_store(store).manifest
    codec = manifest.content.targets["logits"].codec
    assert codec == {"name": "sampled_logits", "samples": 16, "num_classes": 10, "temperature": 2.0,
                     "proposal_temperature": None}
    payload = open_store(store).read_range(0, manifest.num_samples)
    counts = payload["logits/count"].astype(int)
    assert (counts.sum(-1) == 16).all()  # every view: 16 draws over its distinct classes
    decoded = open_store(store).decode("logits", {"index": payload["logits/index"][:, 0],
                                                  "count": payload["logits/count"][:, 0]})
    torch.testing.assert_close(decoded.sum(-1), torch.ones(len(decoded)))
    again = tmp_path / "again"
    assert build_main(["--teacher", teacher, "--transfer-set", TRANSFER, *SAMPLED, "--views", "2", "--out",
                       str(again)]) == 0
    rebuilt = open_store(again)
    assert rebuilt.manifest.store_id == manifest.store_id
    for name, array in rebuilt.read_range(0, manifest.num_samples).items():
        assert np.array_equal(array, payload[name]), name  # θ and the draws: keyed by (seed, sample, view)
    assert THETA in payload


def test_extend_draws_the_new_views_as_a_longer_build_would(store, teacher, tmp_path):
    """--extend --add-views 1 copies the 2 stored views and draws view 2 exactly as a 3-view build draws it."""
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    assert build_main(["--extend", str(store), "--add-views", "1", "--teacher", teacher, "--workers", "0",
                       "--out", str(extended)]) == 0
    assert build_main(["--teacher", teacher, "--transfer-set", TRANSFER, *SAMPLED, "--views", "3", "--out",
                       str(fresh)]) == 0
    samples = open_store(fresh).manifest.num_samples
    mine, theirs = open_store(extended).read_range(0, samples), open_store(fresh).read_range(0, samples)
    for name in ("logits/index", "logits/count", THETA):
        assert np.array_equal(mine[name], theirs[name]), name


def test_distill_auto_picks_sampled_ce_and_evaluate_reports_calibration(store, tmp_path, capsys):
    done = distill(store, tmp_path / "student", "--temperature", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    stage = json.loads((tmp_path / "student" / "student.json").read_text())["history"][-1]
    assert stage["losses"] == {"logits": "sampled_ce"}
    assert stage["temperature"] == 2.0  # the store's sampling temperature, not --temperature
    student, evaluation = tmp_path / "student", tmp_path / "eval.json"
    assert evaluate_main(["--model", str(student), "--data", "fashion-mnist:test?limit=200", "--out",
                          str(evaluation)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ece_bins"] == "15 equal-width" and 0 <= printed["ece"] <= 1 and printed["nll"] > 0
    assert 0 <= printed["brier"] <= 2 and sum(printed["reliability"]["count"]) == 200
    assert printed == json.loads(evaluation.read_text())
    card = render_card(student, evaluation)  # the model card carries the calibration
    assert f"| ECE (15 equal-width bins) | {printed['ece']:.2%} |" in card and f"| NLL | {printed['nll']:.3f} |" in card


def test_wrong_codec_loss_pairing_is_refused_in_one_line(store, tmp_path):
    done = distill(store, tmp_path / "kl", "--loss", "kl")
    assert done.returncode == 2
    assert done.stderr.strip() == ("train.distill: error: loss 'kl' reads logits targets decoded to log_probs; this "
                                   "target is logits decoded to empirical: use --loss sampled_ce")


def test_1000_class_sampled_store_is_small_and_unbiased(lite0_teacher, tmp_path):
    """The real ImageNet Lite0 teacher on real photo crops: 4 draws per view fit in 12 B/view with θ, and the draws
    pooled over views match the teacher's probabilities (z²/dof ≈ 1: deviations of the size N multinomial draws
    make) where top-5's decoded targets do not. A top-k target's bias is fixed per view while its z² grows with the
    views pooled, so each view's target is also drawn again under 32 other keys (the store's codec, no teacher
    pass): 32 x 2048 views."""
    common = ["--teacher", str(lite0_teacher[2]), "--transfer-set", "photo-crops:512@96", "--views", "4",
              "--workers", "0", "--policy", "rrc_flip"]
    sampled, top5, fp16 = (tmp_path / name for name in ("sampled", "top5", "fp16"))
    assert build_main([*common, "--codec", "sampled_logits", "--samples", "4", "--out", str(sampled)]) == 0
    assert build_main([*common, "--topk", "5", "--out", str(top5)]) == 0
    assert build_main([*common, "--topk", "1000", "--logit-precision", "fp16", "--out", str(fp16)]) == 0
    described = describe_store(sampled)
    assert described["targets"]["logits"]["bytes_per_view"] + described["theta_bytes_per_view"] <= 12.0
    log_p = decode_all(fp16)  # the teacher's exact log-probabilities (fp16 logits)
    teacher = log_p.exp()
    z2_stored = bias_z2_per_dof(decode_all(sampled).sum(0), teacher, 4)
    codec = open_store(sampled).codec("logits")
    keys = np.stack([np.zeros(len(log_p)), np.arange(len(log_p)), np.zeros(len(log_p))], 1).astype(np.int64)
    redrawn = torch.zeros(1000, dtype=torch.float64)
    for seed in range(1, 33):
        keys[:, 0] = seed
        redrawn += codec.round_trip(log_p, keys).double().sum(0)
    z2_redrawn = bias_z2_per_dof(redrawn, teacher, 4, repeats=32)
    z2_top5 = bias_z2_per_dof(32 * decode_all(top5).exp().sum(0), teacher, 4, repeats=32)
    print(f"\nz²/dof: sampled, {len(teacher)} stored views {z2_stored:.2f}; 32 x {len(teacher)} views: sampled "
          f"{z2_redrawn:.2f}, top-5 {z2_top5:.2f}")
    assert 0.5 < z2_stored < 1.5 and 0.5 < z2_redrawn < 1.5 < z2_top5


def decode_all(path: Path) -> torch.Tensor:
    store = open_store(path)
    payload = store.read_range(0, store.manifest.num_samples)
    return store.decode("logits", {a.split("/", 1)[1]: v.reshape(-1, *v.shape[2:]) for a, v in payload.items()
                                   if a.startswith("logits/")})
