"""``python -m train.export --model DIR --format onnx [--int8]``: a model directory as an ONNX graph, checked.

The graph takes what a deployment has after decoding and resizing an image: uint8 RGB pixels
``image [B, 3, S, S]`` (NCHW, batch dynamic), and normalises them itself — ``(x / 255 - mean) / std``,
the very ops the library's models run — so a runtime cannot pair the weights with the wrong mean/std and
moves 4x fewer input bytes; it returns ``logits [B, C]`` float32. ``preprocessing.json`` beside it says how
to make ``image`` (input size, interpolation, crop, mean/std already inside the graph, class names), read
from ``config.json``'s ``pretrained_cfg``. ``--int8`` adds ``model.int8.onnx``: onnxruntime static
quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on real training images.

Both graphs are checked against PyTorch on the eval views ``train.evaluate`` renders (``--data``): the max
abs logit difference (the command fails above ``--atol`` + ``--rtol`` x the largest |logit|, 1e-4 + 1e-5 x by
default: float32 reorderings grow with the logits' scale, and differ by CPU) and the top-1 agreement (the int8
graph fails below ``--min-int8-agreement``). The numbers go to ``export.json``.

Example:
    python -m train.export --model runs/student --format onnx --int8 --data "fashion-mnist:test?limit=256"
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reinforce.augment import eval_view
from reinforce.model_dirs import write_json
from reinforce.sources import open_source
from reinforce.teachers import resolve_teacher
from stores.cli_errors import HelpFormatter, cli_errors, debug_flag
from stores.lineage import dependency_versions
from train.models import load_classifier

__all__ = ["check_onnx", "export", "export_onnx", "main", "preprocessing", "quantize_int8", "render_views"]

INPUT, OUTPUT = "image", "logits"
OPSET = 17


def model_directory(name_or_dir: str) -> Path:
    """A student directory, or a timm teacher's zoo entry (path or name): the directory holding ``config.json``."""
    directory = Path(name_or_dir) if (Path(name_or_dir) / "student.json").exists() else resolve_teacher(name_or_dir)
    if not (directory / "config.json").exists():
        raise ValueError(f"{str(directory)!r} has no config.json (an open_clip teacher?); only timm model "
                         "directories (students, timm teachers) export")
    return directory


