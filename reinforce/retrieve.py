"""``python -m reinforce.retrieve``: curate a task-related transfer set from a gallery, using the few labeled task
images as queries (seed paper §3.4, Appendix B).

The gallery is any source; at crop level each image gives C RandomResizedCrop crops (scale 0.08-1) with RandAugment
(2 ops, magnitude 9: the build's ``rrc_flip_randaug``, B.2; ``--crop-augment none``: plain ``rrc_flip`` crops), each
a θ record, so a retrieved crop is (image, θ) and no pixels are stored: ``retrieved:OUT`` cuts each row by its own
policy (box, flip and ops at source resolution). Image-level views (queries, task images, the gallery images judged
for duplicates and leaks) are square centre crops resized bicubically (``rrc_flip_bicubic``, as OpenCLIP's resize),
so a bicubically resized or re-encoded copy of a small task image lands near its original. Every embedding (gallery
crops, gallery images, queries, task images) is a ``reinforce.build`` store with the ``embedding`` target only, named
by its store id under ``--cache`` (the id hashes the crop policy): retrieving again with other queries or sizes runs
no encoder over the gallery; an encoder whose stores disagree in width is refused in one line.
Similarity is the mean of the encoders' cosine similarities (B.2). Retrieved source images more similar than 0.99
to each other are duplicates (one kept per union-find group, B.3); those more similar than 0.95 to any ``--exclude``
task image under any encoder are possible leaks (B.4: removed unless ``--keep-leaks``, and listed in
``OUT.report.json`` with their 5 nearest task images for a visual check). Removed items are replaced by searching
again, so the manifest holds exactly ``--size`` crops (``--with-queries`` appends the query images, as the paper
does); ``reinforce.build --transfer-set OUT`` builds on the crops. ``--index flat`` is faiss's exact search, run as
``--index torch`` (exact blockwise matmul + top-k, fp16 with fp32 scores) where the encoders run on CUDA, since
PyPI's faiss has no kernels for current GPUs; with ``--index ivfpq`` the ``similarity`` column is IVF-PQ's
approximate score; duplicates and leaks are always judged by exact similarities.

Example:
    python -m reinforce.retrieve --queries "fashion-mnist:train?shots=10&part=labeled" --gallery photo-crops:20000 \
        --encoders embedded --size 5000 --crops 10 --exclude fashion-mnist:test --out runs/retrieved.parquet
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reinforce._search import (
    INDEX_KINDS,
    STRATEGIES,
    MaxSimilarity,
    SearchIndex,
    best_matches,
    combine,
    make_index,
    neighbours,
    query_balanced,
    similar_pairs,
    unit_rows,
)
from reinforce.augment import CropFlip, create_policy
from reinforce.build import BuildConfig, build, make_codecs, store_content
from reinforce.sources import Source, open_source
from reinforce.teachers import TeacherModel, create_teacher, embedded_imagenet_teacher
from stores.cli import HelpFormatter, cli_errors, debug_flag
from stores.manifest import TeacherCard, content_id
from stores.store import THETA, open_store

__all__ = ["EMBEDDED", "Retrieval", "RetrieveConfig", "check_widths", "embed", "main", "retrieve"]

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # the embedded Lite0 ImageNet model, no zoo entry needed
NEAREST_TASK = 5  # task images listed per possible leak, for the visual check B.4 asks for
# --crop-augment: the build's policy of each gallery crop; B.2 applies RandAugment (2 ops, magnitude 9) to every crop
CROP_AUGMENTS = {"randaug": "rrc_flip_randaug", "none": "rrc_flip"}
IMAGE_POLICY = "rrc_flip_bicubic"  # image level (queries, task images, dedup/leak features): bicubic, as OpenCLIP
LEVELS = {  # crop policy arguments: crop level (RandomResizedCrop, scale 0.08-1) or image level (square centre crop)
    "crop": {"scale": [0.08, 1.0], "flip_prob": 0.0},
    "image": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip_prob": 0.0},
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrieveConfig:
    """Everything ``reinforce.retrieve`` needs; the CLI is a thin parser onto this."""

    queries: str
    gallery: str
    out: str  # the manifest (.parquet); the report goes next to it as OUT.report.json
    encoders: tuple[str, ...] = (EMBEDDED,)
    size: int = 1000
    crops: int = 10  # per gallery image, at crop level
    level: str = "crop"  # crop | image
    crop_augment: str = "randaug"  # randaug | none: RandAugment on each gallery crop (crop level only)
    strategy: str = "query-balanced"
    exclude: tuple[str, ...] = ()  # task sources (train, val, test): their near-copies are leaks
    index: str = "flat"
    nprobe: int = 16
    duplicate_threshold: float = 0.99
    leak_threshold: float = 0.95
    keep_leaks: bool = False
    with_queries: bool = False  # append the query images (their centre crops) to the manifest, as the paper does
    cache: str | None = None  # embedding stores; default OUT's folder/retrieval-cache
    encoder_size: int = 64  # input size of the embedded encoder (zoo entries have their own)
    batch_size: int = 256
    workers: int = 2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Embedded:
    """A source through every encoder: combined unit vectors float32 ``[N, K, D]``, packed θ uint8 ``[N, K, P]``,
    each encoder's unit vectors ``[N, K, D_e]`` and the store they were read from."""

    source: Source
    vectors: np.ndarray
    theta: np.ndarray
    policy: CropFlip
    per_encoder: tuple[np.ndarray, ...]
    stores: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Retrieval:
    """What ``retrieve`` wrote: the manifest's path and the report (summary, per-query counts, duplicates, leaks)."""

    out: str
    report: dict[str, Any]


