"""train.pipeline end to end through the real command lines, on a two-cell grid small enough for 2 CPU cores.

The two cells are the task-agnostic methods at 3 labels per class over two seeds: both distill the frozen
Lite0's features of the same transfer set, which sees no labels, so the grid must build one store (embedding +
patch targets) and share it across cells and seeds. A rerun must skip every finished cell and leave
results.parquet unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml

from train import pipeline, report
from train.recipe import DEFAULT_RECIPE, RECIPES, load_recipe

RECIPE = {
    "data": "fashion-mnist:train",
    "test": "fashion-mnist:test?limit=200",
    "seeds": [0, 1],
    "folds": 3,
    "threads": 1,
    "grid": {"shots": [3], "transfer": ["task-related"],
             "method": ["task-agnostic-embedding", "task-agnostic-patch"], "teacher_mode": ["lp"]},
    "transfer_sets": {"task-related": "fashion-mnist:train?shots=3&seed=0&part=unlabeled&limit=256"},
    "teacher": {"backbone": "tf_efficientnet_lite0", "library": "timm", "weights": "embedded", "size": 32},
    "build": {"views": 1, "batch_size": 256, "workers": 0},
    "student": {"arch": "mobilenetv3_small_050", "size": 32},
    "distill": {"epochs": 1, "batch_size": 64, "workers": 0},
    "finetune": {"lr": [0.001, 0.003], "steps": [0, 6], "batch_size": 16},
}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, vfm_home) -> tuple[Path, Path]:
    """(recipe file, run directory) after one pipeline run."""
    root = tmp_path_factory.mktemp("pipeline")
    recipe = root / "two_cells.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert pipeline.main([str(recipe), "--run-dir", str(root / "run")]) == 0
    return recipe, root / "run"


@pytest.mark.e2e
def test_two_cells_build_their_store_once(run):
    _, run_dir = run
    ran = Counter(entry["stage"] for entry in _log(run_dir) if entry["status"] == "ran")
    assert ran == {"teacher": 1, "build": 1, "distill": 4, "finetune": 4, "evaluate": 4}  # 2 cells x 2 seeds
    (store,) = (run_dir / "builds").iterdir()  # one store directory, embedding and patch targets in it
    reused = [e for e in _log(run_dir) if e["stage"] == "build" and e["status"] == "skipped"]
    assert [e["out"] for e in reused] == [f"builds/{store.name}"] * 3  # the other cells and seed found it done
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(manifest["content"]["targets"]) == {"embedding", "patch"}
    store_ids = {json.loads((d / "student.json").read_text())["history"][0]["store_id"]
                 for d in (run_dir / "distills").iterdir()}
    assert store_ids == {manifest["store_id"]}


@pytest.mark.e2e
def test_results_rows_are_tuned_by_cross_validation(run):
    _, run_dir = run
    frame = pl.read_parquet(run_dir / "results.parquet")
    assert frame.columns == list(report.COLUMNS)
    assert sorted(frame["method"]) == ["task-agnostic-embedding"] * 2 + ["task-agnostic-patch"] * 2
    assert frame["teacher_mode"].to_list() == ["frozen"] * 4 and sorted(frame["seed"]) == [0, 0, 1, 1]
    for row in frame.iter_rows(named=True):
        candidates = json.loads(row["candidates"])
        assert set(candidates) == {"lr=0.001,steps=0", "lr=0.001,steps=6", "lr=0.003,steps=6"}
        assert row["val_top1"] == candidates[row["chosen"]] == max(candidates.values())
        stage = json.loads((Path(row["model"]) / "student.json").read_text())["history"][-1]
        assert stage["train_images"] == stage["val_predictions"] == 30  # every labeled image, once held out
        assert row["protocol"].startswith("3-fold cross-validation") and 0 <= row["top1"] <= 1
        assert row["teacher_pass_flops"] > 0 and row["student_flops"] >= 0
        assert row["compute_flops"] == row["teacher_pass_flops"] + row["student_flops"]  # frozen: no adaptation


@pytest.mark.e2e
def test_rerun_skips_every_finished_cell(run):
    recipe, run_dir = run
    before = pl.read_parquet(run_dir / "results.parquet")
    lines = len(_log(run_dir))
    assert pipeline.main([str(recipe), "--run-dir", str(run_dir)]) == 0
    again = _log(run_dir)[lines:]
    assert [e["stage"] for e in again] == ["cell"] * 4
    assert all(e["status"] == "skipped" for e in again)
    assert pl.read_parquet(run_dir / "results.parquet").equals(before)


@pytest.mark.e2e
def test_jobs_run_steps_side_by_side_with_the_same_numbers(run, tmp_path):
    """``--jobs 2`` (seed 0: its two cells at once, beside the teacher's and store's dependants), every step a process;
    the shared teacher and store still run once, each step's output is in RUN/logs/, and every row equals the
    one-after-the-other run's."""
    recipe, serial_dir = run
    assert pipeline.main([str(recipe), "--run-dir", str(tmp_path / "run"), "--jobs", "2", "--seeds", "0"]) == 0
    log = _log(tmp_path / "run")
    assert Counter(e["stage"] for e in log if e["status"] == "ran") == {
        "teacher": 1, "build": 1, "distill": 2, "finetune": 2, "evaluate": 2}
    assert sorted(p.parent.name for p in (tmp_path / "run" / "logs").glob("*/*.log")) == sorted(
        f"{e['stage']}s" for e in log if e["status"] == "ran")
    varying = [c for c in report.COLUMNS if c == "model" or c.endswith("_seconds")]
    serial, side_by_side = (pl.read_parquet(d / "results.parquet").drop(varying).filter(pl.col("seed") == 0)
                            .sort("method") for d in (serial_dir, tmp_path / "run"))
    assert len(serial) == 2 and side_by_side.equals(serial)


