"""Is ``reinforce.build`` teacher-bound? Bare teacher throughput vs full build throughput, store cost
per view, random-read cost and top-k codec fidelity, all measured in one run on this machine.

Example:
    python benchmarks/build.py --images 2000 --views 4 --batch-size 256 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reinforce.augment import RandAugCropFlip
from reinforce.build import BuildConfig, build
from reinforce.sources import open_source
from reinforce.teachers import TeacherModel, embedded_imagenet_teacher
from stores.codecs import TopKLogitsCodec
from stores.store import open_store
from stores.verify import describe_store


def render_views(spec: str, policy: RandAugCropFlip, views: int, count: int) -> torch.Tensor:
    """uint8 views exactly as the build renders them (same seed, sample and view keys)."""
    source = open_source(spec)
    out = []
    for i in range(len(source)):
        image = source.load(i)
        out.extend(policy.apply(image, policy.sample(0, i, v, *image.shape[-2:])) for v in range(views))
        if len(out) >= count:
            break
    return torch.stack(out[:count])


@torch.inference_mode()
def bare_throughput(model: TeacherModel, views: torch.Tensor, batch_size: int) -> tuple[float, float, torch.Tensor]:
    """Teacher forward only: views/s and CPU ms/view (channels_last, after one warm-up batch), and the logits."""
    model = model.to(memory_format=torch.channels_last).eval()
    batches = [views[i: i + batch_size].contiguous(memory_format=torch.channels_last)
               for i in range(0, len(views), batch_size)]
    model(batches[0])
    start, cpu = time.perf_counter(), time.process_time()
    logits = [model(batch) for batch in batches]
    cpu_ms = (time.process_time() - cpu) * 1e3 / len(views)
    return len(views) / (time.perf_counter() - start), cpu_ms, torch.cat(logits).float()


def random_read_ms(store_path: Path, batch_size: int, batches: int, cache_bytes: int) -> float:
    """ms per training-style batch read: random samples, one random view each (after one warm-up epoch)."""
    store = open_store(store_path, cache_bytes=cache_bytes)
    rng = np.random.default_rng(0)
    n, k = store.manifest.num_samples, store.manifest.views
    draw = [(rng.permutation(n)[:batch_size], rng.integers(0, k, batch_size)) for _ in range(batches)]
    for samples in np.array_split(np.arange(n), max(1, n // batch_size)):
        store.read(samples, np.zeros_like(samples))
    start = time.perf_counter()
    for samples, views in draw:
        store.read(samples, views)
    return (time.perf_counter() - start) * 1e3 / batches


def codec_fidelity(logits: torch.Tensor, k: int) -> tuple[float, float]:
    """Mean KL(full softmax || decoded top-k) and top-1 agreement."""
    codec = TopKLogitsCodec(k=k, num_classes=logits.shape[1])
    decoded = codec.decode({name: torch.from_numpy(a) for name, a in codec.encode(logits).items()})
    log_p = torch.log_softmax(logits, -1)
    kl = (log_p.exp() * (log_p - decoded.clamp_min(1e-30).log())).sum(-1).mean().item()
    return kl, (decoded.argmax(-1) == logits.argmax(-1)).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="Fashion-MNIST test images in the build")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="teacher input size")
    parser.add_argument("--topk", type=int, default=10, help="top-k stored by the build")
    parser.add_argument("--bare-views", type=int, default=2048, help="views timed in the bare forward")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("VFM_REINFORCE_HOME", str(Path(args.out or tempfile.gettempdir()) / "vfm_home"))
    model, card = embedded_imagenet_teacher(args.size)
    spec = f"fashion-mnist:test?limit={args.images}"
    policy = RandAugCropFlip(size=args.size)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    views = render_views(spec, policy, args.views, args.bare_views)
    bare, bare_cpu, logits = bare_throughput(model, views, args.batch_size)
    print(f"(i)   bare teacher forward: {bare:7.1f} views/s, {bare_cpu:.2f} CPU ms/view  ({len(views)} views, "
          f"batch {args.batch_size}, {args.size}px, channels_last)")

    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        store = None
        for workers in args.workers:
            store = Path(scratch) / f"w{workers}"
            config = BuildConfig(teacher=card.name, transfer_set=spec, out=str(store), views=args.views,
                                 topk=args.topk, batch_size=args.batch_size, workers=workers)
            start, cpu = time.perf_counter(), time.process_time()
            build(config, teacher=(model, card))
            total = args.images * args.views
            rate, cpu_ms = total / (time.perf_counter() - start), (time.process_time() - cpu) * 1e3 / total
            # main-process CPU per view is immune to other load: it shows the build's own overhead
            print(f"(ii)  build, {workers} worker(s): {rate:7.1f} views/s, {cpu_ms:.2f} main-process CPU ms/view  "
                  f"({args.images} images x {args.views} views)  build / bare = {rate / bare:.2f} wall, "
                  f"{bare_cpu / cpu_ms:.2f} CPU")
        info = describe_store(store)
        print(f"(iii) store, top-{args.topk} of {card.num_classes} + θ: {info['bytes_per_view']:.1f} B/view of array "
              f"data, {info['total_bytes_per_view']:.1f} B/view with all files ({info['total_bytes']} bytes)")
        cached, uncached = (random_read_ms(store, 128, 20, cache) for cache in (256 << 20, 1))
        print(f"(iv)  random batch of 128 (sample, view) reads: {cached:.2f} ms with the chunk cache, "
              f"{uncached:.2f} ms decoding every touched chunk  ({uncached / cached:.0f}x)")

    print(f"(v)   codec fidelity on {len(logits)} real teacher views ({card.num_classes} classes):")
    for k in (1, 5, 10):
        kl, agreement = codec_fidelity(logits, k)
        print(f"        top-{k:<2d}  KL(full || decoded) {kl:.4f}   top-1 agreement {agreement:.4f}")


if __name__ == "__main__":
    main()
