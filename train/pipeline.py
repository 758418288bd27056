"""``python -m train.pipeline [RECIPE.yaml]``: the paper's comparison as a grid, every stage run once.

A recipe (``train/recipes/*.yaml``) names grid axes — ``shots`` (labels per class), ``transfer``
(named transfer sets), ``method`` and ``teacher_mode`` — and, per stage, the flags of that stage's
command line, loaded as a ``train.recipe.Recipe`` whose every section is parsed by its stage's own parser
before anything runs (methods: ``train.methods``). Every cell of the product is run; a cell is a chain of
derived artifacts, each keyed by its inputs (the hash of its command line, upstream artifacts included), made once under
RUN_DIR and shared by every cell that needs it::

    teacher(shots, mode)    train.teacher --mode lp|ft|auto --val-fraction F    task-oriented cells
    teacher(frozen)         train.teacher --mode frozen (no labels)             task-agnostic cells
    store(teacher, transfer)  reinforce.build: logits (task teacher); embedding,patch (frozen teacher,
                              so one store per transfer set serves both task-agnostic methods at every shots);
                              an lp teacher's logits: its head on the frozen store's embeddings (--head-on)
    distilled(store, targets) train.distill (DeepSpeed: the step's process sets up its process group);
                              task-oriented-online: train.distill --online --teacher T (no cached targets)
    finetune(cell)            train.finetune --lr GRID --steps GRID --folds K (labeled-only: the labeled_only section)
    evaluate(model)           train.evaluate on the test split: the finetuned students and the teachers

Labeled-only cells skip the first four. Every row is tuned by one protocol (``train.protocol``): fixed-length
cosine schedules, the setting chosen by k-fold cross-validation over the labeled images (``folds``; pooled
predictions) or on ``val_data``, the final model trained on all labeled images; never on the test split.
``seeds: [0, 1, 2]`` (``--seeds``) runs every seed's labeled draw end to end and reports each row as
mean ± std with paired differences (``train.report``); stages that see no labels (the frozen VFM and its
stores) are made once for all seeds. Each step is a process of its own, forked from one that has imported the
stages (``train.step_process``). ``threads`` pins the thread count of every step, so a run gives the same numbers
on a machine with more cores; ``jobs`` (``--jobs``) runs that many independent steps side by side (cells and
seeds overlap; each step's output in ``RUN/logs/``) with the same numbers as one after the other: small
students train faster on one thread each than on two together.
An artifact is done when ``OUT/.pipeline-done.json`` exists, a cell when ``RUN/cells/KEY.json`` does: a rerun
skips both, and ``RUN/steps.jsonl`` logs every step as ran or skipped. Writes ``RUN/results.json`` (every row,
with each stage's wall time and the total),
``RUN/results.parquet``, ``RUN/results.md``, two plots (``train.report``) and a ``card.md`` (``train.card``) in
every row's model directory; a step's marker records the resolved recipe (its lineage).

Image/mask pairs as ``data`` (``recipes/segmentation.yaml``) make it a segmentation run: the teacher is
``train.teacher --task segmentation``, stores hold ``seg_logits``, ``shots`` counts labeled images in all, and
every choice and row uses mIoU (pixel accuracy beside it) where classification uses top-1.

Each task-oriented row records its teacher's cross-validated top-1 and the labeled-only student's on the same
folds (``teacher_ahead``); a teacher that is not ahead is flagged, since distillation cannot give the student
more than the teacher knows.

Example:
    python -m train.pipeline                                   # embedded default (recipes/fashion_mnist.yaml)
    python -m train.pipeline train/recipes/comparison.yaml --run-dir runs/comparison --publish docs
    python -m train.pipeline train/recipes/comparison.yaml --plan      # the command lines, nothing run
    python -m train.pipeline --seeds 0,1,2 --run-dir runs/seeds         # mean ± std and paired intervals
    python -m train.pipeline train/recipes/segmentation.yaml --run-dir runs/seg   # mIoU rows on mosaics
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from reinforce.teachers import read_teacher_card
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.location import Location
from stores.lock import StoreLock, StoreLockedError
from stores.manifest import TeacherCard
from train import card, report
from train.flops import FlopsCounter
from train.methods import METHODS, METRICS, TASKS
from train.protocol import comma_ints
from train.recipe import DEFAULT_RECIPE, DEFAULT_THREADS, STEP_MODULES, Recipe, flags, load_recipe
from train.step_process import run_step

__all__ = ["Cell", "Planner", "Runner", "Step", "grid_cells", "main", "run_grid"]

DONE = ".pipeline-done.json"
STAGES = ("teacher", "build", "distill", "finetune")


@dataclasses.dataclass(frozen=True)
class Step:
    """One artifact: ``python -m module *argv`` writes the directory ``out``."""

    stage: str  # teacher | build | distill | finetune | evaluate
    argv: tuple[str, ...]
    out: Path

    @property
    def module(self) -> str:
        return STEP_MODULES[self.stage]

    def command_line(self) -> str:
        """As a user would type it (``train.distill`` under DeepSpeed's CPU accelerator)."""
        prefix = "DS_ACCELERATOR=cpu " if self.module == "train.distill" else ""
        return prefix + shlex.join(["python", "-m", self.module, *self.argv])


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point; ``teacher_mode`` is None for labeled-only and ``frozen`` for task-agnostic methods."""

    shots: int
    transfer: str
    method: str
    teacher_mode: str | None

    @property
    def key(self) -> str:
        return f"s{self.shots}-{self.transfer}-{self.method}" + (f"-{self.teacher_mode}" if self.teacher_mode else "")


def grid_cells(recipe: Recipe) -> list[Cell]:
    """The product of the grid axes, with cells that differ only by an unused axis merged."""
    grid = recipe.grid
    cells = []
    for shots, transfer, method, mode in itertools.product(grid.shots, grid.transfer, grid.method, grid.teacher_mode):
        target = METHODS[method].target
        mode = mode if target == "logits" else ("frozen" if target else None)
        cell = Cell(int(shots), transfer, method, mode)
        if cell not in cells:
            cells.append(cell)
    return cells


class Planner:
    """Builds each cell's steps for one seed; the same inputs always give the same ``Step`` (and directory)."""

    def __init__(self, recipe: Recipe, run_dir: Path, seed: int = 0):
        self.recipe, self.run_dir, self.seed = recipe, run_dir, seed
        self.task = recipe.task
        self.task_target, self.metric = TASKS[self.task]
        self.second_metric = METRICS[self.metric][1]
        methods = recipe.grid.method
        agnostic = {METHODS[m].target for m in methods if m.startswith("task-agnostic")}
        # a linear probe's logits are its head on the frozen VFM's embeddings: its stores apply the head to the
        # frozen store's (reinforce.build --head-on), no second backbone pass over the transfer set
        self.lp_from_frozen = (self.task_target == "logits" and "lp" in recipe.grid.teacher_mode
                               and recipe.build.get("format", "zarr") == "zarr")
        self.frozen_targets = ",".join(t for t in ("embedding", "patch")
                                       if t in agnostic or (t == "embedding" and self.lp_from_frozen))

    def step(self, stage: str, label: str, argv: list[str]) -> Step:
        """A step whose directory ``RUN/<stage>s/<label>-<hash of module + argv>`` names its inputs."""
        text = json.dumps([STEP_MODULES[stage], argv]).replace(str(self.run_dir), "$RUN")
        out = self.run_dir / f"{stage}s" / f"{label}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
        where = ["--name", out.name, "--out-dir", str(out.parent)] if stage == "teacher" else ["--out", str(out)]
        if stage == "evaluate":
            where = ["--out", str(out / "test.json")]
        return Step(stage, (*argv, *where), out)

    def teacher(self, shots: int | None, mode: str) -> Step:
        r = self.recipe
        if mode == "frozen":  # no labels: one teacher for every shots level, only its identity flags matter
            section = {k: v for k, v in r.teacher.items() if k in ("backbone", "library", "weights", "size")}
            return self.step("teacher", "frozen", ["--mode", "frozen", *flags(section)])
        argv = ["--data", r.data, "--shots", str(shots), "--seed", str(self.seed), "--mode", mode,
                *self.selection(), *flags(r.teacher)]
        if self.task == "segmentation":
            argv += ["--task", "segmentation"]
        elif "labeled-only" in r.grid.method:  # the grid's labeled-only row is the baseline, same folds
            argv += ["--baseline-student", "none"]
        return self.step("teacher", f"{mode}-s{shots}", argv)

    def student(self) -> list[str]:
        """The random-init student's flags: its architecture and, when the recipe gives one, its size."""
        size = self.recipe.student.get("size")
        return ["--student", self.recipe.student["arch"], *(["--size", str(size)] if size else [])]

    def selection(self) -> list[str]:
        """The protocol's flags, the same for the teacher and every student."""
        r = self.recipe
        return ["--folds", str(r.folds)] + (["--val-data", r.val_data] if r.val_data else [])

    def store(self, teacher: Step, transfer: str, targets: str, frozen: bool = False,
              head_on: Step | None = None) -> Step:
        """A store of ``teacher``'s targets; a frozen teacher's store over a transfer set that does not depend on the
        seed sees no labels at all, so every seed shares it (built with seed 0). With ``head_on`` (a frozen store):
        ``teacher``'s head on its embeddings, so its views (and seed) are that store's."""
        spec = self.recipe.transfer_sets[transfer]
        shared = (frozen or head_on is not None) and "{seed}" not in spec
        argv = ["--teacher", str(teacher.out), "--transfer-set", spec.replace("{seed}", str(self.seed)),
                "--targets", targets, "--seed", str(0 if shared else self.seed), *flags(self.recipe.build)]
        if head_on is not None:
            argv += ["--head-on", str(head_on.out)]
        return self.step("build", f"{transfer}-{teacher.out.name.rsplit('-', 1)[0]}", argv)

    def distilled(self, store: Step, targets: str, online_teacher: Step | None = None) -> Step:
        argv = ["--store", str(store.out), *self.student(), "--targets", targets, "--seed", str(self.seed),
                *flags(self.recipe.distill)]
        label = f"{store.out.name.rsplit('-', 1)[0]}-{targets}"
        if online_teacher is not None:
            argv += ["--online", "--teacher", str(online_teacher.out)]
            label += "-online"
        return self.step("distill", label, argv)

    def plan(self, cell: Cell) -> tuple[list[Step], Step]:
        """``cell``'s upstream steps (none for labeled-only; else ending teacher, store, distilled student; an lp
        teacher's store is preceded by the frozen teacher and store it is derived from) and its finetune."""
        target = METHODS[cell.method].target
        if target is None:
            return [], self.finetune(cell, None)
        frozen = cell.teacher_mode == "frozen"
        frozen_steps = []
        if frozen or (cell.teacher_mode == "lp" and self.lp_from_frozen):
            frozen_teacher = self.teacher(None, "frozen")
            frozen_steps = [frozen_teacher, self.store(frozen_teacher, cell.transfer, self.frozen_targets, True)]
        if frozen:
            teacher, store = frozen_steps
        else:
            teacher = self.teacher(cell.shots, cell.teacher_mode)
            store = self.store(teacher, cell.transfer, self.task_target, head_on=frozen_steps[-1] if frozen_steps
                               else None)
        distilled = self.distilled(store, target if frozen else self.task_target,
                                   teacher if METHODS[cell.method].online else None)
        steps = list(dict.fromkeys([*frozen_steps, teacher, store, distilled]))  # made in this order
        return steps, self.finetune(cell, distilled)

    def cell_hash(self, cell: Cell) -> str:
        """Identifies everything a cell runs: its steps' directories (themselves hashes of their inputs)."""
        upstream, finetune = self.plan(cell)
        names = [step.out.name for step in [*upstream, finetune]] + [self.recipe.test]
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:10]

    def finetune(self, cell: Cell, init: Step | None) -> Step:
        """The cell's finetune (labeled-only: trained from scratch, ``labeled_only`` section over ``finetune``), its
        candidates chosen by the protocol and the final model trained on all labeled images."""
        r = self.recipe
        section = r.finetune if init else {**r.finetune, **r.labeled_only}
        start = ["--init", str(init.out)] if init else self.student()
        label = init.out.name.rsplit("-", 1)[0] if init else "labeled-only"
        return self.step("finetune", f"{label}-s{cell.shots}",
                         [*start, "--data", r.data, "--shots", str(cell.shots), "--seed", str(self.seed),
                          *self.selection(), *flags(section)])

    def evaluation(self, model: Step) -> Step:
        argv = ["--model", str(model.out), "--data", self.recipe.test]
        return self.step("evaluate", model.out.name.rsplit("-", 1)[0], argv)


