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
                                                image/mask pairs, reinforce.segmentation)
    retrieved:FILE.parquet                      a ``reinforce.retrieve`` manifest: row i is the crop of gallery
                                                image ``uri`` cut by its θ record (so is FILE.parquet with ``theta``)
    FILE.tar | URLS-{000..009}.tar              webdataset shards (local), one image per sample
    fashion-mnist-seg:... | segfolder:DIR       images with class maps (``Source.load_mask``): reinforce.segmentation
Any spec takes a query: ``?shots=10&seed=0&part=labeled|unlabeled`` (seeded few-shot split:
N images per class labeled, the rest unlabeled; on a segmentation source, which has no image labels, N images
in all) and ``&limit=N`` (first N after the split).
The query ``seed`` seeds only the few-shot split; the crop seed of ``photo-crops`` lives in its base spec.

Example:
    >>> labeled = open_source("fashion-mnist:train?shots=10&part=labeled")
    >>> transfer = open_source("fashion-mnist:train?shots=10&part=unlabeled&limit=5000")
    >>> generic = open_source(DEFAULT_GENERIC_TRANSFER_SET)  # task-agnostic real photographs
"""

from __future__ import annotations

import dataclasses
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import numpy as np
import torch
from PIL import Image

from stores.errors import InputError

if TYPE_CHECKING:
    from reinforce.augment import AugParams, CropFlip

__all__ = [
    "DEFAULT_GENERIC_TRANSFER_SET",
    "IMAGE_SUFFIXES",
    "SPEC_FORMS",
    "Source",
    "declared_size",
    "fashion_mnist_dir",
    "few_images_split",
    "few_shot_split",
    "list_sources",
    "load_image_bytes",
    "open_source",
    "register_source",
    "with_query",
]

DEFAULT_GENERIC_TRANSFER_SET = "photo-crops:20000@96"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif"}  # PIL format -> file extension, where not just lower case
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# Real photographs that ship inside the scikit-image wheel (no pooch download); synthetic images (blobs,
# checkerboard, colorwheel, horse, logo, phantom) and pooch-only ones (brain, eagle, lily, skin, ...) are left out.
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "motorcycle", "page", "retina",
    "rocket", "text",
)
SKLEARN_PHOTOS = ("china", "flower")
MATPLOTLIB_PHOTOS = ("grace_hopper",)  # the one photograph in mpl-data/sample_data
CROP_AREA = (0.02, 0.5)  # RandomResizedCrop-like area fraction of the photo, aspect 1
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

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> torch.Tensor:
        return self.loader(str(self.uris[index]))

    def load_mask(self, index: int) -> torch.Tensor:
        """Image i's class map (uint8 ``[H, W]``, ``reinforce.segmentation.IGNORE_INDEX`` = unlabeled)."""
        if self.mask_loader is None:
            raise ValueError(f"source {self.spec!r} has no masks; segmentation sources: fashion-mnist-seg, segfolder")
        return self.mask_loader(str(self.uris[index]))

    def encoded(self, index: int) -> tuple[bytes, str]:
        """Image i as encoded bytes + file extension, for a store that carries the images: the file's own bytes
        where the source has a file, else a lossless PNG of ``load(i)``. ``load_image_bytes`` of the bytes
        equals ``load(i)`` either way."""
        uri = str(self.uris[index])
        if self.loader is _load_file and not uri.startswith(tuple(prefix for prefix, _ in _URI_LOADERS)):
            data = _file_bytes(uri)
            with Image.open(io.BytesIO(data)) as image:
                return data, IMAGE_EXTENSIONS.get(image.format, str(image.format).lower())
        return _encode_png(self.load(index)), "png"

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
    match = _CROPS_SPEC.fullmatch(base.removeprefix("photo-crops:")) if base.startswith("photo-crops:") else None
    if match is None:
        return None
    limit = dict(parse_qsl(query)).get("limit", "")
    return min(int(match[1]), int(limit)) if limit.isdigit() else int(match[1])


def _first_crops(base: str, count: int) -> str:
    """``photo-crops:N...`` as ``photo-crops:COUNT...``: crop i does not depend on N, so a ``limit`` never
    materialises the crops it drops."""
    match = _CROPS_SPEC.fullmatch(base.removeprefix("photo-crops:"))
    return f"photo-crops:{count}" + base.removeprefix(f"photo-crops:{match[1]}")


