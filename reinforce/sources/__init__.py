"""Transfer-set and labeled-data sources, all opened from one spec string.

A source is an ordered, indexable list of images (uint8 ``[3, H, W]`` RGB tensors) with keys,
URIs and optional labels. Stores record the spec, so training reopens the exact same list.

Specs (``list_sources()`` names the registered prefixes; ``register_source`` adds one):
    fashion-mnist:train | fashion-mnist:test    embedded real data (Debian dataset-fashion-mnist;
                                                $FASHION_MNIST_DIR, read when opened, overrides the folder)
    folder:DIR or DIR                           every image below DIR (recursive), unlabeled
    imagefolder:DIR                             DIR/CLASS/**/image, labeled by class directory
    skimage:photos                              the 19 real photographs bundled with scikit-image, unlabeled
    sklearn:images                              scikit-learn's sample photographs (china, flower), unlabeled
    sklearn:digits                              scikit-learn's 1797 8x8 digits (0..16 scaled to 0..255), labels 0..9
    photo-crops:N[@SIZE][,seed=S]               generic transfer set: N seeded square crops (2-50% of the photo's
                                                area) of all package photos above (+ matplotlib's grace_hopper.jpg
                                                when matplotlib is installed), resized to SIZE px (default 96,
                                                seed 0); crop i is the same for every N, so ``photo-crops:64`` is
                                                the first 64 of ``photo-crops:20000``
    FILE.parquet | FILE.csv                     manifest with column ``uri`` (+ optional ``label``; with ``mask``:
                                                image/mask pairs, reinforce.sources.segmentation)
    retrieved:FILE.parquet                      a ``reinforce.retrieve`` manifest: row i is the crop of gallery
                                                image ``uri`` cut by its θ record (so is FILE.parquet with ``theta``)
    FILE.tar | URLS-{000..009}.tar              webdataset shards (local), one image per sample
    fashion-mnist-seg:... | segfolder:DIR       class maps (``Source.load_mask``): reinforce.sources.segmentation
Any spec takes a query: ``?shots=10&seed=0&part=labeled|unlabeled`` (seeded few-shot split:
N images per class labeled, the rest unlabeled; on a segmentation source, which has no image labels, N images
in all) and ``&limit=N`` (first N after the split).
The query ``seed`` seeds only the few-shot split; the crop seed of ``photo-crops`` lives in its base spec.

Example:
    >>> labeled = open_source("fashion-mnist:train?shots=10&part=labeled")
    >>> transfer = open_source("fashion-mnist:train?shots=10&part=unlabeled&limit=5000")
    >>> generic = open_source(DEFAULT_GENERIC_TRANSFER_SET)  # task-agnostic real photographs

One module per family registers its spec prefixes (``register_source``): ``files`` (folders, tar shards),
``fashion_mnist``, ``photos`` (package photographs, digits, photo-crops), ``retrieved``, ``segmentation``
(image/mask pairs); ``manifests`` reads FILE.parquet|csv. The registry itself is ``reinforce.sources.registry``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from reinforce.sources import fashion_mnist, files, photos, retrieved, segmentation
from reinforce.sources.fashion_mnist import fashion_mnist_dir
from reinforce.sources.manifests import open_manifest
from reinforce.sources.registry import (
    DEFAULT_GENERIC_TRANSFER_SET,
    IMAGE_SUFFIXES,
    SPEC_FORMS,
    Source,
    few_images_split,
    few_shot_split,
    list_sources,
    load_image_bytes,
    register_source,
    registered_opener,
)

__all__ = [
    "DEFAULT_GENERIC_TRANSFER_SET",
    "IMAGE_SUFFIXES",
    "SPEC_FORMS",
    "Source",
    "declared_size",
    "fashion_mnist",
    "fashion_mnist_dir",
    "few_images_split",
    "few_shot_split",
    "files",
    "list_sources",
    "load_image_bytes",
    "open_source",
    "photos",
    "register_source",
    "retrieved",
    "segmentation",
    "with_query",
]


def open_source(spec: str) -> Source:
    """Open a source from its spec (see module docstring); errors name the spec and the fix."""
    base, _, query = spec.partition("?")
    options = dict(parse_qsl(query, strict_parsing=bool(query)))
    source = _open_base(base if declared_size(spec) is None else _first_crops(base, declared_size(spec)))
    unknown = set(options) - {"shots", "seed", "part", "limit"}
    if unknown:
        raise ValueError(f"unknown source option(s) {sorted(unknown)} in {spec!r}; valid: shots, seed, part, limit")
    indices = np.arange(len(source))
    if "shots" in options:
        if source.labels is None and source.mask_loader is None:
            raise ValueError(f"{base!r} has no labels, so it cannot be split with shots= (spec forms: {SPEC_FORMS})")
        shots, seed = int(options["shots"]), int(options.get("seed", 0))
        labeled, unlabeled = (few_shot_split(source.labels, shots, seed) if source.labels is not None
                              else few_images_split(len(source), shots, seed))
        part = options.get("part", "labeled")
        if part not in ("labeled", "unlabeled"):
            raise ValueError(f"part must be 'labeled' or 'unlabeled', got {part!r}")
        indices = labeled if part == "labeled" else unlabeled
    if "limit" in options:
        indices = indices[: int(options["limit"])]
    return source.subset(indices, spec) if query else source


def declared_size(spec: str) -> int | None:
    """How many samples ``spec`` yields when its text alone says so (``photo-crops:N``, with ``limit=``), else None
    (sources backed by files, whose size the disk bounds). Read before anything is built: a spec from a stranger's
    manifest is checked against the sample count the manifest records first."""
    base, _, query = spec.partition("?")
    match = photos.CROPS_SPEC.fullmatch(base.removeprefix("photo-crops:")) if base.startswith("photo-crops:") else None
    if match is None:
        return None
    limit = dict(parse_qsl(query)).get("limit", "")
    return min(int(match[1]), int(limit)) if limit.isdigit() else int(match[1])


def _first_crops(base: str, count: int) -> str:
    """``photo-crops:N...`` as ``photo-crops:COUNT...``: crop i does not depend on N, so a ``limit`` never
    materialises the crops it drops."""
    match = photos.CROPS_SPEC.fullmatch(base.removeprefix("photo-crops:"))
    return f"photo-crops:{count}" + base.removeprefix(f"photo-crops:{match[1]}")


def with_query(spec: str, **options: object) -> str:
    """Add ``key=value`` options to a spec, e.g. ``with_query(src, shots=10, part="labeled")``."""
    extra = "&".join(f"{k}={v}" for k, v in options.items() if v is not None)
    if not extra:
        return spec
    return f"{spec}{'&' if '?' in spec else '?'}{extra}"


def _open_base(base: str) -> Source:
    """Registered prefix (longest wins), else manifest, tar shards or a plain directory."""
    found = registered_opener(base)
    if found is not None:
        opener, rest = found
        return dataclasses.replace(opener(rest), spec=base)
    if base.endswith((".parquet", ".csv")):
        return open_manifest(base)
    if ".tar" in base:
        return files.tar_shards(base)
    if Path(base).is_dir():
        return files.image_tree(base, Path(base), labeled=False)
    raise ValueError(
        f"cannot open transfer set {base!r}: not a directory, manifest (.parquet/.csv), tar shard or "
        f"registered source (PREFIX:ARGS; registered: {', '.join(list_sources())}); spec forms: {SPEC_FORMS}"
    )
