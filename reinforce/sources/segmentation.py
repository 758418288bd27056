"""Segmentation sources: images paired with integer class maps, opened from a spec like any source.

Specs (registered with ``reinforce.sources.register_source``; ``?limit=N`` works as everywhere):
    fashion-mnist-seg:train|test[@CANVAS][,grid=G]   embedded real-derived default: Fashion-MNIST mosaics.
        Each CANVAS x CANVAS image (default 64) is a G x G grid (default 2) of real Fashion-MNIST items, one
        per cell at a seeded offset; item i of the split appears in canvas ``i // G²`` of a seeded permutation.
        A pixel's class is its item's class + 1 where the item is foreground (pixel > ``FOREGROUND_THRESHOLD``),
        0 (background) elsewhere: 11 classes. Derived from Fashion-MNIST (Zalando, MIT licence); not a
        published segmentation benchmark.
    segfolder:DIR    DIR/images/NAME.{png,jpg,...}, DIR/masks/NAME.png (one channel, pixel = class id,
        ``IGNORE_INDEX`` = unlabeled), DIR/classes.txt (one class name per line, id = line number).
    FILE.parquet | FILE.csv with columns ``uri`` and ``mask`` (paths relative to the manifest's folder or
        absolute) and ``classes.txt`` beside it: image/mask pairs listed rather than laid out in folders.
Every mask is checked when the source is opened: a missing mask, a mask of another size than its image, or
with a class id beyond classes.txt, fails naming the file, before anything is built from it.

Example:
    >>> source = open_source("fashion-mnist-seg:train@64,grid=2?limit=100")
    >>> image, mask = source.load(0), source.load_mask(0)   # uint8 [3, 64, 64], uint8 [64, 64] in 0..10
"""

from __future__ import annotations

import functools
import hashlib
import re
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reinforce.sources.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_path, open_fashion_mnist, read_idx
from reinforce.sources.files import files_content_id, load_file, own_file_bytes
from reinforce.sources.registry import IMAGE_SUFFIXES, Source, register_source

__all__ = [
    "BACKGROUND",
    "FOREGROUND_THRESHOLD",
    "IGNORE_INDEX",
    "SEG_CLASSES",
    "mask_manifest",
]

IGNORE_INDEX = 255  # mask value of unlabeled pixels: no loss, no metric
BACKGROUND = "background"
SEG_CLASSES = (BACKGROUND, *FASHION_MNIST_CLASSES)
FOREGROUND_THRESHOLD = 32  # Fashion-MNIST items lie on exact 0; faint halo pixels below this count as background
ITEM = 28  # Fashion-MNIST item side
_MOSAIC_SPEC = re.compile(r"(train|test)(?:@(\d+))?(?:,grid=(\d+))?")


@register_source("fashion-mnist-seg")
def _fashion_mnist_seg(rest: str) -> Source:
    match = _MOSAIC_SPEC.fullmatch(rest)
    canvas, grid = (int(match[2] or 64), int(match[3] or 2)) if match else (0, 0)
    if match is None or grid < 1 or canvas < grid * ITEM:
        raise ValueError(f"bad fashion-mnist-seg spec {'fashion-mnist-seg:' + rest!r}; use "
                         f"fashion-mnist-seg:train|test[@CANVAS][,grid=G] with CANVAS >= G * {ITEM}, "
                         "e.g. fashion-mnist-seg:train@64,grid=2")
    split = match[1]
    items = open_fashion_mnist(split)  # the real images, with its own missing-data error
    count = len(items) // grid**2
    name = f"fashion-mnist-seg:{split}@{canvas},grid={grid}"
    keys = np.array([f"{split}/{i:05d}" for i in range(count)])
    uris = np.array([f"{name}#{i}" for i in range(count)])
    content = hashlib.sha256(f"{items.content_id}:{FOREGROUND_THRESHOLD}".encode()).hexdigest()
    return Source(name, keys, uris, None, SEG_CLASSES, _mosaic_image, content, mask_loader=_mosaic_mask)


@cache
def _item_order(split: str, count: int) -> np.ndarray:
    """The seeded permutation placing the split's items into canvases (fixed seed: part of the source's definition)."""
    return np.random.default_rng(0).permutation(count)


