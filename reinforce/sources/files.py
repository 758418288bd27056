"""Image files: ``folder:DIR`` or ``DIR`` (every image below DIR, unlabeled), ``imagefolder:DIR`` (DIR/CLASS/**/image,
labeled by class directory), ``FILE.tar | URLS-{000..009}.tar`` (local webdataset shards, one image per sample).

``load_file`` reads any URI a source writes (so manifests may list them too), else an image file or tar member.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reinforce.sources.fashion_mnist import load_fashion_mnist
from reinforce.sources.photos import load_digit, load_package_photo, load_photo_crop
from reinforce.sources.registry import IMAGE_SUFFIXES, SPEC_FORMS, Source, load_image_bytes, register_source
from stores.errors import InputError

__all__ = ["URI_LOADERS", "file_bytes", "files_content_id", "image_tree", "load_file", "own_file_bytes", "tar_shards"]

URI_LOADERS: tuple[tuple[str, Callable[[str], torch.Tensor]], ...] = (
    ("fashion-mnist:", load_fashion_mnist),
    ("skimage:photos#", load_package_photo),
    ("sklearn:images#", load_package_photo),
    ("sklearn:digits#", load_digit),
    ("photo-crops:", load_photo_crop),
)


def file_bytes(uri: str) -> bytes:
    """The bytes of an image file or tar member (``SHARD::OFFSET:SIZE``)."""
    if "::" in uri:
        shard, _, span = uri.rpartition("::")
        offset, size = map(int, span.split(":"))
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    return Path(uri).read_bytes()


def own_file_bytes(uri: str) -> bytes | None:
    """``Source.file_bytes`` of sources read by ``load_file``: the file's bytes, None for a URI another source wrote."""
    return None if uri.startswith(tuple(prefix for prefix, _ in URI_LOADERS)) else file_bytes(uri)


def load_file(uri: str) -> torch.Tensor:
    """Any URI a source writes (so manifests may list them too), else an image file or tar member; a file that
    does not decode is an ``InputError`` naming it (a build records it and skips the sample)."""
    for prefix, loader in URI_LOADERS:
        if uri.startswith(prefix):
            return loader(uri)
    data = file_bytes(uri)
    try:
        return load_image_bytes(data)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # PIL: unidentified, truncated, bombs
        raise InputError(f"{uri}: not a readable image ({type(error).__name__}: {error})") from None


def files_content_id(paths: list[Path]) -> str:
    """Cheap identity of a file list: relative paths and byte sizes (not full content hashes)."""
    return hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in paths).encode()).hexdigest()


@register_source("folder")
def _folder(root: str) -> Source:
    return image_tree(f"folder:{root}", Path(root), labeled=False)


@register_source("imagefolder")
def _imagefolder(root: str) -> Source:
    return image_tree(f"imagefolder:{root}", Path(root), labeled=True)


def image_tree(spec: str, root: Path, labeled: bool) -> Source:
    """Every image file below ``root`` (sorted); ``labeled``: by the class directory right under ``root``."""
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
    return Source(spec, keys, np.array([str(p) for p in paths]), labels, class_names, load_file,
                  files_content_id(paths), file_bytes=own_file_bytes)


def tar_shards(spec: str) -> Source:
    """Local webdataset shards (brace-expanded), one image per member."""
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
    return Source(spec, np.array(keys), np.array(uris), None, (), load_file,
                  files_content_id([Path(s) for s in shards]), file_bytes=own_file_bytes)