@pytest.mark.e2e
def test_report_table_and_plots(run):
    _, run_dir = run
    for name in ("top1_vs_labels.png", "top1_vs_compute.png"):
        (run_dir / name).unlink(missing_ok=True)
    assert report.main([str(run_dir)]) == 0  # redrawn from results.parquet alone
    for name in ("top1_vs_labels.png", "top1_vs_compute.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (run_dir / "results.md").read_text()
    assert "| labeled images per class | transfer set | task-agnostic (embedding) | task-agnostic (patch) |" in text
    assert "| 3 | task-related |" in text
    # every classifier row's calibration on test, and a reliability diagram per row family
    assert "ECE (torchmetrics MulticlassCalibrationError, 15 equal-width confidence bins)" in text
    assert "| shots | transfer | row | top-1 | ECE (%) | NLL | Brier | seeds |" in text
    for family in ("task_agnostic_embedding", "task_agnostic_patch"):
        assert (run_dir / f"reliability_{family}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TASK_RECIPE = {
    **RECIPE,
    "grid": {"shots": [3], "transfer": ["task-related"], "teacher_mode": ["lp"],
             "method": ["labeled-only", "task-oriented", "task-oriented-online"]},
    "transfer_sets": {"task-related": "fashion-mnist:train?shots=3&seed={seed}&part=unlabeled&limit=128"},
    "folds": 2,
    "teacher": {**RECIPE["teacher"], "lp_steps": 20, "lp_views": 0},
    "reference_teachers": ["lp"],
    "finetune": {"lr": [0.003], "steps": [12], "batch_size": 16},
}


@pytest.fixture(scope="module")
def task_run(tmp_path_factory, vfm_home) -> Path:
    """The default recipe's rows in miniature (labeled-only, cached and online task-oriented, teacher), seed 1."""
    root = tmp_path_factory.mktemp("task")
    recipe = root / "task.yaml"
    recipe.write_text(yaml.safe_dump(TASK_RECIPE))
    assert pipeline.main([str(recipe), "--run-dir", str(root / "run"), "--seeds", "1"]) == 0
    return root / "run"


@pytest.mark.e2e
def test_results_json_has_every_row_with_its_stage_times(task_run):
    results = json.loads((task_run / "results.json").read_text())
    assert results["total_seconds"] > 0
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"labeled-only", "task-oriented", "task-oriented-online", "teacher"}
    for method in ("task-oriented", "task-oriented-online"):
        row = rows[method]
        assert all(row[f"{s}_seconds"] > 0 for s in ("teacher", "build", "distill", "finetune", "eval"))
        assert row["lr"] == 0.003 and row["steps"] == 12 and row["seed"] == 1
        # the teacher-vs-labels check on the same folds, recorded per row
        assert row["teacher_val_top1"] == rows["teacher"]["val_top1"]
        assert row["labels_only_val_top1"] == rows["labeled-only"]["val_top1"]
        assert row["teacher_ahead"] == (row["teacher_val_top1"] > row["labels_only_val_top1"])
    online = json.loads((Path(rows["task-oriented-online"]["model"]) / "student.json").read_text())
    cached = json.loads((Path(rows["task-oriented"]["model"]) / "student.json").read_text())
    distill = {"online": online["history"][0], "cached": cached["history"][0]}
    assert distill["online"]["online"] is True and distill["cached"]["online"] is False
    assert distill["online"]["store_id"] == distill["cached"]["store_id"]  # same teacher, transfer set, policy
    assert distill["online"]["steps"] == distill["cached"]["steps"]
    stores = [json.loads((d / "manifest.json").read_text()) for d in (task_run / "builds").iterdir()]
    by_mode = {store["content"]["teacher"]["adaptation"]["mode"]: store for store in stores}
    assert len(stores) == 2 and set(by_mode) == {"frozen", "lp"}  # the lp store: its head on the frozen embeddings
    assert by_mode["lp"]["content"]["lineage"] == {"parent": by_mode["frozen"]["store_id"], "head_on": "embedding"}
    assert distill["cached"]["store_id"] == by_mode["lp"]["store_id"]
    for store in stores:  # --seeds reached the transfer set too
        assert "seed=1&" in store["content"]["transfer_set"]["spec"] and store["content"]["seed"] == 1


