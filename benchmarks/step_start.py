"""What a pipeline step costs to start: a fresh ``python -m`` process against one forked from the stage server.

Why: ``train.pipeline`` runs every step (285 in the comparison) as a process of its own. A fresh interpreter
imports torch, timm, torchvision, torchmetrics and DeepSpeed before the step does any work; ``train.step_process``
forks each step from a server that imported them once. This runs the same two real steps both ways, rounds
interleaved, one thread each: a short labeled-only finetune (Fashion-MNIST, 3 labels per class) and the test
evaluation of what it wrote. It prints each step's median wall time per launcher, the ratio, and what starting
the server cost once.

Example:
    python benchmarks/step_start.py --rounds 3            # ~2 min on a 2-core machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train.recipe import STEP_MODULES
from train.step_process import run_step


def steps(out: Path) -> list[tuple[str, list[str]]]:
    student = out / "student"
    return [("train.finetune", ["--student", "mobilenetv3_small_050", "--size", "32", "--data", "fashion-mnist:train",
                                "--shots", "3", "--seed", "0", "--lr", "0.001", "--steps", "20", "--folds", "3",
                                "--out", str(student)]),
            ("train.evaluate", ["--model", str(student), "--data", "fashion-mnist:test?limit=1000"])]


def fresh_process(module: str, argv: list[str], threads: int) -> int:
    env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS"), str(threads))}
    return subprocess.run([sys.executable, "-m", module, *argv], env=env, stdout=subprocess.DEVNULL).returncode


def forked(module: str, argv: list[str], threads: int) -> int:
    """The pipeline's way: forked from the stage server, which imports every step's module."""
    with tempfile.TemporaryDirectory() as logs:
        return run_step(module, argv, threads, Path(logs) / "step.log", preload=STEP_MODULES.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = time.perf_counter()
    forked("train.evaluate", ["--help"], args.threads)  # starts the server: paid once per pipeline
    server_seconds = time.perf_counter() - started
    launchers = {"python -m": fresh_process, "forked": forked}
    seconds: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for name, launch in launchers.items():
                for module, step_argv in steps(Path(work) / f"{name.replace(' ', '')}{round_}"):
                    started = time.perf_counter()
                    if launch(module, step_argv, args.threads):
                        print(f"{name} {module} failed", file=sys.stderr)
                        return 1
                    seconds.setdefault((module, name), []).append(time.perf_counter() - started)
    print(f"stage server start (once per pipeline): {server_seconds:.1f} s\n")
    print(f"| step ({args.threads} thread, median of {args.rounds}) | python -m s | forked s | ratio |")
    print("|---|---|---|---|")
    for module, _ in steps(Path(".")):
        fresh, fork = (statistics.median(seconds[module, name]) for name in launchers)
        print(f"| {module} | {fresh:.2f} | {fork:.2f} | {fresh / fork:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
