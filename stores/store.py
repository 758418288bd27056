"""Reinforced stores: a zarr v3 group of per-view arrays + ``manifest.json`` + ``samples.parquet``.

Writing is resumable and crash-safe: the build writes into ``STORE.partial/``, one *unit* (a
whole shard of samples) at a time, and commits a unit by atomically renaming a marker that also
carries the unit's sample rows. A rerun skips committed units; ``finalize`` writes the parquet
table and the manifest (with file sizes and sha256) and renames the directory into place. A
published store is never written again.

The store knows nothing of models: θ is an opaque int32 record, targets are named arrays.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

__all__ = ["FORMAT_VERSION", "ReinforcedStore", "StoreCorruptError", "StoreManifest", "StoreWriter", "open_store"]

FORMAT_VERSION = 1
ARRAYS_DIR = "targets.zarr"
COMMITS_DIR = "commits"
SAMPLE_COLUMNS = ("index", "key", "uri", "height", "width", "status", "error")


class StoreCorruptError(RuntimeError):
    """A store file is missing, truncated or fails its checksum; the message names the file."""


def content_id(config: dict[str, Any]) -> str:
    """Store id: sha256 of the canonical JSON of everything that determines the stored values."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreManifest:
    """``manifest.json``: what a reader needs to use, trust and reproduce a store."""

    format_version: int
    store_id: str
    content: dict[str, Any]  # teacher card, transfer set, policy, views, codec, seed, fields
    layout: dict[str, Any]  # chunk / shard sizes in samples
    summary: dict[str, Any]  # counts: ok, skipped, views
    files: list[dict[str, Any]]  # [{path, bytes, sha256}]
    library_version: str
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreManifest:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"store format version {data.get('format_version')} is not {FORMAT_VERSION}")
        return cls(**data)

    @property
    def num_samples(self) -> int:
        return self.content["num_samples"]

    @property
    def views(self) -> int:
        return self.content["views"]


