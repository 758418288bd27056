"""Photographs that ship in Python packages (offline, no downloads), and the generic transfer set cut from them.

Specs: ``skimage:photos`` (19 real photographs bundled with scikit-image), ``sklearn:images`` (china, flower),
``sklearn:digits`` (1797 8x8 digits, labeled 0..9), ``photo-crops:N[@SIZE][,seed=S]`` (N seeded square crops of
all of them, + matplotlib's grace_hopper.jpg when matplotlib is installed; crop i is the same for every N).
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reinforce.sources.registry import Source, no_argument, register_source

__all__ = ["CROPS_SPEC", "CROP_AREA", "MATPLOTLIB_PHOTOS", "SKIMAGE_PHOTOS", "SKLEARN_PHOTOS", "load_digit",
           "load_package_photo", "load_photo_crop"]

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
    return Source(spec, np.array(stems), uris, None, (), load_package_photo, _photos_digest(names))


def load_package_photo(uri: str) -> torch.Tensor:
    """``skimage:photos#astronaut`` or ``sklearn:images#china`` → uint8 [3, H, W]."""
    spec, _, stem = uri.partition("#")
    return _photo_tensor(_photo(f"{spec.partition(':')[0]}/{stem}"))


@register_source("skimage:photos")
def _skimage_photos(rest: str) -> Source:
    no_argument("skimage:photos", rest)
    return _photo_list("skimage:photos", tuple(f"skimage/{n}" for n in SKIMAGE_PHOTOS))


@register_source("sklearn:images")
def _sklearn_images(rest: str) -> Source:
    no_argument("sklearn:images", rest)
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
    no_argument("sklearn:digits", rest)
    images, labels = _digits()
    keys = np.array([f"{i:04d}" for i in range(len(labels))])
    uris = np.array([f"sklearn:digits#{i}" for i in range(len(labels))])
    content = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return Source("sklearn:digits", keys, uris, labels, tuple(map(str, range(10))), load_digit, content)


def load_digit(uri: str) -> torch.Tensor:
    return torch.from_numpy(_digits()[0][int(uri.rpartition("#")[2])].copy()).expand(3, -1, -1).contiguous()


# --- photo-crops: the generic transfer set ----------------------------------------------------

CROPS_SPEC = re.compile(r"(\d+)(?:@(\d+))?(?:,seed=(\d+))?")
_CROP_URI = re.compile(r"photo-crops:([\w-]+/[\w-]+)#(\d+),(\d+),(\d+),(\d+)@(\d+)")


@register_source("photo-crops")
def _photo_crops(rest: str) -> Source:
    """N square crops; the crop box and size are in each URI, so ``load`` re-renders it without the spec."""
    match = CROPS_SPEC.fullmatch(rest)
    if match is None or int(match[1]) < 1 or int(match[2] or 96) < 1:
        raise ValueError(f"bad photo-crops spec {'photo-crops:' + rest!r}; use photo-crops:N[@SIZE][,seed=S], "
                         "e.g. photo-crops:20000@96,seed=0")
    count, size, seed = int(match[1]), int(match[2] or 96), int(match[3] or 0)
    names = _package_photo_names()
    uris = np.array([f"photo-crops:{name}#{left},{top},{side},{side}@{size}"
                     for name, left, top, side in _sample_crops(names, count, seed)])
    keys = np.array([f"{i:06d}" for i in range(count)])
    return Source(f"photo-crops:{rest}", keys, uris, None, (), load_photo_crop, _photos_digest(names))


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


RENDERED_CROPS_BYTES = 256 << 20  # rendered crops kept per process (photo-crops:20000@64 fits: 246 MB)


@cache
def _pil_photo(name: str) -> Image.Image:
    """The decoded photo as a PIL image, made once per process (``Image.fromarray`` copies the whole photo)."""
    return Image.fromarray(_photo(name))


class _RenderedCrops:
    """Rendered crops by URI, up to a byte budget per process. Training replays K views of every crop each
    epoch, and rendering one (a bicubic, antialiased resize of a box of up to a few hundred pixels) costs
    more than the student's step on it; past the budget, crops are rendered on every call."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.crops: dict[str, torch.Tensor] = {}

    def __call__(self, uri: str) -> torch.Tensor:
        crop = self.crops.get(uri)
        if crop is None:
            crop = _render_crop(uri)
            if self.used + crop.nbytes <= self.budget:
                self.crops[uri] = crop
                self.used += crop.nbytes
        return crop.clone()


def _render_crop(uri: str) -> torch.Tensor:
    match = _CROP_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"bad photo-crops URI {uri!r}; expected photo-crops:PACKAGE/STEM#LEFT,TOP,W,H@SIZE")
    left, top, width, height, size = map(int, match.groups()[1:])
    box = (left, top, left + width, top + height)
    crop = _pil_photo(match[1]).resize((size, size), Image.Resampling.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).contiguous()


_rendered_crops = _RenderedCrops(RENDERED_CROPS_BYTES)


def load_photo_crop(uri: str) -> torch.Tensor:
    """``photo-crops:PACKAGE/STEM#LEFT,TOP,W,H@SIZE`` → bicubic (antialiased) uint8 ``[3, SIZE, SIZE]``."""
    return _rendered_crops(uri)