class Runner:
    """Makes each step's artifact once, then marks it done. Every step is a process of its own, forked from one
    that has imported the stages (``train.step_process``): one after the other when ``jobs`` is 1, its output
    this process's; with ``jobs`` > 1, up to ``jobs`` steps at a time, each one's output in ``RUN/logs/``. Cells
    and seeds call ``ensure`` from several threads: a step asked for twice runs once."""

    def __init__(self, run_dir: Path, recipe: Recipe | None = None):
        self.run_dir, self.recipe = run_dir, recipe
        self.threads = recipe.threads if recipe else DEFAULT_THREADS
        self.jobs = recipe.jobs if recipe else 1
        self.log = run_dir / "steps.jsonl"
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"  # groups one invocation's log lines
        self.slots = threading.BoundedSemaphore(self.jobs)  # steps running now
        self.step_locks: dict[Path, threading.Lock] = {}
        self.lock = threading.Lock()  # guards step_locks and the log file
        self.failure: str | None = None  # the first step that failed (command line, log): start no other

    def ensure(self, step: Step) -> dict[str, Any]:
        """The step's completion record (``seconds``, ``command``), running it first unless already done."""
        with self.lock:
            in_process = self.step_locks.setdefault(step.out, threading.Lock())
        with in_process:  # threads of this pipeline; step_lock: other pipeline processes
            return self._ensure(step)

    def _ensure(self, step: Step) -> dict[str, Any]:
        marker = step.out / DONE
        if not marker.exists():
            with step_lock(step.out):
                if not marker.exists():  # another pipeline process may have made it while this one waited
                    return self._run(step)
        record = json.loads(marker.read_text())
        self.note(step.stage, step.out, "skipped", record["seconds"])
        return record

    def _run(self, step: Step) -> dict[str, Any]:
        marker = step.out / DONE
        if step.stage == "distill" and (step.out / "checkpoints" / "latest").exists():
            # this run's own distillation, stopped before it finished: continue it (train.distill loads a
            # checkpoint only when told to, and only the run's own: checkpoints/run.json)
            step = dataclasses.replace(step, argv=(*step.argv, "--resume"))
        with self.slots:
            if self.failure:  # named here too: with jobs, the error shown may be this step's, not the failed one's
                raise ChildProcessError(f"stage {step.stage} not started because {self.failure}")
            log = self.run_dir / "logs" / f"{step.stage}s" / f"{step.out.name}.log" if self.jobs > 1 else None
            print(f"\n== {step.stage} {step.out.name}" + (f" (output: {log})" if log else "")
                  + f"\n$ {step.command_line()}", flush=True)
            started = time.perf_counter()
            code = run_step(step.module, list(step.argv), self.threads, log, preload=STEP_MODULES.values())
        if code:
            failure = (f"stage {step.stage} failed (exit status {code}): {step.command_line()}"
                       + (f"; its output: {log}" if log else ""))
            with self.lock:
                self.failure = self.failure or failure
            raise ChildProcessError(failure)
        seconds = round(time.perf_counter() - started, 1)
        record = {"stage": step.stage, "command": step.command_line(), "seconds": seconds,
                  **({"recipe": self.recipe.to_dict()} if self.recipe else {})}  # the directory's lineage: what made it
        step.out.mkdir(parents=True, exist_ok=True)
        _atomic_write(marker, json.dumps(record, indent=1))
        self.note(step.stage, step.out, "ran", record["seconds"])
        return record

    def note(self, stage: str, out: Path, status: str, seconds: float) -> None:
        """One line of ``RUN/steps.jsonl``: what this invocation ran or skipped."""
        entry = {"run": self.run_id, "stage": stage, "out": str(out.relative_to(self.run_dir)), "status": status,
                 "seconds": seconds, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with self.lock, open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")


@contextlib.contextmanager
def step_lock(out: Path, poll: float = 2.0) -> Iterator[None]:
    """Hold ``OUT.lock/lock.json`` (the store's one-writer lock: pid and host, a dead owner's lock on this host
    taken over) while the step runs, so two pipeline processes on one run dir never make the same step; a
    waiter polls until the owner releases it."""
    lock = StoreLock(Location(out.with_name(out.name + ".lock")))
    while True:
        try:
            lock.acquire()
            break
        except StoreLockedError:
            time.sleep(poll)
    try:
        yield
    finally:
        lock.release()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def last_stage(model_dir: Path) -> dict[str, Any]:
    """The newest ``history`` entry of a student directory."""
    return read_json(model_dir / "student.json")["history"][-1]


def run_cell(cell: Cell, planner: Planner, runner: Runner, flops: FlopsCounter) -> dict[str, Any]:
    """Every step of ``cell`` (shared ones only once), its test evaluation; returns its result row."""
    upstream, finetune = planner.plan(cell)
    seconds = {f"{stage}_seconds": 0.0 for stage in ("teacher", "build", "distill", "finetune", "eval")}
    for step in [*upstream, finetune]:
        seconds[f"{step.stage}_seconds"] += runner.ensure(step)["seconds"]
    evaluation = planner.evaluation(finetune)
    seconds["eval_seconds"] += runner.ensure(evaluation)["seconds"]
    metrics = read_json(evaluation.out / "test.json")
    tuned = last_stage(finetune.out)
    metric, second = planner.metric, planner.second_metric
    row = {**dataclasses.asdict(cell), "seed": planner.seed, metric: metrics[metric], second: metrics[second],
           **report.calibration_columns(metrics), **selection_columns(tuned, metric),
           **{k: round(v, 1) for k, v in seconds.items()},
           "model": str(finetune.out)}
    teacher, store = (upstream[-3].out, upstream[-2].out) if upstream else (None, None)
    write_card(finetune.out, evaluation)
    return {**row, **flops.cell(teacher, store, finetune.out)}


def selection_columns(record: dict[str, Any], metric: str) -> dict[str, Any]:
    """What the protocol chose and why, as result columns: the chosen setting, its pooled validation score and
    every candidate's."""
    return {f"val_{metric}": record.get(f"val_{metric}"), "lr": record.get("lr"), "steps": record.get("steps"),
            "chosen": record.get("chosen"), "candidates": json.dumps(record.get("scores") or {}),
            "protocol": record.get("protocol")}


def write_card(model_dir: Path, evaluation: Step) -> None:
    """``card.md`` in the row's model directory: its test metrics, lineage and history (``train.card``)."""
    (model_dir / "card.md").write_text(card.render_card(model_dir, evaluation.out / "test.json"))


def teacher_row(shots: int, mode: str, planner: Planner, runner: Runner,
                flops: FlopsCounter) -> dict[str, Any]:
    """Reference row: the adapted teacher itself on the test split."""
    teacher = planner.teacher(shots, mode)
    record = runner.ensure(teacher)
    evaluation = planner.evaluation(teacher)
    eval_record = runner.ensure(evaluation)
    metrics, teacher_card = read_json(evaluation.out / "test.json"), read_teacher_card(teacher.out)
    adapt = flops.teacher_adapt(teacher.out)
    write_card(teacher.out, evaluation)
    metric, second = planner.metric, planner.second_metric
    return {"shots": shots, "transfer": None, "method": "teacher", "teacher_mode": mode,  # as its cells name it
            "seed": planner.seed, metric: metrics[metric], second: metrics[second],
            **report.calibration_columns(metrics), **selection_columns(teacher_card.adaptation, metric),
            "teacher_seconds": record["seconds"],
            "eval_seconds": eval_record["seconds"], "model": str(teacher.out),
            "teacher_adapt_flops": adapt, "teacher_pass_flops": 0, "student_flops": 0, "compute_flops": adapt}


Item = TypeVar("Item")


def side_by_side(function: Callable[[Item], Any], items: Iterable[Item], jobs: int) -> list[Any]:
    """``[function(item) for item in items]``, in that order; with ``jobs`` > 1 every call in its own thread (the
    runner bounds how many steps run at once), so independent cells and seeds overlap."""
    items = list(items)
    if jobs == 1 or len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(function, items))


