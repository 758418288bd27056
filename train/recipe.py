"""A ``train.pipeline`` recipe (``train/recipes/*.yaml``) as a typed, checked ``Recipe``.

A recipe names the grid axes (``grid:``), the labeled data and test split, the transfer sets, and per stage
the flags of that stage's command line (``teacher:`` -> ``train.teacher``, ``build:`` -> ``reinforce.build``,
``distill:`` -> ``train.distill``, ``finetune:`` and ``labeled_only:`` -> ``train.finetune``). ``load_recipe``
parses every stage's section with that stage's own parser (its ``build_parser()``), so a typo'd or ill-typed
flag in a late stage is one line naming the section and flag before the first stage runs, not an error after
the upstream stages spent minutes.

Example:
    >>> recipe = load_recipe(RECIPES / "comparison.yaml")
    >>> recipe.grid.method, recipe.seeds
    (('labeled-only', 'task-agnostic-embedding', 'task-agnostic-patch', 'task-oriented'), (0, 1, 2))
    >>> flags(recipe.finetune)
    ['--lr', '0.0005,0.002', '--steps', '0,150', '--batch-size', '32']
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib
import os
from pathlib import Path
from typing import Any

import yaml

from reinforce.sources import open_source
from stores.errors import InputError
from train.methods import METHODS, TEACHER_MODES

__all__ = ["DEFAULT_RECIPE", "RECIPES", "STAGE_MODULES", "STEP_MODULES", "Grid", "Recipe", "flags", "load_recipe",
           "read_recipe"]

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES / "fashion_mnist.yaml"
MAX_RECIPE_BYTES = 1 << 20
DEFAULT_THREADS = 2  # what a 2-core machine runs best at; pinned so a bigger machine computes the same numbers
# pipeline step -> the command line it runs
STEP_MODULES = {"teacher": "train.teacher", "build": "reinforce.build", "distill": "train.distill",
                "finetune": "train.finetune", "evaluate": "train.evaluate"}
# recipe section -> the command line its flags are for (evaluation takes none; labeled-only is a finetune)
STAGE_MODULES = {**{step: module for step, module in STEP_MODULES.items() if step != "evaluate"},
                 "labeled_only": STEP_MODULES["finetune"]}
RETIRED = {"seed": "seeds: [N, ...]", "val_fraction": "folds: K (cross-validation) or val_data: SPEC"}
SELECTION = {"folds", "val_data", "seed", "val_fraction", "eval_every", "patience", "cooldown"}  # per protocol
RESERVED = {  # flags the pipeline sets itself; a recipe section may not
    "teacher": {"data", "shots", "mode", "name", "out_dir", *SELECTION},
    "build": {"teacher", "transfer_set", "targets", "out", "seed"},
    "distill": {"store", "student", "size", "targets", "out", "seed"},
    "finetune": {"init", "student", "size", "data", "shots", "out", *SELECTION},
    "labeled_only": {"init", "student", "size", "data", "shots", "out", *SELECTION},
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The grid axes: every combination is a cell (``train.pipeline.grid_cells``)."""

    shots: tuple[int, ...]
    transfer: tuple[str, ...]
    method: tuple[str, ...]
    teacher_mode: tuple[str, ...] = ("lp",)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A checked recipe; the stage sections are the flags of their command lines (``flags``)."""

    data: str  # labeled source spec
    test: str  # test split, never used for a choice
    grid: Grid
    transfer_sets: dict[str, str]  # name -> source spec ({seed}: the seed's)
    teacher: dict[str, Any]
    student: dict[str, Any]  # arch, size (default: the architecture's pretrained size)
    finetune: dict[str, Any]
    build: dict[str, Any] = dataclasses.field(default_factory=dict)
    distill: dict[str, Any] = dataclasses.field(default_factory=dict)
    labeled_only: dict[str, Any] = dataclasses.field(default_factory=dict)  # over finetune, for labeled-only
    seeds: tuple[int, ...] = (0,)
    folds: int = 0
    val_data: str | None = None
    threads: int = DEFAULT_THREADS
    jobs: int = 1  # steps run side by side, each in its own process with ``threads`` threads
    reference_teachers: bool | tuple[str, ...] = True  # true: the modes the grid distills from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | os.PathLike = "recipe") -> Recipe:
        """``data`` (a recipe's YAML mapping) typed: every section known, the required ones present, lists where
        lists belong; ``InputError`` naming ``source`` otherwise. ``load_recipe`` also checks the values."""
        return _typed(source, data)

    @property
    def task(self) -> str:
        """``segmentation`` when the labeled data are image/mask pairs (any source with masks), else
        ``classification``."""
        return _data_task(self.data)


@functools.cache
def _data_task(data: str) -> str:
    """The task of a labeled spec, its source opened once per process (the recipe check, planner and title ask)."""
    return "segmentation" if open_source(data).mask_loader is not None else "classification"


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe file as a mapping; ``InputError`` naming the file and line for anything else.

    ``yaml.safe_load`` already refuses tags that construct objects (``!!python/object``); its errors, a recipe
    that is not a mapping and one too large or too deeply nested for the parser are one line each, not a
    traceback (a recipe may come from a colleague)."""
    with open(path, "rb") as f:
        text = f.read(MAX_RECIPE_BYTES + 1)
    if len(text) > MAX_RECIPE_BYTES:
        raise InputError(f"{path}: over {MAX_RECIPE_BYTES >> 10} KiB; a recipe is a short YAML file")
    try:
        recipe = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        plain = " (a recipe is plain YAML: no tags)" if isinstance(error, yaml.constructor.ConstructorError) else ""
        raise InputError(f"{where}: {error.problem or error.context}{plain}") from None
    except yaml.YAMLError as error:  # unmarked: bad encoding, a control character
        raise InputError(f"{path}: not a YAML file ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply for a recipe") from None
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: a recipe is a mapping of sections (data:, grid:, teacher:, ...), not a "
                         f"{type(recipe).__name__}; see {RECIPES / 'comparison.yaml'}")
    wrong = [key for key in ("grid", "transfer_sets", "student", *STAGE_MODULES)
             if recipe.get(key) is not None and not isinstance(recipe[key], dict)]
    if wrong:
        raise InputError(f"{path}: {', '.join(wrong)} must be a mapping of KEY: VALUE lines")
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    """The YAML recipe, checked: its sections and grid, known methods and modes, named transfer sets, and every
    stage section's flags parsed by that stage's command line (no reserved flags)."""
    raw = read_recipe(path)
    retired = [f"{key} (now {RETIRED[key]})" for key in RETIRED if key in raw]
    if retired:
        raise InputError(f"{path}: {', '.join(retired)}")
    recipe = Recipe.from_dict(raw, path)
    grid = recipe.grid
    unknown = set(grid.method) - set(METHODS)
    if unknown:
        raise InputError(f"{path}: grid: unknown method(s) {sorted(unknown)}; valid: {', '.join(METHODS)}")
    if set(grid.teacher_mode) - set(TEACHER_MODES):
        raise InputError(f"{path}: grid: teacher_mode must be among {TEACHER_MODES}, got {list(grid.teacher_mode)}")
    missing = set(grid.transfer) - set(recipe.transfer_sets)
    if missing:
        raise InputError(f"{path}: grid transfer set(s) {sorted(missing)} are not defined under transfer_sets:")
    if "arch" not in recipe.student or set(recipe.student) - {"arch", "size"}:
        raise InputError(f"{path}: student: takes arch: NAME and optionally size: PX, got {sorted(recipe.student)}")
    if recipe.task == "segmentation":
        agnostic = [m for m in grid.method if m.startswith("task-agnostic")]
        if agnostic or "auto" in grid.teacher_mode:
            raise InputError(f"{path}: a segmentation recipe takes methods labeled-only, task-oriented, "
                             f"task-oriented-online and teacher modes lp, ft; not {agnostic or ['auto']}")
    if "lr" not in recipe.finetune:
        raise InputError(f"{path}: finetune: lacks lr; see {RECIPES / 'comparison.yaml'}")
    for section in STAGE_MODULES:
        check_section(path, section, getattr(recipe, section))
    for section in ("finetune", "labeled_only"):
        values = getattr(recipe, section)
        candidates = len(_listed(values.get("lr"))) * len(_listed(values.get("steps")))
        if candidates > 1 and not recipe.folds and not recipe.val_data:
            raise InputError(f"{path}: {section}: {candidates} candidate settings need folds: K or val_data: SPEC")
    return recipe


