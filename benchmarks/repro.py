"""The same answer on another machine: the demo's rows at 1 and at 2 torch threads, side by side.

Why: a row of ``make demo`` moved by 20 points from one 2-core machine to another at a fixed seed, because an
early-stopped baseline stopped wherever 20 validation images said. The protocol (``train.protocol``) removed
the stopping; what is left between machines is floating-point summation order, which the thread count sets.
This runs the demo recipe's labeled-only and task-oriented rows (and the teachers) twice through the pipeline,
``--threads 1`` and ``--threads 2``, in two run directories, and prints every row's test top-1 in both and
the difference (goal: within 1 point).

Example:
    python benchmarks/repro.py --run-dir runs/repro            # ~2x the demo's wall time
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train import pipeline
from train.recipe import DEFAULT_RECIPE


def rows(run_dir: Path) -> dict[tuple, dict]:
    results = json.loads((run_dir / "results.json").read_text())
    return {(r["method"], r["teacher_mode"], r["seed"]): r for r in results["rows"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE))
    parser.add_argument("--run-dir", default="runs/repro", help="THREADS-thread runs go to RUN_DIR/tTHREADS")
    parser.add_argument("--threads", default="1,2", help="thread counts to compare")
    args = parser.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    for threads in counts:
        code = pipeline.main([args.recipe, "--run-dir", str(Path(args.run_dir) / f"t{threads}"),
                              "--threads", str(threads)])
        if code:
            return code
    first, *others = (rows(Path(args.run_dir) / f"t{t}") for t in counts)
    header = ["row", *(f"top-1 @ {t} thread{'s' * (t > 1)}" for t in counts), "max difference (points)",
              "wall s"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for key, row in first.items():
        scores = [row["top1"], *(other[key]["top1"] for other in others)]
        seconds = [sum(r.get(f"{s}_seconds") or 0 for s in ("teacher", "build", "distill", "finetune", "eval"))
                   for r in (row, *(other[key] for other in others))]
        label = key[0] + (f" ({key[1]})" if key[1] and key[1] != "frozen" else "") + f", seed {key[2]}"
        print(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in scores)
              + f" | {100 * (max(scores) - min(scores)):.1f} | " + " / ".join(f"{s:.0f}" for s in seconds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
