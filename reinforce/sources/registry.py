"""The source registry: ``Source`` (an ordered, indexable list of images), ``register_source`` and the
helpers every family of sources shares (few-shot splits, image decoding).

Families register their spec prefixes here (``reinforce.sources.files``, ``fashion_mnist``, ``photos``,
``retrieved``, ``segmentation``); ``reinforce.sources.open_source`` dispatches to them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_GENERIC_TRANSFER_SET",
    "IMAGE_SUFFIXES",
    "SPEC_FORMS",
    "Opener",
    "Source",
    "encode_png",
    "few_images_split",
    "few_shot_split",
    "list_sources",
    "load_image_bytes",
    "no_argument",
    "register_source",
    "registered_opener",
]

DEFAULT_GENERIC_TRANSFER_SET = "photo-crops:20000@96"
IMAGE_EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif"}  # PIL format -> file extension, where not just lower case
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# what a person can give wherever a source is read: every "cannot read this source" error names these
SPEC_FORMS = ("fashion-mnist:train|test, imagefolder:DIR (DIR/CLASS/image, labeled), folder:DIR or DIR (unlabeled), "
              "FILE.parquet|FILE.csv (columns uri[, label]), FILE.tar|SHARDS-{000..009}.tar, skimage:photos, "
              "sklearn:images, sklearn:digits (labeled), photo-crops:N[@SIZE][,seed=S]; "
              "any with ?shots=N&seed=S&part=labeled|unlabeled&limit=N")

Opener = Callable[[str], "Source"]
_SOURCES: dict[str, Opener] = {}


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
    mask_loader: Callable[[str], torch.Tensor] | None = None  # segmentation sources: uri -> uint8 [H, W] class map
    # sources backed by files: uri -> the file's own encoded bytes, or None where the URI names no file
    file_bytes: Callable[[str], bytes | None] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> torch.Tensor:
        return self.loader(str(self.uris[index]))

    def load_mask(self, index: int) -> torch.Tensor:
        """Image i's class map (uint8 ``[H, W]``, ``reinforce.sources.segmentation.IGNORE_INDEX`` = unlabeled)."""
        if self.mask_loader is None:
            raise ValueError(f"source {self.spec!r} has no masks; segmentation sources: fashion-mnist-seg, segfolder")
        return self.mask_loader(str(self.uris[index]))

    def encoded(self, index: int) -> tuple[bytes, str]:
        """Image i as encoded bytes + file extension, for a store that carries the images: the file's own bytes
        where the source has a file, else a lossless PNG of ``load(i)``. ``load_image_bytes`` of the bytes
        equals ``load(i)`` either way."""
        data = self.file_bytes(str(self.uris[index])) if self.file_bytes is not None else None
        if data is not None:
            with Image.open(io.BytesIO(data)) as image:
                return data, IMAGE_EXTENSIONS.get(image.format, str(image.format).lower())
        return encode_png(self.load(index)), "png"

    def fingerprint(self) -> str:
        """sha256 over the ordered keys, URIs, labels and the backing content id."""
        digest = hashlib.sha256(self.content_id.encode())
        for column in (self.keys, self.uris) + (() if self.labels is None else (self.labels,)):
            digest.update("\n".join(map(str, column.tolist())).encode())
        return digest.hexdigest()

    def subset(self, indices: np.ndarray, spec: str) -> Source:
        labels = None if self.labels is None else self.labels[indices]
        return dataclasses.replace(self, spec=spec, keys=self.keys[indices], uris=self.uris[indices], labels=labels)


def register_source(prefix: str) -> Callable[[Opener], Opener]:
    """Register ``fn(rest_of_spec) -> Source`` for specs ``PREFIX:REST`` (and exactly ``PREFIX`` if it has a colon).

    Example:
        >>> @register_source("my-photos")
        ... def _my_photos(rest: str) -> Source: ...
    """

    def decorate(fn: Opener) -> Opener:
        if prefix in _SOURCES:
            raise ValueError(f"source prefix {prefix!r} is already registered (by {_SOURCES[prefix].__name__})")
        _SOURCES[prefix] = fn
        return fn

    return decorate


def list_sources(pattern: str = "*") -> list[str]:
    """Registered spec prefixes matching a shell-style ``pattern``, sorted, e.g. ``list_sources("sklearn:*")``."""
    return sorted(name for name in _SOURCES if fnmatch.fnmatchcase(name, pattern))


def registered_opener(base: str) -> tuple[Opener, str] | None:
    """The opener of the longest registered prefix of ``base`` and the rest of the spec, or None."""
    for prefix in sorted(_SOURCES, key=len, reverse=True):
        if base.startswith(prefix + ":") or (":" in prefix and base == prefix):
            return _SOURCES[prefix], base[len(prefix) + 1:]
    return None


def no_argument(prefix: str, rest: str) -> None:
    """Refuse ``PREFIX:REST`` for a source that takes no argument."""
    if rest:
        raise ValueError(f"source {prefix!r} takes no argument, got {prefix}:{rest!r}; use just {prefix!r}")


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


def few_images_split(count: int, shots: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of a source without image labels (segmentation): ``shots`` images labeled, the rest not."""
    if not 0 < shots <= count:
        raise ValueError(f"shots={shots} labeled images asked of a source with {count} images")
    labeled = np.sort(np.random.default_rng(seed).choice(count, size=shots, replace=False))
    return labeled, np.setdiff1d(np.arange(count), labeled)


def load_image_bytes(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes to uint8 ``[3, H, W]`` RGB; raises on corrupt data."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 ``[3, H, W]`` -> PNG bytes (grey when the channels are equal); ``load_image_bytes`` inverts it exactly."""
    grey = bool((image == image[:1]).all())
    pixels = image[0].numpy() if grey else image.permute(1, 2, 0).numpy()
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out.getvalue()
