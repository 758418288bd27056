"""Reinforced stores: a zarr v3 group of per-view arrays + ``manifest.json`` + ``samples.parquet``.

Layout (format version 2): ``targets.zarr/theta [N, K, P] uint8`` (the policy's packed θ records) and
one group per named target, ``targets.zarr/<target>/<array> [N, K, ...]``, each target with its own
codec (``stores.manifest.TargetRecord``). Readers ask for the targets they need and touch nothing else.

Writing is resumable and crash-safe: the build writes into ``STORE.partial/``, one *unit* (a whole
shard of samples) at a time, and commits a unit by atomically renaming a marker that also carries
the unit's sample rows and codec-fidelity statistics. A rerun skips committed units; ``finalize``
writes the parquet table and the manifest (with file sizes and sha256) and renames the directory
into place. A published store is never written again.

The store knows nothing of models: θ is an opaque byte record, targets are named arrays.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs

from stores.codecs import Codec, create_codec
from stores.lineage import dependency_versions
from stores.location import Location
from stores.lock import LOCK, StoreLock
from stores.manifest import (
    FORMAT_VERSION,
    STORE_ID_PROMISE,
    ArraySpec,
    FileRecord,
    ManifestError,
    StoreContent,
    StoreManifest,
    content_id,
    read_format_version,
)
from stores.untrusted import UntrustedInputError, load_json, printable

__all__ = ["ReinforcedStore", "StoreCorruptError", "StoreFormatError", "StoreWriter", "as_tensor", "open_store"]

ARRAYS_DIR = "targets.zarr"
# zarr warns on every consolidate/open that consolidated metadata is not in the v3 spec yet; it is our format
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
THETA = "theta"
COMMITS_DIR = "commits"
BUILD_RECORD = "build.json"
MANIFEST = "manifest.json"
SAMPLES_FILE = "samples.parquet"
SHARDS_DIR = "shards"  # a webdataset store's tar shards (stores.wds)
# A store is input from someone else: sizes are capped before anything is read or allocated.
MAX_MANIFEST_BYTES = 64 << 20
MAX_METADATA_BYTES = 16 << 20  # any zarr.json
MAX_SAMPLE_ROW_BYTES = 4096  # samples.parquet may hold at most this much per sample (+ 1 MiB)
MAX_DIM = 1 << 20  # any per-view array dimension
STORED_DTYPES = frozenset(np.dtype(t).str for t in ("u1", "i1", "<u2", "<i2", "<u4", "<i4", "<f2", "<f4", "<f8"))
SAMPLE_SCHEMA = {"index": "Int64", "key": "String", "uri": "String", "height": "Int32", "width": "Int32",
                 "status": "String", "error": "String"}


class StoreCorruptError(RuntimeError):
    """A store file is missing, truncated or fails its checksum; the message names the file."""


class StoreFormatError(ValueError):
    """A store written in another format version, or whose manifest does not match the schema."""


def array_paths(content: StoreContent) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every stored array, ``"theta"`` and ``"<target>/<array>"``, with its per-view shape and dtype."""
    paths = {THETA: ((content.policy.record_bytes,), np.dtype(np.uint8))}
    for target, record in content.targets.items():
        for name, spec in record.arrays.items():
            paths[f"{target}/{name}"] = (spec.shape, np.dtype(spec.dtype))
    return paths


