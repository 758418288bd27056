"""train.teacher / train.finetune / train.evaluate end to end, small enough for a 2-core CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reinforce.sources import open_source
from reinforce.teachers import create_teacher, read_teacher_card
from stores.manifest import TeacherCard
from train import evaluate, finetune, teacher
from train.data import LabeledViews, evaluate_model, open_labeled
from train.models import StudentCard, create_student, load_student, read_student_card, save_student
from train.optim import TrainSchedule, fit, fit_together, split_labeled
from train.protocol import kfold_indices

HELD_OUT = "fashion-mnist:test?limit=300"


@pytest.fixture(autouse=True)
def _home(vfm_home, monkeypatch, tmp_path) -> Path:
    """Every test runs in its own directory with its own $VFM_REINFORCE_HOME (the zoo ``train.teacher`` writes to),
    sharing the session's converted Lite0 weights."""
    monkeypatch.chdir(tmp_path)
    (vfm_home / "weights").mkdir(exist_ok=True)
    home = tmp_path / "home"
    home.mkdir()
    (home / "weights").symlink_to(vfm_home / "weights", target_is_directory=True)
    monkeypatch.setenv("VFM_REINFORCE_HOME", str(home))
    return home


def assert_same_weights(a: str | Path, b: str | Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6, msg=name)


def teach(*argv: str) -> TeacherCard:
    """``python -m train.teacher ARGV`` (in process); the card it wrote to the zoo."""
    assert teacher.main(list(argv)) == 0
    return read_teacher_card(Path(os.environ["VFM_REINFORCE_HOME"]) / "teachers" / argv[argv.index("--name") + 1])


def tune(*argv: str) -> StudentCard:
    """``python -m train.finetune ARGV`` (in process); the card of the student it wrote."""
    assert finetune.main(list(argv)) == 0
    return read_student_card(argv[argv.index("--out") + 1])


def _one_line_error(capsys, main, argv: list[str], prog: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith(f"{prog}: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_lite0_linear_probe_beats_chance(_home, capsys):
    card = teach("--backbone", "tf_efficientnet_lite0", "--data", "fashion-mnist:train", "--shots", "5",
                 "--mode", "lp", "--size", "32", "--lp-views", "1", "--lp-steps", "50", "--folds", "2",
                 "--baseline-student", "none", "--name", "lite0_lp")
    assert card.adaptation["mode"] == "lp" and 0 <= card.val_accuracy <= 1
    # the zoo is written where lookups look first ($VFM_REINFORCE_HOME/teachers), not in ./teachers
    assert (_home / "teachers" / "lite0_lp" / "teacher.json").is_file() and not Path("teachers").exists()
    err = capsys.readouterr().err  # cross-validation and training say how far they are
    assert "#cv0-train: lp features: 50/50 view" in err  # 2 folds of 25, clean + 1 augmented view
    assert "lp@32,lr=0.003 on all 50 images: lp head: 50/50 step" in err
    model, loaded = create_teacher("lite0_lp")
    assert loaded.num_classes == 10 and loaded.mean == (0.5, 0.5, 0.5)
    metrics = evaluate_model(model, open_source(HELD_OUT), loaded.input_size)
    assert metrics["top1"] > 0.4, metrics  # chance is 0.1


@pytest.mark.parametrize(("library", "backbone", "mode", "size", "folds"), [
    ("timm", "vit_small_patch14_dinov2", "auto", "28", "2"),  # auto: 2-fold CV of lp and ft, then retrain
    pytest.param("open_clip", "ViT-B-32", "lp", "32", "0", marks=pytest.mark.e2e),  # a ViT-B end to end: 30 s
])
def test_vfm_backbones_from_local_weights(tmp_path, random_weights, library, backbone, mode, size, folds):
    weights = random_weights(library, backbone, tmp_path / "backbone.safetensors")
    teach("--library", library, "--backbone", backbone, "--weights", weights, "--data", "fashion-mnist:train",
          "--shots", "2", "--mode", mode, "--size", size, "--steps", "2", "--batch-size", "5", "--lp-steps", "3",
          "--lp-views", "0", "--folds", folds, "--baseline-student", "none", "--name", "vfm")
    model, card = create_teacher("vfm")
    assert (card.library, card.backbone) == (library, backbone)
    if mode == "auto":
        scores = card.adaptation["scores"]
        assert set(scores) == {f"lp@{size},lr=0.003", f"ft@{size},lr=0.0003"}
        assert card.val_accuracy == scores[card.adaptation["chosen"]] == max(scores.values())
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, int(size), int(size), dtype=torch.uint8)).shape == (2, 10)
    if mode == "lp":  # a rerun with the same seed gives the same teacher
        teach("--library", library, "--backbone", backbone, "--weights", weights, "--data", "fashion-mnist:train",
              "--shots", "2", "--mode", mode, "--size", size, "--lp-steps", "3", "--lp-views", "0", "--folds", folds,
              "--name", "vfm_again")
        zoo = Path(os.environ["VFM_REINFORCE_HOME"]) / "teachers"
        assert_same_weights(zoo / "vfm/model.safetensors", zoo / "vfm_again/model.safetensors")