def preprocessing(directory: Path) -> dict[str, Any]:
    """``preprocessing.json``: how to turn an image into the graph's ``image`` input (from ``config.json``)."""
    cfg = json.loads((directory / "config.json").read_text())["pretrained_cfg"]
    return {"input": {"name": INPUT, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                      "shape": ["batch", *cfg["input_size"]], "normalized_in_graph": True},
            "output": {"name": OUTPUT, "dtype": "float32", "shape": ["batch", cfg["num_classes"]]},
            **{key: cfg[key] for key in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")},
            "class_names": cfg["label_names"]}


def export_onnx(model: nn.Module, size: int, path: Path) -> Path:
    """Trace ``model`` (uint8 views in, logits out) to ``path``, batch axis dynamic."""
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but the torch.export one needs
        warnings.simplefilter("ignore", DeprecationWarning)  # onnxscript and gains nothing for these CNNs
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return path


def render_views(spec: str, size: int) -> np.ndarray:
    """uint8 ``[N, 3, S, S]``: the eval views of ``spec`` as ``train.evaluate`` renders them."""
    source = open_source(spec)
    if not len(source):
        raise ValueError(f"{spec!r} has no images")
    return torch.stack([eval_view(source.load(i), size) for i in range(len(source))]).numpy()


def session(path: Path, threads: int = 0):
    """An onnxruntime CPU session (``threads`` 0: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, reference: np.ndarray, views: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Max abs difference of the graph's logits from ``reference [N, C]``, the reference's largest |logit| (the
    scale of that difference) and their top-1 agreement."""
    run = session(path)
    logits = np.concatenate([run.run(None, {INPUT: views[i: i + batch_size]})[0]
                             for i in range(0, len(views), batch_size)])
    return {"max_abs_diff": float(np.abs(logits - reference).max()), "max_abs_logit": float(np.abs(reference).max()),
            "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean())}


def quantize_int8(fp32: Path, int8: Path, calibration: np.ndarray, batch_size: int = 32) -> Path:
    """Static QDQ quantization of ``fp32``, activation ranges calibrated on uint8 views ``[N, 3, S, S]``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Views(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i: i + batch_size] for i in range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(({INPUT: batch} for batch in self.batches), None)

    quantize_static(str(fp32), str(int8), Views(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8


def training_data(directory: Path) -> str:
    """The labeled spec the student was last trained on (``history``), for calibration."""
    card = json.loads((directory / "student.json").read_text()) if (directory / "student.json").exists() else {}
    specs = [stage["data"] for stage in card.get("history", []) if "data" in stage]
    if not specs:
        raise ValueError(f"{str(directory)!r} records no training data to calibrate int8 on; pass --calibration SPEC")
    return specs[-1]


def export(model_dir: str, data: str, *, out: str | None = None, int8: bool = False,
           calibration: str | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` (+ ``model.int8.onnx``), ``preprocessing.json`` and ``export.json`` into ``out``
    (default: the model directory); returns the check: max abs diff and top-1 agreement on ``data``."""
    directory = model_directory(model_dir)
    out_dir = Path(out) if out else directory
    model, card = load_classifier(str(directory))
    views = render_views(data, card.input_size)
    if int8:  # every input is read before anything is written: a bad calibration spec leaves no half export
        calibration = calibration or training_data(directory)
        calibration_views = render_views(calibration, card.input_size)
    prep = preprocessing(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "preprocessing.json", prep)
    with torch.inference_mode():
        reference = torch.cat([model(torch.from_numpy(views[i: i + 256])) for i in range(0, len(views), 256)]).numpy()
    fp32 = export_onnx(model, card.input_size, out_dir / "model.onnx")
    report = {"model": str(directory), "data": data, "num_images": len(views), "opset": OPSET,
              "fp32": {"file": fp32.name, **check_onnx(fp32, reference, views)}}
    if int8:
        quantized = quantize_int8(fp32, out_dir / "model.int8.onnx", calibration_views)
        report["int8"] = {"file": quantized.name, "calibration": calibration,
                          **check_onnx(quantized, reference, views)}
    report["versions"] = dependency_versions(("onnx", "onnxruntime"))
    write_json(out_dir / "export.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="student directory or timm teacher zoo name/path")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static quantization)")
    parser.add_argument("--data", required=True, help="images to check on, e.g. fashion-mnist:test?limit=256")
    parser.add_argument("--calibration", help="images to calibrate int8 on (default: the student's training data)")
    parser.add_argument("--out", help="output directory (default: the model directory)")
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs logit difference allowed for fp32 ...")
    parser.add_argument("--rtol", type=float, default=1e-5, help="... plus this times the largest |logit|")
    parser.add_argument("--min-int8-agreement", type=float, default=0.7, help="min top-1 agreement of int8")
    args = debug_flag(parser).parse_args(argv)
    with cli_errors(parser.prog, args.debug):
        report = export(args.model, args.data, out=args.out, int8=args.int8, calibration=args.calibration)
    print(json.dumps(report, indent=1))
    fp32 = report["fp32"]
    allowed = args.atol + args.rtol * fp32["max_abs_logit"]
    failures = [f"fp32 max abs diff {fp32['max_abs_diff']:.2e} > {args.atol:g} + {args.rtol:g} x max |logit| "
                f"{fp32['max_abs_logit']:.3g}"] if fp32["max_abs_diff"] > allowed else []
    if args.int8 and report["int8"]["top1_agreement"] < args.min_int8_agreement:
        failures.append(f"int8 top-1 agreement {report['int8']['top1_agreement']:.3f} < {args.min_int8_agreement}")
    for failure in failures:
        print(f"{parser.prog}: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
