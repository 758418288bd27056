"""What a pipeline run reports: compute per row, ``results.parquet``, a markdown table and two plots.

Compute follows the paper's Fig. 3 (training compute, teacher adaptation included), in FLOPs:
teacher adaptation + teacher pass (teacher forward FLOPs per view x views stored by the build) +
student (3 x student forward FLOPs per image x images seen in distillation and finetuning). Forward
FLOPs are measured once per (model, size) with ``torch.utils.flop_counter.FlopCounterMode``.

``python -m train.report RUN`` redraws ``RUN/results.md`` and the plots from ``RUN/results.parquet``;
``python -m train.report RUN1 RUN2 RUN3 --spread FILE.md`` writes the mean ± std of every row over
runs of one recipe with different ``--seed`` (a real gap vs noise).

Example:
    >>> write_report(rows, Path("runs/pipeline"), title="top-1 on fashion-mnist:test")
    {'parquet': ..., 'markdown': ..., 'labels_plot': ..., 'compute_plot': ...}
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from reinforce.teachers import TeacherCard, read_teacher_card
from stores.cli import cli_errors, debug_flag
from stores.location import Location
from stores.store import read_manifest
from train.models import read_student_card

__all__ = ["COLUMNS", "FlopsCounter", "main", "write_report"]

COLUMNS = {
    "shots": pl.Int64, "transfer": pl.Utf8, "method": pl.Utf8, "teacher_mode": pl.Utf8,
    "top1": pl.Float64, "balanced_accuracy": pl.Float64, "val_top1": pl.Float64,
    "miou": pl.Float64, "pixel_accuracy": pl.Float64, "val_miou": pl.Float64,
    "lr": pl.Float64, "lr_grid": pl.Utf8, "best_step": pl.Int64, "steps_run": pl.Int64, "max_steps": pl.Int64,
    "teacher_seconds": pl.Float64, "build_seconds": pl.Float64, "distill_seconds": pl.Float64,
    "finetune_seconds": pl.Float64, "eval_seconds": pl.Float64,
    "teacher_adapt_flops": pl.Int64, "teacher_pass_flops": pl.Int64, "student_flops": pl.Int64,
    "compute_flops": pl.Int64, "teacher_val_top1": pl.Float64, "labels_only_val_top1": pl.Float64,
    "teacher_val_miou": pl.Float64, "labels_only_val_miou": pl.Float64, "teacher_ahead": pl.Boolean, "model": pl.Utf8,
}
# headline metric -> (its label, the second metric, that one's label, what "shots" counts)
METRICS = {"top1": ("top-1", "balanced_accuracy", "bal. acc", "labeled images per class"),
           "miou": ("mIoU", "pixel_accuracy", "pixel acc", "labeled images")}
METHOD_ORDER = ("labeled-only", "task-agnostic-embedding", "task-agnostic-patch", "task-oriented",
                "task-oriented-online", "teacher")
LABELS = {"task-agnostic-embedding": "task-agnostic (embedding)", "task-agnostic-patch": "task-agnostic (patch)",
          "task-oriented-online": "task-oriented online"}
TEACHER_MODE_COLUMNS = ("task-oriented", "task-oriented-online", "teacher")  # labelled with the teacher's mode
COLORS = {"labeled-only": "tab:blue", "task-agnostic-embedding": "tab:green", "task-agnostic-patch": "tab:olive",
          "task-oriented": "tab:red", "task-oriented-online": "tab:purple", "teacher": "black",
          ("task-oriented", "ft"): "darkred",
          ("task-oriented", "auto"): "tab:orange", ("teacher", "ft"): "dimgray", ("teacher", "auto"): "gray"}
MARKERS = ("o", "^", "s", "D", "v")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def forward_flops(model: Callable, views) -> int:
    """FLOPs of one forward pass of ``views`` (FlopCounterMode counts a multiply-add as 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(views)
    return int(counter.get_total_flops())


class FlopsCounter:
    """Forward FLOPs per image, measured once per (model, size) and cached in ``RUN/flops.json``."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "flops.json"
        self.cache = read_json(self.path) if self.path.exists() else {}

    def forward(self, key: str, build: Callable[[], tuple[Callable, int]]) -> int:
        """FLOPs of one uint8 view through ``build()``'s model (``(callable, size)``), cached under ``key``."""
        if key not in self.cache:
            import torch

            model, size = build()
            self.cache[key] = forward_flops(model, torch.zeros(1, 3, size, size, dtype=torch.uint8))
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.cache, indent=1))
            os.replace(tmp, self.path)
        return self.cache[key]

    def teacher_forward(self, teacher_dir: Path) -> int:
        card = teacher_card(teacher_dir)

        def build():
            from reinforce.teachers import create_teacher

            model, loaded = create_teacher(str(teacher_dir))
            # a classifier: the backbone (its head adds ~nothing); a segmenter: backbone + DeepLab head at stride 8
            return (model if dense else model.features), loaded.input_size

        dense = card.adaptation.get("task") == "segmentation"
        return self.forward(f"teacher:{card.library}:{card.backbone}@{card.input_size}" + ("/seg" * dense), build)

    def student_forward(self, arch: str, size: int, task: str = "classification") -> int:
        def build():
            from train.models import create_student

            return create_student(arch, class_names=tuple("0123456789"), input_size=size, task=task)[0].eval(), size

        return self.forward(f"student:{arch}@{size}" + ("/seg" if task == "segmentation" else ""), build)

    def teacher_adapt(self, teacher_dir: Path) -> int:
        """Teacher passes spent on adaptation: probe features (lp) or 3x per trained image (ft), CV folds included;
        a segmentation lp trains its head on fresh views, one backbone forward per image per step."""
        adaptation = teacher_card(teacher_dir).adaptation
        images = adaptation.get("train_images", 0)
        if adaptation["mode"] not in ("lp", "ft") or not images:
            return 0
        batch = min(adaptation["batch_size"], images)
        if adaptation.get("task") == "segmentation":  # lp runs the frozen backbone forward on every step's batch
            passes = (3 if adaptation["mode"] == "ft" else 1) * adaptation["steps"] * batch
        elif adaptation["mode"] == "lp":
            passes = images * (adaptation.get("lp_views", 0) + 1)
        else:
            passes = 3 * adaptation["steps"] * batch
        folds, cv_modes = adaptation.get("folds", 0), len(adaptation.get("cv_accuracy") or {})
        return self.teacher_forward(teacher_dir) * passes * (1 + (folds - 1) * cv_modes if folds > 1 else 1)

    def student_images(self, model_dir: Path) -> tuple[str, int, int, str]:
        """(arch, size, images seen in every training stage, task) of a student directory."""
        card = read_student_card(model_dir)
        images = 0
        for stage in card.history:
            if stage["stage"] == "distill":
                images += stage["steps"] * stage["batch_size"] * stage.get("world_size", 1)
            else:
                batch = min(stage["batch_size"], stage.get("train_images", stage["batch_size"]))
                images += stage.get("steps_run", stage["steps"]) * batch
        return card.arch, card.input_size, images, card.task

    def cell(self, teacher_dir: Path | None, store_dir: Path | None, model_dir: Path) -> dict[str, int]:
        """The compute columns of one result row (teacher and store are None for labeled-only)."""
        arch, size, images, task = self.student_images(model_dir)
        student = 3 * self.student_forward(arch, size, task) * images
        adapt = passes = 0
        if teacher_dir is not None and store_dir is not None:
            manifest = read_manifest(Location(store_dir))
            adapt = self.teacher_adapt(teacher_dir)
            distill = next(s for s in read_student_card(model_dir).history
                           if s["stage"] == "distill")
            if distill.get("online"):  # the teacher ran on every image the student saw
                views = distill["steps"] * distill["batch_size"] * distill.get("world_size", 1)
            else:  # a views ablation pays only for the views it reads (a build of that many)
                views = manifest.summary["stored_views"] * distill.get("views", manifest.views) // manifest.views
            passes = self.teacher_forward(teacher_dir) * views
        return {"teacher_adapt_flops": adapt, "teacher_pass_flops": passes, "student_flops": student,
                "compute_flops": adapt + passes + student}


