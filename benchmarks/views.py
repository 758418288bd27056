"""How many cached views are enough, and how many logits per view: the store against online KD.

Why: a reinforced store fixes K views per image, where online distillation sees a fresh view every
step (Beyer et al. 2022: a few fixed teacher views overfit). This trains the default recipe's
student for the same steps from the first K of one 16-view store (exactly the views a K-view build
stores: θ is keyed by (seed, sample, view); the recipe's K comes from its own build) and, at the
recipe's K, from builds that keep the top
1, 3, 5 or 10 logits; then finetunes (the recipe's candidates, or ``--lr``, chosen by the recipe's protocol:
k-fold cross-validation over the labeled images) and scores each on the test split. The ceiling is online KD
(the teacher in the loop), which ``make views`` measures here rather than in the demo.
Every step goes through the pipeline's own planner and runner, so artifacts are shared with a
``train.pipeline`` run in the same ``--run-dir`` and a rerun only does what is missing.

Writes ``OUT/views.md``, ``OUT/top1_vs_views.png`` and ``OUT/top1_vs_topk.png``.

Example:
    python benchmarks/views.py --run-dir runs/pipeline --out docs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from stores.verify import describe_store
from train.pipeline import Cell, Planner, Runner, read_json
from train.recipe import DEFAULT_RECIPE, Recipe, load_recipe


def variant(recipe: Recipe, build: dict[str, Any], distill: dict[str, Any]) -> Recipe:
    """The recipe with some build and distill flags changed."""
    return dataclasses.replace(recipe, build={**recipe.build, **build}, distill={**recipe.distill, **distill})


def run_variant(recipe: Recipe, run_dir: Path, runner: Runner, cell: Cell, online: bool = False) -> dict:
    """Teacher, store, distilled student, finetunes and test score of ``cell`` under ``recipe``."""
    planner = Planner(recipe, run_dir)
    teacher = planner.teacher(cell.shots, cell.teacher_mode)
    store = planner.store(teacher, cell.transfer, "logits")
    distilled = planner.distilled(store, "logits", teacher if online else None)
    seconds = {}
    for step in (teacher, store, distilled):
        seconds[step.stage] = runner.ensure(step)["seconds"]
    chosen = planner.finetune(cell, distilled)
    seconds["finetune"] = runner.ensure(chosen)["seconds"]
    evaluation, distilled_evaluation = planner.evaluation(chosen), planner.evaluation(distilled)
    runner.ensure(evaluation)
    runner.ensure(distilled_evaluation)
    described = describe_store(store.out)
    stage = read_json(distilled.out / "student.json")["history"][-1]
    views = stage.get("views", described["views"])
    return {"views": views, "topk": recipe.build.get("topk", 5), "online": online,
            "top1": read_json(evaluation.out / "test.json")["top1"],
            "distilled_top1": read_json(distilled_evaluation.out / "test.json")["top1"],
            "chosen": read_json(chosen.out / "student.json")["history"][-1]["chosen"],
            "store_mb": 0.0 if online else described["bytes_per_view"] * views * described["samples_ok"] / 1e6,
            "bytes_per_view": described["bytes_per_view"], "distill_seconds": seconds["distill"],
            "build_seconds": seconds["build"], "steps": stage["steps"]}


def plot(rows: list[dict], online: dict, x: str, path: Path, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("views", "store_mb") if x == "views" else ("topk",)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], panels):
        ax.plot([r[key] for r in rows], [100 * r["top1"] for r in rows], marker="o", color="tab:red",
                label="cached (store), finetuned")
        ax.plot([r[key] for r in rows], [100 * r["distilled_top1"] for r in rows], marker=".", color="tab:red",
                linestyle=":", label="cached, before finetune")
        ax.axhline(100 * online["top1"], color="tab:purple", linestyle="--", label="online KD (teacher in the loop)")
        ax.set(xlabel=xlabel if key != "store_mb" else "store size (MB)", xscale="log" if key != "topk" else "linear")
        if key != "topk":
            ax.minorticks_off()
            ax.set_xticks([r[key] for r in rows], labels=[f"{r[key]:.3g}" for r in rows])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE))
    parser.add_argument("--run-dir", default="runs/pipeline", help="shared with train.pipeline runs of the recipe")
    parser.add_argument("--views", default="1,2,8",
                        help="stored views to train from (one build of the most; the recipe's K is its own build)")
    parser.add_argument("--topk", default="1,3,5,10", help="logits kept per view, one build each at the recipe's K")
    parser.add_argument("--lr", type=float, default=None,
                        help="finetune at this lr only (e.g. the one the recipe's task-oriented row chose on "
                             "validation) instead of the recipe's grid: half the finetunes")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    recipe, run_dir = load_recipe(args.recipe), Path(args.run_dir)
    if args.lr is not None:
        recipe = dataclasses.replace(recipe, finetune={**recipe.finetune, "lr": [args.lr]})
    runner = Runner(run_dir)
    mode = recipe.grid.teacher_mode[-1]
    cell = Cell(recipe.grid.shots[0], recipe.grid.transfer[0], "task-oriented", mode)
    ks = [int(k) for k in args.views.split(",")]
    online = run_variant(recipe, run_dir, runner, cell, online=True)
    by_topk = [run_variant(variant(recipe, {"topk": int(k)}, {}), run_dir, runner, cell) for k in args.topk.split(",")]
    by_views = [run_variant(variant(recipe, {"views": max(ks)}, {"views": k}), run_dir, runner, cell) for k in ks]
    default = next((r for r in by_topk if r["topk"] == recipe.build.get("topk", 5)), None)
    if default is not None and default["views"] not in ks:  # the recipe's own K-view build is a point too
        by_views = sorted([*by_views, default], key=lambda r: r["views"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(by_views, online, "views", out / "top1_vs_views.png", "cached views per image (K)")
    plot(by_topk, online, "topk", out / "top1_vs_topk.png", f"logits kept per view (top-k of 10), K = "
         f"{recipe.build.get('views')}")

    def table(rows: list[dict]) -> str:
        lines = ["| K views | top-k | test top-1 | distilled, before finetune | finetune chosen (CV) | store MB | "
                 "B/view |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['views']} | {r['topk']} | {100 * r['top1']:.1f} | {100 * r['distilled_top1']:.1f} | "
                         f"{r['chosen']} | {r['store_mb']:.2f} | {r['bytes_per_view']:.1f} |")
        return "\n".join(lines)

    text = (f"# How many cached views are enough ({Path(args.recipe).name}, {cell.shots} labels/class, "
            f"{mode} teacher)\n\nSame student, same {online['steps']} distillation steps, same finetune (lr "
            f"{', '.join(map(str, recipe.finetune['lr']))}, chosen by cross-validation), test top-1 on "
            f"{recipe.test}, one seed. Online KD (teacher on a fresh view "
            f"every step): **{100 * online['top1']:.1f}%** ({100 * online['distilled_top1']:.1f}% before "
            f"finetuning). Store MB: the logits and θ arrays of the views read "
            f"(bytes per view x K x images). Wall times of the default run: README.\n\n"
            f"## Views (one {max(ks)}-view build, first K views)\n\n{table(by_views)}\n\n![top-1 vs views]"
            f"(top1_vs_views.png)\n\n## Logits kept per view (K = {recipe.build.get('views')})\n\n"
            f"{table(by_topk)}\n\n![top-1 vs top-k](top1_vs_topk.png)\n\n"
            f"Reproduce: `make demo && make views` (`python benchmarks/views.py --run-dir runs/pipeline --out docs"
            f"`; artifacts already made, e.g. by the demo, are reused).\n")
    (out / "views.md").write_text(text)
    (out / "views.json").write_text(json.dumps({"online": online, "views": by_views, "topk": by_topk}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