@functools.cache
def load_encoder(name: str, input_size: int) -> tuple[TeacherModel, TeacherCard]:
    """``embedded`` (Lite0 ImageNet at ``input_size``) or a teacher-zoo entry (at its own input size)."""
    return embedded_imagenet_teacher(input_size) if name == EMBEDDED else create_teacher(name)


def embed(spec: str, level: str, views: int, config: RetrieveConfig) -> Embedded:
    """``spec`` through every encoder, ``views`` θ records per image at ``level``; cached as build stores."""
    source = open_source(spec)
    if len(source) == 0:
        raise ValueError(f"source {spec!r} holds no images")
    per_encoder, thetas, stores, policy = [], [], [], None
    policy_name = CROP_AUGMENTS[config.crop_augment] if level == "crop" else IMAGE_POLICY
    for name in config.encoders:
        model, card = load_encoder(name, config.encoder_size)
        settings = BuildConfig(teacher=card.name, transfer_set=spec, out="", targets=("embedding",), views=views,
                               feature_precision="fp16", policy=policy_name, policy_args=LEVELS[level],
                               batch_size=config.batch_size, workers=config.workers, seed=config.seed)
        policy = create_policy(policy_name, size=card.input_size, **LEVELS[level])
        content = store_content(card, source, policy, make_codecs(model, card, settings), settings)
        out = Path(config.cache or Path(config.out).parent / "retrieval-cache") / content_id(content)
        build(dataclasses.replace(settings, out=str(out)), teacher=(model, card))
        arrays = open_store(out).read_range(0, len(source))
        per_encoder.append(arrays["embedding/values"].astype(np.float32).reshape(len(source) * views, -1))
        thetas.append(arrays[THETA])
        stores.append(str(out))
    if any(not np.array_equal(t, thetas[0]) for t in thetas):  # θ is drawn in source pixels: size-independent
        raise ValueError(f"encoders {config.encoders} drew different crops of {spec!r}")
    vectors = combine(per_encoder).reshape(len(source), views, -1)
    return Embedded(source, vectors, thetas[0], policy,
                    tuple(unit_rows(v).reshape(len(source), views, -1) for v in per_encoder), tuple(stores))


def check_widths(encoders: tuple[str, ...], embedded: list[Embedded]) -> None:
    """Refuse, in one line, an encoder whose sources' vectors differ in width before they meet in an index (faiss
    would abort on a C++ assertion): one of its stores was made by another encoder or another revision of it."""
    for e, name in enumerate(encoders):
        first = embedded[0]
        for other in embedded[1:]:
            a, b = first.per_encoder[e].shape[-1], other.per_encoder[e].shape[-1]
            if a != b:
                raise ValueError(f"encoder {name!r} gives {a}-d vectors for {first.source.spec!r} (store "
                                 f"{first.stores[e]}) but {b}-d for {other.source.spec!r} (store {other.stores[e]}): "
                                 "a store made by another encoder or revision; delete it or use another --cache")