def teacher_card(teacher_dir: Path) -> TeacherCard:
    """The typed card of a zoo entry."""
    return read_teacher_card(teacher_dir)


def to_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows -> a frame with exactly ``COLUMNS`` (missing values null), whatever subset each row has."""
    return pl.DataFrame([{name: row.get(name) for name in COLUMNS} for row in rows], schema=COLUMNS, orient="row")


def headline(frame: pl.DataFrame) -> str:
    """The metric rows are compared by: ``miou`` for a segmentation run, else ``top1``."""
    return "miou" if "miou" in frame.columns and frame["miou"].is_not_null().any() else "top1"


def color(method: str, mode: str | None) -> str | None:
    return COLORS.get((method, mode), COLORS.get(method))


def column_label(method: str, mode: str | None) -> str:
    """Table column / legend entry: task-oriented and teacher carry the teacher's adaptation mode."""
    label = LABELS.get(method, method)
    return f"{label} ({mode})" if method in TEACHER_MODE_COLUMNS and mode else label


def _ordered_columns(frame: pl.DataFrame) -> list[tuple[str, str | None]]:
    """(method, teacher mode) pairs: methods in the paper's order, teacher modes as the grid lists them."""
    pairs = list(dict.fromkeys(frame.select("method", "teacher_mode").iter_rows()))
    return sorted(pairs, key=lambda p: (METHOD_ORDER.index(p[0]) if p[0] in METHOD_ORDER else 99, pairs.index(p)))