def _planted(diffs: list[float], base: float = 0.5) -> pl.DataFrame:
    """Result rows of labeled-only and task-oriented over len(diffs) seeds, task-oriented ahead by ``diffs``."""
    rows = []
    for seed, diff in enumerate(diffs):
        for method, mode, top1 in (("labeled-only", None, base + 0.01 * seed), ("task-oriented", "lp",
                                                                                  base + 0.01 * seed + diff)):
            rows.append({"shots": 10, "transfer": "task-related", "method": method, "teacher_mode": mode,
                         "seed": seed, "top1": top1})
    return report.to_frame(rows)


def test_paired_differences_and_their_interval():
    """A planted example: differences 2, 4, 3 points over 3 seeds -> mean 3, std 1, 95 % t interval
    3 ± 4.303 / sqrt(3) = [0.52, 5.48] (beyond noise); 1, -1, 3 points -> [-3.97, 5.97] (within noise)."""
    (real,) = report.paired_differences(_planted([0.02, 0.04, 0.03])).iter_rows(named=True)
    assert real["comparison"] == "task-oriented (lp) − labeled-only" and real["seeds"] == 3
    assert (real["mean"], real["std"]) == (pytest.approx(0.03), pytest.approx(0.01))
    assert (real["low"], real["high"]) == (pytest.approx(0.03 - 0.024841, abs=1e-5), pytest.approx(0.054841, abs=1e-5))
    assert real["within_noise"] is False
    (noise,) = report.paired_differences(_planted([0.01, -0.01, 0.03])).iter_rows(named=True)
    assert noise["within_noise"] is True and noise["low"] < 0 < noise["high"]
    text = report.differences_table(_planted([0.01, -0.01, 0.03]))
    assert "| 10 | task-related | task-oriented (lp) − labeled-only | 3 | +1.0 | [-4.0, +6.0] | within noise |" in text
    assert "| 10 | task-related | 51.0 ± 1.0 | 52.0 ± 2.6 |" in report.summary_table(_planted([0.01, -0.01, 0.03]))


