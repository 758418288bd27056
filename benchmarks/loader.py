"""Is replaying a reinforced store as fast as plain random augmentation? Samples/s of a DataLoader that
replays stored views and reads their targets vs a plain random-augment DataLoader over the same images
(goal: replay >= 0.95x plain), per store format, at each worker count, measured side by side in one run.

Both loaders are built the way ``train.distill`` builds its loader (``make_loader``: a batch sampler over
a map-style dataset whose ``__getitems__`` returns a whole batch, identity collate). One timed pass is a
whole epoch, worker start-up included (training does not keep workers between epochs); the variants are
interleaved round by round and the median pass is reported, so load from other processes hits all alike.

Each store format is a column: a store built in that format, opened by ``open_replay``, loaded by
``make_loader`` (zarr: random access through a batch sampler; webdataset: the resampled shard stream). A
stream is compared with the stream a user had before reinforcing: plain webdataset over tar shards of the
same images alone (same shard size, resampling and shuffle buffer), a fresh random view per sample.

Example:
    python benchmarks/loader.py --images 2048 --batch-size 128 --workers 0 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from reinforce.augment import CropFlip
from reinforce.build import BuildConfig, build
from reinforce.replay import StreamReplay, open_replay
from reinforce.sources import Source, load_image_bytes
from reinforce.teachers import embedded_imagenet_teacher
from train.distill import DistillConfig, make_loader


class PlainAugment(Dataset):
    """The baseline: item p -> a fresh random view of sample ``indices[p]`` at ``size`` by the store's own
    policy (``policy.sample`` + ``policy.apply``), a new one every epoch; batched like ``ReplayDataset``."""

    def __init__(self, source: Source, policy: CropFlip, indices: np.ndarray, size: int, seed: int = 0):
        self.source, self.policy, self.indices, self.size, self.seed = source, policy, indices, size, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitems__(self, positions: list[int]) -> dict[str, Any]:
        """``{"views": uint8 [B, 3, S, S], "index": [B]}``."""
        samples = self.indices[np.asarray(positions, dtype=np.int64)]
        views = []
        for i in samples.tolist():
            image = self.source.load(i)
            theta = self.policy.sample(self.seed, i, self.epoch, image.shape[-2], image.shape[-1])
            views.append(self.policy.apply(image, theta, size=self.size))
        return {"views": torch.stack(views), "index": torch.from_numpy(samples)}


def image_shards(source: Source, indices: np.ndarray, out: Path, per_shard: int) -> list[str]:
    """The images alone as plain webdataset shards (``png`` + ``json`` index), as a user would stream them."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "images-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in indices.tolist():
            sink.write({"__key__": f"{i:09d}", "png": source.encoded(i)[0], "json": {"index": i}})
    return sorted(str(p) for p in out.glob("images-*.tar"))


def plain_stream(urls: list[str], policy: CropFlip, size: int, batch_size: int, workers: int, batches: int,
                 epoch: int = 0) -> wds.WebLoader:
    """Plain webdataset: resampled shards, the replay's shuffle buffer, decode, a fresh random view, batches."""
    def view(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        image, index = load_image_bytes(sample["png"]), sample["json"]["index"]
        theta = policy.sample(0, index, epoch, image.shape[-2], image.shape[-1])
        return policy.apply(image, theta, size=size), index

    def collate(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        return {"views": torch.stack([v for v, _ in items]), "index": torch.tensor([i for _, i in items])}

    buffer = StreamReplay.shuffle_buffer
    dataset = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
               .shuffle(buffer, initial=min(100, buffer)).decode().map(view)
               .batched(batch_size, collation_fn=collate, partial=False))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers).with_epoch(batches)


def distill_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """The DataLoader ``train.distill`` would build over ``dataset`` (one rank)."""
    return make_loader(dataset, DistillConfig(store="", student="", out="", batch_size=batch_size, workers=workers),
                       rank=0, world=1)


def time_passes(loaders: dict[str, Callable[[], Iterable[Any]]], rounds: int) -> dict[str, float]:
    """Median samples/s of one whole pass over each loader, interleaved round by round (after a warm-up pass)."""
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for round_ in range(rounds + 1):
        for name, make in loaders.items():
            start, samples = time.perf_counter(), 0
            for batch in make():
                samples += len(batch["views"])
            if round_:  # round 0 warms caches (page cache, chunk decode paths, imports in workers)
                rates[name].append(samples / (time.perf_counter() - start))
    return {name: float(np.median(values)) for name, values in rates.items()}


def build_store(out: Path, store_format: str, images: int, views: int, teacher_size: int, workers: int) -> Path:
    """A real store: the embedded Lite0 teacher over ``images`` Fashion-MNIST train images x ``views``."""
    model, card = embedded_imagenet_teacher(teacher_size)
    config = BuildConfig(teacher=card.name, transfer_set=f"fashion-mnist:train?limit={images}", out=str(out),
                         targets=("logits",), views=views, topk=5, workers=workers,
                         **({} if store_format == "zarr" else {"format": store_format}))
    build(config, teacher=(model, card))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="Fashion-MNIST train images in the store")
    parser.add_argument("--views", type=int, default=4, help="stored views per image")
    parser.add_argument("--teacher-size", type=int, default=64, help="teacher input size of the build")
    parser.add_argument("--size", type=int, default=32, help="student size both loaders render at")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per loader (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the main process (DataLoader workers use 1; with 2 on a loaded "
                             "2-core machine, rendering small views at workers 0 is 10-20x slower and noisy)")
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VFM_REINFORCE_HOME", str(Path(args.out or tempfile.gettempdir()) / "vfm_home"))
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} intra-op thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        formats = ("zarr", "wds")
        replays = {fmt: open_replay(build_store(Path(scratch) / fmt, fmt, args.images, args.views, args.teacher_size,
                                                args.workers[-1]), targets=["logits"], size=args.size)
                   for fmt in formats}
        zarr = replays["zarr"]
        plain = PlainAugment(zarr.source, zarr.policy, zarr.indices, zarr.size)
        per_shard = replays["wds"].store.manifest.layout["unit_samples"]
        urls = image_shards(zarr.source, zarr.indices, Path(scratch) / "images", per_shard)
        batches = len(plain) // args.batch_size
        print(f"{len(plain)} images x {args.views} stored views, batch {args.batch_size}, views rendered at "
              f"{args.size}px, targets: logits; median of {args.rounds} interleaved epochs")
        for workers in args.workers:
            loaders = {name: lambda d=dataset, w=workers: distill_loader(d, args.batch_size, w)
                       for name, dataset in {"plain": plain, **replays}.items()}
            loaders["plain stream"] = lambda w=workers: plain_stream(urls, zarr.policy, zarr.size, args.batch_size,
                                                                     w, batches)
            rates = time_passes(loaders, args.rounds)
            print(f"  workers {workers}: plain {rates['plain']:6.0f}/s, zarr replay {rates['zarr']:6.0f}/s = "
                  f"{rates['zarr'] / rates['plain']:.2f}x | plain stream {rates['plain stream']:6.0f}/s, wds replay "
                  f"{rates['wds']:6.0f}/s = {rates['wds'] / rates['plain stream']:.2f}x  (samples/s; goal >= 0.95x)")


if __name__ == "__main__":
    main()