def _md_table(header: list[str], body: list[list[str]], right: set[int]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def summary_table(frame: pl.DataFrame) -> str:
    """One row per shots x transfer set, one column per method (+ the teacher), top-1 (mIoU) in %."""
    columns, metric = _ordered_columns(frame), headline(frame)
    cells = frame.filter(pl.col("method") != "teacher")
    body = []
    for shots, transfer in cells.select("shots", "transfer").unique(maintain_order=True).sort("shots").iter_rows():
        row = [str(shots), transfer]
        for method, mode in columns:
            match = frame.filter((pl.col("shots") == shots) & (pl.col("method") == method)
                                 & pl.col("teacher_mode").eq_missing(mode)
                                 & (pl.col("transfer").eq_missing(transfer) | pl.col("transfer").is_null()))
            row.append(_pct(match[metric][0]) if len(match) else "–")
        body.append(row)
    header = [METRICS[metric][3], "transfer set", *(column_label(m, t) for m, t in columns)]
    return _md_table(header, body, right={0, *range(2, len(header))})


def details_table(frame: pl.DataFrame) -> str:
    """Every row: how it was tuned (val top-1, chosen lr of the grid, best step / steps run), time and compute."""
    metric = headline(frame)
    label, second, second_label, _ = METRICS[metric]
    body = []
    for r in frame.sort("shots", "transfer", "method", nulls_last=True).iter_rows(named=True):
        steps = "–" if r["best_step"] is None else f"{r['best_step']} / {r['steps_run']} (max {r['max_steps']})"
        if r["best_step"] is not None and r["best_step"] == r["max_steps"]:
            steps += ", still improving"  # the max-steps budget, not validation, ended this run
        seconds = " + ".join(f"{r[f'{s}_seconds']:.0f}" if r[f"{s}_seconds"] is not None else "–"
                             for s in ("teacher", "build", "distill", "finetune", "eval"))
        lr = "–" if r["lr"] is None else f"{r['lr']:g}" + (f" of {r['lr_grid']}" if r["lr_grid"] else "")
        body.append([str(r["shots"]), r["transfer"] or "(all)", column_label(r["method"], r["teacher_mode"]),
                     _pct(r[metric]), _pct(r[second]), _pct(r[f"val_{metric}"]), lr, steps, seconds,
                     f"{(r['compute_flops'] or 0) / 1e12:.3g}"])
    header = ["shots", "transfer", "row", label, second_label, f"val {label}", "lr (chosen of grid)",
              "best step / run", "seconds: teacher + build + distill + finetune + eval", "TFLOPs"]
    return _md_table(header, body, right={0, 3, 4, 5, 9})


def write_markdown(frame: pl.DataFrame, path: Path, title: str) -> None:
    text = (f"# {title}\n\n{summary_table(frame)}\n\n## Every row\n\nLearning rate and step (best-val checkpoint) "
            "chosen on the validation part of the labeled images; the test split only scores the chosen model. "
            "Seconds of a shared stage (teacher, store, distilled student) are listed in every row that uses it; "
            "finetune seconds cover the whole lr grid. Compute: teacher adaptation + teacher pass over the stored "
            f"views + 3 x student forward x images seen.\n\n{details_table(frame)}\n")
    path.write_text(text)


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False, sharey=True)
    return plt, fig, axes[0]


