"""One pipeline step in a process of its own, forked from a server that has already imported every stage.

A fresh ``python -m train.finetune`` spends 4-6 s of a 2-core machine importing torch, timm, torchvision,
torchmetrics and DeepSpeed before it does any work: over the comparison's 285 steps, more than a tenth of its
time. The stages are therefore imported once, in multiprocessing's fork server, and each step is forked from
it. A step still gets what a fresh process gives: its own DeepSpeed process group, thread count, environment and
memory (returned when it ends), and the same numbers. The server runs no tensor code, so no thread pool is
copied into a child (it holds one thread after the imports). The child takes the caller's working directory and
environment at the time of the step, and its stdout and stderr (or a log file), passed as file descriptors;
what a library reads from the environment when imported, it read when the server started (the first step).
Its DataLoader workers fork from it, as in ``python -m``.

Example:
    >>> run_step("train.evaluate", ["--model", "runs/m", "--data", "fashion-mnist:test"], threads=1)
    0
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
from collections.abc import Iterable
from multiprocessing import reduction
from pathlib import Path

__all__ = ["run_step"]


def run_step(module: str, argv: list[str], threads: int, log: Path | None = None,
             preload: Iterable[str] = ()) -> int:
    """Exit status of ``python -m module *argv`` run in a forked process with ``threads`` intra-op threads,
    its output appended to this process's stdout and stderr, or written to ``log``. The server imports
    ``module`` and ``preload`` (the other steps' modules) when it starts, at this process's first step."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when the server imports DeepSpeed
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(sorted({module, *preload}))  # used once: when the server starts
    env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS"), str(threads))}
    sys.stdout.flush()
    sys.stderr.flush()
    if log is None:  # this process's own stdout and stderr, as a subprocess would inherit them
        return _run(context, module, argv, threads, env, 1, 2)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        return _run(context, module, argv, threads, env, output.fileno(), output.fileno())


def _run(context, module: str, argv: list[str], threads: int, env: dict[str, str], stdout: int,
         stderr: int) -> int:
    process = context.Process(target=_step_main, name=module,
                              args=(module, list(argv), threads, os.getcwd(), env, _Fd(stdout), _Fd(stderr)))
    process.start()
    process.join()
    return process.exitcode


class _Fd:
    """A file descriptor of this process that the forked step inherits (sent over the fork server's socket)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(duplicate) -> int:
    return duplicate.detach()


def _step_main(module: str, argv: list[str], threads: int, cwd: str, env: dict[str, str], stdout: int,
               stderr: int) -> None:
    """The child: the caller's directory, environment, output and thread count, then the stage's ``main(argv)`` (every
    CLI's main returns its exit status; multiprocessing makes an exception's traceback exit status 1)."""
    import torch

    for target, fd in ((1, stdout), (2, stderr)):
        os.dup2(fd, target)
    for fd in {stdout, stderr} - {1, 2}:
        os.close(fd)
    # the platform's start method again, as in ``python -m``: multiprocessing made this child's "forkserver", and
    # DataLoader workers would each be a new interpreter, not a fork of the step
    multiprocessing.set_start_method(None, force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)
    sys.argv = [module, *argv]
    sys.exit(importlib.import_module(module).main(argv))
