"""Check a published store end to end, and summarise it, for ``python -m stores``.

``open_store`` only compares file sizes (cheap, on every open); ``verify_store`` is the slow,
thorough check one runs after copying a store or when a read fails: checksums, shapes and a decode
of every chunk.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from stores.location import Location
from stores.manifest import WDS_FORMAT, StoreManifest
from stores.store import (
    ARRAYS_DIR,
    MANIFEST,
    SHARDS_DIR,
    THETA,
    StoreCorruptError,
    StoreFormatError,
    array_paths,
    open_store,
    read_manifest,
)
from stores.wds import read_shard, sample_arrays

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
    """Every problem found in the store at ``path`` (a local path or a URL), each naming the broken file;
    empty if sound."""
    location = path if isinstance(path, Location) else Location(path)
    if not location.exists(MANIFEST):
        return [f"{location.where(MANIFEST)}: missing (no store at {location.url})"]
    try:
        manifest = read_manifest(location)
    except StoreFormatError as error:
        return [str(error)]
    problems = _check_files(location, manifest)
    if problems:  # decoding damaged files only repeats what the checksums already said
        return problems
    return _check_shards(location, manifest) if manifest.format == WDS_FORMAT else _check_arrays(location, manifest)


def _check_shards(location: Location, manifest: StoreManifest) -> list[str]:
    """Every sample of every tar shard decodes, with θ and each array of the manifest's shape, once per sample."""
    problems, seen = [], 0
    shapes = {name: (manifest.views, *shape) for name, (shape, _) in array_paths(manifest.content).items()}
    for rel in sorted(f.path for f in manifest.files if f.path.startswith(SHARDS_DIR + "/")):
        try:
            for sample in read_shard(location, rel):
                seen += 1
                arrays = sample_arrays(sample, manifest.content, list(manifest.content.targets))
                found = {THETA: arrays[THETA].shape, **{f"{t}/{a}": v.shape for t in manifest.content.targets
                                                        for a, v in arrays[t].items()}}
                if found != shapes:
                    problems.append(f"{location.where(rel)}: sample {sample['__key__']} has shapes {found}, "
                                    f"manifest says {shapes}")
        except (StoreCorruptError, KeyError) as error:
            problems.append(f"{location.where(rel)}: {error}")
    if not problems and seen != manifest.summary["ok"]:
        problems.append(f"{location.where(SHARDS_DIR)}: {seen} samples, manifest says {manifest.summary['ok']} ok")
    return problems


def _check_files(location: Location, manifest: StoreManifest) -> list[str]:
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
    return problems


def _check_arrays(location: Location, manifest: StoreManifest) -> list[str]:
    """Shapes against the manifest, then a decode of every chunk, one store unit at a time."""
    problems = []
    group = zarr.open_group(location.zarr_store(ARRAYS_DIR, read_only=True), mode="r", use_consolidated=True)
    unit = manifest.layout["unit_samples"]
    for name, (per_view_shape, dtype) in array_paths(manifest.content).items():
        where = location.where(f"{ARRAYS_DIR}/{name}")
        try:
            array = group[name]
        except KeyError:
            problems.append(f"{where}: array missing")
            continue
        expected = (manifest.num_samples, manifest.views, *per_view_shape)
        if tuple(array.shape) != expected or array.dtype != dtype:
            problems.append(f"{where}: shape {tuple(array.shape)} {array.dtype}, manifest says {expected} {dtype}")
            continue
        for start in range(0, manifest.num_samples, unit):
            try:
                array[start: start + unit]
            except Exception as error:  # codec-specific errors (crc, blosc): report the shard instead
                problems.append(f"{where}: samples {start}..{min(start + unit, manifest.num_samples) - 1} "
                                f"do not decode ({type(error).__name__}: {error})")
    return problems