@dataclasses.dataclass(frozen=True)
class Selection:
    """``size`` unique gallery items (``image * views + crop``, sorted), each with its best kept (query, rank) pair
    and similarity (``random``: the nearest query, rank -1); k reached and items per query (query-balanced: k or
    k-1 each)."""

    items: np.ndarray  # int64 [size]
    query: np.ndarray  # int64 [size]
    rank: np.ndarray  # int64 [size]
    similarity: np.ndarray  # float32 [size]
    k: int
    per_query: np.ndarray  # int64 [Q]


def select(strategy: str, index: SearchIndex, gallery: np.ndarray, queries: np.ndarray, allowed: np.ndarray, size: int,
           rng: np.random.Generator) -> Selection:
    """``size`` unique allowed items of ``gallery`` (``[n, D]``, indexed by ``index``) by ``strategy``."""
    if allowed.sum() < size:
        raise ValueError(f"--size {size} exceeds the {int(allowed.sum())} gallery items left (after removing "
                         "duplicates and leaks); use a smaller --size, more --crops or a larger gallery")
    if strategy == "random":
        items = np.sort(rng.choice(np.flatnonzero(allowed), size, replace=False))
        sims, query = make_index(queries).search(gallery[items], 1)
        return Selection(items, query[:, 0], np.full(size, -1), sims[:, 0], 0,
                         np.bincount(query[:, 0], minlength=len(queries)))
    k = max(1, math.ceil(size / len(queries)))
    while True:
        ids, sims = neighbours(index, queries, k, allowed)
        found = query_balanced(ids, size, rng) if strategy == "query-balanced" else best_matches(ids, sims, size)
        if found is not None:
            break
        if k >= allowed.sum():
            raise ValueError(f"the index returned fewer than {size} items for k={k} (IVF-PQ: raise --nprobe)")
        k = min(2 * k, int(allowed.sum()))
    keep, reached = found if strategy == "query-balanced" else (found, int(np.nonzero(found)[1].max()) + 1)
    query, rank = np.nonzero(keep)
    order = np.lexsort((query, rank))  # by rank, then query: np.unique's first hit is an item's best pair
    query, rank = query[order], rank[order]
    items, first = np.unique(ids[query, rank], return_index=True)
    query, rank = query[first], rank[first]
    return Selection(items, query, rank, sims[query, rank], reached, keep.sum(axis=1))


@dataclasses.dataclass
class Cleaning:
    """Gallery images removed so far (duplicates, leaks), the union-find of near-identical images, leak records."""

    parent: np.ndarray  # int64 [images]: union-find over duplicate pairs, rooted at the smallest index
    # image -> its NEAREST_TASK nearest task images as (similarity, task row), best first
    nearest_task: dict[int, list[tuple[float, int]]] = dataclasses.field(default_factory=dict)
    duplicates: set[int] = dataclasses.field(default_factory=set)
    leaks: set[int] = dataclasses.field(default_factory=set)

    def root(self, image: int) -> int:
        while self.parent[image] != image:
            image = self.parent[image]
        return int(image)

    def union(self, a: int, b: int) -> None:
        a, b = self.root(a), self.root(b)
        self.parent[max(a, b)] = min(a, b)


