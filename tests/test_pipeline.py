"""train.pipeline end to end through the real command lines, on a two-cell grid small enough for 2 CPU cores.

The two cells are the task-agnostic methods at 3 labels per class: both distill the frozen Lite0's
features of the same transfer set, so the grid must build one store (embedding + patch targets)
and share it. A rerun must skip every finished cell and leave results.parquet unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import yaml

from train import pipeline, report

RECIPE = {
    "data": "fashion-mnist:train",
    "test": "fashion-mnist:test?limit=200",
    "seed": 0,
    "val_fraction": 0.2,
    "grid": {"shots": [3], "transfer": ["task-related"],
             "method": ["task-agnostic-embedding", "task-agnostic-patch"], "teacher_mode": ["lp"]},
    "transfer_sets": {"task-related": "fashion-mnist:train?shots=3&seed=0&part=unlabeled&limit=256"},
    "teacher": {"backbone": "tf_efficientnet_lite0", "library": "timm", "weights": "embedded", "size": 32},
    "build": {"views": 1, "batch_size": 256, "workers": 0},
    "student": {"arch": "mobilenetv3_small_050", "size": 32},
    "distill": {"epochs": 1, "batch_size": 64, "workers": 0},
    "finetune": {"lr": [0.001, 0.003], "steps": 6, "eval_every": 3, "batch_size": 16},
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


@pytest.mark.slow
def test_two_cells_build_their_store_once(run):
    _, run_dir = run
    ran = Counter(entry["stage"] for entry in _log(run_dir) if entry["status"] == "ran")
    assert ran == {"teacher": 1, "build": 1, "distill": 2, "finetune": 4, "evaluate": 2}
    (store,) = (run_dir / "builds").iterdir()  # one store directory, embedding and patch targets in it
    reused = [e for e in _log(run_dir) if e["stage"] == "build" and e["status"] == "skipped"]
    assert [e["out"] for e in reused] == [f"builds/{store.name}"]  # the second cell found it done
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(manifest["content"]["targets"]) == {"embedding", "patch"}
    store_ids = {json.loads((d / "student.json").read_text())["history"][0]["store_id"]
                 for d in (run_dir / "distills").iterdir()}
    assert store_ids == {manifest["store_id"]}


@pytest.mark.slow
def test_results_rows_are_tuned_on_validation(run):
    _, run_dir = run
    frame = pl.read_parquet(run_dir / "results.parquet")
    assert frame.columns == list(report.COLUMNS)
    assert sorted(frame["method"]) == ["task-agnostic-embedding", "task-agnostic-patch"]
    assert frame["teacher_mode"].to_list() == ["frozen", "frozen"]
    for row in frame.iter_rows(named=True):
        assert 0 <= row["top1"] <= 1 and row["val_top1"] is not None and row["lr_grid"] == "0.001,0.003"
        finetunes = [d for d in (run_dir / "finetunes").iterdir() if f"-{row['method'].split('-')[-1]}-" in d.name]
        scores = [json.loads((d / "student.json").read_text())["history"][-1]["val_top1"] for d in finetunes]
        assert row["val_top1"] == max(scores)  # the lr with the best validation top-1 was chosen
        assert row["teacher_pass_flops"] > 0 and row["student_flops"] > 0
        assert row["compute_flops"] == row["teacher_pass_flops"] + row["student_flops"]  # frozen: no adaptation


@pytest.mark.slow
def test_rerun_skips_every_finished_cell(run):
    recipe, run_dir = run
    before = pl.read_parquet(run_dir / "results.parquet")
    lines = len(_log(run_dir))
    assert pipeline.main([str(recipe), "--run-dir", str(run_dir)]) == 0
    again = _log(run_dir)[lines:]
    assert [e["stage"] for e in again] == ["cell", "cell"]
    assert all(e["status"] == "skipped" for e in again)
    assert pl.read_parquet(run_dir / "results.parquet").equals(before)


@pytest.mark.slow
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


TASK_RECIPE = {
    **RECIPE,
    "grid": {"shots": [3], "transfer": ["task-related"], "teacher_mode": ["lp"],
             "method": ["labeled-only", "task-oriented", "task-oriented-online"]},
    "transfer_sets": {"task-related": "fashion-mnist:train?shots=3&seed={seed}&part=unlabeled&limit=128"},
    "teacher": {**RECIPE["teacher"], "lp_steps": 20, "lp_views": 0, "folds": 0},
    "reference_teachers": ["lp"],
    "finetune": {"lr": [0.003], "steps": 12, "eval_every": 3, "patience": 1, "cooldown": 3, "batch_size": 16},
}


@pytest.fixture(scope="module")
def task_run(tmp_path_factory, vfm_home) -> Path:
    """The default recipe's rows in miniature (labeled-only, cached and online task-oriented, teacher), seed 1."""
    root = tmp_path_factory.mktemp("task")
    recipe = root / "task.yaml"
    recipe.write_text(yaml.safe_dump(TASK_RECIPE))
    assert pipeline.main([str(recipe), "--run-dir", str(root / "run"), "--seed", "1"]) == 0
    return root / "run"