def plot_labels(frame: pl.DataFrame, path: Path) -> None:
    """Top-1 (mIoU) vs labels per class, one panel per transfer set, one line per method (teacher dashed)."""
    metric = headline(frame)
    transfers = [t for t in frame["transfer"].unique(maintain_order=True).to_list() if t is not None]
    plt, fig, axes = _figure(max(1, len(transfers)))
    for ax, transfer in zip(axes, transfers or [None]):
        for method, mode in _ordered_columns(frame):
            part = frame.filter((pl.col("method") == method) & pl.col("teacher_mode").eq_missing(mode)
                                & (pl.col("transfer").eq_missing(transfer) | pl.col("transfer").is_null()))
            part = part.sort("shots")
            if len(part):
                ax.plot(part["shots"], 100 * part[metric], marker="o", color=color(method, mode),
                        linestyle="--" if method == "teacher" else "-", label=column_label(method, mode))
        ax.set(title=f"transfer set: {transfer}", xlabel=METRICS[metric][3], xscale="log")
        ax.minorticks_off()
        ax.set_xticks(sorted(frame["shots"].unique()), labels=[str(s) for s in sorted(frame["shots"].unique())])
        ax.grid(alpha=0.3)
    _finish(plt, fig, axes, path, METRICS[metric][0])