def test_recipes_plan_their_grids():
    """The shipped recipes parse; the comparison shares stores and distillations across cells, and the frozen
    VFM's teacher and stores across seeds."""
    recipe = load_recipe(RECIPES / "comparison.yaml")
    cells = pipeline.grid_cells(recipe)
    assert len(cells) == 30 and recipe.seeds == (0, 1, 2)  # 3 shots x 2 transfer sets x 5 rows
    steps = {}
    for seed in recipe.seeds:
        planner = pipeline.Planner(recipe, Path("runs/x"), seed)
        steps[seed] = {(s.stage, s.out) for c in cells for s in [*planner.plan(c)[0], planner.plan(c)[1]]}
    # per seed: teachers 3 lp + 3 ft + 1 frozen; stores 2 frozen (one per transfer set) + 6 x 2 task; distills
    # 2 x 2 task-agnostic (shared across shots) + 12 task-oriented; finetunes 3 labeled-only + 24 distilled
    assert Counter(stage for stage, _ in steps[0]) == {"teacher": 7, "build": 14, "distill": 16, "finetune": 27}
    shared = steps[0] & steps[1] & steps[2]  # what sees no labels: the frozen teacher and its two stores
    assert Counter(stage for stage, _ in shared) == {"teacher": 1, "build": 2}
    planner = pipeline.Planner(recipe, Path("runs/x"), 1)
    for cell in cells:  # an lp teacher's store is its head on the frozen store of the same transfer set
        if cell.teacher_mode in ("lp", "ft"):
            upstream = planner.plan(cell)[0]
            store = upstream[-2]
            head_on = [Path(store.argv[store.argv.index("--head-on") + 1])] if "--head-on" in store.argv else []
            agnostic = pipeline.Cell(cell.shots, cell.transfer, "task-agnostic-embedding", "frozen")
            frozen_store = planner.plan(agnostic)[0][1].out
            assert head_on == [s.out for s in upstream[:-3] if s.stage == "build"] == (
                [frozen_store] if cell.teacher_mode == "lp" else [])
    default = load_recipe(DEFAULT_RECIPE)
    assert default.grid.method == ("labeled-only", "task-oriented") and default.folds == 3
    assert default.reference_teachers == ("lp", "ft")
    planner = pipeline.Planner(default, Path("runs/x"))
    labeled_only, cached = (planner.plan(c) for c in pipeline.grid_cells(default))
    assert labeled_only[0] == [] and "--student" in labeled_only[1].argv and "--lr" in labeled_only[1].argv
    argv = cached[1].argv
    assert argv[argv.index("--folds") + 1] == "3" and argv[argv.index("--steps") + 1] == "0,150"


def test_bad_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "finetune": {**RECIPE["finetune"], "out": "x"}}))
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.pipeline: error:") and "['out']" in err and "\n" not in err


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("finetune", {"patiense": 3}, "finetune: unknown flag 'patiense' (train.finetune has no --patiense); did you "
                                  "mean 'patience'?"),
    ("distill", {"epochs": "many"}, "distill: argument --epochs: invalid int value: 'many'"),
    ("build", {"policy_args": "x"}, "build: unknown flag 'policy_args'"),
])
def test_a_bad_flag_in_a_later_stage_fails_before_any_stage_runs(tmp_path, capsys, section, values, expected):
    """Every stage's section is parsed by that stage's own command line when the recipe loads: a typo in the
    last stage is one line naming the section and flag, and nothing is run or written."""
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, section: {**RECIPE[section], **values}}))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert err.startswith(f"train.pipeline: error: {recipe}: {expected}"), err
    assert not run_dir.exists()


def test_unknown_recipe_section_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "finetunes": {"lr": 0.1}}))
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "--plan"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "unknown section 'finetunes' (did you mean 'finetune'?)" in err


