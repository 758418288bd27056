"""The report's plots (``train.report`` writes them beside ``results.md``): top-1 (mIoU) against labels and
against training compute (the paper's Fig. 3), and reliability diagrams. matplotlib is imported, on the Agg
backend, only when a plot is drawn (``pyplot``).

Example:
    >>> plot_labels(frame, Path("runs/pipeline/top1_vs_labels.png"))
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

from train.calibration import ECE_BINS, pool_bins
from train.methods import METRICS, family
from train.report import aggregate, headline, ordered_columns

__all__ = ["plot_compute", "plot_labels", "plot_reliability", "plot_reliability_rows", "pyplot"]

MARKERS = ("o", "^", "s", "D", "v")


def plot_reliability_rows(frame: pl.DataFrame, run_dir: Path) -> list[Path]:
    """``reliability_<row>.png`` per row family (method, teacher mode): one line per shots x transfer set, bins
    pooled over seeds."""
    paths = []
    rows = frame.filter(pl.col("reliability").is_not_null())
    for method, mode in ordered_columns(rows) if len(rows) else []:
        part_rows = rows.filter((pl.col("method") == method) & pl.col("teacher_mode").eq_missing(mode))
        curves = {}
        for (shots, transfer), part in part_rows.sort("shots").group_by("shots", "transfer", maintain_order=True):
            curves[f"{shots} shots" + (f", {transfer}" if transfer else "")] = pool_bins(
                [json.loads(b) for b in part["reliability"]])
        label = family(method).column(mode)
        path = run_dir / f"reliability_{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}.png"
        plot_reliability(curves, path, f"{label}: test split, seeds pooled")
        paths.append(path)
    return paths


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend: the one place plotting starts (importing the library
    never imports matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(panels: int):
    plt = pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False, sharey=True)
    return plt, fig, axes[0]


def plot_labels(frame: pl.DataFrame, path: Path) -> None:
    """Top-1 (mIoU) vs labels per class, one panel per transfer set, one line per method (teacher dashed)."""
    metric, stats = headline(frame), aggregate(frame)
    transfers = [t for t in frame["transfer"].unique(maintain_order=True).to_list() if t is not None]
    plt, fig, axes = _figure(max(1, len(transfers)))
    for ax, transfer in zip(axes, transfers or [None]):
        for method, mode in ordered_columns(frame):
            part = stats.filter((pl.col("method") == method) & pl.col("teacher_mode").eq_missing(mode)
                                & (pl.col("transfer").eq_missing(transfer) | pl.col("transfer").is_null()))
            part = part.sort("shots")
            if len(part):  # error bars: std over seeds
                ax.errorbar(part["shots"], 100 * part[metric], yerr=100 * part[f"{metric}_std"].fill_null(0),
                            marker="o", capsize=3, color=family(method).color_of(mode),
                            linestyle="--" if method == "teacher" else "-", label=family(method).column(mode))
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
    metric, stats = headline(frame), aggregate(frame)
    shots_levels = sorted(frame["shots"].unique())
    transfers = [t for t in frame["transfer"].unique(maintain_order=True).to_list() if t is not None]
    plt, fig, axes = _figure(len(shots_levels))
    for ax, shots in zip(axes, shots_levels):
        for method, mode in ordered_columns(frame):
            part = stats.filter((pl.col("shots") == shots) & (pl.col("method") == method)
                                & pl.col("teacher_mode").eq_missing(mode))
            color, label = family(method).color_of(mode), family(method).column(mode)
            if method == "teacher":
                for value in part[metric]:
                    ax.axhline(100 * value, color=color, linestyle="--", label=label)
                continue
            for i, transfer in enumerate(transfers):
                sub = part.filter(pl.col("transfer") == transfer)
                ax.errorbar(sub["compute_flops"].cast(pl.Float64), 100 * sub[metric],
                            yerr=100 * sub[f"{metric}_std"].fill_null(0), color=color, linestyle="none",
                            marker=MARKERS[i % len(MARKERS)], capsize=3, label=f"{label}, {transfer}")
        ax.set(title=f"{shots} {METRICS[metric][3]}", xlabel="training compute (FLOPs)", xscale="log")
        ax.grid(alpha=0.3)
    _finish(plt, fig, axes, path, METRICS[metric][0])


def plot_reliability(curves: dict[str, dict[str, list]], path: Path, title: str) -> None:
    """A reliability diagram: accuracy against mean confidence per non-empty bin, one line per curve, the diagonal
    (calibrated) dotted; marker area follows the bin's share of images."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.8))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="calibrated")
    for label, bins in curves.items():
        seen = [i for i, n in enumerate(bins["count"]) if n]
        total = sum(bins["count"])
        line, = ax.plot([bins["confidence"][i] for i in seen], [bins["accuracy"][i] for i in seen], label=label)
        ax.scatter([bins["confidence"][i] for i in seen], [bins["accuracy"][i] for i in seen], color=line.get_color(),
                   s=[4 + 200 * bins["count"][i] / total for i in seen])
    ax.set(xlabel=f"confidence ({ECE_BINS} equal-width bins)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
