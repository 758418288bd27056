"""What a pipeline run reports: ``results.parquet``, ``results.json``, a markdown table and the plots.

Each row's compute comes from ``train.flops`` (the paper's Fig. 3: teacher adaptation + teacher pass + student,
in FLOPs), the plots from ``train.plots``; the rows, their order, labels and colours from ``train.methods``.

Rows of several seeds (``train.pipeline --seeds 0,1,2``) are reported as mean ± std over seeds, and the
comparisons the paper makes as **paired differences** per seed (method − labeled-only, task-oriented −
task-agnostic: same labeled draw, same folds) with a 95 % Student-t interval; a difference whose interval
contains 0 is marked "within noise". Classifier rows also carry their calibration on the test split (ECE with 15
equal-width bins, NLL, Brier: ``train.calibration``), tabled as mean ± std, and each row family (method, teacher
mode) gets a reliability diagram ``reliability_<row>.png`` (bins pooled over seeds, one line per shots x transfer
set). ``python -m train.report RUN`` redraws ``RUN/results.md`` and the plots from ``RUN/results.parquet``.

Example:
    >>> write_report(rows, Path("runs/pipeline"), title="top-1 on fashion-mnist:test")
    {'parquet': ..., 'markdown': ..., 'labels_plot': ..., 'compute_plot': ...}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import polars as pl

from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from train.methods import METRICS, ROWS, family

__all__ = ["CALIBRATION", "COLUMNS", "aggregate", "calibration_columns", "headline", "main", "ordered_columns",
           "paired_differences", "to_frame", "write_report"]

COLUMNS = {
    "shots": pl.Int64, "transfer": pl.Utf8, "method": pl.Utf8, "teacher_mode": pl.Utf8,
    "top1": pl.Float64, "balanced_accuracy": pl.Float64, "val_top1": pl.Float64,
    "miou": pl.Float64, "pixel_accuracy": pl.Float64, "val_miou": pl.Float64,
    "seed": pl.Int64, "lr": pl.Float64, "steps": pl.Int64, "chosen": pl.Utf8, "candidates": pl.Utf8,
    "protocol": pl.Utf8,
    "teacher_seconds": pl.Float64, "build_seconds": pl.Float64, "distill_seconds": pl.Float64,
    "finetune_seconds": pl.Float64, "eval_seconds": pl.Float64,
    "teacher_adapt_flops": pl.Int64, "teacher_pass_flops": pl.Int64, "student_flops": pl.Int64,
    "compute_flops": pl.Int64, "teacher_val_top1": pl.Float64, "labels_only_val_top1": pl.Float64,
    "teacher_val_miou": pl.Float64, "labels_only_val_miou": pl.Float64, "teacher_ahead": pl.Boolean, "model": pl.Utf8,
    "ece": pl.Float64, "nll": pl.Float64, "brier": pl.Float64, "reliability": pl.Utf8,
}
CALIBRATION = ("ece", "nll", "brier")  # train.evaluate's, classifiers only
KEYS = ["shots", "transfer", "method", "teacher_mode"]  # a row of the comparison; seeds repeat it
STAGE_SECONDS = ("teacher", "build", "distill", "finetune", "eval")


def to_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows -> a frame with exactly ``COLUMNS`` (missing values null), whatever subset each row has."""
    return pl.DataFrame([{name: row.get(name) for name in COLUMNS} for row in rows], schema=COLUMNS, orient="row")


def calibration_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """A classifier evaluation's calibration as result columns (reliability bins as JSON); {} for segmentation."""
    if "ece" not in metrics:
        return {}
    return {**{k: metrics[k] for k in CALIBRATION}, "reliability": json.dumps(metrics["reliability"])}


def headline(frame: pl.DataFrame) -> str:
    """The metric rows are compared by: ``miou`` for a segmentation run, else ``top1``."""
    return "miou" if "miou" in frame.columns and frame["miou"].is_not_null().any() else "top1"


