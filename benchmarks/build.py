"""Is ``reinforce.build`` teacher-bound, and what does a view cost to store? Bare teacher throughput vs full
build throughput, store cost per view, random-read cost, and every codec setting side by side on the same
real teacher outputs (bytes per view from real stores, KL / cosine to the exact outputs), in one run.

Example:
    python benchmarks/build.py --images 512 --views 4 --batch-size 256 --workers 1 2 --rounds 3

Throughputs are wall time (``time.perf_counter``) of the whole path, DataLoader workers included, against the
bare teacher forward on the same views pre-rendered, same batch and threads, interleaved runs, medians.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reinforce.augment import CropFlip, create_policy
from reinforce.build import BuildConfig, build
from reinforce.sources import open_source
from reinforce.teachers import TeacherModel, embedded_imagenet_teacher
from stores.codecs import Codec, EmbeddingCodec, PatchCodec, TopKLogitsCodec
from stores.manifest import ArraySpec, TargetRecord, TeacherCard
from stores.store import ARRAYS_DIR, THETA, ReinforcedStore, StoreWriter, open_store
from stores.verify import describe_store

# (precision, value bits, index coding); fp16/plain is the format-1 codec, uint8/6/delta the default
LOGIT_SETTINGS = (("fp16", 16, "plain"), ("fp16", 16, "delta"), ("uint8", 8, "delta"), ("uint8", 6, "plain"),
                  ("uint8", 6, "delta"), ("uint8", 5, "delta"), ("uint8", 4, "delta"))


def render_views(spec: str, policy: CropFlip, views: int, count: int) -> torch.Tensor:
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
def bare_seconds(model: TeacherModel, views: torch.Tensor, batch_size: int) -> float:
    """Wall seconds of the teacher forward alone over pre-rendered ``views`` (channels_last, the build's batch)."""
    model = model.to(memory_format=torch.channels_last).eval()
    start = time.perf_counter()
    for i in range(0, len(views), batch_size):
        model.forward_targets(views[i: i + batch_size].contiguous(memory_format=torch.channels_last), ("logits",))
    return time.perf_counter() - start


def build_seconds(config: BuildConfig, model: TeacherModel, card: TeacherCard) -> float:
    """Wall seconds of the whole build path: DataLoader workers (decode + augment), teacher, encode, writes."""
    start = time.perf_counter()
    build(config, teacher=(model, card))
    return time.perf_counter() - start


# where a build's time goes, by the functions that do it (cumulative time under cProfile, workers=0)
BUILD_PARTS = (("decode + augment (ViewDataset)", "build.py", "__getitem__"),
               ("teacher forward", "teachers.py", "forward_targets"),
               ("encode (codec.encode)", "build.py", "_encode"),
               ("  of which fidelity stats", "codecs.py", "fidelity"),
               ("unit commit (zarr writes)", "build.py", "commit"),
               ("finalize (parquet, manifest, sha256)", "store.py", "finalize"))


def build_profile(config: BuildConfig, model: TeacherModel, card: TeacherCard) -> dict[str, float]:
    """Fraction of a one-process build (``workers=0``) spent in each of ``BUILD_PARTS``."""
    profile = cProfile.Profile()
    profile.runcall(build, dataclasses.replace(config, workers=0), teacher=(model, card))
    stats = pstats.Stats(profile).stats
    total = max(ct for *_, ct, _ in stats.values())
    return {part: sum(ct for (path, _, name), (*_, ct, _) in stats.items() if path.endswith(file) and name == func)
            / total for part, file, func in BUILD_PARTS}


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


def build_recording(config: BuildConfig, model: TeacherModel, card: TeacherCard) -> dict[str, torch.Tensor]:
    """Build ``config`` and keep the teacher's exact outputs of every view, sample-major as stored
    (``{kind: float32 [N * K, ...]}``)."""
    calls: list[dict[str, torch.Tensor]] = []
    forward_targets = model.forward_targets

    def recording(views: torch.Tensor, kinds: tuple[str, ...] = ("logits",)) -> dict[str, torch.Tensor]:
        outputs = forward_targets(views, kinds)
        if views.is_meta:  # make_codecs' shape pass: no values
            return outputs
        calls.append({kind: value.float().cpu() for kind, value in outputs.items()})
        return outputs

    model.forward_targets = recording
    try:
        manifest = build(config, teacher=(model, card))
    finally:
        del model.forward_targets
    outputs = {kind: torch.cat([call[kind] for call in calls]) for kind in calls[0]}
    assert all(len(v) == manifest.num_samples * manifest.views for v in outputs.values()), "outputs went missing"
    return outputs


def rewrite_store(source: ReinforcedStore, out: Path, name: str, codec: Codec, values: torch.Tensor) -> dict:
    """The store ``source`` would be with target ``name`` encoded by ``codec``: its θ, samples and layout, the
    same teacher outputs ``values``, written through StoreWriter. Returns ``describe_store`` of it."""
    manifest = source.manifest
    arrays = {array: ArraySpec(shape, dtype.str) for array, (shape, dtype) in codec.arrays().items()}
    content = dataclasses.replace(manifest.content,
                                  targets={name: TargetRecord(kind=codec.kind, codec=codec.to_dict(), arrays=arrays)})
    writer = StoreWriter(out, content, **manifest.layout)
    writer.create()
    n, k = manifest.num_samples, manifest.views
    encoded = {f"{name}/{array}": a.reshape(n, k, *a.shape[1:]) for array, a in codec.encode(values).items()}
    encoded[THETA] = source.read_range(0, n)[THETA]
    rows = source.samples.to_dicts()
    for unit in range(writer.num_units):
        span = writer.unit_range(unit)
        writer.write_unit(unit, {a: v[span.start: span.stop] for a, v in encoded.items()}, rows[span.start: span.stop])
    writer.finalize("benchmark")
    return describe_store(out)


def chunk_bytes_per_view(info: dict, target: str) -> float:
    """Bytes of the chunk files (no zarr.json) of ``target`` (or one of its arrays, ``target/array``), per view."""
    store = open_store(info["path"])
    views = store.manifest.num_samples * store.manifest.views
    prefix = f"{ARRAYS_DIR}/{target}/"
    return sum(f.bytes for f in store.manifest.files if f.path.startswith(prefix) and "/c/" in f.path) / views


def compare_logit_codecs(reference: ReinforcedStore, logits: torch.Tensor, scratch: Path, built_topk: int) -> None:
    """Every (precision, index coding) x top-5/top-10 on the same logits; bytes from real stores."""
    num_classes = logits.shape[1]
    print(f"(v)   logit codecs side by side on the same {len(logits)} teacher views ({num_classes} classes); "
          "bytes per view as `stores inspect` counts them (chunks + metadata), [chunks only]:")
    print("        k   precision bits index   logits B/view        θ B/view    logits+θ B/view    "
          "KL(full||decoded)  top-1")
    kl_top5, best_top10 = {}, None
    for k in (5, 10):
        for precision, bits, coding in LOGIT_SETTINGS:
            codec = TopKLogitsCodec(k=k, num_classes=num_classes, precision=precision, index_coding=coding,
                                    **({"value_bits": bits} if precision == "uint8" else {}))
            info = rewrite_store(reference, scratch / f"logits-{k}-{precision}{bits}-{coding}", "logits", codec, logits)
            stored, theta = info["targets"]["logits"]["bytes_per_view"], info["theta_bytes_per_view"]
            chunks = {t: chunk_bytes_per_view(info, t) for t in ("logits", THETA)}
            fidelity = {m: v.mean().item() for m, v in codec.fidelity(logits).items()}
            print(f"        {k:<3d} {precision:<9s} {bits:<4d} {coding:<7s} {stored:6.1f} [{chunks['logits']:5.1f}]"
                  f"  {theta:6.1f} [{chunks[THETA]:4.1f}]   {stored + theta:6.1f} [{sum(chunks.values()):5.1f}]"
                  f"      {fidelity['kl']:.4f}             {fidelity['top1_agreement']:.4f}")
            if k == built_topk and codec == TopKLogitsCodec(k=k, num_classes=num_classes):  # the build's default
                same = info["targets"]["logits"]["bytes_per_view"] == describe_store(reference.path)["targets"][
                    "logits"]["bytes_per_view"]
                print(f"        (the default (uint8, 6 bits, delta) top-{k} rewrite is byte for byte the size of the "
                      "real build's logits: "
                      f"{'yes' if same else 'NO'}; its chunks per array: " + ", ".join(
                          f"{a} {chunk_bytes_per_view(info, f'logits/{a}'):.1f}" for a in codec.arrays())
                      + f", θ {chunks[THETA]:.1f} B/view)")
            if k == 5 and (precision == "fp16" or bits == TopKLogitsCodec.value_bits):
                kl_top5[precision] = fidelity["kl"]
            default_or_finer = bits >= TopKLogitsCodec.value_bits
            if k == 10 and default_or_finer and (best_top10 is None or stored + theta < best_top10[0]):
                best_top10 = (stored + theta, f"{precision}/{bits} bits/{coding}")
    cost, setting = best_top10
    print(f"        goal top-10 of {num_classes} with θ <= 24 B/view: best {cost:.1f} B/view ({setting}) "
          f"-> {'met' if cost <= 24 else 'NOT met'}")
    gap = kl_top5["uint8"] - kl_top5["fp16"]
    print(f"        goal default uint8 top-5 KL - fp16 top-5 KL <= 0.01: {gap:+.4f} -> "
          f"{'met' if gap <= 0.01 else 'NOT met'}")


def compare_feature_codecs(reference: ReinforcedStore, outputs: dict[str, torch.Tensor], scratch: Path,
                           patch_grid: int) -> None:
    """int8 vs fp16 for the embedding and the patch map of the same views; bytes from real stores."""
    print("(vi)  feature codecs on the same views:  target     precision  B/view [chunks]   cosine mean   min")
    embedding, patch = outputs["embedding"], outputs["patch"]
    for precision in ("int8", "fp16"):
        grid = min(patch_grid, patch.shape[-1])
        for name, codec, values in (
                ("embedding", EmbeddingCodec(dim=embedding.shape[1], precision=precision), embedding),
                ("patch", PatchCodec(channels=patch.shape[1], grid=grid, precision=precision), patch)):
            info = rewrite_store(reference, scratch / f"{name}-{precision}", name, codec, values)
            cosine = codec.fidelity(values)["cosine"]
            shape = "[" + "x".join(map(str, codec.arrays()["values"][0])) + "]"
            print(f"        {name:<9s} {shape:<11s} {precision:<5s} {info['targets'][name]['bytes_per_view']:8.1f} "
                  f"[{chunk_bytes_per_view(info, name):7.1f}]   {cosine.mean().item():.6f}   {cosine.min().item():.6f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="Fashion-MNIST test images in the build")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="teacher input size")
    parser.add_argument("--topk", type=int, default=10, help="top-k stored by the build")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant (after one warm-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("VFM_REINFORCE_HOME", str(Path(args.out or tempfile.gettempdir()) / "vfm_home"))
    model, card = embedded_imagenet_teacher(args.size)
    spec = f"fashion-mnist:test?limit={args.images}"
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    views = render_views(spec, create_policy(BuildConfig.policy, size=args.size), args.views, args.images * args.views)
    total = len(views)

    def config(out: Path, workers: int) -> BuildConfig:
        return BuildConfig(teacher=card.name, transfer_set=spec, out=str(out), targets=("logits",), views=args.views,
                           topk=args.topk, batch_size=args.batch_size, workers=workers)

    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        scratch = Path(scratch)
        times: dict[str, list[float]] = {"bare": [], **{f"w{w}": [] for w in args.workers}}
        for round_ in range(args.rounds + 1):  # round 0 warms up (first forward, first worker start, page cache)
            for name in times:
                out = scratch / f"{name}-{round_}"
                seconds = (bare_seconds(model, views, args.batch_size) if name == "bare"
                           else build_seconds(config(out, int(name[1:])), model, card))
                if round_:
                    times[name].append(seconds)
        rate = {name: total / float(np.median(values)) for name, values in times.items()}
        print(f"(i)   bare teacher forward: {rate['bare']:7.1f} views/s  ({total} pre-rendered views, batch "
              f"{args.batch_size}, {args.size}px, channels_last; median of {args.rounds} interleaved runs)")
        for workers in args.workers:
            print(f"(ii)  whole build, {workers} worker(s): {rate[f'w{workers}']:7.1f} views/s  ({args.images} "
                  f"images x {args.views} views, wall time incl. workers, writes, finalize)  build / bare = "
                  f"{rate[f'w{workers}'] / rate['bare']:.2f}  (goal >= 0.9)")
        parts = build_profile(config(scratch / "profile", 0), model, card)
        print("      where a one-process build's time goes (cProfile, workers=0): " + ", ".join(
            f"{part.strip()} {share:.0%}" for part, share in parts.items()))
        store = scratch / f"w{args.workers[-1]}-1"
        info = describe_store(store)
        logits = info["targets"]["logits"]
        print(f"(iii) store, top-{args.topk} of {card.num_classes} ({logits['codec']['precision']}, "
              f"{logits['codec']['index_coding']}) + θ: {logits['bytes_per_view']:.1f} + "
              f"{info['theta_bytes_per_view']:.1f} B/view, {info['total_bytes_per_view']:.1f} B/view with all files "
              f"({info['total_bytes']} bytes)")
        cached, uncached = (random_read_ms(store, 128, 20, cache) for cache in (256 << 20, 1))
        print(f"(iv)  random batch of 128 (sample, view) reads: {cached:.2f} ms with the chunk cache, "
              f"{uncached:.2f} ms decoding every touched chunk  ({uncached / cached:.0f}x)")

        every = BuildConfig(teacher=card.name, transfer_set=spec, out=str(scratch / "all"),
                            targets=("logits", "embedding", "patch"), views=args.views, topk=args.topk,
                            batch_size=args.batch_size, workers=args.workers[-1])
        outputs = build_recording(every, model, card)
        reference = open_store(every.out)
        compare_logit_codecs(reference, outputs["logits"], scratch, args.topk)
        compare_feature_codecs(reference, outputs, scratch, every.patch_grid)


if __name__ == "__main__":
    main()
