"""Transfer-set and labeled-data sources, all opened from one spec string.

A source is an ordered, indexable list of images (uint8 ``[3, H, W]`` RGB tensors) with keys,
URIs and optional labels. Stores record the spec, so training reopens the exact same list.

Specs:
    fashion-mnist:train | fashion-mnist:test    embedded real data (Debian dataset-fashion-mnist)
    folder:DIR or DIR                           every image below DIR (recursive), unlabeled
    imagefolder:DIR                             DIR/CLASS/**/image, labeled by class directory
    FILE.parquet | FILE.csv                     manifest with column ``uri`` (+ optional ``label``)
    FILE.tar | URLS-{000..009}.tar              webdataset shards (local), one image per sample
Any spec takes a query: ``?shots=10&seed=0&part=labeled|unlabeled`` (seeded few-shot split:
N images per class labeled, the rest unlabeled) and ``&limit=N`` (first N after the split).

Example:
    >>> labeled = open_source("fashion-mnist:train?shots=10&part=labeled")
    >>> transfer = open_source("fashion-mnist:train?shots=10&part=unlabeled&limit=5000")
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch
from PIL import Image

__all__ = ["FASHION_MNIST_DIR", "Source", "few_shot_split", "load_image_bytes", "open_source"]

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclasses.dataclass(frozen=True)
class Source:
    """An ordered list of images; ``load(i)`` decodes image i or raises on a corrupt file."""

    spec: str
    keys: np.ndarray  # [N] str
    uris: np.ndarray  # [N] str
    labels: np.ndarray | None  # [N] int64
    class_names: tuple[str, ...]
    loader: Callable[[str], torch.Tensor]
    content_id: str  # identifies the underlying bytes (file hashes / sizes), see fingerprint()

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> torch.Tensor:
        return self.loader(str(self.uris[index]))

    def fingerprint(self) -> str:
        """sha256 over the ordered keys, URIs, labels and the backing content id."""
        digest = hashlib.sha256(self.content_id.encode())
        for column in (self.keys, self.uris) + (() if self.labels is None else (self.labels,)):
            digest.update("\n".join(map(str, column.tolist())).encode())
        return digest.hexdigest()

    def subset(self, indices: np.ndarray, spec: str) -> Source:
        labels = None if self.labels is None else self.labels[indices]
        return dataclasses.replace(self, spec=spec, keys=self.keys[indices], uris=self.uris[indices], labels=labels)


def few_shot_split(labels: np.ndarray, shots: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split: ``shots`` indices per class (labeled) and all the others (unlabeled), sorted."""
    rng = np.random.default_rng(seed)
    labeled = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < shots:
            raise ValueError(f"class {cls} has {len(members)} images, fewer than shots={shots}")
        labeled.append(rng.choice(members, size=shots, replace=False))
    labeled = np.sort(np.concatenate(labeled))
    return labeled, np.setdiff1d(np.arange(len(labels)), labeled)


def open_source(spec: str) -> Source:
    """Open a source from its spec (see module docstring); errors name the spec and the fix."""
    base, _, query = spec.partition("?")
    source = _open_base(base)
    options = dict(parse_qsl(query, strict_parsing=bool(query)))
    unknown = set(options) - {"shots", "seed", "part", "limit"}
    if unknown:
        raise ValueError(f"unknown source option(s) {sorted(unknown)} in {spec!r}; valid: shots, seed, part, limit")
    indices = np.arange(len(source))
    if "shots" in options:
        if source.labels is None:
            raise ValueError(f"{base!r} has no labels, so it cannot be split with shots=")
        labeled, unlabeled = few_shot_split(source.labels, int(options["shots"]), int(options.get("seed", 0)))
        part = options.get("part", "labeled")
        if part not in ("labeled", "unlabeled"):
            raise ValueError(f"part must be 'labeled' or 'unlabeled', got {part!r}")
        indices = labeled if part == "labeled" else unlabeled
    if "limit" in options:
        indices = indices[: int(options["limit"])]
    return source.subset(indices, spec) if query else source


def with_query(spec: str, **options: object) -> str:
    """Add ``key=value`` options to a spec, e.g. ``with_query(src, shots=10, part="labeled")``."""
    extra = "&".join(f"{k}={v}" for k, v in options.items() if v is not None)
    if not extra:
        return spec
    return f"{spec}{'&' if '?' in spec else '?'}{extra}"


