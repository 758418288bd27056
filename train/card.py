"""``python -m train.card DIR``: a markdown model card for a student, a teacher or a store, read from what it records.

Nothing is restated by hand: the model summary comes from ``config.json`` (architecture, input size,
classes), the lineage and history from the card json beside it (``student.json``/``teacher.json``,
``reinforce.model_dirs``) or the store's ``manifest.json``, the metrics from an evaluation json
(``--eval``, else ``DIR/eval.json`` or ``DIR/test.json``), the recipe and command line from the
pipeline's marker (``.pipeline-done.json``), and the export check from ``export.json``.

Example:
    python -m train.card runs/student --eval runs/student/eval.json --out runs/student/card.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from reinforce.model_dirs import read_card, read_lineage, read_task_fields
from reinforce.teachers import read_teacher_card
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.store import open_store

__all__ = ["main", "render_card"]

MARKER = ".pipeline-done.json"  # train.pipeline's record of the step that made a directory
EVAL_FILES = ("eval.json", "test.json")
METRIC_LABELS = {"top1": "top-1", "balanced_accuracy": "balanced accuracy",  # train.evaluate: classification
                 "miou": "mIoU", "pixel_accuracy": "pixel accuracy"}  # segmentation


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "| --- | --- |", *(f"| {key} | {value} |" for key, value in rows if value)]


def _summary(directory: Path) -> list[str]:
    fields = read_task_fields(directory)
    classes = ", ".join(fields["class_names"])
    return ["## Model", *_table([("architecture", f"`{fields['architecture']}` (timm)"),
                                 ("input", f"{fields['input_size']}x{fields['input_size']} RGB, mean "
                                           f"{list(fields['mean'])}, std {list(fields['std'])}"),
                                 ("classes", f"{fields['num_classes']}: {classes}")])]


def _metrics(directory: Path, eval_file: Path | None) -> list[str]:
    found = eval_file or next((directory / n for n in EVAL_FILES if (directory / n).exists()), None)
    if found is None:
        return []
    metrics = json.loads(found.read_text())
    scores = [(label, f"{metrics[key]:.2%}") for key, label in METRIC_LABELS.items() if key in metrics]
    if "ece" in metrics:  # train.evaluate's calibration of a classifier
        scores += [(f"ECE ({metrics['ece_bins']} bins)", f"{metrics['ece']:.2%}"), ("NLL", f"{metrics['nll']:.3f}"),
                   ("Brier", f"{metrics['brier']:.3f}")]
    return ["## Metrics", *_table([("data", f"`{metrics['data']}` ({metrics['num_images']} images)"), *scores])]


def _versions(lineage: dict[str, Any]) -> str:
    return ", ".join(f"{name} {version}" for name, version in lineage.get("versions", {}).items())


def _made_by(directory: Path) -> list[tuple[str, Any]]:
    """The pipeline's command line and recipe for ``directory``, when the pipeline made it."""
    if not (directory / MARKER).exists():
        return []
    record = json.loads((directory / MARKER).read_text())
    recipe = record.get("recipe")
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12] if recipe else None
    return [("command", f"`{record['command']}`"),
            ("recipe", recipe and f"sha256 {digest} (seed {recipe.get('seed', 0)}), in `{MARKER}`")]


def _student_lineage(directory: Path) -> list[list[str]]:
    history = read_card(directory / "student.json")["history"]
    rows = []
    for stage in history:
        if stage["stage"] == "distill":
            teacher, transfer = stage.get("teacher", {}), stage.get("transfer_set", {})
            rows += [("teacher", teacher and f"`{teacher['name']}`, weights sha256 `{teacher['weights_sha256']}`"),
                     ("store", f"`{stage['store_id']}` ({', '.join(stage['targets'])}"
                               f"{', online' if stage.get('online') else ''})"),
                     ("transfer set", transfer and f"`{transfer['spec']}`, fingerprint `{transfer['fingerprint']}`")]
        elif "data" in stage:
            rows.append((f"{stage['stage']} data", f"`{stage['data']}`"))
    rows += [*_made_by(directory), ("versions", _versions(read_lineage(directory / "student.json")))]
    shown = ("steps", "steps_run", "lr", "size", "epochs", "val_top1", "val_miou", "best_step")
    steps = [f"{i + 1}. **{s['stage']}**: " + ", ".join(f"{k} {s[k]}" for k in shown if s.get(k) is not None)
             for i, s in enumerate(history)]
    return [["## Lineage", *_table(rows)], ["## History", *steps]]


