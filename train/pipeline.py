"""``python -m train.pipeline [RECIPE.yaml]``: the paper's task-oriented comparison, end to end.

Rows: the adapted teacher (linear probe and full finetune), a student trained on the labeled
images only, and the task-oriented student (build a reinforced store with the better teacher →
distill from the store → finetune on the labeled images). Each stage runs its own command line
exactly as a user would, so the pipeline is also a worked example of them. Writes
``RUN/results.json`` (a list of rows) and prints a table.

Example:
    python -m train.pipeline                       # embedded default (train/recipes/fashion_mnist.yaml)
    python -m train.pipeline my_recipe.yaml --run-dir runs/exp1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["main", "run_pipeline"]

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "fashion_mnist.yaml"


def _run(stage: str, module: str, *args: Any) -> float:
    """Run ``python -m module args``; returns wall seconds, raises naming the stage on failure."""
    command = [sys.executable, "-m", module, *map(str, args)]
    print(f"\n== {stage}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    if subprocess.run(command, env=env).returncode:
        raise RuntimeError(f"stage {stage!r} failed: {' '.join(command)}")
    return time.perf_counter() - start


def _evaluate(model: str, data: str, out: Path) -> dict[str, Any]:
    seconds = _run(f"evaluate {Path(model).name}", "train.evaluate", "--model", model, "--data", data, "--out", out)
    return {**json.loads(out.read_text()), "eval_seconds": round(seconds, 1)}


def run_pipeline(recipe: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """Run every stage of ``recipe`` under ``run_dir``; returns the result rows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    t, s = recipe["teacher"], recipe["student"]
    labeled = ["--data", recipe["data"], "--shots", recipe["shots"]]
    rows, teachers = [], {}
    for mode in ("lp", "ft"):
        name = run_dir / "teachers" / f"{mode}_{t['backbone']}"
        seconds = _run(f"teacher-{mode}", "train.teacher", "--backbone", t["backbone"], "--library", t["library"],
                       "--weights", t["weights"], *labeled, "--mode", mode, "--size", t["size"],
                       "--folds", t[f"{mode}_folds"], *(("--steps", t["ft_steps"]) if mode == "ft" else ()),
                       "--name", name.name, "--out-dir", name.parent)
        metrics = _evaluate(str(name), recipe["test"], run_dir / f"teacher-{mode}.json")
        teachers[mode] = (json.loads((name / "teacher.json").read_text())["val_accuracy"], name)
        rows.append({"row": f"teacher-{mode}", **metrics, "seconds": round(seconds, 1)})

    out = run_dir / "labeled-only"
    seconds = _run("labeled-only", "train.finetune", "--student", s["arch"], "--size", s["size"], *labeled,
                   "--steps", recipe["labeled_only"]["steps"], "--out", out)
    rows.append({"row": "labeled-only", **_evaluate(str(out), recipe["test"], run_dir / "labeled-only.json"),
                 "seconds": round(seconds, 1)})

    best_mode = max(teachers, key=lambda m: teachers[m][0] or 0.0)  # chosen on validation, never on test
    x, d = recipe["transfer"], recipe["distill"]
    transfer = f"{recipe['data']}?shots={recipe['shots']}&seed={recipe['seed']}&part=unlabeled&limit={x['limit']}"
    stages = {
        "build": _run("build", "reinforce.build", "--teacher", teachers[best_mode][1], "--transfer-set", transfer,
                      "--views", x["views"], "--topk", x["topk"], "--batch-size", x["batch_size"],
                      "--seed", recipe["seed"], "--out", run_dir / "store"),
        "distill": _run("distill", "train.distill", "--store", run_dir / "store", "--student", s["arch"],
                        "--size", s["size"], "--epochs", d["epochs"], "--temperature", d["temperature"],
                        "--batch-size", d["batch_size"], "--out", run_dir / "distilled"),
        "finetune": _run("finetune", "train.finetune", "--init", run_dir / "distilled", *labeled,
                         "--steps", recipe["finetune"]["steps"], "--out", run_dir / "task-oriented"),
    }
    metrics = _evaluate(str(run_dir / "task-oriented"), recipe["test"], run_dir / "task-oriented.json")
    rows.append({"row": "task-oriented", **metrics, "seconds": round(sum(stages.values()), 1),
                 "teacher": f"teacher-{best_mode}", **{f"{k}_seconds": round(v, 1) for k, v in stages.items()}})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'row':<16}{'top-1':>8}{'bal. acc':>10}{'seconds':>9}")
    for row in rows:
        print(f"{row['row']:<16}{row['top1']:>8.2%}{row['balanced_accuracy']:>10.2%}{row['seconds']:>9.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="recipe YAML (default: embedded)")
    parser.add_argument("--run-dir", default="runs/pipeline", help="where stores, models and results go")
    args = parser.parse_args(argv)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    run_dir = Path(args.run_dir)
    start = time.perf_counter()
    try:
        rows = run_pipeline(recipe, run_dir)
    except RuntimeError as error:
        print(f"train.pipeline: error: {error}", file=sys.stderr)
        return 2
    (run_dir / "results.json").write_text(json.dumps(rows, indent=1))
    print_table(rows)
    print(f"total {time.perf_counter() - start:.0f} s; results in {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