def _typed(path: str | os.PathLike, raw: dict[str, Any]) -> Recipe:
    """``Recipe.from_dict``."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        raise InputError(f"{path}: unknown section {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; sections: {', '.join(fields)}")
    grid = raw.get("grid") or {}
    missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and name not in raw]
    missing += [f"grid.{axis}" for axis in ("shots", "transfer", "method") if axis not in grid]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}; see {RECIPES / 'comparison.yaml'}")
    unknown = set(grid) - {f.name for f in dataclasses.fields(Grid)}
    if unknown:
        raise InputError(f"{path}: grid: unknown axis {sorted(unknown)}; axes: shots, transfer, method, teacher_mode")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(v, int) for v in seeds):
        raise InputError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    for name in ("threads", "jobs", "folds"):
        value = raw.get(name, fields[name].default)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "folds" else 1):
            raise InputError(f"{path}: {name} must be a {'non-negative' if name == 'folds' else 'positive'} "
                             f"integer, got {value!r}")
    references = raw.get("reference_teachers", True)
    values = {**raw, "grid": Grid(**{axis: tuple(_listed(v)) for axis, v in grid.items()}), "seeds": tuple(seeds),
              "reference_teachers": references if isinstance(references, bool) else tuple(_listed(references or []))}
    values.update({name: dict(raw.get(name) or {}) for name in (*STAGE_MODULES, "student", "transfer_sets")
                   if name in raw})
    return Recipe(**values)


def check_section(path: str | os.PathLike, section: str, values: dict[str, Any]) -> None:
    """``values`` parsed as ``section``'s stage would parse them (the flags the pipeline sets stand in by
    placeholders); ``InputError`` naming the section and flag: an unknown flag, one the pipeline sets, a bad value."""
    module = STAGE_MODULES[section]
    parser = importlib.import_module(module).build_parser()
    known = {option[2:].replace("-", "_") for action in parser._actions for option in action.option_strings
             if option.startswith("--")} - {"help", "debug", "local_rank"}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise InputError(f"{path}: {section}: unknown flag {key!r} ({module} has no --{key.replace('_', '-')})"
                             + (f"; did you mean {close[0]!r}?" if close else ""))
    clash = RESERVED[section] & set(values)
    if clash:
        raise InputError(f"{path}: {section}: sets {sorted(clash)}, which the pipeline sets per cell; remove them")

    def error(message: str) -> None:
        raise InputError(f"{path}: {section}: {message}")

    parser.error = error  # type: ignore[method-assign]  # argparse reports every bad flag through it
    parser.parse_args(_placeholders(parser, values) + flags(values))


def _placeholders(parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """Stand-ins for the required flags (and required one-of groups) a recipe section leaves to the pipeline."""
    given = {"--" + key.replace("_", "-") for key in values}
    argv = []
    for group in parser._mutually_exclusive_groups:
        options = [action.option_strings[0] for action in group._group_actions]
        if group.required and not given & set(options):
            argv += [options[0], "_"]
    for action in parser._actions:
        if action.required and not given & set(action.option_strings):
            argv += [action.option_strings[0], "_"]
    return argv


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def flags(section: dict[str, Any] | None) -> list[str]:
    """``{batch_size: 32, resume: true}`` -> ``--batch-size 32 --resume`` (a recipe section is CLI flags)."""
    argv = []
    for key, value in (section or {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):  # candidates: --lr 0.0005,0.003
            argv += [flag, ",".join(map(str, value))]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv
