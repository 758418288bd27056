"""What a task-oriented teacher says about a transfer set: how its stored top-1 predictions spread over the classes.

Why: distilling task predictions teaches the student the teacher's class frequencies on the transfer set too. On
a set far from the task (crops of a few dozen photographs for a clothing task) the teacher's top-1 lands on a few
classes and almost never on others, and a student distilled on it starts its finetuning with those priors
(docs/comparison.md). This reads every logits store a pipeline run built (``RUN/builds/*``) — no teacher, no
model: the stored views' decoded targets — and prints, per store, the share of views whose top-1 is each class,
how many classes get at least 5 % of them, the largest share and the mean teacher confidence.

Example:
    python benchmarks/coverage.py runs/cmp0 runs/cmp1 runs/cmp2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from stores.store import open_store


def class_shares(path: Path) -> tuple[torch.Tensor, float]:
    """Share of the store's views whose decoded top-1 is each class, and the mean top-1 probability."""
    store = open_store(path)
    arrays = store.read_range(0, store.manifest.num_samples)
    payload = {name.split("/", 1)[1]: torch.from_numpy(a.reshape(-1, *a.shape[2:]))
               for name, a in arrays.items() if name.startswith("logits/")}
    decoded = store.decode("logits", payload)
    probs = decoded.exp() if store.codec("logits").decoded == "log_probs" else decoded
    top1 = probs.argmax(-1)
    return torch.bincount(top1, minlength=probs.shape[-1]).double() / len(top1), float(probs.max(-1).values.mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.pipeline run directories")
    args = parser.parse_args(argv)
    print("| run | store | classes with ≥ 5 % of top-1 | largest share | mean top-1 prob | share per class |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for run in args.runs:
        for path in sorted(p for p in (run / "builds").iterdir() if (p / "manifest.json").exists()):
            if "logits" not in open_store(path).targets:
                continue
            shares, confidence = class_shares(path)
            print(f"| {run.name} | {path.name} | {int((shares >= 0.05).sum())} | {shares.max():.2f} | "
                  f"{confidence:.2f} | {' '.join(f'{s:.2f}' for s in shares)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
