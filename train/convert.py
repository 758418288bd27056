"""Convert model directories written before timm's layout, in place: ``python -m train.convert DIR [DIR ...]``.

Layout 1 kept every field in ``student.json`` / ``teacher.json`` and the weights under the wrapper's
prefixes (``net.``; ``backbone.`` / ``head.``): exactly the state of ``Student`` / ``TeacherModel``. So
a directory converts by loading that state into those modules and saving it with today's writers
(``reinforce.model_dirs``); a teacher's sha256 is checked first and recomputed for the new files.

Example:
    python -m train.convert runs/student teachers/ft_lite0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from reinforce.model_dirs import LAYOUT_VERSION
from reinforce.teachers import TeacherModel, create_backbone, save_teacher
from reinforce.tensor_files import load_tensors
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.manifest import TeacherCard
from train.models import StudentCard, create_student, save_student

__all__ = ["convert", "main"]


def convert(directory: str | os.PathLike) -> str:
    """Rewrite one layout-1 student or teacher directory in the current layout; returns what it was."""
    directory = Path(directory)
    kind = next((k for k in ("student", "teacher") if (directory / f"{k}.json").exists()), None)
    if kind is None:
        raise FileNotFoundError(f"{str(directory)!r} has neither student.json nor teacher.json")
    card_path, weights = directory / f"{kind}.json", directory / "model.safetensors"
    data = json.loads(card_path.read_text())
    if "layout_version" in data:
        raise ValueError(f"{str(directory)!r} already has layout {data['layout_version']} (current: {LAYOUT_VERSION})")
    state = load_tensors(weights)
    if kind == "student":
        card = StudentCard.from_dict(data)
        model, _ = create_student(card.arch, class_names=card.class_names, input_size=card.input_size)
        model.load_state_dict(state)
        save_student(model, card, directory)
        return kind
    card = TeacherCard.from_dict(data, str(card_path))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if card.weights_sha256 and digest != card.weights_sha256:
        raise ValueError(f"{weights} has sha256 {digest[:12]}…, {card_path.name} records {card.weights_sha256[:12]}…")
    model = TeacherModel(create_backbone(card.library, card.backbone), card.num_classes, card.mean, card.std)
    # layout 1 held the wrapper's keys: ``backbone.`` + the library's own, ``head.`` + the linear head's
    model.backbone.load_library_state_dict({k.removeprefix("backbone."): v for k, v in state.items()
                                            if k.startswith("backbone.")})
    if model.head is not None:
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
    save_teacher(model, card, directory)
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("directories", nargs="+", metavar="DIR", help="student or teacher directory (layout 1)")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors(parser.prog, args.debug):
        for directory in args.directories:
            print(f"train.convert: {directory}: {convert(directory)} directory now in timm's layout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
