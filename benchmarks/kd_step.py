"""Cost of one training step: cached teacher targets vs plain labels vs an online teacher.

Why: the point of a reinforced store is that distillation costs about what supervised training
costs, while online distillation pays a teacher forward every step. One run prints

- supervised / cached: throughput of a cached-target KD step (decode + KL) relative to a
  cross-entropy step on the same batch (goal >= 0.9);
- online / cached: time of an online KD step (Lite0 teacher forward at 64 px + student step)
  relative to the cached step (goal >= 3);
- teacher / student forward FLOPs (torch.utils.flop_counter).

Steps use a plain torch AdamW (no DeepSpeed) so only the step itself is timed.

Example:
    python benchmarks/kd_step.py --batch-size 128 --steps 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from reinforce.augment import eval_view
from reinforce.sources import open_source
from reinforce.teachers import embedded_imagenet_teacher
from stores.codecs import TopKLogitsCodec
from stores.store import as_tensor
from train.losses import kl_divergence
from train.models import create_student
from train.report import forward_flops


def time_steps(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each step kind, interleaved round by round so that load from
    other processes hits every kind alike (the ratios are what matter)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def make_steps(teacher, student, views_t: torch.Tensor, views_s: torch.Tensor, labels: torch.Tensor,
               payload: dict[str, torch.Tensor], codec: TopKLogitsCodec, temperature: float) -> dict[str, Callable]:
    """The three step kinds, each a full forward + backward + optimizer step of the student."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def supervised() -> None:
        update(F.cross_entropy(student(views_s), labels))

    def cached() -> None:
        update(kl_divergence(student(views_s), codec.decode(payload), temperature))

    def online() -> None:
        with torch.inference_mode():
            targets = teacher(views_t)
        update(kl_divergence(student(views_s), targets.clone(), temperature))

    return {"supervised": supervised, "cached": cached, "online": online}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each kind per round)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--student", default="mobilenetv3_small_050")
    parser.add_argument("--student-size", type=int, default=32)
    parser.add_argument("--teacher-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    teacher, card = embedded_imagenet_teacher(args.teacher_size)
    names = card.class_names
    teacher = teacher.to(memory_format=torch.channels_last).eval()
    student, _ = create_student(args.student, class_names=names, input_size=args.student_size)
    source = open_source(f"fashion-mnist:test?limit={args.batch_size}")
    images = [source.load(i) for i in range(len(source))]
    views_t, views_s = (torch.stack([eval_view(x, size) for x in images]).contiguous(memory_format=torch.channels_last)
                        for size in (args.teacher_size, args.student_size))
    codec = TopKLogitsCodec(k=5, num_classes=len(names))
    with torch.inference_mode():
        teacher_logits = teacher(views_t)
    payload = {k: as_tensor(v) for k, v in codec.encode(teacher_logits).items()}
    steps = make_steps(teacher, student.train(), views_t, views_s, teacher_logits.argmax(1), payload, codec, 2.0)
    seconds = time_steps(steps, args.steps, args.warmup)
    flops_t, flops_s = forward_flops(teacher, views_t[:1]), forward_flops(student.eval(), views_s[:1])

    print(f"batch {args.batch_size}, {args.threads} threads, student {args.student}@{args.student_size}px, "
          f"teacher tf_efficientnet_lite0@{args.teacher_size}px")
    for name, value in seconds.items():
        print(f"  {name:10s} step {value * 1e3:8.1f} ms  ({args.batch_size / value:7.0f} img/s)")
    print(f"supervised/cached throughput ratio (time_supervised / time_cached): "
          f"{seconds['supervised'] / seconds['cached']:.3f}  (goal >= 0.9)")
    print(f"online/cached time ratio: {seconds['online'] / seconds['cached']:.2f}x  (goal >= 3)")
    print(f"forward FLOPs per image: teacher {flops_t / 1e6:.1f} M, student {flops_s / 1e6:.1f} M, "
          f"ratio {flops_t / flops_s:.1f}x")


if __name__ == "__main__":
    main()
