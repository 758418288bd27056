"""Check a published store end to end, and summarise it, for ``python -m stores``.

``open_store`` only compares file sizes (cheap, on every open); ``verify_store`` is the slow,
thorough check one runs after copying a store or when a read fails: checksums, shapes and a decode
of every chunk.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from stores.location import Location
from stores.manifest import WDS_FORMAT, StoreManifest
from stores.store import (
    ARRAYS_DIR,
    MANIFEST,
    SAMPLES_FILE,
    SHARDS_DIR,
    THETA,
    ReinforcedStore,
    StoreCorruptError,
    StoreFormatError,
    array_paths,
    check_zarr_metadata,
    open_store,
    read_manifest,
)
from stores.untrusted import printable
from stores.wds import ShardSample, read_shard, shard_path

__all__ = ["describe_store", "verify_store"]


def describe_store(path: str | os.PathLike) -> dict[str, Any]:
    """Manifest summary plus storage cost per target and codec fidelity, the numbers one compares stores by."""
    store = open_store(path)
    manifest = store.manifest
    content = manifest.content
    views = manifest.num_samples * manifest.views

    def bytes_under(prefix: str) -> int:
        return sum(r.bytes for r in manifest.files if r.path.startswith(prefix))

    def raw_bytes(name: str) -> int:  # tar members are uncompressed: the arrays' own bytes, all views
        return sum(int(np.prod(shape)) * dtype.itemsize for array, (shape, dtype) in array_paths(content).items()
                   if array.partition("/")[0] == name) * views

    data_dir = SHARDS_DIR if manifest.format == WDS_FORMAT else ARRAYS_DIR
    arrays_bytes = bytes_under(data_dir + "/")
    total_bytes = sum(r.bytes for r in manifest.files)
    per_target = {name: raw_bytes(name) if data_dir == SHARDS_DIR else bytes_under(f"{ARRAYS_DIR}/{name}/")
                  for name in (THETA, *content.targets)}
    return {
        "path": str(store.path),
        "store_id": manifest.store_id,
        "teacher": content.teacher.name,
        "num_classes": content.teacher.num_classes,
        "transfer_set": content.transfer_set.spec,
        "samples_ok": manifest.summary["ok"],
        "samples_skipped": manifest.summary["skipped"],
        "views": manifest.views,
        "policy": {"name": content.policy.name, "version": content.policy.version, **content.policy.args},
        "targets": {name: {"kind": t.kind, "codec": t.codec,
                           "arrays": {a: spec.to_dict() for a, spec in t.arrays.items()},
                           "bytes_per_view": per_target[name] / views if views else 0.0,
                           "fidelity": manifest.summary.get("fidelity", {}).get(name, {})}
                    for name, t in content.targets.items()},
        "theta_bytes_per_view": per_target[THETA] / views if views else 0.0,
        "layout": manifest.layout,
        "data_dir": data_dir,
        "data_bytes": arrays_bytes,
        "total_bytes": total_bytes,
        "bytes_per_view": arrays_bytes / views if views else 0.0,
        "total_bytes_per_view": total_bytes / views if views else 0.0,
        "created_at": manifest.created_at,
        "library_version": manifest.library_version,
    }


def verify_store(path: str | os.PathLike | Location) -> list[str]:
    """Every problem found in the store at ``path`` (a local path or a URL), one printable line each naming the
    broken file; empty if sound.

    This is the training readers' contract, checked up front: whatever ``open_replay``, ``StreamReplay`` or
    ``train.distill`` would fail on or silently get wrong fails here first (checksums; no file outside them;
    the sample table's schema; every shard the layout implies present; every value decoded with its dtype,
    shape and codec range; every tar member one the format defines)."""
    location = path if isinstance(path, Location) else Location(path)
    if not location.exists(MANIFEST):
        return [printable(f"{location.where(MANIFEST)}: missing (no store at {location.url})")]
    try:
        manifest = read_manifest(location)
    except StoreFormatError as error:
        return [printable(error)]
    problems = _check_files(location, manifest)
    if problems:  # decoding damaged files only repeats what the checksums already said
        return [printable(p) for p in problems]
    try:
        store = open_store(location)
        usable = store.usable
        check = _check_shards if manifest.format == WDS_FORMAT else _check_arrays
        problems = check(store, usable)
    except (StoreFormatError, StoreCorruptError) as error:
        problems = [str(error)]
    return [printable(p) for p in problems]


def _check_shards(store: ReinforcedStore, usable: np.ndarray) -> list[str]:
    """Every shard the layout implies is listed, and holds exactly its unit's usable samples, each as the one
    decoder every reader uses (``stores.wds.read_shard``) accepts it."""
    location, manifest = store.location, store.manifest
    problems, seen = [], []
    listed = set(store.shards)
    units = -(-manifest.num_samples // manifest.layout["unit_samples"])
    problems += [f"{location.where(shard_path(u))}: missing from the manifest" for u in range(units)
                 if shard_path(u) not in listed]
    for rel in sorted(listed):
        try:
            for sample in read_shard(location, rel, manifest):
                seen.append(sample.index)
                problem = _image_problem(sample)
                if problem:
                    problems.append(f"{location.where(rel)}: sample {sample.index}: {problem}")
        except StoreCorruptError as error:
            problems.append(str(error))
    if not problems and seen != np.flatnonzero(usable).tolist():
        extra = sorted(set(seen) - set(np.flatnonzero(usable).tolist()))
        problems.append(f"{location.where(SHARDS_DIR)}: {len(seen)} samples, {int(usable.sum())} ok in "
                        f"{SAMPLES_FILE}" + (f"; samples {extra[:5]} are not ok there" if extra else ""))
    return problems


def _image_problem(sample: ShardSample) -> str | None:
    """Why the sample's image would fail training's decode, or differs from the header's size; None if fine."""
    try:
        with Image.open(io.BytesIO(sample.image)) as image:  # PIL refuses decompression bombs (MAX_IMAGE_PIXELS)
            image.load()
            size = image.size
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        return f"image.{sample.extension} does not decode ({type(error).__name__})"
    if size != (sample.width, sample.height):
        return f"image is {size[0]}x{size[1]}, header says {sample.width}x{sample.height}"
    return None


