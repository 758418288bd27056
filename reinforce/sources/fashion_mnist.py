"""Fashion-MNIST, the embedded real task: ``fashion-mnist:train|test`` (IDX files from Debian's
dataset-fashion-mnist; ``$FASHION_MNIST_DIR``, read when opened, overrides the folder), labeled, 10 classes."""

from __future__ import annotations

import gzip
import hashlib
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch

from reinforce.sources.registry import Source, register_source

__all__ = ["DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "fashion_mnist_dir", "fashion_mnist_path",
           "load_fashion_mnist", "open_fashion_mnist", "read_idx"]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

def fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST IDX files: ``$FASHION_MNIST_DIR`` (read now, not at import) or Debian's path."""
    return Path(os.environ.get("FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR)


def fashion_mnist_path(split: str, kind: str) -> Path:
    prefix = {"train": "train", "test": "t10k"}[split]
    return fashion_mnist_dir() / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"


@register_source("fashion-mnist")
def open_fashion_mnist(split: str) -> Source:
    if split not in ("train", "test"):
        raise ValueError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    images_path, labels_path = fashion_mnist_path(split, "images"), fashion_mnist_path(split, "labels")
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {images_path.parent}: install it with "
            "`sudo apt-get install dataset-fashion-mnist` or set FASHION_MNIST_DIR to a folder holding "
            f"{images_path.name} and {labels_path.name}"
        )
    labels = read_idx(str(labels_path)).astype(np.int64)
    n = len(labels)
    keys = np.array([f"{split}/{i:05d}" for i in range(n)])
    uris = np.array([f"fashion-mnist:{split}#{i}" for i in range(n)])
    content = hashlib.sha256(images_path.read_bytes() + labels_path.read_bytes()).hexdigest()
    return Source(f"fashion-mnist:{split}", keys, uris, labels, FASHION_MNIST_CLASSES, load_fashion_mnist, content)


@cache
def read_idx(path: str) -> np.ndarray:
    """Decode an IDX (MNIST-format) gz file into a numpy array; cached per process."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(uri: str) -> torch.Tensor:
    split, index = uri.removeprefix("fashion-mnist:").split("#")
    images = read_idx(str(fashion_mnist_path(split, "images")))
    return torch.from_numpy(images[int(index)].copy()).expand(3, -1, -1).contiguous()