@pytest.mark.slow
def test_results_json_has_every_row_with_its_stage_times(task_run):
    results = json.loads((task_run / "results.json").read_text())
    assert results["total_seconds"] > 0
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"labeled-only", "task-oriented", "task-oriented-online", "teacher"}
    for method in ("task-oriented", "task-oriented-online"):
        row = rows[method]
        assert all(row[f"{s}_seconds"] > 0 for s in ("teacher", "build", "distill", "finetune", "eval"))
        assert row["lr"] == 0.003 and row["best_step"] is not None
        # the teacher-vs-labels check on the same validation images, recorded per row
        assert row["teacher_val_top1"] == rows["teacher"]["val_top1"]
        assert row["labels_only_val_top1"] == rows["labeled-only"]["val_top1"]
        assert row["teacher_ahead"] == (row["teacher_val_top1"] > row["labels_only_val_top1"])
    online = json.loads((Path(rows["task-oriented-online"]["model"]) / "student.json").read_text())
    cached = json.loads((Path(rows["task-oriented"]["model"]) / "student.json").read_text())
    distill = {"online": online["history"][0], "cached": cached["history"][0]}
    assert distill["online"]["online"] is True and distill["cached"]["online"] is False
    assert distill["online"]["store_id"] == distill["cached"]["store_id"]  # same teacher, transfer set, policy
    assert distill["online"]["steps"] == distill["cached"]["steps"]
    (store_dir,) = (task_run / "builds").iterdir()
    store = json.loads((store_dir / "manifest.json").read_text())
    assert "seed=1&" in store["content"]["transfer_set"]["spec"]  # --seed reached the transfer set too


@pytest.mark.slow
def test_spread_over_runs(task_run, tmp_path):
    out = tmp_path / "spread.md"
    assert report.main([str(task_run), str(task_run), "--spread", str(out)]) == 0
    text = out.read_text()
    assert "| 3 | task-related | task-oriented online (lp) | 2 |" in text and "± 0.0" in text


def test_recipes_plan_their_grids():
    """The shipped recipes parse; the comparison shares stores and distillations across cells."""
    recipe = pipeline.load_recipe(pipeline.RECIPES / "comparison.yaml")
    planner = pipeline.Planner(recipe, Path("runs/x"))
    cells = pipeline.grid_cells(recipe)
    steps = Counter(stage for stage, _ in {(s.stage, s.out) for c in cells for part in planner.plan(c) for s in part})
    assert len(cells) == 16  # shots 5, 10 x 2 transfer sets x 4 methods
    # teachers: 2 lp + 1 frozen; stores: 2 task-agnostic (one per transfer set) + 2 x 2 task-oriented;
    # distillations: 2 x 2 task-agnostic (shared across shots) + 4 task-oriented; finetunes: 14 runs x 2 lrs
    assert steps == {"teacher": 3, "build": 6, "distill": 8, "finetune": 28}
    default = pipeline.load_recipe(pipeline.DEFAULT_RECIPE)
    assert default["grid"]["method"] == ["labeled-only", "task-oriented", "task-oriented-online"]
    assert default["reference_teachers"] == ["lp", "ft"]
    planner = pipeline.Planner(default, Path("runs/x"))
    cached, online = (planner.plan(c)[0] for c in pipeline.grid_cells(default)[1:])
    assert cached[:2] == online[:2]  # the online row distills the cached row's teacher, over its store's views
    assert "--online" in online[2].argv and "--online" not in cached[2].argv


def test_bad_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "finetune": {**RECIPE["finetune"], "out": "x"}}))
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.pipeline: error:") and "['out']" in err and "\n" not in err


SEG_RECIPE = {  # train/recipes/segmentation.yaml in miniature: one real item per 32 px mosaic
    "data": "fashion-mnist-seg:train@32,grid=1",
    "test": "fashion-mnist-seg:test@32,grid=1?limit=64",
    "seed": 0,
    "val_fraction": 0.25,
    "grid": {"shots": [8], "transfer": ["task-related"],
             "method": ["labeled-only", "task-oriented", "task-oriented-online"], "teacher_mode": ["lp"]},
    "reference_teachers": ["lp"],
    "transfer_sets": {"task-related": "fashion-mnist-seg:train@32,grid=1?shots=8&seed={seed}&part=unlabeled&limit=64"},
    "teacher": {"backbone": "tf_efficientnet_lite0", "library": "timm", "weights": "embedded", "size": 32,
                "lp_steps": 10, "lp_lr": 0.01, "batch_size": 8},
    "build": {"views": 1, "topk": 3, "batch_size": 64, "workers": 0},
    "student": {"arch": "mobilenetv3_small_050", "size": 32},
    "distill": {"epochs": 1, "batch_size": 16, "workers": 0},
    "finetune": {"lr": [0.001, 0.003], "steps": 4, "eval_every": 2, "batch_size": 8},
}


@pytest.mark.slow
def test_segmentation_recipe_rows_are_tuned_on_validation_miou(tmp_path, vfm_home):
    """The segmentation recipe's rows (labeled-only, cached and online task-oriented, teacher) through the same
    pipeline: per-pixel targets in the store, every choice made on validation mIoU, test mIoU reported."""
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
        label = Path(row["model"]).name.rsplit("-lr", 1)[0]  # the row's finetunes differ only by the lr
        finetunes = [d for d in (tmp_path / "run" / "finetunes").iterdir() if d.name.rsplit("-lr", 1)[0] == label]
        scores = [json.loads((d / "student.json").read_text())["history"][-1]["val_miou"] for d in finetunes]
        assert len(scores) == 2 and row["val_miou"] == max(scores)  # the lr with the best val mIoU was kept
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
    assert "| labeled images | transfer set | labeled-only |" in table and "| mIoU | pixel acc | val mIoU |" in table


def test_segmentation_recipe_plans_per_pixel_targets(tmp_path, capsys):
    """The shipped segmentation recipe: a segmentation teacher, a seg_logits store distilled as such; methods the
    segmentation task has no recipe for are refused in one line."""
    recipe = pipeline.load_recipe(pipeline.RECIPES / "segmentation.yaml")
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