def with_query(spec: str, **options: object) -> str:
    """Add ``key=value`` options to a spec, e.g. ``with_query(src, shots=10, part="labeled")``."""
    extra = "&".join(f"{k}={v}" for k, v in options.items() if v is not None)
    if not extra:
        return spec
    return f"{spec}{'&' if '?' in spec else '?'}{extra}"


def _open_base(base: str) -> Source:
    """Registered prefix (longest wins), else manifest, tar shards or a plain directory."""
    for prefix in sorted(_SOURCES, key=len, reverse=True):
        if base.startswith(prefix + ":") or (":" in prefix and base == prefix):
            return dataclasses.replace(_SOURCES[prefix](base[len(prefix) + 1:]), spec=base)
    if base.endswith((".parquet", ".csv")):
        return _manifest(base)
    if ".tar" in base:
        return _tar_shards(base)
    if Path(base).is_dir():
        return _image_tree(base, Path(base), labeled=False)
    raise ValueError(
        f"cannot open transfer set {base!r}: not a directory, manifest (.parquet/.csv), tar shard or "
        f"registered source (PREFIX:ARGS; registered: {', '.join(list_sources())}); spec forms: {SPEC_FORMS}"
    )


def _no_argument(prefix: str, rest: str) -> None:
    if rest:
        raise ValueError(f"source {prefix!r} takes no argument, got {prefix}:{rest!r}; use just {prefix!r}")


# --- Fashion-MNIST (IDX files from Debian's dataset-fashion-mnist) -------------------------------

def fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST IDX files: ``$FASHION_MNIST_DIR`` (read now, not at import) or Debian's path."""
    return Path(os.environ.get("FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR)


def _fashion_mnist_path(split: str, kind: str) -> Path:
    prefix = {"train": "train", "test": "t10k"}[split]
    return fashion_mnist_dir() / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"


@register_source("fashion-mnist")
def _fashion_mnist(split: str) -> Source:
    if split not in ("train", "test"):
        raise ValueError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    images_path, labels_path = _fashion_mnist_path(split, "images"), _fashion_mnist_path(split, "labels")
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {images_path.parent}: install it with "
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
    images = _read_idx(str(_fashion_mnist_path(split, "images")))
    return torch.from_numpy(images[int(index)].copy()).expand(3, -1, -1).contiguous()


# --- image files ---------------------------------------------------------------------------------

def load_image_bytes(data: bytes) -> torch.Tensor:
    """Decode encoded image bytes to uint8 ``[3, H, W]`` RGB; raises on corrupt data."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _encode_png(image: torch.Tensor) -> bytes:
    """uint8 ``[3, H, W]`` -> PNG bytes (grey when the channels are equal); ``load_image_bytes`` inverts it exactly."""
    grey = bool((image == image[:1]).all())
    pixels = image[0].numpy() if grey else image.permute(1, 2, 0).numpy()
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out.getvalue()


def _file_bytes(uri: str) -> bytes:
    """The bytes of an image file or tar member (``SHARD::OFFSET:SIZE``)."""
    if "::" in uri:
        shard, _, span = uri.rpartition("::")
        offset, size = map(int, span.split(":"))
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    return Path(uri).read_bytes()


def _load_file(uri: str) -> torch.Tensor:
    """Any URI a source writes (so manifests may list them too), else an image file or tar member; a file that
    does not decode is an ``InputError`` naming it (a build records it and skips the sample)."""
    for prefix, loader in _URI_LOADERS:
        if uri.startswith(prefix):
            return loader(uri)
    data = _file_bytes(uri)
    try:
        return load_image_bytes(data)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # PIL: unidentified, truncated, bombs
        raise InputError(f"{uri}: not a readable image ({type(error).__name__}: {error})") from None


def _files_content_id(paths: list[Path]) -> str:
    """Cheap identity of a file list: relative paths and byte sizes (not full content hashes)."""
    return hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in paths).encode()).hexdigest()


@register_source("folder")
def _folder(root: str) -> Source:
    return _image_tree(f"folder:{root}", Path(root), labeled=False)


@register_source("imagefolder")
def _imagefolder(root: str) -> Source:
    return _image_tree(f"imagefolder:{root}", Path(root), labeled=True)


def _image_tree(spec: str, root: Path, labeled: bool) -> Source:
    if not root.is_dir():
        raise FileNotFoundError(f"directory {str(root)!r} does not exist (spec forms: {SPEC_FORMS})")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {str(root)!r} "
                         f"(spec forms: {SPEC_FORMS})")
    keys = np.array([str(p.relative_to(root)) for p in paths])
    labels, class_names = None, ()
    if labeled:
        class_names = tuple(sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1}))
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index.get(p.relative_to(root).parts[0], -1) for p in paths], dtype=np.int64)
        if (labels < 0).any():
            raise ValueError(f"imagefolder {str(root)!r} has images outside class directories; put each image in "
                             f"DIR/CLASS/, or read it unlabeled as folder:DIR (spec forms: {SPEC_FORMS})")
    return Source(spec, keys, np.array([str(p) for p in paths]), labels, class_names, _load_file,
                  _files_content_id(paths))


def _manifest(path: str) -> Source:
    import polars as pl

    if not Path(path).exists():
        raise FileNotFoundError(f"manifest {path!r} does not exist")
    frame = pl.read_parquet(path) if path.endswith(".parquet") else pl.read_csv(path)
    if "uri" not in frame.columns:
        raise ValueError(f"manifest {path!r} needs a 'uri' column; it has {frame.columns}")
    if "theta" in frame.columns:  # a retrieval manifest lists crops, not whole images
        return _retrieved(path)
    base = Path(path).parent
    uris = np.array([u if (":" in u and not Path(u).is_absolute()) or Path(u).is_absolute() else str(base / u)
                     for u in frame["uri"].to_list()])
    keys = np.array(frame["key"].to_list() if "key" in frame.columns else [str(u) for u in frame["uri"].to_list()])
    if "mask" in frame.columns:  # image/mask pairs: a segmentation source
        from reinforce.segmentation import mask_manifest

        return mask_manifest(path, keys.tolist(), [Path(u) for u in uris], [base / m for m in frame["mask"].to_list()])
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
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        keys.append(f"{Path(shard).name}/{member.name}")
                        uris.append(f"{shard}::{member.offset_data}:{member.size}")
        except tarfile.TarError as error:
            raise ValueError(f"webdataset shard {shard!r} is truncated or not a tar file ({error})") from None
    return Source(spec, np.array(keys), np.array(uris), None, (), _load_file,
                  _files_content_id([Path(s) for s in shards]))


# --- photographs that ship in Python packages (offline, no downloads) ---------------------------

@cache
def _matplotlib_photo_paths() -> dict[str, Path]:
    """matplotlib's sample photographs when matplotlib is installed with its mpl-data; {} otherwise."""
    try:
        from matplotlib.cbook import get_sample_data
    except ImportError:
        return {}
    paths = {}
    for stem in MATPLOTLIB_PHOTOS:
        try:
            path = Path(get_sample_data(f"{stem}.jpg", asfileobj=False))
        except (OSError, ValueError):
            continue
        if path.is_file():
            paths[stem] = path
    return paths


def _package_photo_names() -> tuple[str, ...]:
    """Every photograph available here, as ``PACKAGE/STEM``, in a fixed order (matplotlib's last)."""
    return (*(f"skimage/{n}" for n in SKIMAGE_PHOTOS), *(f"sklearn/{n}" for n in SKLEARN_PHOTOS),
            *(f"matplotlib/{n}" for n in _matplotlib_photo_paths()))


@cache
def _photo(name: str) -> np.ndarray:
    """Decode package photo ``PACKAGE/STEM`` once per process to a read-only ``[H, W, 3]`` uint8 array."""
    package, _, stem = name.partition("/")
    if package == "skimage" and stem in SKIMAGE_PHOTOS:
        from skimage import data

        image = data.stereo_motorcycle()[0] if stem == "motorcycle" else getattr(data, stem)()
    elif package == "sklearn" and stem in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{stem}.jpg")
    elif package == "matplotlib" and stem in _matplotlib_photo_paths():
        image = np.asarray(Image.open(_matplotlib_photo_paths()[stem]).convert("RGB"))
    else:
        raise ValueError(f"unknown package photo {name!r}; available: {', '.join(_package_photo_names())}")
    image = np.asarray(image, dtype=np.uint8)
    image = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else np.ascontiguousarray(image[:, :, :3])
    image.flags.writeable = False
    return image


@cache
def _photos_digest(names: tuple[str, ...]) -> str:
    """sha256 over the decoded pixels of ``names``: changes when a package's images change."""
    digest = hashlib.sha256()
    for name in names:
        photo = _photo(name)
        digest.update(f"{name}:{photo.shape}".encode())
        digest.update(photo.tobytes())
    return digest.hexdigest()


def _photo_tensor(photo: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(photo.transpose(2, 0, 1).copy())


def _photo_list(spec: str, names: tuple[str, ...]) -> Source:
    stems = [name.partition("/")[2] for name in names]
    uris = np.array([f"{spec}#{stem}" for stem in stems])
    return Source(spec, np.array(stems), uris, None, (), _load_package_photo, _photos_digest(names))


def _load_package_photo(uri: str) -> torch.Tensor:
    """``skimage:photos#astronaut`` or ``sklearn:images#china`` → uint8 [3, H, W]."""
    spec, _, stem = uri.partition("#")
    return _photo_tensor(_photo(f"{spec.partition(':')[0]}/{stem}"))


@register_source("skimage:photos")
def _skimage_photos(rest: str) -> Source:
    _no_argument("skimage:photos", rest)
    return _photo_list("skimage:photos", tuple(f"skimage/{n}" for n in SKIMAGE_PHOTOS))


@register_source("sklearn:images")
def _sklearn_images(rest: str) -> Source:
    _no_argument("sklearn:images", rest)
    return _photo_list("sklearn:images", tuple(f"sklearn/{n}" for n in SKLEARN_PHOTOS))


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``[1797, 8, 8]`` uint8 (0..16 → 0..255) and ``[1797]`` int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images.flags.writeable = False
    return images, digits.target.astype(np.int64)


@register_source("sklearn:digits")
def _sklearn_digits(rest: str) -> Source:
    _no_argument("sklearn:digits", rest)
    images, labels = _digits()
    keys = np.array([f"{i:04d}" for i in range(len(labels))])
    uris = np.array([f"sklearn:digits#{i}" for i in range(len(labels))])
    content = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return Source("sklearn:digits", keys, uris, labels, tuple(map(str, range(10))), _load_digit, content)


def _load_digit(uri: str) -> torch.Tensor:
    return torch.from_numpy(_digits()[0][int(uri.rpartition("#")[2])].copy()).expand(3, -1, -1).contiguous()


# --- photo-crops: the generic transfer set ----------------------------------------------------

_CROPS_SPEC = re.compile(r"(\d+)(?:@(\d+))?(?:,seed=(\d+))?")
_CROP_URI = re.compile(r"photo-crops:([\w-]+/[\w-]+)#(\d+),(\d+),(\d+),(\d+)@(\d+)")


@register_source("photo-crops")
def _photo_crops(rest: str) -> Source:
    """N square crops; the crop box and size are in each URI, so ``load`` re-renders it without the spec."""
    match = _CROPS_SPEC.fullmatch(rest)
    if match is None or int(match[1]) < 1 or int(match[2] or 96) < 1:
        raise ValueError(f"bad photo-crops spec {'photo-crops:' + rest!r}; use photo-crops:N[@SIZE][,seed=S], "
                         "e.g. photo-crops:20000@96,seed=0")
    count, size, seed = int(match[1]), int(match[2] or 96), int(match[3] or 0)
    names = _package_photo_names()
    uris = np.array([f"photo-crops:{name}#{left},{top},{side},{side}@{size}"
                     for name, left, top, side in _sample_crops(names, count, seed)])
    keys = np.array([f"{i:06d}" for i in range(count)])
    return Source(f"photo-crops:{rest}", keys, uris, None, (), _load_photo_crop, _photos_digest(names))


def _sample_crops(names: tuple[str, ...], count: int, seed: int) -> list[tuple[str, int, int, int]]:
    """Crop i reads row i of one seeded ``[count, 4]`` uniform draw: (photo, area fraction, left, top)."""
    draws = np.random.default_rng(seed).random((count, 4))
    shapes = np.array([_photo(name).shape[:2] for name in names])  # [P, 2] (H, W)
    which = np.minimum((draws[:, 0] * len(names)).astype(np.int64), len(names) - 1)
    height, width = shapes[which, 0], shapes[which, 1]
    area = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * draws[:, 1]
    side = np.clip(np.round(np.sqrt(area * height * width)), 1, np.minimum(height, width)).astype(np.int64)
    left = (draws[:, 2] * (width - side + 1)).astype(np.int64)
    top = (draws[:, 3] * (height - side + 1)).astype(np.int64)
    return [(names[p], int(x), int(y), int(s)) for p, x, y, s in zip(which, left, top, side)]


def _load_photo_crop(uri: str) -> torch.Tensor:
    """``photo-crops:PACKAGE/STEM#LEFT,TOP,W,H@SIZE`` → bicubic (antialiased) uint8 ``[3, SIZE, SIZE]``."""
    match = _CROP_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"bad photo-crops URI {uri!r}; expected photo-crops:PACKAGE/STEM#LEFT,TOP,W,H@SIZE")
    left, top, width, height, size = map(int, match.groups()[1:])
    image = Image.fromarray(_photo(match[1]))
    crop = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).contiguous()


# --- retrieved: crops chosen by ``python -m reinforce.retrieve`` ----------------------------------

RETRIEVED_COLUMNS = ("key", "uri", "theta", "policy")
# manifest path -> (gallery URIs, each row's crop policy and θ), set when the manifest is opened (a rewritten manifest
# replaces its entry)
_RETRIEVED: dict[str, tuple[tuple[str, ...], tuple[tuple[CropFlip, AugParams], ...]]] = {}


@register_source("retrieved")
def _retrieved(path: str) -> Source:
    """Crop i = gallery image ``uri[i]`` cut by its θ record at source resolution (box, flip, RandAugment ops: the
    row's own policy, ``CropFlip.cut``), so the build's view augmentation runs on the retrieved crop and replay cuts
    the same pixels; the manifest's bytes are the content id."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"retrieval manifest {path!r} does not exist (python -m reinforce.retrieve writes one)")
    import polars as pl

    from reinforce.augment import policy_from_record

    frame = pl.read_parquet(path)  # decoded here, in the parent: polars hangs in forked DataLoader workers
    missing = [c for c in RETRIEVED_COLUMNS if c not in frame.columns]
    if missing or frame.is_empty():
        raise ValueError(f"retrieval manifest {path!r} has no rows or lacks column(s) {missing}; "
                         "write it with python -m reinforce.retrieve")
    crops: dict[int, tuple[CropFlip, AugParams]] = {}
    for text, rows in frame.with_row_index().group_by("policy").agg("index").iter_rows():  # crops and queries
        policy = policy_from_record(json.loads(text))
        records = np.frombuffer(b"".join(frame["theta"][rows].to_list()), np.uint8).reshape(len(rows), -1)
        for row, theta in zip(rows, policy.unpack(records)):
            crops[row] = policy, theta
    uris = tuple(frame["uri"].to_list())
    _RETRIEVED[path] = uris, tuple(crops[row] for row in range(len(frame)))
    keys = frame["key"].to_numpy().astype(str)
    return Source(f"retrieved:{path}", keys, np.array([f"retrieved:{path}#{i}" for i in range(len(uris))]), None, (),
                  _load_retrieved_crop, hashlib.sha256(Path(path).read_bytes()).hexdigest())


def _load_retrieved_crop(uri: str) -> torch.Tensor:
    """``retrieved:MANIFEST#ROW`` -> uint8 ``[3, h, w]``, the row's crop of its gallery image (no resampling)."""
    path, _, row = uri.removeprefix("retrieved:").rpartition("#")
    uris, crops = _RETRIEVED[path]
    policy, theta = crops[int(row)]
    image = _load_file(uris[int(row)])
    try:
        return policy.cut(image, theta)
    except ValueError as error:
        raise ValueError(f"{uris[int(row)]}: {error}") from error


_URI_LOADERS: tuple[tuple[str, Callable[[str], torch.Tensor]], ...] = (
    ("fashion-mnist:", _load_fashion_mnist),
    ("skimage:photos#", _load_package_photo),
    ("sklearn:images#", _load_package_photo),
    ("sklearn:digits#", _load_digit),
    ("photo-crops:", _load_photo_crop),
)


from reinforce import segmentation  # noqa: E402,F401  registers the segmentation sources (it imports this module)