def clean(cleaning: Cleaning, chosen: np.ndarray, images: Embedded, task: MaxSimilarity | None,
          config: RetrieveConfig) -> np.ndarray:
    """Flag leaks among the ``chosen`` source images (max per-encoder similarity to a task image, B.4) and group
    their duplicates (mean similarity, B.3); returns the images to remove now."""
    fresh = [i for i in chosen.tolist() if i not in cleaning.nearest_task]
    if task is not None and fresh:
        sims, rows = task.nearest([v[fresh, 0] for v in images.per_encoder], NEAREST_TASK)
        cleaning.nearest_task.update(zip(fresh, (list(zip(s, r)) for s, r in zip(sims.tolist(), rows.tolist()))))
    leaks = {i for i in chosen.tolist() if cleaning.nearest_task.get(i, [(-1.0, -1)])[0][0] > config.leak_threshold}
    cleaning.leaks |= leaks
    kept = np.array(sorted(set(chosen.tolist()) - (set() if config.keep_leaks else leaks)), np.int64)
    for a, b in kept[similar_pairs(images.vectors[kept, 0], config.duplicate_threshold)].tolist():
        cleaning.union(a, b)
    _, first = np.unique([cleaning.root(i) for i in kept.tolist()], return_index=True)  # smallest chosen per group
    duplicates = set(np.delete(kept, first).tolist())
    cleaning.duplicates |= duplicates
    return np.array(sorted(duplicates | (set() if config.keep_leaks else leaks)), np.int64)


