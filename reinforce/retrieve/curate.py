"""Curating a task-related transfer set from a gallery: the library behind ``python -m reinforce.retrieve`` (whose
docstring, in ``reinforce/retrieve/__main__.py``, describes the method: seed paper §3.4, Appendix B)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reinforce.augment import CropFlip, create_policy
from reinforce.build import BuildConfig, build, make_codecs, store_content
from reinforce.retrieve.nearcopy import NEAR_COPY_CONFIRM, NEAR_COPY_THRESHOLD, Thumbnails, nearest_copies, thumbnails
from reinforce.retrieve.search import (
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
from reinforce.sources import Source, open_source
from reinforce.teachers import TeacherModel, create_teacher, embedded_imagenet_teacher
from stores.manifest import TeacherCard, content_id
from stores.store import THETA, open_store

__all__ = ["EMBEDDED", "Retrieval", "RetrieveConfig", "check_widths", "embed", "retrieve"]

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
    near_copy: bool = True  # also flag a leak by pixels: thumbnail correlation with a task image (nearcopy)
    near_copy_threshold: float = NEAR_COPY_THRESHOLD
    near_copy_confirm: float = NEAR_COPY_CONFIRM  # the correlation an embedding's possible leak needs to stand
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
    # image -> its best thumbnail correlation with a task image and that task row (reinforce.retrieve.nearcopy)
    near_copy: dict[int, tuple[float, int]] = dataclasses.field(default_factory=dict)
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
          task_thumbs: Thumbnails | None, config: RetrieveConfig) -> np.ndarray:
    """Flag leaks among the ``chosen`` source images (``leak_flags``: max per-encoder similarity to a task image, B.4,
    and the best pixel correlation with one) and group their duplicates (mean similarity, B.3); returns the images to
    remove now."""
    fresh = [i for i in chosen.tolist() if i not in cleaning.nearest_task]
    if task is not None and fresh:
        sims, rows = task.nearest([v[fresh, 0] for v in images.per_encoder], NEAREST_TASK)
        cleaning.nearest_task.update(zip(fresh, (list(zip(s, r)) for s, r in zip(sims.tolist(), rows.tolist()))))
    if task_thumbs is not None and fresh:
        corr, rows = nearest_copies(thumbnails(images.source, np.array(fresh)), task_thumbs)
        cleaning.near_copy.update(zip(fresh, zip(corr.tolist(), rows.tolist())))
    similarity = np.array([cleaning.nearest_task.get(i, [(-1.0, -1)])[0][0] for i in chosen.tolist()])
    correlation = np.array([cleaning.near_copy.get(i, (-1.0, -1))[0] for i in chosen.tolist()])
    leaks = set(chosen[leak_flags(similarity, correlation, config)].tolist())
    cleaning.leaks |= leaks
    kept = np.array(sorted(set(chosen.tolist()) - (set() if config.keep_leaks else leaks)), np.int64)
    for a, b in kept[similar_pairs(images.vectors[kept, 0], config.duplicate_threshold)].tolist():
        cleaning.union(a, b)
    _, first = np.unique([cleaning.root(i) for i in kept.tolist()], return_index=True)  # smallest chosen per group
    duplicates = set(np.delete(kept, first).tolist())
    cleaning.duplicates |= duplicates
    return np.array(sorted(duplicates | (set() if config.keep_leaks else leaks)), np.int64)


def leak_flags(similarity: np.ndarray, correlation: np.ndarray, config: RetrieveConfig) -> np.ndarray:
    """Which images are leaks, bool ``[N]``, from their highest embedding similarity and best pixel correlation with a
    task image. B.4's rule has a human confirm each possible leak (similarity > ``leak_threshold``); here the pixels
    do: a possible leak stands where the correlation exceeds ``near_copy_confirm``, and a correlation above
    ``near_copy_threshold`` is a leak on its own. Without the pixel check every possible leak is one (1 % of distinct
    in-domain images at 0.95 with the embedded encoder: docs/retrieval.md)."""
    possible = similarity > config.leak_threshold
    if not config.near_copy:
        return possible
    return (correlation > config.near_copy_threshold) | (possible & (correlation > config.near_copy_confirm))


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
    task_thumbs = _task_thumbnails(tasks) if tasks and config.near_copy else None
    rng = np.random.default_rng(config.seed)
    while True:
        chosen = select(config.strategy, index, items, queries.vectors[:, 0], allowed, config.size, rng)
        removed = clean(cleaning, np.unique(chosen.items // views), images, task, task_thumbs, config)
        if not len(removed):
            break
        allowed.reshape(-1, views)[removed] = False
    report = _report(config, chosen, cleaning, gallery, tasks)
    _write_manifest(config.out, chosen, views, gallery, cleaning, queries if config.with_queries else None)
    Path(config.out).with_suffix(".report.json").write_text(json.dumps(report, indent=1))
    return Retrieval(config.out, report)


def _task_thumbnails(tasks: list[Embedded]) -> Thumbnails:
    """Near-copy thumbnails of every task image, in ``MaxSimilarity``'s row order."""
    return Thumbnails.concat([thumbnails(t.source) for t in tasks])


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
              **_near_copy_record(cleaning.near_copy.get(i), task_rows),
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


def _near_copy_record(found: tuple[float, int] | None, task_rows: list[tuple[str, str]]) -> dict[str, Any]:
    """A leak's pixel-level evidence: its best thumbnail correlation with a task image, and which one."""
    if found is None or found[1] < 0:
        return {}
    spec, uri = task_rows[found[1]]
    return {"near_copy": {"correlation": found[0], "task_spec": spec, "task_uri": uri}}


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