def test_labeled_only_baseline_and_evaluate(capsys):
    card = tune("--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train",
                "--shots", "2", "--steps", "3", "--batch-size", "8", "--folds", "0", "--out", "baseline")
    assert card.history[-1]["stage"] == "labeled_only" and card.history[-1]["steps"] == 3
    tune("--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train",
         "--shots", "2", "--steps", "3", "--batch-size", "8", "--folds", "0", "--out", "baseline_again")
    assert_same_weights("baseline/model.safetensors", "baseline_again/model.safetensors")  # seeded init and data
    _, loaded = load_student("baseline")
    assert loaded.input_size == 32 and loaded.num_classes == 10
    capsys.readouterr()
    assert evaluate.main(["--model", "baseline", "--data", "fashion-mnist:test?limit=40", "--out", "eval.json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(Path("eval.json").read_text())
    assert printed == result
    assert {"top1", "balanced_accuracy", "num_images", "model"} <= set(result) and result["num_images"] == 40


def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path):
    student, card = create_student("mobilenetv3_small_050", class_names=("a", "b", "c"), input_size=32)
    save_student(student, card, "three_classes")
    err = _one_line_error(capsys, finetune.main, ["--init", "three_classes", "--data", "fashion-mnist:train",
                                                  "--out", "x"], "train.finetune")
    assert "3 classes" in err
    _one_line_error(capsys, teacher.main, ["--backbone", "no_such_net", "--weights", str(tmp_path / "w.safetensors"),
                                           "--data", "fashion-mnist:train", "--name", "t"], "train.teacher")
    _one_line_error(capsys, teacher.main, ["--backbone", "resnet18", "--weights", "missing.safetensors",
                                           "--data", "fashion-mnist:train", "--name", "t"], "train.teacher")
    _one_line_error(capsys, evaluate.main, ["--model", "baseline", "--data", "no-such-source"], "train.evaluate")


@pytest.mark.e2e
def test_unknown_student_from_the_command_line():
    run = subprocess.run([sys.executable, "-m", "train.finetune", "--student", "no_such_net", "--size", "32",
                          "--data", "fashion-mnist:train", "--out", "x"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("train.finetune: error: timm has no model named 'no_such_net'")
    assert len(run.stderr.strip().splitlines()) == 1


def test_validation_split_is_stratified_seeded_and_disjoint():
    source, _ = open_labeled("fashion-mnist:train", 5, 0)
    train_part, val_part = split_labeled(source, 0.2, seed=0)
    assert np.bincount(val_part.labels).tolist() == [1] * 10  # round(0.2 * 5) = 1 per class
    assert np.bincount(train_part.labels).tolist() == [4] * 10
    assert not set(train_part.keys) & set(val_part.keys)
    assert set(train_part.keys) | set(val_part.keys) == set(source.keys)
    again = split_labeled(source, 0.2, seed=0)[1]
    assert again.keys.tolist() == val_part.keys.tolist()
    assert split_labeled(source, 0.0) == (source, None)
    with pytest.raises(ValueError, match="at least 2 labeled images per class"):
        split_labeled(open_labeled("fashion-mnist:train", 1, 0)[0], 0.2)


def test_finetune_keeps_the_best_validation_weights_and_stops_early():
    card = tune("--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train",
                "--shots", "5", "--steps", "60", "--batch-size", "16", "--lr", "0.003",
                "--val-fraction", "0.2", "--eval-every", "1", "--patience", "1", "--out", "tuned")
    stage = card.history[-1]
    curve = dict(stage["val_curve"])
    assert stage["train_images"] == 40 and stage["val_images"] == 10
    # patience 1, a tie counting as progress: the run goes on while no evaluation falls below the best so far and
    # stops at the first one that does
    scores = list(curve.values())
    assert all(score >= max(scores[:i]) for i, score in enumerate(scores[:-1]) if i)
    assert scores[-1] < max(scores[:-1]) and stage["steps_run"] == max(curve) < stage["steps"]
    assert stage["val_top1"] == max(curve.values()) == curve[stage["best_step"]]
    model, _ = load_student("tuned")  # the saved weights are the best-validation ones, not the last
    val_part = split_labeled(open_labeled("fashion-mnist:train", 5, 0)[0], 0.2, seed=0)[1]
    assert evaluate_model(model, val_part, 32)["top1"] == pytest.approx(stage["val_top1"], abs=1e-4)


def test_feature_distilled_student_gets_a_classifier():
    student, card = create_student("mobilenetv3_small_050", class_names=(), input_size=32)
    save_student(student, card, "headless")
    tuned = tune("--init", "headless", "--data", "fashion-mnist:train", "--shots", "2", "--steps", "2",
                 "--batch-size", "8", "--folds", "0", "--out", "with_head")
    assert tuned.num_classes == 10 and tuned.class_names[0] == "T-shirt/top"
    model, _ = load_student("with_head")
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)
    assert evaluate.evaluate("with_head", "fashion-mnist:test?limit=20")["num_images"] == 20


def test_frozen_teacher_needs_no_labels_and_task_teacher_trains_on_all_labels():
    card = teach("--backbone", "tf_efficientnet_lite0", "--mode", "frozen", "--size", "32", "--name", "vfm")
    assert (card.num_classes, card.class_names, card.adaptation["mode"]) == (0, (), "frozen")
    model, loaded = create_teacher("vfm")
    with torch.inference_mode():
        assert model.features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 1280)
    assert loaded.num_classes == 0
    lp = teach("--backbone", "tf_efficientnet_lite0", "--data", "fashion-mnist:train", "--shots", "5",
               "--mode", "lp", "--size", "32", "--lp-views", "0", "--lp-steps", "20", "--folds", "5",
               "--baseline-student", "none", "--name", "lp")
    assert lp.adaptation["train_images"] == 50  # the saved teacher trains on every labeled image
    assert lp.adaptation["val_predictions"] == 50 and lp.adaptation["fold_sizes"] == [10] * 5
    assert lp.val_accuracy == lp.adaptation["val_top1"] is not None
    assert round(lp.val_accuracy * 50, 6) == round(lp.val_accuracy * 50)  # pooled: a count of 50 predictions


def test_a_plateau_starts_the_cooldown_and_the_run_ends_annealed():
    card = tune("--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train",
                "--shots", "5", "--steps", "200", "--batch-size", "16", "--lr", "0.003",
                "--val-fraction", "0.2", "--eval-every", "2", "--patience", "1", "--cooldown", "5",
                "--out", "cooled")
    stage = card.history[-1]
    best, first_drop = -1.0, None
    for step, value in stage["val_curve"]:
        if value < best:
            first_drop = step
            break
        best = value
    # the plateau at first_drop starts a 6-step (5 rounded up to the eval interval) decay; the run ends there
    assert first_drop is not None and stage["cooldown"] == 6
    assert stage["steps_run"] == first_drop + 6 == stage["val_curve"][-1][0] < 200


def test_learning_rate_is_constant_until_the_cooldown_then_reaches_zero():
    from train.optim import LearningRate, TrainSchedule

    rate = LearningRate(TrainSchedule(steps=100, lr=1.0, warmup_fraction=0.1, cooldown=20))
    assert [rate(s) for s in (0, 9, 10, 50, 80, 90, 100)] == [0.1, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    assert rate.plateau(30) and rate.end == 50 and rate(40) == 0.5 and rate(50) == 0.0
    assert rate.plateau(45) and rate.end == 50  # a plateau during the cooldown keeps it
    assert not LearningRate(TrainSchedule(steps=100, lr=1.0)).plateau(30)  # cosine: a plateau stops


def test_teacher_size_defaults_to_the_backbones_pretrained_size(tmp_path, random_weights):
    weights = random_weights("timm", "resnet18", tmp_path / "r18.safetensors")
    card = teach("--backbone", "resnet18", "--weights", weights, "--mode", "frozen", "--name", "native")
    assert card.input_size == 224  # timm pretrained_cfg input_size


def test_random_init_student_takes_the_architectures_pretrained_size():
    """``--student`` without ``--size`` trains at the architecture's pretrained size, as a teacher does."""
    card = tune("--student", "mobilenetv3_small_050", "--data", "fashion-mnist:train", "--shots", "1",
                "--steps", "1", "--batch-size", "2", "--folds", "0", "--out", "native")
    assert card.input_size == 224 and card.history[-1]["size"] == 224  # timm pretrained_cfg input_size


@pytest.mark.parametrize(("module", "shown"), [
    ("train.finetune", [r"--batch-size BATCH_SIZE\s+\(default: 32\)", r"--patience PATIENCE +\(default: 0\)",
                        r"--steps STEPS .*\(default: 300\)", r"--lr LR .*\(default: 0.001\)"]),
    ("train.distill", [r"--epochs EPOCHS .*\(default: \d+\)"]),
    ("reinforce.build", [r"--views VIEWS .*\(default: \d+\)"]),
    ("train.pipeline", [r"--run-dir RUN_DIR .*\(default: runs/pipeline\)"]),
    ("stores", []),
])
def test_help_shows_each_flags_default(module, shown, capsys, monkeypatch):
    """Every CLI's ``--help`` says what an omitted flag means (flags without help text too)."""
    import importlib
    import re

    monkeypatch.setenv("COLUMNS", "300")  # one line per flag
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module if module != "stores" else "stores.__main__").main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and text.startswith("usage:")
    for pattern in shown:
        assert re.search(pattern, text), (pattern, text)


@pytest.mark.e2e  # teacher and build end to end, a 300-step labels-only student: 40 s
@pytest.mark.parametrize("strong", [False, True])
def test_build_warns_when_the_teacher_is_not_ahead_of_labels_only(strong, caplog):
    """The labels-only student is cross-validated on the teacher's folds by default; a teacher not ahead of it is
    named by reinforce.build."""
    # weak: a 2-step probe at 8 px vs a student trained 300 steps; strong: a 300-step probe at 32 px vs 1 step
    size, lp_steps, baseline_steps = ("32", "300", "1") if strong else ("8", "2", "300")
    card = teach("--backbone", "tf_efficientnet_lite0", "--data", "fashion-mnist:train", "--shots", "5",
                 "--mode", "lp", "--size", size, "--lp-views", "0", "--lp-steps", lp_steps, "--lp-lr", "0.01",
                 "--folds", "2", "--name", "t", "--baseline-steps", baseline_steps)
    baseline = card.adaptation["labels_only"]
    assert (card.val_accuracy > baseline["val_top1"]) == strong
    build_main = __import__("reinforce.build", fromlist=["main"]).main
    with caplog.at_level("WARNING", logger="reinforce.build"):
        assert build_main(["--teacher", "t", "--transfer-set", "fashion-mnist:test?limit=16", "--views", "1",
                           "--out", "store", "--workers", "0"]) == 0
    warned = [r.getMessage() for r in caplog.records if "not ahead" in r.getMessage()]
    assert bool(warned) != strong


def test_auto_chooses_among_candidate_sizes_by_cross_validation():
    card = teach("--backbone", "tf_efficientnet_lite0", "--data", "fashion-mnist:train", "--shots", "2",
                 "--mode", "auto", "--size", "16,24", "--steps", "2", "--batch-size", "5", "--lp-steps", "3",
                 "--lp-views", "0", "--folds", "2", "--baseline-student", "none", "--name", "sized")
    cv = card.adaptation["scores"]
    assert set(cv) == {"lp@16,lr=0.003", "lp@24,lr=0.003", "ft@16,lr=0.0003", "ft@24,lr=0.0003"}
    assert f"{card.adaptation['mode']}@{card.input_size}" == max(cv, key=cv.get).split(",")[0]
    with pytest.raises(SystemExit):  # several candidates and no way to choose among them
        teacher.main(["--backbone", "tf_efficientnet_lite0", "--data", "fashion-mnist:train", "--shots", "2",
                      "--mode", "lp", "--size", "16,24", "--folds", "0", "--name", "fixed"])


def test_a_class_folder_directory_is_labeled_data(photo_dir, capsys):
    """``--data DIR`` with class subfolders is read as ``imagefolder:DIR`` (and says so); a flat one fails naming it."""
    import shutil

    from reinforce.sources import SPEC_FORMS

    photos = sorted(photo_dir.glob("*.png"))
    for i, photo in enumerate(photos):
        (Path("labeled") / ("animal" if i % 2 else "thing")).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, Path("labeled") / ("animal" if i % 2 else "thing") / photo.name)
    card = teach("--backbone", "tf_efficientnet_lite0", "--data", "labeled", "--shots", "0", "--mode", "lp",
                 "--size", "32", "--lp-views", "0", "--lp-steps", "5", "--folds", "0", "--name", "photos")
    assert card.class_names == ("animal", "thing") and card.adaptation["data"] == "imagefolder:labeled"
    assert card.adaptation["train_images"] == len(photos)
    err = capsys.readouterr().err
    assert "reading labeled as imagefolder:labeled: 2 classes from its subfolders (animal, thing)" in err
    result = evaluate.evaluate("photos", "labeled")
    assert result["num_images"] == len(photos) and result["data"] == "labeled"
    assert "reading labeled as imagefolder:labeled" in capsys.readouterr().err
    err = _one_line_error(capsys, finetune.main, ["--student", "mobilenetv3_small_050", "--size", "32", "--data",
                                                  str(photo_dir), "--shots", "0", "--out", "x"], "train.finetune")
    assert "is a plain directory of unlabeled images" in err and f"imagefolder:{photo_dir}" in err
    assert SPEC_FORMS in err