SEG_RECIPE = {  # train/recipes/segmentation.yaml in miniature: one real item per 32 px mosaic
    "data": "fashion-mnist-seg:train@32,grid=1",
    "test": "fashion-mnist-seg:test@32,grid=1?limit=64",
    "seeds": [0],
    "folds": 2,
    "threads": 1,  # two test workers share two cores
    "grid": {"shots": [8], "transfer": ["task-related"],
             "method": ["labeled-only", "task-oriented", "task-oriented-online"], "teacher_mode": ["lp"]},
    "reference_teachers": ["lp"],
    "transfer_sets": {"task-related": "fashion-mnist-seg:train@32,grid=1?shots=8&seed={seed}&part=unlabeled&limit=64"},
    "teacher": {"backbone": "tf_efficientnet_lite0", "library": "timm", "weights": "embedded", "size": 32,
                "lp_steps": 10, "lp_lr": 0.01, "batch_size": 8},
    "build": {"views": 1, "topk": 3, "batch_size": 64, "workers": 0},
    "student": {"arch": "mobilenetv3_small_050", "size": 32},
    "distill": {"epochs": 1, "batch_size": 16, "workers": 0},
    "finetune": {"lr": [0.001, 0.003], "steps": [4], "batch_size": 8},
}


@pytest.mark.e2e
def test_segmentation_recipe_rows_are_tuned_on_cross_validated_miou(tmp_path, vfm_home):
    """The segmentation recipe's rows (labeled-only, cached and online task-oriented, teacher) through the same
    pipeline: per-pixel targets in the store, every choice made on pooled cross-validated mIoU, test mIoU."""
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(yaml.safe_dump(SEG_RECIPE))
    assert pipeline.main([str(recipe), "--run-dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["title"] == f"seg.yaml: mIoU on {SEG_RECIPE['test']}"
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"labeled-only", "task-oriented", "task-oriented-online", "teacher"}
    for method, row in rows.items():
        assert 0 <= row["miou"] <= 1 and 0 <= row["pixel_accuracy"] <= 1 and row["top1"] is None, method
        assert row["val_miou"] is not None, method
        if method == "teacher":
            continue
        candidates = json.loads(row["candidates"])
        assert len(candidates) == 2 and row["val_miou"] == candidates[row["chosen"]] == max(candidates.values())
    for method in ("task-oriented", "task-oriented-online"):
        assert rows[method]["teacher_val_miou"] == rows["teacher"]["val_miou"]
        assert rows[method]["labels_only_val_miou"] == rows["labeled-only"]["val_miou"]
    (store_dir,) = (tmp_path / "run" / "builds").iterdir()
    store = json.loads((store_dir / "manifest.json").read_text())
    assert list(store["content"]["targets"]) == ["seg_logits"]
    history = {m: json.loads((Path(rows[m]["model"]) / "student.json").read_text())["history"][0]
               for m in ("task-oriented", "task-oriented-online")}
    assert history["task-oriented-online"]["online"] and not history["task-oriented"]["online"]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| labeled images | transfer set | labeled-only |" in table and "| mIoU | pixel acc | CV mIoU |" in table


def test_segmentation_recipe_plans_per_pixel_targets(tmp_path, capsys):
    """The shipped segmentation recipe: a segmentation teacher, a seg_logits store distilled as such; methods the
    segmentation task has no recipe for are refused in one line."""
    recipe = load_recipe(RECIPES / "segmentation.yaml")
    planner = pipeline.Planner(recipe, Path("runs/x"))
    teacher, store, distilled = planner.plan(pipeline.grid_cells(recipe)[1])[0]
    assert teacher.argv[teacher.argv.index("--task") + 1] == "segmentation"
    assert store.argv[store.argv.index("--targets") + 1] == "seg_logits"
    assert distilled.argv[distilled.argv.index("--targets") + 1] == "seg_logits"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SEG_RECIPE, "grid": {**SEG_RECIPE["grid"], "method": ["task-agnostic-patch"]}}))
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(bad), "--plan"])
    assert exit_info.value.code == 2
    assert "a segmentation recipe takes methods labeled-only, task-oriented" in capsys.readouterr().err