def _merge_fidelity(parts: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per-unit ``{target: {metric: {sum, count, min, max}}}`` -> ``{target: {metric: {mean, min, max}}}``."""
    merged: dict[str, dict[str, dict[str, float]]] = {}
    for part in parts:
        for target, metrics in part.items():
            for metric, s in metrics.items():
                m = merged.setdefault(target, {}).setdefault(metric, {"sum": 0.0, "count": 0, "min": s["min"],
                                                                      "max": s["max"]})
                m["sum"] += s["sum"]
                m["count"] += s["count"]
                m["min"], m["max"] = min(m["min"], s["min"]), max(m["max"], s["max"])
    return {target: {metric: {"mean": m["sum"] / max(1, m["count"]), "min": m["min"], "max": m["max"]}
                     for metric, m in metrics.items()} for target, metrics in merged.items()}


def fidelity_stats(values: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per-item fidelity tensors -> mergeable ``{metric: {sum, count, min, max}}``."""
    return {metric: {"sum": float(v.double().sum()), "count": int(v.numel()), "min": float(v.min()),
                     "max": float(v.max())} for metric, v in values.items() if v.numel()}


def _compression(name: str, dtype: np.dtype) -> dict[str, Any]:
    """Per-array zarr codecs, chosen by measurement (benchmarks/build.py): θ records stored field-major
    (a transpose puts each field's bytes together, 7.2 -> 4.0 B/view) and bit-shuffled; byte arrays
    unshuffled; wider dtypes byte-shuffled. Every chunk ends with a crc32c."""
    shuffle = "bitshuffle" if name == THETA else ("noshuffle" if dtype.itemsize == 1 else "shuffle")
    filters = [zarr.codecs.TransposeCodec(order=(2, 0, 1))] if name == THETA else []
    return {"filters": filters, "compressors": [zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle=shuffle),
                                                zarr.codecs.Crc32cCodec()]}


