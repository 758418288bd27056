"""What many test modules share: the repository root and the environment every command-line run gets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m MODULE`` child: the repository importable, DeepSpeed on the CPU, and one
    intra-op thread (two test workers share two cores), plus ``extra``."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), **extra}

TEST_IMAGES = 300
HELD_OUT = f"fashion-mnist:test?limit={TEST_IMAGES}"  # what exported models are scored and compared on


def run_module(args: list[str], cwd: Path, env: dict[str, str], log: Path | None = None) -> str:
    """``python ARGS`` as a user runs it, under umask 022; stderr to ``log`` (a file, not a terminal) if given;
    returns stdout, asserting exit status 0."""
    with open(log or os.devnull, "w") as stderr:
        run = subprocess.run([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr,
                             text=True, umask=0o022)
    assert run.returncode == 0, (args, log.read_text()[-3000:] if log else "")
    return run.stdout
