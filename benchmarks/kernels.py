"""How far the vector kernels alone move a row: one labeled-only model trained under each kernel setting.

Why: the comparison's labeled-only rows at a fixed seed differ between machines by up to 13 points, with the same
code, thread count and data order. This trains the same final model (no choosing: one learning rate,
``--folds 0``) through ``train.finetune`` and scores it with ``train.evaluate``, once per setting of the
environment variables that choose which SIMD kernels ATen, oneDNN and MKL run, each in a fresh process, and
prints the test top-1 of each: the spread one machine shows with nothing but the kernels changed.

Example:
    python benchmarks/kernels.py --out runs/kernels      # ~45 s per setting on a 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "ATen AVX2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "oneDNN AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL compatible": {"MKL_CBWR": "COMPATIBLE"},
    "all three AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
}


def train_and_score(out: Path, kernels: dict[str, str], args: argparse.Namespace) -> float:
    """Test top-1 of the model ``train.finetune`` trains with ``kernels`` in its environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **kernels}
    finetune = ["--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train",
                "--shots", str(args.shots), "--seed", str(args.seed), "--folds", "0", "--lr", str(args.lr),
                "--steps", str(args.steps), "--batch-size", "32", "--out", str(out)]
    scores = out.with_suffix(".json")
    for module, argv in (("train.finetune", finetune),
                         ("train.evaluate", ["--model", str(out), "--data", args.test, "--out", str(scores)])):
        step = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True)
        if step.returncode:
            raise SystemExit(f"{module} failed (exit status {step.returncode}) with {kernels or 'default kernels'}:"
                             f"\n{step.stderr[-2000:]}")
    return json.loads(scores.read_text())["top1"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/kernels")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--test", default="fashion-mnist:test")
    args = parser.parse_args(argv)
    import torch  # only to name the machine's kernels

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; labeled-only, "
          f"{args.shots} labels per class, seed {args.seed}, lr {args.lr}, {args.steps} steps, 1 thread\n")
    print("| kernels | environment | test top-1 | seconds |\n|---|---|---:|---:|")
    scores = []
    for name, kernels in SETTINGS.items():
        started = time.perf_counter()
        scores.append(train_and_score(Path(args.out) / name.replace(" ", "-"), kernels, args))
        environment = " ".join(f"{k}={v}" for k, v in kernels.items()) or "-"
        print(f"| {name} | {environment} | {100 * scores[-1]:.1f} | {time.perf_counter() - started:.0f} |",
              flush=True)
    print(f"\nspread: {100 * (max(scores) - min(scores)):.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