def _finish(plt, fig, axes, path: Path, label: str) -> None:
    """One legend below the panels (duplicates merged), then save."""
    axes[0].set_ylabel(f"{label} (%)")
    entries = {}
    for ax in axes:
        entries.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(entries.values(), entries.keys(), loc="lower center", ncol=min(4, len(entries)), fontsize=8,
               frameon=False)
    rows = -(-len(entries) // 4)
    fig.tight_layout(rect=(0, 0.05 + 0.05 * rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compute(frame: pl.DataFrame, path: Path) -> None:
    """Top-1 (mIoU) vs training compute (log x), one panel per labels-per-class, marker = transfer set (Fig. 3)."""
    metric = headline(frame)
    shots_levels = sorted(frame["shots"].unique())
    transfers = [t for t in frame["transfer"].unique(maintain_order=True).to_list() if t is not None]
    plt, fig, axes = _figure(len(shots_levels))
    for ax, shots in zip(axes, shots_levels):
        for method, mode in _ordered_columns(frame):
            part = frame.filter((pl.col("shots") == shots) & (pl.col("method") == method)
                                & pl.col("teacher_mode").eq_missing(mode))
            if method == "teacher":
                for value in part[metric]:
                    ax.axhline(100 * value, color=color(method, mode), linestyle="--", label=column_label(method, mode))
                continue
            for i, transfer in enumerate(transfers):
                sub = part.filter(pl.col("transfer") == transfer)
                ax.scatter(sub["compute_flops"].cast(pl.Float64), 100 * sub[metric], color=color(method, mode),
                           marker=MARKERS[i % len(MARKERS)], s=45, label=f"{column_label(method, mode)}, {transfer}")
        ax.set(title=f"{shots} {METRICS[metric][3]}", xlabel="training compute (FLOPs)", xscale="log")
        ax.grid(alpha=0.3)
    _finish(plt, fig, axes, path, METRICS[metric][0])


def render(frame: pl.DataFrame, run_dir: Path, title: str) -> dict[str, Path]:
    """results.md and both plots from a results frame."""
    files = {"parquet": run_dir / "results.parquet", "markdown": run_dir / "results.md",
             "labels_plot": run_dir / "top1_vs_labels.png", "compute_plot": run_dir / "top1_vs_compute.png"}
    write_markdown(frame, files["markdown"], title)
    plot_labels(frame, files["labels_plot"])
    plot_compute(frame, files["compute_plot"])
    return files


def write_report(rows: list[dict[str, Any]], run_dir: Path, title: str = "results",
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """``results.parquet`` (the title in its metadata-free sidecar ``results.title``), ``results.json`` (the
    rows plus ``extra``, e.g. the total wall time), markdown and plots."""
    frame = to_frame(rows)
    frame.write_parquet(run_dir / "results.parquet")
    (run_dir / "results.json").write_text(json.dumps({"title": title, **(extra or {}), "rows": frame.to_dicts()},
                                                     indent=1) + "\n")
    (run_dir / "results.title").write_text(title + "\n")
    return render(frame, run_dir, title)


def spread_table(frames: list[pl.DataFrame]) -> str:
    """Mean ± std (sample std over runs) of top-1 (mIoU), the second metric and seconds per row of the recipe."""
    keys = ["shots", "transfer", "method", "teacher_mode"]
    seconds = pl.sum_horizontal(pl.col(f"{s}_seconds").fill_null(0) for s in ("teacher", "build", "distill",
                                                                               "finetune", "eval"))
    stacked = pl.concat([f.with_columns(seconds.alias("seconds")) for f in frames], how="diagonal_relaxed")
    metric = headline(stacked)
    label, second, second_label, _ = METRICS[metric]
    stats = stacked.group_by(keys, maintain_order=True).agg(
        pl.len().alias("runs"),
        *(pl.col(c).mean().alias(f"{c}_mean") for c in (metric, second, "seconds")),
        *(pl.col(c).std().alias(f"{c}_std") for c in (metric, second)))
    body = [[str(r["shots"]), r["transfer"] or "(all)", column_label(r["method"], r["teacher_mode"]), str(r["runs"]),
             *(f"{100 * r[f'{c}_mean']:.1f} ± {100 * (r[f'{c}_std'] or 0):.1f}" for c in (metric, second)),
             f"{r['seconds_mean']:.0f}"] for r in stats.iter_rows(named=True)]
    header = ["shots", "transfer", "row", "runs", f"{label} (%)", f"{second_label} (%)", "seconds (mean)"]
    return _md_table(header, body, right={0, 3, 4, 5, 6})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="train.pipeline run directories holding results.parquet")
    parser.add_argument("--spread", help="write the mean ± std over the runs to this markdown file")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors("train.report", args.debug):
        return _report(parser, args)


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    missing = [d for d in args.run_dirs if not (Path(d) / "results.parquet").exists()]
    if missing:
        parser.error(f"{Path(missing[0]) / 'results.parquet'} does not exist; run python -m train.pipeline first")
    if args.spread:
        text = spread_table([pl.read_parquet(Path(d) / "results.parquet") for d in args.run_dirs])
        Path(args.spread).write_text(f"{text}\n\nRuns: {', '.join(args.run_dirs)}\n")
        print(text)
        return 0
    if len(args.run_dirs) > 1:
        parser.error("several run directories are only read together with --spread FILE")
    run_dir = Path(args.run_dirs[0])
    title_file = run_dir / "results.title"
    title = title_file.read_text().strip() if title_file.exists() else "results"
    files = render(pl.read_parquet(run_dir / "results.parquet"), run_dir, title)
    print(f"train.report: wrote {files['markdown']}, {files['labels_plot']}, {files['compute_plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
