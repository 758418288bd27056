"""What deploying the student instead of the teacher buys on this CPU: batch-1 latency and batch-B images/s.

Why: the library exists to replace a large teacher by a small student at inference time. Measured side by
side in one run: the exported student under onnxruntime (fp32, and int8 unless ``--no-int8``) and in torch,
against the teacher (the embedded Lite0 at the default recipe's 64 px, with a 10-way head) in torch and
under onnxruntime, every model fed real Fashion-MNIST eval views at its own input size, with the same number
of threads. Each round times every variant in turn (interleaved, after a warm-up): batch-1 latency is the
median of ``--calls`` single-image calls, throughput the median of ``--calls // 4`` batches. Every ratio is
taken within a round (both sides timed back to back) and printed as min-median-max over the rounds; the
like-for-like ratio (student and teacher both exported, onnxruntime fp32) comes first, then the student vs
the teacher in torch. The output starts with what the machine was doing: CPU count, usable CPUs, the thread
setting, the load average before and after, the date; quote a ratio with that state. Weights do not change
speed, so without ``--student`` a fresh student of the demo's architecture (``mobilenetv3_small_050`` at
32 px) is exported; nothing is trained. About 15 s on 2 cores at the example's sizes.

How to run (from the repository root, after ``make data``):
    python benchmarks/deploy.py --threads 2 --rounds 5 --calls 50 --batch-size 32
    python benchmarks/deploy.py --student runs/student --threads 2     # a trained student directory
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from reinforce.teachers import TeacherModel, create_backbone, embedded_weights, load_backbone_weights
from train.export import INPUT, export_onnx, quantize_int8, render_views, session
from train.models import create_student, load_student

DATA = "fashion-mnist:test?limit=256"


def default_teacher() -> TeacherModel:
    """The embedded Lite0 ImageNet backbone with a 10-way head, as the default recipe's teacher is."""
    backbone = create_backbone("timm", "tf_efficientnet_lite0")
    load_backbone_weights(backbone, embedded_weights("tf_efficientnet_lite0.in1k"))
    return TeacherModel(backbone, 10, (0.5,) * 3, (0.5,) * 3).eval()


def onnx_runner(model: torch.nn.Module, size: int, path: Path, threads: int, int8_from: np.ndarray | None = None):
    """An onnxruntime call ``views -> logits`` of ``model`` exported to ``path`` (int8 if calibration given)."""
    export_onnx(model, size, path)
    if int8_from is not None:
        path = quantize_int8(path, path.with_suffix(".int8.onnx"), int8_from)
    run = session(path, threads)
    return lambda views: run.run(None, {INPUT: views})[0]


def torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], object]:
    model = model.eval().to(memory_format=torch.channels_last)

    def call(views: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(views).contiguous(memory_format=torch.channels_last))
    return call


def median_seconds(call: Callable[[np.ndarray], object], views: np.ndarray, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call(views)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(variants: dict[str, tuple[Callable, np.ndarray]], rounds: int, calls: int, batch: int):
    """``{name: ([batch-1 latency s per round], [images/s at batch per round])}``, after one warm-up round.

    Every round times every variant back to back, so a ratio of two variants within one round compares
    them under the same machine state; the caller takes ratios round by round.
    """
    latency = {name: [] for name in variants}
    throughput = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        for name, (call, views) in variants.items():
            one = median_seconds(call, views[:1], calls)
            many = median_seconds(call, views[:batch], max(3, calls // 4))
            if round_index:  # round 0 warms up every variant
                latency[name].append(one)
                throughput[name].append(batch / many)
    return {name: (latency[name], throughput[name]) for name in variants}


def ratio_range(numerator: list[float], denominator: list[float]) -> str:
    """``min-median-max`` of the per-round ratios ``numerator[r] / denominator[r]``."""
    ratios = np.asarray(numerator) / np.asarray(denominator)
    return f"{ratios.min():.1f}-{np.median(ratios):.1f}-{ratios.max():.1f}x"


def machine_state(threads: int) -> str:
    """CPU count, the CPUs this process may use, the thread setting: what the numbers were measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({usable} usable by this "
            f"process), --threads {threads} (torch intra-op and onnxruntime intra-op), torch {torch.__version__}")


def load_average() -> str:
    return "/".join(f"{load:.2f}" for load in os.getloadavg()) + " (1/5/15 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", help="student directory (default: a fresh mobilenetv3_small_050 at 32 px)")
    parser.add_argument("--teacher-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-int8", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # onnxruntime.quantization's advice to pre-process
    torch.set_num_threads(args.threads)
    if args.student:
        student, card = load_student(args.student)
    else:
        student, card = create_student("mobilenetv3_small_050", class_names=tuple(map(str, range(10))), input_size=32)
    teacher, teacher_size = default_teacher(), args.teacher_size
    student_views, teacher_views = (render_views(DATA, size) for size in (card.input_size, teacher_size))
    with tempfile.TemporaryDirectory() as tmp:
        # the like-for-like pair first and back to back within every round
        variants = {
            "student onnxruntime fp32": (onnx_runner(student, card.input_size, Path(tmp, "s.onnx"), args.threads),
                                         student_views),
            "teacher onnxruntime fp32": (onnx_runner(teacher, teacher_size, Path(tmp, "t.onnx"), args.threads),
                                         teacher_views),
            "teacher torch": (torch_runner(teacher), teacher_views),
            "student torch": (torch_runner(student), student_views)}
        if not args.no_int8:
            calibration = render_views("fashion-mnist:train?limit=256", card.input_size)
            variants["student onnxruntime int8"] = (onnx_runner(student, card.input_size, Path(tmp, "s8.onnx"),
                                                                args.threads, calibration), student_views)
        started, load_before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average()
        results = measure(variants, args.rounds, args.calls, args.batch_size)
        load_after = load_average()
    batch = args.batch_size
    print(f"machine: {machine_state(args.threads)}")
    print(f"load average before: {load_before}, after: {load_after}; started {started}")
    print(f"{'' if args.student else 'fresh (untrained: weights do not change speed) '}{card.arch} at "
          f"{card.input_size} px vs tf_efficientnet_lite0 at {teacher_size} px; {args.rounds} interleaved rounds "
          f"after a warm-up, each timing every variant back to back; ratios are min-median-max over rounds of the "
          f"per-round ratio")
    student_latency, student_throughput = results["student onnxruntime fp32"]
    for teacher_name, label in (("teacher onnxruntime fp32", "like-for-like, both exported (onnxruntime fp32)"),
                                ("teacher torch", "exported student vs teacher in torch")):
        teacher_latency, teacher_throughput = results[teacher_name]
        print(f"{label}: {ratio_range(teacher_latency, student_latency)} lower batch-1 latency, "
              f"{ratio_range(student_throughput, teacher_throughput)} the images/s @{batch}")
    reference_latency, reference_throughput = results["teacher onnxruntime fp32"]
    print(f"{'variant':26s} {'batch-1 ms':>10s} {'img/s @' + str(batch):>10s} "
          f"{'latency x vs teacher ort':>25s} {'throughput x vs teacher ort':>28s}")
    for name, (latency, throughput) in results.items():
        print(f"{name:26s} {np.median(latency) * 1e3:10.2f} {np.median(throughput):10.0f} "
              f"{ratio_range(reference_latency, latency):>25s} {ratio_range(throughput, reference_throughput):>28s}")
    print("(ms and img/s: medians over rounds; x: min-median-max over rounds of the per-round ratio)")


if __name__ == "__main__":
    main()