def run_grid(recipe: Recipe, run_dir: Path) -> list[dict[str, Any]]:
    """Every seed's grid (finished cells are read back) and reference teachers; stages shared by seeds run once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    runner, flops = Runner(run_dir, recipe), FlopsCounter(run_dir)
    per_seed = side_by_side(lambda seed: run_seed(recipe, Planner(recipe, run_dir, seed), runner, flops),
                            recipe.seeds, recipe.jobs)
    return [row for rows in per_seed for row in rows]


def cell_row(cell: Cell, planner: Planner, runner: Runner, flops: FlopsCounter) -> dict[str, Any]:
    """``cell``'s result row: read back when the cell is done, else run (``run_cell``) and recorded."""
    done = planner.run_dir / "cells" / f"{cell.key}-{planner.cell_hash(cell)}.json"
    if done.exists():
        print(f"== cell {cell.key} seed {planner.seed}: done, skipped", flush=True)
        runner.note("cell", done, "skipped", 0.0)
        return read_json(done)
    row = run_cell(cell, planner, runner, flops)
    done.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(done, json.dumps(row, indent=1))
    return row


def run_seed(recipe: Recipe, planner: Planner, runner: Runner,
             flops: FlopsCounter) -> list[dict[str, Any]]:
    """One seed's labeled draw end to end: every cell of the grid and the teachers' reference rows (side by side
    with ``jobs`` > 1: a reference teacher needs no cell)."""
    cells = grid_cells(recipe)
    task_cells = [c for c in cells if METHODS[c.method].target == "logits"]  # the task teacher's cells
    modes = recipe.reference_teachers  # true: the modes the grid distills from; or a list of modes
    modes = list(dict.fromkeys(c.teacher_mode for c in task_cells)) if modes is True else modes or []
    shots = dict.fromkeys(c.shots for c in task_cells) if task_cells else dict.fromkeys(recipe.grid.shots)
    tasks = [functools.partial(cell_row, cell, planner, runner, flops) for cell in cells]
    tasks += [functools.partial(teacher_row, s, mode, planner, runner, flops) for s in shots for mode in modes]
    rows = side_by_side(lambda task: task(), tasks, recipe.jobs)
    mark_teacher_ahead(rows[:len(cells)], planner)
    return rows