def test_kfold_uses_every_labeled_image_once_and_the_final_model_trains_on_all():
    """The protocol through the CLI: 3 folds over 3 x 10 labeled images score each candidate on 30 pooled
    predictions (every image held out exactly once), and the saved student trains on all 30."""
    source, _ = open_labeled("fashion-mnist:train", 3, 0)
    folds = kfold_indices(source, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(30))  # disjoint, covering
    assert all(np.bincount(source.labels[f], minlength=10).tolist() == [1] * 10 for f in folds)  # stratified
    card = tune("--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train", "--shots",
                "3", "--lr", "0.001,0.003", "--steps", "4", "--batch-size", "8", "--folds", "3", "--out", "cv")
    stage = card.history[-1]
    assert stage["fold_sizes"] == [10, 10, 10] and stage["val_predictions"] == 30 and stage["train_images"] == 30
    assert set(stage["scores"]) == {"lr=0.001,steps=4", "lr=0.003,steps=4"}
    best = max(stage["scores"], key=stage["scores"].get)  # the first of equal scores
    assert stage["chosen"] == best and stage["val_top1"] == stage["scores"][best]
    assert stage["lr"] == float(best.split(",")[0][3:]) and stage["steps_run"] == 4
    # counts of 30 predictions, recorded to 4 decimals
    assert all(abs(v * 30 - round(v * 30)) <= 30 * 0.5e-4 for v in stage["scores"].values())
    # a separate validation split instead: every candidate trains on all labeled images, scored there
    card = tune("--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train", "--shots",
                "3", "--lr", "0.001,0.003", "--steps", "0,4", "--batch-size", "8", "--val-data",
                "fashion-mnist:test?limit=40", "--out", "val")
    stage = card.history[-1]
    assert stage["val_predictions"] == 40 and stage["train_images"] == 30 and stage["folds"] == 0
    assert len(stage["scores"]) == 3  # 0 steps is one candidate whatever the lr