def retrieve(config: RetrieveConfig) -> Retrieval:
    """Run the retrieval of ``config``: write the manifest ``config.out`` and ``OUT.report.json``; return the report."""
    _check(config)
    _check_classes(open_source(config.queries))
    views = config.crops if config.level == "crop" else 1
    gallery_images = len(open_source(config.gallery))
    if gallery_images == 0:
        raise ValueError(f"gallery {config.gallery!r} holds no images")
    if gallery_images * views < config.size:
        raise ValueError(f"--size {config.size} exceeds the gallery's {gallery_images} images x {views} crops; "
                         "use a smaller --size, more --crops or a larger gallery")
    queries = embed(config.queries, "image", 1, config)
    gallery = embed(config.gallery, config.level, views, config)
    images = gallery if config.level == "image" else embed(config.gallery, "image", 1, config)
    tasks = [embed(spec, "image", 1, config) for spec in config.exclude]
    check_widths(config.encoders, [queries, gallery, images, *tasks])
    task = MaxSimilarity([np.concatenate([t.per_encoder[e][:, 0] for t in tasks]) for e in range(len(config.encoders))]
                         ) if tasks else None
    items = np.ascontiguousarray(gallery.vectors.reshape(-1, gallery.vectors.shape[-1]))
    index = make_index(items, search_kind(config.index), nprobe=config.nprobe, seed=config.seed)
    allowed = np.linalg.norm(items, axis=1) > 0  # a gallery image that failed to decode has zero vectors
    cleaning = Cleaning(np.arange(len(gallery.source)))
    rng = np.random.default_rng(config.seed)
    while True:
        chosen = select(config.strategy, index, items, queries.vectors[:, 0], allowed, config.size, rng)
        removed = clean(cleaning, np.unique(chosen.items // views), images, task, config)
        if not len(removed):
            break
        allowed.reshape(-1, views)[removed] = False
    report = _report(config, chosen, cleaning, gallery, tasks)
    _write_manifest(config.out, chosen, views, gallery, cleaning, queries if config.with_queries else None)
    Path(config.out).with_suffix(".report.json").write_text(json.dumps(report, indent=1))
    return Retrieval(config.out, report)


def search_kind(index: str) -> str:
    """``flat`` runs as ``torch`` where the encoders run on CUDA (``reinforce.build`` picks CUDA when available):
    the same exact search, on the GPU, as PyPI's faiss has no GPU kernels for current GPUs."""
    return "torch" if index == "flat" and torch.cuda.is_available() else index


def _check(config: RetrieveConfig) -> None:
    """Refuse settings that cannot work, before any encoder pass."""
    problems = [
        *([f"--strategy {config.strategy!r} (valid: {', '.join(STRATEGIES)})"] if config.strategy not in STRATEGIES
          else []),
        *([f"--index {config.index!r} (valid: {', '.join(INDEX_KINDS)})"] if config.index not in INDEX_KINDS else []),
        *([f"--level {config.level!r} (valid: {', '.join(LEVELS)})"] if config.level not in LEVELS else []),
        *([f"--crop-augment {config.crop_augment!r} (valid: {', '.join(CROP_AUGMENTS)})"]
          if config.crop_augment not in CROP_AUGMENTS else []),
        *([f"--size {config.size} (need >= 1)"] if config.size < 1 else []),
        *([f"--crops {config.crops} (need >= 1)"] if config.crops < 1 else []),
        *(["--encoders is empty"] if not config.encoders else []),
        *([f"--encoders {','.join(config.encoders)} names one twice"] if len(set(config.encoders)) <
          len(config.encoders) else []),
    ]
    if problems:
        raise ValueError("bad retrieval settings: " + "; ".join(problems))


def _check_classes(queries: Source) -> None:
    """A labeled query set must show every class: query-balanced retrieval finds nothing for a class without queries."""
    if queries.labels is None or not queries.class_names:
        return
    absent = sorted(set(range(len(queries.class_names))) - set(queries.labels.tolist()))
    if absent:
        names = ", ".join(queries.class_names[c] for c in absent[:10])
        raise ValueError(f"query set {queries.spec!r} has no images of {len(absent)} of its {len(queries.class_names)} "
                         f"classes ({names}); give every class queries, e.g. ?shots=5&part=labeled")


def _report(config: RetrieveConfig, chosen: Selection, cleaning: Cleaning, gallery: Embedded,
            tasks: list[Embedded]) -> dict[str, Any]:
    """Summary (k reached, per-query counts, duplicates and leaks removed); every leak with its nearest task image."""
    task_rows = [(t.source.spec, str(t.source.uris[i])) for t in tasks for i in range(len(t.source))]
    leaks = [{"gallery_index": i, "gallery_uri": str(gallery.source.uris[i]), "similarity": nearest[0][0],
              "task_spec": task_rows[nearest[0][1]][0], "task_uri": task_rows[nearest[0][1]][1],
              "nearest_task_images": [{"similarity": sim, "task_spec": task_rows[row][0], "task_uri": task_rows[row][1]}
                                      for sim, row in nearest]}
             for i, nearest in sorted(cleaning.nearest_task.items()) if i in cleaning.leaks]
    duplicates = [{"gallery_index": i, "gallery_uri": str(gallery.source.uris[i]), "kept_index": cleaning.root(i),
                   "kept_uri": str(gallery.source.uris[cleaning.root(i)])} for i in sorted(cleaning.duplicates)]
    counts = chosen.per_query
    return {"config": dataclasses.asdict(config), "size": len(chosen.items), "k": chosen.k,
            "per_query": {"min": int(counts.min()), "max": int(counts.max()), "counts": counts.tolist()},
            "images": len(np.unique(chosen.items // (config.crops if config.level == "crop" else 1))),
            "duplicates_removed": len(duplicates), "duplicates": duplicates,
            "leaks_found": len(leaks), "leaks_removed": 0 if config.keep_leaks else len(leaks), "leaks": leaks}


def _write_manifest(out: str, chosen: Selection, views: int, gallery: Embedded, cleaning: Cleaning,
                    queries: Embedded | None) -> None:
    """One row per retrieved crop: what ``retrieved:OUT`` (or plain OUT) needs to cut it, and why it was chosen;
    then, given ``queries``, one row per query image (its centre crop, ``gallery_index`` and ``rank`` -1)."""
    import polars as pl

    image, crop = np.divmod(chosen.items, views)
    frames = [pl.DataFrame({
        "key": [f"{gallery.source.keys[i]}@crop{c}" for i, c in zip(image, crop)],
        "uri": gallery.source.uris[image].tolist(),
        "gallery_index": image, "crop": crop,
        "theta": [gallery.theta[i, c].tobytes() for i, c in zip(image, crop)],
        "policy": [json.dumps(gallery.policy.to_record())] * len(image),
        "query": chosen.query, "rank": chosen.rank, "similarity": chosen.similarity.astype(np.float32),
        "cluster": [cleaning.root(i) for i in image.tolist()],
        "leak": [i in cleaning.leaks for i in image.tolist()],
        "source_fingerprint": [gallery.source.fingerprint()] * len(image),
    })]
    if queries is not None:
        n = len(queries.source)
        frames.append(pl.DataFrame({
            "key": [f"query/{key}" for key in queries.source.keys.tolist()], "uri": queries.source.uris.tolist(),
            "gallery_index": np.full(n, -1), "crop": np.zeros(n, np.int64),
            "theta": [row.tobytes() for row in queries.theta[:, 0]],
            "policy": [json.dumps(queries.policy.to_record())] * n, "query": np.arange(n), "rank": np.full(n, -1),
            "similarity": np.ones(n, np.float32), "cluster": np.full(n, -1), "leak": np.zeros(n, bool),
            "source_fingerprint": [queries.source.fingerprint()] * n,
        }))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pl.concat(frames, how="vertical_relaxed").write_parquet(out, compression="zstd")


def parse_args(argv: list[str] | None = None) -> tuple[RetrieveConfig, bool]:
    """The retrieval's config and whether ``--debug`` was given."""
    parser = argparse.ArgumentParser(prog="python -m reinforce.retrieve", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    defaults = RetrieveConfig(queries="", gallery="", out="")
    parser.add_argument("--queries", required=True, help="source spec of the labeled task images (the query set)")
    parser.add_argument("--gallery", required=True, help="source spec of the gallery (see reinforce.sources)")
    parser.add_argument("--out", required=True, help="manifest to write (.parquet); the report goes to OUT.report.json")
    parser.add_argument("--encoders", default=",".join(defaults.encoders),
                        help="comma-separated teacher-zoo entries or 'embedded' (Lite0 ImageNet); similarity is the "
                             "mean of their cosine similarities")
    parser.add_argument("--size", type=int, default=defaults.size, help="crops to retrieve (N)")
    parser.add_argument("--crops", type=int, default=defaults.crops, help="RandomResizedCrop crops per gallery image")
    parser.add_argument("--level", choices=tuple(LEVELS), default=defaults.level,
                        help="crop: --crops crops per image (scale 0.08-1); image: one square centre crop per image")
    parser.add_argument("--crop-augment", choices=tuple(CROP_AUGMENTS), default=defaults.crop_augment,
                        help="randaug: RandAugment (2 ops, magnitude 9, the build's rrc_flip_randaug) on each gallery "
                             "crop, as the paper (B.2); none: the plain crop")
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy)
    parser.add_argument("--exclude", action="append", default=[], metavar="TASK_SRC",
                        help="task source (train, val, test; repeatable): gallery images near-copies of one are leaks")
    parser.add_argument("--keep-leaks", action="store_true", help="flag leaks in the manifest instead of removing them")
    parser.add_argument("--with-queries", action="store_true",
                        help="append the query images (centre crops) to the transfer set, as the paper does")
    parser.add_argument("--index", choices=INDEX_KINDS, default=defaults.index,
                        help="flat: exact inner product (faiss; on CUDA it runs as torch); ivfpq: approximate, for "
                             "large galleries; torch: exact blockwise matmul + top-k in torch (GPU, else CPU)")
    parser.add_argument("--nprobe", type=int, default=defaults.nprobe, help="IVF lists searched per query (ivfpq)")
    parser.add_argument("--duplicate-threshold", type=float, default=defaults.duplicate_threshold)
    parser.add_argument("--leak-threshold", type=float, default=defaults.leak_threshold)
    parser.add_argument("--cache", default=None, help="embedding stores (default: OUT's folder/retrieval-cache)")
    parser.add_argument("--encoder-size", type=int, default=defaults.encoder_size, help="input size of 'embedded'")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="encoder batch, in crops")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader decode/crop workers")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the crops and the random choices")
    args = vars(debug_flag(parser).parse_args(argv))
    debug = args.pop("debug")
    args["encoders"] = tuple(e.strip() for e in args["encoders"].split(",") if e.strip())
    args["exclude"] = tuple(args["exclude"])
    return RetrieveConfig(**args), debug


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config, debug = parse_args(argv)
    with cli_errors("reinforce.retrieve", debug):
        report = retrieve(config).report
    counts = report["per_query"]
    print(f"retrieved {report['size']} crops of {report['images']} gallery images into {config.out} "
          f"({config.strategy}, k={report['k']}, per-query {counts['min']}..{counts['max']}); "
          f"removed {report['duplicates_removed']} duplicate and {report['leaks_removed']} leaked images "
          f"({report['leaks_found']} leaks found, listed in {Path(config.out).with_suffix('.report.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
