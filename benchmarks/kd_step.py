"""Cost of a training step on the whole path ``train.distill`` runs: cached store targets vs an online teacher.

Why: the point of a reinforced store is that a distillation step costs about a student step, while online
distillation pays a teacher forward (and the teacher-size render) every step. Both variants run exactly
what ``train.distill`` runs, through its own functions: ``open_replay`` (cached, or ``online=True``: fresh
views at both sizes) -> ``make_loader`` (batch sampler, identity collate, DataLoader workers) ->
``build_objective`` in a DeepSpeed engine (``deepspeed_glue``; CPU: gloo) -> ``train_epoch`` (store read,
replay, decode or teacher forward, forward, backward, optimizer step). One timed unit is a whole epoch,
worker start-up included; wall time per step is its median over interleaved epochs, after one warm-up
epoch of each. Prints the online / cached time ratio (goal >= 3) and the forward FLOPs of both models.

Example:
    python benchmarks/kd_step.py --images 1024 --batch-size 128 --rounds 5 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from loader import build_store  # benchmarks/loader.py: the same real store both benchmarks replay

from reinforce.replay import ReplayDataset, open_replay
from reinforce.teachers import TeacherModel, embedded_imagenet_teacher
from train import deepspeed_glue
from train.distill import DistillConfig, build_objective, make_loader, train_epoch
from train.flops import forward_flops
from train.models import create_student


def make_run(replay: ReplayDataset, config: DistillConfig, epochs: int):
    """``train.distill``'s set-up for one variant: the student objective in a DeepSpeed engine + its loader."""
    torch.manual_seed(config.seed)
    names = replay.store.manifest.content.teacher.class_names
    student, _ = create_student(config.student, class_names=names, input_size=replay.size)
    objective = build_objective(student, replay, config)
    loader = make_loader(replay, config, rank=0, world=1)
    ds_config = deepspeed_glue.resolve_config(deepspeed_glue.load_config(None), batch_size=config.batch_size,
                                              lr=config.lr, total_steps=epochs * len(loader))
    return deepspeed_glue.initialize(objective, ds_config), loader


def time_epochs(runs: dict[str, tuple], rounds: int) -> dict[str, float]:
    """Median wall seconds per step of each variant; one warm-up epoch each, then epochs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for epoch in range(rounds + 1):
        for name, (engine, loader, replay, config, teacher) in runs.items():
            loader.batch_sampler.sampler.set_epoch(epoch)
            replay.set_epoch(epoch)
            start = time.perf_counter()
            train_epoch(engine, loader, replay, config, epoch, rank=1, teacher=teacher)  # rank 1: no progress bar
            if epoch:
                times[name].append((time.perf_counter() - start) / len(loader))
    return {name: float(np.median(values)) for name, values in times.items()}


def online_teacher(size: int) -> TeacherModel:
    model, _ = embedded_imagenet_teacher(size)
    return model.to(memory_format=torch.channels_last).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="Fashion-MNIST train images in the store")
    parser.add_argument("--views", type=int, default=2, help="stored views per image")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per variant (after one warm-up)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (train.distill's default)")
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--student-size", type=int, default=32)
    parser.add_argument("--teacher-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VFM_REINFORCE_HOME", str(Path(args.out or tempfile.gettempdir()) / "vfm_home"))

    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        store = build_store(Path(scratch) / "store", "zarr", args.images, args.views, args.teacher_size, args.workers)
        deepspeed_glue.init_distributed()
        runs = {}
        for name, online in (("cached", False), ("online", True)):
            config = DistillConfig(store=str(store), student=args.student, out=str(Path(scratch) / name),
                                   batch_size=args.batch_size, workers=args.workers, size=args.student_size,
                                   targets=("logits",), online=online)
            replay = open_replay(store, targets=config.targets, size=config.size, online=online)
            engine, loader = make_run(replay, config, args.rounds + 1)
            runs[name] = (engine, loader, replay, config, online_teacher(args.teacher_size) if online else None)
        seconds = time_epochs(runs, args.rounds)
        teacher = online_teacher(args.teacher_size)
        student = runs["cached"][0].module.student.eval()
        flops_t = forward_flops(teacher, torch.zeros(1, 3, args.teacher_size, args.teacher_size))
        flops_s = forward_flops(student, torch.zeros(1, 3, args.student_size, args.student_size))

    print(f"whole training step (open_replay -> DataLoader, {args.workers} workers -> DeepSpeed step), batch "
          f"{args.batch_size}, {args.threads} threads, student {args.student}@{args.student_size}px, teacher "
          f"tf_efficientnet_lite0@{args.teacher_size}px, median of {args.rounds} interleaved epochs of "
          f"{len(runs['cached'][1])} steps, load average {os.getloadavg()[0]:.1f}")
    for name, value in seconds.items():
        print(f"  {name:8s} step {value * 1e3:8.1f} ms  ({args.batch_size / value:7.0f} img/s)")
    print(f"online / cached step time: {seconds['online'] / seconds['cached']:.2f}x  (goal >= 3)")
    print(f"forward FLOPs per image: teacher {flops_t / 1e6:.1f} M, student {flops_s / 1e6:.1f} M, "
          f"ratio {flops_t / flops_s:.1f}x")


if __name__ == "__main__":
    main()