def test_candidates_trained_together_equal_each_trained_alone():
    """Candidates train side by side on one stream of views (``fit_together``); the saved model must be, bit for
    bit, the chosen setting trained alone, whatever its lr or length among the others."""
    common = ["--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train", "--shots", "3",
              "--batch-size", "8", "--val-data", "fashion-mnist:test?limit=60"]
    together = tune(*common, "--lr", "0.001,0.01", "--steps", "5,9", "--out", "together").history[-1]
    assert len(together["scores"]) == 4
    chosen = together["chosen"]
    alone = tune(*common, "--lr", str(together["lr"]), "--steps", str(together["steps_run"]), "--out",
                 "alone").history[-1]
    assert alone["scores"] == {chosen: together["scores"][chosen]}
    first, second = load_file("together/model.safetensors"), load_file("alone/model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_several_candidates_without_a_way_to_choose_is_one_line(capsys):
    err = _one_line_error(capsys, finetune.main, ["--student", "mobilenetv3_small_050", "--size", "32", "--data",
                                                  "fashion-mnist:train", "--shots", "2", "--lr", "0.001,0.003",
                                                  "--folds", "0", "--out", "x"], "train.finetune")
    assert "2 candidate settings" in err and "--folds K" in err
    err = _one_line_error(capsys, finetune.main, ["--student", "mobilenetv3_small_050", "--size", "32", "--data",
                                                  "fashion-mnist:train", "--shots", "2", "--folds", "3", "--out",
                                                  "x"], "train.finetune")
    assert "3-fold cross-validation needs" in err and "2 for some class" in err


def test_runs_trained_together_stop_at_their_own_length():
    """``fit_together``: each run takes exactly its own number of steps (0 leaves the model as it was), and a
    shorter run's weights equal ``fit`` alone for its length."""
    source, names = open_labeled("fashion-mnist:train", 3, 0)
    views = LabeledViews(source, 32, train=True, seed=0)
    torch.manual_seed(0)
    start, _ = create_student("mobilenetv3_small_050", class_names=names, input_size=32, task="classification")
    models = [copy.deepcopy(start) for _ in range(3)]
    losses = fit_together([(m, TrainSchedule(n, 3e-3, 8)) for m, n in zip(models, (0, 3, 5))], views)
    assert [len(run) for run in losses] == [0, 3, 5]
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), start.state_dict().values()))
    alone = copy.deepcopy(start)
    assert fit(alone, views, TrainSchedule(3, 3e-3, 8)) == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), models[1].state_dict().values()))