def _check_files(location: Location, manifest: StoreManifest) -> list[str]:
    """Sizes and sha256 of every listed file, and no file the manifest does not cover."""
    problems = []
    sizes = location.file_sizes()
    for record in manifest.files:
        where = location.where(record.path)
        if record.path not in sizes:
            problems.append(f"{where}: missing")
        elif sizes[record.path] != record.bytes:
            problems.append(f"{where}: {sizes[record.path]} bytes, manifest says {record.bytes}")
        elif location.sha256(record.path) != record.sha256:
            problems.append(f"{where}: sha256 differs from the manifest")
    listed = {record.path for record in manifest.files} | {MANIFEST}
    problems += [f"{location.where(rel)}: not in the manifest (no checksum covers it)" for rel in sorted(sizes)
                 if rel not in listed]
    return problems


def _check_arrays(store: ReinforcedStore, usable: np.ndarray) -> list[str]:
    """Every shard the layout implies listed, then every chunk read as training reads it (``store.chunk``:
    metadata against the manifest, decode, codec ranges of the usable samples)."""
    problems = []
    manifest = store.manifest
    check_zarr_metadata(store.location, manifest)
    chunks = -(-manifest.num_samples // manifest.layout["chunk_samples"])
    listed = {record.path for record in manifest.files}
    for name in array_paths(manifest.content):
        shards = sorted({store.shard_file(name, c) for c in range(chunks)} - listed)
        if shards:
            problems.append(f"{store.location.where(shards[0])}: missing from the manifest, with {len(shards) - 1} "
                            "more shards of this array (it would read as zeros)")
            continue
        for c in range(chunks):
            try:
                store.chunk(name, c)
            except StoreCorruptError as error:
                problems.append(str(error))
    return problems