def teacher_val(teacher_card: TeacherCard, metric: str) -> float | None:
    """The task teacher's score on the validation part: top-1 (its card's) or mIoU (its adaptation record)."""
    return teacher_card.val_accuracy if metric == "top1" else teacher_card.adaptation.get(f"val_{metric}")


def mark_teacher_ahead(rows: list[dict[str, Any]], planner: Planner) -> None:
    """Task-oriented rows get their teacher's cross-validated top-1 (mIoU) and the labeled-only row's (same folds;
    without that row, the teacher's own labels-only baseline) and ``teacher_ahead``; a teacher that is not ahead is
    reported, since the student cannot learn more than it."""
    key = f"val_{planner.metric}"
    labels_only = {r["shots"]: r[key] for r in rows if r["method"] == "labeled-only"}
    for row in rows:
        if row["method"] not in METHODS or METHODS[row["method"]].target != "logits":
            continue
        card = read_teacher_card(planner.teacher(row["shots"], row["teacher_mode"]).out)
        teacher = teacher_val(card, planner.metric)
        baseline = labels_only.get(row["shots"], (card.adaptation.get("labels_only") or {}).get("val_top1"))
        row.update({f"teacher_{key}": teacher, f"labels_only_{key}": baseline,
                    "teacher_ahead": None if None in (teacher, baseline) else teacher > baseline})
        if row["teacher_ahead"] is False:
            print(f"warning: {row['teacher_mode']} teacher at {row['shots']} labels/class (seed {planner.seed}) is not "
                  f"ahead of the labeled-only student in cross-validation ({teacher:.3f} vs {baseline:.3f}): "
                  "distilling it cannot "
                  "beat training on the labels; see README 'When the teacher is weak'", flush=True)


