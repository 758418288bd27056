"""``reinforce.build --head-on``: a linear probe's logits store made from the frozen VFM's store, with no second
backbone pass, through the command lines: the same views, θ and samples as the frozen store, the same predictions
as the probe's own teacher pass, and a store from another backbone or with other views refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reinforce.build import main as build_main
from stores.__main__ import main as stores_main
from stores.store import THETA, open_store
from train.teacher import main as teacher_main

TRANSFER = "fashion-mnist:train?shots=10&seed=0&part=unlabeled&limit=256"
BUILD = ["--transfer-set", TRANSFER, "--views", "2", "--workers", "0", "--policy", "rrc_flip", "--seed", "3"]
TEACHER = ["--backbone", "tf_efficientnet_lite0", "--weights", "embedded", "--size", "32"]
LABELS = ["--data", "fashion-mnist:train", "--shots", "5", "--folds", "0", "--baseline-student", "none"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def zoo(vfm_home) -> dict[str, str]:
    """The frozen Lite0, a linear probe and a finetuned Lite0 on it (a few real Fashion-MNIST labels)."""
    out = ["--out-dir", str(vfm_home / "teachers")]
    teacher_main([*TEACHER, "--mode", "frozen", "--name", "frozen_head_on", *out])
    teacher_main([*TEACHER, *LABELS, "--mode", "lp", "--lp-steps", "30", "--name", "lp_head_on", *out])
    teacher_main([*TEACHER, *LABELS, "--mode", "ft", "--steps", "2", "--name", "ft_head_on", *out])
    return {mode: str(vfm_home / "teachers" / f"{mode}_head_on") for mode in ("frozen", "lp", "ft")}


@pytest.fixture(scope="module")
def frozen_store(zoo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head_on") / "frozen"
    assert build_main(["--teacher", zoo["frozen"], *BUILD, "--targets", "embedding,patch", "--out", str(out)]) == 0
    return out


def _logits(store: Path) -> torch.Tensor:
    reader = open_store(store)
    stored = reader.read_range(0, reader.manifest.num_samples, targets=("logits",))
    payload = {name.split("/", 1)[1]: array.reshape(-1, *array.shape[2:]) for name, array in stored.items()
               if name != THETA}
    return reader.decode("logits", payload)


def test_head_on_frozen_store_predicts_as_the_teacher_pass(zoo, frozen_store, tmp_path):
    derived, passed = tmp_path / "derived", tmp_path / "passed"
    assert build_main(["--teacher", zoo["lp"], *BUILD, "--head-on", str(frozen_store), "--out", str(derived)]) == 0
    assert build_main(["--teacher", zoo["lp"], *BUILD, "--out", str(passed)]) == 0
    frozen, made, reference = (open_store(p) for p in (frozen_store, derived, passed))
    assert made.manifest.content.lineage == {"parent": frozen.manifest.store_id, "head_on": "embedding"}
    assert made.manifest.store_id != reference.manifest.store_id  # its values are not a teacher pass's
    n = frozen.manifest.num_samples
    assert np.array_equal(made.read_range(0, n)[THETA], frozen.read_range(0, n)[THETA])  # the frozen store's views
    assert np.array_equal(made.read_range(0, n)[THETA], reference.read_range(0, n)[THETA])
    assert made.samples.equals(frozen.samples)
    derived_logits, pass_logits = _logits(derived), _logits(passed)
    assert len(derived_logits) == n * 2
    agreement = (derived_logits.argmax(1) == pass_logits.argmax(1)).float().mean().item()
    assert agreement >= 0.98, f"the head on int8 embeddings predicts as the teacher pass on {agreement:.1%} of views"
    assert stores_main(["verify", str(derived)]) == 0
    manifest = json.loads((derived / "manifest.json").read_text())
    assert manifest["summary"]["fidelity"]["logits"]["top1_agreement"]["mean"] > 0.99


@pytest.mark.parametrize("case, expected", [
    ("ft teacher", "is not this teacher's frozen backbone"),
    ("other views", "views"),
    ("no embedding", "stores no embedding"),
])
def test_head_on_a_store_it_cannot_use_is_one_line(case, expected, zoo, frozen_store, tmp_path, capsys):
    teacher, argv, store = zoo["lp"], list(BUILD), frozen_store
    if case == "ft teacher":
        teacher = zoo["ft"]
    elif case == "other views":
        argv[argv.index("--views") + 1] = "3"
    else:
        store = tmp_path / "patch_only"
        assert build_main(["--teacher", zoo["frozen"], *BUILD, "--targets", "patch", "--out", str(store)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        build_main(["--teacher", teacher, *argv, "--head-on", str(store), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in error
    assert "--head-on" in error and expected in error, error
    assert not (tmp_path / "out").exists()