class StoreWriter:
    """Write a store unit by unit into ``PATH.partial``; resumable after any crash.

    Args:
        path: final store directory.
        content: JSON-able description of everything that determines the values (hashed into the id).
        fields: per-view arrays, ``name -> (per_view_shape, dtype)``; stored as ``[N, K, *shape]``.
        unit_samples: samples per shard = per commit unit; chunk_samples: samples per read chunk.
    """

    def __init__(self, path: str | os.PathLike, content: dict[str, Any],
                 fields: dict[str, tuple[tuple[int, ...], np.dtype]], *,
                 unit_samples: int = 4096, chunk_samples: int = 256):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.content = content
        self.fields = fields
        self.num_samples, self.views = int(content["num_samples"]), int(content["views"])
        chunk_samples = min(chunk_samples, unit_samples)
        unit_samples -= unit_samples % chunk_samples  # a shard holds whole chunks
        self.layout = {"unit_samples": unit_samples, "chunk_samples": chunk_samples}
        self.store_id = content_id(content)
        self._prepare()

    @property
    def num_units(self) -> int:
        return -(-self.num_samples // self.layout["unit_samples"])

    def unit_range(self, unit: int) -> range:
        start = unit * self.layout["unit_samples"]
        return range(start, min(start + self.layout["unit_samples"], self.num_samples))

    def committed_units(self) -> set[int]:
        return {int(p.stem) for p in (self.partial / COMMITS_DIR).glob("*.json")}

    def _prepare(self) -> None:
        build_record = {"store_id": self.store_id, "content": self.content, "layout": self.layout}
        record_path = self.partial / "build.json"
        if record_path.exists():
            previous = json.loads(record_path.read_text())
            if previous != json.loads(json.dumps(build_record)):
                raise ValueError(
                    f"{self.partial} holds an interrupted build with different settings "
                    f"({describe_mismatch(previous, build_record)}); delete it or rerun with the same arguments"
                )
            return
        if self.partial.exists():  # crashed before build.json was written: nothing committed yet
            shutil.rmtree(self.partial)
        (self.partial / COMMITS_DIR).mkdir(parents=True)
        group = zarr.open_group(self.partial / ARRAYS_DIR, mode="w", zarr_format=3)
        for name, (shape, dtype) in self.fields.items():
            full_shape = (self.num_samples, self.views, *shape)
            unit = (self.layout["unit_samples"], self.views, *shape)
            chunk = (self.layout["chunk_samples"], self.views, *shape)
            group.create_array(
                name, shape=full_shape, dtype=dtype, chunks=chunk, shards=unit, fill_value=0,
                compressors=[zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
                             zarr.codecs.Crc32cCodec()],
            )
        _atomic_write(record_path, json.dumps(build_record, indent=1, sort_keys=True))

    def write_unit(self, unit: int, arrays: dict[str, np.ndarray], rows: list[dict[str, Any]]) -> None:
        """Write one whole shard of every array, then commit it with its sample rows."""
        span = self.unit_range(unit)
        if len(rows) != len(span):
            raise ValueError(f"unit {unit} covers {len(span)} samples, got {len(rows)} sample rows")
        group = zarr.open_group(self.partial / ARRAYS_DIR, mode="r+")
        for name in self.fields:
            group[name][span.start: span.stop] = arrays[name]
        _atomic_write(self.partial / COMMITS_DIR / f"{unit:08d}.json", json.dumps(rows))

    def finalize(self, library_version: str) -> StoreManifest:
        """Write samples.parquet + manifest.json and publish the store under its final name."""
        import polars as pl

        missing = sorted(set(range(self.num_units)) - self.committed_units())
        if missing:
            raise RuntimeError(f"cannot finalize {self.partial}: units {missing[:10]} are not committed")
        rows = [row for unit in range(self.num_units)
                for row in json.loads((self.partial / COMMITS_DIR / f"{unit:08d}.json").read_text())]
        samples = pl.DataFrame(rows, schema={"index": pl.Int64, "key": pl.String, "uri": pl.String,
                                             "height": pl.Int32, "width": pl.Int32, "status": pl.String,
                                             "error": pl.String})
        samples.write_parquet(self.partial / "samples.parquet", compression="zstd")
        zarr.consolidate_metadata(self.partial / ARRAYS_DIR, zarr_format=3)
        shutil.rmtree(self.partial / COMMITS_DIR)
        (self.partial / "build.json").unlink()
        skipped = int((samples["status"] != "ok").sum())
        manifest = StoreManifest(
            format_version=FORMAT_VERSION, store_id=self.store_id, content=self.content, layout=self.layout,
            summary={"samples": self.num_samples, "ok": self.num_samples - skipped, "skipped": skipped,
                     "views": self.views, "stored_views": (self.num_samples - skipped) * self.views},
            files=[_file_record(self.partial, p) for p in sorted(self.partial.rglob("*")) if p.is_file()],
            library_version=library_version,
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        _atomic_write(self.partial / "manifest.json", json.dumps(manifest.to_dict(), indent=1))
        os.replace(self.partial, self.path)
        return manifest


class ReinforcedStore:
    """Read access to a published store. Open with ``open_store``; safe to use after fork.

    Training reads random samples, so a batch touches many chunks; decoded chunks are kept in a
    per-process LRU cache of ``cache_bytes`` (a chunk is decoded once, not once per batch). The
    cache starts empty in each DataLoader worker.
    """

    def __init__(self, path: Path, manifest: StoreManifest, cache_bytes: int = 256 << 20):
        self.path = path
        self.manifest = manifest
        self.cache_bytes = cache_bytes
        self._arrays: dict[str, Any] | None = None
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._pid = -1

    @property
    def samples(self):
        """The per-sample table (polars DataFrame): index, key, uri, height, width, status, error."""
        import polars as pl

        return pl.read_parquet(self.path / "samples.parquet")

    @property
    def fields(self) -> list[str]:
        return list(self.manifest.content["fields"])

    def _open_arrays(self) -> dict[str, Any]:
        if self._arrays is None or self._pid != os.getpid():  # reopen lazily in each worker process
            group = zarr.open_group(self.path / ARRAYS_DIR, mode="r", use_consolidated=True)
            self._arrays = {name: group[name] for name in self.fields}
            self._chunks.clear()
            self._cached_bytes = 0
            self._pid = os.getpid()
        return self._arrays

    def _chunk(self, name: str, chunk: int) -> np.ndarray:
        """Decoded chunk ``chunk`` of array ``name`` (``[chunk_samples, K, ...]``), through the LRU cache."""
        key = (name, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        size = self.manifest.layout["chunk_samples"]
        try:
            block = self._open_arrays()[name][chunk * size: (chunk + 1) * size]
        except Exception as error:  # zarr raises codec-specific errors; name the file instead
            raise StoreCorruptError(
                f"{self.path / ARRAYS_DIR / name}: cannot decode samples {chunk * size}..{(chunk + 1) * size - 1} "
                f"({error}); run `python -m stores verify {self.path}`"
            ) from error
        self._chunks[key] = block
        self._cached_bytes += block.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._chunks) > 1:
            self._cached_bytes -= self._chunks.popitem(last=False)[1].nbytes
        return block

    def read(self, sample_indices: np.ndarray, view_indices: np.ndarray) -> dict[str, np.ndarray]:
        """Batched read of pairs (sample_indices[i], view_indices[i]) -> ``{field: [B, ...]}``."""
        sample_indices = np.asarray(sample_indices, dtype=np.int64)
        view_indices = np.asarray(view_indices, dtype=np.int64)
        if sample_indices.size and not 0 <= sample_indices.min() <= sample_indices.max() < self.manifest.num_samples:
            raise IndexError(f"sample indices must lie in [0, {self.manifest.num_samples}) for {self.path}")
        size = self.manifest.layout["chunk_samples"]
        chunk_of, offset = np.divmod(sample_indices, size)
        rows_of_chunk = [(int(chunk), np.flatnonzero(chunk_of == chunk)) for chunk in np.unique(chunk_of)]
        out = {}
        for name, array in self._open_arrays().items():
            out[name] = np.empty((len(sample_indices), *array.shape[2:]), dtype=array.dtype)
            for chunk, rows in rows_of_chunk:
                out[name][rows] = self._chunk(name, chunk)[offset[rows], view_indices[rows]]
        return out


def open_store(path: str | os.PathLike, *, cache_bytes: int = 256 << 20) -> ReinforcedStore:
    """Open a published store; checks every data file exists with its recorded size.

    ``cache_bytes`` bounds the decoded chunks each process keeps for ``read``.

    Example:
        >>> store = open_store("runs/fmnist-lite0")
        >>> batch = store.read(np.array([0, 5]), np.array([1, 0]))   # {"params": [2, P], ...}
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        interrupted = path.with_name(path.name + ".partial").exists()
        hint = " (an interrupted build: rerun reinforce.build)" if interrupted else ""
        raise FileNotFoundError(f"no reinforced store at {str(path)!r}: {manifest_path.name} is missing{hint}")
    manifest = StoreManifest.from_dict(json.loads(manifest_path.read_text()))
    for record in manifest.files:
        file = path / record["path"]
        size = file.stat().st_size if file.exists() else None
        if size != record["bytes"]:
            state = "missing" if size is None else f"{size} bytes, manifest says {record['bytes']}"
            raise StoreCorruptError(f"store file {file} is {state}; the store is damaged")
    return ReinforcedStore(path, manifest, cache_bytes)


def _file_record(root: Path, file: Path) -> dict[str, Any]:
    return {"path": str(file.relative_to(root)), "bytes": file.stat().st_size, "sha256": sha256_file(file)}


def sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe_mismatch(old: Any, new: Any, prefix: str = "") -> str:
    """First differing key between two JSON values, e.g. ``content.views: 4 != 8``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return describe_mismatch(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} != {new!r}"