class StoreWriter:
    """Write a store in three steps, by one process or many: ``create`` (once, rank 0), ``write_unit`` (any
    process, whole units only: a unit is a shard of every array, so no two writers touch one shard),
    ``finalize`` (once, after every unit is committed). Resumable after any crash of any writer.

    Everything goes into ``URL.partial`` until ``finalize`` publishes it; ``URL`` is a local path or any
    fsspec URL.

    Args:
        url: final store location.
        content: everything that determines the values (hashed into the store id).
        unit_samples: samples per shard = per commit unit; chunk_samples: samples per read chunk.
    """

    def __init__(self, url: str | os.PathLike | Location, content: StoreContent, *,
                 unit_samples: int = 4096, chunk_samples: int = 256):
        self.location = url if isinstance(url, Location) else Location(url)
        self.partial = self.location.sibling(self.location.name + ".partial")
        self.content = content
        self.arrays = array_paths(content)
        self.num_samples, self.views = content.num_samples, content.views
        chunk_samples = min(chunk_samples, unit_samples)
        unit_samples -= unit_samples % chunk_samples  # a shard holds whole chunks
        self.layout = {"unit_samples": unit_samples, "chunk_samples": chunk_samples}
        self.store_id = content_id(content)

    @property
    def num_units(self) -> int:
        return -(-self.num_samples // self.layout["unit_samples"])

    def unit_range(self, unit: int) -> range:
        start = unit * self.layout["unit_samples"]
        return range(start, min(start + self.layout["unit_samples"], self.num_samples))

    def committed_units(self) -> set[int]:
        """Units whose data and marker are written, from one listing of the commit folder."""
        return {int(name.removesuffix(".json")) for name in self.partial.listdir(COMMITS_DIR)
                if name.endswith(".json") and name.removesuffix(".json").isdigit()}

    def pending_units(self, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's share of the uncommitted units (every ``world``-th of them, so resumed work is balanced)."""
        return sorted(set(range(self.num_units)) - self.committed_units())[rank::world]

    def _build_record(self) -> dict[str, Any]:
        return json.loads(json.dumps({"store_id": self.store_id, "content": self.content.to_dict(),
                                      "layout": self.layout}))

    def create(self) -> None:
        """Rank 0, before any ``write_unit``: the array metadata and ``build.json`` in ``URL.partial``.

        Idempotent for the same settings (a resumed build keeps its committed units); an interrupted build
        with other settings is refused, naming the first difference.
        """
        if self.partial.exists(BUILD_RECORD):
            self.check_created()
            return
        for name in self.partial.listdir():  # crashed before build.json was written: nothing committed yet
            if name != LOCK:
                self.partial.remove(name)
        self.partial.makedirs(COMMITS_DIR)
        self._create_data()
        self.partial.write_text(BUILD_RECORD, json.dumps(self._build_record(), indent=1, sort_keys=True))

    def _create_data(self) -> None:
        """The empty sharded arrays under ``targets.zarr`` (metadata only)."""
        group = zarr.open_group(self.partial.zarr_store(ARRAYS_DIR, read_only=False), mode="w", zarr_format=3)
        for name, (shape, dtype) in self.arrays.items():
            parent, _, leaf = name.rpartition("/")
            target = group.require_group(parent) if parent else group
            target.create_array(
                leaf, shape=(self.num_samples, self.views, *shape), dtype=dtype,
                chunks=(self.layout["chunk_samples"], self.views, *shape),
                shards=(self.layout["unit_samples"], self.views, *shape), fill_value=0, **_compression(name, dtype),
                config={"write_empty_chunks": True},  # every chunk on disk: a missing one is damage, not zeros
            )

    def check_created(self) -> None:
        """Any rank, after ``create``: the partial store is this build's (same content and layout)."""
        if not self.partial.exists(BUILD_RECORD):
            raise RuntimeError(f"{self.partial}: no build.json; StoreWriter.create must run first (on rank 0)")
        previous = json.loads(self.partial.read_text(BUILD_RECORD))
        if previous != self._build_record():
            raise ValueError(
                f"{self.partial} holds an interrupted build with different settings "
                f"({describe_mismatch(previous, self._build_record())}); delete it or rerun with the same arguments"
            )

    def write_unit(self, unit: int, arrays: dict[str, np.ndarray], rows: list[dict[str, Any]],
                   fidelity: dict[str, Any] | None = None) -> None:
        """Write one whole shard of every array, then commit it with its sample rows and fidelity stats."""
        span = self.unit_range(unit)
        if len(rows) != len(span):
            raise ValueError(f"unit {unit} covers {len(span)} samples, got {len(rows)} sample rows")
        self._write_data(unit, arrays, rows)
        marker = {"rows": rows, "fidelity": fidelity or {}}
        self.partial.write_text(f"{COMMITS_DIR}/{unit:08d}.json", json.dumps(marker))

    def _write_data(self, unit: int, arrays: dict[str, np.ndarray], rows: list[dict[str, Any]]) -> None:
        """One whole zarr shard of every array (``arrays[name]`` is ``[unit samples, K, ...]``)."""
        span = self.unit_range(unit)
        group = zarr.open_group(self.partial.zarr_store(ARRAYS_DIR, read_only=False), mode="r+")
        for name in self.arrays:
            array = group[name]
            # an uncommitted unit's shard is what a killed write left (cut short): never let zarr read it back
            shard = array.metadata.encode_chunk_key((unit,) + (0,) * (array.ndim - 1))
            self.partial.remove(f"{ARRAYS_DIR}/{name}/{shard}")
            array[span.start: span.stop] = arrays[name]

    def _seal(self) -> None:
        """After the last unit, before checksums: what readers of this format open first."""
        zarr.consolidate_metadata(self.partial.zarr_store(ARRAYS_DIR, read_only=False), zarr_format=3)

    def finalize(self, library_version: str, fidelity: dict[str, Any] | None = None) -> StoreManifest:
        """Write samples.parquet + manifest.json and publish the store under its final name.

        ``fidelity`` replaces the summary merged from the units' markers (an export copies its source's)."""
        import polars as pl

        missing = sorted(set(range(self.num_units)) - self.committed_units())
        if missing:
            raise RuntimeError(f"cannot finalize {self.partial}: units {missing[:10]} are not committed")
        markers = [json.loads(self.partial.read_text(f"{COMMITS_DIR}/{unit:08d}.json"))
                   for unit in range(self.num_units)]
        samples = pl.DataFrame([row for marker in markers for row in marker["rows"]],
                               schema={"index": pl.Int64, "key": pl.String, "uri": pl.String, "height": pl.Int32,
                                       "width": pl.Int32, "status": pl.String, "error": pl.String})
        table = io.BytesIO()
        samples.write_parquet(table, compression="zstd")
        self.partial.write_bytes(SAMPLES_FILE, table.getvalue())
        self._seal()
        self.partial.remove(COMMITS_DIR)
        self.partial.remove(BUILD_RECORD)
        skipped = int((samples["status"] != "ok").sum())
        sizes = {rel: size for rel, size in self.partial.file_sizes().items() if rel != LOCK}
        manifest = StoreManifest(
            format_version=FORMAT_VERSION, store_id=self.store_id, content=self.content, layout=self.layout,
            summary={"samples": self.num_samples, "ok": self.num_samples - skipped, "skipped": skipped,
                     "views": self.views, "stored_views": (self.num_samples - skipped) * self.views,
                     "store_id_promise": STORE_ID_PROMISE,
                     "fidelity": fidelity if fidelity is not None else
                     _merge_fidelity([marker["fidelity"] for marker in markers])},
            files=tuple(FileRecord(rel, size, self.partial.sha256(rel)) for rel, size in sorted(sizes.items())),
            library_version=library_version,
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            versions=dependency_versions(),
        )
        self.partial.write_text(MANIFEST, json.dumps(manifest.to_dict(), indent=1))
        self.partial.publish_to(self.location, last=MANIFEST, leave=LOCK)
        return manifest

    def lock(self) -> StoreLock:
        """The one-writer lock of this store (``STORE.partial/lock.json``); ``reinforce.build`` holds it."""
        return StoreLock(self.partial)


class ReinforcedStore:
    """Read access to a published store. Open with ``open_store``; safe to use after fork.

    Training reads random samples, so a batch touches many chunks; decoded chunks are kept in a
    per-process LRU cache of ``cache_bytes`` (a chunk is decoded once, not once per batch). The
    cache starts empty in each DataLoader worker. Arrays are opened lazily, only those read.
    """

    def __init__(self, location: Location, manifest: StoreManifest, cache_bytes: int = 256 << 20):
        self.location = location
        self.path = location.url  # for messages and for reopening: a local path or a URL
        self.manifest = manifest
        self.cache_bytes = cache_bytes
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._pid = -1
        self._sizes = {record.path: record.bytes for record in manifest.files}
        self._indexes: dict[str, np.ndarray] = {}
        self._usable: np.ndarray | None = None

    @property
    def samples(self):
        """The per-sample table (polars DataFrame): index, key, uri, height, width, status, error; checked to be
        exactly one row per sample, in order, before anyone indexes with it."""
        import polars as pl

        where = self.location.where(SAMPLES_FILE)
        try:
            table = pl.read_parquet(io.BytesIO(self.location.read_bytes(SAMPLES_FILE)))
        except Exception as error:  # polars raises its own errors for a damaged file: name the file instead
            raise StoreCorruptError(f"{where}: not a readable parquet table ({type(error).__name__})") from None
        schema = {name: str(dtype) for name, dtype in table.schema.items()}
        if schema != SAMPLE_SCHEMA:
            raise StoreFormatError(f"{where}: columns {schema}, expected {SAMPLE_SCHEMA}")
        n = self.manifest.num_samples
        if len(table) != n or not table["index"].equals(pl.Series("index", np.arange(n, dtype=np.int64))):
            raise StoreFormatError(f"{where}: expected rows for samples 0..{n - 1} in order, got {len(table)} rows")
        nulls = [name for name in ("key", "uri", "status", "height", "width") if table[name].null_count()]
        if nulls:  # a null status is neither ok nor skipped: its sample would silently drop out of training
            raise StoreFormatError(f"{where}: null values in column(s) {', '.join(nulls)}")
        if not table["status"].is_in(["ok", "skipped"]).all():
            raise StoreFormatError(f"{where}: status must be ok or skipped")
        ok = table.filter(pl.col("status") == "ok")
        if len(ok) and min(ok["height"].min(), ok["width"].min()) < 1:
            raise StoreFormatError(f"{where}: a usable sample has no height or width")
        return table

    @property
    def usable(self) -> np.ndarray:
        """bool ``[N]``: the samples whose status is ok (numpy, kept: read before DataLoader workers fork)."""
        if self._usable is None:
            self._usable = (self.samples["status"] == "ok").to_numpy()
        return self._usable

    @property
    def targets(self) -> list[str]:
        return list(self.manifest.content.targets)

    def codec(self, target: str) -> Codec:
        """The codec that decodes ``target`` (rebuilt from the manifest)."""
        return create_codec(**self.manifest.content.targets[self._known(target)].codec)

    def _known(self, target: str) -> str:
        if target not in self.manifest.content.targets:
            raise ValueError(f"store {self.path} has no target {target!r}; it holds {', '.join(self.targets)}")
        return target

    @property
    def shards(self) -> list[str]:
        """A webdataset store's tar shards, relative to the store, in order (``[]`` for a zarr store)."""
        return sorted(f.path for f in self.manifest.files if f.path.startswith(SHARDS_DIR + "/"))

    def _array(self, name: str) -> Any:
        if self.manifest.format != "zarr":
            raise StoreFormatError(f"store {self.path} holds webdataset shards, which have no random access: "
                                   "stream it with reinforce.replay.open_replay")
        if self._pid != os.getpid():  # reopen lazily in each worker process
            self._group = None
            self._arrays, self._pid = {}, os.getpid()
            self._chunks.clear()
            self._cached_bytes = 0
        if name not in self._arrays:
            self._arrays[name] = self._checked_array(name)
        return self._arrays[name]

    def _checked_array(self, name: str) -> Any:
        """Array ``name`` opened from the zarr metadata, refused unless its shape, dtype and chunks are the ones
        the manifest describes (the metadata is input too: it must not size allocations or reads)."""
        where = self.location.where(f"{ARRAYS_DIR}/{name}")
        per_view, dtype = array_paths(self.manifest.content)[name]
        views, chunk = self.manifest.views, self.manifest.layout["chunk_samples"]
        if self._group is None:
            check_zarr_metadata(self.location, self.manifest, every=False)
            try:
                self._group = zarr.open_group(self.location.zarr_store(ARRAYS_DIR, read_only=True), mode="r",
                                              use_consolidated=True)
            except Exception as error:  # any array's malformed metadata fails the consolidated group
                raise StoreFormatError(f"{self.location.where(ARRAYS_DIR + '/zarr.json')}: unreadable zarr "
                                       f"metadata ({type(error).__name__}: {error})") from None
        try:
            array = self._group[name]
            found = (tuple(array.shape), np.dtype(array.dtype), tuple(array.chunks))
        except Exception as error:  # zarr raises many kinds for malformed metadata: name the array instead
            raise StoreFormatError(f"{where}: unreadable zarr metadata ({type(error).__name__}: {error})") from None
        expected = ((self.manifest.num_samples, views, *per_view), dtype, (chunk, views, *per_view))
        if found != expected:
            raise StoreFormatError(f"{where}: shape, dtype, chunks {found} differ from the manifest's {expected}")
        return array

    def shard_file(self, name: str, chunk: int) -> str:
        """The store file (relative) of the zarr shard holding chunk ``chunk`` of array ``name``."""
        array = self._array(name)
        unit = chunk * self.manifest.layout["chunk_samples"] // self.manifest.layout["unit_samples"]
        return f"{ARRAYS_DIR}/{name}/{array.metadata.encode_chunk_key((unit,) + (0,) * (array.ndim - 1))}"

    def _present(self, shard: str, chunks: int) -> np.ndarray:
        """bool ``[chunks]``: the chunks shard file ``shard``'s index holds. The index ends the file: ``chunks``
        (offset, nbytes) uint64 pairs, all ones for an absent chunk, then a crc32c (zarr's sharding codec)."""
        if shard not in self._indexes:
            size, length = self._sizes[shard], 16 * chunks + 4
            if size < length:
                raise StoreCorruptError(f"{self.location.where(shard)}: {size} bytes, shorter than its shard index")
            tail = self.location.fs.cat_file(self.location.path(shard), start=size - length, end=size)
            entries = np.frombuffer(tail[:-4], dtype="<u8").reshape(chunks, 2)
            self._indexes[shard] = ~(entries == np.iinfo(np.uint64).max).all(-1)
        return self._indexes[shard]

    def chunk(self, name: str, chunk: int) -> np.ndarray:
        """Decoded chunk ``chunk`` of array ``name`` (``[chunk_samples, K, ...]``), through the LRU cache; its
        shard must be a file the manifest lists (zarr would read a missing one as zeros) and its values pass the
        codec's ``check``. Every read of a zarr store's arrays comes through here."""
        key = (name, chunk)
        if key in self._chunks and self._pid == os.getpid():
            self._chunks.move_to_end(key)
            return self._chunks[key]
        size = self.manifest.layout["chunk_samples"]
        array = self._array(name)  # metadata checked (StoreFormatError) before any chunk is read
        where = f"{self.location.where(ARRAYS_DIR + '/' + name)}: samples {chunk * size}..{(chunk + 1) * size - 1}"
        shard = self.shard_file(name, chunk)
        if shard not in self._sizes:
            raise StoreCorruptError(f"{where}: shard file {shard} is not in the manifest (it would read as zeros); "
                                    f"run `python -m stores verify {self.path}`")
        per_shard = self.manifest.layout["unit_samples"] // size
        if not self._present(shard, per_shard)[chunk % per_shard]:
            raise StoreCorruptError(f"{where}: the index of shard file {shard} lists no such chunk (it would read "
                                    f"as zeros); run `python -m stores verify {self.path}`")
        try:
            block = array[chunk * size: (chunk + 1) * size]
        except Exception as error:  # zarr raises codec-specific errors; name the file instead
            raise StoreCorruptError(f"{where} do not decode ({printable(error)}); "
                                    f"run `python -m stores verify {self.path}`") from error
        target, _, leaf = name.partition("/")
        if leaf:  # skipped samples hold zeros, which no codec promises to decode: check the usable ones
            try:
                self.codec(target).check(leaf, block[self.usable[chunk * size: chunk * size + len(block)]])
            except ValueError as error:
                raise StoreCorruptError(f"{where}: {error}; run `python -m stores verify {self.path}`") from None
        self._chunks[key] = block
        self._cached_bytes += block.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._chunks) > 1:
            self._cached_bytes -= self._chunks.popitem(last=False)[1].nbytes
        return block

    def read(self, sample_indices: np.ndarray, view_indices: np.ndarray,
             targets: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Batched read of pairs (sample_indices[i], view_indices[i]).

        Returns ``{"theta": uint8 [B, P], target: {array: [B, ...]}}`` for each of ``targets`` (default:
        all); arrays of other targets are never opened. Decode a target with ``decode``.
        """
        sample_indices = np.asarray(sample_indices, dtype=np.int64)
        view_indices = np.asarray(view_indices, dtype=np.int64)
        n = self.manifest.num_samples
        if sample_indices.size and not 0 <= sample_indices.min() <= sample_indices.max() < n:
            raise IndexError(f"sample indices must lie in [0, {n}) for {self.path}")
        size = self.manifest.layout["chunk_samples"]
        chunk_of, offset = np.divmod(sample_indices, size)
        rows_of_chunk = [(int(chunk), np.flatnonzero(chunk_of == chunk)) for chunk in np.unique(chunk_of)]

        def gather(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            out = np.empty((len(sample_indices), *shape), dtype=dtype)
            for chunk, rows in rows_of_chunk:
                out[rows] = self.chunk(name, chunk)[offset[rows], view_indices[rows]]
            return out

        content = self.manifest.content
        batch: dict[str, Any] = {THETA: gather(THETA, (content.policy.record_bytes,), np.dtype(np.uint8))}
        for target in self.targets if targets is None else targets:
            arrays = content.targets[self._known(target)].arrays
            batch[target] = {name: gather(f"{target}/{name}", spec.shape, np.dtype(spec.dtype))
                             for name, spec in arrays.items()}
        return batch

    def read_range(self, start: int, stop: int,
                   targets: list[str] | tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The arrays (``"theta"``, ``"<target>/<array>"`` of ``targets``, default all) for samples
        ``start..stop-1``, all views, as stored (read through ``chunk``, so with its checks); arrays of other
        targets are never opened."""
        size = self.manifest.layout["chunk_samples"]
        first, last = start // size, max(start, stop - 1) // size
        names = list(array_paths(self.manifest.content))
        if targets is not None:
            kept = {self._known(target) for target in targets}
            names = [name for name in names if name == THETA or name.split("/", 1)[0] in kept]
        return {name: np.concatenate([self.chunk(name, c) for c in range(first, last + 1)])[start - first * size:
                                                                                             stop - first * size]
                for name in names}

    def decode(self, target: str, payload: dict[str, Any], device: str | torch.device | None = None) -> torch.Tensor:
        """One target's payload (numpy or torch arrays) -> float32 tensor on ``device``, by the store's codec."""
        tensors = {name: as_tensor(a).to(device) for name, a in payload.items()}
        return self.codec(target).decode(tensors)


def as_tensor(array: Any) -> torch.Tensor:
    """A stored array as a tensor; uint16 (no torch kernels on every backend) is widened to int32."""
    if isinstance(array, np.ndarray) and array.dtype == np.uint16:
        array = array.astype(np.int32)
    return torch.as_tensor(array)


def open_store(path: str | os.PathLike | Location, *, cache_bytes: int = 256 << 20) -> ReinforcedStore:
    """Open a published store (a local path or any fsspec URL); checks the manifest's schema and, from one
    listing, every data file's recorded size.

    ``cache_bytes`` bounds the decoded chunks each process keeps for ``read``.

    Example:
        >>> store = open_store("runs/fmnist-lite0")                 # or "s3://bucket/stores/fmnist-lite0"
        >>> batch = store.read(np.array([0, 5]), np.array([1, 0]), targets=["logits"])
        >>> log_probs = store.decode("logits", batch["logits"])       # [2, num_classes]
    """
    location = path if isinstance(path, Location) else Location(path)
    if not location.exists(MANIFEST):
        interrupted = location.sibling(location.name + ".partial").exists(BUILD_RECORD)
        hint = " (an interrupted build: rerun reinforce.build)" if interrupted else ""
        raise FileNotFoundError(f"no reinforced store at {location.url!r}: {MANIFEST} is missing{hint}")
    manifest = read_manifest(location)
    links = location.symlinks()
    if links:  # a link could point anywhere: a store is plain files only
        raise StoreFormatError(f"store {location.url!r} holds symbolic links ({', '.join(links[:3])}); refused")
    sizes = location.file_sizes()
    for record in manifest.files:
        size = sizes.get(record.path)
        if size != record.bytes:
            state = "missing" if size is None else f"{size} bytes, manifest says {record.bytes}"
            raise StoreCorruptError(f"store file {location.where(record.path)} is {state}; the store is damaged")
    return ReinforcedStore(location, manifest, cache_bytes)


def check_zarr_metadata(location: Location, manifest: StoreManifest, *, every: bool = True) -> None:
    """The ``zarr.json`` files parse within the size and depth bounds, before zarr (whose parser recurses) reads
    any: ``every`` one the manifest lists (verify), or only the consolidated root, the one file a reader opens
    (so training still reads nothing of the targets it does not distill)."""
    root = f"{ARRAYS_DIR}/zarr.json"
    for record in manifest.files:
        if record.path == root or (every and record.path.endswith("/zarr.json")):
            try:
                load_json(location.read_bytes(record.path), max_bytes=MAX_METADATA_BYTES,
                          where=location.where(record.path))
            except UntrustedInputError as error:
                raise StoreFormatError(str(error)) from None


def read_manifest(location: Location) -> StoreManifest:
    """Parse and validate ``manifest.json``; another format version is refused in one line."""
    where = location.where(MANIFEST)
    size = location.fs.size(location.path(MANIFEST))
    if size > MAX_MANIFEST_BYTES:
        raise StoreFormatError(f"{where}: {size} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})")
    try:
        data = load_json(location.read_bytes(MANIFEST), max_bytes=MAX_MANIFEST_BYTES, where=where)
    except UntrustedInputError as error:
        raise StoreFormatError(str(error)) from None
    found = read_format_version(data)
    if found == 1:
        raise StoreFormatError(
            f"{location.url} is a format-version-1 store; this library reads version {FORMAT_VERSION}: "
            f"upgrade it with `python -m reinforce.upgrade {location.url} NEW_STORE` (lossless, no teacher run)"
        )
    if found != FORMAT_VERSION:
        raise StoreFormatError(f"{where}: format_version {found!r} is not one this library reads "
                               f"({FORMAT_VERSION}); a newer vfm-reinforce may read it")
    try:
        manifest = StoreManifest.from_dict(data)
        check_manifest(manifest)
    except (ManifestError, TypeError, ValueError, KeyError, AttributeError, OverflowError) as error:
        raise StoreFormatError(printable(f"{where}: {type(error).__name__}: {error}")) from None
    return manifest


def check_manifest(manifest: StoreManifest) -> None:
    """What the schema cannot say: counts positive and bounded, every target's codec rebuilt from its record and
    describing exactly the arrays the record lists, dtypes plain numbers (no objects), file records sane."""
    content = manifest.content
    if manifest.store_id != content_id(content):
        raise ManifestError(f"store_id {manifest.store_id!r} is not the hash of the content ({content_id(content)}): "
                            "the content was edited after the build")
    names = content.teacher.class_names
    if not all(isinstance(n, str) for n in names) or len(names) not in (0, content.teacher.num_classes):
        raise ManifestError("content.teacher.class_names must be num_classes strings")

    def count(value: Any, what: str, low: int = 1, high: int = 1 << 40) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ManifestError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
        return value

    count(content.views, "content.views", high=1 << 16)
    count(content.num_samples, "content.transfer_set.num_samples", low=0)
    count(content.policy.record_bytes, "content.policy.record_bytes", high=1 << 12)
    chunk = count(manifest.layout.get("chunk_samples", 1), "layout.chunk_samples", high=1 << 24)
    if count(manifest.layout["unit_samples"], "layout.unit_samples", high=1 << 24) % chunk:
        raise ManifestError("layout.unit_samples must be a multiple of layout.chunk_samples")
    for name, target in content.targets.items():
        codec = create_codec(**target.codec)
        if codec.kind != target.kind:
            raise ManifestError(f"content.targets.{name}: kind {target.kind!r} but codec {codec.name!r} is "
                                f"{codec.kind}")
        described = {a: ArraySpec(shape, dtype.str) for a, (shape, dtype) in codec.arrays().items()}
        if described != target.arrays:
            raise ManifestError(f"content.targets.{name}.arrays differ from what its codec stores")
    for name, (shape, dtype) in array_paths(content).items():
        if dtype.str not in STORED_DTYPES or len(shape) > 4 or not all(0 < d <= MAX_DIM for d in shape):
            raise ManifestError(f"array {name}: {dtype.str} {shape} is not a stored array this library writes")
    for record in manifest.files:
        count(record.bytes, f"files[{record.path}].bytes", low=0)
        if record.path.endswith("zarr.json") and record.bytes > MAX_METADATA_BYTES:
            raise ManifestError(f"files[{record.path}]: {record.bytes} bytes, more than zarr metadata may hold")
        if record.path == SAMPLES_FILE and record.bytes > MAX_SAMPLE_ROW_BYTES * content.num_samples + (1 << 20):
            raise ManifestError(f"files[{record.path}]: {record.bytes} bytes for {content.num_samples} samples")


def describe_mismatch(old: Any, new: Any, prefix: str = "") -> str:
    """First differing key between two JSON values, e.g. ``content.views: 4 != 8``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return describe_mismatch(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {old!r} != {new!r}"
