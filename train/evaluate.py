"""Evaluate a student directory or a teacher zoo entry on a labeled source; prints JSON.

A classifier is scored by top-1, balanced accuracy and its calibration (``train.calibration``): ECE
(torchmetrics ``MulticlassCalibrationError``, 15 equal-width bins), NLL, Brier and the reliability bins.

A segmentation model (a ``SegmentationStudent`` or a ``timm_seg`` teacher) on image/mask pairs is scored by
mIoU (torchmetrics ``MulticlassJaccardIndex``, macro) and pixel accuracy at its input size.

``--predictions FILE.npy`` also writes the predicted class of every image (``[N] int64``, in the
source's order), e.g. to check that another runtime loading the directory predicts the same.

Example:
    python -m train.evaluate --model runs/student --data fashion-mnist:test --out runs/student/test.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from reinforce.memory import keep_freed_memory
from reinforce.sources import open_source
from reinforce.teachers.dense import SegmentationTeacher
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from train.calibration import calibration
from train.data import accuracy, evaluate_model, open_labeled, predict_logits
from train.models import SegmentationStudent, load_classifier

__all__ = ["evaluate", "main"]


def evaluate(model_name: str, data: str, batch_size: int = 256, predictions: str | None = None) -> dict[str, Any]:
    """Top-1 / balanced accuracy and calibration of ``model_name`` at its own input size on ``data``;
    ``predictions``: a .npy path."""
    model, card = load_classifier(model_name)
    if isinstance(model, (SegmentationTeacher, SegmentationStudent)):
        source = open_source(data)
        if source.class_names != card.class_names:
            raise ValueError(f"{model_name!r} segments {len(card.class_names)} classes {card.class_names[:3]}..., "
                             f"{data!r} has {len(source.class_names)} {source.class_names[:3]}...")
        metrics = evaluate_model(model, source, card.input_size, batch_size)  # mIoU, pixel accuracy
        return {**metrics, "num_images": len(source), "model": model_name, "data": data}
    source, class_names = open_labeled(data, None, 0)
    if len(class_names) != card.num_classes:
        raise ValueError(f"{model_name!r} has {card.num_classes} classes but {data!r} has {len(class_names)}")
    logits, labels = predict_logits(model, source, card.input_size, batch_size)
    predicted = logits.argmax(1)
    if predictions:
        Path(predictions).parent.mkdir(parents=True, exist_ok=True)
        np.save(predictions, predicted.numpy())
    metrics = {**accuracy(predicted, labels, card.num_classes), **calibration(logits, labels)}
    return {**metrics, "num_images": len(source), "model": model_name, "data": data}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    parser = argparse.ArgumentParser(prog="train.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="student directory or teacher zoo name/path")
    parser.add_argument("--data", required=True, help="labeled source spec, e.g. fashion-mnist:test")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--predictions", help="also write every image's predicted class here (.npy, int64)")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors(parser.prog, args.debug):
        result = evaluate(args.model, args.data, args.batch_size, args.predictions)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