def print_plan(recipe: Recipe, run_dir: Path) -> None:
    """Every distinct step of the grid in run order, as command lines (evaluations follow the lr choice)."""
    seen = set()
    for seed in recipe.seeds:
        planner = Planner(recipe, run_dir, seed)
        for cell in grid_cells(recipe):
            upstream, finetune = planner.plan(cell)
            for step in [*upstream, finetune]:
                if step.out not in seen:
                    seen.add(step.out)
                    print(f"# {step.stage} -> {step.out}\n{step.command_line()}")
    counts = {stage: sum(1 for out in seen if out.parent.name == f"{stage}s") for stage in STAGES}
    print(f"# {len(grid_cells(recipe))} cells x {len(recipe.seeds)} seeds; "
          + ", ".join(f"{n} {stage}" for stage, n in counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="recipe YAML (default: embedded)")
    parser.add_argument("--run-dir", default="runs/pipeline", help="where teachers, stores, models and results go")
    parser.add_argument("--publish", help="also copy results.md and the plots into this directory (e.g. docs)")
    parser.add_argument("--plan", action="store_true", help="print every step's command line; run nothing")
    parser.add_argument("--seeds", type=comma_ints, default=None,
                        help="override the recipe's seeds, e.g. 0,1,2 (labeled draw, folds, training; {seed} in a "
                             "transfer-set spec): each row is reported as mean ± std over them")
    parser.add_argument("--threads", type=int, default=None,
                        help="override the recipe's threads: torch threads of every stage (default 2)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="override the recipe's jobs: steps run side by side, each a process with --threads "
                             "threads (default 1: one after the other); the numbers do not "
                             "depend on it")
    args = debug_flag(parser).parse_args(argv)
    for name in ("threads", "jobs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    start = time.perf_counter()
    with cli_errors("train.pipeline", args.debug):
        recipe = load_recipe(args.recipe)
        recipe = dataclasses.replace(recipe, seeds=tuple(args.seeds or recipe.seeds),
                                     threads=args.threads or recipe.threads, jobs=args.jobs or recipe.jobs)
        if args.plan:
            print_plan(recipe, Path(args.run_dir))
            return 0
        rows = run_grid(recipe, Path(args.run_dir))
    metric = METRICS[TASKS[recipe.task][1]][0]
    title = f"{Path(args.recipe).name}: {metric} on {recipe.test}"
    total = round(time.perf_counter() - start, 1)
    files = report.write_report(rows, Path(args.run_dir), title=title,
                                extra={"recipe": str(args.recipe), "total_seconds": total})
    print("\n" + Path(files["markdown"]).read_text())
    print(f"total {time.perf_counter() - start:.0f} s; results in {args.run_dir}")
    if args.publish:
        Path(args.publish).mkdir(parents=True, exist_ok=True)
        for name in ("markdown", "labels_plot", "compute_plot"):
            shutil.copy(files[name], args.publish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