def _teacher_lineage(directory: Path) -> list[str]:
    card, lineage = read_teacher_card(directory), read_lineage(directory / "teacher.json")
    source = lineage.get("weights_source")
    adaptation = card.adaptation
    rows = [("teacher", f"`{card.name}` ({card.library} `{card.backbone}`), weights sha256 `{card.weights_sha256}`"),
            ("made from", source and f"`{source['file']}`, sha256 `{source['sha256']}`"),
            ("adaptation", ", ".join(f"{k} {adaptation[k]}" for k in ("mode", "shots", "steps", "lp_steps", "size")
                                     if adaptation.get(k) is not None)),
            ("data", adaptation.get("data") and f"`{adaptation['data']}`"),
            ("validation top-1", card.val_accuracy is not None and f"{card.val_accuracy:.2%}"),
            ("validation mIoU", adaptation.get("val_miou") is not None and f"{adaptation['val_miou']:.2%}"),
            *_made_by(directory), ("versions", _versions(lineage))]
    return ["## Lineage", *_table(rows)]


def _store_card(directory: Path) -> list[str]:
    manifest = open_store(directory).manifest
    content, summary = manifest.content, manifest.summary
    rows = [("store", f"`{manifest.store_id}` ({manifest.format}, created {manifest.created_at})"),
            ("teacher", f"`{content.teacher.name}` ({content.teacher.library} `{content.teacher.backbone}`, "
                        f"{content.teacher.input_size} px), weights sha256 `{content.teacher.weights_sha256}`"),
            ("transfer set", f"`{content.transfer_set.spec}`, fingerprint `{content.transfer_set.fingerprint}`, "
                             f"{summary['ok']} of {content.num_samples} images usable"),
            ("policy", f"`{content.policy.name}` v{content.policy.version} {content.policy.args}"),
            ("views", f"{content.views} per image, seed {content.seed}"),
            ("targets", ", ".join(f"{n} ({t.kind}, `{t.codec['name']}`)" for n, t in content.targets.items())),
            ("parent", content.lineage and f"`{content.lineage['parent']}` " + (
                f"({content.lineage['parent_views']} views)" if "parent_views" in content.lineage
                else "(its embeddings, under this teacher's head)")),
            *_made_by(directory), ("versions", _versions({"versions": manifest.versions}))]
    return ["## Lineage", *_table(rows)]


def _export(directory: Path) -> list[str]:
    if not (directory / "export.json").exists():
        return []
    report = json.loads((directory / "export.json").read_text())
    rows = [(f"`{report[kind]['file']}`", f"max abs logit diff vs torch {report[kind]['max_abs_diff']:.2e}, "
                                          f"top-1 agreement {report[kind]['top1_agreement']:.2%}")
            for kind in ("fp32", "int8") if kind in report]
    return ["## Export (ONNX, uint8 NCHW input; see preprocessing.json)", *_table(rows),
            f"checked on `{report['data']}` ({report['num_images']} images)"]


def render_card(directory: str | Path, eval_file: str | Path | None = None) -> str:
    """The markdown card of a student directory, a teacher zoo entry or a store."""
    directory = Path(directory)
    eval_path = Path(eval_file) if eval_file else None
    if (directory / "manifest.json").exists():
        sections = [[f"# Store {directory.name}"], _store_card(directory)]
    elif (directory / "student.json").exists():
        sections = [[f"# Student {directory.name}"], _summary(directory), _metrics(directory, eval_path),
                    *_student_lineage(directory), _export(directory)]
    elif (directory / "teacher.json").exists():
        summary = _summary(directory) if (directory / "config.json").exists() else []  # open_clip: no config.json
        sections = [[f"# Teacher {directory.name}"], summary, _metrics(directory, eval_path),
                    _teacher_lineage(directory), _export(directory)]
    else:
        raise FileNotFoundError(f"{str(directory)!r} is not a student, teacher or store directory "
                                "(no student.json, teacher.json or manifest.json)")
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.card", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("directory", help="student directory, teacher zoo entry or store")
    parser.add_argument("--eval", help="evaluation json (train.evaluate --out; default DIR/eval.json, DIR/test.json)")
    parser.add_argument("--out", help="write the card here instead of stdout")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors(parser.prog, args.debug):
        text = render_card(args.directory, args.eval)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