def ordered_columns(frame: pl.DataFrame) -> list[tuple[str, str | None]]:
    """(method, teacher mode) pairs: methods in the paper's order (``train.methods.ROWS``), teacher modes as the grid
    lists them."""
    order = [r.name for r in ROWS]
    pairs = list(dict.fromkeys(frame.select("method", "teacher_mode").iter_rows()))
    return sorted(pairs, key=lambda p: (order.index(p[0]) if p[0] in order else len(order), pairs.index(p)))


def _md_table(header: list[str], body: list[list[str]], right: set[int]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def aggregate(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per (shots, transfer, method, teacher mode): mean and sample std of the metrics over seeds."""
    metric = headline(frame)
    second = METRICS[metric][1]
    seconds = pl.sum_horizontal(pl.col(f"{s}_seconds").fill_null(0) for s in STAGE_SECONDS)
    return frame.with_columns(seconds.alias("seconds")).group_by(KEYS, maintain_order=True).agg(
        pl.len().alias("seeds"), *(pl.col(c).mean() for c in (metric, second, "compute_flops", "seconds")),
        *(pl.col(c).std().alias(f"{c}_std") for c in (metric, second)))


def _mean_std(row: dict[str, Any], column: str) -> str:
    if row[column] is None:
        return "–"
    return f"{100 * row[column]:.1f}" + (f" ± {100 * row[f'{column}_std']:.1f}" if row["seeds"] > 1 else "")


def summary_table(frame: pl.DataFrame) -> str:
    """One row per shots x transfer set, one column per method (+ the teacher): top-1 (mIoU) in %, mean ± std
    over seeds."""
    columns, metric, stats = ordered_columns(frame), headline(frame), aggregate(frame)
    cells = stats.filter(pl.col("method") != "teacher")
    body = []
    for shots, transfer in cells.select("shots", "transfer").unique(maintain_order=True).sort("shots").iter_rows():
        row = [str(shots), transfer]
        for method, mode in columns:
            match = stats.filter((pl.col("shots") == shots) & (pl.col("method") == method)
                                 & pl.col("teacher_mode").eq_missing(mode)
                                 & (pl.col("transfer").eq_missing(transfer) | pl.col("transfer").is_null()))
            row.append(_mean_std(match.row(0, named=True), metric) if len(match) else "–")
        body.append(row)
    header = [METRICS[metric][3], "transfer set", *(family(m).column(t) for m, t in columns)]
    return _md_table(header, body, right={0, *range(2, len(header))})


def paired_differences(frame: pl.DataFrame) -> pl.DataFrame:
    """Per (shots, transfer): method − labeled-only and task-oriented − task-agnostic, paired by seed; mean, std,
    seeds and the 95 % Student-t interval of the mean difference (``within_noise`` when it contains 0)."""
    from scipy.stats import t

    metric = headline(frame)
    rows = []
    for (shots, transfer), part in frame.filter(pl.col("method") != "teacher").group_by(
            "shots", "transfer", maintain_order=True):
        columns = ordered_columns(part)
        pairs = [((m, mode), ("labeled-only", None)) for m, mode in columns if m != "labeled-only"]
        pairs += [((m, mode), (agnostic, "frozen")) for m, mode in columns if m.startswith("task-oriented")
                  for agnostic in ("task-agnostic-embedding", "task-agnostic-patch")]
        for (method, mode), (baseline, base_mode) in pairs:
            a, b = _by_seed(part, method, mode, metric), _by_seed(part, baseline, base_mode, metric)
            diffs = [a[seed] - b[seed] for seed in a if seed in b]
            if not diffs:
                continue
            mean = sum(diffs) / len(diffs)
            std = float(pl.Series(diffs).std()) if len(diffs) > 1 else None
            half = None if std is None else float(t.ppf(0.975, len(diffs) - 1)) * std / len(diffs) ** 0.5
            rows.append({"shots": shots, "transfer": transfer, "comparison": f"{family(method).column(mode)} − "
                         f"{family(baseline).column(base_mode)}", "seeds": len(diffs), "mean": mean, "std": std,
                         "low": None if half is None else mean - half, "high": None if half is None else mean + half,
                         "within_noise": None if half is None else mean - half <= 0 <= mean + half})
    return pl.DataFrame(rows, schema={"shots": pl.Int64, "transfer": pl.Utf8, "comparison": pl.Utf8,
                                      "seeds": pl.Int64, "mean": pl.Float64, "std": pl.Float64, "low": pl.Float64,
                                      "high": pl.Float64, "within_noise": pl.Boolean}, orient="row")


def _by_seed(part: pl.DataFrame, method: str, mode: str | None, metric: str) -> dict[int, float]:
    rows = part.filter((pl.col("method") == method) & pl.col("teacher_mode").eq_missing(mode))
    return dict(zip(rows["seed"].to_list(), rows[metric].to_list()))


def differences_table(frame: pl.DataFrame) -> str:
    """``paired_differences`` in points, "within noise" where the interval contains 0."""
    body = []
    for r in paired_differences(frame).iter_rows(named=True):
        interval = "–" if r["low"] is None else f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
        verdict = {None: "one seed: no interval", True: "within noise", False: "beyond noise"}[r["within_noise"]]
        body.append([str(r["shots"]), r["transfer"], r["comparison"], str(r["seeds"]), f"{100 * r['mean']:+.1f}",
                     interval, verdict])
    header = ["shots", "transfer", "difference (paired by seed)", "seeds", "mean (points)", "95 % interval", ""]
    return _md_table(header, body, right={0, 3, 4})


def details_table(frame: pl.DataFrame) -> str:
    """Every row of every seed: what the protocol chose (pooled CV score of the chosen setting), time and compute."""
    metric = headline(frame)
    label, second, second_label, _ = METRICS[metric]
    body = []
    for r in frame.sort("shots", "transfer", "method", "seed", nulls_last=True).iter_rows(named=True):
        seconds = " + ".join(f"{r[f'{s}_seconds']:.0f}" if r[f"{s}_seconds"] is not None else "–"
                             for s in STAGE_SECONDS)
        candidates = len(json.loads(r["candidates"] or "{}"))
        chosen = "–" if r["chosen"] is None else f"{r['chosen']} (of {candidates})"
        body.append([str(r["shots"]), r["transfer"] or "(all)", family(r["method"]).column(r["teacher_mode"]),
                     str(r["seed"]), _pct(r[metric]), _pct(r[second]), _pct(r[f"val_{metric}"]), chosen, seconds,
                     f"{(r['compute_flops'] or 0) / 1e12:.3g}"])
    header = ["shots", "transfer", "row", "seed", label, second_label, f"CV {label}", "chosen setting",
              "seconds: teacher + build + distill + finetune + eval", "TFLOPs"]
    return _md_table(header, body, right={0, 3, 4, 5, 6, 9})


def calibration_table(frame: pl.DataFrame) -> str:
    """Per row: top-1, ECE (15 equal-width bins), NLL and Brier on the test split, mean ± std over seeds; "" when
    no row has them (segmentation, or results from before calibration was measured)."""
    if frame["ece"].is_null().all():
        return ""
    stats = frame.filter(pl.col("ece").is_not_null()).group_by(KEYS, maintain_order=True).agg(
        pl.len().alias("seeds"), *(pl.col(c).mean() for c in ("top1", *CALIBRATION)),
        *(pl.col(c).std().alias(f"{c}_std") for c in ("top1", *CALIBRATION)))
    body = []
    for r in stats.sort("shots", "transfer", nulls_last=True).iter_rows(named=True):
        plain = {c: f"{r[c]:.3f}" + (f" ± {r[f'{c}_std']:.3f}" if r["seeds"] > 1 else "") for c in ("nll", "brier")}
        body.append([str(r["shots"]), r["transfer"] or "(all)", family(r["method"]).column(r["teacher_mode"]),
                     _mean_std(r, "top1"), _mean_std(r, "ece"), plain["nll"], plain["brier"], str(r["seeds"])])
    header = ["shots", "transfer", "row", "top-1", "ECE (%)", "NLL", "Brier", "seeds"]
    return _md_table(header, body, right={0, 3, 4, 5, 6, 7})


def write_markdown(frame: pl.DataFrame, path: Path, title: str) -> None:
    seeds = sorted(frame["seed"].drop_nulls().unique())
    protocol = next(iter(frame["protocol"].drop_nulls()), "–")
    text = (f"# {title}\n\nMean ± std over seeds {', '.join(map(str, seeds))} (the test split scores only the "
            f"chosen models). Protocol of every row: {protocol}.\n\n{summary_table(frame)}\n\n"
            f"## Paired differences\n\n{differences_table(frame)}\n\n## Every row\n\nThe setting (lr, schedule "
            "length) each row chose and its pooled cross-validation score. Seconds of a shared stage (teacher, store, "
            "distilled student) are listed in every row that uses it; finetune seconds include the cross-validation "
            "runs. Compute: teacher adaptation + teacher pass over the stored views + 3 x student forward x images "
            f"seen by the final model.\n\n{details_table(frame)}\n")
    calibration = calibration_table(frame)
    if calibration:
        text += ("\n## Calibration\n\nOn the test split: ECE (torchmetrics MulticlassCalibrationError, 15 "
                 "equal-width confidence bins), NLL (nats) and Brier (squared error summed over classes), mean ± std "
                 f"over seeds; reliability diagrams in reliability_<row>.png.\n\n{calibration}\n")
    path.write_text(text)


def render(frame: pl.DataFrame, run_dir: Path, title: str) -> dict[str, Path]:
    """results.md, both plots and the reliability diagrams from a results frame."""
    files = {"parquet": run_dir / "results.parquet", "markdown": run_dir / "results.md",
             "labels_plot": run_dir / "top1_vs_labels.png", "compute_plot": run_dir / "top1_vs_compute.png"}
    from train import plots  # imports this module's tables

    write_markdown(frame, files["markdown"], title)
    plots.plot_labels(frame, files["labels_plot"])
    plots.plot_compute(frame, files["compute_plot"])
    return {**files, **{path.stem: path for path in plots.plot_reliability_rows(frame, run_dir)}}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN",
                        help="train.pipeline run directories holding results.parquet (e.g. one per seed)")
    parser.add_argument("--out", help="where results.md and the plots go (default: the first RUN); several runs "
                                      "are merged into one table, their seeds side by side")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors("train.report", args.debug):
        return _report(parser, args)


def _report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    runs = [Path(d) for d in args.run_dirs]
    missing = [run for run in runs if not (run / "results.parquet").exists()]
    if missing:
        parser.error(f"{missing[0] / 'results.parquet'} does not exist; run python -m train.pipeline first")
    frame = pl.concat([pl.read_parquet(run / "results.parquet") for run in runs], how="diagonal_relaxed")
    repeated = frame.group_by([*KEYS, "seed"]).len().filter(pl.col("len") > 1)
    if len(repeated):
        parser.error(f"a row of seed {repeated['seed'][0]} is in more than one run directory: merge runs of "
                     "different seeds")
    out = Path(args.out) if args.out else runs[0]
    out.mkdir(parents=True, exist_ok=True)
    title_file = runs[0] / "results.title"
    title = title_file.read_text().strip() if title_file.exists() else "results"
    files = render(to_frame(frame.to_dicts()), out, title)
    print(f"train.report: wrote {files['markdown']}, {files['labels_plot']}, {files['compute_plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