@lru_cache(maxsize=64)
def _mosaic(uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``fashion-mnist-seg:SPLIT@CANVAS,grid=G#I`` -> (uint8 ``[3, C, C]`` image, uint8 ``[C, C]`` class map)."""
    name, _, index = uri.rpartition("#")
    split, canvas, grid = _MOSAIC_SPEC.fullmatch(name.removeprefix("fashion-mnist-seg:")).groups()
    canvas, grid, index = int(canvas), int(grid), int(index)
    images = read_idx(str(fashion_mnist_path(split, "images")))
    labels = read_idx(str(fashion_mnist_path(split, "labels")))
    order = _item_order(split, len(labels))[index * grid**2: (index + 1) * grid**2]
    cell = canvas // grid
    offsets = np.random.default_rng([1, index]).integers(0, cell - ITEM + 1, size=(grid**2, 2))
    image, mask = np.zeros((canvas, canvas), np.uint8), np.zeros((canvas, canvas), np.uint8)
    for slot, (item, (dy, dx)) in enumerate(zip(order, offsets)):
        top, left = (slot // grid) * cell + dy, (slot % grid) * cell + dx
        pixels = images[item]
        image[top: top + ITEM, left: left + ITEM] = pixels
        mask[top: top + ITEM, left: left + ITEM] = np.where(pixels > FOREGROUND_THRESHOLD, labels[item] + 1, 0)
    return torch.from_numpy(image).expand(3, -1, -1).contiguous(), torch.from_numpy(mask)


def _mosaic_image(uri: str) -> torch.Tensor:
    return _mosaic(uri)[0].clone()


def _mosaic_mask(uri: str) -> torch.Tensor:
    return _mosaic(uri)[1].clone()


# --- segfolder: images/ + masks/ + classes.txt ----------------------------------------------------

@register_source("segfolder")
def _segfolder(root: str) -> Source:
    directory = Path(root)
    if not (directory / "images").is_dir() or not (directory / "masks").is_dir():
        raise FileNotFoundError(f"segfolder {root!r} needs images/, masks/ and classes.txt (one class name per "
                                "line; mask pixel = line number, 255 = ignore)")
    class_names = _read_classes(directory / "classes.txt", f"segfolder {root!r}")
    paths = sorted(p for p in (directory / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(directory / 'images')!r}")
    masks = [directory / "masks" / f"{p.stem}.png" for p in paths]
    return _paired(f"segfolder:{root}", [p.name for p in paths], paths, masks, class_names)


def mask_manifest(path: str, keys: list[str], images: list[Path], masks: list[Path]) -> Source:
    """A manifest's image/mask pairs (``reinforce.sources.manifests`` opens FILE.parquet|csv and hands a ``mask``
    column here); the class names come from ``classes.txt`` beside it, as in a segfolder."""
    classes = Path(path).parent / "classes.txt"
    return _paired(path, keys, images, masks, _read_classes(classes, f"mask manifest {path!r}"))


def _read_classes(classes_file: Path, owner: str) -> tuple[str, ...]:
    if not classes_file.is_file():
        raise FileNotFoundError(f"{owner} needs {str(classes_file)!r}: one class name per line (mask pixel = line "
                                f"number, {IGNORE_INDEX} = ignore)")
    return tuple(line.strip() for line in classes_file.read_text().splitlines() if line.strip())


def _paired(spec: str, keys: list[str], images: list[Path], masks: list[Path], class_names: tuple[str, ...]) -> Source:
    """Image files with their mask files, every mask checked first; the mask of an image is found by its URI."""
    for image, mask in zip(images, masks):
        _check_mask(image, mask, len(class_names))
    uris = [str(p) for p in images]
    mask_loader = functools.partial(_load_listed_mask, dict(zip(uris, map(str, masks))))  # picklable for workers
    return Source(spec, np.array(keys), np.array(uris), None, class_names, load_file,
                  files_content_id(list(images) + list(masks)), mask_loader=mask_loader, file_bytes=own_file_bytes)


def _check_mask(image: Path, mask: Path, num_classes: int) -> None:
    """Fail naming the file when the mask is missing, multi-channel, sized unlike its image or has unknown ids."""
    if not mask.is_file():
        raise FileNotFoundError(f"image {str(image)!r} has no mask {str(mask)!r}")
    with Image.open(image) as picture, Image.open(mask) as labels:
        if labels.size != picture.size:
            raise ValueError(f"mask {str(mask)!r} is {labels.size[0]}x{labels.size[1]} but its image {str(image)!r} "
                             f"is {picture.size[0]}x{picture.size[1]} (width x height); masks must match their image")
        if labels.mode not in ("L", "P"):
            raise ValueError(f"mask {str(mask)!r} has mode {labels.mode}; save one-channel PNGs (L or P) of class ids")
        ids = np.unique(np.asarray(labels))
    bad = ids[(ids >= num_classes) & (ids != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"mask {str(mask)!r} has class id(s) {bad.tolist()} beyond the {num_classes} classes of "
                         f"classes.txt (ids 0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")


def _load_listed_mask(masks: dict[str, str], uri: str) -> torch.Tensor:
    with Image.open(masks[uri]) as labels:
        return torch.from_numpy(np.asarray(labels).copy())
