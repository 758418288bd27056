"""Model directories in timm's own layout, so students and teachers load without this library.

``config.json`` is what ``timm.create_model("local-dir:DIR", pretrained=True)`` reads: the
architecture, ``num_classes``, the ``model_args`` the network was built with, and a
``pretrained_cfg`` whose input size, mean, std, interpolation and crop make
``timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))`` the preprocessing of
``train.evaluate`` (``reinforce.augment.eval_view``, then ``normalize_views``). The card beside it
(``student.json``, ``teacher.json``) keeps only what timm has no field for (lineage, history) and
reads the task fields back from ``config.json``: one source of truth. Its ``lineage`` holds the library
and dependency versions that wrote the directory (plus, for a teacher, the source weights it was made of);
``read_card`` leaves it out of the card and ``read_lineage`` returns it.

Example:
    >>> write_json(directory / "config.json", timm_config("resnet10t", net, num_classes=10, ...))
    >>> read_task_fields(directory)["input_size"]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from reinforce.augment import EVAL_PREPROCESSING
from stores.lineage import dependency_versions

__all__ = ["CONVERT_COMMAND", "LAYOUT_VERSION", "TASK_FIELDS", "read_card", "read_lineage", "read_task_fields",
           "timm_config", "write_card", "write_json"]

LAYOUT_VERSION = 2  # 1 (no field): every field in the card, weights under the wrapper's prefixes
CONVERT_COMMAND = "python -m train.convert"
TASK_FIELDS = ("num_classes", "class_names", "input_size", "mean", "std")  # the card fields config.json holds


def timm_config(architecture: str, net: nn.Module, *, num_classes: int, class_names: tuple[str, ...],
                input_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` for the timm network ``net`` (its classifier and first conv named as timm names them)."""
    pretrained_cfg = {"input_size": [3, input_size, input_size], **EVAL_PREPROCESSING, "mean": list(mean),
                      "std": list(std), "num_classes": num_classes, "label_names": list(class_names),
                      "first_conv": net.pretrained_cfg.get("first_conv"),
                      "classifier": net.pretrained_cfg.get("classifier")}
    config = {"architecture": architecture, "num_classes": num_classes, "pretrained_cfg": pretrained_cfg}
    if model_args:
        config["model_args"] = dict(model_args)
    return config


def read_task_fields(directory: str | os.PathLike) -> dict[str, Any]:
    """``architecture``, ``model_args`` and ``TASK_FIELDS`` from ``DIR/config.json``."""
    config = json.loads((Path(directory) / "config.json").read_text())
    pretrained_cfg = config["pretrained_cfg"]
    return {"architecture": config["architecture"], "model_args": config.get("model_args", {}),
            "num_classes": config["num_classes"], "class_names": tuple(pretrained_cfg["label_names"]),
            "input_size": pretrained_cfg["input_size"][-1], "mean": tuple(pretrained_cfg["mean"]),
            "std": tuple(pretrained_cfg["std"])}


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """``config.json`` and the cards: indented, so a reader can diff them."""
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def write_card(path: str | os.PathLike, card: dict[str, Any], lineage: dict[str, Any] | None = None) -> None:
    """The library's card, stamped with ``LAYOUT_VERSION`` and its lineage: the versions writing it, ``lineage``."""
    write_json(path, {"layout_version": LAYOUT_VERSION, **card,
                      "lineage": {"versions": dependency_versions(), **(lineage or {})}})


def read_lineage(path: str | os.PathLike) -> dict[str, Any]:
    """The card's ``lineage`` (``{}`` for a directory written before lineage was recorded)."""
    return json.loads(Path(path).read_text()).get("lineage", {})


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """A card without its stamp and lineage; one that predates this layout is refused with the command that
    converts it."""
    path = Path(path)
    card = json.loads(path.read_text())
    card.pop("lineage", None)
    version = card.pop("layout_version", 1)
    if version != LAYOUT_VERSION:
        raise ValueError(f"{str(path.parent)!r} has model directory layout {version}, this version reads "
                         f"{LAYOUT_VERSION} (timm's: config.json + plain timm weights); convert it in place "
                         f"with `{CONVERT_COMMAND} {path.parent}`")
    return card