def _open_base(base: str) -> Source:
    if base.startswith("fashion-mnist:"):
        return _fashion_mnist(base.split(":", 1)[1])
    if base.startswith("imagefolder:"):
        return _image_tree(base, Path(base.split(":", 1)[1]), labeled=True)
    if base.startswith("folder:"):
        return _image_tree(base, Path(base.split(":", 1)[1]), labeled=False)
    if base.endswith((".parquet", ".csv")):
        return _manifest(base)
    if ".tar" in base:
        return _tar_shards(base)
    if Path(base).is_dir():
        return _image_tree(base, Path(base), labeled=False)
    raise ValueError(
        f"cannot open transfer set {base!r}: not a directory, manifest (.parquet/.csv), tar shard or "
        "named source (fashion-mnist:train, fashion-mnist:test, folder:DIR, imagefolder:DIR)"
    )


# --- Fashion-MNIST (IDX files from Debian's dataset-fashion-mnist) -------------------------------

def _fashion_mnist(split: str) -> Source:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {FASHION_MNIST_DIR}: install it with "
            "`sudo apt-get install dataset-fashion-mnist` or set FASHION_MNIST_DIR to a folder holding "
            f"{images_path.name} and {labels_path.name}"
        )
    labels = _read_idx(str(labels_path)).astype(np.int64)
    n = len(labels)
    keys = np.array([f"{split}/{i:05d}" for i in range(n)])
    uris = np.array([f"fashion-mnist:{split}#{i}" for i in range(n)])
    content = hashlib.sha256(images_path.read_bytes() + labels_path.read_bytes()).hexdigest()
    return Source(f"fashion-mnist:{split}", keys, uris, labels, FASHION_MNIST_CLASSES, _load_fashion_mnist, content)


@cache
def _read_idx(path: str) -> np.ndarray:
    """Decode an IDX (MNIST-format) gz file into a numpy array; cached per process."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion_mnist(uri: str) -> torch.Tensor:
    split, index = uri.removeprefix("fashion-mnist:").split("#")
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(str(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"))
    return torch.from_numpy(images[int(index)].copy()).expand(3, -1, -1).contiguous()


# --- image files ---------------------------------------------------------------------------------

def load_image_bytes(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes to uint8 ``[3, H, W]`` RGB; raises on corrupt data."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _load_file(uri: str) -> torch.Tensor:
    if uri.startswith("fashion-mnist:"):
        return _load_fashion_mnist(uri)
    if "::" in uri:  # tar member: SHARD::OFFSET:SIZE
        shard, _, span = uri.rpartition("::")
        offset, size = map(int, span.split(":"))
        with open(shard, "rb") as f:
            f.seek(offset)
            return load_image_bytes(f.read(size))
    return load_image_bytes(Path(uri).read_bytes())


def _files_content_id(paths: list[Path]) -> str:
    """Cheap identity of a file list: relative paths and byte sizes (not full content hashes)."""
    return hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in paths).encode()).hexdigest()


def _image_tree(spec: str, root: Path, labeled: bool) -> Source:
    if not root.is_dir():
        raise FileNotFoundError(f"transfer set directory {str(root)!r} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {str(root)!r}")
    keys = np.array([str(p.relative_to(root)) for p in paths])
    labels, class_names = None, ()
    if labeled:
        class_names = tuple(sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1}))
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index.get(p.relative_to(root).parts[0], -1) for p in paths], dtype=np.int64)
        if (labels < 0).any():
            raise ValueError(f"imagefolder {str(root)!r} has images outside class directories")
    return Source(spec, keys, np.array([str(p) for p in paths]), labels, class_names, _load_file,
                  _files_content_id(paths))


def _manifest(path: str) -> Source:
    import polars as pl

    if not Path(path).exists():
        raise FileNotFoundError(f"manifest {path!r} does not exist")
    frame = pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path)
    if "uri" not in frame.columns:
        raise ValueError(f"manifest {path!r} needs a 'uri' column; it has {frame.columns}")
    base = Path(path).parent
    uris = np.array([u if (":" in u and not Path(u).is_absolute()) or Path(u).is_absolute() else str(base / u)
                     for u in frame["uri"].to_list()])
    keys = np.array(frame["key"].to_list() if "key" in frame.columns else [str(u) for u in frame["uri"].to_list()])
    labels = frame["label"].to_numpy().astype(np.int64) if "label" in frame.columns else None
    class_names = tuple(str(c) for c in range(int(labels.max()) + 1)) if labels is not None else ()
    content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Source(path, keys, uris, labels, class_names, _load_file, content)


def _tar_shards(spec: str) -> Source:
    import braceexpand

    shards = list(braceexpand.braceexpand(spec))
    keys, uris = [], []
    for shard in shards:
        if not Path(shard).exists():
            raise FileNotFoundError(f"webdataset shard {shard!r} does not exist (only local shards are indexable)")
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    keys.append(f"{Path(shard).name}/{member.name}")
                    uris.append(f"{shard}::{member.offset_data}:{member.size}")
    return Source(spec, np.array(keys), np.array(uris), None, (), _load_file,
                  _files_content_id([Path(s) for s in shards]))
